"""The status page (`GET /` on batchlab-api) in a real headless Chromium, against the real
binaries and the real default model.

A batch runs through a worker and a burst of Label Studio webhook deliveries (recorded ones,
re-numbered) reaches a milestone; the page, given the API key once, must then show the batch
completed at 100 %, the project with its annotation, ground-truth and invalid counts, the
milestone with its export file, an accuracy chart, and the worker's model. A screenshot goes to
$BATCHLAB_SCREENSHOT_DIR (a temporary directory otherwise) and its path is printed.

Chromium is Debian's (`apt-get install chromium`), driven by Playwright's Python package with
`executable_path` set, so no browser is ever downloaded. Without Chromium or Playwright the test
is skipped, or fails when BATCHLAB_REQUIRE_BROWSER=1.
"""

from __future__ import annotations

import json
import os
import sqlite3
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import REPO
from test_batches import chat_lines, create_batch, wait_status
from test_curation import poll

CHROMIUM = Path(os.environ.get("BATCHLAB_CHROMIUM") or "/usr/bin/chromium")
REQUIRE_BROWSER = os.environ.get("BATCHLAB_REQUIRE_BROWSER") == "1"
LAUNCH_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync"]
FIXTURES = REPO / "tests" / "fixtures" / "label-studio-1.23"
API_KEY = "e2e-status-key"
MODEL_ID = "SmolLM2-135M-Instruct"
PROJECT = 1
MILESTONE = 4
WAIT_MS = 30_000


def browser_unavailable() -> str | None:
    """Why Chromium cannot be driven here, or None."""
    if not CHROMIUM.is_file():
        return f"{CHROMIUM} is missing: apt-get install -y chromium"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is missing: pip install -r tests/e2e/requirements.txt"
    return None


def annotation_event(i: int, choice: str = "yes", ground_truth: bool = False) -> dict:
    """Label Studio's ANNOTATION_CREATED (a recorded delivery) for annotation `i` of task `i`."""
    body = json.loads((FIXTURES / "22-webhook-ANNOTATION_CREATED.json").read_text())["body"]
    body["annotation"].update(id=i, task=i, project=PROJECT, ground_truth=ground_truth,
                              unique_id=f"status-{i}")
    body["annotation"]["result"][0]["value"]["choices"] = [choice]
    body["task"].update(id=i, inner_id=i, project=PROJECT)
    body["task"]["data"] = {**body["task"]["data"], "name": f"Candidate {i}"}
    body["project"]["id"] = PROJECT
    return body


