#!/usr/bin/env bash
# The engine against llama.cpp on the same GGUF and thread count, in the same run: prompt
# tokens/s (300-token prompt), decode tokens/s (one stream), aggregate decode tokens/s with 16
# concurrent requests (llama.cpp with 16 sequences in one batch per step, as its server runs
# them), seconds per 5-way choice-scoring field after a 75-token prompt (llama.cpp: the prompt
# once, each candidate in its own sequence sharing its cache), peak RSS (llama.cpp's without
# the Python interpreter's share). llama-cpp-python is pinned (scripts/lib.sh).
# Runs batchlab twice: without a prompt cache (as llama.cpp runs), and with its default 128 MB one
# (only its peak RSS is reported). Prints one table with the ratios. llama.cpp comes from
# llama-cpp-python, built from source (about 5 minutes, once) into .venv-bench.
#   scripts/bench-engine.sh [MODEL=models/SmolLM2-135M-Instruct.Q4_1.gguf] [THREADS=2]
# BENCH_PROFILE=dev reuses the test build (dependencies and the engine at opt-level 3) instead of
# a release build: quicker to get, and the engine's hot code is compiled the same way.
# Run it on an idle machine: both engines spin their threads while they work.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
MODEL="${1:-models/SmolLM2-135M-Instruct.Q4_1.gguf}"
THREADS="${2:-2}"
[[ -f "$MODEL" ]] || scripts/fetch-model.sh
source scripts/lib.sh
ensure_llama_cpp
PROFILE="${BENCH_PROFILE:-release}"
cargo build --profile "$PROFILE" -q -p batchlab-engine --example bench_engine
PROFILE_DIR="$([[ "$PROFILE" == dev ]] && echo debug || echo "$PROFILE")"
BENCH="${CARGO_TARGET_DIR:-target}/$PROFILE_DIR/examples/bench_engine"
# Without a prompt cache, as llama.cpp runs here; then again with batchlab's default 128 MB one,
# for its peak RSS.
OURS="$(RUST_LOG=warn "$BENCH" "$MODEL" "$THREADS" 0)"
OURS_CACHED="$(RUST_LOG=warn "$BENCH" "$MODEL" "$THREADS" 128)"
THEIRS="$(.venv-bench/bin/python scripts/bench_llama_cpp.py "$MODEL" "$THREADS")"
python3 - "$OURS" "$THEIRS" "$MODEL" "$THREADS" "$OURS_CACHED" <<'PY'
import json, os, subprocess, sys
ours, theirs, model, threads = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3], sys.argv[4]
cached = json.loads(sys.argv[5])
commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
print(f"engine benchmark: {model}, {threads} threads, commit {commit}, {os.environ.get('BENCH_PROFILE', 'release')} build, "
      f"llama-cpp-python {theirs['llama_cpp_python']}\n")
print(f"| metric | batchlab | llama.cpp | ratio | target |")
print(f"| --- | --- | --- | --- | --- |")
def row(name, key, fmt, higher_better, target):
    a, b = ours[key], theirs[key]
    ratio = "" if b is None else f"{(a / b if higher_better else b / a):.2f}x"
    bs = "n/a" if b is None else format(b, fmt)
    print(f"| {name} | {format(a, fmt)} | {bs} | {ratio} | {target} |")
row("prompt tokens/s, 300-token prompt", "prompt_tps", ".0f", True, ">= 1.0x")
row("decode tokens/s, one stream", "decode_tps", ".1f", True, ">= 1.0x")
row("aggregate decode tokens/s, 16 requests", "aggregate16_tps", ".1f", True, ">= 1.0x")
# Each engine's own ratio: the median over runs that measure one stream and then 16 (paired,
# so a drift in the machine's speed between two phases does not move it).
print(f"| same, over its own one stream (median of paired runs) | {ours['aggregate16_over_one']:.2f}x | "
      f"{theirs['aggregate16_over_one']:.2f}x |  | >= 4x own one-stream |")
row("same, prompts' time included", "aggregate16_e2e_tps", ".1f", True, "")
row("choice scoring, 5-way field, 75-token prompt (s)", "scoring_s", ".3f", False, ">= 1.0x (not slower)")
row(f"peak RSS (MB), no prompt cache (llama.cpp: less the interpreter's {theirs['interpreter_rss_mb']:.0f} MB)",
    "peak_rss_mb", ".0f", False, "llama.cpp/batchlab >= 0.67")
print(f"| peak RSS (MB), default 128 MB prompt cache | {cached['peak_rss_mb']:.0f} | {theirs['peak_rss_mb']:.0f} | "
      f"{theirs['peak_rss_mb'] / cached['peak_rss_mb']:.2f}x |  |")
row("load (s)", "load_s", ".2f", False, "")
PY
