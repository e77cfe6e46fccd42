"""A real Label Studio 1.23 for end-to-end tests, as a pytest plugin (conftest.py loads it
through `pytest_plugins`).

Label Studio lives in its own virtual environment, `<repo>/.venv-label-studio` (scripts/test.sh
creates it: `python3 -m venv .venv-label-studio && .venv-label-studio/bin/pip install
'label-studio>=1.23,<1.24'`); BATCHLAB_LABEL_STUDIO_BIN names another `label-studio` binary.
One instance serves the whole session: loopback only, SQLite in a temporary data directory, a
known admin and legacy token, local ML backend and webhook URLs allowed, nothing sent to the
network. Its log is attached to every failing test that used it.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from ports import free_port

REPO = Path(__file__).resolve().parents[2]
LABEL_STUDIO_BIN = Path(
    os.environ.get("BATCHLAB_LABEL_STUDIO_BIN") or REPO / ".venv-label-studio" / "bin" / "label-studio"
)
ADMIN_USER = "admin@vllm-batch.local"
ADMIN_PASSWORD = "vllm_batch_2024"
START_TIMEOUT = 120.0


def json_request(url: str, method: str = "GET", body=None, headers: dict | None = None, timeout: float = 60.0):
    """One JSON request; returns (status, parsed JSON body or text) for any HTTP answer."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    for k, v in (headers or {}).items():
        req.add_header(k, v)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, raw = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    text = raw.decode("utf-8", "replace")
    try:
        return status, json.loads(text) if text else None
    except ValueError:
        return status, text


class LabelStudio:
    """One running Label Studio and a small REST helper authenticated with its legacy token."""

    def __init__(self, root: Path):
        self.root = root
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.token = secrets.token_hex(20)
        self.name = "label-studio"
        self.log_path = root / "label-studio.log"
        self.proc: subprocess.Popen | None = None

    # -- process -----------------------------------------------------------------------------

    def start(self) -> None:
        if not LABEL_STUDIO_BIN.is_file():
            pytest.fail(
                f"{LABEL_STUDIO_BIN} does not exist: run scripts/test.sh (it creates .venv-label-studio) "
                "or set BATCHLAB_LABEL_STUDIO_BIN",
                pytrace=False,
            )
        env = {k: v for k, v in os.environ.items() if not k.startswith(("BATCHLAB_", "LABEL_STUDIO_"))}
        env.update(
            DJANGO_DB="sqlite",
            ML_BLOCK_LOCAL_IP="false",
            SSRF_PROTECTION_ENABLED="false",
            LATEST_VERSION_CHECK="false",
            COLLECT_ANALYTICS="false",
            SENTRY_DSN="",
            FRONTEND_SENTRY_DSN="",
        )
        cmd = [
            str(LABEL_STUDIO_BIN), "start", "--no-browser",
            "--internal-host", "127.0.0.1", "--port", str(self.port), "--host", self.url,
            "--data-dir", str(self.root / "data"),
            "--username", ADMIN_USER, "--password", ADMIN_PASSWORD,
            "--user-token", self.token, "--enable-legacy-api-token",
        ]  # fmt: skip
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            cmd, cwd=self.root, env=env, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + START_TIMEOUT
        last = "no answer"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.fail(f"exited with status {self.proc.returncode} before /health answered")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                    body = r.read().decode()
                    if json.loads(body).get("status") == "UP":
                        return
                    last = body[:200]
            except (OSError, ValueError) as e:
                last = repr(e)
            time.sleep(0.5)
        self.fail(f"/health not UP after {START_TIMEOUT:.0f}s (last: {last})")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            # label-studio may start children; its own session holds them all.
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        if hasattr(self, "_log"):
            self._log.close()

    def tail(self, limit: int = 12_000) -> str:
        try:
            data = self.log_path.read_bytes()
        except FileNotFoundError:
            return "<no log file>"
        return data[-limit:].decode("utf-8", "replace")

    def fail(self, why: str) -> None:
        pytest.fail(f"label-studio: {why}\n--- {self.log_path} ---\n{self.tail()}", pytrace=False)

    # -- REST --------------------------------------------------------------------------------

    def api(self, method: str, path: str, body=None, auth: str | None = None, timeout: float = 60.0):
        """Calls Label Studio; returns (status, parsed JSON or text). `auth` defaults to the legacy token."""
        return json_request(f"{self.url}{path}", method, body, {"Authorization": auth or f"Token {self.token}"}, timeout)

    def ok(self, method: str, path: str, body=None, **kw):
        """Like `api`, asserting a 2xx answer; returns the parsed body."""
        status, doc = self.api(method, path, body, **kw)
        assert 200 <= status < 300, f"{method} {path} -> {status}: {str(doc)[:500]}"
        return doc


@pytest.fixture(scope="session")
def label_studio(tmp_path_factory):
    """A running Label Studio for the whole test session (first start: 25–35 s of migrations)."""
    ls = LabelStudio(tmp_path_factory.mktemp("label-studio"))
    try:
        ls.start()
        yield ls
    finally:
        ls.stop()
