"""A run stopped on one host resumes on another: checkpoints travel through the storage URI.

Two hosts are two ``SKF_HOME`` folders sharing what a fleet shares: the catalog (PostgreSQL), the store
(S3 on a loopback moto server) and MLflow. Host A trains to step 3 of 6 and is stopped (its last checkpoint
is step 2); host B, which has never seen the run directory, resumes it in the same MLflow run. The final
weights equal an uninterrupted run's, and the metric history has each step once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tests.pipeline_fixtures import make_tiny_dataset, tiny_params

pytestmark = pytest.mark.slow

OVERRIDES = {
    "train": {"iterations": 6, "batch_size": 2, "crop": 32, "ckpt_every": 2, "val_every": 2},
    "skf.sch.every": 2,
}


def _use(monkeypatch: pytest.MonkeyPatch, home: Path, catalog: str, storage: str, mlflow: str) -> None:
    monkeypatch.setenv("SKF_HOME", str(home))
    monkeypatch.setenv("SKF_CATALOG_URL", catalog)
    monkeypatch.setenv("SKF_STORAGE_URI", storage)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow)


def _plan(source: Path) -> Any:
    from components.pipeline.params import SkfTrainParams

    params = tiny_params(source, training={"overrides": OVERRIDES, "val_fraction": 0.0})
    return SkfTrainParams.model_validate(params).plan()


def _weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    return {f"{m}.{k}": v for m, sd in state["modules"].items() for k, v in sd.items()}


def test_a_run_stopped_on_host_a_resumes_on_host_b(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, postgres_url: str, s3_env: str
) -> None:
    from mlflow import MlflowClient

    from components.data.ingest import ingest
    from components.training.job import TrainingInterrupted, run_training

    source = make_tiny_dataset(tmp_path / "data")
    plan = _plan(source)
    shared = {
        "catalog": postgres_url,
        "storage": f"s3://{s3_env}/store",
        "mlflow": (tmp_path / "shared-mlruns").as_uri(),
    }
    host_a, host_b = tmp_path / "host-a", tmp_path / "host-b"

    _use(monkeypatch, host_a, **shared)
    ref = ingest(str(source), name="tiny", layout="lol").ref
    with pytest.raises(TrainingInterrupted, match="stopped after step 3"):
        run_training(ref, plan, stop_after_step=3, log=lambda _m: None)
    (run_dir_a,) = (host_a / "runs").iterdir()
    assert sorted(p.name for p in (run_dir_a / "checkpoints").glob("step-*.pt")) == ["step-00000002.pt"]

    _use(monkeypatch, host_b, **shared)
    assert not (host_b / "runs").exists()
    resumed = run_training(ref, plan, log=lambda _m: None)
    assert resumed.status == "resumed" and resumed.steps == 6
    run_dir_b = host_b / "runs" / run_dir_a.name

    # the same run continued: each metric step logged once, 1..6, nothing of host A's lost step 3 twice
    client = MlflowClient(shared["mlflow"])
    history = client.get_metric_history(resumed.run_id, "train/loss")
    assert sorted(m.step for m in history) == [1, 2, 3, 4, 5, 6]

    # an uninterrupted run on its own services trains the same weights
    _use(
        monkeypatch,
        tmp_path / "reference",
        catalog=f"sqlite:///{tmp_path / 'reference.db'}",
        storage=str(tmp_path / "reference-store"),
        mlflow=(tmp_path / "reference-mlruns").as_uri(),
    )
    ref_ref = ingest(str(source), name="tiny", layout="lol").ref
    whole = run_training(ref_ref, plan, log=lambda _m: None)
    assert whole.status == "trained" and whole.config_hash == resumed.config_hash
    expected = _weights(tmp_path / "reference" / "runs" / run_dir_a.name / "checkpoints" / "latest.pt")
    got = _weights(run_dir_b / "checkpoints" / "latest.pt")
    assert expected.keys() == got.keys()
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=0, msg=key)


def test_mirror_skips_a_damaged_or_unfinished_copy(tmp_path: Path) -> None:
    from components.storage import open_storage
    from components.training.checkpoint import CheckpointManager
    from components.training.run_mirror import DIGEST_SUFFIX, RunMirror

    store = open_storage(tmp_path / "store")
    source = CheckpointManager(tmp_path / "a" / "checkpoints", keep_last=2)
    mirror_a = RunMirror(store, tmp_path / "a", "runs/x")
    for step in (2, 4, 6):
        mirror_a.push(source.save({"step": torch.tensor(step)}, step))
    keys = sorted(store.list("runs/x/"))
    assert [k.rsplit("/", 1)[-1] for k in keys if not k.endswith(DIGEST_SUFFIX)] == [
        "step-00000004.pt",
        "step-00000006.pt",
    ]  # the store rotates like the run directory
    store.put_bytes("runs/x/checkpoints/step-00000006.pt", b"damaged")  # digest no longer matches
    store.put_bytes("runs/x/checkpoints/step-00000008.pt", b"half")  # no digest: its copy never finished

    fetched = RunMirror(store, tmp_path / "b", "runs/x").pull()
    assert [p.name for p in fetched] == ["step-00000004.pt"]
    latest = torch.load(tmp_path / "b" / "checkpoints" / "latest.pt", weights_only=True)
    assert int(latest["step"]) == 4  # latest.pt points at the newest intact copy
