"""The fleet, end to end: two GPU hosts (two workers, two SKF_HOMEs) in one pool, on shared real services.

Loopback only: a Prefect server with pool ``gpu`` and two process workers (``--limit 1`` each, as
``infra/compose.yaml`` starts them), an MLflow server on PostgreSQL with S3 artifacts, the catalog on
PostgreSQL and the data store on S3 (moto). One test walks what a team meets:

1. two trainings run at once, one per host (GPU slots are per worker; no server-wide ``gpu`` limit), and
   the same request again skips every stage;
2. a run stopped on host A resumes on host B from the checkpoint A wrote, in the same MLflow run, with each
   metric step logged once;
3. the summary names the version that holds the challenger alias as challenger, and links the server's run
   and model pages; flow runs are named after what they train;
4. a missing SKB checkpoint fails the run before anything is ingested;
5. what a user must see reaches the Prefect API: the project's warnings (random-init SKB) in the flow run's
   logs, stages that found their work done in ``Skipped`` states with the reason, the evaluation's sample
   grid as an image artifact;
6. ``skf-retrain/nightly`` on new data ingests once and says which version it trained on; rerun on the
   same data it ends "nothing new".
"""

from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from tests.pipeline_fixtures import make_tiny_dataset, tiny_params
from tests.prefect_stack import BIN, REPO, Stack, free_port, prefect_server, start_worker, stop, wait_healthy
from tests.serving_fixtures import stop_process

pytestmark = [pytest.mark.slow, pytest.mark.e2e, pytest.mark.postgres, pytest.mark.s3]


@contextmanager
def _schema(url: str) -> Iterator[str]:
    """A fresh PostgreSQL schema on ``url``'s server, as a URL that searches it; dropped afterwards."""
    name = f"m_{uuid.uuid4().hex[:10]}"
    base = url.split("?", 1)[0]
    admin = sa.create_engine(base)
    with admin.begin() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{name}"'))
    try:
        yield f"{base}?options=-csearch_path%3D{name}"
    finally:
        with admin.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA "{name}" CASCADE'))
        admin.dispose()


@pytest.fixture()
def mlflow_server(tmp_path: Path, postgres_url: str, s3_env: str) -> Iterator[str]:
    """``mlflow server`` with its own PostgreSQL schema and artifacts in the S3 bucket (proxied)."""
    with _schema(postgres_url) as backend:
        yield from _serve_mlflow(tmp_path, backend, s3_env)


def _serve_mlflow(tmp_path: Path, backend: str, bucket: str) -> Iterator[str]:
    port = free_port()
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}
    env.pop("MLFLOW_TRACKING_URI", None)
    log = (tmp_path / "mlflow-server.log").open("wb")
    proc = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--backend-store-uri", backend,
         "--artifacts-destination", f"s3://{bucket}/mlflow-artifacts", "--serve-artifacts",
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(proc, f"{url}/health", tmp_path / "mlflow-server.log", "mlflow server")
        yield url
    finally:
        stop_process(proc)


