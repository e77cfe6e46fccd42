"""End-to-end tests of the Files and Batches API, driven with the official `openai` client
against the real batchlab-api and batchlab-worker binaries and the real default model.

Generation is kept short (max_tokens 8-24, temperature 0) so the file runs in a few minutes on
two cores.
"""

from __future__ import annotations

import collections
import json
import signal
import time
from typing import Literal

import openai
from openai.types import Completion
from openai.types.chat import ChatCompletion
from pydantic import BaseModel, ConfigDict, Field
import pytest

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
TERMINAL = {"completed", "failed", "cancelled", "expired"}
ORDER = ["validating", "in_progress", "finalizing", "completed"]

QUESTIONS = [
    "What is the capital of France?",
    "Name a primary color.",
    "What is 2 plus 2?",
    "Write one word that rhymes with cat.",
    "What animal says moo?",
    "What color is the sky on a clear day?",
    "Name a fruit that is yellow.",
    "What is the opposite of hot?",
]


# --------------------------------------------------------------------------------------------
# helpers


def chat_line(custom_id: str, prompt: str, max_tokens: int = 16, url: str = CHAT) -> dict:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": url,
        "body": {
            "model": "SmolLM2-135M-Instruct",
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens,
            "temperature": 0,
        },
    }


def completion_line(custom_id: str, prompt: str, max_tokens: int = 8) -> dict:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": COMPLETIONS,
        "body": {"model": "SmolLM2-135M-Instruct", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0},
    }


def chat_lines(n: int, prefix: str = "req", max_tokens: int = 24) -> list[dict]:
    return [chat_line(f"{prefix}-{i:03d}", QUESTIONS[i % len(QUESTIONS)], max_tokens) for i in range(n)]


def jsonl(lines: list) -> bytes:
    """JSONL bytes; dicts are serialised, str/bytes lines are taken verbatim."""
    out = []
    for line in lines:
        if isinstance(line, dict):
            out.append(json.dumps(line).encode())
        elif isinstance(line, str):
            out.append(line.encode())
        else:
            out.append(line)
    return b"".join(line + b"\n" for line in out)


def upload(client: openai.OpenAI, lines: list, name: str = "input.jsonl", purpose: str = "batch"):
    return client.files.create(file=(name, jsonl(lines), "application/jsonl"), purpose=purpose)


def create_batch(client: openai.OpenAI, lines: list, endpoint: str = CHAT, **kwargs):
    f = upload(client, lines)
    return client.batches.create(input_file_id=f.id, endpoint=endpoint, completion_window="24h", **kwargs)


def wait_until(client: openai.OpenAI, batch_id: str, pred, what: str, timeout: float = 300.0, poll: float = 0.1,
               history: list | None = None):
    """Polls the batch until `pred(batch)`; fails if it ends (or times out) first."""
    deadline = time.monotonic() + timeout
    b = None
    while time.monotonic() < deadline:
        b = client.batches.retrieve(batch_id)
        if history is not None:
            history.append((b.status, b.request_counts.completed if b.request_counts else None))
        if pred(b):
            return b
        if b.status in TERMINAL:
            pytest.fail(f"batch {batch_id} ended {b.status!r} while waiting for {what}: {b.model_dump_json()}")
        time.sleep(poll)
    pytest.fail(f"batch {batch_id}: no {what} after {timeout:.0f}s; last: {b.model_dump_json() if b else None}")


def wait_status(client: openai.OpenAI, batch_id: str, status: str, timeout: float = 300.0, history=None):
    return wait_until(client, batch_id, lambda b: b.status == status, f"status {status!r}", timeout, 0.2, history)


