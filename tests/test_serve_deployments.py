"""``skf serve`` beside ``prefect deploy``, and where prefect.yaml's pull steps are resolved.

``skf serve`` must never rewrite a work-pool deployment made by ``prefect deploy`` (a served deployment has no
pull steps and an entrypoint relative to the serving shell), and the pull steps that ``prefect deploy``
stores must find the project copy on the worker, from the worker's SKF_PROJECT_DIR, not the deployer's.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

REPO = Path(__file__).resolve().parents[1]
PREFECT_YAML = REPO / "prefect.yaml"


def _spec() -> dict[str, Any]:
    return yaml.safe_load(PREFECT_YAML.read_text(encoding="utf-8"))


# ---------------------------------------------------------------------------------------------- skf serve


def test_served_deployments_get_names_of_their_own() -> None:
    from flows.commands.pipeline import SERVED_SUFFIX, served_deployments

    entries = {d["name"]: d for d in _spec()["deployments"]}
    served = {d.name: d for d in served_deployments(name_suffix=SERVED_SUFFIX)}
    assert set(served) == {f"{name}-served" for name in entries}
    for name, entry in entries.items():
        assert served[f"{name}-served"].parameters == entry.get("parameters", {})
    only = served_deployments(names=["demo"], name_suffix="-x")
    assert [d.full_name for d in only] == ["skf-train/demo-x"]


@pytest.fixture()
def recorded_serve(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """``prefect.serve`` replaced by a recorder of the deployment names it was given (serving blocks)."""
    import prefect

    calls: list[list[str]] = []
    monkeypatch.setattr(
        prefect, "serve", lambda *deployments, **_: calls.append([d.name for d in deployments])
    )
    return calls


def _create_deployment(flow_name: str, name: str, work_pool: str | None) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate

    async def create() -> None:
        async with get_client() as client:
            if work_pool:
                await client.create_work_pool(WorkPoolCreate(name=work_pool, type="process"), overwrite=True)
            flow_id = await client.create_flow_from_name(flow_name)
            await client.create_deployment(
                flow_id=flow_id,
                name=name,
                work_pool_name=work_pool,
                entrypoint="flows/pipeline.py:skf_train",
                pull_steps=[{"prefect.deployments.steps.set_working_directory": {"directory": "/opt/skf"}}],
            )

    asyncio.run(create())


def test_serve_refuses_to_overwrite_a_pool_deployment(
    prefect_harness: None, recorded_serve: list[list[str]]
) -> None:
    from flows.cli import app

    _create_deployment("skf-train", "demo-clash", work_pool="serve-test-pool")
    result = CliRunner().invoke(app, ["serve", "--name", "demo", "--name-suffix=-clash"])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert lines[0].startswith("error: refusing to serve skf-train/demo-clash (work pool 'serve-test-pool')")
    assert "--name-suffix" in lines[0]
    assert recorded_serve == []

    # Another suffix serves; so does a name that an earlier `skf serve` (no work pool) left on the server.
    _create_deployment("skf-train", "demo-earlier", work_pool=None)
    for suffix in ("-elsewhere", "-earlier"):
        result = CliRunner().invoke(app, ["serve", "--name", "demo", f"--name-suffix={suffix}"])
        assert result.exit_code == 0, result.output
    assert recorded_serve == [["demo-elsewhere"], ["demo-earlier"]]


def test_serve_default_names_do_not_touch_prefect_deploy_names(
    prefect_harness: None, recorded_serve: list[list[str]]
) -> None:
    """``prefect deploy`` made skf-train/demo on pool cpu: plain ``skf serve`` serves demo-served beside it."""
    from flows.cli import app

    _create_deployment("skf-train", "demo", work_pool="cpu")
    result = CliRunner().invoke(app, ["serve", "--name", "demo"])
    assert result.exit_code == 0, result.output
    assert recorded_serve == [["demo-served"]]
    result = CliRunner().invoke(app, ["serve", "--name", "demo", "--name-suffix="])
    assert result.exit_code == 2 and "refusing to serve skf-train/demo (work pool 'cpu')" in result.output


# ------------------------------------------------------------------------------------ pull steps, deploy


DEPLOYER_DIR = "/deployer/shell/checkout"  # what the deployer's shell says; never valid on a worker


def test_deploy_time_templating_leaves_the_pull_steps_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """Prefect's deploy-time call (cli/deploy/_core.py: ``apply_values(pull_steps, step_outputs,
    remove_notset=False)``) with SKF_PROJECT_DIR set in the deployer's shell."""
    from prefect.utilities.templating import apply_values

    monkeypatch.setenv("SKF_PROJECT_DIR", DEPLOYER_DIR)
    pull = _spec()["pull"]
    assert apply_values(pull, {}, remove_notset=False) == pull
    # The form prefect.yaml used to have is frozen to the deployer's value: what this guards against.
    old = [{"prefect.deployments.steps.set_working_directory": {"directory": "{{ $SKF_PROJECT_DIR }}"}}]
    frozen = apply_values(old, {}, remove_notset=False)
    assert frozen[0]["prefect.deployments.steps.set_working_directory"]["directory"] == DEPLOYER_DIR


