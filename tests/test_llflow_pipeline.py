"""LLFlow as a user meets it: `skf-train` on the demo data, bad input, inference at odd sizes.

The registry sweep (`tests/test_families.py`) already builds, steps, round-trips and exports both LLFlow
families; the key-for-key model checks are in `tests/test_llflow_model.py`. This file covers what is
specific to a flow in the pipeline: the parent flow end to end, the NLL going non-finite, the padding.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from pipeline_fixtures import make_tiny_dataset, recipe_params
from torch.utils.data import Dataset

from components.baselines import get_family
from components.recipes import load_recipe
from components.registry import create

SMOKE = {f"model.{k}": v for k, v in get_family("llflow-s").smoke_model.items()}
SHORT = {"scheduler": {"name": "constant", "milestones": None, "warmup": 0}, "train.precision": "fp32"}


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_dataset(tmp_path_factory.mktemp("tiny-llflow") / "data")


class Pairs(Dataset):
    """32×32 low/high pairs where high is a brightened low."""

    def __init__(self, n: int = 4) -> None:
        self.low = torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 0.3

    def __len__(self) -> int:
        return len(self.low)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"low": self.low[i], "high": (self.low[i] * 3).clamp(0, 1)}


@pytest.mark.slow
def test_skf_train_runs_a_tiny_llflow_s_skf_on_the_demo_data(
    prefect_harness: None, skf_home: Path, tiny_dataset: Path
) -> None:
    """The parent flow trains, evaluates (raw and GT-mean) and registers an LLFlow-S-SKF."""
    from flows.pipeline import skf_train

    overrides = {
        **SMOKE,
        **SHORT,
        "train": {"iterations": 4, "batch_size": 2, "crop": 32, "val_every": 2, "ckpt_every": 2},
    }
    params = recipe_params(tiny_dataset, "llflow-s-skf", overrides, "tiny-llflow")
    result = skf_train(params=params)
    assert result["train"]["status"] == "trained" and result["train"]["steps"] == 4
    metrics = result["evaluate"]["metrics"]
    assert {"test/psnr", "test-gt-mean/psnr"} <= set(metrics)  # the paper's LLFlow rows are GT-mean
    assert result["register"]["status"] == "registered"
    from mlflow import MlflowClient

    from components.settings import get_settings

    logged = MlflowClient(get_settings().mlflow_tracking_uri).get_run(result["train"]["run_id"]).data.params
    assert logged["component.baseline"] == "baseline/llflow-s@1"
    assert (logged["skb.input_transform"], logged["skb.bn_mode"]) == ("log", "eval")


def _llflow_recipe(**extra: Any) -> Any:
    overrides = {
        **SMOKE,
        "train.iterations": 4,
        "train.batch_size": 2,
        "train.crop": 32,
        "train.val_every": 100,
        "train.ckpt_every": 1,
        **SHORT,
        **extra,
    }
    return load_recipe("llflow-s", overrides)


def test_a_non_finite_nll_stops_training_and_names_the_last_good_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from components.baseline_losses import FlowNLLLoss
    from components.training.engine import NonFiniteLossError
    from components.training.routines import train

    real = FlowNLLLoss.forward
    calls = {"n": 0}

    def nan_on_third(self: FlowNLLLoss, outputs: Any, target: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        value = real(self, outputs, target)
        return value * float("nan") if calls["n"] == 3 else value

    monkeypatch.setattr(FlowNLLLoss, "forward", nan_on_third)
    with pytest.raises(NonFiniteLossError) as info:
        train(_llflow_recipe(), Pairs(), run_dir=tmp_path / "run", device="cpu")
    err = info.value
    assert err.step == 3 and "non-finite loss 'nll' (nan) at step 3" in str(err)
    assert err.last_checkpoint is not None and f"last good checkpoint: {err.last_checkpoint}" in str(err)
    state = torch.load(err.last_checkpoint, weights_only=True, map_location="cpu")
    assert state["step"] == 2  # written before the failure, untouched by it


@pytest.mark.parametrize("size", [(37, 45), (8, 8), (61, 30)])
def test_odd_input_sizes_are_padded_and_cropped_back(size: tuple[int, int]) -> None:
    from components.inference import Enhancer, make_spec

    family = get_family("llflow-s")
    torch.manual_seed(0)
    net = create(family.spec, skf=False, **family.smoke_model)
    enhancer = Enhancer(
        net, None, make_spec(family.spec, net, None, baseline_kwargs=family.smoke_model)
    ).eval()
    x = torch.rand(1, 3, *size)
    with torch.no_grad():
        out = enhancer(x)
    assert out.shape == x.shape and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="divisible by 8.*pad"):
        net(torch.rand(1, 3, 36, 44))  # the network itself does not pad: the family does


def test_train_mode_bn_priors_cannot_be_cached() -> None:
    from components.recipes import RecipeError

    with pytest.raises(RecipeError, match="cannot be cached.*online"):
        load_recipe("llflow-s-skf", {"skf.skb_settings.bn_mode": "train", "skf.skb_mode": "cached"})
    recipe = load_recipe("llflow-s-skf", {"skf.skb_settings.bn_mode": "train", "skf.skb_mode": "online"})
    assert recipe.skf.skb_settings == {"input_transform": "log", "bn_mode": "train"}
    with pytest.raises(RecipeError, match="not SKB options"):
        load_recipe("llflow-s-skf", {"skf.skb_settings.colour": "blue"})


def test_the_training_skb_is_built_with_the_recipes_settings() -> None:
    from components.training.job import build_skb
    from components.training.plan import plan

    planned = plan(
        baseline="baseline/llflow-s@1",
        recipe="llflow-s-skf",
        skb="skb/hrnet-w48-lite@1",
        overrides={"skf.skb_settings.bn_mode": "train", "skf.skb_mode": "online"},
    )
    skb = build_skb(planned, "cpu")
    assert (skb.input_transform, skb.bn_mode) == ("log", "train")
    eval_skb = build_skb(
        plan(baseline="baseline/llflow-s@1", recipe="llflow-s-skf", skb="skb/hrnet-w48-lite@1")
    )
    assert eval_skb.fingerprint != skb.fingerprint  # priors of one setting are never served to the other


def test_full_image_histogram_equalisation_reaches_the_training_batch(
    skf_home: Path, tiny_dataset: Path
) -> None:
    """The equalised half is computed on the whole image before the crop, as released."""
    import numpy as np

    from components.baselines.llflow import histeq_feature
    from components.data.ingest import ingest
    from components.data.torch_dataset import PairedImageDataset

    result = ingest(str(tiny_dataset), name="eq", layout="lol")
    ds = PairedImageDataset(
        f"{result.dataset}@{result.version}", "train", crop=32, augment=False,
        input_features={"histeq": histeq_feature},
    )  # fmt: skip
    sample = ds[0]
    assert sample["histeq"].shape == sample["low"].shape
    low_full = ds._load(ds.pairs[0][0])
    top, left, h, w = (int(v) for v in sample["crop"])
    expected = histeq_feature(low_full)[top : top + h, left : left + w]
    assert np.array_equal(
        (sample["histeq"].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8), expected
    )
    assert not np.array_equal(expected, histeq_feature(low_full[top : top + h, left : left + w]))
