"""Multi-stage training in the generic engine, on a two-sub-network toy family.

The Retinex-style families (RetinexNet, KinD, KinD++) train sub-networks in sequence; these tests pin the
engine's promises with the smallest family that has two: each stage trains only its sub-networks, logs under
its prefix on one step axis, checkpoints at its boundary, and a run stopped inside stage 2 resumes inside
stage 2 with the weights an uninterrupted run ends with. Bad stage lists fail before any work.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from components import registry
from components.baselines import family as family_module
from components.baselines.family import BaselineFamily, PriorsFor, StageSpec, register_family
from components.recipes import Recipe, RecipeError
from components.training import InMemoryLogger
from components.training.engine import Progress, StepContext
from components.training.routines import BaselineRoutine, TrainingSetupError, train
from components.training.stages import stage_dir


class TwoNet(nn.Module):
    """``first`` brightens, ``second`` refines first's output."""

    def __init__(self, skf: bool = False, width: int = 4, se_factory: Any = None) -> None:
        super().__init__()
        self.first = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, 3, 3, padding=1)
        )
        self.second = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, 3, 3, padding=1)
        )

    def forward(self, low: Tensor, sem: Any = None) -> Tensor:
        return self.second(self.first(low))


class TwoRoutine(BaselineRoutine):
    def train_step(self, batch: Mapping[str, Any], step: int, ctx: StepContext) -> dict[str, Tensor]:
        low, high = batch["low"], batch["high"]
        net = ctx.modules["net"]
        if self.stage.name == "first":  # type: ignore[union-attr]
            terms = {"l1": (net.first(low) - high).abs().mean()}
        else:
            terms = {"l1": (net.second(net.first(low).detach()) - high).abs().mean()}
        loss, metrics = self.weighted(terms)
        ctx.backward_step(loss, "net", name="loss")
        return metrics

    def enhance(self, low: Tensor, batch: Mapping[str, Any] | None = None) -> Tensor:
        return self.net(low)


class TwoFamily(BaselineFamily):
    name = "two-stage-toy"
    description = "two sub-networks trained in sequence"
    network = TwoNet
    default_se = "se/restormer-xattn-gdfn@1"
    se_slots = ()
    sch_preset = "snr"
    routine = TwoRoutine
    smoke_model = {"width": 4}
    stages = (StageSpec("first", ("first",), ("l1",)), StageSpec("second", ("second",), ("l1",)))

    def enhance(
        self, net: nn.Module, low: Tensor, priors_for: PriorsFor | None, *, two_pass: bool = False
    ) -> Tensor:
        return net(low)


@pytest.fixture()
def two_stage(monkeypatch: pytest.MonkeyPatch) -> None:
    registry.load_builtins()
    family_module.families()
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setattr(family_module, "_FAMILIES", dict(family_module._FAMILIES))
    register_family(TwoFamily)


class Pairs(Dataset):
    def __init__(self, n: int = 6) -> None:
        self.low = torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 0.3

    def __len__(self) -> int:
        return len(self.low)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"low": self.low[i], "high": (self.low[i] * 3).clamp(0, 1)}


def _recipe(**changes: Any) -> Recipe:
    stage = {"modules": ["first"], "iterations": 3, "losses": {"l1": {"weight": 1.0}}}
    data: dict[str, Any] = {
        "name": "two-stage-toy",
        "baseline": "baseline/two-stage-toy@1",
        "model": {"width": 4},
        "optimizer": {"name": "adam", "lr": 1e-2},
        "train": {"iterations": 6, "batch_size": 2, "crop": 32, "val_every": 100, "ckpt_every": 1},
        "stages": [
            {**stage, "name": "first"},
            {**stage, "name": "second", "modules": ["second"], "optimizer": {"name": "adam", "lr": 5e-3}},
        ],
    }
    data.update(changes)
    return Recipe.model_validate(data)


def _weights(path: Path) -> dict[str, Tensor]:
    return torch.load(path, weights_only=True, map_location="cpu")["modules"]["net"]


def test_each_stage_trains_its_sub_network_and_logs_under_its_prefix(two_stage: None, tmp_path: Path) -> None:
    torch.manual_seed(0)
    initial = TwoNet(width=4).state_dict()  # what train() builds for seed 0... compared by stage below
    logger = InMemoryLogger()
    result = train(_recipe(), Pairs(), run_dir=tmp_path / "run", logger=logger, device="cpu")
    assert result.step == 6
    first = _weights(stage_dir(tmp_path / "run", 0, _recipe().stages[0]) / "checkpoints" / "latest.pt")
    final = _weights(result.checkpoint)
    # stage 1 moved only `first`; stage 2 moved only `second`
    assert all(torch.equal(final[k], v) for k, v in first.items() if k.startswith("first."))
    assert any(not torch.equal(final[k], v) for k, v in first.items() if k.startswith("second."))
    assert set(initial) == set(final)
    steps = {key: [s for s, _ in logger.history(key)] for key in ("first/train/l1", "second/train/l1")}
    assert steps == {"first/train/l1": [1, 2, 3], "second/train/l1": [4, 5, 6]}  # one global step axis
    assert logger.params["stage.first.trainer.iterations"] == 3
    assert logger.params["stage.second.trainer.iterations"] == 3
    assert logger.tags["stage"] == "second"
    for index, stage in enumerate(_recipe().stages):
        assert (stage_dir(tmp_path / "run", index, stage) / "done.json").is_file()


