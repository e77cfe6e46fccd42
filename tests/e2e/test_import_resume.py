"""An import into a real Label Studio 1.23 that fails half-way is run again without duplicating
a task.

batchlab-api reaches Label Studio through a small fault-injecting proxy that forwards every call
but the second chunk's `POST /api/projects/{id}/import`, which it either answers 500 itself
(`refused`: nothing created) or forwards and then drops the connection unanswered (`lost`: the
tasks exist, batchlab never saw their ids). The import fails; a second batchlab-api on the same
database then runs it again straight against Label Studio: the project holds each line's task
exactly once, the answer says how many were there already, and a third run creates nothing.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
import urllib.parse
import uuid
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from label_studio import json_request

CHAT = "/v1/chat/completions"
LINES = 7
CHUNK = 2  # four import requests: 2 + 2 + 2 + 1 tasks
FAIL_AT = 2  # the second of them fails
LABEL_CONFIG = (
    '<View><Text name="text" value="$text"/>'
    '<Choices name="label" toName="text"><Choice value="spam"/><Choice value="ham"/></Choices></View>'
)
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "host", "content-length"}


class FaultProxy:
    """Forwards HTTP to `upstream`; the `fail_at`-th `POST .../import` is refused (500) or, with
    `lose_answer`, forwarded and then left unanswered (the connection is closed)."""

    def __init__(self, upstream: str, fail_at: int, lose_answer: bool):
        self.upstream = urllib.parse.urlsplit(upstream)
        self.fail_at = fail_at
        self.lose_answer = lose_answer
        self.imports = 0
        self.faults = 0
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _any(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                fault = False
                if self.command == "POST" and urllib.parse.urlsplit(self.path).path.endswith("/import"):
                    with proxy.lock:
                        proxy.imports += 1
                        fault = proxy.imports == proxy.fail_at
                        proxy.faults += fault
                if fault and not proxy.lose_answer:
                    data = b"Server Error (500)"
                    self.send_response(500)
                    self.send_header("Content-Type", "text/plain")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                    return
                conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=120)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                conn.request(self.command, self.path, body=body, headers=headers)
                answer = conn.getresponse()
                data = answer.read()
                conn.close()
                if fault:
                    # Label Studio did the work; its answer never reaches batchlab.
                    self.close_connection = True
                    return
                self.send_response(answer.status)
                for k, v in answer.getheaders():
                    if k.lower() not in HOP_BY_HOP:
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = _any

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def tasks_of(ls, project: int) -> list[dict]:
    """Every task of the project, as Label Studio lists them (data and meta)."""
    tasks, page = [], 1
    while True:
        status, doc = ls.api("GET", f"/api/tasks/?project={project}&page_size=1000&page={page}")
        if status == 404 and page > 1:
            return tasks
        assert status == 200, (status, doc)
        tasks += doc["tasks"]
        if len(doc["tasks"]) < 1000:
            return tasks
        page += 1


def finished_batch(stack) -> tuple[object, list[str]]:
    """A completed LINES-line batch whose requests carry `metadata.text`; its custom_ids."""
    client = stack.client()
    ids = [f"line-{i}" for i in range(LINES)]
    lines = [
        {"custom_id": cid, "method": "POST", "url": CHAT,
         "body": {"model": "SmolLM2-135M-Instruct", "max_tokens": 2, "temperature": 0,
                  "messages": [{"role": "user", "content": f"Spam or ham? Message {i}."}],
                  "metadata": {"text": f"message {i}"}}}
        for i, cid in enumerate(ids)
    ]  # fmt: skip
    data = b"".join(json.dumps(line).encode() + b"\n" for line in lines)
    f = client.files.create(file=("resume.jsonl", data, "application/jsonl"), purpose="batch")
    batch = client.batches.create(input_file_id=f.id, endpoint=CHAT, completion_window="24h")
    deadline = time.monotonic() + 180
    while (batch := client.batches.retrieve(batch.id)).status not in ("completed", "failed", "cancelled", "expired"):
        assert time.monotonic() < deadline, f"batch not done after 180s: {batch.model_dump_json()}"
        time.sleep(0.2)
    assert batch.status == "completed" and batch.request_counts.completed == LINES, batch.model_dump_json()
    return batch, ids


@pytest.mark.parametrize("fault", ["refused", "lost"])
def test_a_failed_import_resumes_without_duplicate_tasks(stack, label_studio, log_sources, fault):
    ls = label_studio
    log_sources.append(ls)
    lose_answer = fault == "lost"
    project = ls.ok("POST", "/api/projects/", {"title": f"E2E import resume {uuid.uuid4().hex[:8]}",
                                               "label_config": LABEL_CONFIG})["id"]  # fmt: skip
    # A task of someone else's import with one of the batch's custom_ids: never taken for ours.
    foreign = ls.ok("POST", f"/api/projects/{project}/import?return_task_ids=true",
                    [{"data": {"text": "message 2", "custom_id": "line-2"}}])["task_ids"]  # fmt: skip
    common = {
        "LABEL_STUDIO_API_KEY": ls.token,
        "BATCHLAB_LABEL_STUDIO__IMPORT_CHUNK_SIZE": str(CHUNK),
        "BATCHLAB_LABEL_STUDIO__TIMEOUT_SECONDS": "60",
    }
    with FaultProxy(ls.url, FAIL_AT, lose_answer) as proxy:
        first_api = stack.start_api(LABEL_STUDIO_URL=proxy.url, **common)
        stack.start_worker()
        batch, ids = finished_batch(stack)
        body = {"batch_id": batch.id, "output_file_id": batch.output_file_id}
        code, doc = json_request(f"{stack.base_url}/label-studio/import/{project}", "POST", body)
        assert code >= 500, (code, doc)
        assert proxy.faults == 1 and proxy.imports == FAIL_AT, (proxy.faults, proxy.imports)

    created_first = CHUNK * (FAIL_AT if lose_answer else FAIL_AT - 1)
    ours = [t for t in tasks_of(ls, project) if t["id"] not in foreign]
    assert len(ours) == created_first, [t["data"] for t in ours]

    # Run it again straight against Label Studio, from another batchlab-api on the same database.
    first_api.stop()
    stack.start_api(LABEL_STUDIO_URL=ls.url, **common)
    code, report = json_request(f"{stack.base_url}/label-studio/import/{project}", "POST", body)
    assert code == 200, (code, report)
    tasks = tasks_of(ls, project)
    ours = [t for t in tasks if t["id"] not in foreign]
    assert Counter(t["data"]["custom_id"] for t in ours) == Counter(ids), [t["data"] for t in ours]
    assert len(tasks) == LINES + 1, "the foreign task is still there, and was not adopted"
    assert report["already_imported"] == created_first, report
    assert report["recovered"] == (CHUNK if lose_answer else 0), report
    assert report["tasks"] == LINES - created_first, report
    # Each task names its batch: what tells this batch's tasks from the foreign one.
    assert all(t["meta"] == {"batchlab_batch_id": batch.id} for t in ours), [t["meta"] for t in ours]
    by_id = {t["id"]: t["data"]["custom_id"] for t in ours}
    assert [by_id.get(t) for t in report["task_ids"]] == ids, (report["task_ids"], by_id)

    # A third run creates nothing.
    code, again = json_request(f"{stack.base_url}/label-studio/import/{project}", "POST", body)
    assert code == 200, (code, again)
    assert (again["tasks"], again["already_imported"], again["recovered"]) == (0, LINES, 0), again
    assert again["task_ids"] == report["task_ids"], again
    assert len(tasks_of(ls, project)) == LINES + 1


def test_label_studio_filters_tasks_by_custom_id(label_studio):
    """The lookup a resumed import relies on: Label Studio's task list filtered to a set of
    `data.custom_id`s with the Data Manager's `in_list` operator, `%` included."""
    ls = label_studio
    project = ls.ok("POST", "/api/projects/", {"title": f"E2E custom_id filter {uuid.uuid4().hex[:8]}",
                                               "label_config": LABEL_CONFIG})["id"]  # fmt: skip
    names = ["a", "b", "50%25", "c d", "e"]
    ls.ok("POST", f"/api/projects/{project}/import", [{"data": {"text": n, "custom_id": n}} for n in names])
    query = {"filters": {"conjunction": "and", "items": [
        {"filter": "filter:tasks:data.custom_id", "operator": "in_list", "type": "String", "value": ["b", "50%25", "c d"]},
    ]}}  # fmt: skip
    # Label Studio decodes `query` once more after the URL, as batchlab's client expects.
    encoded = urllib.parse.quote(json.dumps(query).replace("%", "%25"))
    doc = ls.ok("GET", f"/api/tasks/?project={project}&page_size=1000&query={encoded}")
    assert sorted(t["data"]["custom_id"] for t in doc["tasks"]) == ["50%25", "b", "c d"], doc
