"""Webhooks lost while batchlab-api was down are repaired by `batchlab-api reconcile-label-studio`,
against a real Label Studio 1.23, on SQLite and on PostgreSQL.

1. batchlab-api runs with `setup-label-studio`'s webhook: tasks imported and annotated in Label
   Studio (one starred as ground truth, one task later deleted) reach batchlab.
2. batchlab-api stops. Meanwhile in Label Studio: tasks imported, annotations created (one
   skipped), one updated, one starred, one deleted, a task with its annotation deleted. Label
   Studio posts each webhook once to a closed port and never again.
3. A new batchlab-api on the same database: its project status now differs from Label Studio.
   A dry run reports the differences and changes nothing (exit 3).
4. `reconcile-label-studio --project N` (the binary, same configuration, the API running) says
   what was missing, synthesizes the events, and afterwards batchlab's counts equal those
   counted from Label Studio's own REST API, annotation contents included; exit 0.
5. A second run synthesizes nothing.
"""

from __future__ import annotations

import json
import subprocess
import uuid

import pytest

from conftest import BIN_DIR, service_env
from label_studio import json_request
from test_curation import poll

SECRET = "e2e-reconcile-secret"
LABEL_CONFIG = (
    '<View><Text name="text" value="$text"/>'
    '<Choices name="label" toName="text" choice="single" required="true">'
    '<Choice value="spam"/><Choice value="ham"/></Choices></View>'
)


def choice(label: str) -> list[dict]:
    return [{"from_name": "label", "to_name": "text", "type": "choices", "value": {"choices": [label]}}]


def label_studio_side(ls, project: int) -> dict:
    """What Label Studio's own REST API holds: its tasks (every page) and their annotations."""
    tasks, page = [], 1
    while True:
        status, doc = ls.api("GET", f"/api/tasks/?project={project}&fields=all&page_size=1000&page={page}")
        if status == 404 and page > 1:
            break
        assert status == 200, (status, doc)
        tasks += doc["tasks"]
        if len(doc["tasks"]) < 1000:
            break
        page += 1
    annotations = {a["id"]: a for t in tasks for a in t["annotations"]}
    return {
        "tasks": len(tasks),
        "annotations": len(annotations),
        "ground_truth": sum(a["ground_truth"] and not a["was_cancelled"] for a in annotations.values()),
        "cancelled": sum(a["was_cancelled"] for a in annotations.values()),
        "by_id": annotations,
    }


@pytest.fixture(params=["sqlite", "postgres"])
def any_stack(request):
    return request.getfixturevalue("stack" if request.param == "sqlite" else "pg_stack")


