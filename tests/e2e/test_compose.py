"""docker/ checked without a Docker engine: the compose file, the Dockerfiles, Prometheus and
Grafana provisioning, against the Compose specification, the real binaries' configuration and
the real services' /metrics.

- `docker/docker-compose.yml` validates against the Compose specification's JSON schema
  (`docker/schema/compose-spec.json`: compose-spec/compose-spec, `schema/compose-spec.json` at
  commit 170098b) once `${VAR}` references are interpolated from `docker/.env.example` with
  dummy secrets; with any secret blank or unset, interpolation fails naming it (the subset of
  compose interpolation implemented here: `${VAR}`, `${VAR:-default}`, `${VAR-default}`,
  `${VAR:?message}`, `${VAR?message}`, `$VAR`, `$$`).
- Every file the compose file and the Dockerfiles reference exists (build contexts,
  dockerfiles, bind mounts, COPY sources, provisioning files), and .dockerignore excludes local
  output but nothing a Dockerfile copies.
- Every BATCHLAB_* variable (and every other variable a batchlab container gets) is a real
  setting of `batchlab-api config --json`; other images' variables are an explicit allow-list.
- Ports agree with the configuration's defaults: published ports, health checks, the setup
  command's URLs, Prometheus targets.
- Prometheus's config and Grafana's provisioning parse and agree (datasource uid, mounted
  dashboard), every panel has a query, and every metric those queries name appears in a LIVE
  /metrics of the real batchlab-api, batchlab-worker and batchlab-ml-backend after one small
  batch, a burst of recorded Label Studio webhooks and one /predict.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shlex
import sqlite3
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from functools import lru_cache
from pathlib import Path

import jsonschema
import pytest
import yaml

from conftest import BIN_DIR, REPO, free_port, service_env

DOCKER = REPO / "docker"
COMPOSE_FILE = DOCKER / "docker-compose.yml"
ENV_EXAMPLE = DOCKER / ".env.example"
SCHEMA = DOCKER / "schema" / "compose-spec.json"
PROMETHEUS_CONFIG = DOCKER / "prometheus" / "prometheus.yml"
DOCKERIGNORE = REPO / ".dockerignore"
FIXTURES = REPO / "tests" / "fixtures" / "label-studio-1.23"

# The images built from this repository, and which binary each service runs is its command's
# first word.
BATCHLAB_IMAGES = {"batchlab:local", "batchlab-cuda:local"}
# Only these are published on the host.
PUBLISHED = {"label-studio", "api", "grafana"}
# Compose-only knobs named BATCHLAB_* that are not batchlab settings (they never reach a
# container's environment).
COMPOSE_ONLY_VARIABLES = {"BATCHLAB_BIND"}
# Which configuration key holds each binary's port.
PORT_KEYS = {"batchlab-api": "api.port", "batchlab-worker": "worker.port", "batchlab-ml-backend": "ml_backend.port"}
# The variables other images read, per service: the allow-list for environments batchlab does
# not define.
OTHER_IMAGES_ENV = {
    "postgres": {"POSTGRES_USER", "POSTGRES_DB", "POSTGRES_PASSWORD", "LABEL_STUDIO_DB_PASSWORD"},
    "label-studio": {
        "DJANGO_DB", "POSTGRE_NAME", "POSTGRE_USER", "POSTGRE_PASSWORD", "POSTGRE_HOST", "POSTGRE_PORT",
        "LABEL_STUDIO_USERNAME", "LABEL_STUDIO_PASSWORD", "LABEL_STUDIO_USER_TOKEN",
        "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN", "LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK",
        "ML_BLOCK_LOCAL_IP", "SSRF_PROTECTION_ENABLED", "LATEST_VERSION_CHECK", "COLLECT_ANALYTICS",
        "SENTRY_DSN", "FRONTEND_SENTRY_DSN",
    },
    "prometheus": set(),
    "grafana": {
        "GF_SECURITY_ADMIN_USER", "GF_SECURITY_ADMIN_PASSWORD", "GF_USERS_ALLOW_SIGN_UP",
        "GF_ANALYTICS_REPORTING_ENABLED", "GF_ANALYTICS_CHECK_FOR_UPDATES",
        "GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH",
    },
}  # fmt: skip
# Names that hold secrets: never a default, never a literal value, blank in .env.example.
SECRET_NAME = re.compile(r"^(?!LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN$).*(PASSWORD|_PASS$|SECRET|TOKEN|API_KEY)")
# The metrics the dashboard must chart (issue 21): each appears in some panel's query.
DASHBOARD_METRICS = {
    "batchlab_batches", "batchlab_batch_lines_total", "batchlab_batch_queue_depth",
    "batchlab_engine_generated_tokens_total", "batchlab_engine_time_to_first_token_seconds",
    "batchlab_ml_predict_seconds", "batchlab_webhook_events_total", "batchlab_webhook_event_lag_seconds",
    "batchlab_project_annotations", "batchlab_project_ground_truth", "batchlab_project_accuracy",
    "batchlab_project_milestones_reached",
}  # fmt: skip
# Series Prometheus makes itself (not in any /metrics).
PROMETHEUS_SYNTHETIC = {"up"}
# Labels Prometheus attaches to every scraped series, and the one docker/prometheus/prometheus.yml
# makes of batchlab's own `instance` label.
TARGET_LABELS = {"job", "instance"}
RELABELLED = {"instance": "ls_instance"}


# --------------------------------------------------------------------------------------------
# compose interpolation (the subset the compose file uses) and .env files


class InterpolationError(ValueError):
    """What `docker compose` would refuse to start with."""


_BRACED = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)(?:(:-|-|:\?|\?)(.*))?", re.S)
_BARE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def interpolate_str(text: str, env: dict[str, str], used: set[str] | None = None) -> str:
    """`text` with its `${...}` references replaced as compose does; raises InterpolationError
    for a required variable that is blank or unset (the message names it) and for any syntax
    outside the subset (so nothing is silently left uninterpolated)."""
    out: list[str] = []
    i = 0
    while i < len(text):
        c = text[i]
        if c != "$":
            out.append(c)
            i += 1
            continue
        nxt = text[i + 1 : i + 2]
        if nxt == "$":
            out.append("$")
            i += 2
            continue
        if nxt == "{":
            end = text.find("}", i + 2)
            if end < 0:
                raise InterpolationError(f"unterminated ${{ in {text!r}")
            m = _BRACED.fullmatch(text[i + 2 : end])
            if not m:
                raise InterpolationError(f"invalid interpolation format ${{{text[i + 2:end]}}} in {text!r}")
            name, op, arg = m.groups()
            if arg and "$" in arg:
                raise InterpolationError(f"nested interpolation in {text!r} is outside the subset this test implements")
            if used is not None:
                used.add(name)
            value = env.get(name)
            if op == ":-":
                value = value if value else arg
            elif op == "-":
                value = value if value is not None else arg
            elif op == ":?" and not value:
                raise InterpolationError(f"required variable {name} is missing a value: {arg}")
            elif op == "?" and value is None:
                raise InterpolationError(f"required variable {name} is missing a value: {arg}")
            out.append(value or "")
            i = end + 1
            continue
        m = _BARE.match(text, i + 1)
        if not m:
            raise InterpolationError(f"invalid interpolation: a lone $ in {text!r} (write $$)")
        if used is not None:
            used.add(m.group(0))
        out.append(env.get(m.group(0)) or "")
        i = m.end()
    return "".join(out)


def interpolate(node, env: dict[str, str], used: set[str] | None = None):
    """The compose document with every string value interpolated (keys are not, as in compose)."""
    if isinstance(node, dict):
        return {k: interpolate(v, env, used) for k, v in node.items()}
    if isinstance(node, list):
        return [interpolate(v, env, used) for v in node]
    if isinstance(node, str):
        return interpolate_str(node, env, used)
    return node


def parse_dotenv(path: Path) -> dict[str, str]:
    """KEY=VALUE lines of a compose .env file (comments and blank lines skipped)."""
    env: dict[str, str] = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key), f"{path}:{n}: not KEY=VALUE: {line!r}"
        assert key not in env, f"{path}:{n}: {key} set twice"
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        env[key] = value
    return env


def strings(node):
    """Every string value in a parsed YAML/JSON document."""
    if isinstance(node, dict):
        for v in node.values():
            yield from strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from strings(v)
    elif isinstance(node, str):
        yield node


def references(text: str) -> list[tuple[str, str | None, str | None]]:
    """The (name, operator, argument) of each `${...}` in `text`."""
    return [m.groups() for m in re.finditer(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:-|-|:\?|\?)([^}]*))?\}", text.replace("$$", ""))]


def dummy_secret(name: str) -> str:
    """A hex value standing in for a secret (safe inside URLs, as .env.example asks)."""
    return hashlib.sha256(name.encode()).hexdigest()[:32]


@lru_cache(maxsize=None)
def raw_compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


@lru_cache(maxsize=None)
def env_example() -> dict[str, str]:
    return parse_dotenv(ENV_EXAMPLE)


def filled_env() -> dict[str, str]:
    """.env.example with every blank value filled with a dummy secret."""
    return {k: v if v else dummy_secret(k) for k, v in env_example().items()}


@lru_cache(maxsize=None)
def _compose_json() -> str:
    return json.dumps(interpolate(raw_compose(), filled_env()))


def compose() -> dict:
    """The compose document as `docker compose` would see it with a filled-in docker/.env."""
    return json.loads(_compose_json())


def required_variables() -> set[str]:
    return {name for s in strings(raw_compose()) for name, op, _ in references(s) if op in (":?", "?")}


def services() -> dict[str, dict]:
    return compose()["services"]


def batchlab_services(include_profiles: bool = True) -> dict[str, dict]:
    return {
        name: svc
        for name, svc in services().items()
        if svc.get("image") in BATCHLAB_IMAGES and (include_profiles or not svc.get("profiles"))
    }


def binary_of(svc: dict) -> str:
    command = svc.get("command")
    command = shlex.split(command) if isinstance(command, str) else command
    assert command, f"a batchlab service without a command: {svc}"
    return command[0]


def environment(svc: dict) -> dict[str, str]:
    env = svc.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def bind_mounts(svc: dict) -> list[tuple[Path, str]]:
    """(host path, container path) of each bind mount of `svc` (relative to docker/)."""
    out = []
    for vol in svc.get("volumes") or []:
        if isinstance(vol, str):
            parts = vol.split(":")
            source, target = parts[0], parts[1] if len(parts) > 1 else parts[0]
            if source.startswith((".", "/", "~")):
                out.append(((DOCKER / source).resolve(), target))
        elif vol.get("type") == "bind":
            out.append(((DOCKER / vol["source"]).resolve(), vol["target"]))
    return out


def host_path(svc: dict, container_path: str) -> Path | None:
    """The host file behind `container_path` in `svc`, through its bind mounts."""
    for source, target in bind_mounts(svc):
        target = target.rstrip("/")
        if container_path == target:
            return source
        if container_path.startswith(target + "/"):
            return source / container_path[len(target) + 1 :]
    return None


def published(svc: dict) -> list[dict]:
    """The service's ports in long form: {host_ip, published, target}."""
    out = []
    for p in svc.get("ports") or []:
        if isinstance(p, dict):
            out.append({"host_ip": p.get("host_ip", ""), "published": str(p.get("published", "")), "target": int(p["target"])})
            continue
        parts = str(p).split(":")
        if len(parts) == 3:
            out.append({"host_ip": parts[0], "published": parts[1], "target": int(parts[2])})
        elif len(parts) == 2:
            out.append({"host_ip": "", "published": parts[0], "target": int(parts[1])})
        else:
            out.append({"host_ip": "", "published": "", "target": int(parts[0])})
    return out