@pytest.fixture()
def fleet(
    tmp_path: Path, postgres_url: str, s3_env: str, mlflow_server: str
) -> Iterator[tuple[Stack, dict[str, str]]]:
    """The Prefect server with pool ``gpu`` and the demo deployment on it; yields it and the shared env."""
    shared = {
        "SKF_CATALOG_URL": postgres_url,
        "SKF_STORAGE_URI": f"s3://{s3_env}/store",
        "MLFLOW_TRACKING_URI": mlflow_server,
        "AWS_ENDPOINT_URL": os.environ["AWS_ENDPOINT_URL"],
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    env = {
        **os.environ,
        **shared,
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_WORKER_QUERY_SECONDS": "2",
        "PREFECT_LOGGING_LEVEL": "INFO",
        "SKF_PROJECT_DIR": str(REPO),
        "OMP_NUM_THREADS": "1",
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    env.pop("SKF_WEIGHTS_URI", None)
    logs = tmp_path / "logs"
    logs.mkdir()
    with prefect_server(env, logs) as stack:
        stack.cli("work-pool", "create", "gpu", "--type", "process")
        stack.cli("--no-prompt", "deploy", "--name", "demo", "--pool", "gpu")
        stack.cli("--no-prompt", "deploy", "--name", "nightly", "--pool", "gpu")
        yield stack, shared


def _host(stack: Stack, name: str, home: Path) -> subprocess.Popen[bytes]:
    return start_worker(stack, "gpu", name, {"SKF_HOME": str(home)}, "--limit", "1")


def _flow_run(stack: Stack, flow_run_id: str) -> dict[str, Any]:
    return httpx.get(f"{stack.api}/flow_runs/{flow_run_id}", timeout=10).json()


def _interval(run: dict[str, Any]) -> tuple[dt.datetime, dt.datetime]:
    return dt.datetime.fromisoformat(run["start_time"]), dt.datetime.fromisoformat(run["end_time"])


def _wait(stack: Stack, *flow_run_ids: str) -> list[str]:
    return [stack.wait(i) for i in flow_run_ids]


def _worker_logs(stack: Stack) -> str:
    return "\n".join(p.read_text()[-4000:] for p in sorted(stack.logs.glob("host-*.log")))


def _children(stack: Stack, flow_run_id: str) -> list[dict[str, Any]]:
    return stack.post("flow_runs/filter", {"flow_runs": {"parent_flow_run_id": {"any_": [flow_run_id]}}})


def _check_the_ui_sees_it(stack: Stack, *, trained: str, repeated: str) -> None:
    """Item 5 on the two-worker stack: warnings, skipped states and the sample grid, read from the API."""
    ids = [trained, *(c["id"] for c in _children(stack, trained))]
    logs = stack.post("logs/filter", {"logs": {"flow_run_id": {"any_": ids}, "level": {"ge_": 30}}})
    messages = [entry["message"] for entry in logs]
    assert any("NO checkpoint" in m and "randomly initialised" in m for m in messages), messages[:5]
    skipped = {c["name"]: c["state"] for c in _children(stack, repeated) if c["state"]["name"] == "Skipped"}
    assert len(skipped) >= 3, [(c["name"], c["state"]["name"]) for c in _children(stack, repeated)]
    assert all(state["type"] == "COMPLETED" and state["message"] for state in skipped.values()), skipped
    grids = stack.post(
        "artifacts/filter", {"artifacts": {"flow_run_id": {"any_": ids}, "type": {"any_": ["image"]}}}
    )
    assert grids and all(g["key"].endswith("-grid") for g in grids), grids


def _check_retrain_ingests_once(stack: Stack, data: Path) -> None:
    """Item 6: ``skf-retrain/nightly`` on a data prefix it has not seen, then again on the same data."""
    train_params = {k: v for k, v in tiny_params(data, name="fleet", training={"overrides": {"train.seed": 1}}).items()
                    if k not in ("preset", "dataset")}  # fmt: skip
    parameters = {"data_prefix": str(data), "dataset_name": "fleet-nightly", "layout": "lol", "preset": "demo",
                  "params": train_params}  # fmt: skip
    first = stack.run_named("skf-retrain/nightly", parameters)
    assert _wait(stack, first) == ["COMPLETED"], _worker_logs(stack)
    tree = [first, *(c["id"] for c in _children(stack, first))]
    body = {"flow_runs": {"id": {"any_": tree}}, "task_runs": {"name": {"like_": "ingest-source"}}}
    assert len(stack.post("task_runs/filter", body)) == 1  # skf-train's stages reuse what it ingested
    body = {"artifacts": {"flow_run_id": {"any_": [first]}, "type": {"any_": ["markdown"]}}}
    (summary,) = [
        a["data"] for a in stack.post("artifacts/filter", body) if a["key"].startswith("skf-retrain-")
    ]
    assert "New version `fleet-nightly@1`" in summary and "unchanged" not in summary.lower(), summary
    again = stack.run_named("skf-retrain/nightly", parameters)
    assert _wait(stack, again) == ["COMPLETED"]
    body["artifacts"]["flow_run_id"]["any_"] = [again]
    (summary,) = [
        a["data"] for a in stack.post("artifacts/filter", body) if a["key"].startswith("skf-retrain-")
    ]
    assert "nothing new" in summary and "fleet-nightly@1" in summary, summary


def test_two_hosts_train_at_once_and_resume_each_others_runs(
    fleet: tuple[Stack, dict[str, str]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow import MlflowClient

    stack, shared = fleet
    data = make_tiny_dataset(tmp_path / "data")
    host_a, host_b = tmp_path / "host-a", tmp_path / "host-b"
    workers = {"a": _host(stack, "host-a", host_a), "b": _host(stack, "host-b", host_b)}
    try:
        # 1. two configurations at once: each host takes one (each worker's limit is 1)
        runs = [
            stack.run_deployment(tiny_params(data, name="fleet", training={"overrides": {"train.seed": s}}))
            for s in (1, 2)
        ]
        assert _wait(stack, *runs) == ["COMPLETED", "COMPLETED"], _worker_logs(stack)
        (a_start, a_end), (b_start, b_end) = (_interval(_flow_run(stack, r)) for r in runs)
        assert a_start < b_end and b_start < a_end, "the two trainings did not run at the same time"
        assert all((h / "runs").is_dir() for h in (host_a, host_b)), "one host trained both"
        limits = httpx.post(f"{stack.api}/concurrency_limits/filter", json={}, timeout=10).json()
        assert [lim["tag"] for lim in limits] == []  # no server-wide gpu limit was created
        assert _flow_run(stack, runs[0])["name"] == "demo-fleet"
        # the same request again finds everything done: no SKB pass, no step, no new version
        again = stack.run_deployment(
            tiny_params(data, name="fleet", training={"overrides": {"train.seed": 1}})
        )
        assert _wait(stack, again) == ["COMPLETED"]
        summary = stack.summary(again)
        assert "0 computed, 12 cached, 0 failed, 0 SKB forward passes" in summary
        assert "Training**: skipped" in summary and "Evaluation** (skipped" in summary
        _check_the_ui_sees_it(stack, trained=runs[0], repeated=again)
        _check_retrain_ingests_once(stack, data)

        # 2. stopped on host A after its step-2 checkpoint ...
        stop(workers.pop("b"), signal.SIGINT)
        stopped = tiny_params(
            data, name="fleet", training={"overrides": {"train.seed": 3}, "stop_after_step": 2}
        )
        assert _wait(stack, stack.run_deployment(stopped)) == ["FAILED"]
        stop(workers.pop("a"), signal.SIGINT)
        # ... resumed on host B, which never saw that run directory
        workers["b"] = _host(stack, "host-b", host_b)
        stopped["training"].pop("stop_after_step")
        resumed = stack.run_deployment(stopped)
        assert _wait(stack, resumed) == ["COMPLETED"], _worker_logs(stack)
        summary = stack.summary(resumed)
        assert "Training**: resumed, 4 steps" in summary
        run_id = summary.split("MLflow run: ")[1].split("/#/runs/")[1].split()[0]
        assert f"MLflow run: {shared['MLFLOW_TRACKING_URI']}/#/runs/{run_id}" in summary
        assert "version 3 (registered), challenger" in summary  # alias read from the version itself
        client = MlflowClient(shared["MLFLOW_TRACKING_URI"])
        steps = [m.step for m in client.get_metric_history(run_id, "train/loss")]
        assert sorted(steps) == [1, 2, 3, 4], steps  # nothing logged twice across the hosts

        # 4. a missing SKB checkpoint: fails before ingest
        missing = f"{shared['SKF_STORAGE_URI']}/weights/hrnet_w48_pascal_context_cls59_480x480.pth"
        bad = tiny_params(data, name="never-ingested", training={"skb_checkpoint": missing})
        failed = stack.run_deployment(bad)
        assert _wait(stack, failed) == ["FAILED"]
        assert "does not exist" in (_flow_run(stack, failed)["state"]["message"] or "")
    finally:
        for proc in workers.values():
            stop(proc, signal.SIGINT)

    monkeypatch.setenv("SKF_CATALOG_URL", shared["SKF_CATALOG_URL"])
    from components.data.ingest import list_versions

    assert list_versions("never-ingested") == []
    assert [v.ref for v in list_versions("fleet")] == ["fleet@1"]
