"""`batchlab-api setup-label-studio` against a real Label Studio 1.23, and the ML backend's
START_TRAINING hand-off.

Covers: project, ML backend (state CO) and secret-header webhook created on the first run;
nothing created on a second run (legacy token) nor on a third (personal access token, exchanged
for a Bearer access token); a changed labeling config is written to the existing project; clear
one-line failures for a wrong key and an unreachable Label Studio; Label Studio's Start Training
reaching batchlab-ml-backend's /webhook, which stores the event where batchlab-api applies it.
"""

from __future__ import annotations

import re
import subprocess
import time

import pytest

from conftest import BIN_DIR, REPO, http_get, service_env

SECRET_HEADER = "X-Batchlab-Secret"
SECRET = "e2e-shared-secret"
LABEL_CONFIG = REPO / "config" / "label-configs" / "candidate-evaluation.xml"


def run_setup(stack, ls, ml_port: int, api_key: str, *extra: str, url: str | None = None, label_config=LABEL_CONFIG):
    env = service_env(
        {
            "LABEL_STUDIO_URL": url or ls.url,
            "LABEL_STUDIO_API_KEY": api_key,
            "BATCHLAB_LABEL_STUDIO__WEBHOOK_SECRET": SECRET,
            "BATCHLAB_LABEL_STUDIO__TIMEOUT_SECONDS": "60",
            "BATCHLAB_API__PORT": str(stack.api_port),
            "BATCHLAB_ML_BACKEND__PORT": str(ml_port),
        }
    )
    cmd = [str(BIN_DIR / "batchlab-api"), "setup-label-studio", "--title", "E2E Candidate Evaluation",
           "--label-config", str(label_config), *extra]  # fmt: skip
    return subprocess.run(cmd, cwd=stack.root, env=env, capture_output=True, text=True, timeout=120)


def report_of(result) -> dict:
    import json

    assert result.returncode == 0, f"setup failed ({result.returncode}): {result.stderr[-3000:]}"
    return json.loads(result.stdout)


@pytest.fixture
def services(stack, label_studio, log_sources):
    log_sources.append(label_studio)
    stack.start_api(BATCHLAB_LABEL_STUDIO__WEBHOOK_SECRET=SECRET)
    ml, ml_port = stack.start_ml_backend(
        BATCHLAB_LABEL_STUDIO__WEBHOOK_SECRET=SECRET,
    )
    return stack, ml, ml_port


def personal_access_token(ls) -> str:
    """Creates a personal access token for the admin (Label Studio's `POST /api/token/`)."""
    status, doc = ls.api("POST", "/api/token/", {})
    assert status in (200, 201), f"POST /api/token/ -> {status}: {doc}"
    token = doc.get("token") if isinstance(doc, dict) else None
    assert token and token.count(".") == 2, f"no JWT in {doc}"
    return token


