"""End to end with a real Prefect server: deploy skf-train/demo from prefect.yaml, run it on a process worker.

The server, the work pool `cpu` and the worker run as separate processes on 127.0.0.1 with a private
PREFECT_HOME and SKF_HOME, exactly as a user would start them. Three runs: a first one that does everything,
a second one that finds nothing to do, and a run stopped during training whose rerun resumes from its
checkpoint. Worker (SIGINT) and server (SIGTERM) are stopped by PID whatever happens.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.pipeline_fixtures import make_tiny_dataset, tiny_params
from tests.prefect_stack import BIN, REPO, Stack, prefect_server, start_worker, stop

pytestmark = [pytest.mark.slow, pytest.mark.e2e]


@pytest.fixture()
def stack(tmp_path: Path) -> Iterator[Stack]:
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_WORKER_QUERY_SECONDS": "2",
        "PREFECT_LOGGING_LEVEL": "INFO",
        "SKF_HOME": str(tmp_path / "skf-home"),
        "SKF_PROJECT_DIR": str(REPO),
        "OMP_NUM_THREADS": "1",
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    for var in ("SKF_CATALOG_URL", "SKF_STORAGE_URI", "MLFLOW_TRACKING_URI", "SKF_WEIGHTS_URI"):
        env.pop(var, None)
    logs = tmp_path / "logs"
    logs.mkdir()
    with prefect_server(env, logs) as s:
        s.cli("work-pool", "create", "cpu", "--type", "process")
        s.cli("--no-prompt", "deploy", "--name", "demo")
        worker = start_worker(s, "cpu", "worker", {})
        try:
            yield s
        finally:
            stop(worker, signal.SIGINT)


def test_demo_deployment_runs_skips_and_resumes(
    stack: Stack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sqlalchemy as sa
    from mlflow import MlflowClient

    data = make_tiny_dataset(tmp_path / "data")
    params = tiny_params(data, name="e2e")

    first = stack.run_deployment(params)
    assert stack.wait(first) == "COMPLETED", (stack.logs / "worker.log").read_text()[-5000:]

    monkeypatch.setenv("SKF_HOME", stack.env["SKF_HOME"])  # read what the worker wrote
    for var in ("SKF_CATALOG_URL", "SKF_STORAGE_URI", "SKF_WEIGHTS_URI"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (Path(stack.env["SKF_HOME"]).resolve() / "mlruns").as_uri())
    from components.catalog import PriorCacheEntry, TrainingRun, open_catalog
    from components.data.ingest import list_versions
    from components.settings import get_settings

    assert [v.ref for v in list_versions("e2e")] == ["e2e@1"]
    catalog = open_catalog()
    with catalog.session() as session:
        assert session.scalar(sa.select(sa.func.count()).select_from(PriorCacheEntry)) == 12
        runs = session.scalars(sa.select(TrainingRun)).all()
        assert [r.status for r in runs] == ["finished"]
        run_id = runs[0].mlflow_run_id
    client = MlflowClient(get_settings().mlflow_tracking_uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and "test/psnr" in run.data.metrics
    challenger = client.get_model_version_by_alias("tiny-model", "challenger")
    assert challenger.run_id == run.info.run_id
    assert "Training**: trained" in stack.summary(first)

    second = stack.run_deployment(params)
    assert stack.wait(second) == "COMPLETED"
    summary = stack.summary(second)
    assert "0 computed, 12 cached, 0 failed, 0 SKB forward passes" in summary
    assert "Training**: skipped" in summary and "Evaluation** (skipped" in summary
    with catalog.session() as session:
        assert session.scalar(sa.select(sa.func.count()).select_from(TrainingRun)) == 1
    assert len(client.search_model_versions("name = 'tiny-model'")) == 1

    # A different configuration, stopped after its step-2 checkpoint, then rerun: it resumes.
    longer = tiny_params(data, name="e2e", training={"overrides": {"train.seed": 5}, "stop_after_step": 2})
    stopped = stack.run_deployment(longer)
    assert stack.wait(stopped) == "FAILED"
    with catalog.session() as session:
        statuses = sorted(r.status for r in session.scalars(sa.select(TrainingRun)))
    assert statuses == ["failed", "finished"]
    longer["training"].pop("stop_after_step")
    resumed = stack.run_deployment(longer)
    assert stack.wait(resumed) == "COMPLETED"
    assert "Training**: resumed, 4 steps" in stack.summary(resumed)
    with catalog.session() as session:
        statuses = sorted(r.status for r in session.scalars(sa.select(TrainingRun)))
    assert statuses == ["finished", "finished"]
    assert str(client.get_model_version_by_alias("tiny-model", "challenger").version) == "2"
