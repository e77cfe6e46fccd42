#!/usr/bin/env bash
# Stop the services scripts/start-services.sh started: SIGTERM each one named by a PID file in
# run/ (or $BATCHLAB_RUN_DIR), SIGKILL it if it is still alive after 10 seconds, and remove the
# PID file. Says nothing and succeeds when nothing runs.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
RUN_DIR="${BATCHLAB_RUN_DIR:-$ROOT/run}"
GRACE="${BATCHLAB_STOP_TIMEOUT:-10}"

# shellcheck source=scripts/lib.sh
source "$ROOT/scripts/lib.sh"

[[ -d "$RUN_DIR" ]] || exit 0

shopt -s nullglob
pidfiles=("$RUN_DIR"/*.pid)
# Stop the worker first: on SIGTERM it claims nothing more, starts no new line, gives the lines
# in flight up to worker.shutdown_grace_seconds (8 s, inside the 10 s before SIGKILL) to finish
# and be recorded, then releases its batch's lease so another worker resumes it at once. Then the
# HTTP services, which stop accepting connections and, within their shutdown_grace_seconds (8 s):
# the ML backend finishes the requests in progress and the prediction jobs already running (their
# predictions reach the shared cache; jobs still queued are dropped and Label Studio asks again),
# batchlab-api finishes its requests and the event processor's pass in progress (events not yet
# applied stay stored and are applied after the next start).
ordered=()
for name in batchlab-worker batchlab-ml-backend batchlab-api; do
  [[ -f "$RUN_DIR/$name.pid" ]] && ordered+=("$RUN_DIR/$name.pid")
done
for f in ${pidfiles[@]+"${pidfiles[@]}"}; do
  case " ${ordered[*]-} " in *" $f "*) ;; *) ordered+=("$f") ;; esac
done

status=0
for pidfile in ${ordered[@]+"${ordered[@]}"}; do
  name="$(basename "$pidfile" .pid)"
  pid="$(cat "$pidfile" 2>/dev/null || true)"
  if ! running "$pid" "$name"; then
    rm -f "$pidfile"  # stale
    continue
  fi
  kill -TERM "$pid" 2>/dev/null || true
  deadline=$((SECONDS + GRACE))
  while running "$pid" "$name" && ((SECONDS < deadline)); do
    sleep 0.2
  done
  if running "$pid" "$name"; then
    echo "stop-services: $name (pid $pid) ignored SIGTERM for ${GRACE}s; sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    for _ in $(seq 1 25); do running "$pid" "$name" || break; sleep 0.2; done
  fi
  if running "$pid" "$name"; then
    echo "stop-services: error: $name (pid $pid) is still running" >&2
    status=1
    continue
  fi
  rm -f "$pidfile"
  echo "stop-services: stopped $name (pid $pid)"
done
exit $status
