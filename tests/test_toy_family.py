"""A new baseline family from one file goes through ``skf-train`` end to end, and the SE swap is real."""

from __future__ import annotations

from pathlib import Path

import pytest
from pipeline_fixtures import TINY_OVERRIDES, make_tiny_dataset, tiny_params

from components import registry
from components.baselines import family as family_module


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_dataset(tmp_path_factory.mktemp("toy-demo") / "data")


@pytest.fixture()
def toy_registered(monkeypatch: pytest.MonkeyPatch) -> None:
    """The toy family registered for one test; both registries are restored afterwards."""
    from toy_family import register_toy

    registry.load_builtins()
    family_module.families()
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setattr(family_module, "_FAMILIES", dict(family_module._FAMILIES))
    register_toy()


@pytest.mark.slow
def test_a_one_file_family_trains_evaluates_registers_and_loads_by_alias(
    prefect_harness: None, skf_home: Path, tiny_dataset: Path, toy_registered: None, tmp_path: Path
) -> None:
    from toy_family import ToyNet, write_recipe

    from components.serving import load_enhancer
    from flows.pipeline import skf_train

    params = {
        "dataset": {"source": str(tiny_dataset), "name": "toy", "demo": False, "layout": "lol"},
        "baseline": "baseline/toy@1",
        "components": {"skb": "skb/hrnet-w48-lite@1"},
        "training": {"recipe": str(write_recipe(tmp_path)), "val_fraction": 0.0},
        "registry": {"model_name": "toy-model"},
    }
    result = skf_train(params=params)
    assert result["train"]["status"] == "trained" and result["train"]["steps"] == 2
    assert result["evaluate"]["status"] == "evaluated" and "test/psnr" in result["evaluate"]["metrics"]
    assert result["register"]["status"] == "registered" and result["register"]["challenger"]

    enhancer = load_enhancer("models:/toy-model@challenger", device="cpu")
    assert isinstance(enhancer.net, ToyNet) and enhancer.spec.baseline == "baseline/toy@1"
    assert enhancer.family.name == "toy" and enhancer.skb is not None


@pytest.mark.slow
def test_skf_train_swaps_the_se_variant_and_records_it(
    prefect_harness: None, skf_home: Path, tiny_dataset: Path
) -> None:
    from mlflow import MlflowClient

    from components.serving import load_enhancer
    from components.settings import get_settings
    from flows.pipeline import skf_train

    swapped = "se/restormer-xattn-gdfn@1"  # SNR-SKF is released with the dual-gated FFN variant
    params = tiny_params(
        tiny_dataset, name="swap", components={"se": swapped}, registry={"model_name": "swap-model"},
        training={"overrides": TINY_OVERRIDES},
    )  # fmt: skip
    result = skf_train(params=params)
    assert result["train"]["status"] == "trained" and result["register"]["status"] == "registered"
    run = MlflowClient(get_settings().mlflow_tracking_uri).get_run(result["train"]["run_id"])
    assert run.data.params["component.se"] == swapped and run.data.params["recipe.model.se"] == swapped
    enhancer = load_enhancer("models:/swap-model@challenger", device="cpu")
    assert enhancer.spec.baseline_kwargs["se"] == swapped
    assert type(enhancer.net.att_block_1.ffn).__name__ == "GatedDConvFeedForward"
