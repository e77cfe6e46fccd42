#!/usr/bin/env bash
# Regenerates the engine's golden fixtures (crates/engine/tests/fixtures/golden-*.json) with
# llama.cpp, through llama-cpp-python built from source into .venv-bench (as
# scripts/bench-engine.sh does): top-k logits per position and tokenizer ids, for the default
# model, Gemma 3 270M and the tiny random-weight models of scripts/tiny-models.sh. Run it when a
# model file or the prompts change; commit the result.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
scripts/fetch-model.sh
scripts/fetch-model.sh gemma3
scripts/tiny-models.sh
source scripts/lib.sh
ensure_llama_cpp
OUT=crates/engine/tests/fixtures
mkdir -p "$OUT"
.venv-bench/bin/python scripts/golden_llama_cpp.py models/SmolLM2-135M-Instruct.Q4_1.gguf "$OUT/golden-smollm2.json"
.venv-bench/bin/python scripts/golden_llama_cpp.py models/gemma-3-270m-q4_k_m.gguf "$OUT/golden-gemma3.json"
for arch in qwen2 qwen3 llama3 phi3; do
  .venv-bench/bin/python scripts/golden_llama_cpp.py "models/tiny-$arch.gguf" "$OUT/golden-tiny-$arch.json"
done
.venv-bench/bin/python -c 'import llama_cpp; print("llama-cpp-python", llama_cpp.__version__)'
