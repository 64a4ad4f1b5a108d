"""Shared pieces of the pipeline tests: tiny demo data, tiny parameters, and spies that count real work."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

# 64x96 crops, 3 per photo: 12 train and 3 test pairs. W48-lite SKB, a 16-channel SNR-Net, 4 steps.
TINY_OVERRIDES: dict[str, Any] = {
    "train": {"iterations": 4, "batch_size": 2, "crop": 32, "val_every": 2, "ckpt_every": 2},
    "skf.sch.every": 2,
}


def use_home(monkeypatch: pytest.MonkeyPatch, home: Path) -> Path:
    """Make ``home`` this process's SKF_HOME with everything in it (SQLite catalog, local store, file
    MLflow): the default layout of one host. The folder is created."""
    home.mkdir(parents=True, exist_ok=True)
    monkeypatch.setenv("SKF_HOME", str(home))
    for var in ("SKF_CATALOG_URL", "SKF_STORAGE_URI", "SKF_WEIGHTS_URI"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (home / "mlruns").as_uri())
    return home


def train_reference(monkeypatch: pytest.MonkeyPatch, home: Path, source: Path, plan: Any) -> Any:
    """An uninterrupted run of ``plan`` on ``source`` (ingested as ``tiny``), called as a job on ``home``'s
    own services: the weights a stopped-and-resumed or distributed run must reach."""
    from components.data.ingest import ingest
    from components.training.job import run_training

    use_home(monkeypatch, home)
    outcome = run_training(ingest(str(source), name="tiny", layout="lol").ref, plan, log=lambda _m: None)
    assert outcome.status == "trained", outcome
    return outcome


def latest_state(home: Path, config_hash: str) -> dict[str, Any]:
    """The ``latest.pt`` training state of the run ``config_hash`` under an SKF_HOME."""
    import torch

    path = home / "runs" / config_hash[:16] / "checkpoints" / "latest.pt"
    return torch.load(path, weights_only=True)


def assert_same_weights(got: dict[str, Any], expected: dict[str, Any]) -> None:
    """Two training states hold bit-equal weights for every module."""
    import torch

    assert got["modules"].keys() == expected["modules"].keys()
    for name, weights in expected["modules"].items():
        for key, value in weights.items():
            torch.testing.assert_close(got["modules"][name][key], value, rtol=0, atol=0, msg=f"{name}.{key}")


def tiny_params(source: Path, name: str = "tiny", **extra: Any) -> dict[str, Any]:
    """``skf-train`` parameters: the demo preset on ``source`` with a 4-step run and no validation split."""
    from components.recipes import deep_merge

    params: dict[str, Any] = {
        "preset": "demo",
        "dataset": {"source": str(source), "name": name, "demo": False, "layout": "lol"},
        "training": {"overrides": TINY_OVERRIDES, "val_fraction": 0.0},
        "registry": {"model_name": "tiny-model"},
    }
    return deep_merge(params, extra)


def recipe_params(
    source: Path, recipe: str, overrides: dict[str, Any], model_name: str, **training: Any
) -> dict[str, Any]:
    """:func:`tiny_params` training a shipped ``recipe`` (scaled by ``overrides``) with the lite HRNet SKB,
    registered as ``model_name``."""
    return tiny_params(
        source,
        training={"recipe": recipe, "overrides": overrides, **training},
        components={"skb": "skb/hrnet-w48-lite@1"},
        registry={"model_name": model_name},
    )


def make_tiny_dataset(root: Path) -> Path:
    from components.data.demo import generate_demo_dataset

    return generate_demo_dataset(root, size=(64, 96), pairs_per_photo=3)


@dataclass
class WorkCounter:
    skb_forwards: int = 0
    train_steps: int = 0
    registrations: int = 0

    def reset(self) -> None:
        self.skb_forwards = self.train_steps = self.registrations = 0


def install_work_spies(monkeypatch: pytest.MonkeyPatch) -> WorkCounter:
    """Count SKB forward passes, training iterations and model registrations done in this process."""
    import components.model_registry as mr
    from components.baselines import families
    from components.skb import SemanticKnowledgeBank

    counter = WorkCounter()
    forward, log_enhancer = SemanticKnowledgeBank.forward, mr.log_enhancer

    def counted_forward(self: Any, *args: Any, **kwargs: Any) -> Any:
        counter.skb_forwards += 1
        return forward(self, *args, **kwargs)

    def counting(step: Any) -> Any:
        def counted_step(self: Any, *args: Any, **kwargs: Any) -> Any:
            counter.train_steps += 1
            return step(self, *args, **kwargs)

        return counted_step

    def counted_log(*args: Any, **kwargs: Any) -> Any:
        counter.registrations += 1
        return log_enhancer(*args, **kwargs)

    monkeypatch.setattr(SemanticKnowledgeBank, "forward", counted_forward)
    for routine in {f.routine for f in families()}:  # every family's training step
        monkeypatch.setattr(routine, "train_step", counting(routine.train_step))
    monkeypatch.setattr(mr, "log_enhancer", counted_log)
    return counter
