"""The curation flow end to end, against a real Label Studio 1.23 and the real binaries.

One test walks the whole path an operator takes:

1. batchlab-api (Label Studio URL and key, webhook secret, milestone 100), batchlab-ml-backend
   storing the events it receives for it, a worker on the real model; `batchlab-api setup-label-studio`
   creates the project, the ML backend and the secret-header webhook.
2. A 5-line chat batch whose request bodies carry the candidate's `metadata`, imported into the
   project with `POST /v1/label-studio/import/{id}`; SmolLM2-135M answers poorly, so only the
   invariants are checked: every line a task with its metadata and `custom_id`, every
   prediction tagged `<model>:<batch_id>` and holding only values the config allows.
3. Annotations made through Label Studio's REST API (two starred as ground truth) reach
   batchlab through the webhook; `POST /v1/label-studio/accuracy/{id}` equals a hand
   computation (micro average, per field, kappa, confusion, counts).
4. 100 valid annotations write exactly one milestone export with 100 tasks; the 101st writes
   none; an annotation outside the config is flagged invalid and never counted.
5. Start Training (Label Studio → ML backend /webhook → API) writes a `start_training` export.
6. Deleting an annotation in Label Studio lowers the counts.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import time
from pathlib import Path

import pytest

from conftest import BIN_DIR, REPO, http_get, service_env
from label_studio import json_request

SECRET_HEADER = "X-Batchlab-Secret"
SECRET = "e2e-curation-secret"
TITLE = "E2E Curation Flow"
LABEL_CONFIG = REPO / "config" / "label-configs" / "candidate-evaluation.xml"
CHAT = "/v1/chat/completions"

GOLD1 = ("yes", "strong", "good", "Solid track record at Analytical Engines.")
GOLD2 = ("no", "weak", "average", "Too early in her career.")
RECOMMENDATIONS = ["strong_yes", "yes", "maybe", "no", "strong_no"]
RATINGS = ["exceptional", "strong", "good", "average", "weak"]
ALLOWED = {"recommendation": RECOMMENDATIONS, "trajectory_rating": RATINGS, "pedigree_rating": RATINGS}
CONTROLS = {"recommendation": "choices", "trajectory_rating": "choices", "pedigree_rating": "choices",
            "reasoning": "textarea"}  # fmt: skip

CANDIDATES = [
    {"name": "Ada Lovelace", "title": "Principal Engineer", "company": "Analytical Engines Ltd"},
    {"name": "Grace Hopper", "title": "Staff Engineer", "company": "Compiler Works"},
    {"name": "Alan Turing", "title": "Research Lead", "company": "Bletchley Labs"},
    {"name": "Edsger Dijkstra", "title": "Architect", "company": "Shortest Path BV"},
    {"name": "Barbara Liskov", "title": "Engineering Manager", "company": "Substitution Inc"},
]

# One worked example makes even SmolLM2-135M answer with a JSON object most of the time, so the
# prediction mapping is exercised; the assertions hold whatever it answers.
EXAMPLE = [
    {"role": "system", "content": "You rate job candidates. Reply with one JSON object only."},
    {"role": "user", "content": "Candidate: Jane Doe, Senior Engineer at Acme Corp."},
    {"role": "assistant", "content": '{"recommendation": "yes", "trajectory_rating": "good", "pedigree_rating": "strong"}'},
]


# --------------------------------------------------------------------------------------------
# helpers


call = json_request  # (status, parsed body) of one JSON request


def poll(fetch, pred, what: str, timeout: float = 10.0, interval: float = 0.1):
    """Calls `fetch()` until `pred(value)`; fails with the last value after `timeout`."""
    deadline = time.monotonic() + timeout
    value = None
    while True:
        value = fetch()
        if pred(value):
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} after {timeout:.0f}s; last: {json.dumps(value)[:3000]}")
        time.sleep(interval)


def run_setup(stack, ls, ml_port: int) -> dict:
    env = service_env(
        {
            "LABEL_STUDIO_URL": ls.url,
            "LABEL_STUDIO_API_KEY": ls.token,
            "BATCHLAB_LABEL_STUDIO__WEBHOOK_SECRET": SECRET,
            "BATCHLAB_LABEL_STUDIO__TIMEOUT_SECONDS": "60",
            "BATCHLAB_API__PORT": str(stack.api_port),
            "BATCHLAB_ML_BACKEND__PORT": str(ml_port),
        }
    )
    cmd = [str(BIN_DIR / "batchlab-api"), "setup-label-studio", "--title", TITLE, "--label-config", str(LABEL_CONFIG)]
    r = subprocess.run(cmd, cwd=stack.root, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"setup failed ({r.returncode}): {r.stderr[-3000:]}"
    return json.loads(r.stdout)


def result(rec: str, traj: str, ped: str, reasoning: str | None = None) -> list[dict]:
    """An annotation result in Label Studio's format for the candidate-evaluation config."""
    regions = [
        {"from_name": name, "to_name": "candidate_name", "type": "choices", "value": {"choices": [value]}}
        for name, value in (("recommendation", rec), ("trajectory_rating", traj), ("pedigree_rating", ped))
    ]
    if reasoning is not None:
        regions.append({"from_name": "reasoning", "to_name": "candidate_name", "type": "textarea",
                        "value": {"text": [reasoning]}})  # fmt: skip
    return regions


