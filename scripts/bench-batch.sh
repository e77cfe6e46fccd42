#!/usr/bin/env bash
# The cost of the batch path: N short chat completions as ONE batch through batchlab-api +
# batchlab-worker (upload, queue, SQLite, output file), against the same N requests sent to the
# engine in-process all at once (its continuous batching full). Prints a table; both measured in
# this run, same binary build; target: the batch path at >= 0.9x the engine's generated tokens/s.
#   scripts/bench-batch.sh [N=200]       BATCHLAB_PROFILE=dev reuses the test build
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
N="${1:-200}"
PROFILE="${BATCHLAB_PROFILE:-release}"
if [[ "$PROFILE" == "release" ]]; then FLAG=--release; DIR=target/release; else FLAG=; DIR=target/debug; fi
MODEL="$ROOT/models/SmolLM2-135M-Instruct.Q4_1.gguf"
scripts/fetch-model.sh >/dev/null
cargo build $FLAG -q --workspace --bins
cargo build $FLAG -q -p batchlab-inference --example engine_direct

WORK="$(mktemp -d)"
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$WORK"; }
trap cleanup EXIT

python3 - "$N" > "$WORK/requests.jsonl" <<'PY'
import json, sys
topics = ["the sea", "a cat", "autumn", "bread", "a river", "the moon", "trains", "music"]
for i in range(int(sys.argv[1])):
    print(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
        "body": {"model": "m", "max_tokens": 16, "temperature": 0,
                 "messages": [{"role": "user", "content": f"Write one short sentence about {topics[i % len(topics)]} ({i})."}]}}))
PY

PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
export BATCHLAB_DATABASE__URL="sqlite://$WORK/bench.db" BATCHLAB_STORAGE__FILES_DIR="$WORK/files" \
       BATCHLAB_API__PORT="$PORT" BATCHLAB_ENGINE__MODEL_PATH="$MODEL" BATCHLAB_WORKER__POLL_INTERVAL_MS=100 RUST_LOG=info
"$DIR/batchlab-api" 2>"$WORK/api.log" & PIDS+=($!)
"$DIR/batchlab-worker" 2>"$WORK/worker.log" & PIDS+=($!)
for _ in $(seq 1 100); do curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break; sleep 0.2; done
# Start the clock only once the worker has loaded its model.
for _ in $(seq 1 300); do grep -q "batchlab-worker ready" "$WORK/worker.log" 2>/dev/null && break; sleep 0.2; done
grep -q "batchlab-worker ready" "$WORK/worker.log" || { echo "batchlab-worker did not start:"; tail -20 "$WORK/worker.log"; exit 1; }

BATCH_JSON=$(python3 - "$PORT" "$WORK/requests.jsonl" <<'PY'
import json, subprocess, sys, time, urllib.request
port, path = sys.argv[1], sys.argv[2]
base = f"http://127.0.0.1:{port}/v1"
t0 = time.time()
up = json.loads(subprocess.check_output(["curl", "-sf", f"{base}/files", "-F", "purpose=batch", "-F", f"file=@{path}"]))
req = urllib.request.Request(f"{base}/batches", method="POST", headers={"Content-Type": "application/json"},
    data=json.dumps({"input_file_id": up["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h"}).encode())
batch = json.load(urllib.request.urlopen(req))
while batch["status"] not in ("completed", "failed", "cancelled", "expired"):
    if time.time() - t0 > 3600:
        sys.exit("the batch did not finish within an hour")
    time.sleep(0.1)
    batch = json.load(urllib.request.urlopen(f"{base}/batches/{batch['id']}"))
print(json.dumps({"requests": batch["request_counts"]["completed"], "seconds": time.time() - t0,
                  "completion_tokens": batch["usage"]["output_tokens"], "status": batch["status"]}))
PY
)
for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; PIDS=()
sleep 1
DIRECT_JSON=$("$DIR/examples/engine_direct" "$MODEL" "$WORK/requests.jsonl" "$N" 2>/dev/null)

python3 - "$BATCH_JSON" "$DIRECT_JSON" "$N" "$PROFILE" "$(git rev-parse --short HEAD 2>/dev/null || echo unknown)" <<'PY'
import json, sys
b, d = json.loads(sys.argv[1]), json.loads(sys.argv[2])
rows = []
for name, r in (("engine, in-process (baseline)", d), ("batch API + worker", b)):
    rows.append((name, r["requests"], r["seconds"], r["requests"] / r["seconds"], r["completion_tokens"] / r["seconds"]))
print(f"\n{sys.argv[3]} chat completions, max_tokens 16, greedy; {sys.argv[4]} build, commit {sys.argv[5]}\n")
print(f"| path | requests | seconds | requests/s | generated tokens/s |")
print(f"| --- | --- | --- | --- | --- |")
for r in rows:
    print(f"| {r[0]} | {r[1]} | {r[2]:.1f} | {r[3]:.2f} | {r[4]:.1f} |")
ratio = rows[1][4] / rows[0][4]
print(f"\nbatch path / engine: {rows[1][3] / rows[0][3]:.2f}x requests/s, {ratio:.2f}x generated tokens/s "
      f"(target >= 0.90x: {'met' if ratio >= 0.9 else 'missed'})"
      + ("" if b.get("status") == "completed" else f"  (batch ended {b.get('status')})"))
PY
