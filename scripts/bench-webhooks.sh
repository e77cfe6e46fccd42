#!/usr/bin/env bash
# Label Studio webhook ingest: how fast batchlab-api stores deliveries (POST
# /v1/webhooks/label-studio answers once the event is stored; a background processor applies it),
# on SQLite and on PostgreSQL, against GET /health on the same server in the same run as the
# baseline; plus how long the processor takes to catch up (against the same ingest applied one
# event per transaction, curation.events_per_transaction=1, in the same run), and accuracy over
# 10,000 annotations.
# Prints one table. The load generator is crates/api/examples/webhook_load.rs.
# On PostgreSQL it also sends a steady burst (BURST_RATE=2000 events/s for BURST_SECONDS=60) and
# samples the processing lag throughout: the age of the oldest stored event not applied yet.
#   scripts/bench-webhooks.sh [EVENTS=20000] [SENDERS=8]    BATCHLAB_PROFILE=dev reuses the test build
#   BATCHLAB_TEST_POSTGRES_URL names the PostgreSQL server a scratch database is created on
#   (default postgres://postgres:postgres@127.0.0.1:5432/postgres); unreachable: rows say so.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
EVENTS="${1:-20000}"
SENDERS="${2:-8}"
TASKS="${WEBHOOK_BENCH_TASKS:-10000}"
BURST_RATE="${BURST_RATE:-2000}"
BURST_SECONDS="${BURST_SECONDS:-60}"
PROFILE="${BATCHLAB_PROFILE:-release}"
if [[ "$PROFILE" == "release" ]]; then FLAG=--release; DIR=target/release; else FLAG=; DIR=target/debug; fi
PG_ADMIN="${BATCHLAB_TEST_POSTGRES_URL:-postgres://postgres:postgres@127.0.0.1:5432/postgres}"
cargo build $FLAG -q -p batchlab-api --bins --examples
LOAD="$DIR/examples/webhook_load"
SECRET="bench-$RANDOM$RANDOM"

WORK="$(mktemp -d)"
API_PID=
PG_DB=
stop_api() { if [[ -n "$API_PID" ]]; then kill "$API_PID" 2>/dev/null || true; wait "$API_PID" 2>/dev/null || true; API_PID=; fi; }
drop_pg() { if [[ -n "$PG_DB" ]]; then psql -q "$PG_ADMIN" -c "DROP DATABASE IF EXISTS $PG_DB WITH (FORCE)" >/dev/null 2>&1 || true; PG_DB=; fi; }
cleanup() { stop_api; drop_pg; rm -rf "$WORK"; }
trap cleanup EXIT

# start_api NAME DATABASE_URL: batchlab-api on a free port, a fresh data dir, the webhook secret set.
start_api() {
  local name="$1" url="$2"
  mkdir -p "$WORK/$name"
  PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  BATCHLAB_DATABASE__URL="$url" BATCHLAB_STORAGE__FILES_DIR="$WORK/$name/files" \
    BATCHLAB_CURATION__TRAINING_DIR="$WORK/$name/training" BATCHLAB_API__PORT="$PORT" \
    BATCHLAB_LABEL_STUDIO__WEBHOOK_SECRET="$SECRET" RUST_LOG=warn env ${EXTRA_ENV:-} "$DIR/batchlab-api" \
    2>"$WORK/$name/api.log" &
  API_PID=$!
  for _ in $(seq 1 150); do curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && return 0; sleep 0.2; done
  echo "batchlab-api ($name) did not start:"; cat "$WORK/$name/api.log"; return 1
}

# load NAME PHASE ARGS...: runs the load generator, keeps its JSON (or the error). It also reads
# the CPU time batchlab-api, itself and the whole machine used while it measured.
load() {
  local name="$1" phase="$2"; shift 2
  if ! "$LOAD" --url "http://127.0.0.1:$PORT" --senders "$SENDERS" --secret "$SECRET" \
       --api-pid "$API_PID" --clk-tck "$(getconf CLK_TCK)" "$@" \
       >"$WORK/$name/$phase.json" 2>"$WORK/$name/$phase.log"; then
    python3 -c 'import json,sys; print(json.dumps({"error": sys.argv[1]}))' \
      "$(tail -c 400 "$WORK/$name/$phase.log" | tr '\n' ' ')" >"$WORK/$name/$phase.json"
  fi
  sed 's/^/  /' "$WORK/$name/$phase.log" >&2
}

# bench NAME DATABASE_URL: health baseline, ingest (then the processor's catch-up), accuracy.
bench() {
  local name="$1" url="$2"
  echo "== $name" >&2
  start_api "$name" "$url"
  load "$name" health --mode health --events "$EVENTS"
  load "$name" ingest --mode ingest --events "$EVENTS" --tasks "$TASKS" --wait-processed
  load "$name" accuracy --mode accuracy --tasks "$TASKS"
  stop_api
}