def read_jsonl(client: openai.OpenAI, file_id: str) -> list[dict]:
    raw = client.files.content(file_id).content
    text = raw.decode("utf-8")
    assert text == "" or text.endswith("\n"), "JSONL output must end with a newline"
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def assert_each_once(lines: list[dict], expected_ids) -> None:
    counts = collections.Counter(line["custom_id"] for line in lines)
    dupes = {k: v for k, v in counts.items() if v > 1}
    assert not dupes, f"custom_ids repeated in the output: {dupes}"
    assert set(counts) == set(expected_ids), (
        f"missing: {sorted(set(expected_ids) - set(counts))}; unexpected: {sorted(set(counts) - set(expected_ids))}"
    )


def assert_chat_output_line(line: dict, max_tokens: int) -> dict:
    """Checks one successful output line; returns its chat.completion body."""
    assert line["id"].startswith("batch_req_"), line
    assert line["error"] is None, line
    resp = line["response"]
    assert resp["status_code"] == 200, line
    assert isinstance(resp["request_id"], str) and resp["request_id"], line
    body = resp["body"]
    assert body["object"] == "chat.completion", body
    assert isinstance(body["model"], str) and body["model"], body
    (choice,) = body["choices"]
    assert choice["message"]["role"] == "assistant", choice
    content = choice["message"]["content"]
    assert isinstance(content, str) and content.strip(), f"empty assistant message: {line}"
    assert choice["finish_reason"] in ("stop", "length"), choice
    usage = body["usage"]
    assert usage["prompt_tokens"] > 0, usage
    assert 1 <= usage["completion_tokens"] <= max_tokens, usage
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"], usage
    if choice["finish_reason"] == "length":
        assert usage["completion_tokens"] == max_tokens, body
    return body


def assert_status_order(history: list) -> None:
    """The statuses seen while polling follow validating -> in_progress -> finalizing -> completed."""
    seen = [s for s, _ in history]
    ranks = [ORDER.index(s) for s in seen]  # ValueError on an unexpected status
    assert ranks == sorted(ranks), f"statuses went backwards: {seen}"
    done = [c for _, c in history if c is not None]
    assert done == sorted(done), f"request_counts.completed decreased: {done}"


# --------------------------------------------------------------------------------------------
# a. the happy path


