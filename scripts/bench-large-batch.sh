#!/usr/bin/env bash
# A batch at OpenAI's size limit (50,000 lines) through the real batchlab-api + batchlab-worker:
# it must complete with every custom_id exactly once in the output, `request_counts` must move
# while it runs (polled each second with the official `openai` client), and the resident memory
# of each process must grow by less than 100 MB over its idle baseline (api up, worker with its
# model loaded, before the upload). Lines are short chats with max_tokens 1, so this measures the
# batch path's bookkeeping and memory, not generation. Prints one Markdown table; the driver is
# scripts/bench_large_batch.py. Exits non-zero only on a functional failure (batch not completed,
# lines missing or duplicated), not on a missed target.
#   scripts/bench-large-batch.sh [--postgres ADMIN_URL]
#   LINES=2000              lines in the batch (default 50000, the OpenAI limit)
#   BATCHLAB_PROFILE=dev    reuses the debug build (default release)
#   BATCHLAB_BENCH_POSTGRES_URL=ADMIN_URL  same as --postgres: a scratch database is created on
#                           that server for the run and dropped after (default: SQLite in a temp dir)
#   BENCH_TIMEOUT_S=14400   give up on the batch after this long
#   SKIP_BUILD=1            do not run cargo build first (use the binaries as they are)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
source scripts/lib.sh

PG_ADMIN="${BATCHLAB_BENCH_POSTGRES_URL:-}"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --postgres) PG_ADMIN="${2:?--postgres needs a URL}"; shift 2 ;;
    --postgres=*) PG_ADMIN="${1#--postgres=}"; shift ;;
    -h|--help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
done
LINES="${LINES:-50000}"
PROFILE="${BATCHLAB_PROFILE:-release}"
if [[ "$PROFILE" == "release" ]]; then FLAG=--release; DIR=target/release; else FLAG=; DIR=target/debug; fi
MODEL="$ROOT/models/SmolLM2-135M-Instruct.Q4_1.gguf"
PY="$ROOT/.venv/bin/python"
[[ -x "$PY" ]] && "$PY" -c 'import openai' 2>/dev/null || { echo "needs .venv with the openai package (.venv/bin/pip install openai)" >&2; exit 1; }
scripts/fetch-model.sh >/dev/null
[[ "${SKIP_BUILD:-}" == 1 ]] || cargo build $FLAG -q --workspace --bins

COMMIT="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
if ! git diff --quiet HEAD 2>/dev/null; then COMMIT+=" (dirty: $(git diff --name-only HEAD | wc -l) tracked files modified)"; fi

WORK="$(mktemp -d)"
API_PID= WORKER_PID= PG_DB=
stop() {
  local p
  for p in "$WORKER_PID" "$API_PID"; do [[ -n "$p" ]] && kill "$p" 2>/dev/null || true; done
  for p in "$WORKER_PID" "$API_PID"; do [[ -n "$p" ]] && wait "$p" 2>/dev/null || true; done
  API_PID= WORKER_PID=
}
drop_pg() { if [[ -n "$PG_DB" ]]; then psql -q "$PG_ADMIN" -c "DROP DATABASE IF EXISTS $PG_DB WITH (FORCE)" >/dev/null 2>&1 || true; PG_DB=; fi; }
cleanup() { stop; drop_pg; rm -rf "$WORK"; }
trap cleanup EXIT

if [[ -n "$PG_ADMIN" ]]; then
  PG_DB="batchlab_bench_large_$(date +%s)_$$"
  psql -q "$PG_ADMIN" -c "CREATE DATABASE $PG_DB" >/dev/null
  DB_URL=$(python3 - "$PG_ADMIN" "$PG_DB" <<'PY'
import sys, urllib.parse
u = urllib.parse.urlsplit(sys.argv[1])
print(urllib.parse.urlunsplit(u._replace(path="/" + sys.argv[2])))
PY
)
  DB_NAME="PostgreSQL"
else
  DB_URL="sqlite://$WORK/bench.db"
  DB_NAME="SQLite"
fi

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
API_PORT=$(free_port)
WORKER_PORT=$(free_port)
export BATCHLAB_DATABASE__URL="$DB_URL" BATCHLAB_STORAGE__FILES_DIR="$WORK/files" \
       BATCHLAB_CURATION__TRAINING_DIR="$WORK/training" \
       BATCHLAB_API__PORT="$API_PORT" BATCHLAB_WORKER__PORT="$WORKER_PORT" \
       BATCHLAB_ENGINE__MODEL_PATH="$MODEL" BATCHLAB_WORKER__POLL_INTERVAL_MS=100 RUST_LOG=warn
unset BATCHLAB_API__API_KEY
"$DIR/batchlab-api" 2>"$WORK/api.log" & API_PID=$!
for _ in $(seq 1 150); do curl -sf "http://127.0.0.1:$API_PORT/health" >/dev/null && break; sleep 0.2; done
curl -sf "http://127.0.0.1:$API_PORT/health" >/dev/null || { echo "batchlab-api did not start:"; tail -20 "$WORK/api.log"; exit 1; }
# The worker serves /health once its model is loaded (and its database answers).
"$DIR/batchlab-worker" 2>"$WORK/worker.log" & WORKER_PID=$!
for _ in $(seq 1 600); do
  curl -sf "http://127.0.0.1:$WORKER_PORT/health" >/dev/null && break
  running "$WORKER_PID" batchlab-worker || break
  sleep 0.2
done
curl -sf "http://127.0.0.1:$WORKER_PORT/health" >/dev/null || { echo "batchlab-worker did not start:"; tail -20 "$WORK/worker.log"; exit 1; }

"$DIR/batchlab-api" config --json >"$WORK/config.json" 2>/dev/null || echo '[]' >"$WORK/config.json"
set +e
"$PY" scripts/bench_large_batch.py --base-url "http://127.0.0.1:$API_PORT/v1" \
  --api-pid "$API_PID" --worker-pid "$WORKER_PID" --lines "$LINES" --work "$WORK" \
  --timeout "${BENCH_TIMEOUT_S:-14400}" --profile "$PROFILE" --database "$DB_NAME" --commit "$COMMIT"
RC=$?
set -e
if [[ $RC -ne 0 ]]; then
  echo "--- api.log (tail)" >&2; tail -20 "$WORK/api.log" >&2
  echo "--- worker.log (tail)" >&2; tail -20 "$WORK/worker.log" >&2
fi
exit $RC