# --------------------------------------------------------------------------------------------
# Dockerfiles and .dockerignore


def dockerfiles() -> dict[Path, Path]:
    """Each Dockerfile a service builds, with its build context."""
    out = {}
    for svc in services().values():
        build = svc.get("build")
        if build:
            context = (DOCKER / (build if isinstance(build, str) else build.get("context", "."))).resolve()
            dockerfile = context / (build.get("dockerfile", "Dockerfile") if isinstance(build, dict) else "Dockerfile")
            out[dockerfile.resolve()] = context
    return out


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    out, current = [], ""
    for line in dockerfile.read_text().splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        current += " " + stripped.rstrip("\\").strip() if current else stripped.rstrip("\\").strip()
        if not stripped.endswith("\\"):
            word, _, rest = current.partition(" ")
            out.append((word.upper(), rest.strip()))
            current = ""
    return out


def copy_sources(dockerfile: Path) -> list[str]:
    """The build-context sources of COPY/ADD instructions (not those copied from a stage)."""
    out = []
    for word, args in instructions(dockerfile):
        if word not in ("COPY", "ADD"):
            continue
        parts = [p for p in shlex.split(args)]
        if any(p.startswith("--from") for p in parts):
            continue
        parts = [p for p in parts if not p.startswith("--")]
        out.extend(parts[:-1])
    return out


