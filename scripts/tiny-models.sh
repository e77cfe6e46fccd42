#!/usr/bin/env bash
# Writes the tiny random-weight GGUFs of the architectures the engine runs beyond its two shipped
# models (Qwen2, Qwen3, Llama 3, Phi-3) into models/, for the golden tests
# (crates/engine/src/golden.rs). Their tokenizers come from llama.cpp's vocabulary files inside
# the llama-cpp-python source package on PyPI (downloaded once, kept in models/vocab/). Needs
# Python 3 with pip; uses the end-to-end tests' .venv. About 15 seconds once the vocabularies
# are there.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
MODELS_DIR="${BATCHLAB_MODELS_DIR:-$ROOT/models}"
if [[ ! -x .venv/bin/python ]]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -r scripts/tiny-models-requirements.txt
.venv/bin/python scripts/tiny_models.py "$MODELS_DIR"
