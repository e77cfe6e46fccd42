#!/usr/bin/env bash
# batchlab's whole test suite, the README's second command:
#   the format, lint and layering gates (cargo fmt --check, cargo clippy -D warnings,
#   scripts/check-layering.sh), Rust unit and
#   integration tests (the store's suite on SQLite AND PostgreSQL, the API over a socket, the
#   engine on the real default model), then the end-to-end tests in tests/e2e that
#   drive the real binaries with the official `openai` Python package and a real Label Studio,
#   and the fault suite (scripts/fault-suite.sh: kills, a database outage, a full disk).
# Needs: the Rust toolchain, Python 3 with pip, and PostgreSQL on 127.0.0.1:5432
# (BATCHLAB_TEST_POSTGRES_URL names another); .ci/run installs PostgreSQL when none answers, and
# this script installs Debian's chromium (the status page test) when it is missing.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

export BATCHLAB_REQUIRE_POSTGRES=1
# Model tests fail instead of skipping when a model file is missing.
export BATCHLAB_REQUIRE_MODELS=1
# The blob store's S3 test (crates/core/tests/object_storage.rs) starts moto from the e2e
# environment installed below, and fails instead of skipping without it.
export BATCHLAB_REQUIRE_S3=1
export BATCHLAB_TEST_MOTO="$ROOT/.venv/bin/moto_server"
export BATCHLAB_TEST_POSTGRES_URL="${BATCHLAB_TEST_POSTGRES_URL:-postgres://postgres:postgres@127.0.0.1:5432/postgres}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

echo "== models (the default, and Gemma 3 270M for the engine's second architecture)"
scripts/fetch-model.sh
scripts/fetch-model.sh gemma3

echo "== python environment for the end-to-end tests"
if [[ ! -x .venv/bin/python ]]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -r tests/e2e/requirements.txt

echo "== tiny random-weight models of the Qwen2, Qwen3, Llama 3 and Phi-3 architectures"
scripts/tiny-models.sh

echo "== Label Studio for the end-to-end tests (its own environment: many pinned dependencies)"
if [[ ! -x .venv-label-studio/bin/label-studio ]]; then
  python3 -m venv .venv-label-studio
  .venv-label-studio/bin/python -m pip install --quiet --disable-pip-version-check 'label-studio>=1.23,<1.24'
fi

echo "== a browser for the status page's end-to-end test (Debian's chromium, headless)"
export BATCHLAB_REQUIRE_BROWSER=1
if ! command -v chromium >/dev/null; then
  SUDO=""
  [[ "$(id -u)" == 0 ]] || SUDO="sudo"
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends chromium >/dev/null
fi

echo "== format and lints (cargo fmt, cargo clippy -D warnings)"
for component in rustfmt clippy; do
  if ! rustup component list --installed 2>/dev/null | grep -q "^$component"; then
    rustup component add "$component"
  fi
done
cargo fmt --all --check
cargo clippy --workspace --all-targets -- -D warnings

echo "== layering (batchlab-api and batchlab-core link no model code)"
scripts/check-layering.sh

echo "== build"
cargo build --workspace --bins --tests

echo "== rust tests"
cargo test --workspace --no-fail-fast

echo "== end-to-end tests"
BATCHLAB_BIN_DIR="$ROOT/target/debug" .venv/bin/python -m pytest tests/e2e -m "not fault" -v -p no:cacheprovider

echo "== fault suite (a table of faults x outcome at the end)"
scripts/fault-suite.sh
