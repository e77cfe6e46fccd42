"""File bodies in S3-compatible object storage (`storage.files_url = "s3://bucket/prefix"`).

The server is moto (`moto[server]` from PyPI, tests/e2e/requirements.txt), started here as a
process: it is pure Python and pip-installable from the registry like the rest of the e2e
dependencies (no container, no JVM, no Go binary to fetch), and it speaks the S3 REST API the
`object_store` crate uses, multipart uploads included. Each test gets its own bucket; the
services find it through the standard AWS variables only, as they would find AWS or MinIO.

What is checked: the Batch API round trip with the official `openai` package against
batchlab-api and a worker that share nothing but the database and the bucket (the bodies are in
the bucket, byte for byte, and no local files directory gets any), a body large enough for a
multipart upload, and two workers with separate working directories and no shared disk, one of
them SIGKILLed mid-batch: every `custom_id` exactly once.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import boto3
import pytest

from conftest import free_port, http_get
from test_batches import assert_chat_output_line, assert_each_once, chat_lines, create_batch, read_jsonl, \
    wait_status, wait_until
from test_faults import lease_owner, wait_for

MOTO_START_TIMEOUT = 30.0
REGION = "us-east-1"


class S3Server:
    """A moto S3 server on a free port, and a boto3 client for looking into its buckets."""

    def __init__(self, log_path: Path):
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.name = "moto_server"
        self._log = open(log_path, "ab")
        moto = Path(sys.executable).with_name("moto_server")
        cmd = [str(moto)] if moto.exists() else [sys.executable, "-m", "moto.server"]
        self.proc = subprocess.Popen(cmd + ["-H", "127.0.0.1", "-p", str(self.port)], stdout=self._log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + MOTO_START_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                pytest.fail(f"moto_server exited with {self.proc.returncode}: {log_path.read_text()[-2000:]}")
            try:
                http_get(self.endpoint + "/", timeout=1.0)
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"moto_server did not answer on {self.endpoint} in {MOTO_START_TIMEOUT:.0f}s")
                time.sleep(0.1)
        self.s3 = boto3.client("s3", endpoint_url=self.endpoint, region_name=REGION,
                               aws_access_key_id="testing", aws_secret_access_key="testing")

    def tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def new_bucket(self) -> str:
        bucket = f"batchlab-{uuid.uuid4().hex[:12]}"
        self.s3.create_bucket(Bucket=bucket)
        return bucket

    def objects(self, bucket: str) -> dict[str, int]:
        """Every key in `bucket` and its size."""
        pages = self.s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)
        return {o["Key"]: o["Size"] for page in pages for o in page.get("Contents", [])}

    def body(self, bucket: str, key: str) -> bytes:
        return self.s3.get_object(Bucket=bucket, Key=key)["Body"].read()

    def pending_uploads(self, bucket: str) -> list[str]:
        return [u["Key"] for u in self.s3.list_multipart_uploads(Bucket=bucket).get("Uploads", [])]

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=10)
        self._log.close()


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory):
    server = S3Server(tmp_path_factory.mktemp("moto") / "moto.log")
    yield server
    server.stop()


@pytest.fixture
def s3(s3_server, log_sources):
    """The moto server with a fresh bucket; yields (server, bucket, the services' settings)."""
    log_sources.append(s3_server)
    bucket = s3_server.new_bucket()
    env = {
        "BATCHLAB_STORAGE__FILES_URL": f"s3://{bucket}/batchlab/files",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": REGION,
        "AWS_ENDPOINT_URL": s3_server.endpoint,
        "AWS_ALLOW_HTTP": "true",
    }
    return s3_server, bucket, env


def local_files(*dirs: Path) -> list[Path]:
    return [p for d in dirs if d.exists() for p in d.rglob("*") if p.is_file()]


def test_batch_round_trip_through_object_storage(stack, s3):
    """Upload, batch, output and a multipart-sized body, all in the bucket and none on disk."""
    server, bucket, env = s3
    stack.start_api(**env)
    stack.start_worker(**env)
    client = stack.client()
    lines = chat_lines(6, "s3", max_tokens=8)
    batch = create_batch(client, lines)
    done = wait_status(client, batch.id, "completed", timeout=300)
    assert (done.request_counts.total, done.request_counts.completed) == (6, 6), done.request_counts
    out = read_jsonl(client, done.output_file_id)
    assert_each_once(out, [line["custom_id"] for line in lines])
    for line in out:
        assert_chat_output_line(line, 8)

    prefix = "batchlab/files/"
    objects = server.objects(bucket)
    assert set(objects) == {prefix + batch.input_file_id, prefix + done.output_file_id}, objects
    served = client.files.content(done.output_file_id).content
    assert server.body(bucket, prefix + done.output_file_id) == served
    assert objects[prefix + done.output_file_id] == client.files.retrieve(done.output_file_id).bytes

    # Bigger than two parts: a multipart upload, streamed back whole.
    big = bytes(range(256)) * (17 * 1024 * 1024 // 256 + 3)
    f = client.files.create(file=("big.bin", big, "application/octet-stream"), purpose="user_data")
    assert server.objects(bucket)[prefix + f.id] == len(big)
    assert client.files.content(f.id).content == big
    assert server.pending_uploads(bucket) == [], "a multipart upload was left open"
    client.files.delete(f.id)
    assert prefix + f.id not in server.objects(bucket)

    assert local_files(stack.files_dir) == [], "a body was written to the local files directory"


def test_two_workers_without_a_shared_disk_one_killed(pg_stack, s3, tmp_path):
    """Two workers in separate directories sharing only PostgreSQL and the bucket; the one
    running the batch is SIGKILLed mid-batch and the other finishes it: every line once."""
    stack = pg_stack
    server, bucket, env = s3
    stack.start_api(**env)
    # Two lines in flight, so that the batch takes many engine turns however fast the CPU is.
    lease = {"BATCHLAB_WORKER__LEASE_SECONDS": "2", "BATCHLAB_WORKER__CONCURRENCY": "2"}
    homes = {name: tmp_path / f"{name}-home" for name in ("worker-a", "worker-b")}
    workers = {}
    for name, home in homes.items():
        home.mkdir()
        # Each worker's own files directory, in its own working directory: it must stay empty.
        own = {**env, **lease, "BATCHLAB_STORAGE__FILES_DIR": str(home / "files")}
        workers[name] = stack.start_worker(name, cwd=home, **own)
    client = stack.client()
    lines = chat_lines(80, "nodisk", max_tokens=4)
    batch = create_batch(client, lines)
    b = wait_until(client, batch.id, lambda b: b.request_counts.completed >= 10, "10 lines done", 300)
    owner = wait_for(lambda: lease_owner(stack, batch.id), "a lease owner", 60)
    workers[owner].kill(signal.SIGKILL)
    assert b.request_counts.completed < len(lines), "the batch finished before its worker could be killed"
    survivor = next(n for n in workers if n != owner)

    done = wait_status(client, batch.id, "completed", timeout=400)
    out = read_jsonl(client, done.output_file_id)
    errors = read_jsonl(client, done.error_file_id) if done.error_file_id else []
    assert_each_once(out + errors, [line["custom_id"] for line in lines])
    assert batch.id in workers[survivor].log_text(), f"{survivor} never resumed the batch"
    rows = stack.sql(f"SELECT count(*), count(DISTINCT line_no) FROM batch_lines WHERE batch_id = '{batch.id}'")
    assert rows == [[str(len(lines))] * 2], rows

    keys = set(server.objects(bucket))
    assert f"batchlab/files/{done.output_file_id}" in keys, keys
    assert local_files(stack.files_dir, *homes.values()) == [], "a worker or the API wrote a body to disk"


def test_milestone_exports_go_to_the_bucket_and_the_export_route_serves_them(stack, s3):
    """With file bodies in object storage, a milestone's training export and the project's latest
    export are objects beside them (under training/), written nowhere on the API's disk, and
    GET /v1/label-studio/exports/{project}/{file} streams them back with the recorded SHA-256."""
    import hashlib
    import json
    import urllib.request

    server, bucket, env = s3
    stack.start_api(**env, BATCHLAB_CURATION__MILESTONES="[1]")
    fixtures = Path(__file__).resolve().parents[1] / "fixtures" / "label-studio-1.23"
    event = json.loads((fixtures / "22-webhook-ANNOTATION_CREATED.json").read_text())["body"]
    project = event["project"]["id"]
    request = urllib.request.Request(f"{stack.base_url}/webhooks/label-studio", data=json.dumps(event).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(request, timeout=10) as r:
        assert r.status == 200

    def exported():
        status, body = http_get(f"{stack.base_url}/label-studio/projects/{project}")
        doc = json.loads(body) if status == 200 else {}
        return doc if doc.get("exports") else None

    doc = wait_for(exported, timeout=60, what="the milestone export")
    record = doc["exports"][0]
    name = f"project_{project}_milestone_1.json"
    key = f"batchlab/files/training/{name}"
    assert record["path"] == f"s3://{bucket}/{key}", record
    objects = server.objects(bucket)
    assert key in objects and f"batchlab/files/training/project_{project}_export.json" in objects, objects
    stored = server.body(bucket, key)
    assert hashlib.sha256(stored).hexdigest() == record["sha256"], record
    assert json.loads(stored)[0]["annotations"], "the export holds the annotation"

    status, served = http_get(f"{stack.base_url}/label-studio/exports/{project}/{name}")
    assert status == 200 and served.encode() == stored
    status, latest = http_get(f"{stack.base_url}/label-studio/exports/{project}/project_{project}_export.json")
    assert status == 200 and latest.encode() == stored
    # Only the project's own export files are served: no other name, no path.
    for other in ("..%2F..%2Fbatchlab.db", f"project_{project + 1}_export.json"):
        status, body = http_get(f"{stack.base_url}/label-studio/exports/{project}/{other}")
        assert status == 404 and json.loads(body)["error"]["type"] == "invalid_request_error", (other, body)
    # The API's working directory holds the database only: no export was written to its disk.
    assert local_files(stack.root / "data" / "training", stack.files_dir) == []