def dockerfile_env(dockerfile: Path) -> dict[str, str]:
    env = {}
    for word, args in instructions(dockerfile):
        if word == "ENV":
            for item in shlex.split(args):
                key, _, value = item.partition("=")
                env[key] = value
    return env


def dockerignore_patterns() -> list[str]:
    return [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]


def _glob_regex(pattern: str) -> re.Pattern:
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
        elif pattern.startswith("**", i):
            out += ".*"
            i += 2
        elif pattern[i] == "*":
            out += "[^/]*"
            i += 1
        elif pattern[i] == "?":
            out += "[^/]"
            i += 1
        else:
            out += re.escape(pattern[i])
            i += 1
    return re.compile(out)


def dockerignored(path: str) -> bool:
    """Whether .dockerignore keeps `path` (relative to the repository root) out of the build
    context: a pattern matching the path or one of its parent folders; the last match wins
    (`!` re-includes), as Docker does."""
    parts = path.strip("/").split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for pattern in dockerignore_patterns():
        negate = pattern.startswith("!")
        rx = _glob_regex(pattern.lstrip("!").strip("/"))
        if any(rx.fullmatch(c) for c in candidates):
            excluded = not negate
    return excluded


# --------------------------------------------------------------------------------------------
# batchlab's configuration reference