def test_setup_is_idempotent_with_both_kinds_of_key_and_training_is_handed_on(services, label_studio):
    stack, ml, ml_port = services
    ls = label_studio
    ml_url = f"http://127.0.0.1:{ml_port}"
    # The configured Label Studio instance (`default`) is named in the URL it delivers to.
    hook_url = f"http://127.0.0.1:{stack.api_port}/v1/webhooks/label-studio/default"

    first = report_of(run_setup(stack, ls, ml_port, ls.token))
    assert first["project_created"] is True and first["config_updated"] is False
    assert first["ml_backend_created"] is True and first["ml_backend_state"] == "CO", first
    assert first["webhook_created"] is True
    project = first["project_id"]

    # What Label Studio now holds.
    proj = ls.ok("GET", f"/api/projects/{project}/")
    assert proj["title"] == "E2E Candidate Evaluation"
    assert proj["label_config"].strip() == LABEL_CONFIG.read_text().strip()
    backends = ls.ok("GET", f"/api/ml/?project={project}")
    backends = backends["results"] if isinstance(backends, dict) else backends
    assert [(b["id"], b["url"], b["state"]) for b in backends] == [(first["ml_backend_id"], ml_url, "CO")]
    assert re.fullmatch(r"batchlab-SmolLM2-135M-Instruct-[0-9a-f]{8}", backends[0]["model_version"]), backends[0]
    hooks = {h["url"]: h for h in ls.ok("GET", f"/api/webhooks/?project={project}")}
    ours = hooks[hook_url]
    assert ours["id"] == first["webhook_id"]
    assert ours["headers"] == {SECRET_HEADER: SECRET}
    assert ours["send_payload"] and ours["send_for_all_actions"] and ours["is_active"]
    assert f"{ml_url}/webhook" in hooks, "Label Studio registers the ML backend's own webhook"

    # Second run, legacy token: nothing new.
    second = report_of(run_setup(stack, ls, ml_port, ls.token))
    assert second == {**first, "project_created": False, "ml_backend_created": False, "webhook_created": False}

    # Third run, personal access token (JWT refresh token exchanged for Bearer access tokens).
    pat = personal_access_token(ls)
    third = report_of(run_setup(stack, ls, ml_port, pat))
    assert third == second

    # A changed labeling config is written to the existing project; nothing else changes.
    changed = stack.root / "changed.xml"
    changed.write_text(LABEL_CONFIG.read_text().replace('<Choice value="maybe"/>', '<Choice value="maybe"/><Choice value="unsure"/>'))
    fourth = report_of(run_setup(stack, ls, ml_port, pat, label_config=changed))
    assert fourth == {**second, "config_updated": True}
    assert "unsure" in ls.ok("GET", f"/api/projects/{project}/")["label_config"]

    # Clear one-line failures.
    bad = run_setup(stack, ls, ml_port, "f" * 40)
    assert bad.returncode != 0 and bad.stdout == ""
    assert "401" in bad.stderr.strip().splitlines()[-1], bad.stderr
    down = run_setup(stack, ls, ml_port, ls.token, url=f"http://127.0.0.1:{_closed_port()}")
    assert down.returncode != 0 and "unreachable" in down.stderr.strip().splitlines()[-1], down.stderr

    # Start Training: Label Studio posts START_TRAINING to the ML backend's /webhook only; the
    # ML backend stores it in the shared store, where batchlab-api's processor applies it.
    ls.ok("POST", f"/api/ml/{first['ml_backend_id']}/train", {})
    deadline = time.monotonic() + 30
    metrics = ""
    while time.monotonic() < deadline:
        _, metrics = http_get(f"{ml_url}/metrics")
        if 'batchlab_ml_webhook_events_total{action="START_TRAINING"' in metrics:
            break
        time.sleep(0.2)
    else:
        ml.fail(f"no START_TRAINING event counted; metrics:\n{metrics}")
    assert re.search(r'batchlab_ml_webhook_events_total\{action="START_TRAINING",status="accepted"\} 1\b', metrics), \
        [m for m in metrics.splitlines() if "webhook_events" in m]
    log = ml.log_text()
    assert "START_TRAINING" in log and "webhook event stored" in log, log[-3000:]
    assert "handoff" not in metrics, "nothing is relayed over HTTP any more"
    # batchlab-api applied the stored event and exported the project's training data (no
    # annotations here: an empty export) to data/training/ under its working directory.
    import json

    deadline = time.monotonic() + 10
    doc: dict = {}
    while time.monotonic() < deadline:
        code, body = http_get(f"http://127.0.0.1:{stack.api_port}/v1/label-studio/projects/{project}")
        doc = json.loads(body) if code == 200 else {"http_status": code, "body": body}
        if any(e.get("reason") == "start_training" for e in doc.get("exports", [])):
            break
        time.sleep(0.2)
    else:
        stack.api.fail(f"no start_training export recorded; project status: {doc}")
    (export,) = doc["exports"]
    assert export["reason"] == "start_training" and export["milestone"] is None, export
    assert export["project_id"] == project and (export["tasks"], export["annotations"]) == (0, 0), export
    # Its own file (never rewritten), and the project's latest export file beside it.
    path = stack.root / export["path"]
    training = stack.root / "data" / "training"
    assert path.parent == training and path.name.startswith(f"project_{project}_start_training_"), export
    assert json.loads(path.read_text()) == [], path.read_text()[:500]
    latest = training / f"project_{project}_export.json"
    assert latest.read_bytes() == path.read_bytes()


def _closed_port() -> int:
    from conftest import free_port

    return free_port()
