"""``training.gpus: N`` launches N torchrun processes (DDP) from the flow: rank 0 logs and checkpoints.

On CPU the processes use gloo, exactly as N GPUs would use NCCL. A 2-process run through the ``train-model``
flow is stopped after its step-2 checkpoint and rerun: it resumes, in the same single MLflow run, and ends
with the weights of an uninterrupted 2-process run made on other services.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.pipeline_fixtures import (
    assert_same_weights,
    latest_state,
    make_tiny_dataset,
    tiny_params,
    train_reference,
    use_home,
)

pytestmark = pytest.mark.slow

OVERRIDES = {"train": {"iterations": 4, "batch_size": 2, "crop": 32, "ckpt_every": 2, "val_every": 2}}


def _plan(source: Path, gpus: int) -> Any:
    from components.pipeline.params import SkfTrainParams

    training = {"overrides": OVERRIDES, "val_fraction": 0.0, "gpus": gpus, "device": "cpu"}
    return SkfTrainParams.model_validate(tiny_params(source, training=training)).plan()


def test_config_hash_counts_the_processes(tmp_path: Path) -> None:
    from components.training.job import config_hash

    source = make_tiny_dataset(tmp_path / "data")
    one, two = (
        config_hash(_plan(source, n), skb_fingerprint="f", manifest_sha256="m", val_fraction=0.0)
        for n in (1, 2)
    )
    assert one != two  # the recipe's batch is per process: two processes train other weights


def test_two_process_training_from_the_flow_stops_resumes_and_matches(
    prefect_harness: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow import MlflowClient

    from components.data.ingest import ingest
    from components.training.job import TrainingInterrupted
    from flows.train import train_model

    source = make_tiny_dataset(tmp_path / "data")
    plan = _plan(source, gpus=2)

    # the reference: uninterrupted, called as a job, on its own services
    reference = train_reference(monkeypatch, tmp_path / "reference", source, plan)
    assert reference.steps == 4

    use_home(monkeypatch, tmp_path / "home")
    ref = ingest(str(source), name="tiny", layout="lol").ref
    with pytest.raises(TrainingInterrupted, match="stopped after step 2"):
        train_model(ref, plan, stop_after_step=2)
    resumed = train_model(ref, plan)
    assert resumed["status"] == "resumed" and resumed["steps"] == 4
    assert resumed["config_hash"] == reference.config_hash

    # one MLflow run, logged by rank 0 only: each step once, tagged with the world size
    client = MlflowClient((tmp_path / "home" / "mlruns").as_uri())
    run = client.get_run(resumed["run_id"])
    assert run.data.tags["world_size"] == "2"
    (experiment,) = [e for e in client.search_experiments() if e.name == "skf"]
    assert len(client.search_runs([experiment.experiment_id])) == 1
    steps = [m.step for m in client.get_metric_history(resumed["run_id"], "train/loss")]
    assert sorted(steps) == [1, 2, 3, 4]

    got = latest_state(tmp_path / "home", reference.config_hash)
    assert got["world_size"] == 2 and len(got["rng"]) == 2
    assert_same_weights(got, latest_state(tmp_path / "reference", reference.config_hash))