@pytest.fixture(scope="module")
def config_reference() -> list[dict]:
    """`batchlab-api config --json`: every setting with its variable and default."""
    exe = BIN_DIR / "batchlab-api"
    if not exe.is_file():
        pytest.fail(f"{exe} does not exist: build with `cargo build --workspace --bins` or set BATCHLAB_BIN_DIR")
    r = subprocess.run([str(exe), "config", "--json"], env=service_env({}), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f"batchlab-api config --json failed ({r.returncode}): {r.stderr[-2000:]}"
    ref = json.loads(r.stdout)
    assert isinstance(ref, list) and all("env" in s for s in ref), r.stdout[:2000]
    return ref


def default_of(ref: list[dict], key: str):
    (setting,) = [s for s in ref if s.get("key") == key and s["env"].startswith("BATCHLAB_")]
    return setting["default"]


def port_of(ref: list[dict], svc: dict) -> int:
    """The port a batchlab service listens on: its environment's override, else the default."""
    binary = binary_of(svc)
    key = PORT_KEYS[binary]
    env_name = "BATCHLAB_" + key.replace(".", "__").upper()
    return int(environment(svc).get(env_name) or default_of(ref, key))


# --------------------------------------------------------------------------------------------
# 1. docker/.env.example and interpolation


def test_env_example_documents_exactly_the_variables_compose_reads():
    used: set[str] = set()
    interpolate(raw_compose(), filled_env(), used)
    documented = set(env_example())
    assert not used - documented, f"compose reads variables docker/.env.example does not document: {sorted(used - documented)}"
    assert not documented - used, f"docker/.env.example documents variables compose never reads: {sorted(documented - used)}"
    # Each variable sits under a comment saying what it is (or beside another that does).
    lines = ENV_EXAMPLE.read_text().splitlines()
    for i, line in enumerate(lines):
        if re.match(r"[A-Za-z_][A-Za-z0-9_]*=", line):
            assert i > 0 and (lines[i - 1].startswith("#") or re.match(r"[A-Za-z_]\w*=", lines[i - 1])), (
                f"docker/.env.example line {i + 1} ({line.split('=')[0]}) has no comment above it"
            )


def test_secrets_are_blank_in_env_example_and_required_by_compose():
    required = required_variables()
    assert required, "compose requires no variable: secrets would be started blank"
    example = env_example()
    for name in sorted(required):
        assert example.get(name, None) == "", f"{name} is required by compose but not blank in docker/.env.example"
    for name, value in example.items():
        if SECRET_NAME.search(name):
            assert value == "", f"docker/.env.example gives the secret {name} a value"
            assert name in required, f"the secret {name} is not required (${{{name}:?...}}) anywhere in compose"


def test_a_blank_or_unset_secret_stops_compose_naming_it():
    required = required_variables()
    for name in sorted(required):
        for env in ({**filled_env(), name: ""}, {k: v for k, v in filled_env().items() if k != name}):
            with pytest.raises(InterpolationError) as err:
                interpolate(raw_compose(), env)
            assert f"required variable {name} is missing a value" in str(err.value), str(err.value)
            assert name in str(err.value).split(": ", 1)[1], f"the message for {name} does not name it: {err.value}"


def test_interpolation_subset():
    env = {"A": "a", "E": ""}
    assert interpolate_str("${A}-${B:-b}-${E:-e}-${E-x}-$$A-$A", env) == "a-b-e--$A-a"
    with pytest.raises(InterpolationError, match="required variable E is missing a value: set E"):
        interpolate_str("${E:?set E}", env)
    with pytest.raises(InterpolationError, match="lone"):
        interpolate_str("cost: 5$", env)


def test_no_secret_has_a_default_or_a_literal_value():
    for s in strings(raw_compose()):
        for name, op, _ in references(s):
            if SECRET_NAME.search(name):
                assert op in (":?", "?"), f"the secret {name} is read without `:?` (a default or blank allowed): {s!r}"
    for name, svc in raw_compose()["services"].items():
        for key, value in environment(svc).items():
            if SECRET_NAME.search(key) or key.endswith("DATABASE__URL"):
                assert any(op == ":?" for _, op, _ in references(value)), (
                    f"{name}: {key} is not taken from docker/.env with ${{VAR:?...}}: {value!r}"
                )


# --------------------------------------------------------------------------------------------
# 2. the Compose specification


def test_compose_file_validates_against_the_compose_spec():
    schema = json.loads(SCHEMA.read_text())
    assert schema["$schema"].startswith("https://json-schema.org/draft-07/"), schema["$schema"]
    jsonschema.Draft7Validator.check_schema(schema)
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(compose()), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)


# --------------------------------------------------------------------------------------------
# 3. files


