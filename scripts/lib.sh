# Helpers shared by the scripts (sourced, not run).

# Is PID a live (non-zombie) process running the named service?
running() {
  local pid="$1" name="$2" state
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  kill -0 "$pid" 2>/dev/null || return 1
  if [[ -r "/proc/$pid/stat" ]]; then
    state="$(sed -E 's/.*\) ([A-Za-z]).*/\1/' "/proc/$pid/stat" 2>/dev/null || true)"
    [[ "$state" != "Z" ]] || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q -- "$name" || return 1
  fi
  return 0
}

# llama.cpp (llama-cpp-python built from source) in .venv-bench, for bench-engine.sh and
# golden-fixtures.sh. Built for the SIMD extensions this CPU lists, but never AMX: a CPU may list
# AMX while its virtual machine does not enable the tile state, and llama.cpp built with
# -march=native then dies on its first tile load (seen here: SIGILL in tileloadd).
ensure_llama_cpp() {
  if [[ -x .venv-bench/bin/python ]] && .venv-bench/bin/python -c 'import llama_cpp, numpy' 2>/dev/null; then
    return 0
  fi
  local flags args="-DGGML_NATIVE=OFF" pair
  flags=" $(grep -m1 '^flags' /proc/cpuinfo | cut -d: -f2) "
  for pair in avx:AVX avx2:AVX2 fma:FMA f16c:F16C bmi2:BMI2 avx_vnni:AVX_VNNI avx512f:AVX512 \
      avx512vbmi:AVX512_VBMI avx512_vnni:AVX512_VNNI avx512_bf16:AVX512_BF16; do
    [[ "$flags" == *" ${pair%%:*} "* ]] && args+=" -DGGML_${pair#*:}=ON"
  done
  python3 -m venv .venv-bench
  CMAKE_ARGS="$args" .venv-bench/bin/pip install --quiet --disable-pip-version-check --force-reinstall --no-cache-dir llama-cpp-python==0.3.36 numpy
}
