"""A multi-stage family through `skf-train` as a user runs it: stopped inside stage 2, resumed there.

The resumed run must skip stage 1 (its output exists), continue stage 2 from its checkpoint and end with
exactly the weights of an uninterrupted run, on CPU.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from pipeline_fixtures import install_work_spies, make_tiny_dataset, recipe_params, use_home

from components.baselines import get_family

SMOKE = {f"model.{k}": v for k, v in get_family("retinexnet").smoke_model.items()}
# 3 + 3 steps (the recipe's 3,000 + 3,000 rescaled), a checkpoint every step
OVERRIDES = {
    **SMOKE,
    "train": {"iterations": 6, "batch_size": 2, "crop": 32, "val_every": 3, "ckpt_every": 1},
}


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_dataset(tmp_path_factory.mktemp("tiny-retinex") / "data")


def _params(tiny_dataset: Path, **training: Any) -> dict[str, Any]:
    return recipe_params(tiny_dataset, "retinexnet-skf", OVERRIDES, "tiny-retinex", **training)


def _final_weights(result: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The registered run's final network (its checkpoint artifact: a local file in these tests)."""
    from urllib.parse import urlparse

    from components.training.checkpoint import load_training_state

    path = Path(urlparse(result["train"]["checkpoint_uri"]).path)
    return load_training_state(path, map_location="cpu")["modules"]["net"]


@pytest.mark.slow
def test_a_run_stopped_in_stage_two_resumes_in_stage_two_with_the_uninterrupted_weights(
    prefect_harness: None, tmp_path: Path, tiny_dataset: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flows.pipeline import skf_train

    use_home(monkeypatch, tmp_path / "whole")
    whole = skf_train(params=_params(tiny_dataset))
    assert whole["train"]["status"] == "trained" and whole["train"]["steps"] == 6

    home = use_home(monkeypatch, tmp_path / "cut")
    work = install_work_spies(monkeypatch)
    with pytest.raises(Exception, match="stopped after step 5"):
        skf_train(params=_params(tiny_dataset, stop_after_step=5))  # stage 2 (steps 4-6) is 2 steps in
    assert work.train_steps == 5
    stage_dirs = sorted((home / "runs").glob("*/stages/*"))
    assert [d.name for d in stage_dirs] == ["1-decom", "2-relight"]
    assert (stage_dirs[0] / "done.json").is_file() and not (stage_dirs[1] / "done.json").is_file()

    work.reset()
    resumed = skf_train(params=_params(tiny_dataset))
    assert work.train_steps == 1  # stage 1 skipped, stage 2 resumed at its third step
    assert resumed["train"]["status"] == "resumed" and resumed["train"]["steps"] == 6
    a, b = _final_weights(whole), _final_weights(resumed)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert "test/psnr" in resumed["evaluate"]["metrics"] and resumed["register"]["status"] == "registered"

    from mlflow import MlflowClient

    from components.settings import get_settings

    run = MlflowClient(get_settings().mlflow_tracking_uri).get_run(resumed["train"]["run_id"])
    assert {"decom/train/loss", "relight/train/loss", "relight/train/sch"} <= set(run.data.metrics)
    assert run.data.tags["stage"] == "relight"
