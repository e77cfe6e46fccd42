#!/usr/bin/env bash
# Memory cost of a maximal batch upload: a 200 MB, 50,000-line JSONL file posted to
# batchlab-api. Prints the API's resident memory before, its peak (VmHWM) after, and the growth
# (target: under 64 MB), plus the upload's throughput.
#   scripts/bench-upload.sh        BATCHLAB_PROFILE=dev reuses the test build
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PROFILE="${BATCHLAB_PROFILE:-release}"
if [[ "$PROFILE" == "release" ]]; then FLAG=--release; DIR=target/release; else FLAG=; DIR=target/debug; fi
cargo build $FLAG -q -p batchlab-api

WORK="$(mktemp -d)"
API_PID=
cleanup() { [[ -n "$API_PID" ]] && kill "$API_PID" 2>/dev/null; rm -rf "$WORK"; }
trap cleanup EXIT

python3 - "$WORK/big.jsonl" <<'PY'
import json, sys
lines, target = 50_000, 200 * 1024 * 1024
with open(sys.argv[1], "w") as f:
    for i in range(lines):
        head = {"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
                "body": {"messages": [{"role": "user", "content": ""}], "max_tokens": 8}}
        size = len(json.dumps(head)) + 1
        head["body"]["messages"][0]["content"] = "x" * (target // lines - size - 1)
        f.write(json.dumps(head) + "\n")
PY
BYTES=$(stat -c %s "$WORK/big.jsonl")

PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
BATCHLAB_DATABASE__URL="sqlite://$WORK/bench.db" BATCHLAB_STORAGE__FILES_DIR="$WORK/files" \
  BATCHLAB_API__PORT="$PORT" RUST_LOG=warn "$DIR/batchlab-api" 2>"$WORK/api.log" &
API_PID=$!
for _ in $(seq 1 100); do curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break; sleep 0.2; done
curl -sf "http://127.0.0.1:$PORT/v1/files" >/dev/null || { echo "batchlab-api did not start:"; cat "$WORK/api.log"; exit 1; }
kb() { awk -v k="$1" '$1 == k":" {print $2}' "/proc/$API_PID/status"; }
BEFORE=$(kb VmRSS)
START=$(date +%s.%N)
RESULT=$(curl -s -o "$WORK/resp.json" -w '%{http_code}' "http://127.0.0.1:$PORT/v1/files" -F purpose=batch -F "file=@$WORK/big.jsonl")
END=$(date +%s.%N)
PEAK=$(kb VmHWM)
python3 - "$BYTES" "$BEFORE" "$PEAK" "$START" "$END" "$RESULT" "$WORK/resp.json" <<'PY'
import json, sys
size, before, peak, start, end, code, resp = sys.argv[1:]
size, before, peak, secs = int(size), int(before), int(peak), float(end) - float(start)
lines = json.load(open(resp)).get("bytes") if code == "200" else None
print(f"\nupload of {size / 2**20:.0f} MiB, 50,000 lines: HTTP {code}, {secs:.1f} s ({size / 2**20 / secs:.0f} MiB/s)\n")
print("| batchlab-api memory | MiB |")
print("| --- | --- |")
print(f"| resident before upload | {before / 1024:.1f} |")
print(f"| peak resident (VmHWM) after | {peak / 1024:.1f} |")
print(f"| growth | {(peak - before) / 1024:.1f} |")
print(f"\ngrowth / 64 MiB target: {(peak - before) / 1024 / 64:.2f}x")
PY
