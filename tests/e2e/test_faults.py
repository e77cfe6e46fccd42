"""The fault suite: real binaries, real PostgreSQL, real signals, a real full disk.

Each test injects one fault, checks that nothing accepted is lost or applied twice and that the
service comes back by itself, and records what it measured (`fault_result`); `scripts/fault-suite.sh`
runs this file alone and the summary hook in conftest.py prints the table of faults × outcome.
A database outage is a TCP proxy between the services and PostgreSQL that drops every connection
and refuses new ones (the server itself keeps serving the other tests).
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import REPO
from test_curation import poll
from test_batches import assert_each_once, chat_lines, create_batch, read_jsonl, wait_status, wait_until

pytestmark = pytest.mark.fault

FIXTURES = REPO / "tests" / "fixtures" / "label-studio-1.23"


def fault_result(request, outcome: str) -> None:
    """What the test measured, for the suite's table."""
    request.node.user_properties.append(("fault_outcome", outcome))


def wait_for(pred, what: str, timeout: float, interval: float = 0.05):
    """Polls `pred()` until it returns something truthy, and answers that."""
    return poll(pred, bool, what, timeout, interval)


def call_json(url: str, body: dict | bytes | None = None, headers: dict | None = None,
              timeout: float = 30.0) -> tuple[int, dict, dict]:
    """GET `url`, or POST `body` (a dict as JSON); answers the status, the headers (lower-case
    names) and the JSON body, for error answers too."""
    data = None if body is None else body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="GET" if data is None else "POST",
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, answer_headers, raw = r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        status, answer_headers, raw = e.code, e.headers, e.read()
    try:
        doc = json.loads(raw or b"null")
    except ValueError:
        doc = {"raw": raw.decode(errors="replace")}
    return status, {k.lower(): v for k, v in answer_headers.items()}, doc


def post_json(url: str, body: dict | bytes, headers: dict | None = None, timeout: float = 30.0):
    return call_json(url, body, headers, timeout)


def get_json(url: str, headers: dict | None = None, timeout: float = 30.0):
    return call_json(url, None, headers, timeout)