def test_every_referenced_file_exists():
    missing = []
    for dockerfile, context in dockerfiles().items():
        if not context.is_dir():
            missing.append(f"build context {context}")
        if not dockerfile.is_file():
            missing.append(f"dockerfile {dockerfile}")
            continue
        for source in copy_sources(dockerfile):
            if not (context / source).exists():
                missing.append(f"{dockerfile.name}: COPY source {source}")
    for name, svc in services().items():
        for source, target in bind_mounts(svc):
            if not source.exists():
                missing.append(f"{name}: bind mount {source} -> {target}")
    for name, secret in (compose().get("secrets") or {}).items():
        if "file" in secret and not (DOCKER / secret["file"]).exists():
            missing.append(f"secret {name}: {secret['file']}")
    assert not missing, "missing: " + "; ".join(missing)

    # Provisioning reaches the files through the mounts.
    svc = services()
    assert host_path(svc["prometheus"], config_flag(svc["prometheus"])) == PROMETHEUS_CONFIG.resolve()
    init = host_path(svc["postgres"], "/docker-entrypoint-initdb.d/10-label-studio.sh")
    assert init and init.is_file() and os.access(init, os.X_OK), f"postgres init script {init} missing or not executable"
    grafana = svc["grafana"]
    home = environment(grafana)["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert host_path(grafana, home) and host_path(grafana, home).is_file(), f"Grafana's home dashboard {home} is not mounted"
    for provider in grafana_dashboard_providers():
        folder = host_path(grafana, provider["options"]["path"])
        assert folder and folder.is_dir() and list(folder.glob("*.json")), f"dashboard provider path {provider['options']['path']} has no JSON"
    for datasource_file in grafana_provisioning_files("datasources"):
        assert host_path(grafana, "/etc/grafana/provisioning/datasources/" + datasource_file.name) == datasource_file.resolve()


def test_dockerignore_keeps_local_output_out_and_sources_in():
    for path in [".git", "target", "target/release/batchlab-api", ".venv", ".venv-label-studio", ".venv-bench",
                 "data", "data/batchlab.db", "models", "models/SmolLM2-135M-Instruct.Q4_1.gguf", "logs", "run",
                 "docker/.env", "tests/e2e/__pycache__/x.pyc"]:  # fmt: skip
        assert dockerignored(path), f".dockerignore lets {path} into the build context"
    for dockerfile in dockerfiles():
        for source in copy_sources(dockerfile):
            assert not dockerignored(source), f"{dockerfile.name} copies {source}, which .dockerignore excludes"
    for path in ["Cargo.toml", "Cargo.lock", ".cargo/config.toml", "crates/core/src/lib.rs", "migrations/sqlite",
                 "config/default.toml", "config/label-configs/candidate-evaluation.xml", "scripts/fetch-model.sh"]:  # fmt: skip
        assert not dockerignored(path), f".dockerignore keeps {path}, which the build needs, out"


# --------------------------------------------------------------------------------------------
# 4. variables are batchlab settings


def test_batchlab_variables_are_configuration_keys(config_reference):
    known = {s["env"] for s in config_reference}
    problems = []
    for name, svc in batchlab_services().items():
        for var in environment(svc):
            if var not in known:
                problems.append(f"service {name} sets {var}, which `batchlab-api config --json` does not list")
    for dockerfile in dockerfiles():
        for var in dockerfile_env(dockerfile):
            if var.startswith("BATCHLAB_") and var not in known:
                problems.append(f"{dockerfile.name} sets ENV {var}, not a configuration key")
    for var in env_example():
        if var.startswith("BATCHLAB_") and var not in known | COMPOSE_ONLY_VARIABLES:
            problems.append(f"docker/.env.example has {var}, not a configuration key")
    # A batchlab setting in .env.example reaches the containers under its own name.
    raw = raw_compose()["services"]
    for var in env_example():
        if var in known:
            carriers = [n for n, svc in raw.items() if any(ref[0] == var for ref in references(environment(svc).get(var, "")))]
            if not carriers:
                problems.append(f"docker/.env.example's {var} reaches no container as {var}")
    for name, svc in services().items():
        if name in batchlab_services():
            continue
        allowed = OTHER_IMAGES_ENV.get(name)
        if allowed is None:
            problems.append(f"service {name} ({svc.get('image')}) has no allow-list in OTHER_IMAGES_ENV")
            continue
        for var in environment(svc):
            if var not in allowed:
                problems.append(f"service {name} sets {var}, not in its allow-list")
    assert not problems, "\n".join(problems)


# --------------------------------------------------------------------------------------------
# 5. ports, health checks, policies


def config_flag(svc: dict) -> str:
    (flag,) = [c for c in svc.get("command", []) if c.startswith("--config.file=")]
    return flag.split("=", 1)[1]


def test_ports_agree_with_the_configuration(config_reference):
    svcs = services()
    ports = {name: port_of(config_reference, svc) for name, svc in batchlab_services().items()}
    assert default_of(config_reference, "api.port") == 4080 and ports["api"] == 4080, ports
    for name, svc in svcs.items():
        for p in published(svc):
            assert name in PUBLISHED, f"{name} publishes {p}: only {sorted(PUBLISHED)} may"
            assert p["host_ip"] == "127.0.0.1", f"{name} publishes on {p['host_ip']!r}, not ${{BATCHLAB_BIND:-127.0.0.1}}"
            if name in ports:
                assert p["target"] == ports[name], f"{name} publishes container port {p['target']}, listens on {ports[name]}"
    for name in PUBLISHED:
        assert published(svcs[name]), f"{name} is not published"
        raw_ports = raw_compose()["services"][name]["ports"]
        assert all(str(p).startswith("${BATCHLAB_BIND:-127.0.0.1}:") for p in raw_ports), raw_ports
    # Label Studio: 4115 on the host, its image's 8080 inside, where batchlab reaches it.
    assert published(svcs["label-studio"])[0]["published"] == "4115"
    ls_port = published(svcs["label-studio"])[0]["target"]
    for name, svc in batchlab_services().items():
        url = environment(svc).get("LABEL_STUDIO_URL")
        if url:
            u = urllib.parse.urlsplit(url)
            assert (u.hostname, u.port) == ("label-studio", ls_port), f"{name}: LABEL_STUDIO_URL {url}"
    # The setup command's in-network URLs.
    cmd = svcs["setup"]["command"]
    ml = urllib.parse.urlsplit(cmd[cmd.index("--ml-backend-url") + 1])
    assert (ml.hostname, ml.port) == ("ml-backend", ports["ml-backend"]), ml
    hook = urllib.parse.urlsplit(cmd[cmd.index("--webhook-url") + 1])
    assert (hook.hostname, hook.port, hook.path) == ("api", ports["api"], "/v1/webhooks/label-studio"), hook
    # Prometheus scrapes every long-running batchlab service on its port, and nothing else.
    targets = {t for job in prometheus_config()["scrape_configs"] for sc in job.get("static_configs", []) for t in sc["targets"]}
    expected = {f"{n}:{ports[n]}" for n in batchlab_services(include_profiles=False) if n != "setup"}
    assert targets == expected, f"Prometheus targets {sorted(targets)}, services {sorted(expected)}"
    # Grafana's datasource is Prometheus on its port.
    (ds,) = grafana_datasources()
    assert urllib.parse.urlsplit(ds["url"])[1] == "prometheus:9090" and "prometheus" in svcs


def test_health_checks_restart_and_user():
    svcs = services()
    for name, svc in svcs.items():
        if name == "setup":
            assert svc.get("restart") == "no", "setup is one-shot"
            assert "healthcheck" not in svc
            deps = svc["depends_on"]
            assert deps["label-studio"]["condition"] == "service_healthy", deps
            assert {d for d, c in deps.items() if c["condition"] == "service_healthy"} >= {"label-studio", "api", "ml-backend"}
            assert binary_of(svc) == "batchlab-api" and svc["command"][1] == "setup-label-studio"
            continue
        assert svc.get("restart") == "unless-stopped", f"{name}: restart {svc.get('restart')!r}"
        assert svc.get("healthcheck", {}).get("test"), f"{name} has no health check"
        if name in batchlab_services():
            assert svc["healthcheck"]["test"] == ["CMD", binary_of(svc), "healthcheck"], (name, svc["healthcheck"])
        image = svc.get("image", "")
        assert ":" in image and not image.endswith(":latest"), f"{name}: image {image!r} is not pinned"
    ls = svcs["label-studio"]
    assert ls["image"] == "heartexlabs/label-studio:1.23.0"
    env = environment(ls)
    assert env["DJANGO_DB"] == "default" and env["POSTGRE_HOST"] == "postgres" and env["LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN"] == "true"
    assert "curl" not in json.dumps(ls["healthcheck"]["test"]), "the Label Studio image has no curl"
    # Label Studio's token is batchlab's key; its database password is the init script's.
    raw = raw_compose()["services"]
    assert references(environment(raw["label-studio"])["LABEL_STUDIO_USER_TOKEN"])[0][0] == "LABEL_STUDIO_USER_TOKEN"
    assert references(environment(raw["api"])["LABEL_STUDIO_API_KEY"])[0][0] == "LABEL_STUDIO_USER_TOKEN"
    assert environment(svcs["postgres"])["LABEL_STUDIO_DB_PASSWORD"] == env["POSTGRE_PASSWORD"]
    # The image: a non-root user with a fixed uid owning /data; cached dependency builds.
    for dockerfile in dockerfiles():
        text = dockerfile.read_text()
        users = [args for word, args in instructions(dockerfile) if word == "USER"]
        assert users and users[-1].split(":")[0] not in ("root", "0"), f"{dockerfile.name}: runs as {users}"
        assert re.search(r"useradd [^\n]*--uid \d+", text), f"{dockerfile.name}: no user with a fixed uid"
        assert re.search(r"chown -R \S+ /data", text), f"{dockerfile.name}: /data not owned by the user"
        assert "--mount=type=cache,target=/usr/local/cargo/registry" in text or "cargo chef" in text, dockerfile


def test_gpu_profile():
    svcs = services()
    for name in ("worker-gpu", "ml-backend-gpu"):
        svc = svcs[name]
        assert svc["profiles"] == ["gpu"], name
        (device,) = svc["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"], device
        assert svc["build"]["dockerfile"] == "docker/Dockerfile.cuda" and "CUDA_COMPUTE_CAP" in svc["build"]["args"]
    cuda = DOCKER / "Dockerfile.cuda"
    froms = [args for word, args in instructions(cuda) if word == "FROM"]
    assert any("nvidia/cuda" in f and "devel" in f for f in froms) and any("nvidia/cuda" in f and "runtime" in f for f in froms), froms
    assert any(word == "ARG" and args.startswith("CUDA_COMPUTE_CAP") for word, args in instructions(cuda))
    assert "cargo build --release --locked --features cuda -p batchlab-worker -p batchlab-ml-backend" in cuda.read_text()


# --------------------------------------------------------------------------------------------
# 6. Prometheus and Grafana


def prometheus_config() -> dict:
    return yaml.safe_load(PROMETHEUS_CONFIG.read_text())


def grafana_provisioning_files(kind: str) -> list[Path]:
    return sorted((DOCKER / "grafana" / "provisioning" / kind).glob("*.y*ml"))


def grafana_datasources() -> list[dict]:
    return [ds for f in grafana_provisioning_files("datasources") for ds in yaml.safe_load(f.read_text())["datasources"]]


def grafana_dashboard_providers() -> list[dict]:
    return [p for f in grafana_provisioning_files("dashboards") for p in yaml.safe_load(f.read_text())["providers"]]


def dashboards() -> dict[Path, dict]:
    return {f: json.loads(f.read_text()) for f in sorted((DOCKER / "grafana" / "dashboards").glob("*.json"))}


def panels(dashboard: dict) -> list[dict]:
    out = []
    for p in dashboard["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))
    return out


def queries() -> list[tuple[str, dict]]:
    """(panel title, target) of every query of every dashboard."""
    return [(p["title"], t) for d in dashboards().values() for p in panels(d) if p["type"] != "row" for t in p["targets"]]


PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool", "offset"}


def promql_selectors(expr: str) -> list[tuple[str, set[str]]]:
    """(metric name, label names matched) of each selector in a PromQL expression."""
    out = []
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    text = re.sub(r"\[[^\]]*\]", "", text)  # range durations
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)  # label lists
    for m in re.finditer(r"([A-Za-z_:][A-Za-z0-9_:]*)\s*(\{[^}]*\})?\s*(\()?", text):
        name, matchers, call = m.groups()
        if call or name in PROMQL_WORDS:
            continue
        labels = set(re.findall(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)", matchers or ""))
        out.append((name, labels))
    return out


def promql_grouping_labels(expr: str) -> set[str]:
    return {label.strip() for group in re.findall(r"(?:by|without)\s*\(([^)]*)\)", expr) for label in group.split(",") if label.strip()}


def test_prometheus_config():
    cfg = prometheus_config()
    assert set(cfg) <= {"global", "scrape_configs", "rule_files", "alerting", "remote_write", "remote_read", "storage"}, set(cfg)
    jobs = {job["job_name"]: job for job in cfg["scrape_configs"]}
    assert len(jobs) == len(cfg["scrape_configs"]), "duplicate job names"
    prometheus = services()["prometheus"]
    version = re.search(r":v(\d+)\.(\d+)", prometheus["image"])
    assert version and (int(version[1]), int(version[2])) >= (2, 55), f"{prometheus['image']}: basic_auth.username_file needs >= 2.55"
    secrets = compose()["secrets"]
    ml_jobs = [j for j in jobs.values() if any(t.startswith("ml-backend:") for sc in j["static_configs"] for t in sc["targets"])]
    assert len(ml_jobs) == 1, ml_jobs
    auth = ml_jobs[0].get("basic_auth")
    assert auth and set(auth) == {"username_file", "password_file"}, f"the ML backend needs basic auth from files: {auth}"
    for field, variable in (("username_file", "BASIC_AUTH_USER"), ("password_file", "BASIC_AUTH_PASS")):
        path = auth[field]
        assert path.startswith("/run/secrets/"), path
        secret = path.removeprefix("/run/secrets/")
        assert secret in prometheus["secrets"], f"{secret} is not given to the prometheus service"
        assert secrets[secret] == {"environment": variable}, secrets[secret]
    for job in jobs.values():
        for relabel in job.get("metric_relabel_configs", []):
            assert set(relabel) <= {"source_labels", "separator", "regex", "target_label", "replacement", "action", "modulus"}, relabel


def test_grafana_provisioning_and_dashboard():
    (ds,) = grafana_datasources()
    assert ds["type"] == "prometheus" and ds["uid"] and ds["access"] == "proxy"
    (provider,) = grafana_dashboard_providers()
    assert provider["type"] == "file"
    found = dashboards()
    assert DOCKER / "grafana" / "dashboards" / "batchlab.json" in found
    uids = [d["uid"] for d in found.values()]
    assert len(set(uids)) == len(uids)
    names: set[str] = set()
    for path, dashboard in found.items():
        ids = [p["id"] for p in panels(dashboard)]
        assert len(set(ids)) == len(ids), f"{path.name}: duplicate panel ids"
        for p in panels(dashboard):
            assert "gridPos" in p, f"{path.name}: panel {p['title']!r} has no position"
            if p["type"] == "row":
                continue
            assert p["datasource"]["uid"] == ds["uid"], f"{p['title']!r}: datasource {p['datasource']}"
            assert p.get("targets"), f"panel {p['title']!r} has no query"
            for t in p["targets"]:
                assert t.get("expr", "").strip(), f"panel {p['title']!r}: a target without a query"
                assert t["datasource"]["uid"] == ds["uid"], f"{p['title']!r}: target datasource {t['datasource']}"
                selectors = promql_selectors(t["expr"])
                assert selectors, f"{p['title']!r}: no metric in {t['expr']!r}"
                names |= {base_metric(n) for n, _ in selectors}
    assert not DASHBOARD_METRICS - names, f"no panel charts {sorted(DASHBOARD_METRICS - names)}"


def base_metric(name: str) -> str:
    return re.sub(r"_(bucket|sum|count)$", "", name)


# --------------------------------------------------------------------------------------------
# 7. the dashboard's metrics in the real services' /metrics

API_KEY = "compose-test-key"
SECRET = "compose-test-secret"
ML_USER, ML_PASS = "prometheus", "compose-test-pass"
# The recorded Label Studio deliveries, in the order they are posted: the tasks, two annotations,
# the second starred as ground truth, two more annotations (whose accuracy records then have a
# ground truth to compare with).
BURST = ["06-webhook-TASKS_CREATED.json", "22-webhook-ANNOTATION_CREATED.json", "24-webhook-ANNOTATION_CREATED.json",
         "32-webhook-ANNOTATION_UPDATED.json", "26-webhook-ANNOTATION_CREATED.json", "28-webhook-ANNOTATION_CREATED.json"]  # fmt: skip


def request(url: str, body=None, headers: dict | None = None, timeout: float = 60.0) -> tuple[int, str]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="GET" if data is None else "POST",
                                 headers={"Content-Type": "application/json", **(headers or {})})  # fmt: skip
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


def scrape(text: str) -> dict[str, set[str]]:
    """Metric (series) names of a Prometheus text exposition, each with its label names."""
    out: dict[str, set[str]] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.match(r"([A-Za-z_:][A-Za-z0-9_:]*)(\{(.*)\})?\s", line)
        assert m, f"not a sample line: {line!r}"
        labels = set(re.findall(r'([A-Za-z_][A-Za-z0-9_]*)="', m.group(3) or ""))
        out.setdefault(m.group(1), set()).update(labels)
    return out


def wait_until(pred, what: str, timeout: float, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout:.0f}s")
        time.sleep(interval)


def healthcheck(svc, **env) -> int:
    """The exit status of `<binary> healthcheck` with the service's environment (plus `env`)."""
    r = subprocess.run([str(BIN_DIR / svc.binary), "healthcheck"], env={**svc.env, **env}, capture_output=True,
                       text=True, timeout=30)  # fmt: skip
    return r.returncode


def test_dashboard_metrics_exist_in_live_metrics(stack):
    """The real services, configured as in compose (API key, webhook secret, basic auth on the ML
    backend), after one small batch, a webhook burst and one /predict: every metric a panel
    queries is in some /metrics, with the labels the query uses, and each health check passes."""
    stack.require_model()
    api = stack.start_api(BATCHLAB_API__API_KEY=API_KEY, BATCHLAB_LABEL_STUDIO__WEBHOOK_SECRET=SECRET,
                          BATCHLAB_CURATION__ACCURACY_EVERY="1")  # fmt: skip
    worker_port = free_port()
    worker = stack.start_worker(BATCHLAB_WORKER__PORT=str(worker_port))
    ml_port = free_port()
    # Started by hand: Stack.start_ml_backend waits on /health without credentials, which basic
    # auth (as in compose) refuses.
    ml = stack._start("batchlab-ml-backend", "batchlab-ml-backend", {
        "BATCHLAB_ML_BACKEND__HOST": "127.0.0.1", "BATCHLAB_ML_BACKEND__PORT": str(ml_port),
        "BASIC_AUTH_USER": ML_USER, "BASIC_AUTH_PASS": ML_PASS, "BATCHLAB_ML_BACKEND__LEARN": "false",
    })  # fmt: skip
    ml_auth = {"Authorization": "Basic " + base64.b64encode(f"{ML_USER}:{ML_PASS}".encode()).decode()}
    ml_base = f"http://127.0.0.1:{ml_port}"
    api_base = f"http://127.0.0.1:{stack.api_port}"

    def ml_status() -> dict | None:
        if not ml.alive():
            ml.fail("exited")
        try:
            code, body = request(f"{ml_base}/status", headers=ml_auth, timeout=5)
        except OSError:
            return None
        return json.loads(body) if code == 200 else None

    wait_until(lambda: (s := ml_status()) and s["model"]["state"] == "ready", "the ML backend's model loaded", 180)

    # The compose health checks: each binary's `healthcheck` against its own port (the ML
    # backend's with basic auth), and a failure where nothing answers.
    assert healthcheck(api) == 0
    assert healthcheck(worker) == 0
    assert healthcheck(ml) == 0
    assert healthcheck(api, BATCHLAB_API__PORT=str(free_port())) == 1
    assert healthcheck(ml, BASIC_AUTH_PASS="wrong") == 1

    # A prediction database row stands in for an import (which needs a real Label Studio): the
    # annotations below then have predictions to be scored against, so accuracy is recorded.
    events = [json.loads((FIXTURES / name).read_text())["body"] for name in BURST]
    db = sqlite3.connect(stack.database_url.removeprefix("sqlite://"), timeout=30)
    with db:
        for event in events:
            if event["action"] == "ANNOTATION_CREATED":
                a = event["annotation"]
                db.execute("INSERT INTO ls_predictions (instance, project_id, task_id, model_version, source, score, result, "
                           "created_at) VALUES ('default', ?, ?, 'compose-test', 'import', 0.5, ?, ?)",
                           (event["project"]["id"], a["task"], json.dumps(a["result"]), int(time.time())))  # fmt: skip
    db.close()

    # One small batch through the official client.
    client = stack.client()
    lines = [{"custom_id": f"c{i}", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": q}],
                       "max_tokens": 4, "temperature": 0}}
             for i, q in enumerate(["What is 2 plus 2?", "Name a colour."])]  # fmt: skip
    batch_file = client.files.create(file=("in.jsonl", "".join(json.dumps(x) + "\n" for x in lines).encode()), purpose="batch")
    batch = client.batches.create(input_file_id=batch_file.id, endpoint="/v1/chat/completions", completion_window="24h")

    # The webhook burst, as Label Studio delivers it (with the secret header).
    for event in events:
        code, body = request(f"{api_base}/v1/webhooks/label-studio", event, {"X-Batchlab-Secret": SECRET})
        assert code < 300, (code, body)

    # One /predict, as Label Studio asks it.
    predict = json.loads((FIXTURES / "12-ml-predict.json").read_text())["body"]
    predict["tasks"] = predict["tasks"][:1]
    code, body = request(f"{ml_base}/predict", predict, ml_auth, timeout=120)
    assert code == 200, (code, body[:2000])

    batch = wait_until(lambda: (b := client.batches.retrieve(batch.id)).status in ("completed", "failed") and b,
                       "the batch finished", 300)  # fmt: skip
    assert batch.status == "completed", batch

    # Scrape like Prometheus (the ML backend with basic auth) until every queried metric shows.
    wanted = {name for _, t in queries() for name, _ in promql_selectors(t["expr"])} - PROMETHEUS_SYNTHETIC
    endpoints = {"api": (f"{api_base}/metrics", {}), "worker": (f"http://127.0.0.1:{worker_port}/metrics", {}),
                 "ml-backend": (f"{ml_base}/metrics", ml_auth)}  # fmt: skip
    assert request(f"{ml_base}/metrics")[0] == 401, "the ML backend's /metrics answers without basic auth"
    seen: dict[str, dict[str, set[str]]] = {}

    def all_seen() -> bool:
        for name, (url, headers) in endpoints.items():
            code, text = request(url, headers=headers, timeout=10)
            assert code == 200, (name, code, text[:500])
            seen[name] = scrape(text)
        return not wanted - {m for s in seen.values() for m in s}

    deadline = time.monotonic() + 60
    while not all_seen() and time.monotonic() < deadline:
        time.sleep(1)
    union = {m for s in seen.values() for m in s}
    if wanted - union:
        pytest.fail(f"metrics the dashboard queries but no service exports: {sorted(wanted - union)}\n"
                    f"exported batchlab metrics: {sorted(m for m in union if m.startswith('batchlab_'))}")  # fmt: skip

    # Every label a query matches on, groups by or shows in its legend exists on its metrics.
    labels: dict[str, set[str]] = {}
    for s in seen.values():
        for metric, names in s.items():
            labels.setdefault(metric, set()).update({RELABELLED.get(n, n) for n in names})
    problems = []
    for title, t in queries():
        selectors = [(n, ls) for n, ls in promql_selectors(t["expr"]) if n not in PROMETHEUS_SYNTHETIC]
        available = set(TARGET_LABELS) | {"le"} | {label for n, _ in selectors for label in labels.get(n, set())}
        used = promql_grouping_labels(t["expr"]) | set(re.findall(r"\{\{\s*(\w+)\s*\}\}", t.get("legendFormat", "")))
        used |= {label for _, ls in selectors for label in ls}
        if used - available:
            problems.append(f"{title!r}: {t['expr']!r} uses labels {sorted(used - available)} its metrics lack")
    assert not problems, "\n".join(problems)