def test_a_run_stopped_in_stage_two_resumes_in_stage_two_with_identical_weights(
    two_stage: None, tmp_path: Path
) -> None:
    whole = train(_recipe(), Pairs(), run_dir=tmp_path / "whole", device="cpu")

    class Stop(Exception):
        pass

    def stop_at_five(p: Progress) -> None:
        if p.step == 5:
            raise Stop

    with pytest.raises(Stop):
        train(_recipe(), Pairs(), run_dir=tmp_path / "cut", device="cpu", progress=stop_at_five)
    stages = _recipe().stages
    assert (stage_dir(tmp_path / "cut", 0, stages[0]) / "done.json").is_file()
    assert not (stage_dir(tmp_path / "cut", 1, stages[1]) / "done.json").is_file()

    seen: list[int] = []
    resumed = train(
        _recipe(), Pairs(), run_dir=tmp_path / "cut", device="cpu", progress=lambda p: seen.append(p.step)
    )
    assert seen == [6]  # stage 1 skipped, stage 2 resumed after its step 2 (global step 5)
    a, b = _weights(whole.checkpoint), _weights(resumed.checkpoint)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"stages": [{"name": "first", "modules": ["third"], "iterations": 3, "losses": {"l1": {}}},
                     {"name": "second", "modules": ["second"], "iterations": 3, "losses": {"l1": {}}}]},
         "sub-network(s) ['third']"),
        ({"stages": [{"name": "first", "modules": ["first"], "iterations": 3, "losses": {"ssim": {}}},
                     {"name": "second", "modules": ["second"], "iterations": 3, "losses": {"l1": {}}}]},
         "unknown loss term(s) ['ssim']"),
        ({"stages": [{"name": "second", "modules": ["second"], "iterations": 3, "losses": {"l1": {}}},
                     {"name": "first", "modules": ["first"], "iterations": 3, "losses": {"l1": {}}}]},
         "the last stage of baseline/two-stage-toy@1 must be 'second'"),
    ],
)  # fmt: skip
def test_a_stage_list_the_family_cannot_train_fails_before_any_work(
    two_stage: None, tmp_path: Path, changes: dict[str, Any], message: str
) -> None:
    with pytest.raises((RecipeError, TrainingSetupError), match=re.escape(message)):
        train(_recipe(**changes), Pairs(), run_dir=tmp_path / "run", device="cpu")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("stage_change", "message"),
    [
        ({"iterations": 0}, "greater than 0"),
        ({"sa": True}, "only the final stage"),
        ({"sch": True}, "only the final stage"),
    ],
)
def test_bad_stage_settings_are_recipe_errors(stage_change: dict[str, Any], message: str) -> None:
    from pydantic import ValidationError

    stages = [
        {"name": "first", "modules": ["first"], "iterations": 3, "losses": {"l1": {}}, **stage_change},
        {"name": "second", "modules": ["second"], "iterations": 3, "losses": {"l1": {}}},
    ]
    with pytest.raises(ValidationError, match=message):
        _recipe(stages=stages)


def test_stage_iterations_must_add_up_to_the_run() -> None:
    from pydantic import ValidationError

    with pytest.raises(
        ValidationError, match=r"must equal the sum of the stages' iterations \(6: first 3, second 3\)"
    ):
        _recipe(train={"iterations": 5, "batch_size": 2, "crop": 32, "val_every": 100, "ckpt_every": 1})


def test_stages_are_overridden_by_name_and_rescaled_to_the_run_length() -> None:
    from components.recipes import load_recipe

    recipe = load_recipe("retinexnet", {"stages.relight.iterations": 9000, "train.iterations": 120})
    assert [(s.name, s.iterations) for s in recipe.stages] == [("decom", 30), ("relight", 90)]
    # each stage's schedule shrinks with it: the decay after a fifth of the stage stays there
    assert [s.scheduler.milestones for s in recipe.stages] == [[6], [6]]
    assert load_recipe("kind", {"stages.restore.batch_size": 2}).stages[-1].batch_size == 2
    with pytest.raises(RecipeError, match=r"no stage 'nope' to set \(stages: decom, relight\)"):
        load_recipe("retinexnet", {"stages.nope.iterations": 3})
    with pytest.raises(RecipeError, match="must equal the sum of the stages' iterations"):
        load_recipe("retinexnet", {"stages.relight.iterations": 9000})  # the run length says nothing
