#!/usr/bin/env bash
# The dependency graph matches what runs (ARCHITECTURE.md, "Crates"): batchlab-api and
# batchlab-core link no model code (no engine, no inference crate, no candle), and only the
# binaries that run a model offer a `cuda` feature. Exits non-zero naming what is wrong.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

fail=0
for package in batchlab-core batchlab-api; do
  model_code=$(cargo tree --offline -q -p "$package" -e normal,build --prefix none \
    | awk '{print $1}' | grep -E '^(batchlab-engine|batchlab-inference|candle-.*)$' | sort -u || true)
  if [[ -n "$model_code" ]]; then
    echo "layering: $package links model code: $(echo $model_code)" >&2
    fail=1
  fi
done
for manifest in crates/core/Cargo.toml crates/api/Cargo.toml; do
  if grep -qE '^cuda *=' "$manifest"; then
    echo "layering: $manifest offers a cuda feature, but it runs no model" >&2
    fail=1
  fi
done
for package in batchlab-worker batchlab-ml-backend; do
  if ! cargo tree --offline -q -p "$package" -e normal --prefix none | grep -q '^batchlab-engine '; then
    echo "layering: $package no longer links the engine; update this check and ARCHITECTURE.md" >&2
    fail=1
  fi
done
[[ $fail == 0 ]] && echo "layering: batchlab-api and batchlab-core link no model code"
exit $fail
