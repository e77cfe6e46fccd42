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
# Needs only the Rust toolchain and Python 3 (for fetching the default model).
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
DEFAULT_MODEL="models/SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL="${BATCHLAB_ENGINE__MODEL_PATH:-$DEFAULT_MODEL}"
API_PORT="${BATCHLAB_API__PORT:-4080}"
ML_PORT="${BATCHLAB_ML_BACKEND__PORT:-4082}"
WORKER_PORT="${BATCHLAB_WORKER__PORT:-4083}"
SERVICES=(batchlab-api batchlab-ml-backend batchlab-worker)

log() { echo "start-services: $*"; }
die() { echo "start-services: error: $*" >&2; exit 1; }

# The address a service is reached on: its bind host, or loopback for a wildcard bind.
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

# 3. The model: a local file (the default one is fetched when missing), or hf:<owner>/<repo>/<file>
# that the services download themselves into HF_HOME (with HF_TOKEN for gated repositories).
if [[ "$MODEL" == hf:* ]]; then
  log "the services fetch $MODEL from ${HF_ENDPOINT:-https://huggingface.co} on first start (raise BATCHLAB_START_TIMEOUT for a big one)"
elif [[ ! -f "$MODEL" ]]; then
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

# NAME -> waits until the service's own `healthcheck` subcommand passes: it reads the same
# configuration (host, port, the ML backend's basic auth) and asks /health for a 200, which the
# ML backend and the worker answer once their model is loaded.
wait_healthy() {
  local name="$1" pid deadline=$((SECONDS + TIMEOUT))
  pid="$(cat "$RUN_DIR/$name.pid")"
  until "$TARGET_DIR/$name" healthcheck >/dev/null 2>&1; do
    running "$pid" "$name" || fail "$name" "exited before its /health answered"
    ((SECONDS < deadline)) || fail "$name" "did not answer /health with 200 within ${TIMEOUT}s: $("$TARGET_DIR/$name" healthcheck 2>&1 | tail -n 1)"
    sleep 0.5
  done
  log "$name is up"
}

# The API first: it creates the database and runs the migrations before the worker connects.
start batchlab-api
wait_healthy batchlab-api
start batchlab-ml-backend
wait_healthy batchlab-ml-backend
start batchlab-worker
wait_healthy batchlab-worker

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