def test_chat_batch_completes_with_real_model_output(running):
    client = running.client()
    lines = [chat_line(f"q-{i}", q, max_tokens=16) for i, q in enumerate(QUESTIONS[:4])]
    lines.append(chat_line("q-again", QUESTIONS[0], max_tokens=16))  # same prompt as q-0
    with_logprobs = chat_line("q-logprobs", QUESTIONS[1], max_tokens=16)
    with_logprobs["body"].update(logprobs=True, top_logprobs=3)
    lines.append(with_logprobs)
    data = jsonl(lines)
    f = client.files.create(file=("questions.jsonl", data, "application/jsonl"), purpose="batch")
    assert f.id.startswith("file-") and f.purpose == "batch" and f.bytes == len(data), f
    assert f.filename == "questions.jsonl"
    assert client.files.retrieve(f.id).id == f.id

    batch = client.batches.create(
        input_file_id=f.id, endpoint=CHAT, completion_window="24h", metadata={"suite": "e2e"}
    )
    assert batch.id.startswith("batch_") and batch.object == "batch", batch
    assert batch.status in ("validating", "in_progress"), batch
    assert batch.endpoint == CHAT and batch.input_file_id == f.id and batch.completion_window == "24h"
    assert batch.metadata == {"suite": "e2e"}
    assert batch.request_counts.total == 6, batch.request_counts
    assert batch.id in [b.id for b in client.batches.list(limit=10).data]

    history: list = []
    done = wait_status(client, batch.id, "completed", timeout=240, history=history)
    assert_status_order(history)
    counts = done.request_counts
    assert (counts.total, counts.completed, counts.failed) == (6, 6, 0), counts
    assert done.output_file_id and done.error_file_id is None, done
    assert done.errors is None or not done.errors.data, done.errors
    assert done.created_at <= done.in_progress_at <= done.finalizing_at <= done.completed_at, done
    assert done.failed_at is None and done.cancelled_at is None

    out_file = client.files.retrieve(done.output_file_id)
    assert out_file.purpose == "batch_output", out_file
    out = read_jsonl(client, done.output_file_id)
    assert out_file.bytes == len(client.files.content(done.output_file_id).content)
    assert len(out) == 6
    assert_each_once(out, [line["custom_id"] for line in lines])
    bodies = {line["custom_id"]: assert_chat_output_line(line, 16) for line in out}
    answers = {cid: b["choices"][0]["message"]["content"] for cid, b in bodies.items()}

    # The real model answered: greedy decoding gives the same prompt the same answer, and
    # different questions got different answers.
    assert answers["q-again"] == answers["q-0"], answers
    assert len({answers[f"q-{i}"] for i in range(4)}) >= 3, f"answers look canned: {answers}"

    # Log-probabilities, as the openai package parses them: greedy took each position's most
    # likely token, and the tokens spell the answer.
    parsed = ChatCompletion.model_validate(bodies["q-logprobs"])
    assert parsed.choices[0].message.content == answers["q-1"]
    content = parsed.choices[0].logprobs.content
    assert content and "".join(t.token for t in content) == answers["q-1"], content
    for t in content:
        assert t.logprob <= 0 and len(t.top_logprobs) == 3, t
        assert t.top_logprobs[0].token == t.token and t.top_logprobs[0].logprob == t.logprob, t
        assert bytes(t.bytes).decode("utf-8", "replace") == t.token
    assert bodies["q-0"]["choices"][0]["logprobs"] is None

    # Batch usage is the sum of the lines' usage.
    assert done.usage is not None
    assert done.usage.input_tokens == sum(b["usage"]["prompt_tokens"] for b in bodies.values()), done.usage
    assert done.usage.output_tokens == sum(b["usage"]["completion_tokens"] for b in bodies.values()), done.usage
    assert done.usage.total_tokens == done.usage.input_tokens + done.usage.output_tokens
    cached = sum(b["usage"]["prompt_tokens_details"]["cached_tokens"] for b in bodies.values())
    assert done.usage.input_tokens_details.cached_tokens == cached, done.usage


def test_completions_batch(running):
    client = running.client()
    prompts = {"c-0": "The capital of France is", "c-1": "One, two, three,", "c-2": "The sun rises in the"}
    lines = [completion_line(cid, p, 8) for cid, p in prompts.items()]
    lines[2]["body"]["logprobs"] = 2
    batch = create_batch(client, lines, endpoint=COMPLETIONS)
    assert batch.endpoint == COMPLETIONS
    done = wait_status(client, batch.id, "completed", timeout=180)
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (3, 3, 0)
    assert done.error_file_id is None
    out = read_jsonl(client, done.output_file_id)
    assert_each_once(out, prompts)
    for line in out:
        assert line["error"] is None and line["response"]["status_code"] == 200, line
        body = line["response"]["body"]
        assert body["object"] == "text_completion", body
        (choice,) = body["choices"]
        assert isinstance(choice["text"], str) and choice["text"].strip(), line
        assert 1 <= body["usage"]["completion_tokens"] <= 8, body
        if line["custom_id"] != "c-2":
            assert choice["logprobs"] is None, choice
    # Legacy completions' log-probabilities, as the openai package parses them.
    (c2,) = [Completion.model_validate(line["response"]["body"]) for line in out if line["custom_id"] == "c-2"]
    lp = c2.choices[0].logprobs
    assert "".join(lp.tokens) == c2.choices[0].text, lp
    assert len(lp.token_logprobs) == len(lp.tokens) == len(lp.top_logprobs) == len(lp.text_offset)
    assert all(len(alternatives) == 2 for alternatives in lp.top_logprobs), lp
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset), lp
    assert done.usage.output_tokens == sum(line["response"]["body"]["usage"]["completion_tokens"] for line in out)


