"""The training-step benchmark script (``benchmarks/train_step.py``) on tiny shapes.

The script times minutes of work at the recipe shapes; these tests run its building blocks (the real
routines, the interleaved measurement, the component probes, the report) at batch 2 and 64² crops so a
refactor of the engine or the routines that breaks the benchmark fails here, not on the next measuring day.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    """``benchmarks/train_step.py`` as a module (it is a script, not a package member)."""
    spec = importlib.util.spec_from_file_location(
        "skf_train_step_bench", ROOT / "benchmarks" / "train_step.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def tiny(bench: ModuleType, monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    """The benchmark at batch 2 and 64x64 crops (priors then come at 16², 8² and 4²), one thread."""
    monkeypatch.setattr(bench, "MODELS", {"drbn": (2, 64), "snr-net": (2, 64)})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield bench
    torch.set_num_threads(threads)


def _args() -> argparse.Namespace:
    return argparse.Namespace(
        threads=1,
        malloc="glibc",
        device="cpu",
        amp="off",
        warmup=0,
        steps=2,
        online_steps=1,
        layout="auto",
        sa_precision="auto",
        cpu_kernels="auto",
    )


@pytest.mark.slow
def test_measurement_and_report_for_both_baselines(tiny: ModuleType) -> None:
    env = tiny._env(_args())
    env["load_before"] = env["load_after"] = "0.00"  # main() adds these around the measurement
    report = {"env": env, "models": {}}
    for model, variants in (("drbn", ["a", "b", "b-nosa"]), ("snr-net", ["a", "b", "b-se"])):
        raw = tiny.measure(model, variants, warmup=0, steps=2, shares=True, online_steps=1)
        assert set(raw["wall"]) >= {*variants, "SE", "SCH"}
        assert all(len(raw["wall"][v]) == 2 and min(raw["wall"][v]) > 0 for v in variants)
        for v in variants:  # every variant ran real steps with finite losses
            assert raw["metrics"][v] and all(
                torch.isfinite(torch.tensor(x)) for x in raw["metrics"][v].values()
            )
        summary = tiny.summarise(model, raw, {})
        assert summary["batch"] == 2 and summary["crop"] == 64
        assert summary["variants"]["b"]["ratio_wall"] == pytest.approx(
            summary["variants"]["b"]["wall_s"] / summary["variants"]["a"]["wall_s"]
        )
        report["models"][model] = summary
    assert "SA" in report["models"]["drbn"]["components_of_b"]  # DRBN's recipe has SA, SNR's does not
    assert "SA" not in report["models"]["snr-net"]["components_of_b"]
    assert "recipe_amortised" in report["models"]["snr-net"]
    text = tiny.markdown(report)
    assert "| snr-net (2x64²) | recipe step, amortised" in text
    assert "| drbn | SA |" in text
    assert "SE CPU ops compiled" in text or "SE CPU ops eager" in text


@pytest.mark.parametrize("model", ["drbn", "snr-net"])
def test_se_probe_hands_each_block_a_gradient_in_the_networks_layout(tiny: ModuleType, model: str) -> None:
    """The isolated SE timing must see what the step sees: on CPU the networks run channels-last, and the
    gradient reaching an SE block from the next layer is channels-last too. (A scalar loss on the block's
    output would hand back an NCHW gradient and make accumulating the block's own gradients into it
    several times slower, inflating SNR-Net's SE share by ~0.2 s.)"""
    runner = tiny.Runner(model, "b", None)
    probe = tiny.component_probes(runner)["SE"]
    net = runner.routine.net
    blocks = (
        [net.recur4.fuseblk_1, net.recur4.fuseblk_2, net.recur4.fuseblk_3]
        if model == "drbn"
        else [net.att_block_1, net.att_block_2, net.att_block_3]
    )
    seen: list[bool] = []

    def watch(_module: torch.nn.Module, _inputs: object, out: torch.Tensor) -> None:
        out.register_hook(lambda g: seen.append(g.is_contiguous(memory_format=torch.channels_last)))

    handles = [b.register_forward_hook(watch) for b in blocks]
    try:
        probe()
    finally:
        for h in handles:
            h.remove()
    assert seen == [True] * 3