def call(url: str, body: dict | None = None, key: str | None = API_KEY) -> tuple[int, dict]:
    """GET `url`, or POST `body` as JSON; the status and the JSON answer."""
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers=headers, method="GET" if data is None else "POST")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def screenshot_path(name: str) -> Path:
    folder = Path(os.environ.get("BATCHLAB_SCREENSHOT_DIR") or tempfile.mkdtemp(prefix="batchlab-screens-"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder / name


def test_status_page_shows_a_batch_a_project_and_the_model(stack, tmp_path):
    why = browser_unavailable()
    if why:
        if REQUIRE_BROWSER:
            pytest.fail(f"BATCHLAB_REQUIRE_BROWSER=1 but {why}")
        pytest.skip(why)
    from playwright.sync_api import sync_playwright

    stack.start_api(BATCHLAB_API__API_KEY=API_KEY, BATCHLAB_CURATION__MILESTONES=f"[{MILESTONE}]",
                    BATCHLAB_CURATION__TRAINING_DIR=str(tmp_path / "training"))
    stack.start_worker()
    api = f"http://127.0.0.1:{stack.api_port}"

    # A batch, run to the end by the real model.
    client = stack.client()
    batch = create_batch(client, chat_lines(4, "status", max_tokens=8))
    wait_status(client, batch.id, "completed", timeout=300)

    # A webhook burst: five valid annotations (two starred as ground truth), one invalid.
    events = [annotation_event(i, ground_truth=i in (1, 2)) for i in range(1, 6)]
    events.append(annotation_event(6, choice="not-a-choice"))
    for event in events:
        status, doc = call(f"{api}/v1/webhooks/label-studio", event, key=None)
        assert status == 200, doc
    projects = poll(lambda: call(f"{api}/v1/label-studio/projects")[1],
                    lambda d: bool(d["data"]) and d["data"][0]["counts"]["annotations"] == 6
                    and bool(d["data"][0]["milestones"]),
                    "the burst applied and its milestone exported", timeout=60)
    project = projects["data"][0]
    assert (project["counts"]["ground_truth"], project["counts"]["invalid"]) == (2, 1), project
    milestone_file = project["milestones"][0]["file"]
    assert milestone_file == f"project_{PROJECT}_milestone_{MILESTONE}.json"
    assert Path(project["milestones"][0]["path"]).is_file()

    # Accuracy records as curation keeps them (with no stored prediction it keeps empty ones):
    # written straight into the stack's SQLite file, so the page has a history to chart.
    with sqlite3.connect(stack.root / "batchlab.db") as db:
        for checkpoint, acc in ((2, 0.5), (4, 0.75)):
            report = {"status-e2e": {"overall_accuracy": acc, "counts": {"comparisons": 6},
                                     "field_accuracy": {"recommendation": acc, "pedigree_rating": 1 - acc}}}
            db.execute("INSERT INTO accuracy_records (instance, project_id, checkpoint, report, created_at) "
                       "VALUES ('default', ?, ?, ?, ?)", (PROJECT, checkpoint, json.dumps(report), int(time.time())))

    models = poll(lambda: call(f"{api}/v1/models")[1], lambda d: bool(d["data"]), "the worker's model listed",
                  timeout=60)
    assert [m["id"] for m in models["data"]] == [MODEL_ID], models
    assert call(f"{api}/v1/status", key=None)[0] == 401

    shot = screenshot_path(f"status-page-{batch.id}.png")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=LAUNCH_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" and "401" not in m.text else None)
            page.goto(f"{api}/", wait_until="domcontentloaded")

            # The page holds no data: it asks for the key, once, and keeps it for the tab.
            page.wait_for_selector("body[data-state='needs-key'] #api-key", state="visible", timeout=WAIT_MS)
            page.fill("#api-key", API_KEY)
            page.click("#api-key-save")
            page.wait_for_selector("body[data-state='loaded']", timeout=WAIT_MS)
            assert page.evaluate("sessionStorage.getItem('batchlab.apiKey')") == API_KEY

            row = f"tr[data-batch-id='{batch.id}']"
            page.wait_for_selector(f"{row}[data-status='completed']", timeout=WAIT_MS)
            assert page.inner_text(f"{row} [data-field='progress']") == "100%"
            assert page.inner_text(f"{row} [data-field='lines']") == "4/4"
            assert page.inner_text(f"{row} [data-field='eta']") == "done"

            card = f"[data-project='default/{PROJECT}']"
            page.wait_for_selector(card, timeout=WAIT_MS)
            assert page.inner_text(f"{card} [data-field='annotations']") == "6"
            assert page.inner_text(f"{card} [data-field='ground_truth']") == "2"
            assert page.inner_text(f"{card} [data-field='invalid']") == "1"
            assert page.inner_text(f"{card} [data-milestone='{MILESTONE}'] [data-field='file']") == milestone_file
            page.wait_for_selector(f"{card} svg[data-chart='accuracy'] polyline[data-field='recommendation']",
                                   timeout=WAIT_MS)
            assert "75%" in page.inner_text(f"{card} [data-accuracy-field='recommendation']")

            page.wait_for_selector(f"tr[data-model='{MODEL_ID}']", timeout=WAIT_MS)
            assert page.inner_text(f"tr[data-model='{MODEL_ID}'] [data-field='workers']") == "1"

            # It refreshes by itself (a selector wait: the page's CSP allows no eval).
            refreshes = page.get_attribute("body", "data-refreshes")
            page.wait_for_selector(f"body[data-state='loaded']:not([data-refreshes='{refreshes}'])", timeout=WAIT_MS)
            page.screenshot(path=str(shot), full_page=True)
            assert not errors, errors
        finally:
            browser.close()
    print(f"status page screenshot: {shot}")
    assert shot.is_file() and shot.stat().st_size > 10_000