EMBEDDINGS = "/v1/embeddings"
SENTENCES = {
    "e-cat": "The cat sat on the mat.",
    "e-kitten": "A kitten was sitting on the rug.",
    "e-revenue": "Quarterly revenue grew five percent in Europe.",
}


def test_embeddings_batch_matches_the_ml_backends_endpoint(running):
    """OpenAI's embeddings through both doors, with the official package: the ML backend's
    `/v1/embeddings` (the package asks for base64 by default and decodes it) and a batch for
    `/v1/embeddings` run by the worker. Both give the same unit vectors for the same text."""
    _, ml_port = running.start_ml_backend()
    ml = openai.OpenAI(base_url=f"http://127.0.0.1:{ml_port}/v1", api_key="unused", timeout=120, max_retries=0)
    texts = list(SENTENCES.values())
    direct = ml.embeddings.create(model="SmolLM2-135M-Instruct", input=texts)
    assert [d.index for d in direct.data] == [0, 1, 2], direct
    vectors = {cid: direct.data[i].embedding for i, cid in enumerate(SENTENCES)}
    for cid, v in vectors.items():
        assert len(v) == 576, (cid, len(v))
        assert abs(sum(x * x for x in v) - 1.0) < 1e-4, cid
    assert direct.usage.prompt_tokens == direct.usage.total_tokens > 0, direct.usage
    floats = ml.embeddings.create(model="SmolLM2-135M-Instruct", input=texts[0], encoding_format="float")
    assert floats.data[0].embedding == vectors["e-cat"], "float and base64 answers differ"

    def cos(a, b):
        return sum(x * y for x, y in zip(a, b))

    assert cos(vectors["e-cat"], vectors["e-kitten"]) > cos(vectors["e-cat"], vectors["e-revenue"])

    client = running.client()
    lines = [{"custom_id": cid, "method": "POST", "url": EMBEDDINGS, "body": {"model": "m", "input": text}}
             for cid, text in SENTENCES.items()]  # fmt: skip
    lines.append({"custom_id": "e-pair", "method": "POST", "url": EMBEDDINGS,
                  "body": {"input": [SENTENCES["e-cat"], SENTENCES["e-revenue"]], "encoding_format": "base64"}})  # fmt: skip
    lines.append({"custom_id": "e-empty", "method": "POST", "url": EMBEDDINGS, "body": {"input": []}})
    batch = create_batch(client, lines, endpoint=EMBEDDINGS)
    assert batch.endpoint == EMBEDDINGS
    done = wait_status(client, batch.id, "completed", timeout=180)
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (5, 4, 1)
    out = {line["custom_id"]: line for line in read_jsonl(client, done.output_file_id)}
    errors = {line["custom_id"]: line for line in read_jsonl(client, done.error_file_id)}
    assert sorted(out) == sorted([*SENTENCES, "e-pair"]) and list(errors) == ["e-empty"], (out, errors)
    assert "empty array" in errors["e-empty"]["error"]["message"], errors
    for cid in SENTENCES:
        body = out[cid]["response"]["body"]
        assert out[cid]["response"]["status_code"] == 200 and body["object"] == "list", body
        (item,) = body["data"]
        assert max(abs(a - b) for a, b in zip(item["embedding"], vectors[cid])) < 1e-6, cid
    pair = out["e-pair"]["response"]["body"]["data"]
    assert [d["index"] for d in pair] == [0, 1] and all(isinstance(d["embedding"], str) for d in pair), pair
    assert done.usage.output_tokens == 0
    assert done.usage.input_tokens == sum(line["response"]["body"]["usage"]["prompt_tokens"] for line in out.values())


class Review(BaseModel):
    """What a curation batch asks of each review: the schema comes from this pydantic model, and
    the outputs must validate against it."""

    model_config = ConfigDict(extra="forbid")
    sentiment: Literal["positive", "negative", "neutral"]
    stars: int = Field(ge=1, le=5)
    summary: str = Field(max_length=60)