def annotate(ls, task_id: int, regions: list[dict], ground_truth: bool = False) -> dict:
    body = {"result": regions, "was_cancelled": False, "ground_truth": ground_truth, "lead_time": 2.5}
    return ls.ok("POST", f"/api/tasks/{task_id}/annotations/", body)


def stored_accuracy_by_hand(predictions: dict, gold: dict) -> dict:
    """The counts of the accuracy report of stored predictions (task id -> regions) against
    ground truth (task id -> (recommendation, trajectory, pedigree, reasoning))."""
    compared = skipped = comparisons = correct = 0
    for task, regions in predictions.items():
        if task not in gold:
            skipped += 1
            continue
        compared += 1
        truth = dict(zip(["recommendation", "trajectory_rating", "pedigree_rating", "reasoning"], gold[task]))
        for r in regions:
            comparisons += 1
            if r["type"] == "choices":
                correct += r["value"]["choices"] == [truth[r["from_name"]]]
            else:  # text: case and whitespace do not count
                correct += " ".join("\n".join(r["value"]["text"]).lower().split()) == " ".join(truth["reasoning"].lower().split())
    return {"predictions": len(predictions), "tasks_compared": compared, "skipped_no_ground_truth": skipped,
            "comparisons": comparisons, "correct": correct}  # fmt: skip


def check_prediction_regions(regions: list[dict]) -> None:
    """A prediction holds only controls of the config, and only values the config allows."""
    assert regions, "a stored prediction without regions"
    for r in regions:
        name = r["from_name"]
        assert name in CONTROLS, r
        assert r["type"] == CONTROLS[name] and r["to_name"] == "candidate_name", r
        if name in ALLOWED:
            assert len(r["value"]["choices"]) == 1 and r["value"]["choices"][0] in ALLOWED[name], r
        else:
            assert all(isinstance(t, str) for t in r["value"]["text"]), r


# --------------------------------------------------------------------------------------------
# the flow


@pytest.fixture
def curation(stack, label_studio, log_sources):
    log_sources.append(label_studio)
    training = stack.root / "training"
    stack.start_api(
        LABEL_STUDIO_URL=label_studio.url,
        LABEL_STUDIO_API_KEY=label_studio.token,
        BATCHLAB_LABEL_STUDIO__WEBHOOK_SECRET=SECRET,
        BATCHLAB_LABEL_STUDIO__TIMEOUT_SECONDS="60",
        BATCHLAB_CURATION__MILESTONES="[100]",
        BATCHLAB_CURATION__TRAINING_DIR=str(training),
    )
    ml, ml_port = stack.start_ml_backend(
        BATCHLAB_LABEL_STUDIO__WEBHOOK_SECRET=SECRET,
    )
    stack.start_worker()
    return stack, ml, ml_port, training


