"""``compile``: the torch.compile'd training step equals the eager one (the reference) to tolerance.

Checked on CPU (inductor's C++ backend); on a GPU worker the same switch adds CUDA graphs
(``reduce-overhead``). The compiled network keeps its state-dict keys, so checkpoints stay interchangeable.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from components.training.engine import Trainer, TrainerConfig
from tests.engine_fixtures import ToyDataset, ToyRoutine
from tests.pipeline_fixtures import make_tiny_dataset, tiny_params, use_home


def _toy_params(tmp_path: Path, compile_mode: str) -> dict[str, torch.Tensor]:
    routine = ToyRoutine()
    config = TrainerConfig(iterations=4, batch_size=4, device="cpu", seed=3, compile=compile_mode)
    Trainer(routine, config, run_dir=tmp_path / compile_mode).fit(ToyDataset(16))
    return {k: v.detach().clone() for k, v in routine.net.state_dict().items()}


def test_compiled_toy_step_equals_eager(tmp_path: Path) -> None:
    eager, compiled = _toy_params(tmp_path, "off"), _toy_params(tmp_path, "default")
    assert eager.keys() == compiled.keys()  # no "_orig_mod." prefix: checkpoints stay interchangeable
    for key, value in eager.items():
        torch.testing.assert_close(compiled[key], value, rtol=1e-4, atol=1e-5, msg=key)


def test_unknown_compile_mode_is_refused() -> None:
    from components.training.plan import TrainingRequest

    with pytest.raises(ValueError, match="compile"):
        TrainingRequest(compile="fast")


@pytest.mark.slow
def test_compiled_skf_training_equals_eager(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The demo's SKF family through the job: SE blocks, SCH, cached priors, with and without compile."""
    from components.data.ingest import ingest
    from components.pipeline.params import SkfTrainParams
    from components.training.job import run_training

    source = make_tiny_dataset(tmp_path / "data")
    results: dict[str, Any] = {}
    for mode in ("off", "default"):
        home = use_home(monkeypatch, tmp_path / mode)
        training = {
            "overrides": {"train.iterations": 2, "train.ckpt_every": 2},
            "compile": mode,
            "device": "cpu",
        }
        plan = SkfTrainParams.model_validate(tiny_params(source, training=training)).plan()
        outcome = run_training(ingest(str(source), name="tiny", layout="lol").ref, plan, log=lambda _m: None)
        results[mode] = torch.load(
            home / "runs" / outcome.config_hash[:16] / "checkpoints" / "latest.pt", weights_only=True
        )["modules"]
        results[f"{mode}-hash"] = outcome.config_hash
    assert results["off-hash"] == results["default-hash"]  # how it ran, not what it trained
    for name, weights in results["off"].items():
        for key, value in weights.items():
            torch.testing.assert_close(results["default"][name][key], value, rtol=1e-3, atol=1e-4, msg=key)
