"""A Label Studio re-created with a fresh database never makes batchlab drop annotations
silently: two real Label Studio 1.23 databases, one after the other, one batchlab store
(SQLite).

1. Label Studio A: `setup-label-studio` (instance `default`), six tasks, five annotations, two of
   them deleted (batchlab keeps their tombstones); milestone 3 is exported.
2. A is gone; Label Studio B starts with a fresh database. The operator runs the same
   `setup-label-studio` against it: B's project 1 and its annotations 1, 2, ... reuse A's ids. Each of
   B's events is kept aside as a `project_recreated` conflict, visible in the status (which says
   what to do), and nothing of A's project changes: no count, no export.
3. The documented commands: `BATCHLAB_LABEL_STUDIO__INSTANCE=ls-b setup-label-studio` re-points
   B's webhook at `/v1/webhooks/label-studio/ls-b` (one webhook, not two), and
   `reconcile-label-studio --project 1` brings B's project over from its REST API. Then every
   annotation of both is counted in its own instance, equal to what each Label Studio held, live
   deliveries from B land in `ls-b`, and each instance's milestone file is its own.
"""

from __future__ import annotations

import hashlib
import json
import subprocess

from conftest import BIN_DIR, service_env
from label_studio import LabelStudio, json_request
from test_curation import poll
from test_reconcile import choice, label_studio_side

SECRET = "e2e-instances-secret"
LABEL_CONFIG = (
    '<View><Text name="text" value="$text"/>'
    '<Choices name="label" toName="text" choice="single" required="true">'
    '<Choice value="spam"/><Choice value="ham"/></Choices></View>'
)
TITLE = "E2E instances"


