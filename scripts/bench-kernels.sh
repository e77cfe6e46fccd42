#!/usr/bin/env bash
# The packed matmul kernel on SmolLM2-shaped matrices (Q4_1 layers, a Q8_0 slice of the
# vocabulary), 1 to 128 rows, on every path this CPU runs: AVX2, AVX-512 VNNI, and AMX tiles
# (with VNNI for the rows after the last whole tile). Each cell is the best of 7 timings, in µs
# and GMAC/s, all measured in this run; every path's output is checked bit for bit against the
# best vector path's. Then the same product streamed over 120 distinct matrices (66 MB), as a
# forward pass reads its weights, in GB/s. Prints the tables, headed by the commit and the CPU's
# kernel features.
#   scripts/bench-kernels.sh
# BENCH_PROFILE=dev reuses the test build (the engine at opt-level 3) instead of a release build.
# Run it on an idle machine.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PROFILE="${BENCH_PROFILE:-release}"
FEATURES="$(grep -o -w -E 'avx2|avx512_vnni|amx_int8' /proc/cpuinfo 2>/dev/null | sort -u | tr '\n' ' ')"
echo "packed kernel benchmark: commit $(git describe --always --dirty --abbrev=10), $PROFILE build, $(nproc) CPUs, ${FEATURES:-no kernel features listed}"
echo
OUT="$(cargo test --profile "$PROFILE" -q -p batchlab-engine --lib kernel_throughput -- --ignored --nocapture --test-threads=1 2>&1)" \
  || { echo "$OUT" >&2; exit 1; }
grep -E '^\|' <<<"$OUT"