REVIEWS = {
    "r-cold": "The food was cold and the waiter was rude. Never again.",
    "r-great": "Wonderful evening: the pasta was perfect and the staff so kind!",
    "r-ok": "It was fine. Nothing special, nothing bad.",
    "r-slow": "We waited an hour for a burger that tasted of cardboard.",
}


def test_structured_output_batch(running):
    """response_format json_schema (from a pydantic model), json_object and vLLM's guided_choice
    give outputs that parse, from the 135M model, greedy; a schema the engine cannot compile
    fails its own line with a 400 in the error file and the rest of the batch completes."""
    client = running.client()
    response_format = {
        "type": "json_schema",
        "json_schema": {"name": "review", "schema": Review.model_json_schema(), "strict": True},
    }
    lines = []
    for cid, text in REVIEWS.items():
        line = chat_line(cid, f"Review: {text}\nGive its sentiment, stars (1-5) and a short summary as JSON.", 80)
        line["body"]["response_format"] = response_format
        lines.append(line)
    as_object = chat_line("s-object", "Describe a cat as a JSON object with its name and age.", 96)
    as_object["body"]["response_format"] = {"type": "json_object"}
    choice = chat_line("s-choice", "Is the review 'the food was cold' positive or negative?", 8)
    choice["body"]["guided_choice"] = ["positive", "negative"]
    bad = chat_line("s-bad-schema", "Anything.", 8)
    bad["body"]["response_format"] = {
        "type": "json_schema",
        "json_schema": {"name": "bad", "schema": {"type": "object", "properties": {"a": {"type": "no-such-type"}}}},
    }
    lines += [as_object, choice, bad]

    batch = create_batch(client, lines)
    done = wait_status(client, batch.id, "completed", timeout=300)
    counts = done.request_counts
    assert (counts.total, counts.completed, counts.failed) == (7, 6, 1), counts
    out = read_jsonl(client, done.output_file_id)
    assert_each_once(out, [*REVIEWS, "s-object", "s-choice"])
    bodies = {line["custom_id"]: ChatCompletion.model_validate(line["response"]["body"]) for line in out}
    for cid in REVIEWS:
        answer = bodies[cid].choices[0]
        assert answer.finish_reason == "stop", answer
        review = Review.model_validate_json(answer.message.content)
        print(cid, review)
    assert isinstance(json.loads(bodies["s-object"].choices[0].message.content), dict), bodies["s-object"]
    assert bodies["s-choice"].choices[0].message.content in ("positive", "negative"), bodies["s-choice"]

    (err,) = read_jsonl(client, done.error_file_id)
    assert err["custom_id"] == "s-bad-schema" and err["response"]["status_code"] == 400, err
    error = err["response"]["body"]["error"]
    assert error["type"] == "invalid_request_error" and "constraint" in error["message"], error
    assert "panicked" not in error["message"] and "backtrace" not in error["message"].lower(), error


# --------------------------------------------------------------------------------------------
# b. bad lines inside a good file


def test_bad_lines_go_to_the_error_file(running):
    client = running.client()
    lines = [
        chat_line("good-1", QUESTIONS[0], 8),
        '{"custom_id": "broken", "method": "POST", "url": "/v1/chat/com',  # malformed JSON
        chat_line("good-2", QUESTIONS[1], 8),
        chat_line("wrong-url", QUESTIONS[2], 8, url="/v1/embeddings"),
        chat_line("good-3", QUESTIONS[3], 8),
    ]
    batch = create_batch(client, lines)
    done = wait_status(client, batch.id, "completed", timeout=180)
    counts = done.request_counts
    assert (counts.total, counts.completed, counts.failed) == (5, 3, 2), counts
    assert done.output_file_id and done.error_file_id, done

    out = read_jsonl(client, done.output_file_id)
    assert_each_once(out, ["good-1", "good-2", "good-3"])
    for line in out:
        assert_chat_output_line(line, 8)

    errors = read_jsonl(client, done.error_file_id)
    assert len(errors) == 2, errors
    by_id = {e["custom_id"]: e for e in errors}
    assert set(by_id) == {None, "wrong-url"}, errors
    for e in errors:
        assert e["id"].startswith("batch_req_"), e
        assert e["response"] is None, e
        assert isinstance(e["error"]["code"], str) and e["error"]["code"], e
        assert isinstance(e["error"]["message"], str) and e["error"]["message"], e
    assert "url" in by_id["wrong-url"]["error"]["message"].lower() or "url" in by_id["wrong-url"]["error"]["code"]
    assert "json" in (by_id[None]["error"]["code"] + by_id[None]["error"]["message"]).lower()


