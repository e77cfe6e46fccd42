"""End-to-end fixtures: real batchlab binaries on a throwaway data directory.

Every test gets its own temporary directory holding its SQLite file (or its own PostgreSQL
database), its own blob directory and a free port; the services run as child processes whose
stderr goes to log files. At teardown every process is killed; when a test fails, the tail of
each service's log is attached to the failure report.

Environment:
  BATCHLAB_BIN_DIR            where the binaries are (default <repo>/target/debug)
  BATCHLAB_MODEL              the GGUF model (default <repo>/models/SmolLM2-135M-Instruct.Q4_1.gguf)
  BATCHLAB_TEST_POSTGRES_URL  admin URL used to create a database per PostgreSQL test
                              (default postgres://postgres@127.0.0.1:5432/postgres)
  BATCHLAB_REQUIRE_POSTGRES   "1": PostgreSQL tests fail (instead of skipping) when it is unreachable
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import openai
import pytest

from ports import free_port

REPO = Path(__file__).resolve().parents[2]
BIN_DIR = Path(os.environ.get("BATCHLAB_BIN_DIR") or REPO / "target" / "debug")
MODEL = Path(os.environ.get("BATCHLAB_MODEL") or REPO / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf")
POSTGRES_ADMIN_URL = os.environ.get("BATCHLAB_TEST_POSTGRES_URL") or "postgres://postgres@127.0.0.1:5432/postgres"
REQUIRE_POSTGRES = os.environ.get("BATCHLAB_REQUIRE_POSTGRES") == "1"

HEALTH_TIMEOUT = 60.0
WORKER_READY_LINE = "batchlab-worker ready"
LOG_TAIL_BYTES = 12_000

LOG_SOURCES = pytest.StashKey[list]()


# --------------------------------------------------------------------------------------------
# helpers


def service_env(extra: dict[str, str]) -> dict[str, str]:
    """The environment for a service: ours minus every BATCHLAB_* variable, plus `extra`.

    Settings the caller happens to export (BATCHLAB_DATABASE__URL, ...) must not leak into a
    test's services, so every BATCHLAB_* variable is dropped before `extra` is applied.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("BATCHLAB_")}
    env["NO_COLOR"] = "1"
    env.setdefault("RUST_LOG", "info,sqlx=warn")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def http_get(url: str, timeout: float = 2.0, headers: dict[str, str] | None = None) -> tuple[int, str]:
    """GET `url`; returns (status, body text) for any HTTP answer, raises on no answer."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=timeout) as r:
            return r.status, r.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode("utf-8", "replace")


def read_tail(path: Path, limit: int = LOG_TAIL_BYTES) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - limit))
            data = f.read()
    except FileNotFoundError:
        return "<no log file>"
    text = data.decode("utf-8", "replace")
    return ("...\n" if size > limit else "") + text


def pid_alive(pid: int) -> bool:
    """Whether `pid` is a live process (a zombie counts as dead)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


class LogSource:
    """A named log file whose tail goes into a failing test's report."""

    def __init__(self, name: str, path: Path):
        self.name = name
        self.log_path = path

    def tail(self) -> str:
        return read_tail(self.log_path)


