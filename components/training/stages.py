"""Multi-stage training: sub-networks trained in sequence (RetinexNet, KinD, KinD++), one engine run each.

A staged recipe lists its stages (:class:`~components.recipes.StageConfig`); the family declares which it
knows (:class:`~components.baselines.family.StageSpec`). :func:`train_stages` builds the network once and
runs the generic :class:`~components.training.engine.Trainer` once per stage over it, with a routine that
optimises only that stage's sub-networks:

* each stage checkpoints under ``run_dir/stages/<k>-<name>/checkpoints`` and, when finished, writes
  ``done.json``; a rerun skips finished stages (restoring the network from their last checkpoint) and
  resumes an interrupted stage from its own checkpoint, so a run stopped in stage 2 resumes in stage 2;
* all stages log to the same MLflow run: metrics prefixed with the stage name on one global step axis,
  the stage's engine settings as ``stage.<name>.*`` params, a ``stage`` tag naming the running stage;
* the semantic losses (SCH, SA) apply to the final stage only (the paper's rule, checked by the recipe).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from components.recipes import Recipe, StageConfig
from components.registry import create, resolved_spec
from components.training.checkpoint import load_training_state
from components.training.engine import FitResult, Progress, Trainer
from components.training.loggers import NullLogger, RunLogger

__all__ = ["StageLogger", "has_checkpoint", "stage_dir", "train_stages"]

log = logging.getLogger(__name__)
DONE = "done.json"


def stage_dir(run_dir: str | os.PathLike[str], index: int, stage: StageConfig) -> Path:
    """Where stage ``index`` (0-based) keeps its checkpoints and its ``done.json``."""
    return Path(run_dir) / "stages" / f"{index + 1}-{stage.name}"


def has_checkpoint(run_dir: str | os.PathLike[str]) -> bool:
    """Whether a run directory holds any training checkpoint, single-stage or of some stage."""
    root = Path(run_dir)
    return (root / "checkpoints" / "latest.pt").is_file() or any(root.glob("stages/*/checkpoints/latest.pt"))


class StageLogger:
    """A :class:`RunLogger` for one stage of a shared run: prefixed metrics, global steps, stage params.

    The final stage's checkpoint artifact keeps the unprefixed path: it is the run's trained network.
    """

    def __init__(self, inner: RunLogger, stage: str, offset: int, *, final: bool = False) -> None:
        self.inner, self.stage, self.offset, self.final = inner, stage, offset, final

    def log_params(self, params: Mapping[str, Any]) -> None:
        # the engine's settings differ per stage (iterations, batch size): MLflow params cannot change
        self.inner.log_params(
            {f"stage.{self.stage}.{k}" if k.startswith("trainer.") else k: v for k, v in params.items()}
        )

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        self.inner.log_metrics({f"{self.stage}/{k}": v for k, v in metrics.items()}, self.offset + step)

    def log_image(self, image: torch.Tensor, name: str, step: int) -> None:
        self.inner.log_image(image, f"{self.stage}/{name}", self.offset + step)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        if self.final:
            self.inner.log_artifact(path, artifact_path)
        else:
            self.inner.log_artifact(path, f"{self.stage}/{artifact_path}" if artifact_path else self.stage)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self.inner.set_tags({**tags, "stage": self.stage})


def _restore(net: nn.Module, directory: Path) -> None:
    """Load a finished stage's final network weights (its newest checkpoint)."""
    state = load_training_state(directory / "checkpoints" / "latest.pt", map_location="cpu")
    net.load_state_dict(state["modules"]["net"])


def _mark_done(directory: Path, result: FitResult) -> None:
    record = {"step": result.step, "checkpoint": str(result.checkpoint) if result.checkpoint else None}
    tmp = directory / f".{DONE}.tmp"
    tmp.write_text(json.dumps(record))
    os.replace(tmp, directory / DONE)


def train_stages(
    recipe: Recipe,
    train_dataset: Dataset,
    val_loader: Any = None,
    *,
    run_dir: str | os.PathLike[str],
    skb: nn.Module | None = None,
    prior_cache: Any = None,
    baseline_spec: str | None = None,
    logger: RunLogger | None = None,
    progress: Callable[[Progress], None] | None = None,
    resume: bool | str | Path = True,
    params: Mapping[str, Any] | None = None,
    on_checkpoint: Callable[[Path], None] | None = None,
    **trainer_overrides: Any,
) -> FitResult:
    """Train ``recipe``'s stages in order over one network; see the module docstring.

    ``on_checkpoint`` gets each stage checkpoint and each stage's ``done.json`` as they are written."""
    from components.training.routines import (
        _init_from,
        build_routine,
        priors_loader_for,
        run_params,
        trainer_config,
    )

    if isinstance(resume, str | Path):
        raise ValueError("a staged run resumes from its own stage checkpoints: pass resume=True or False")
    spec = resolved_spec(baseline_spec or recipe.baseline)
    torch.manual_seed(recipe.train.seed)  # identical network init for a given recipe
    net = create(spec, **recipe.builder_kwargs())
    logger = logger or NullLogger()
    total = recipe.train.iterations
    offset = 0
    result: FitResult | None = None
    base_crop = getattr(train_dataset, "crop", None)
    for index, stage in enumerate(recipe.stages):
        directory = stage_dir(run_dir, index, stage)
        if resume and (directory / DONE).is_file():
            _restore(net, directory)
            log.info("stage %s already trained: skipped (weights from %s)", stage.name, directory)
            result = FitResult(offset + stage.iterations, 0, directory / "checkpoints" / "latest.pt")
            offset += stage.iterations
            continue
        routine = build_routine(spec, recipe, skb, prior_cache, stage=stage, net=net)
        if index == 0 and recipe.train.init_checkpoint:
            _init_from(routine, recipe.train.init_checkpoint)
        loader_hook = priors_loader_for(routine)
        if loader_hook is not None and getattr(train_dataset, "priors_loader", "absent") is None:
            train_dataset.priors_loader = loader_hook  # type: ignore[attr-defined]
        if base_crop is not None:  # the stage's crop (KinD trains its nets on different patch sizes)
            size = stage.crop or recipe.train.crop
            train_dataset.crop = (size, size)  # type: ignore[attr-defined]
        config = trainer_config(recipe, **trainer_overrides)
        config = config.model_copy(
            update={
                "iterations": stage.iterations,
                "batch_size": stage.batch_size or recipe.train.batch_size,
                # a stage shorter than the validation interval still validates once, at its end
                "val_every": min(config.val_every, stage.iterations) if config.val_every else 0,
            }
        )
        if skb is not None and config.device:
            skb.to(torch.device(config.device))

        def staged(p: Progress, offset: int = offset) -> None:
            if progress is not None:
                progress(replace(p, step=offset + p.step, total=total))

        trainer = Trainer(
            routine,
            config,
            run_dir=directory,
            logger=StageLogger(logger, stage.name, offset, final=index == len(recipe.stages) - 1),
            progress=staged,
            on_checkpoint=on_checkpoint,
        )
        resolved = {**run_params(routine), **(params or {})}
        resolved["training.stages"] = ",".join(s.name for s in recipe.stages)
        stage_result = trainer.fit(train_dataset, val_loader, resume=bool(resume), params=resolved)
        _mark_done(directory, stage_result)
        if on_checkpoint is not None:
            on_checkpoint(directory / DONE)
        offset += stage.iterations
        result = replace(stage_result, step=offset)
    for p in net.parameters():  # the network leaves training whole
        p.requires_grad_(True)
    if base_crop is not None:
        train_dataset.crop = base_crop  # type: ignore[attr-defined]
    assert result is not None
    return result