# --------------------------------------------------------------------------------------------
# c. nothing usable


def test_file_with_only_bad_lines_fails_the_batch(running):
    client = running.client()
    lines = [
        "this is not json",
        chat_line("wrong-url", QUESTIONS[0], 8, url=COMPLETIONS),
        {"method": "POST", "url": CHAT, "body": {"messages": [{"role": "user", "content": "hi"}]}},  # no custom_id
    ]
    batch = create_batch(client, lines)
    done = wait_status(client, batch.id, "failed", timeout=120)
    assert done.failed_at is not None and done.completed_at is None, done
    assert done.output_file_id is None, done
    assert done.errors is not None and done.errors.data, done
    by_line = {e.line: e for e in done.errors.data}
    assert set(by_line) == {1, 2, 3}, [e.model_dump() for e in done.errors.data]
    for e in done.errors.data:
        assert e.code and e.message, e
    assert done.request_counts.completed == 0


# --------------------------------------------------------------------------------------------
# d. a killed worker's batch is resumed by another


def test_killed_worker_batch_is_resumed_exactly_once(stack):
    stack.start_api()
    # Two lines in flight, so that the batch takes many engine turns however fast the CPU is.
    lease = {"BATCHLAB_WORKER__LEASE_SECONDS": "2", "BATCHLAB_WORKER__CONCURRENCY": "2"}
    first = stack.start_worker("worker-1", **lease)
    client = stack.client()
    lines = chat_lines(24, "kill", max_tokens=24)
    batch = create_batch(client, lines)

    mid = wait_until(client, batch.id, lambda b: b.request_counts and b.request_counts.completed >= 3,
                     "3 finished lines", timeout=240)
    first.kill(signal.SIGKILL)
    assert not first.alive()
    assert mid.request_counts.completed < 24, "the batch finished before the worker could be killed"
    stalled = client.batches.retrieve(batch.id)
    assert stalled.status == "in_progress", stalled
    assert stalled.request_counts.completed < 24

    second = stack.start_worker("worker-2", **lease)
    done = wait_status(client, batch.id, "completed", timeout=300)
    counts = done.request_counts
    assert (counts.total, counts.completed, counts.failed) == (24, 24, 0), counts
    out = read_jsonl(client, done.output_file_id)
    assert len(out) == 24
    assert_each_once(out, [line["custom_id"] for line in lines])
    for line in out:
        assert_chat_output_line(line, 24)
    assert batch.id in second.log_text(), "the second worker never ran the batch"
    assert done.usage.output_tokens == sum(line["response"]["body"]["usage"]["completion_tokens"] for line in out)


# --------------------------------------------------------------------------------------------
# e. PostgreSQL, two workers at once, one killed


