"""The training job's input pipeline: cached priors travel as fp16, DataLoader workers change nothing trained,
and every run records how long its steps waited for data.

The tiny demo training reads its images and cached priors through the real dataset and
:class:`~components.prior_cache.PriorsLoader`, once in the main process and once with two loader
workers (pickled dataset, each worker opening its own storage and catalog): the weights are bit-equal.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tests.pipeline_fixtures import (
    assert_same_weights,
    latest_state,
    make_tiny_dataset,
    tiny_params,
    use_home,
)

OVERRIDES = {"train": {"iterations": 4, "batch_size": 2, "crop": 32, "ckpt_every": 4, "val_every": 4}}


def _plan(source: Path, **training: Any) -> Any:
    from components.pipeline.params import SkfTrainParams

    fields = {"overrides": OVERRIDES, "val_fraction": 0.0, "device": "cpu", **training}
    return SkfTrainParams.model_validate(tiny_params(source, training=fields)).plan()


def test_cached_priors_reach_the_step_as_fp16(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The loader hands the step fp16 maps (half the bytes through pinned memory and the copy); the
    routine widens them on the device."""
    from components.training import routines

    seen: list[torch.dtype] = []
    original = routines.BaselineRoutine._batch_priors

    def spy(self: Any, batch: Any) -> Any:
        seen.extend(t.dtype for t in batch["priors"].values())
        priors = original(self, batch)
        assert priors.f0.dtype == torch.float32
        return priors

    monkeypatch.setattr(routines.BaselineRoutine, "_batch_priors", spy)
    from components.data.ingest import ingest
    from components.training.job import run_training

    source = make_tiny_dataset(tmp_path / "data")
    use_home(monkeypatch, tmp_path / "home")
    run_training(ingest(str(source), name="tiny", layout="lol").ref, _plan(source), log=lambda _m: None)
    assert seen and set(seen) == {torch.float16}


def test_loader_workers_train_the_same_weights_and_the_wait_is_logged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow import MlflowClient

    from components.data.ingest import ingest
    from components.training.job import run_training

    source = make_tiny_dataset(tmp_path / "data")
    states, runs = {}, {}
    for workers in (0, 2):
        home = use_home(monkeypatch, tmp_path / f"home-{workers}")
        outcome = run_training(
            ingest(str(source), name="tiny", layout="lol").ref,
            _plan(source, num_workers=workers),
            log=lambda _m: None,
        )
        states[workers] = latest_state(home, outcome.config_hash)
        runs[workers] = MlflowClient((home / "mlruns").as_uri()).get_run(outcome.run_id)
    assert_same_weights(states[2], states[0])
    for workers, run in runs.items():
        assert run.data.params["data.num_workers"] == str(workers)
        assert 0.0 <= run.data.metrics["perf/data_wait_share"] <= 1.0
        assert run.data.metrics["perf/step_s"] > 0
    # the same configuration: workers do not enter the config hash
    assert runs[0].data.tags["skf.config_hash"] == runs[2].data.tags["skf.config_hash"]
