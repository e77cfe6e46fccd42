"""Driver for scripts/bench-large-batch.sh: one large batch through running batchlab-api and
batchlab-worker with the official `openai` client, while sampling both processes' memory.

Writes N short chat lines (max_tokens 1), measures the idle RSS baseline, uploads, creates the
batch, polls `batches.retrieve` each second (recording each new `request_counts.completed`),
samples VmRSS of both processes five times a second until the output has been downloaded and
checked, then prints a Markdown table. Exit status 1 on a functional failure only.
"""

import argparse
import json
import os
import sys
import threading
import time

from openai import OpenAI

MB = 1024 * 1024
TARGET_GROWTH_MB = 100
TARGET_UPDATES = 5
MILESTONES = (0.1, 0.25, 0.5, 0.75, 1.0)


def proc_kb(pid, field):
    """VmRSS / VmHWM of a process in bytes (None once it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class Sampler(threading.Thread):
    """VmRSS of each pid every `period` seconds; keeps the peak and when it happened."""

    def __init__(self, pids, period=0.2):
        super().__init__(daemon=True)
        self.pids, self.period = pids, period
        self.peak = {name: (0, 0.0) for name in pids}
        self.samples = 0
        self.phase = "idle"
        self.phase_peak = {}
        self._halt = threading.Event()

    def run(self):
        while not self._halt.is_set():
            self.sample()
            self._halt.wait(self.period)
        self.sample()

    def sample(self):
        now = time.time()
        for name, pid in self.pids.items():
            rss = proc_kb(pid, "VmRSS")
            if rss is None:
                continue
            if rss > self.peak[name][0]:
                self.peak[name] = (rss, now)
            key = (name, self.phase)
            self.phase_peak[key] = max(self.phase_peak.get(key, 0), rss)
        self.samples += 1

    def stop(self):
        self._halt.set()
        self.join()


def write_requests(path, n):
    topics = ["the sea", "a cat", "autumn", "bread", "a river", "the moon", "trains", "music"]
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({
                "custom_id": f"req-{i:06d}", "method": "POST", "url": "/v1/chat/completions",
                "body": {"model": "SmolLM2-135M-Instruct", "max_tokens": 1, "temperature": 0,
                         "messages": [{"role": "user", "content": f"One word about {topics[i % len(topics)]} ({i})."}]},
            }) + "\n")
    return os.path.getsize(path)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-url", required=True)
    ap.add_argument("--api-pid", type=int, required=True)
    ap.add_argument("--worker-pid", type=int, required=True)
    ap.add_argument("--lines", type=int, required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--timeout", type=float, default=14400)
    ap.add_argument("--profile", default="release")
    ap.add_argument("--database", default="SQLite")
    ap.add_argument("--commit", default="unknown")
    a = ap.parse_args()
    n = a.lines
    pids = {"api": a.api_pid, "worker": a.worker_pid}
    problems = []

    path = os.path.join(a.work, "requests.jsonl")
    input_bytes = write_requests(path, n)

    # Idle baseline: both up, the worker's model loaded, nothing uploaded yet. The median of a few
    # samples over two seconds, so that one allocation burst does not set it.
    samples = {name: [] for name in pids}
    for _ in range(10):
        for name, pid in pids.items():
            samples[name].append(proc_kb(pid, "VmRSS"))
        time.sleep(0.2)
    baseline = {name: sorted(v)[len(v) // 2] for name, v in samples.items()}
    hwm_before = {name: proc_kb(pid, "VmHWM") for name, pid in pids.items()}

    sampler = Sampler(pids)
    sampler.start()
    client = OpenAI(base_url=a.base_url, api_key="unused-unless-configured", max_retries=2, timeout=600)

    t0 = time.time()
    sampler.phase = "upload"
    with open(path, "rb") as f:
        upload = client.files.create(file=f, purpose="batch")
    t_uploaded = time.time()
    sampler.phase = "run"
    batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions",
                                  completion_window="24h")
    t_created = time.time()

    # (seconds since create, status, completed, failed, total) at each new `completed`.
    updates, last_completed, polls, poll_errors = [], None, 0, 0
    at_fraction = {}  # fraction of lines completed -> each process's peak RSS so far
    terminal = ("completed", "failed", "expired", "cancelled")
    while batch.status not in terminal:
        if time.time() - t_created > a.timeout:
            problems.append(f"batch still {batch.status} after {a.timeout:.0f} s")
            break
        time.sleep(1.0)
        try:
            batch = client.batches.retrieve(batch.id)
        except Exception as e:  # one failed poll is not the batch failing
            poll_errors += 1
            if poll_errors > 30:
                raise
            print(f"poll failed: {e}", file=sys.stderr)
            continue
        polls += 1
        rc = batch.request_counts
        done = rc.completed if rc else 0
        for frac in MILESTONES:
            if frac not in at_fraction and done >= frac * n:
                at_fraction[frac] = {name: sampler.peak[name][0] for name in pids}
        if done != last_completed:
            updates.append((time.time() - t_created, batch.status, done, rc.failed if rc else 0, rc.total if rc else 0))
            last_completed = done
            if len(updates) % 20 == 1:
                print(f"  {updates[-1][0]:7.1f} s  {batch.status:12s} completed {done}/{rc.total if rc else '?'}",
                      file=sys.stderr)
    t_done = time.time()
    rc = batch.request_counts

    # The output: exactly N lines, each custom_id once, all 200.
    sampler.phase = "download"
    out_lines, bad_status, ids = 0, 0, {}
    if batch.status == "completed" and batch.output_file_id:
        text = client.files.content(batch.output_file_id).text
        for line in text.splitlines():
            if not line.strip():
                continue
            out_lines += 1
            rec = json.loads(line)
            ids[rec.get("custom_id")] = ids.get(rec.get("custom_id"), 0) + 1
            if ((rec.get("response") or {}).get("status_code")) != 200:
                bad_status += 1
        del text
    error_lines = 0
    if batch.error_file_id:
        error_lines = sum(1 for l in client.files.content(batch.error_file_id).text.splitlines() if l.strip())
    t_downloaded = time.time()
    time.sleep(1.0)  # one more second of samples after the download
    sampler.stop()
    hwm_after = {name: proc_kb(pid, "VmHWM") for name, pid in pids.items()}

    if batch.status != "completed":
        problems.append(f"batch ended {batch.status}"
                        + (f": {batch.errors}" if getattr(batch, "errors", None) else ""))
    expected = {f"req-{i:06d}" for i in range(n)}
    missing = len(expected - ids.keys())
    dup = sum(1 for c in ids.values() if c > 1)
    extra = len(ids.keys() - expected)
    if batch.status == "completed":
        if out_lines != n:
            problems.append(f"output has {out_lines} lines, not {n}")
        if missing or dup or extra:
            problems.append(f"custom_ids: {missing} missing, {dup} duplicated, {extra} unknown")
        if bad_status:
            problems.append(f"{bad_status} output lines without status 200")
        if error_lines:
            problems.append(f"error file has {error_lines} lines")
        if rc and (rc.completed != n or rc.total != n or rc.failed):
            problems.append(f"request_counts at the end: {rc}")

    # Peak: the highest sampled RSS; VmHWM only when it rose past its pre-batch value (the
    # worker's pre-batch high-water mark includes loading the model).
    mem = {}
    for name in pids:
        peak, peak_at = sampler.peak[name]
        if hwm_after[name] and hwm_before[name] and hwm_after[name] > hwm_before[name]:
            peak = max(peak, hwm_after[name])
        mem[name] = (baseline[name], peak, peak - baseline[name])

    # Live counts: distinct, increasing `completed` values seen before the batch ended.
    live_values = [u[2] for u in updates if u[1] not in terminal]
    increasing = all(b > a_ for a_, b in zip(live_values, live_values[1:]))
    live = len(set(live_values) - {0})
    wall = t_done - t0
    run_s = t_done - t_created
    growth_ok = all(mem[name][2] < TARGET_GROWTH_MB * MB for name in pids)
    live_ok = live >= TARGET_UPDATES and increasing

    def f_mb(x):
        return f"{x / MB:.1f}"

    print(f"\n{n:,}-line batch, /v1/chat/completions, max_tokens 1; {a.profile} build, {a.database}, "
          f"commit {a.commit}, {os.cpu_count()} cores\n")
    print("| lines | status | wall time (s) | lines/s | request_counts updates seen | "
          "api RSS baseline / peak / growth (MB) | worker RSS baseline / peak / growth (MB) | "
          "< 100 MB growth | live counts |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    print(f"| {n:,} | {batch.status} | {wall:.1f} | {n / wall:.1f} | {live} |"
          f" {f_mb(mem['api'][0])} / {f_mb(mem['api'][1])} / **{f_mb(mem['api'][2])}** |"
          f" {f_mb(mem['worker'][0])} / {f_mb(mem['worker'][1])} / **{f_mb(mem['worker'][2])}** |"
          f" {'met' if growth_ok else 'MISSED'} | {'met' if live_ok else 'MISSED'} |")
    print()
    print(f"- Lines ask for max_tokens 1 (one generated token each), so this measures the batch "
          f"path's bookkeeping and memory (upload, queue, database, output file), not generation.")
    print(f"- Wall time: upload start to `completed` (upload {t_uploaded - t0:.1f} s of "
          f"{input_bytes / MB:.1f} MB, create {t_created - t_uploaded:.1f} s, run {run_s:.1f} s); "
          f"output download and check {t_downloaded - t_done:.1f} s.")
    mid = [u for u in updates if u[1] not in terminal]
    line = (f"- Live counts: `batches.retrieve` polled each second ({polls} polls); `completed` took "
            f"{live} distinct non-zero values before the end "
            f"({'strictly increasing' if increasing else 'NOT increasing'}; target ≥ {TARGET_UPDATES})")
    if mid:
        line += (f", first {mid[0][2]:,} at {mid[0][0]:.1f} s, last {mid[-1][2]:,}/{mid[-1][4]:,} "
                 f"at {mid[-1][0]:.1f} s")
    if rc:
        line += f"; final {rc.completed:,} completed, {rc.failed} failed of {rc.total:,}"
    print(line + ".")
    print(f"- Memory: VmRSS sampled every 0.2 s ({sampler.samples} samples) from the upload until 1 s after "
          f"the output was downloaded; baseline = median idle VmRSS with the worker's model loaded, "
          f"before the upload; peak also takes VmHWM when it rose during the run "
          f"(api VmHWM {f_mb(hwm_before['api'] or 0)} → {f_mb(hwm_after['api'] or 0)} MB, "
          f"worker {f_mb(hwm_before['worker'] or 0)} → {f_mb(hwm_after['worker'] or 0)} MB).")
    phases = ("upload", "run", "download")
    for name in pids:
        parts = [f"{p} {f_mb(sampler.phase_peak[(name, p)] - baseline[name])}"
                 for p in phases if (name, p) in sampler.phase_peak]
        curve = [f"{int(fr * 100)}% {f_mb(at_fraction[fr][name] - baseline[name])}"
                 for fr in MILESTONES if fr in at_fraction]
        print(f"  {name} peak growth (MB) by phase: {', '.join(parts)}; "
              f"peak so far when this share of lines had completed: {', '.join(curve)}")
    settings = []
    try:
        keys = {k["key"]: k for k in json.load(open(os.path.join(a.work, "config.json")))}
    except (OSError, ValueError):
        keys = {}
    for key in ("engine.max_batch", "worker.concurrency", "worker.prefix_cache_mb", "database.max_connections"):
        k = keys.get(key)
        if k:
            settings.append(f"{key} {os.environ.get(k['env'], k['default'])}")
    if settings:
        print(f"- Settings in effect: {', '.join(settings)} (worker.concurrency 0: 2 × max_batch); "
              f"the worker's growth includes its engine's working set (its prompt cache, KV caches of "
              f"the sequences in flight).")
    for name in pids:
        if 0.25 in at_fraction and 1.0 in at_fraction:
            early = at_fraction[0.25][name] - baseline[name]
            late = at_fraction[1.0][name] - baseline[name]
            if late > 8 * MB and late - early > 0.2 * late:
                print(f"- **{name} memory kept growing with lines**: {f_mb(early)} MB at 25% of lines, "
                      f"{f_mb(late)} MB at 100%.")
            else:
                print(f"- {name} memory levelled off: {f_mb(early)} MB growth at 25% of lines, "
                      f"{f_mb(late)} MB at 100%.")
    print(f"- Output: {out_lines:,} lines, {len(ids):,} distinct custom_ids ({missing} missing, "
          f"{dup} duplicated), {bad_status} without status 200; error file {error_lines} lines.")
    with open(os.path.join(a.work, "result.json"), "w") as f:
        json.dump({"updates": updates, "mem": mem}, f)
    if problems:
        print(f"\n**FAILED**: {'; '.join(problems)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