def test_reconcile_repairs_webhooks_lost_while_batchlab_was_down(any_stack, label_studio, log_sources, tmp_path):
    stack, ls = any_stack, label_studio
    log_sources.append(ls)
    training = stack.root / "training"
    ls_env = {
        "LABEL_STUDIO_URL": ls.url,
        "LABEL_STUDIO_API_KEY": ls.token,
        "BATCHLAB_LABEL_STUDIO__WEBHOOK_SECRET": SECRET,
        "BATCHLAB_LABEL_STUDIO__TIMEOUT_SECONDS": "60",
        "BATCHLAB_CURATION__TRAINING_DIR": str(training),
    }

    def batchlab(*args: str) -> subprocess.CompletedProcess:
        env = service_env({**stack.base_env(), **ls_env, "BATCHLAB_API__PORT": str(stack.api_port)})
        cmd = [str(BIN_DIR / "batchlab-api"), *args]
        return subprocess.run(cmd, cwd=stack.root, env=env, capture_output=True, text=True, timeout=300)

    def reconcile(*extra: str) -> tuple[int, dict]:
        r = batchlab("reconcile-label-studio", "--project", str(project), *extra)
        assert r.returncode in (0, 3), f"reconcile failed ({r.returncode}): {r.stderr[-3000:]}"
        return r.returncode, json.loads(r.stdout)

    def status() -> dict:
        code, doc = json_request(f"{stack.base_url}/label-studio/projects/{project}")
        return doc if code == 200 else {"http_status": code, "body": doc}

    def wait_counts(what: str, **expected) -> dict:
        return poll(status, lambda s: all(s.get("counts", {}).get(k) == v for k, v in expected.items()),
                    f"{what} (counts {expected})", timeout=15.0)  # fmt: skip

    def annotate(task: int, label: str, cancelled: bool = False) -> dict:
        body = {"result": [] if cancelled else choice(label), "was_cancelled": cancelled, "lead_time": 1.5}
        return ls.ok("POST", f"/api/tasks/{task}/annotations/", body)

    # ---- 1. webhooks arrive -----------------------------------------------------------------
    first_api = stack.start_api(**ls_env)
    config = tmp_path / "config.xml"
    config.write_text(LABEL_CONFIG)
    title = f"E2E reconcile {uuid.uuid4().hex[:8]}"
    r = batchlab("setup-label-studio", "--title", title, "--label-config", str(config), "--no-ml-backend")
    assert r.returncode == 0, f"setup failed ({r.returncode}): {r.stderr[-3000:]}"
    project = json.loads(r.stdout)["project_id"]

    texts = [{"data": {"text": f"message {i}"}} for i in range(6)]
    t = ls.ok("POST", f"/api/projects/{project}/import?return_task_ids=true", texts)["task_ids"]
    wait_counts("the imported tasks", tasks=6)
    a = {i: annotate(t[i], "spam" if i % 2 else "ham") for i in range(4)}
    ls.ok("PATCH", f"/api/annotations/{a[0]['id']}/", {"ground_truth": True})
    wait_counts("four annotations, one starred", tasks=6, annotations=4, valid=4, ground_truth=1)

    # ---- 2. batchlab-api is down: every webhook of these changes is lost ------------------------
    first_api.stop()
    assert not first_api.alive()
    more = ls.ok("POST", f"/api/projects/{project}/import?return_task_ids=true",
                 [{"data": {"text": f"late message {i}"}} for i in range(2)])["task_ids"]  # fmt: skip
    created = [annotate(t[4], "spam"), annotate(more[0], "ham"), annotate(more[1], "", cancelled=True)]
    ls.ok("PATCH", f"/api/annotations/{a[1]['id']}/", {"result": choice("ham")})  # spam -> ham
    ls.ok("PATCH", f"/api/annotations/{a[2]['id']}/", {"ground_truth": True})
    code, doc = ls.api("DELETE", f"/api/annotations/{a[0]['id']}/")  # the starred one
    assert code in (200, 204), (code, doc)
    code, doc = ls.api("DELETE", f"/api/tasks/{t[3]}/")  # with its annotation
    assert code in (200, 204), (code, doc)
    truth = label_studio_side(ls, project)
    assert (truth["tasks"], truth["annotations"], truth["ground_truth"], truth["cancelled"]) == (7, 5, 1, 1), truth

    # ---- 3. batchlab-api is back, and behind ------------------------------------------------------
    stack.start_api(**ls_env)
    stale = status()["counts"]
    assert (stale["tasks"], stale["annotations"], stale["ground_truth"]) == (6, 4, 1), stale

    rc, dry = reconcile("--dry-run")
    assert rc == 3 and dry["dry_run"] is True and dry["agree"] is False, dry
    assert dry["events"] == {} and dry["events_stored"] == 0 and dry["after"] is None, dry
    assert status()["counts"] == stale, "a dry run changes nothing"

    # ---- 4. reconciliation ----------------------------------------------------------------------
    rc, report = reconcile()
    assert rc == 0 and report["agree"] is True, report
    before = report["before"]
    assert before == dry["before"], (before, dry["before"])
    assert before["label_studio"] == {"tasks": 7, "annotations": 5, "ground_truth": 1}, before
    assert before["batchlab"] == {"tasks": 6, "annotations": 4, "ground_truth": 1}, before
    assert before["differences"] == {
        "project_config_differs": False,
        "tasks_missing": 2,
        "tasks_changed": 0,
        "tasks_deleted": 1,
        "annotations_missing": 3,
        "annotations_outdated": 2,  # a new result; a new star
        "annotations_deleted": 1,  # the starred one (the deleted task's goes with its task)
        "annotations_newer_in_batchlab": 0,
        "still_in_label_studio": 0,
    }, before
    assert report["events"] == {
        "TASKS_CREATED": report["events"]["TASKS_CREATED"],  # one per window of tasks
        "ANNOTATION_CREATED": 3,
        "ANNOTATION_UPDATED": 2,
        "ANNOTATIONS_DELETED": 1,
        "TASKS_DELETED": 1,
    }, report["events"]
    assert report["events"]["TASKS_CREATED"] >= 1
    assert report["events_stored"] == sum(report["events"].values()) and report["events_duplicate"] == 0, report
    applied = report["applied"]
    assert applied["pending"] == 0 and applied["failed"] == 0 and not applied["timed_out"], applied
    after = report["after"]
    assert after["label_studio"] == after["batchlab"] == {"tasks": 7, "annotations": 5, "ground_truth": 1}, after
    assert not any(after["differences"].values()), after

    # Checked against Label Studio's own API, through batchlab's project status and export.
    truth = label_studio_side(ls, project)
    counts = status()["counts"]
    assert counts == report["batchlab_status_counts"], (counts, report["batchlab_status_counts"])
    assert (counts["tasks"], counts["annotations"], counts["ground_truth"], counts["cancelled"]) == \
        (truth["tasks"], truth["annotations"], truth["ground_truth"], truth["cancelled"]), (counts, truth)
    assert counts["invalid"] == 0 and counts["valid"] == truth["annotations"] - truth["cancelled"], counts
    code, export = json_request(f"{stack.base_url}/label-studio/export/{project}?include_invalid=true&include_cancelled=true")
    assert code == 200, (code, export)
    stored = {x["id"]: x for task in export for x in task["annotations"]}
    assert set(stored) <= set(truth["by_id"]), (sorted(stored), sorted(truth["by_id"]))
    for aid, x in stored.items():
        want = truth["by_id"][aid]
        assert (x["result"], x["ground_truth"]) == (want["result"], want["ground_truth"]), (x, want)
    assert stored[a[1]["id"]]["result"] == choice("ham"), stored[a[1]["id"]]
    assert {c["id"] for c in created if not c["was_cancelled"]} <= set(stored), (created, sorted(stored))

    # ---- 5. nothing left to do -----------------------------------------------------------------
    rc, again = reconcile()
    assert rc == 0 and again["agree"] is True, again
    assert again["events"] == {} and again["events_stored"] == 0, again
    assert not any(again["before"]["differences"].values()), again["before"]
    assert status()["counts"] == counts
