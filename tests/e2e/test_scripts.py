"""scripts/start-services.sh and scripts/stop-services.sh, run as a user would (dev profile,
non-default ports, data, logs and PIDs in a temporary directory)."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import BIN_DIR, MODEL, REPO, LogSource, free_port, http_get, pid_alive

SERVICES = ("batchlab-api", "batchlab-ml-backend", "batchlab-worker")


def script_env(tmp: Path, api_port: int, ml_port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BATCHLAB_")}
    env.update(
        {
            "BATCHLAB_PROFILE": "dev",
            "BATCHLAB_LOG_DIR": str(tmp / "logs"),
            "BATCHLAB_RUN_DIR": str(tmp / "run"),
            "BATCHLAB_API__PORT": str(api_port),
            "BATCHLAB_ML_BACKEND__PORT": str(ml_port),
            "BATCHLAB_WORKER__PORT": str(free_port()),  # the worker's /health, which the script waits on
            "BATCHLAB_DATABASE__URL": f"sqlite://{tmp / 'data' / 'batchlab.db'}",
            "BATCHLAB_STORAGE__FILES_DIR": str(tmp / "data" / "files"),
            "BATCHLAB_ENGINE__MODEL_PATH": str(MODEL),
            "NO_COLOR": "1",
            # Every credential set, as a deployment beyond loopback must have them: the script's
            # health probe of the ML backend must send basic auth.
            "BATCHLAB_API__API_KEY": "script-api-key",
            "BATCHLAB_LABEL_STUDIO__WEBHOOK_SECRET": "script-webhook-secret",
            "BASIC_AUTH_USER": "ml-user",
            "BASIC_AUTH_PASS": "ml-pass",
        }
    )
    if os.environ.get("BATCHLAB_SKIP_BUILD"):
        env["BATCHLAB_SKIP_BUILD"] = os.environ["BATCHLAB_SKIP_BUILD"]
    return env


def run_script(name: str, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(REPO / "scripts" / name)],
        cwd="/",  # the scripts find the repository themselves
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_start_and_stop_services(tmp_path, log_sources):
    if not MODEL.is_file():
        pytest.fail(f"model {MODEL} is missing: run scripts/fetch-model.sh or set BATCHLAB_MODEL")
    api_port, ml_port = free_port(), free_port()
    env = script_env(tmp_path, api_port, ml_port)
    run_dir, log_dir = tmp_path / "run", tmp_path / "logs"
    for name in SERVICES:
        log_sources.append(LogSource(name, log_dir / f"{name}.log"))

    pids: dict[str, int] = {}
    try:
        start = run_script("start-services.sh", env, timeout=900)
        assert start.returncode == 0, f"start-services.sh failed:\n{start.stdout}\n{start.stderr}"
        assert f"http://127.0.0.1:{api_port}" in start.stdout, start.stdout
        assert "stop-services.sh" in start.stdout, start.stdout

        for name in SERVICES:
            pidfile = run_dir / f"{name}.pid"
            assert pidfile.is_file(), f"no {pidfile}"
            pids[name] = int(pidfile.read_text().strip())
            assert pid_alive(pids[name]), f"{name} (pid {pids[name]}) is not running"
            assert (log_dir / f"{name}.log").stat().st_size > 0, f"{name} logged nothing"
        assert "batchlab-worker ready" in (log_dir / "batchlab-worker.log").read_text()

        status, body = http_get(f"http://127.0.0.1:{api_port}/health")
        assert status == 200 and json.loads(body)["status"] == "ok", body
        status, _ = http_get(f"http://127.0.0.1:{ml_port}/health")
        assert status == 401, "the ML backend's basic auth is on"
        basic = base64.b64encode(b"ml-user:ml-pass").decode()
        status, body = http_get(f"http://127.0.0.1:{ml_port}/health", headers={"Authorization": f"Basic {basic}"})
        assert status == 200 and json.loads(body) == {"status": "UP", "model_class": "batchlab", "database": "ok"}, body
        for name in SERVICES:
            log = (log_dir / f"{name}.log").read_text()
            for secret in ("script-api-key", "script-webhook-secret", "ml-pass"):
                assert secret not in log, f"{name} logged a secret"
        # The services use the temporary data directory given through the environment.
        assert (tmp_path / "data" / "batchlab.db").is_file()

        # A second start refuses while the first copy runs, and leaves it running.
        again = run_script("start-services.sh", env, timeout=120)
        assert again.returncode != 0, again.stdout
        assert "already running" in again.stderr, again.stderr
        assert all(pid_alive(pid) for pid in pids.values())
    finally:
        stop = run_script("stop-services.sh", env, timeout=120)

    assert stop.returncode == 0, f"stop-services.sh failed:\n{stop.stdout}\n{stop.stderr}"
    deadline = time.monotonic() + 5
    while any(pid_alive(pid) for pid in pids.values()) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = [n for n, pid in pids.items() if pid_alive(pid)]
    for name in left:  # never leak a process, whatever the script did
        os.kill(pids[name], signal.SIGKILL)
    assert not left, f"still running after stop-services.sh: {left}\n{stop.stdout}\n{stop.stderr}"
    assert not list(run_dir.glob("*.pid")), "PID files left behind"
    # The HTTP services drained (requests and background work) rather than being killed.
    for name in ("batchlab-api", "batchlab-ml-backend"):
        assert "drained; exiting" in (log_dir / f"{name}.log").read_text(), f"{name} did not drain"
    with pytest.raises(OSError):
        http_get(f"http://127.0.0.1:{api_port}/health", timeout=1)

    # Stopping again, with nothing running, is a quiet success.
    quiet = run_script("stop-services.sh", env, timeout=60)
    assert quiet.returncode == 0 and quiet.stdout == "" and quiet.stderr == "", quiet


@pytest.mark.parametrize("service", SERVICES)
def test_every_binary_answers_help_and_refuses_bad_configuration(service: str, tmp_path: Path) -> None:
    exe = BIN_DIR / service
    helped = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=30)
    assert helped.returncode == 0, helped.stderr
    assert "--config <FILE>" in helped.stdout and service in helped.stdout

    bad = tmp_path / "bad.toml"
    bad.write_text("[api]\nprot = 1\n")
    refused = subprocess.run([exe, "--config", bad], capture_output=True, text=True, timeout=30,
                             env={k: v for k, v in os.environ.items() if not k.startswith("BATCHLAB_")})
    assert refused.returncode != 0
    assert "prot" in refused.stderr, refused.stderr


@pytest.mark.parametrize(
    ("service", "env", "named"),
    [
        ("batchlab-api", {"BATCHLAB_API__HOST": "0.0.0.0"}, "BATCHLAB_API__API_KEY"),
        ("batchlab-api", {"BATCHLAB_API__HOST": "0.0.0.0", "BATCHLAB_API__API_KEY": "k"},
         "BATCHLAB_LABEL_STUDIO__WEBHOOK_SECRET"),
        ("batchlab-ml-backend", {"BATCHLAB_ML_BACKEND__HOST": "0.0.0.0"}, "BASIC_AUTH_USER and BASIC_AUTH_PASS"),
        ("batchlab-ml-backend", {"BASIC_AUTH_USER": "ml"}, "BASIC_AUTH_PASS is not"),
        ("batchlab-ml-backend", {"BASIC_AUTH_PASS": "pw"}, "BASIC_AUTH_USER is not"),
    ],
)
def test_services_refuse_to_start_open(service: str, env: dict[str, str], named: str, tmp_path: Path) -> None:
    """Secure by default: beyond loopback without credentials, or with half of basic auth, a
    service refuses to start and names the missing setting (before it opens anything)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("BATCHLAB_") and not k.startswith("BASIC_AUTH")}
    clean.update(env, BATCHLAB_DATABASE__URL=f"sqlite://{tmp_path / 'db.sqlite'}",
                 BATCHLAB_ENGINE__MODEL_PATH=str(tmp_path / "no-model.gguf"))
    refused = subprocess.run([BIN_DIR / service], capture_output=True, text=True, timeout=30, env=clean,
                             stdin=subprocess.DEVNULL)
    assert refused.returncode != 0, refused.stdout
    assert "refusing to start" in refused.stderr and named in refused.stderr, refused.stderr
    assert not (tmp_path / "db.sqlite").exists(), "nothing is opened before the check"