# one_per_transaction NAME DATABASE_URL: the catch-up baseline, the same ingest on a fresh
# database applied one event per transaction.
one_per_transaction() {
  local name="$1" url="$2"
  echo "== $name (one event per transaction)" >&2
  EXTRA_ENV="BATCHLAB_CURATION__EVENTS_PER_TRANSACTION=1" start_api "$name" "$url"
  load "$name" ingest --mode ingest --events "$EVENTS" --tasks "$TASKS" --wait-processed
  stop_api
}

# burst NAME DATABASE_URL: a steady burst on a fresh database, the lag sampled meanwhile.
burst() {
  local name="$1" url="$2"
  echo "== $name (a ${BURST_SECONDS} s burst at ${BURST_RATE} events/s)" >&2
  start_api "$name" "$url"
  load "$name" burst --mode burst --events "$((BURST_RATE * BURST_SECONDS))" --rate "$BURST_RATE" \
    --tasks "$TASKS" --wait-timeout 120
  stop_api
}

bench sqlite "sqlite://$WORK/sqlite/bench.db"
one_per_transaction sqlite-one "sqlite://$WORK/sqlite-one/bench.db"

PG_STATE=ok
if pg_isready -q -d "$PG_ADMIN" 2>/dev/null && psql -qtA "$PG_ADMIN" -c 'select 1' >/dev/null 2>&1; then
  PG_DB="batchlab_bench_$(date +%s)_$$"
  psql -q "$PG_ADMIN" -c "CREATE DATABASE $PG_DB" >/dev/null
  PG_URL=$(python3 - "$PG_ADMIN" "$PG_DB" <<'PY'
import sys, urllib.parse
u = urllib.parse.urlsplit(sys.argv[1])
print(urllib.parse.urlunsplit(u._replace(path="/" + sys.argv[2])))
PY
)
  bench postgres "$PG_URL"
  drop_pg
  PG_DB="batchlab_bench_one_$(date +%s)_$$"
  psql -q "$PG_ADMIN" -c "CREATE DATABASE $PG_DB" >/dev/null
  one_per_transaction postgres-one "${PG_URL%/*}/$PG_DB"
  drop_pg
  PG_DB="batchlab_bench_burst_$(date +%s)_$$"
  psql -q "$PG_ADMIN" -c "CREATE DATABASE $PG_DB" >/dev/null
  burst postgres-burst "${PG_URL%/*}/$PG_DB"
  drop_pg
else
  PG_STATE="unreachable at ${PG_ADMIN%%\?*}"
  mkdir -p "$WORK/postgres"
fi

python3 - "$WORK" "$PG_STATE" "$(git rev-parse --short HEAD 2>/dev/null || echo unknown)" "$(nproc)" \
  "$PROFILE" "$EVENTS" "$SENDERS" "$TASKS" <<'PY'
import json, os, sys
work, pg_state, commit, cores, profile, events, senders, tasks = sys.argv[1:]
events, senders, tasks = int(events), int(senders), int(tasks)

def read(name, phase):
    path = os.path.join(work, name, phase + ".json")
    return json.load(open(path)) if os.path.exists(path) else None

def lat(r):
    return f"{r['rate']:,.0f}/s, p50 {r['p50_ms']:.2f} ms, p99 {r['p99_ms']:.2f} ms, max {r['max_ms']:.1f} ms"

def busy(c):
    """Cores busy on average: batchlab-api, the load generator, everything else (PostgreSQL...)."""
    if not c or c.get("machine") is None:
        return ""
    api, gen, machine = c.get("api") or 0, c.get("load_generator") or 0, c["machine"]
    return f"; cores busy: API {api:.2f}, load generator {gen:.2f}, rest {max(machine - api - gen, 0):.2f}"

def problems(r):
    bad = [f"{r[k]} {k.replace('_', ' ')}" for k in ("non_2xx", "duplicates", "transport_errors") if r.get(k)]
    return f" **{', '.join(bad)}**" if bad else ""

rows = []
def row(metric, target, measured, versus="", verdict=""):
    rows.append((metric, target, measured, versus, verdict))

