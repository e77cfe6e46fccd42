#!/usr/bin/env bash
# Prediction quality of the ML backend's closed answers, measured, not asserted: on SMS Spam (a
# balanced subset of distinct texts) and TREC from ../shared/datasets, with 0, 20, 50, 100 and
# 200 annotations given (three seeded splits, evaluated on rows never given; means): accuracy, macro-F1 and expected
# calibration error of batchlab's answers (zero-shot, or the classifier learned from the
# annotations where it beats zero-shot on held-out folds), beside the majority class and
# TF-IDF + logistic regression trained on the same rows (scikit-learn, in .venv-bench, created
# here). Prints one table, headed by the commit measured, then the targets met or missed.
#   scripts/bench-quality.sh [MODEL=models/SmolLM2-135M-Instruct.Q4_1.gguf]
# BENCH_PROFILE=dev reuses the test build instead of a release build. Run it on an idle machine.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
MODEL="${1:-models/SmolLM2-135M-Instruct.Q4_1.gguf}"
DATASETS="${BATCHLAB_DATASETS:-$ROOT/../shared/datasets}"
[[ -f "$MODEL" ]] || scripts/fetch-model.sh
[[ -f "$DATASETS/trec_test.jsonl" && -f "$DATASETS/sms_spam.jsonl" ]] \
  || { echo "datasets not found in $DATASETS (set BATCHLAB_DATASETS)" >&2; exit 1; }
if [[ ! -x .venv-bench/bin/python ]] || ! .venv-bench/bin/python -c 'import sklearn' 2>/dev/null; then
  python3 -m venv .venv-bench
  .venv-bench/bin/pip install -q 'scikit-learn>=1.3,<2'
fi
PROFILE="${BENCH_PROFILE:-release}"
cargo build --profile "$PROFILE" -q -p batchlab-inference --example bench_quality
PROFILE_DIR="$([[ "$PROFILE" == dev ]] && echo debug || echo "$PROFILE")"
COMMIT="$(git describe --always --dirty --abbrev=10)"
OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT
echo "quality benchmark: $MODEL, commit $COMMIT, $PROFILE build, $(nproc) CPUs"
echo
RUST_LOG=warn "${CARGO_TARGET_DIR:-target}/$PROFILE_DIR/examples/bench_quality" "$MODEL" "$DATASETS" "$OUT/report.json"
.venv-bench/bin/python scripts/bench_quality.py "$OUT/report.json" "$DATASETS" "$COMMIT"