class TcpProxy:
    """Forwards 127.0.0.1:<port> to PostgreSQL; `cut()` drops every connection and refuses new
    ones until `restore()`: the database is down as far as the services can tell."""

    def __init__(self, upstream: tuple[str, int]):
        self.upstream = upstream
        self.down = threading.Event()
        self.lock = threading.Lock()
        self.sockets: list[socket.socket] = []
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(128)
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                inbound, _ = self.listener.accept()
            except OSError:
                return
            if self.down.is_set():
                inbound.close()
                continue
            try:
                outbound = socket.create_connection(self.upstream, timeout=5)
                outbound.settimeout(None)
            except OSError:
                inbound.close()
                continue
            with self.lock:
                self.sockets += [inbound, outbound]
            for a, b in ((inbound, outbound), (outbound, inbound)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def cut(self) -> None:
        self.down.set()
        with self.lock:
            for s in self.sockets:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()
            self.sockets.clear()

    def restore(self) -> None:
        self.down.clear()

    def url(self, database_url: str) -> str:
        host_start = database_url.index("@") + 1 if "@" in database_url else database_url.index("://") + 3
        host_end = database_url.index("/", host_start)
        return f"{database_url[:host_start]}127.0.0.1:{self.port}{database_url[host_end:]}"


def upstream_of(database_url: str) -> tuple[str, int]:
    host_start = database_url.index("@") + 1 if "@" in database_url else database_url.index("://") + 3
    host, _, port = database_url[host_start:database_url.index("/", host_start)].partition(":")
    return host, int(port or 5432)


def lease_owner(stack, batch_id: str) -> str:
    rows = stack.sql(f"SELECT COALESCE(lease_owner, '') FROM batches WHERE id = '{batch_id}'")
    return rows[0][0] if rows else ""


def annotation_event(i: int, project: int = 1) -> dict:
    """Label Studio's ANNOTATION_CREATED (a recorded delivery) for annotation `i` of task `i`."""
    body = json.loads((FIXTURES / "22-webhook-ANNOTATION_CREATED.json").read_text())["body"]
    body["annotation"]["id"] = i
    body["annotation"]["task"] = i
    body["annotation"]["project"] = project
    body["annotation"]["unique_id"] = f"fault-{project}-{i}"
    body["task"]["id"] = i
    body["task"]["inner_id"] = i
    body["task"]["project"] = project
    body["task"]["data"] = {**body["task"]["data"], "name": f"Candidate {i}"}
    body["project"]["id"] = project
    return body


def project_status(stack, project: int) -> dict:
    status, _, doc = get_json(f"{stack.base_url}/label-studio/projects/{project}")
    assert status == 200, doc
    return doc


# --------------------------------------------------------------------------------------------
# 1. SIGKILL, ten times, two workers, PostgreSQL


def test_sigkill_a_worker_ten_times_during_a_300_line_batch(pg_stack, request):
    """SIGKILL ×10 at random points of a 300-line batch, two workers on PostgreSQL: every line once."""
    stack = pg_stack
    stack.start_api()
    lease = {"BATCHLAB_WORKER__LEASE_SECONDS": "2"}
    workers = {name: stack.start_worker(name, **lease) for name in ("worker-a", "worker-b")}
    client = stack.client()
    lines = chat_lines(300, "kill", max_tokens=4)
    batch = create_batch(client, lines)
    rng = random.Random(int(os.environ.get("BATCHLAB_FAULT_SEED", "17")))
    points = sorted(rng.sample(range(5, 240), 10))  # room after the last kill: the batch must not finish first
    kills = []
    for point in points:
        b = wait_until(client, batch.id, lambda b: b.request_counts.completed >= point, f"{point} lines done", 300)
        owner = wait_for(lambda: lease_owner(stack, batch.id), "a lease owner", 60)
        workers[owner].kill(signal.SIGKILL)
        kills.append(b.request_counts.completed)
        # The killed worker comes back as a new process under the same id, while the other one
        # takes the batch over once the lease runs out.
        workers[owner] = stack.start_worker(owner, **lease)
    done = wait_status(client, batch.id, "completed", timeout=600)
    assert len(kills) == 10, f"the batch finished after only {len(kills)} kills at {kills}"
    out = read_jsonl(client, done.output_file_id)
    errors = read_jsonl(client, done.error_file_id) if done.error_file_id else []
    assert_each_once(out + errors, [line["custom_id"] for line in lines])
    rows = stack.sql(f"SELECT count(*), count(DISTINCT line_no) FROM batch_lines WHERE batch_id = '{batch.id}'")
    assert rows == [["300", "300"]], rows
    fault_result(request, f"10 kills at lines {kills}; 300/300 custom_ids once ({len(out)} ok, {len(errors)} errors)")


# --------------------------------------------------------------------------------------------
# 2. SIGTERM: the lease is released, the other worker resumes at once


def test_sigterm_a_worker_and_the_other_resumes_within_two_seconds(pg_stack, request):
    """SIGTERM a worker mid-batch (lease 60 s): the other worker resumes within 2 s."""
    stack = pg_stack
    stack.start_api()
    lease = {"BATCHLAB_WORKER__LEASE_SECONDS": "60"}
    workers = {name: stack.start_worker(name, **lease) for name in ("worker-a", "worker-b")}
    client = stack.client()
    lines = chat_lines(120, "term", max_tokens=4)
    batch = create_batch(client, lines)
    wait_until(client, batch.id, lambda b: b.request_counts.completed >= 10, "10 lines done", 300)
    owner = wait_for(lambda: lease_owner(stack, batch.id), "a lease owner", 60)
    other = next(n for n in workers if n != owner)
    victim = workers[owner]
    sent = time.monotonic()
    victim.proc.send_signal(signal.SIGTERM)
    new_owner = wait_for(lambda: (o := lease_owner(stack, batch.id)) == other and o, f"{other} holding the lease", 30, 0.01)
    resumed = time.monotonic() - sent
    victim.proc.wait(timeout=30)
    assert victim.proc.returncode == 0, f"the worker exited with {victim.proc.returncode} on SIGTERM"
    assert new_owner == other
    assert resumed < 2.0, f"the other worker took {resumed:.2f}s to resume (lease_seconds is 60)"
    done = wait_status(client, batch.id, "completed", timeout=600)
    out = read_jsonl(client, done.output_file_id)
    assert_each_once(out, [line["custom_id"] for line in lines])
    fault_result(request, f"resumed by {other} {resumed:.2f}s after SIGTERM (lease 60 s); 120/120 once")


# --------------------------------------------------------------------------------------------
# 3. PostgreSQL away for ten seconds during a batch and a webhook burst


def test_postgres_down_for_ten_seconds_during_a_batch_and_a_webhook_burst(pg_stack, request):
    """PostgreSQL down 10 s during a batch and a webhook burst: 503s meanwhile, nothing lost."""
    stack = pg_stack
    proxy = TcpProxy(upstream_of(stack.database_url))
    through = {"BATCHLAB_DATABASE__URL": proxy.url(stack.database_url),
               "BATCHLAB_DATABASE__ACQUIRE_TIMEOUT_MS": "1000"}
    stack.start_api(**through)
    stack.start_worker("worker-a", **through, BATCHLAB_WORKER__LEASE_SECONDS="5")
    client = stack.client()
    lines = chat_lines(80, "outage", max_tokens=8)
    batch = create_batch(client, lines)
    wait_until(client, batch.id, lambda b: b.request_counts.completed >= 5, "5 lines done", 300)

    accepted, refused = [], []
    stop_burst = threading.Event()

    def burst() -> None:
        i = 0
        while not stop_burst.is_set() and i < 2000:
            i += 1
            status, headers, doc = post_json(f"{stack.base_url}/webhooks/label-studio", annotation_event(i), timeout=30)
            if status == 200:
                accepted.append(i)
            else:
                assert status == 503 and "retry-after" in headers, (status, headers, doc)
                refused.append(i)
            time.sleep(0.02)

    sender = threading.Thread(target=burst, daemon=True)
    sender.start()
    wait_for(lambda: len(accepted) >= 20, "20 events accepted before the outage", 60)

    proxy.cut()
    cut_at = time.monotonic()
    down = []
    while time.monotonic() - cut_at < 10:
        status, headers, doc = get_json(f"{stack.base_url}/batches/{batch.id}")
        down.append(status)
        if status != 200:
            assert status == 503, (status, doc)
            assert headers.get("retry-after"), headers
            assert doc["error"]["code"] == "database_unavailable", doc
        time.sleep(0.5)
    health_status, _, health = get_json(f"http://127.0.0.1:{stack.api_port}/health")
    proxy.restore()
    assert 503 in down, f"no 503 while the database was down: {down}"
    assert (health_status, health.get("database")) == (503, "error"), health
    wait_for(lambda: len(accepted) >= 20 + len(refused) and refused, "events accepted after the outage", 60)
    stop_burst.set()
    sender.join(timeout=60)

    done = wait_status(client, batch.id, "completed", timeout=600)
    out = read_jsonl(client, done.output_file_id)
    errors = read_jsonl(client, done.error_file_id) if done.error_file_id else []
    assert_each_once(out + errors, [line["custom_id"] for line in lines])

    def applied():
        s = project_status(stack, 1)
        return s if s["webhook_events"]["pending"] == 0 else None
    status = wait_for(applied, "every accepted event applied", 120, 0.2)
    received = status["webhook_events"]["received"]
    # Every accepted event is stored. One refused at the instant of the cut may be stored too:
    # its commit reached PostgreSQL but the answer did not come back, so the sender saw a 503
    # (a retry of it would be a duplicate). Never more than what was sent.
    assert len(accepted) <= received <= len(accepted) + len(refused), (status["webhook_events"], len(accepted))
    assert status["webhook_events"]["failed"] == 0, status["failed_events"]
    # Each stored event applied exactly once: one annotation each, none twice, none missing.
    assert status["counts"]["annotations"] == received, (status["counts"], received)
    rows = stack.sql("SELECT count(*), count(DISTINCT id) FROM ls_annotations")
    assert rows == [[str(received)] * 2], rows
    stored_ids = {int(r[0]) for r in stack.sql("SELECT id FROM ls_annotations")}
    assert set(accepted) <= stored_ids, f"accepted but not applied: {sorted(set(accepted) - stored_ids)}"
    fault_result(request, f"{down.count(503)} × 503 while down; batch 80/80 once ({len(errors)} error lines); "
                          f"{len(accepted)} events accepted, {received} stored, each applied once; {len(refused)} refused with 503")


# --------------------------------------------------------------------------------------------
# 4. batchlab-api killed with 1,000 events pending


def test_api_killed_with_a_thousand_events_pending(pg_stack, request):
    """batchlab-api SIGKILLed with 1,000 stored events pending: all applied once after restart."""
    stack = pg_stack
    ml, ml_port = stack.start_ml_backend()
    # Label Studio delivers to the ML backend while batchlab-api is down: 1,000 events stored.
    for i in range(1, 1001):
        status, _, doc = post_json(f"http://127.0.0.1:{ml_port}/webhook", annotation_event(i))
        assert status == 200, doc
    assert stack.sql("SELECT count(*) FROM webhook_events WHERE processed_at IS NULL") == [["1000"]]

    # One event to a transaction, so that the kill lands mid-way: a group of 256 applies in a few
    # milliseconds, and the whole thousand could be done before the kill.
    api = stack.start_api(BATCHLAB_CURATION__EVENTS_PER_TRANSACTION="1")
    wait_for(lambda: int(stack.sql("SELECT count(*) FROM webhook_events WHERE processed_at IS NULL")[0][0]) < 1000,
             "the processor applying events", 60, 0.01)
    api.kill(signal.SIGKILL)
    left = int(stack.sql("SELECT count(*) FROM webhook_events WHERE processed_at IS NULL")[0][0])
    assert left > 0, "every event was applied before the kill: nothing was tested"

    stack.start_api()

    def applied():
        s = project_status(stack, 1)
        return s if s["webhook_events"]["pending"] == 0 else None
    status = wait_for(applied, "every event applied after the restart", 300, 0.2)
    assert status["webhook_events"] == {"received": 1000, "pending": 0, "failed": 0}, status["webhook_events"]
    assert status["counts"]["annotations"] == 1000, status["counts"]
    rows = stack.sql("SELECT count(*), count(DISTINCT id) FROM ls_annotations")
    assert rows == [["1000", "1000"]], rows
    fault_result(request, f"killed with {left} of 1000 pending; after restart 1000 applied once, 0 failed")


# --------------------------------------------------------------------------------------------
# 5. batchlab-ml-backend killed during a bulk /predict


def test_ml_backend_killed_during_a_bulk_predict(pg_stack, request):
    """batchlab-ml-backend SIGKILLed during a bulk /predict: after restart the next request is answered, the finished work from the cache."""
    stack = pg_stack
    stack.require_model()
    env = {"BATCHLAB_ML_BACKEND__PREDICT_DEADLINE_SECONDS": "0", "BATCHLAB_ML_BACKEND__CONCURRENT_TASKS": "1"}
    ml, port = stack.start_ml_backend(**env)
    body = json.loads((FIXTURES / "12-ml-predict.json").read_text())["body"]
    task = body["tasks"][0]
    body["tasks"] = [{**task, "id": 500 + i, "data": {**task["data"], "name": f"Kill Candidate {i}"}} for i in range(30)]
    base = f"http://127.0.0.1:{port}"
    wait_for(lambda: get_json(f"{base}/status")[2]["model"]["state"] == "ready", "the model loaded", 120, 0.1)
    status, _, first = post_json(f"{base}/predict", body)
    assert status == 200, first
    cached = wait_for(lambda: (c := get_json(f"{base}/status")[2]["predictions"]["cached"]) >= 3 and c,
                      "three predictions finished", 300, 0.02)
    ml.kill(signal.SIGKILL)
    assert cached < 30, "every task finished before the kill: nothing was tested"

    ml, port = stack.start_ml_backend(**env)
    base = f"http://127.0.0.1:{port}"
    started = time.monotonic()
    status, _, again = post_json(f"{base}/predict", body)
    answered_in = time.monotonic() - started
    assert status == 200, again
    assert len(again["results"]) == 30, again
    from_cache = sum(1 for p in again["results"] if isinstance(p.get("result"), list))
    assert from_cache >= cached, f"{cached} were finished before the kill, {from_cache} answered after: {again}"
    fault_result(request, f"killed with {cached}/30 predicted; restarted service answered in {answered_in:.2f}s, "
                          f"{from_cache} from the shared cache")


# --------------------------------------------------------------------------------------------
# 6. A full disk under the data directory


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs mounted for the test (needs root, as CI has); unmounted after."""
    mount = tmp_path / "disk"
    mount.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.fail(f"cannot mount a small tmpfs for the full-disk test (needs root): {r.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_full_disk_uploads_and_exports_fail_clearly_and_recover(stack, small_disk, request):
    """A full disk: uploads 507 and exports wait, no partial file is visible, both resume when space returns."""
    files_dir, training_dir = small_disk / "files", small_disk / "training"
    api = stack.start_api(BATCHLAB_STORAGE__FILES_DIR=str(files_dir),
                          BATCHLAB_CURATION__TRAINING_DIR=str(training_dir))
    client = stack.client()
    line = json.dumps(chat_lines(1, "disk", max_tokens=4)[0])
    big = ("\n".join([line] * (3 * 1024 * 1024 // len(line))) + "\n").encode()
    status, _, doc = post_multipart(stack, big)
    assert status == 507, (status, doc)
    assert doc["error"]["code"] == "insufficient_storage" and "full" in doc["error"]["message"], doc
    assert list(files_dir.iterdir()) == [], f"a partial file stayed behind: {list(files_dir.iterdir())}"
    assert client.files.list().data == [], "a failed upload is listed"
    small = client.files.create(file=("small.jsonl", (line + "\n").encode(), "application/jsonl"), purpose="batch")
    assert client.files.content(small.id).content == (line + "\n").encode()

    # An export asked for while the disk is full waits, and is written once space is back.
    filler = small_disk / "filler"
    fill(filler)
    for i in range(1, 4):
        assert post_json(f"{stack.base_url}/webhooks/label-studio", annotation_event(i))[0] == 200
    start_training = json.loads((FIXTURES / "39-ml-webhook-START_TRAINING.json").read_text())["body"]
    assert post_json(f"{stack.base_url}/webhooks/label-studio", start_training)[0] == 200
    project = start_training["project"]["id"]

    def waiting():
        s = project_status(stack, project)
        return s if s["webhook_events"]["pending"] >= 1 and not s["exports"] and \
            "No space left" in api.log_text() else None
    wait_for(waiting, "the START_TRAINING export failing for lack of space", 60, 0.2)
    assert not [p for p in training_dir.rglob("*") if p.is_file()], list(training_dir.rglob("*"))
    filler.unlink()
    exported = wait_for(lambda: project_status(stack, project)["exports"], "the export written after space returned",
                        60, 0.2)
    path = Path(exported[0]["path"])
    assert path.is_file() and path.stat().st_size > 0, exported
    fault_result(request, "upload 507 insufficient_storage, no partial file; START_TRAINING export waited and "
                          "was written once space returned")


def fill(path: Path) -> None:
    """Fills the filesystem holding `path` with one file."""
    with open(path, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass
    free = os.statvfs(path.parent)
    assert free.f_bavail == 0, f"{free.f_bavail} blocks still free"


def post_multipart(stack, content: bytes) -> tuple[int, dict, dict]:
    boundary = "faultsuiteboundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.jsonl\"\r\n"
            f"Content-Type: application/jsonl\r\n\r\n").encode() + content + f"\r\n--{boundary}--\r\n".encode()
    req = urllib.request.Request(f"{stack.base_url}/files", data=body, method="POST",
                                 headers={"Content-Type": f"multipart/form-data; boundary={boundary}",
                                          "Authorization": "Bearer test"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, dict(r.headers), json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.loads(e.read())
