#!/usr/bin/env bash
# The fault suite (issue 17): real binaries on PostgreSQL and SQLite, with a worker SIGKILLed ten
# times mid-batch, a worker SIGTERMed, PostgreSQL cut off for 10 s, batchlab-api killed with
# 1,000 events pending, the ML backend killed mid-predict and a full disk. Prints a table of
# faults × outcome. Needs what scripts/test.sh sets up (the debug binaries, the models, .venv,
# PostgreSQL) and root for the full-disk test's tmpfs. Each fault is bounded by its own waits;
# the whole suite by BATCHLAB_FAULT_TIMEOUT seconds (900).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export BATCHLAB_REQUIRE_POSTGRES="${BATCHLAB_REQUIRE_POSTGRES:-1}"
export BATCHLAB_TEST_POSTGRES_URL="${BATCHLAB_TEST_POSTGRES_URL:-postgres://postgres:postgres@127.0.0.1:5432/postgres}"
BATCHLAB_BIN_DIR="${BATCHLAB_BIN_DIR:-$ROOT/target/debug}" timeout "${BATCHLAB_FAULT_TIMEOUT:-900}" \
  .venv/bin/python -m pytest tests/e2e/test_faults.py -m fault -v -p no:cacheprovider -rA "$@"