@pytest.fixture()
def restore_cwd() -> Iterator[None]:
    cwd = os.getcwd()
    try:
        yield
    finally:
        os.chdir(cwd)


def _run_pull_steps(steps: list[dict[str, Any]]) -> dict[str, Any]:
    from prefect.deployments.steps.core import run_steps

    return asyncio.run(run_steps(steps, print_function=lambda *a, **k: None))


def test_pull_steps_find_the_project_from_the_workers_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, restore_cwd: None
) -> None:
    """Prefect's own pull-step runner (what a worker's flow run calls) on prefect.yaml's steps."""
    from prefect.deployments.steps.core import StepExecutionError

    project = tmp_path / "worker copy"  # a space: the shell must keep the path whole
    project.mkdir()
    monkeypatch.setenv("SKF_PROJECT_DIR", str(project))
    outputs = _run_pull_steps(_spec()["pull"])
    assert Path.cwd() == project.resolve() and outputs["directory"] == str(project.resolve())

    monkeypatch.delenv("SKF_PROJECT_DIR")
    with pytest.raises(StepExecutionError) as failed:
        _run_pull_steps(_spec()["pull"])
    assert "SKF_PROJECT_DIR" in str(failed.value.__cause__)
    monkeypatch.setenv("SKF_PROJECT_DIR", str(tmp_path / "missing"))
    with pytest.raises(StepExecutionError):
        _run_pull_steps(_spec()["pull"])


@pytest.mark.slow
def test_prefect_deploy_stores_the_pull_steps_unresolved(
    prefect_harness: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, restore_cwd: None
) -> None:
    """``prefect deploy --all`` (the README command) against a real (test) server, from a shell whose
    SKF_PROJECT_DIR points elsewhere: the stored pull steps still resolve on the worker."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.settings import PREFECT_API_URL

    async def pools() -> None:
        async with get_client() as client:
            for pool in ("gpu", "cpu"):
                await client.create_work_pool(WorkPoolCreate(name=pool, type="process"), overwrite=True)

    asyncio.run(pools())
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "SKF_PROJECT_DIR": DEPLOYER_DIR}
    done = subprocess.run(
        [sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr

    from flows.commands.pipeline import served_deployments

    spec = _spec()
    full_names = {d.name: d.full_name for d in served_deployments()}  # flow/name, flows loaded as deploy does
    assert set(full_names) == {d["name"] for d in spec["deployments"]}

    async def stored() -> dict[str, Any]:
        async with get_client() as client:
            return {name: await client.read_deployment_by_name(full) for name, full in full_names.items()}

    deployments = asyncio.run(stored())
    for name, deployment in deployments.items():
        assert deployment.pull_steps == spec["pull"], name
        assert DEPLOYER_DIR not in json.dumps(deployment.pull_steps), name
        assert deployment.work_pool_name in ("gpu", "cpu") and deployment.entrypoint.startswith("flows/")

    project = tmp_path / "worker"
    project.mkdir()
    monkeypatch.setenv("SKF_PROJECT_DIR", str(project))
    _run_pull_steps(deployments["demo"].pull_steps)
    assert Path.cwd() == project.resolve()