body_kb = None
for name, label, ingest_target in (("sqlite", "SQLite", None), ("postgres", "PostgreSQL", (3000, 20.0))):
    if name == "postgres" and pg_state != "ok":
        for m in ("GET /health baseline", f"webhook ingest, {senders} senders", "accuracy over 10,000 annotations"):
            row(f"{m}, {label}", "", f"not measured: PostgreSQL {pg_state}")
        continue
    health, ingest, acc = read(name, "health"), read(name, "ingest"), read(name, "accuracy")
    h = (health or {}).get("run")
    if h:
        row(f"GET /health, {label} server, {senders} senders (baseline)", "", lat(h) + problems(h) + busy(h.get("cpu_cores")))
    else:
        row(f"GET /health, {label} server (baseline)", "", f"failed: {(health or {}).get('error', 'no result')}")
    target = f"≥ {ingest_target[0]:,} events/s, p99 < {ingest_target[1]:.0f} ms" if ingest_target else "events/s and p99"
    r = (ingest or {}).get("run")
    if r:
        body_kb = ingest.get("body_bytes_avg", 0) / 1024
        versus = f"{r['rate'] / h['rate']:.2f}× GET /health's rate, {r['p99_ms'] / h['p99_ms']:.1f}× its p99" if h else ""
        verdict = ""
        if ingest_target:
            ok = r["rate"] >= ingest_target[0] and r["p99_ms"] < ingest_target[1] and not problems(r)
            verdict = "met" if ok else "**missed**"
        row(f"webhook ingest, {label}, {senders} senders, {events:,} events", target,
            lat(r) + problems(r) + busy(r.get("cpu_cores")), versus, verdict)
        def applied(doc):
            run = doc["run"]
            total = run["requests"] + doc.get("warmup", 0)
            return total, total / (run["seconds"] + doc["processing_lag_s"])
        one = read(name + "-one", "ingest")
        base = applied(one) if one and "processing_lag_s" in one else None
        if base:
            row(f"applied end to end, one event per transaction, {label} (baseline)", "",
                f"{one['processing_lag_s']:.1f} s after the last answer (all {base[0]:,} applied ≈ {base[1]:,.0f} events/s)"
                + busy(one.get("processing_cpu_cores")))
        if "processing_lag_s" in ingest:
            total, rate = applied(ingest)
            applied_target = 2000 if ingest_target else None
            row(f"applied end to end, {label} (events_per_transaction as by default: 256 on PostgreSQL, 64 on SQLite)",
                f"≥ {applied_target:,} events/s" if applied_target else "",
                f"{ingest['processing_lag_s']:.1f} s after the last answer (all {total:,} applied ≈ {rate:,.0f} events/s)"
                + busy(ingest.get("processing_cpu_cores")),
                f"{rate / base[1]:.2f}× one per transaction" if base else "",
                ("met" if rate >= applied_target else "**missed**") if applied_target else "")
    else:
        row(f"webhook ingest, {label}", target, f"failed: {(ingest or {}).get('error', 'no result')}")
    if acc and "accuracy_ms_best" in acc:
        ok = acc["accuracy_ms_best"] < 1000 and abs((acc.get("overall_accuracy") or 0) - acc["expected_accuracy"]) < 1e-9
        gi = acc["ingest"]
        row(f"accuracy over {tasks:,} annotations, {label}", "< 1 s",
            f"{acc['accuracy_ms_best']:.0f} ms best of 3 ({', '.join(f'{x:.0f}' for x in acc['accuracy_ms'])} ms); "
            f"overall_accuracy {acc.get('overall_accuracy')} (expected {acc['expected_accuracy']})",
            "", "met" if ok else "**missed**")
        row(f"processing lag, {tasks:,} ground-truth events, {label}", "",
            f"{acc['processing_lag_s']:.1f} s after the last answer{busy(acc.get('processing_cpu_cores'))} "
            f"(that ingest: {lat(gi)}{problems(gi)})")
    else:
        row(f"accuracy over {tasks:,} annotations, {label}", "< 1 s", f"failed: {(acc or {}).get('error', 'no result')}")
    if name == "postgres":
        b = read("postgres-burst", "burst")
        metric = f"processing lag during a steady burst, {label}"
        if b and "lag_max_s" in b:
            r = b["run"]
            caught = b.get("caught_up_after_s")
            caught = f"all applied {caught:.1f} s after it" if caught is not None else "**not caught up**"
            metric = f"processing lag during a {b['burst_s']:.0f} s burst at {b['target_rate']:,.0f} events/s, {label}"
            row(metric, "< 2 s",
                f"max {b['lag_max_s']:.2f} s, median {b['lag_p50_s']:.2f} s ({b['lag_samples']} samples, 4 a second); "
                f"{caught}; the burst's ingest: {lat(r)}{problems(r)}{busy(r.get('cpu_cores'))}",
                "", "met" if b["lag_max_s"] < 2 and b.get("caught_up_after_s") is not None and not problems(r) else "**missed**")
        else:
            row(metric, "< 2 s", f"failed: {(b or {}).get('error', 'no result')}", "", "**missed**")

print(f"\nbatchlab webhook bench — commit {commit}, {profile} build, nproc {cores}: the load generator, "
      f"batchlab-api{' and PostgreSQL' if pg_state == 'ok' else ''} share these {cores} cores.")
print(f"Bodies: distinct ANNOTATION_CREATED deliveries shaped like Label Studio 1.23's "
      f"(full project payload, ≈ {body_kb or 0:.1f} KB), webhook secret checked; 300 warm-up requests not counted; "
      f"latency from send to response read.\n")
print("| metric | target | measured | versus (same run) | verdict |")
print("| --- | --- | --- | --- | --- |")
for r in rows:
    print("| " + " | ".join(r) + " |")
PY
