"""A toy baseline family in one file: network, training step, family and recipe.

It proves the claim of :mod:`components.baselines`: a new baseline is a network, a family and a recipe, and
the whole pipeline (plan, train, evaluate, register, load by alias) takes it without any other change.
Register it with :func:`register_toy` (the tests do so inside a fixture that restores the registries).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch.nn.functional as F
import yaml
from torch import Tensor, nn

from components.baselines.family import BaselineFamily, SESlot, register_family
from components.training.engine import StepContext
from components.training.routines import BaselineRoutine
from models.se import SEFactory

SPEC = "baseline/toy@1"


class ToyNet(nn.Module):
    """conv → (SE at 1/4 fed by F0, when ``skf``) → conv, as a residual on the input."""

    def __init__(self, skf: bool = False, width: int = 8, se_factory: SEFactory | None = None) -> None:
        super().__init__()
        if skf and se_factory is None:
            raise ValueError("ToyNet with skf=True needs an se_factory")
        self.skf = skf
        self.head = nn.Conv2d(3, width, 3, padding=1)
        self.tail = nn.Conv2d(width, 3, 3, padding=1)
        if skf:
            self.se = se_factory(48, width)  # type: ignore[misc]

    def forward(self, low: Tensor, sem: tuple[Tensor, ...] | None = None) -> Tensor:
        feat = F.relu(self.head(low))
        if self.skf:
            if sem is None:
                raise ValueError("ToyNet was built with skf=True and needs sem=(F0,)")
            quarter = self.se(F.avg_pool2d(feat, 4, ceil_mode=True), sem[0])
            feat = feat + F.interpolate(quarter, size=feat.shape[-2:], mode="nearest")
        return low + self.tail(feat)


class ToyRoutine(BaselineRoutine):
    """Reconstruction (+ SCH) on the toy network, priors of the low-light input."""

    def train_step(self, batch: Mapping[str, Any], step: int, ctx: StepContext) -> dict[str, Tensor]:
        low, high = batch["low"], batch["high"]
        sch_due = self.sch is not None and self.sch.should_apply(step)
        priors = self.fixed_priors(batch) if (self.skf.se or sch_due) else None
        sem = self.family.sem_inputs(priors, high.shape[-2:]) if self.skf.se else None
        with ctx.autocast():
            pred = ctx.modules["net"](low, sem=sem)
        loss = self.reconstruction(pred, high, step)
        if sch_due:
            assert priors is not None and self.sch is not None
            loss = loss + self.sch(pred.float(), high, priors.labels(high.shape[-2:]))
        ctx.backward_step(loss, "net", name="loss")
        return {"loss": loss.detach()}


class ToyFamily(BaselineFamily):
    name = "toy"
    description = "toy network for the one-file family test"
    network = ToyNet
    default_se = "se/restormer-xattn-gdfn@1"
    se_slots = (SESlot("se", "F0"),)
    sch_preset = "snr"
    routine = ToyRoutine
    smoke_model = {"width": 8}


RECIPE: dict[str, Any] = {
    "name": "toy-skf",
    "description": "toy + SE (GDFN) + SCH, cached priors",
    "baseline": SPEC,
    "model": {"width": 8},
    "optimizer": {"name": "adam", "lr": 1e-3},
    "scheduler": {"name": "constant"},
    "train": {"iterations": 2, "batch_size": 2, "crop": 32, "val_every": 2, "ckpt_every": 2},
    "losses": {"charbonnier": {"weight": 1.0, "params": {"eps": 1e-6, "reduction": "mean"}}},
    "skf": {
        "se": True,
        "sch": {"enabled": True, "weight": 1.0, "normalizer": "nhw", "every": 1},
        "sa": {"enabled": False},
        "skb_mode": "cached",
        "skb_input": "lq",
    },
}


def register_toy() -> None:
    """Register the toy family (and its ``baseline/toy@1`` builder)."""
    register_family(ToyFamily)


def write_recipe(folder: Path) -> Path:
    """The toy recipe as a YAML file in ``folder`` (recipes are files; this one lives with its test)."""
    path = folder / "toy-skf.yaml"
    path.write_text(yaml.safe_dump(RECIPE, sort_keys=False))
    return path