class Service(LogSource):
    """One running batchlab binary."""

    def __init__(self, name: str, binary: str, cwd: Path, env: dict[str, str], log_path: Path):
        super().__init__(name, log_path)
        exe = BIN_DIR / binary
        if not exe.is_file():
            pytest.fail(f"{exe} does not exist: build with `cargo build --workspace --bins` or set BATCHLAB_BIN_DIR")
        self.binary = binary
        self.env = env
        self._log = open(log_path, "ab")
        self.proc = subprocess.Popen(
            [str(exe)],
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.alive():
            self.proc.send_signal(sig)
        if sig == signal.SIGKILL:
            self.proc.wait(timeout=10)

    def stop(self, grace: float = 5.0) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._log.close()

    def fail(self, why: str) -> None:
        pytest.fail(f"{self.name}: {why}\n--- {self.log_path} ---\n{self.tail()}", pytrace=False)

    def wait_health(self, url: str, expect: dict, timeout: float = HEALTH_TIMEOUT) -> dict:
        deadline = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < deadline:
            if not self.alive():
                self.fail(f"exited with status {self.proc.returncode} before {url} answered")
            try:
                status, body = http_get(url)
                last = f"HTTP {status}: {body[:200]}"
                if status == 200:
                    doc = json.loads(body)
                    if all(doc.get(k) == v for k, v in expect.items()):
                        return doc
            except (OSError, ValueError) as e:
                last = repr(e)
            time.sleep(0.2)
        self.fail(f"{url} not healthy after {timeout:.0f}s (last: {last})")

    def wait_log(self, needle: str, timeout: float = HEALTH_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if needle in self.log_text():
                return
            if not self.alive():
                self.fail(f"exited with status {self.proc.returncode} before logging {needle!r}")
            time.sleep(0.2)
        self.fail(f"did not log {needle!r} within {timeout:.0f}s")


class Stack:
    """A set of batchlab services sharing one database and one files directory."""

    def __init__(self, root: Path, database_url: str, logs: list):
        self.root = root
        self.database_url = database_url
        self.files_dir = root / "files"
        self.log_dir = root / "logs"
        self.files_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.services: list[Service] = []
        self._logs = logs
        self.api: Service | None = None
        self.api_port: int | None = None
        self.api_key: str | None = None

    @staticmethod
    def require_model() -> None:
        """Fails the test when the model a worker needs is missing."""
        if not MODEL.is_file():
            pytest.fail(f"model {MODEL} is missing: run scripts/fetch-model.sh or set BATCHLAB_MODEL")

    def base_env(self) -> dict[str, str]:
        return {
            "BATCHLAB_DATABASE__URL": self.database_url,
            "BATCHLAB_STORAGE__FILES_DIR": str(self.files_dir),
            "BATCHLAB_ENGINE__MODEL_PATH": str(MODEL),
        }

    def _start(self, name: str, binary: str, extra: dict, cwd: Path | None = None) -> Service:
        env = service_env({**self.base_env(), **extra})
        log = self.log_dir / f"{name}.log"
        svc = Service(name, binary, cwd or self.root, env, log)
        self.services.append(svc)
        self._logs.append(svc)
        return svc

    def start_api(self, **extra: str) -> Service:
        """Starts batchlab-api on a free port and waits for /health."""
        port = free_port()
        env = {"BATCHLAB_API__HOST": "127.0.0.1", "BATCHLAB_API__PORT": str(port), **extra}
        name = "batchlab-api" if self.api is None else f"batchlab-api-{len(self.services)}"
        svc = self._start(name, "batchlab-api", env)
        svc.wait_health(f"http://127.0.0.1:{port}/health", {"status": "ok"})
        self.api, self.api_port = svc, port
        self.api_key = extra.get("BATCHLAB_API__API_KEY")
        return svc

    def start_worker(self, name: str = "batchlab-worker", wait_ready: bool = True, cwd: Path | None = None,
                     **extra: str) -> Service:
        """Starts batchlab-worker (in `cwd`, the stack's directory by default) and waits until it
        logged that the model is loaded."""
        self.require_model()
        env = {
            "BATCHLAB_WORKER__POLL_INTERVAL_MS": "100",
            "BATCHLAB_WORKER__ID": name,
            "BATCHLAB_WORKER__PORT": str(free_port()),  # its /health and /metrics
            **extra,
        }
        svc = self._start(name, "batchlab-worker", env, cwd)
        if wait_ready:
            svc.wait_log(WORKER_READY_LINE)
        return svc

    def start_ml_backend(self, **extra: str) -> tuple[Service, int]:
        port = free_port()
        env = {"BATCHLAB_ML_BACKEND__HOST": "127.0.0.1", "BATCHLAB_ML_BACKEND__PORT": str(port), **extra}
        svc = self._start("batchlab-ml-backend", "batchlab-ml-backend", env)
        svc.wait_health(f"http://127.0.0.1:{port}/health", {"status": "UP"})
        return svc, port

    @property
    def base_url(self) -> str:
        assert self.api_port is not None, "start_api() first"
        return f"http://127.0.0.1:{self.api_port}/v1"

    def client(self, api_key: str | None = None, **kwargs) -> openai.OpenAI:
        key = api_key if api_key is not None else (self.api_key or "test")
        kwargs.setdefault("timeout", 60.0)
        kwargs.setdefault("max_retries", 1)
        return openai.OpenAI(base_url=self.base_url, api_key=key, **kwargs)

    def sql(self, query: str) -> list[list[str]]:
        """Runs `query` on this stack's PostgreSQL database; rows of '|'-separated columns."""
        assert self.database_url.startswith("postgres"), "sql() needs a PostgreSQL stack"
        r = psql(self.database_url, query)
        assert r.returncode == 0, f"{query!r} failed: {r.stderr}"
        return [line.split("|") for line in r.stdout.splitlines() if line]

    def health(self) -> tuple[int, str]:
        return http_get(f"http://127.0.0.1:{self.api_port}/health")

    def stop_all(self) -> None:
        for svc in reversed(self.services):
            try:
                svc.stop()
            except Exception:  # noqa: BLE001 - teardown must reach every process
                svc.proc.kill()


# --------------------------------------------------------------------------------------------
# PostgreSQL


def psql(url: str, sql: str, timeout: float = 30.0) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["psql", url, "-v", "ON_ERROR_STOP=1", "-X", "-q", "-A", "-t", "-c", sql],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PGCONNECT_TIMEOUT": "5"},
    )


def postgres_unavailable() -> str | None:
    """Why PostgreSQL cannot be used for tests, or None if it can."""
    if shutil.which("psql") is None:
        return "psql is not installed"
    try:
        r = psql(POSTGRES_ADMIN_URL, "SELECT 1", timeout=15)
    except subprocess.TimeoutExpired:
        return f"PostgreSQL at {POSTGRES_ADMIN_URL} did not answer"
    if r.returncode != 0 or r.stdout.strip() != "1":
        return f"PostgreSQL at {POSTGRES_ADMIN_URL} is unreachable: {r.stderr.strip()}"
    return None


def database_url(admin_url: str, name: str) -> str:
    parts = urllib.parse.urlsplit(admin_url)
    return urllib.parse.urlunsplit(parts._replace(path="/" + name))


# --------------------------------------------------------------------------------------------
# pytest hooks and fixtures


def pytest_configure(config):
    config.addinivalue_line("markers", "fault: the fault suite (scripts/fault-suite.sh), kept out of the e2e run")


def pytest_terminal_summary(terminalreporter):
    """The fault suite's table: each fault, its outcome, its time and what it measured."""
    rows = []
    for outcome in ("passed", "failed", "error"):
        for report in terminalreporter.stats.get(outcome, []):
            if getattr(report, "when", None) != "call" and outcome != "error":
                continue
            if "test_faults.py" not in getattr(report, "nodeid", ""):
                continue
            measured = dict(getattr(report, "user_properties", [])).get("fault_outcome", "")
            if outcome != "passed" and not measured:
                crash = getattr(getattr(report, "longrepr", None), "reprcrash", None)
                measured = (crash.message if crash else report.longreprtext or "").splitlines()[0][:200]
            rows.append((report.nodeid.split("::")[-1], outcome.upper(), f"{report.duration:.1f}s", measured))
    if not rows:
        return
    terminalreporter.section("fault suite")
    width = max(len(r[0]) for r in rows)
    terminalreporter.write_line(f"{'fault':<{width}}  {'outcome':<7}  {'time':>7}  measured")
    for name, outcome, took, measured in rows:
        terminalreporter.write_line(f"{name:<{width}}  {outcome:<7}  {took:>7}  {measured}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for src in item.stash.get(LOG_SOURCES, []):
            report.sections.append((f"{src.name} log ({src.log_path})", src.tail()))


@pytest.fixture
def log_sources(request) -> list:
    """Log files to attach to this test's report if it fails."""
    sources: list = []
    request.node.stash[LOG_SOURCES] = sources
    return sources


@pytest.fixture
def stack(tmp_path, log_sources):
    """A not-yet-started stack on its own SQLite file and files directory."""
    s = Stack(tmp_path, f"sqlite://{tmp_path / 'batchlab.db'}", log_sources)
    yield s
    s.stop_all()


@pytest.fixture
def running(stack):
    """batchlab-api and one batchlab-worker on SQLite, started and ready."""
    stack.start_api()
    stack.start_worker()
    return stack


@pytest.fixture
def pg_stack(tmp_path, log_sources):
    """A not-yet-started stack on a fresh PostgreSQL database, dropped afterwards."""
    why = postgres_unavailable()
    if why:
        if REQUIRE_POSTGRES:
            pytest.fail(f"BATCHLAB_REQUIRE_POSTGRES=1 but {why}")
        pytest.skip(why)
    name = f"batchlab_e2e_{uuid.uuid4().hex[:12]}"
    r = psql(POSTGRES_ADMIN_URL, f'CREATE DATABASE "{name}"')
    assert r.returncode == 0, f"CREATE DATABASE {name} failed: {r.stderr}"
    s = None
    try:
        s = Stack(tmp_path, database_url(POSTGRES_ADMIN_URL, name), log_sources)
        yield s
    finally:
        if s is not None:
            s.stop_all()
        r = psql(POSTGRES_ADMIN_URL, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        if r.returncode != 0:
            print(f"warning: could not drop test database {name}: {r.stderr}")


# A real Label Studio: the session-scoped fixture `label_studio` (see label_studio.py).
from label_studio import label_studio  # noqa: E402,F401