def test_postgres_two_workers_one_killed(pg_stack):
    stack = pg_stack
    stack.start_api()
    # Two lines in flight per worker, so that a batch takes many engine turns however fast the
    # CPU is: both workers hold a batch at once, and batch one is still running when its worker
    # is killed (with the default, all its lines would run in one batch of the engine, which a
    # fast CPU finishes before the second worker has polled the queue).
    env = {"BATCHLAB_WORKER__LEASE_SECONDS": "2", "BATCHLAB_WORKER__CONCURRENCY": "2"}
    workers = {name: stack.start_worker(name, **env) for name in ("worker-a", "worker-b")}
    client = stack.client()
    n = 48
    inputs = {
        "one": chat_lines(n, "one", max_tokens=24),
        "two": chat_lines(n, "two", max_tokens=24),
    }
    batches = {k: create_batch(client, v) for k, v in inputs.items()}

    def owners() -> dict[str, str]:
        rows = stack.sql("SELECT id, COALESCE(lease_owner, '') FROM batches")
        return {bid: owner for bid, owner in rows}

    # Both workers pick up a batch of their own at the same time.
    deadline = time.monotonic() + 120
    while True:
        o = owners()
        b1 = client.batches.retrieve(batches["one"].id)
        leased = {o.get(batches["one"].id), o.get(batches["two"].id)}
        if leased == set(workers) and b1.request_counts.completed >= 2:
            break
        assert b1.status not in TERMINAL, f"batch one ended {b1.status} before both workers were busy: {o}"
        assert time.monotonic() < deadline, f"the two workers never ran the two batches at once: {o}, {b1}"
        time.sleep(0.1)

    victim_name = o[batches["one"].id]
    survivor_name = next(n for n in workers if n != victim_name)
    workers[victim_name].kill(signal.SIGKILL)
    assert b1.request_counts.completed < n, "batch one finished before its worker could be killed"

    for key, b in batches.items():
        done = wait_status(client, b.id, "completed", timeout=400)
        counts = done.request_counts
        assert (counts.total, counts.completed, counts.failed) == (n, n, 0), (key, counts)
        out = read_jsonl(client, done.output_file_id)
        assert len(out) == n, key
        assert_each_once(out, [line["custom_id"] for line in inputs[key]])
        for line in out:
            assert_chat_output_line(line, 24)

    # The survivor took over the killed worker's batch; both did work.
    assert batches["one"].id in workers[survivor_name].log_text(), "the survivor never resumed batch one"
    assert batches["one"].id in workers[victim_name].log_text()
    assert batches["two"].id in workers[survivor_name].log_text()
    rows = stack.sql(f"SELECT count(*), count(DISTINCT line_no) FROM batch_lines WHERE batch_id = '{batches['one'].id}'")
    assert rows == [[str(n), str(n)]], rows


# --------------------------------------------------------------------------------------------
# f. cancel


def test_cancel_keeps_finished_lines(stack):
    # Four lines in flight (the default follows the engine's batch and would start all 30
    # at once): the cancel must stop the lines not started yet.
    stack.start_api()
    stack.start_worker(BATCHLAB_WORKER__CONCURRENCY="4")
    client = stack.client()
    lines = chat_lines(30, "cancel", max_tokens=24)
    batch = create_batch(client, lines)
    wait_until(client, batch.id, lambda b: b.request_counts and b.request_counts.completed >= 2,
               "2 finished lines", timeout=240)
    cancelling = client.batches.cancel(batch.id)
    assert cancelling.id == batch.id
    assert cancelling.status in ("cancelling", "cancelled"), cancelling

    done = wait_status(client, batch.id, "cancelled", timeout=120)
    assert done.cancelling_at is not None and done.cancelled_at is not None, done
    assert done.completed_at is None, done
    counts = done.request_counts
    assert 2 <= counts.completed < 30, f"cancel did not stop the batch: {counts}"
    assert done.output_file_id, done
    out = read_jsonl(client, done.output_file_id)
    assert len(out) == counts.completed, (len(out), counts)
    ids = [line["custom_id"] for line in out]
    assert len(set(ids)) == len(ids), f"repeated custom_ids: {ids}"
    assert set(ids) <= {line["custom_id"] for line in lines}
    for line in out:
        assert_chat_output_line(line, 24)

    # Nothing runs after the cancel, and a finished batch cannot be cancelled again.
    time.sleep(2)
    later = client.batches.retrieve(batch.id)
    assert later.status == "cancelled" and later.request_counts == done.request_counts, later
    with pytest.raises((openai.BadRequestError, openai.ConflictError)):
        client.batches.cancel(batch.id)