def test_curation_flow_with_label_studio(curation, label_studio):
    stack, ml, ml_port, training = curation
    ls = label_studio
    api = f"http://127.0.0.1:{stack.api_port}"
    problems: list[str] = []  # product misbehaviour seen mid-flow; reported at the end

    def status() -> dict:
        code, doc = call(f"{api}/v1/label-studio/projects/{project}")
        return doc if code == 200 else {"http_status": code, "body": doc}

    def counts() -> dict:
        return status().get("counts", {})

    def wait_counts(what: str, timeout: float = 10.0, **expected) -> dict:
        return poll(status, lambda s: all(s.get("counts", {}).get(k) == v for k, v in expected.items()),
                    f"{what} (counts {expected})", timeout)  # fmt: skip

    # ---- 1. the stack and the project ------------------------------------------------------
    setup = run_setup(stack, ls, ml_port)
    assert setup["project_created"] and setup["ml_backend_created"] and setup["webhook_created"], setup
    project = setup["project_id"]

    # The webhook refuses a delivery without the secret.
    code, doc = call(f"{api}/v1/webhooks/label-studio", "POST", {"action": "PROJECT_UPDATED", "project": {"id": project}})
    assert code == 401, (code, doc)

    # ---- 2. a batch with candidate metadata, imported as tasks with predictions -------------
    client = stack.client()
    lines = []
    for i, cand in enumerate(CANDIDATES):
        lines.append({
            "custom_id": f"cand-{i}",
            "method": "POST",
            "url": CHAT,
            "body": {
                "model": "SmolLM2-135M-Instruct",
                "messages": [*EXAMPLE, {"role": "user", "content": "Candidate: {name}, {title} at {company}.".format(**cand)}],
                "max_tokens": 32,
                "temperature": 0,
                "metadata": cand,
            },
        })  # fmt: skip
    data = b"".join(json.dumps(line).encode() + b"\n" for line in lines)
    f = client.files.create(file=("candidates.jsonl", data, "application/jsonl"), purpose="batch")
    batch = client.batches.create(input_file_id=f.id, endpoint=CHAT, completion_window="24h")
    deadline = time.monotonic() + 180
    while (batch := client.batches.retrieve(batch.id)).status not in ("completed", "failed", "cancelled", "expired"):
        assert time.monotonic() < deadline, f"batch not done after 180s: {batch.model_dump_json()}"
        time.sleep(0.2)
    assert batch.status == "completed" and batch.request_counts.completed == 5, batch.model_dump_json()
    out = [json.loads(x) for x in client.files.content(batch.output_file_id).content.decode().splitlines() if x.strip()]
    models = {line["response"]["body"]["model"] for line in out}
    assert len(models) == 1, models

    code, imp = call(f"{api}/v1/label-studio/import/{project}", "POST",
                     {"batch_id": batch.id, "output_file_id": batch.output_file_id})  # fmt: skip
    assert code == 200, (code, imp)
    assert imp["project_id"] == project and imp["batch_id"] == batch.id, imp
    version = imp["model_version"]
    assert version == f"{models.pop()}:{batch.id}", imp
    assert imp["tasks"] == 5 and len(imp["task_ids"]) == 5 == len(set(imp["task_ids"])), imp
    prediction_reasons = {"request_failed", "unparseable_answer", "no_usable_value"}
    assert set(imp["skipped"]) <= prediction_reasons, imp
    assert imp["predictions"] + sum(imp["skipped"].values()) == 5, imp
    assert imp["tasks_missing_data"] == 0 and imp["values_dropped"] >= 0, imp

    # Every line is a task carrying its metadata and custom_id; predictions fit the config.
    listing = ls.ok("GET", f"/api/tasks/?project={project}&page_size=1000&fields=all")
    tasks = {t["id"]: t for t in listing["tasks"]}
    assert sorted(tasks) == sorted(imp["task_ids"]), listing
    by_custom_id = {}
    predicted = set()
    for tid in imp["task_ids"]:
        t = tasks[tid]
        cid = t["data"]["custom_id"]
        i = int(cid.removeprefix("cand-"))
        assert t["data"] == {**CANDIDATES[i], "custom_id": cid}, t["data"]
        by_custom_id[cid] = tid
        preds = t.get("predictions") or []
        assert len(preds) <= 1, preds
        for p in preds:
            assert p["model_version"] == version, p
            check_prediction_regions(p["result"])
            predicted.add(tid)
    assert sorted(by_custom_id) == [f"cand-{i}" for i in range(5)]
    assert len(predicted) == imp["predictions"], (predicted, imp)
    assert [tasks[t]["data"]["custom_id"] for t in imp["task_ids"]] == [line["custom_id"] for line in out], \
        "task_ids are in output-file order"
    # The ML backend answers an imported task from the batch's prediction, without the model.
    if predicted:
        tid = sorted(predicted)[0]
        (imported,) = tasks[tid]["predictions"]
        config = ls.ok("GET", f"/api/projects/{project}/")["label_config"]
        code, answer = call(f"http://127.0.0.1:{ml_port}/predict", "POST",
                            {"tasks": [{"id": tid, "data": tasks[tid]["data"]}], "label_config": config,
                             "project": f"{project}.0"})  # fmt: skip
        assert code == 200, (code, answer)
        regions = lambda result: [(r["from_name"], r["value"]) for r in result]  # noqa: E731
        assert regions(answer["results"][0]["result"]) == regions(imported["result"]), (answer, imported)
    # batchlab heard of the tasks through the TASKS_CREATED webhook.
    wait_counts("the imported tasks", tasks=5, annotations=0)

    # ---- 3. annotations, ground truth, accuracy --------------------------------------------
    t1, t2, t3 = (by_custom_id[f"cand-{i}"] for i in range(3))
    a1 = annotate(ls, t1, result(*GOLD1))
    a2 = annotate(ls, t2, result(*GOLD2))
    a3 = annotate(ls, t3, result("maybe", "good", "good", "Unclear."))
    for a in (a1, a2):
        patched = ls.ok("PATCH", f"/api/annotations/{a['id']}/", {"ground_truth": True})
        assert patched["ground_truth"] is True, patched
    st = wait_counts("three annotations, two of them ground truth",
                     tasks=5, annotations=3, valid=3, invalid=0, cancelled=0, ground_truth=2)  # fmt: skip
    assert st["id"] == project and st["title"] == TITLE and st["deleted"] is False, st
    assert st["milestones"] == [100] and st["milestones_reached"] == [] and st["exports"] == [], st

    code, acc = call(f"{api}/v1/label-studio/accuracy/{project}", "POST", {"predictions": [
        # t1: recommendation right (case), trajectory wrong, pedigree outside the config (wrong),
        # reasoning right (whitespace and case), one unknown field.
        {"task_id": t1, "prediction": {"recommendation": "YES", "trajectory_rating": "good",
                                       "pedigree_rating": "stellar",
                                       "reasoning": "  solid track   record at ANALYTICAL engines. ", "mood": "happy"}},
        # t2: both right.
        {"task_id": t2, "prediction": {"recommendation": "no", "trajectory_rating": "Weak"}},
        # t3 has no ground truth: skipped.
        {"task_id": t3, "prediction": {"recommendation": "maybe"}},
    ]})  # fmt: skip
    assert code == 200, (code, acc)
    # 6 comparisons, 4 correct: micro 4/6 (a macro average would give (1 + .5 + 0 + 1) / 4).
    assert acc["project_id"] == project
    assert acc["counts"] == {"predictions": 3, "tasks_compared": 2, "skipped_no_ground_truth": 1,
                             "comparisons": 6, "correct": 4}, acc  # fmt: skip
    assert acc["overall_accuracy"] == pytest.approx(4 / 6), acc
    assert acc["field_accuracy"] == pytest.approx(
        {"recommendation": 1.0, "trajectory_rating": 0.5, "pedigree_rating": 0.0, "reasoning": 1.0}), acc
    assert acc["unknown_fields"] == ["mood"] and acc["skipped_task_ids"] == [t3], acc
    fields = acc["fields"]
    assert set(fields) == {"recommendation", "trajectory_rating", "pedigree_rating", "reasoning"}, fields
    rec, traj, ped, why = (fields[k] for k in ("recommendation", "trajectory_rating", "pedigree_rating", "reasoning"))
    assert (rec["compared"], rec["correct"]) == (2, 2) and rec["accuracy"] == 1.0, rec
    # p_o = 1, p_e = .5*.5 + .5*.5 = .5: kappa 1.
    assert rec["kappa"] == pytest.approx(1.0) and rec["confusion"] == {"yes": {"yes": 1}, "no": {"no": 1}}, rec
    # p_o = .5; truth strong 1, weak 1; predicted good 1, weak 1; p_e = .5*0 + .5*.5 = .25.
    assert (traj["compared"], traj["correct"]) == (2, 1), traj
    assert traj["kappa"] == pytest.approx((0.5 - 0.25) / 0.75), traj
    assert traj["confusion"] == {"strong": {"good": 1}, "weak": {"weak": 1}}, traj
    assert (ped["compared"], ped["correct"]) == (1, 0) and ped["kappa"] == pytest.approx(0.0), ped
    assert ped["confusion"] == {"good": {"stellar": 1}}, ped
    assert (why["compared"], why["correct"]) == (1, 1) and why["accuracy"] == 1.0, why
    assert why.get("kappa") is None and why.get("confusion") is None, why

    # The predictions the import stored are scored per model version.
    code, stored = call(f"{api}/v1/label-studio/accuracy/{project}")
    assert code == 200, (code, stored)
    if imp["predictions"]:
        report = stored["model_versions"][version]
        want = stored_accuracy_by_hand({t: tasks[t]["predictions"][0]["result"] for t in predicted},
                                       {t1: GOLD1, t2: GOLD2})  # fmt: skip
        assert report["counts"] == want, (report, {t: tasks[t]["predictions"] for t in predicted})
    else:
        assert version not in stored["model_versions"], stored

    # Curated exports: ground truth only, as JSON and as fine-tuning lines.
    code, gt = call(f"{api}/v1/label-studio/export/{project}?ground_truth_only=true")
    assert code == 200 and sorted(t["id"] for t in gt) == sorted([t1, t2]), gt
    for t in gt:
        assert [a["ground_truth"] for a in t["annotations"]] == [True], t
    code, chat = call(f"{api}/v1/label-studio/export/{project}?format=jsonl-chat&ground_truth_only=true")
    assert code == 200, (code, chat)
    chat_lines = [json.loads(x) for x in chat.splitlines()]
    answers = sorted(json.loads(x["messages"][-1]["content"])["recommendation"] for x in chat_lines)
    assert answers == ["no", "yes"] and all(x["messages"][-1]["role"] == "assistant" for x in chat_lines), chat

    # ---- 4. one hundred valid annotations: one milestone export ------------------------------
    extra = [{"data": {"name": f"Candidate {i:03d}", "title": "Engineer", "company": f"Company {i % 7}"}}
             for i in range(100)]  # fmt: skip
    created = ls.ok("POST", f"/api/projects/{project}/import?return_task_ids=true", extra)
    more = sorted(created["task_ids"])
    assert created["task_count"] == 100 and len(more) == 100, created
    wait_counts("the 100 imported tasks", tasks=105)
    annotation_of = {}
    for i, tid in enumerate(more[:96]):  # 3 + 96 = 99 valid annotations
        a = annotate(ls, tid, result(RECOMMENDATIONS[i % 5], RATINGS[i % 5], RATINGS[(i + 2) % 5], f"note {i}"))
        annotation_of[tid] = a["id"]
    st = wait_counts("99 valid annotations", timeout=15, annotations=99, valid=99, invalid=0)
    assert st["exports"] == [] and st["milestones_reached"] == [], st

    # An annotation naming a label outside the config: flagged, never counted as valid.
    bad_task = more[96]
    bad = result("maybe_not", "strong", "good", "off the config")
    code, doc = ls.api("POST", f"/api/tasks/{bad_task}/annotations/", {"result": bad, "was_cancelled": False,
                                                                        "ground_truth": False, "lead_time": 1.0})
    if code == 201:
        bad_id = doc["id"]
    else:
        # Label Studio refused it: deliver what it would have sent straight to the webhook.
        assert code == 400, (code, doc)
        bad_id = 10_000_000
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime())
        hook = {
            "action": "ANNOTATION_CREATED",
            "annotation": {"id": bad_id, "result": bad, "was_cancelled": False, "ground_truth": False,
                           "created_at": stamp, "updated_at": stamp, "lead_time": 1.0, "task": bad_task,
                           "project": project, "completed_by": 1},
            "task": {"id": bad_task, "data": extra[96]["data"], "project": project},
            "project": {"id": project},
        }  # fmt: skip
        code, doc = call(f"{api}/v1/webhooks/label-studio", "POST", hook, {SECRET_HEADER: SECRET})
        assert code == 200 and doc["status"] == "accepted" and doc["action"] == "ANNOTATION_CREATED", (code, doc)
    st = wait_counts("the invalid annotation", annotations=100, valid=99, invalid=1)
    (flagged,) = st["invalid_annotations"]
    assert flagged["id"] == bad_id and flagged["task_id"] == bad_task, flagged
    assert "recommendation" in flagged["reason"] and "maybe_not" in flagged["reason"], flagged
    assert st["exports"] == [], "an invalid annotation must not reach the milestone"

    # The 100th valid annotation.
    tid = more[97]
    annotation_of[tid] = annotate(ls, tid, result("strong_yes", "exceptional", "exceptional", "hundredth"))["id"]
    # The first time the export is listed, it must be complete: a client polling the status
    # reads the file as soon as it shows up.
    first = poll(status, lambda s: s.get("exports"), "the milestone export", timeout=10, interval=0.005)
    if first["exports"][0]["tasks"] != 100 or not first["milestones_reached"]:
        problems.append(f"the milestone export was listed before it was written: {first['exports']}")
    st = poll(status, lambda s: s["exports"][0]["tasks"] != 0, "the milestone export's counts", timeout=10)
    (export,) = st["exports"]
    # The milestone is recorded with a file of its own, never rewritten, and its checksum; the
    # project's latest export file holds the same snapshot for now.
    path = training / f"project_{project}_milestone_100.json"
    latest = training / f"project_{project}_export.json"
    assert export["project_id"] == project and export["reason"] == "milestone" and export["milestone"] == 100, export
    assert Path(export["path"]) == path and (export["tasks"], export["annotations"]) == (100, 100), export
    assert export["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest(), export
    assert latest.read_bytes() == path.read_bytes()
    assert st["milestones_reached"] == [100], st
    written = json.loads(path.read_text())
    assert len(written) == 100 and all(len(t["annotations"]) == 1 for t in written), len(written)
    assert bad_task not in {t["id"] for t in written}, "invalid annotations are not training data"
    assert {t1, t2, t3} <= {t["id"] for t in written}
    # An accuracy record was kept at 100 valid annotations (BATCHLAB_CURATION__ACCURACY_EVERY=100).
    st = poll(status, lambda s: s.get("accuracy_history"), "an accuracy record", timeout=5)
    assert [h["checkpoint"] for h in st["accuracy_history"]] == [100], st["accuracy_history"]
    if imp["predictions"]:
        assert st["accuracy_history"][0]["model_versions"][version]["counts"] == want, st["accuracy_history"]

    # The 101st writes no second milestone export.
    tid = more[98]
    annotation_of[tid] = annotate(ls, tid, result("no", "average", "weak", "one more"))["id"]
    wait_counts("101 valid annotations", valid=101)
    time.sleep(1.5)  # a processor pass or two
    st = status()
    assert [(e["reason"], e["milestone"]) for e in st["exports"]] == [("milestone", 100)], st["exports"]
    assert len(json.loads(path.read_text())) == 100, "the milestone file was rewritten"

    # Invalid annotations come out only when asked for.
    code, with_invalid = call(f"{api}/v1/label-studio/export/{project}?include_invalid=true")
    assert code == 200, (code, with_invalid)
    (bad_out,) = [t for t in with_invalid if t["id"] == bad_task]
    assert bad_out["annotations"][0]["valid"] is False and bad_out["annotations"][0]["invalid_reason"], bad_out

    # ---- 5. Start Training --------------------------------------------------------------------
    backends = ls.ok("GET", f"/api/ml/?project={project}")
    backends = backends["results"] if isinstance(backends, dict) else backends
    assert [b["id"] for b in backends] == [setup["ml_backend_id"]], backends
    ls.ok("POST", f"/api/ml/{backends[0]['id']}/train", {})
    st = poll(status, lambda s: any(e["reason"] == "start_training" for e in s.get("exports", [])),
              "a start_training export", timeout=15)  # fmt: skip
    (trained,) = [e for e in st["exports"] if e["reason"] == "start_training"]
    trained_path = Path(trained["path"])
    assert trained["milestone"] is None and trained_path.parent == training, trained
    assert trained_path.name.startswith(f"project_{project}_start_training_"), trained
    assert trained["sha256"] == hashlib.sha256(trained_path.read_bytes()).hexdigest(), trained
    assert (trained["tasks"], trained["annotations"]) == (101, 101), trained
    assert len(json.loads(trained_path.read_text())) == 101
    assert len(json.loads(latest.read_text())) == 101, "the latest export file follows"
    assert len(json.loads(path.read_text())) == 100, "the milestone's snapshot stays as it was"
    assert [e["reason"] for e in st["exports"]] == ["milestone", "start_training"], st["exports"]
    _, metrics = http_get(f"http://127.0.0.1:{ml_port}/metrics")
    # The ML backend stored START_TRAINING itself (nothing relayed over HTTP, no secret added).
    assert re.search(r'batchlab_ml_webhook_events_total\{action="START_TRAINING",status="accepted"\} 1\b', metrics), \
        [m for m in metrics.splitlines() if "webhook_events" in m]

    # ---- 6. deletion --------------------------------------------------------------------------
    before = counts()
    code, doc = ls.api("DELETE", f"/api/annotations/{annotation_of[more[98]]}/")
    assert code in (200, 204), (code, doc)
    wait_counts("the deletion", timeout=5, annotations=before["annotations"] - 1, valid=before["valid"] - 1,
                invalid=1, ground_truth=2)  # fmt: skip

    assert not problems, problems
