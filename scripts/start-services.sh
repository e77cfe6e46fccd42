#!/usr/bin/env bash
# Build batchlab and start its three services in the background:
#   batchlab-api (port 4080), batchlab-ml-backend (port 4082) and batchlab-worker (its /health
#   and /metrics on port 4083).
#
# Logs go to logs/<service>.log and PIDs to run/<service>.pid; scripts/stop-services.sh stops
# them. The services read config/default.toml and BATCHLAB_<SECTION>__<KEY> variables as usual
# (e.g. BATCHLAB_API__PORT=5080, BATCHLAB_DATABASE__URL=postgres://...).
#
# Variables of this script only (not passed to the services):
#   BATCHLAB_PROFILE        cargo profile: release (default), dev (reuses target/debug), or another
#   BATCHLAB_SKIP_BUILD=1   do not run cargo build (use the binaries already built for the profile)
#   BATCHLAB_LOG_DIR        where the logs go (default logs/)
#   BATCHLAB_RUN_DIR        where the PID files go (default run/)
#   BATCHLAB_START_TIMEOUT  seconds to wait for each service (default 120)
# Needs only the Rust toolchain and Python 3 (for the health checks and fetching the model).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

PROFILE="${BATCHLAB_PROFILE:-release}"
case "$PROFILE" in
  release) BUILD_ARGS=(--release); TARGET_DIR="target/release" ;;
  dev | debug) BUILD_ARGS=(); TARGET_DIR="target/debug" ;;
  *) BUILD_ARGS=(--profile "$PROFILE"); TARGET_DIR="target/$PROFILE" ;;
esac
if [[ -n "${CARGO_TARGET_DIR:-}" ]]; then
  TARGET_DIR="$CARGO_TARGET_DIR/${TARGET_DIR#target/}"
fi
LOG_DIR="${BATCHLAB_LOG_DIR:-$ROOT/logs}"
RUN_DIR="${BATCHLAB_RUN_DIR:-$ROOT/run}"
TIMEOUT="${BATCHLAB_START_TIMEOUT:-120}"
PYTHON="${PYTHON:-python3}"
DEFAULT_MODEL="models/SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL="${BATCHLAB_ENGINE__MODEL_PATH:-$DEFAULT_MODEL}"
API_PORT="${BATCHLAB_API__PORT:-4080}"
ML_PORT="${BATCHLAB_ML_BACKEND__PORT:-4082}"
WORKER_PORT="${BATCHLAB_WORKER__PORT:-4083}"
SERVICES=(batchlab-api batchlab-ml-backend batchlab-worker)

log() { echo "start-services: $*"; }
die() { echo "start-services: error: $*" >&2; exit 1; }

# The address to probe a service on: its bind host, or loopback for a wildcard bind.
probe_host() {
  case "${1:-127.0.0.1}" in
    "" | 0.0.0.0 | "::" | "[::]") echo 127.0.0.1 ;;
    *:*) echo "[$1]" ;;
    *) echo "$1" ;;
  esac
}
API_HOST="$(probe_host "${BATCHLAB_API__HOST:-127.0.0.1}")"
ML_HOST="$(probe_host "${BATCHLAB_ML_BACKEND__HOST:-127.0.0.1}")"
WORKER_HOST="$(probe_host "${BATCHLAB_WORKER__HOST:-127.0.0.1}")"

# shellcheck source=scripts/lib.sh
source "$ROOT/scripts/lib.sh"

# 1. Refuse to start a second copy.
mkdir -p "$LOG_DIR" "$RUN_DIR"
for name in "${SERVICES[@]}"; do
  pidfile="$RUN_DIR/$name.pid"
  if [[ -f "$pidfile" ]]; then
    pid="$(cat "$pidfile" 2>/dev/null || true)"
    if running "$pid" "$name"; then
      die "$name is already running (pid $pid, $pidfile); stop it with scripts/stop-services.sh"
    fi
    rm -f "$pidfile"  # stale
  fi
done

# 2. Build.
if [[ "${BATCHLAB_SKIP_BUILD:-0}" != "1" ]]; then
  command -v cargo >/dev/null || die "cargo not found: install the Rust toolchain (https://rustup.rs)"
  log "building (cargo build ${BUILD_ARGS[*]} --workspace --bins) ..."
  cargo build "${BUILD_ARGS[@]}" --workspace --bins
fi
for name in "${SERVICES[@]}"; do
  [[ -x "$TARGET_DIR/$name" ]] || die "$TARGET_DIR/$name is missing; did the build fail?"
done

# 3. The model.
if [[ ! -f "$MODEL" ]]; then
  if [[ "$MODEL" == "$DEFAULT_MODEL" || "$MODEL" == "$ROOT/$DEFAULT_MODEL" ]]; then
    log "fetching the default model ..."
    "$ROOT/scripts/fetch-model.sh"
  else
    die "model $MODEL (BATCHLAB_ENGINE__MODEL_PATH) does not exist"
  fi
fi