# --------------------------------------------------------------------------------------------
# g. bad input through the client


def test_bad_requests_get_openai_errors(stack):
    stack.start_api(BATCHLAB_BATCH__MAX_INPUT_BYTES="1000")
    client = stack.client(max_retries=0)

    big = chat_lines(40, "big", 8)
    assert len(jsonl(big)) > 1000
    with pytest.raises(openai.APIStatusError) as err:
        upload(client, big)
    assert err.value.status_code == 413, err.value
    assert isinstance(err.value.body, dict) and err.value.body.get("message"), err.value.body

    with pytest.raises(openai.NotFoundError):
        client.files.retrieve("file-doesnotexist")
    with pytest.raises(openai.NotFoundError):
        client.files.content("file-doesnotexist")
    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve("batch_doesnotexist")
    with pytest.raises(openai.NotFoundError):
        client.batches.cancel("batch_doesnotexist")
    with pytest.raises(openai.NotFoundError):
        client.batches.create(input_file_id="file-doesnotexist", endpoint=CHAT, completion_window="24h")

    good = [chat_line("g-1", QUESTIONS[0], 8)]
    with pytest.raises(openai.BadRequestError) as err:
        upload(client, good, purpose="not-a-purpose")
    assert err.value.param == "purpose", err.value.body

    other = upload(client, good, purpose="user_data")
    with pytest.raises(openai.BadRequestError) as err:
        client.batches.create(input_file_id=other.id, endpoint=CHAT, completion_window="24h")
    assert err.value.param == "input_file_id", err.value.body

    f = upload(client, good)
    with pytest.raises(openai.BadRequestError) as err:
        client.batches.create(input_file_id=f.id, endpoint="/v1/responses", completion_window="24h")
    assert err.value.param == "endpoint", err.value.body
    with pytest.raises(openai.BadRequestError) as err:
        client.batches.create(input_file_id=f.id, endpoint=CHAT, completion_window="1h")
    assert err.value.param == "completion_window", err.value.body

    latin1 = '{"custom_id": "x", "method": "POST", "url": "/v1/chat/completions", "body": {"messages": ' \
             '[{"role": "user", "content": "café"}]}}'.encode("latin-1")
    with pytest.raises(openai.BadRequestError) as err:
        client.files.create(file=("latin1.jsonl", latin1 + b"\n", "application/jsonl"), purpose="batch")
    assert err.value.param == "file", err.value.body
    with pytest.raises(openai.BadRequestError) as err:
        client.files.create(file=("empty.jsonl", b"", "application/jsonl"), purpose="batch")
    assert err.value.param == "file", err.value.body

    # None of the rejected uploads was stored; the good ones were.
    stored = {x.id for x in client.files.list().data}
    assert stored == {other.id, f.id}, stored

    status, body = stack.health()
    assert status == 200 and json.loads(body)["status"] == "ok", body


# --------------------------------------------------------------------------------------------
# h. API key


def test_api_key_is_required(stack):
    stack.start_api(BATCHLAB_API__API_KEY="k")
    wrong = stack.client(api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.files.list()
    with pytest.raises(openai.AuthenticationError):
        upload(wrong, [chat_line("a", "hi", 8)])
    with pytest.raises(openai.AuthenticationError):
        wrong.batches.list()

    right = stack.client(api_key="k")
    f = upload(right, [chat_line("a", "hi", 8)])
    assert [x.id for x in right.files.list().data] == [f.id]
    b = right.batches.create(input_file_id=f.id, endpoint=CHAT, completion_window="24h")
    assert right.batches.retrieve(b.id).id == b.id
    with pytest.raises(openai.AuthenticationError):
        wrong.batches.retrieve(b.id)

    status, _ = stack.health()
    assert status == 200, "/health must not need the key"