def test_a_recreated_label_studio_gets_an_instance_of_its_own(stack, log_sources, tmp_path_factory, tmp_path):
    training = stack.root / "training"
    first = LabelStudio(tmp_path_factory.mktemp("label-studio-a"))
    log_sources.append(first)
    ls_env = {
        "LABEL_STUDIO_URL": first.url,
        "LABEL_STUDIO_API_KEY": first.token,
        "BATCHLAB_LABEL_STUDIO__WEBHOOK_SECRET": SECRET,
        "BATCHLAB_LABEL_STUDIO__TIMEOUT_SECONDS": "60",
        "BATCHLAB_CURATION__TRAINING_DIR": str(training),
        "BATCHLAB_CURATION__MILESTONES": "[3]",
    }
    config = tmp_path / "config.xml"
    config.write_text(LABEL_CONFIG)

    def batchlab(*args: str, **env: str) -> subprocess.CompletedProcess:
        full = service_env({**stack.base_env(), **ls_env, "BATCHLAB_API__PORT": str(stack.api_port), **env})
        cmd = [str(BIN_DIR / "batchlab-api"), *args]
        return subprocess.run(cmd, cwd=stack.root, env=full, capture_output=True, text=True, timeout=300)

    def setup(**env: str) -> dict:
        r = batchlab("setup-label-studio", "--title", TITLE, "--label-config", str(config), "--no-ml-backend", **env)
        assert r.returncode == 0, f"setup failed ({r.returncode}): {r.stderr[-3000:]}"
        return json.loads(r.stdout)

    def status(project: int, instance: str) -> dict:
        code, doc = json_request(f"{stack.base_url}/label-studio/projects/{project}?instance={instance}")
        return doc if code == 200 else {"http_status": code, "body": doc}

    def wait_counts(project: int, instance: str, what: str, **expected) -> dict:
        return poll(lambda: status(project, instance),
                    lambda s: all(s.get("counts", {}).get(k) == v for k, v in expected.items()),
                    f"{what} (counts {expected})", timeout=20.0)  # fmt: skip

    def annotate(ls: LabelStudio, task: int, label: str) -> dict:
        return ls.ok("POST", f"/api/tasks/{task}/annotations/", {"result": choice(label), "lead_time": 1.0})

    # ---- 1. Label Studio A ------------------------------------------------------------------------
    first.start()
    stack.start_api(**ls_env)
    project = setup()["project_id"]
    tasks = first.ok("POST", f"/api/projects/{project}/import?return_task_ids=true",
                     [{"data": {"text": f"A message {i}"}} for i in range(6)])["task_ids"]  # fmt: skip
    made = [annotate(first, tasks[i], "spam" if i % 2 else "ham") for i in range(5)]
    wait_counts(project, "default", "A's five annotations", tasks=6, annotations=5)
    for a in made[3:]:
        code, doc = first.api("DELETE", f"/api/annotations/{a['id']}/")
        assert code in (200, 204), (code, doc)
    a_side = label_studio_side(first, project)
    old = wait_counts(project, "default", "A's three annotations", tasks=6, annotations=3)
    assert (a_side["tasks"], a_side["annotations"]) == (6, 3), a_side
    assert old["milestones_reached"] == [3] and old["conflicts"]["count"] == 0, old
    milestone = training / f"project_{project}_milestone_3.json"
    milestone_sha = hashlib.sha256(milestone.read_bytes()).hexdigest()
    first.stop()

    # ---- 2. Label Studio B: same URL, fresh database, the same setup --------------------------------
    second = LabelStudio(tmp_path_factory.mktemp("label-studio-b"))
    second.name = "label-studio-b"
    log_sources.append(second)
    second.start()
    # The operator points batchlab at the new Label Studio (the same URL after a container is
    # re-created; another port here, so that no restart races the old one's socket).
    ls_env.update(LABEL_STUDIO_URL=second.url, LABEL_STUDIO_API_KEY=second.token)
    assert setup()["project_id"] == project, "a fresh database hands out the same project id"
    b_tasks = second.ok("POST", f"/api/projects/{project}/import?return_task_ids=true",
                        [{"data": {"text": f"B message {i}"}} for i in range(4)])["task_ids"]  # fmt: skip
    b_made = [annotate(second, t, "ham") for t in b_tasks]
    assert {a["id"] for a in b_made} & {a["id"] for a in made}, "B reuses A's annotation ids"
    seen = poll(lambda: status(project, "default"),
                lambda s: s.get("conflicts", {}).get("by_kind", {}).get("project_recreated", 0) >= 1 + len(b_made)
                and s["webhook_events"]["pending"] == 0,
                "B's events kept aside as conflicts", timeout=20.0)  # fmt: skip
    assert seen["counts"] == old["counts"], "nothing of B is applied to A's project"
    assert seen["exports"] == old["exports"], "A's exports are untouched"
    assert seen["recreated"] and "BATCHLAB_LABEL_STUDIO__INSTANCE" in seen["recreated"], seen["recreated"]
    assert all(c["kind"] == "project_recreated" and c["entity"] == "project" for c in seen["conflicts"]["latest"])
    r = batchlab("reconcile-label-studio", "--project", str(project))
    assert r.returncode == 1 and "re-created" in r.stderr, (r.returncode, r.stderr[-2000:])

    # ---- 3. B gets an instance of its own -----------------------------------------------------------
    b_env = {"BATCHLAB_LABEL_STUDIO__INSTANCE": "ls-b"}
    report = setup(**b_env)
    assert report["webhook_created"] is False, "the existing webhook is re-pointed, not doubled"
    hooks = second.ok("GET", f"/api/webhooks/?project={project}")
    assert [h["url"] for h in hooks] == [f"http://127.0.0.1:{stack.api_port}/v1/webhooks/label-studio/ls-b"], hooks
    r = batchlab("reconcile-label-studio", "--project", str(project), **b_env)
    assert r.returncode == 0, f"reconcile failed ({r.returncode}): {r.stderr[-3000:]}"
    rec = json.loads(r.stdout)
    assert rec["agree"] is True and rec["before"]["batchlab"]["annotations"] == 0, rec
    wait_counts(project, "ls-b", "B's project reconciled", tasks=4, annotations=4)
    # A live delivery from B now lands in ls-b.
    extra = second.ok("POST", f"/api/projects/{project}/import?return_task_ids=true",
                      [{"data": {"text": "B late message"}}])["task_ids"]  # fmt: skip
    annotate(second, extra[0], "spam")
    b_status = wait_counts(project, "ls-b", "B's live annotation", tasks=5, annotations=5)
    b_side = label_studio_side(second, project)
    assert (b_status["counts"]["tasks"], b_status["counts"]["annotations"]) == (b_side["tasks"], b_side["annotations"])
    assert b_status["instance"] == "ls-b" and b_status["conflicts"]["count"] == 0, b_status["conflicts"]
    assert b_status["milestones_reached"] == [3], b_status
    assert (training / "ls-b" / f"project_{project}_milestone_3.json").is_file()

    # A's project, as A left it: its counts, its milestone file byte for byte, the conflicts kept.
    a_status = status(project, "default")
    assert a_status["counts"] == old["counts"], (a_status["counts"], old["counts"])
    assert (a_status["counts"]["tasks"], a_status["counts"]["annotations"]) == (a_side["tasks"], a_side["annotations"])
    assert hashlib.sha256(milestone.read_bytes()).hexdigest() == milestone_sha
    assert a_status["conflicts"]["by_kind"]["project_recreated"] == seen["conflicts"]["by_kind"]["project_recreated"]
    second.stop()