# 4. Start. The services read BATCHLAB_<SECTION>__<KEY> variables and ignore this script's own.
STARTED=()
cleanup_on_failure() {
  local status=$?
  if [[ $status -ne 0 && ${#STARTED[@]} -gt 0 ]]; then
    echo "start-services: stopping what this run started" >&2
    for name in "${STARTED[@]}"; do
      local pidfile="$RUN_DIR/$name.pid" pid
      pid="$(cat "$pidfile" 2>/dev/null || true)"
      if running "$pid" "$name"; then
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 1 50); do running "$pid" "$name" || break; sleep 0.1; done
        running "$pid" "$name" && kill -KILL "$pid" 2>/dev/null || true
      fi
      rm -f "$pidfile"
    done
  fi
}
trap cleanup_on_failure EXIT

declare -A LOG_OFFSET
start() {
  local name="$1" logfile="$LOG_DIR/$1.log"
  touch "$logfile"
  LOG_OFFSET[$name]="$(wc -c <"$logfile" | tr -d ' ')"
  echo "=== $(date -u '+%Y-%m-%dT%H:%M:%SZ') start-services: starting $name ===" >>"$logfile"
  nohup "$TARGET_DIR/$name" >>"$logfile" 2>&1 </dev/null &
  local pid=$!
  echo "$pid" >"$RUN_DIR/$name.pid"
  # Until the forked shell has exec'd the binary, its command line is still this script's, and
  # running() (which checks the command line) would call the service dead: wait for the exec.
  for _ in $(seq 1 100); do
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q -- "$name" && break
    sleep 0.02
  done
  STARTED+=("$name")
  log "started $name (pid $!), log $logfile"
}

fail() {
  local name="$1" why="$2" logfile="$LOG_DIR/$1.log"
  echo "start-services: error: $name $why" >&2
  echo "---- last lines of $logfile ----" >&2
  tail -n 40 "$logfile" >&2 || true
  echo "--------" >&2
  exit 1
}

# Lines the service logged since this run started it.
new_log() { tail -c "+$((${LOG_OFFSET[$1]} + 1))" "$LOG_DIR/$1.log"; }

# The ML backend's basic-auth credentials as the service reads them (BATCHLAB_ names win over
# Label Studio's): its /health answers 401 without them, as Label Studio expects.
ML_USER="${BATCHLAB_ML_BACKEND__BASIC_AUTH_USER:-${BASIC_AUTH_USER:-}}"
ML_PASS="${BATCHLAB_ML_BACKEND__BASIC_AUTH_PASS:-${BASIC_AUTH_PASS:-}}"

# URL [USER PASS] -> exit 0 when it answers 200. Credentials travel through the environment of
# the probe, never its command line.
http_ok() {
  PROBE_USER="${2:-}" PROBE_PASS="${3:-}" "$PYTHON" - "$1" <<'PY' 2>/dev/null
import base64, os, sys, urllib.request
request = urllib.request.Request(sys.argv[1])
user, password = os.environ.get("PROBE_USER", ""), os.environ.get("PROBE_PASS", "")
if user and password:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    request.add_header("Authorization", f"Basic {token}")
try:
    with urllib.request.urlopen(request, timeout=2) as r:
        sys.exit(0 if r.status == 200 else 1)
except Exception:
    sys.exit(1)
PY
}

wait_http() {
  local name="$1" url="$2" user="${3:-}" pass="${4:-}" pid deadline=$((SECONDS + TIMEOUT))
  pid="$(cat "$RUN_DIR/$name.pid")"
  until http_ok "$url" "$user" "$pass"; do
    running "$pid" "$name" || fail "$name" "exited before $url answered"
    ((SECONDS < deadline)) || fail "$name" "did not answer $url within ${TIMEOUT}s"
    sleep 0.5
  done
  log "$name is up: $url"
}

command -v "$PYTHON" >/dev/null || die "$PYTHON not found (needed for the health checks)"

# The API first: it creates the database and runs the migrations before the worker connects.
start batchlab-api
wait_http batchlab-api "http://$API_HOST:$API_PORT/health"
start batchlab-ml-backend
wait_http batchlab-ml-backend "http://$ML_HOST:$ML_PORT/health" "$ML_USER" "$ML_PASS"
start batchlab-worker
# Its /health answers once the model is loaded and the database answers.
wait_http batchlab-worker "http://$WORKER_HOST:$WORKER_PORT/health"

trap - EXIT
cat <<EOF

batchlab is running ($PROFILE build):
  API (OpenAI Files/Batches)  http://$API_HOST:$API_PORT/v1    health: http://$API_HOST:$API_PORT/health
  ML backend (Label Studio)   http://$ML_HOST:$ML_PORT        health: http://$ML_HOST:$ML_PORT/health
  worker (batch queue)        pid $(cat "$RUN_DIR/batchlab-worker.pid")    health: http://$WORKER_HOST:$WORKER_PORT/health
Logs:  $LOG_DIR/<service>.log   (e.g. tail -f $LOG_DIR/batchlab-worker.log)
PIDs:  $RUN_DIR/<service>.pid
Stop:  scripts/stop-services.sh
EOF
