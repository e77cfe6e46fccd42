#!/usr/bin/env bash
# batchlab-ml-backend as Label Studio uses it, on the real model, in one run. Bulk /predict
# (Retrieve Predictions) against one task at a time, both measured in this run: 200
# candidate-evaluation tasks, 200 TREC tasks with 4 few-shot examples each (20 ground-truth
# annotations in a SQLite store), the forward passes and rows a task in both modes (and the most
# bulk could gain from batching alone), the latency of a task an annotator opens while the bulk
# request runs, and /health p99 throughout. Then /predict latency for one task (against a bare
# generation of the same length), /health and /setup p99 while a 100-task /predict runs, the
# 100-task request under a 10 s deadline, and TREC agreement (100 rows) zero-shot and with 20
# ground-truth examples. Prints one table, headed by the commit measured.
#   scripts/bench-ml-backend.sh [MODEL=models/SmolLM2-135M-Instruct.Q4_1.gguf] [all|bulk|protocol]
# BENCH_PROFILE=dev reuses the test build (dependencies and the engine at opt-level 3) instead of
# a release build. Run it on an idle machine.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
MODEL="${1:-models/SmolLM2-135M-Instruct.Q4_1.gguf}"
SECTIONS="${2:-all}"
TREC="${BATCHLAB_TREC:-$ROOT/../shared/datasets/trec_test.jsonl}"
[[ -f "$MODEL" ]] || scripts/fetch-model.sh
[[ -f "$TREC" ]] || { echo "TREC data not found at $TREC (set BATCHLAB_TREC)" >&2; exit 1; }
PROFILE="${BENCH_PROFILE:-release}"
cargo build --profile "$PROFILE" -q -p batchlab-ml-backend --example bench_ml_backend
PROFILE_DIR="$([[ "$PROFILE" == dev ]] && echo debug || echo "$PROFILE")"
echo "ml-backend benchmark: $MODEL, commit $(git describe --always --dirty --abbrev=10), $PROFILE build, $(nproc) CPUs"
echo
RUST_LOG=warn "${CARGO_TARGET_DIR:-target}/$PROFILE_DIR/examples/bench_ml_backend" "$MODEL" "$TREC" "$SECTIONS"
