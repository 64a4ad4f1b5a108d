"""The training step machinery shared by every baseline, and the ``train`` entry point.

A routine turns a :class:`~components.recipes.Recipe` into what the engine runs: the network (and any extra
trained module, such as the SA discriminator), Adam optimisers, the per-iteration LR schedule, and one
iteration of the recipe. :class:`BaselineRoutine` holds what all baselines share (losses, optimisers, where
priors come from); each family's own step lives with its family in :mod:`components.baselines`
(``family.routine``), and :func:`build_routine` asks the family for it.

Batches are dicts with ``low``/``high`` images in [0, 1] (what
:class:`~components.data.torch_dataset.PairedImageDataset` yields) and, in cached mode, ``priors``.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, LRScheduler
from torch.utils.data import Dataset

from components.baseline_losses import build_baseline_loss, ssim
from components.errors import SKFError
from components.recipes import OptimizerConfig, Recipe, SchedulerConfig, StageConfig
from components.registry import create, resolved_spec
from components.skb import Priors, needs_labels
from components.training.engine import (
    FitResult,
    Progress,
    Trainer,
    TrainerConfig,
    data_workers,
    select_device,
)
from components.training.loggers import RunLogger

__all__ = [
    "BaselineRoutine",
    "TrainingSetupError",
    "build_optimizer",
    "build_scheduler",
    "build_routine",
    "check_model_overrides",
    "run_params",
    "sample_grid",
    "train",
    "trainer_config",
]

log = logging.getLogger(__name__)

SCH_SPEC = "loss/sch@1"
SA_SPEC = "loss/sa@1"


class TrainingSetupError(SKFError, ValueError):
    """The recipe, SKB and data do not fit together; the message says what to change."""


# ---------------------------------------------------------------------------------------------------
# Optimisers and schedules from the recipe
# ---------------------------------------------------------------------------------------------------
def build_optimizer(params: Any, cfg: OptimizerConfig, *, lr: float | None = None) -> Optimizer:
    """Adam/AdamW with the recipe's betas, eps and weight decay (``lr`` overrides the recipe's)."""
    cls = torch.optim.AdamW if cfg.name == "adamw" else torch.optim.Adam
    return cls(
        params, lr=cfg.lr if lr is None else lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay
    )


def lr_factor(cfg: SchedulerConfig, iterations: int | None = None) -> Callable[[int], float]:
    """Multiplier of the base lr after ``it`` iterations: linear warm-up, then multistep/step/cosine decay.

    ``cosine`` anneals from 1 to ``min_factor`` over the ``iterations`` after the warm-up (required then).
    """
    milestones = list(cfg.milestones or [])
    if cfg.name == "cosine" and not iterations:
        raise ValueError("a cosine schedule needs the run's iterations")
    span = max(1, (iterations or 0) - cfg.warmup)

    def factor(it: int) -> float:
        warm = min(1.0, (it + 1) / cfg.warmup) if cfg.warmup else 1.0
        if cfg.name == "cosine":
            t = min(max(it - cfg.warmup, 0), span) / span
            return warm * (cfg.min_factor + (1 - cfg.min_factor) * 0.5 * (1 + math.cos(math.pi * t)))
        if cfg.name == "multistep":
            decays = sum(1 for m in milestones if it >= m)
        elif cfg.name == "step":
            decays = it // int(cfg.step_size or 1)
        else:
            decays = 0
        return warm * cfg.gamma**decays

    return factor


def build_scheduler(optimizer: Optimizer, cfg: SchedulerConfig, iterations: int | None = None) -> LRScheduler:
    """A per-iteration ``LambdaLR``; its state (the iteration count) resumes exactly."""
    return LambdaLR(optimizer, lr_factor(cfg, iterations))


# ---------------------------------------------------------------------------------------------------
# Shared routine machinery
# ---------------------------------------------------------------------------------------------------
def psnr(pred: Tensor, target: Tensor) -> Tensor:
    """Mean per-image PSNR (data range 1) of clamped predictions."""
    mse = (pred.float().clamp(0, 1) - target.float()).square().flatten(1).mean(1)
    return (10 * torch.log10(1.0 / mse.clamp_min(1e-10))).mean()


def sample_grid(rows: Sequence[Tensor], max_images: int = 2) -> Tensor:
    """(3, k·H, 3·W) grid: per image, low | enhanced | ground truth side by side."""
    low, pred, high = (t[:max_images].float().clamp(0, 1) for t in rows)
    return torch.cat([torch.cat([a, b, c], dim=-1) for a, b, c in zip(low, pred, high, strict=True)], dim=-2)


class BaselineRoutine:
    """Recipe-driven optimiser/scheduler/loss plumbing common to all baselines.

    Subclasses (one per family, next to the family) implement ``train_step`` and ``enhance`` (through the
    family's test-time flow); ``validate`` and ``sample_images`` score and show what ``enhance`` returns.
    """

    def __init__(
        self,
        family: Any,
        net: nn.Module,
        recipe: Recipe,
        skb: nn.Module | None,
        stage: StageConfig | None = None,
    ) -> None:
        sch_on, sa_on = (
            recipe.stage_semantics(stage) if stage else (recipe.skf.sch.enabled, recipe.skf.sa.enabled)
        )
        if sa_on and not family.supports_sa:
            raise TrainingSetupError(
                f"SA is not defined for {family.spec} (docs/method.md §5); set skf.sa.enabled=false"
            )
        self.family = family
        self.net = net
        self.recipe = recipe
        self.skf = recipe.skf
        self.skb = skb
        #: the stage this routine trains (multi-stage families) and its loss weights by term name
        self.stage = stage
        self.stage_weights = {name: term.weight for name, term in (stage.losses if stage else {}).items()}
        self.sa_enabled = sa_on
        self.rec_losses = {
            name: (build_baseline_loss(name, **term.params), term.weight, term.every)
            for name, term in recipe.losses.items()
        }
        self.sch = None
        if sch_on:
            self.sch = create(
                SCH_SPEC,
                num_classes=self._num_classes(),
                weight=self.skf.sch.weight,
                normalizer=self.skf.sch.normalizer,
                every=self.skf.sch.every,
            )
        #: SA (the families that support it, on their final stage): the loss and its raw discriminator,
        #: which is checkpointed and optimised next to the network
        self.sa = None
        if sa_on:
            self.sa = create(
                SA_SPEC,
                num_classes=self._num_classes(),
                lam=self.skf.sa.lam,
                weight=self.skf.sa.weight,
                official_compat=self.skf.sa.official_compat,
                precision=self.skf.sa.precision,
            )
            self._disc = self.sa.discriminator
        self._optimizers: dict[str, Optimizer] | None = None
        self._schedulers: dict[str, LRScheduler] | None = None
        if stage is not None:
            trained = {id(p) for m in stage.modules for p in net.get_submodule(m).parameters()}
            for p in net.parameters():  # the other sub-networks are frozen in this stage
                p.requires_grad_(id(p) in trained)

    def _num_classes(self) -> int:
        return int(getattr(self.skb, "num_classes", 59))

    # TrainingRoutine -------------------------------------------------------------------------------
    def modules(self) -> dict[str, nn.Module]:
        return {"net": self.net, "disc": self._disc} if self.sa is not None else {"net": self.net}

    def _optimizer_config(self) -> OptimizerConfig:
        return self.stage.optimizer or self.recipe.optimizer if self.stage else self.recipe.optimizer

    def _scheduler_config(self) -> SchedulerConfig:
        return (self.stage.scheduler or SchedulerConfig()) if self.stage else self.recipe.scheduler

    def _param_lrs(self) -> dict[str, tuple[nn.Module, float]]:
        lr = self._optimizer_config().lr
        if self.stage is not None:  # only this stage's sub-networks are optimised
            lrs = {"net": (nn.ModuleList(self.net.get_submodule(m) for m in self.stage.modules), lr)}
        else:
            lrs = {"net": (self.net, lr)}
        if self.sa is not None:  # D lr = G lr × ratio (official 1e-7), decayed on the same schedule
            lrs["disc"] = (self._disc, lr * self.skf.sa.d_lr_ratio)
        return lrs

    def discriminator_step(
        self, ctx: Any, fake: Tensor, high: Tensor, probs: Tensor, real_probs: Tensor | None = None
    ) -> Tensor:
        """One SA discriminator update on (fake, real) with the class masks; returns its loss (detached).

        Call it before the generator's loss is assembled; the generator term is
        ``self.sa.generator_loss(fake, probs)``.
        """
        assert self.sa is not None
        if self.sa.discriminator is not ctx.modules["disc"]:  # use the DDP-wrapped D when distributed
            self.sa.discriminator = ctx.modules["disc"]
        d_out = self.sa.discriminator_loss(fake, high, probs, real_probs)
        # Official-compat D loss is not detached from G, so keep that graph for the G backward.
        ctx.backward_step(d_out.loss, "disc", name="sa_d", retain_graph=self.sa.official_compat)
        return d_out.loss.detach()

    def optimizers(self) -> dict[str, Optimizer]:
        if self._optimizers is None:
            cfg = self._optimizer_config()
            self._optimizers = {
                name: build_optimizer([p for p in m.parameters() if p.requires_grad], cfg, lr=lr)
                for name, (m, lr) in self._param_lrs().items()
            }
        return self._optimizers

    def schedulers(self) -> dict[str, LRScheduler]:
        if self._schedulers is None:
            cfg = self._scheduler_config()
            steps = self.stage.iterations if self.stage else self.recipe.train.iterations
            self._schedulers = {n: build_scheduler(o, cfg, steps) for n, o in self.optimizers().items()}
        return self._schedulers

    def weighted(self, terms: Mapping[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """The stage's loss: Σ weight · term over the recipe's terms (computed by the family's step)."""
        missing = sorted(set(self.stage_weights) - set(terms))
        if missing:
            raise TrainingSetupError(f"stage {self.stage.name!r} computed no {missing}")  # type: ignore[union-attr]
        total = sum((self.stage_weights[n] * terms[n].float() for n in self.stage_weights), torch.zeros(()))
        return total, {n: terms[n].detach() for n in self.stage_weights}

    def enhance(self, low: Tensor, batch: Mapping[str, Any] | None = None) -> Tensor:
        """The family's test-time flow; SE priors of the low-light input (online SKB, or the batch's cache)."""
        if not self.skf.se:
            return self.family.enhance(self.net, low, None)
        return self.family.enhance(
            self.net, low, lambda stage, image: self.test_priors(batch or {"low": low})
        )

    # the step's semantic inputs and losses ------------------------------------------------------
    def step_priors(self, batch: Mapping[str, Any], step: int) -> tuple[Priors | None, Any, bool]:
        """(priors, SE inputs, SCH due): the crop's priors when SE, a due SCH or SA needs them."""
        sch_due = self.sch is not None and self.sch.should_apply(step)
        priors = self.fixed_priors(batch) if (self.skf.se or sch_due or self.sa is not None) else None
        sem = self.family.sem_inputs(priors, batch["high"].shape[-2:]) if self.skf.se else None
        return priors, sem, sch_due

    def semantic_losses(
        self,
        ctx: Any,
        fake: Tensor,
        high: Tensor,
        priors: Priors | None,
        sch_due: bool,
        metrics: dict[str, Tensor],
    ) -> Tensor:
        """SA (one discriminator update, then the generator term) and SCH on the output ``fake``.

        Returns the generator-side total to add to the loss (zero when neither applies); ``metrics``
        gains ``d_loss``/``adv``/``sch``.
        """
        total = fake.new_zeros((), dtype=torch.float32)
        size = high.shape[-2:]
        if self.sa is not None:
            assert priors is not None
            probs = priors.probabilities(size)
            metrics["d_loss"] = self.discriminator_step(ctx, fake, high, probs)
            adv = self.sa.generator_loss(fake, probs)
            total = total + adv
            metrics["adv"] = adv.detach()
        if sch_due:
            assert priors is not None and self.sch is not None
            sch = self.sch(fake, high, priors.labels(size))
            total = total + sch
            metrics["sch"] = sch.detach()
        return total

    def require_fixed_skb_input(self) -> None:
        """Families whose SKB segments a fixed image (not an intermediate output) refuse 'intermediate'."""
        if self.skf.enabled and self.skf.skb_input not in ("lq", "gt"):
            raise TrainingSetupError(
                f"{self.family.spec} with SKF segments a fixed image: set skf.skb_input to 'lq' or 'gt'"
            )

    def validate(self, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        """PSNR and SSIM of the test-time output on a validation batch."""
        pred = self.enhance(batch["low"], batch)
        return {"psnr": psnr(pred, batch["high"]), "ssim": ssim(pred.float().clamp(0, 1), batch["high"])}

    def sample_images(self, batch: Mapping[str, Any]) -> Tensor:
        return sample_grid((batch["low"], self.enhance(batch["low"], batch), batch["high"]))

    # helpers ------------------------------------------------------------------------------------
    def reconstruction(self, outputs: Any, target: Tensor, step: int) -> Tensor:
        total = target.new_zeros((), dtype=torch.float32)
        for loss, weight, every in self.rec_losses.values():
            if step % every == 0:
                total = total + weight * loss(outputs, target).float()
        return total

    def _run_skb(self, image: Tensor, *, grad: bool, labels: Tensor | None = None) -> Priors:
        """The SKB on ``image``; an SKB made from label maps (the oracle) gets the batch's ``labels``."""
        if self.skb is None:
            raise TrainingSetupError(
                f"recipe {self.recipe.name!r} runs the SKB online but no SKB was given: pass "
                "skb=create('skb/hrnet-w48-pascal@1', checkpoint=...)"
            )
        if not needs_labels(self.skb):
            return self.skb(image, grad=grad).to(image.device)
        if labels is None:
            raise TrainingSetupError(
                f"SKB {getattr(self.skb, 'spec', '?')} makes its priors from label maps, but the batch has no "
                "'labels': train on a labelled dataset version (ingest a source with labels/ and classes.json)"
            )
        return self.skb(image, labels=labels.to(image.device), grad=grad).to(image.device)

    def _batch_priors(self, batch: Mapping[str, Any]) -> Priors:
        maps = batch.get("priors")
        if maps is None:
            raise TrainingSetupError(
                f"recipe {self.recipe.name!r} uses cached priors (skf.skb_mode=cached) but the batch has no "
                "'priors': build the dataset with priors_loader=PriorsLoader.from_cache(cache) after "
                "`skf precompute`, or set skf.skb_mode=online"
            )
        return Priors(**{k: v.float() for k, v in maps.items()})

    def fixed_priors(self, batch: Mapping[str, Any]) -> Priors:
        """Priors of a fixed image (``lq``/``gt``): from the batch (cached) or the SKB (online, no grad)."""
        if self.skf.skb_mode == "cached":
            return self._batch_priors(batch)
        image = batch["high"] if self.skf.skb_input == "gt" else batch["low"]
        return self._run_skb(image, grad=False, labels=batch.get("labels"))

    def test_priors(self, batch: Mapping[str, Any]) -> Priors:
        """Priors at evaluation time: always of the low-light input (online when an SKB is present)."""
        if self.skb is not None:
            return self._run_skb(batch["low"], grad=False, labels=batch.get("labels"))
        return self._batch_priors(batch)


# ---------------------------------------------------------------------------------------------------
# Factory and entry point
# ---------------------------------------------------------------------------------------------------
def _needs_skb(recipe: Recipe) -> bool:
    """Online mode runs the SKB in the step (DRBN: on r₃ and ŷ₁); cached mode reads priors only."""
    return recipe.skf.enabled and recipe.skf.skb_mode == "online"


def build_routine(
    baseline_spec: str | None,
    recipe: Recipe,
    skb: nn.Module | None = None,
    prior_cache: Any = None,
    *,
    stage: StageConfig | None = None,
    net: nn.Module | None = None,
) -> BaselineRoutine:
    """The routine for ``baseline_spec`` (default: the recipe's) with the recipe's SKF switches.

    ``skb`` is required whenever the SKB runs inside the step (online mode, DRBN's SCH/SA on its own
    output); ``prior_cache`` (a :class:`~components.prior_cache.PriorCache`) feeds cached mode, through
    :meth:`priors_loader` on the dataset. Multi-stage recipes build one routine per ``stage`` over one
    shared ``net`` (built here when not given).
    """
    from components.baselines import UnknownFamilyError, families, get_family

    spec = resolved_spec(baseline_spec or recipe.baseline)
    try:
        family = get_family(spec)
    except UnknownFamilyError:
        known = ", ".join(f.spec for f in families())
        raise TrainingSetupError(f"no training routine for {spec}; supported: {known}") from None
    family.check_stages(recipe)
    if recipe.stages and stage is None:
        stage = recipe.stages[0]
    if skb is None and _needs_skb(recipe):
        raise TrainingSetupError(
            f"recipe {recipe.name!r} (skb_mode={recipe.skf.skb_mode}, SCH/SA on the network output) runs the "
            "SKB during training: pass skb=create('skb/hrnet-w48-pascal@1', checkpoint=...)"
        )
    if recipe.skf.enabled and recipe.skf.skb_mode == "cached" and prior_cache is None:
        log.info("cached priors: batches must carry 'priors' (dataset priors_loader); no prior_cache given")
    if net is None:
        try:
            net = create(spec, **recipe.builder_kwargs())
        except (TypeError, ValueError, RuntimeError) as exc:
            raise TrainingSetupError(
                f"cannot build {spec} with model overrides {dict(recipe.model)}: {exc}; fix the model.* values"
            ) from exc
    staged = {"stage": stage} if stage is not None else {}  # one-stage routines take no stage argument
    routine = family.routine(family, net, recipe, skb, **staged)
    routine.spec = spec  # type: ignore[attr-defined]
    routine.prior_cache = prior_cache  # type: ignore[attr-defined]
    return routine


def check_model_overrides(spec: str, model: Mapping[str, Any]) -> None:
    """Reject unknown or ill-typed ``model.*`` overrides of ``spec`` before any work (the family knows)."""
    from components.baselines import get_family

    get_family(spec).check_overrides(model)


def priors_loader_for(routine: BaselineRoutine) -> Any:
    """The dataset hook delivering crop-aligned cached priors, or ``None`` when the routine needs none.

    The maps stay in the cache's fp16 through the DataLoader, its pinned memory and the non-blocking copy
    (half the bytes of fp32); ``_batch_priors`` widens them on the device, which is exact.
    """
    cache = getattr(routine, "prior_cache", None)
    if not routine.skf.enabled or routine.skf.skb_mode != "cached" or cache is None:
        return None
    from components.prior_cache import PriorsLoader

    return PriorsLoader.from_cache(cache, dtype=torch.float16)


def trainer_config(recipe: Recipe, **overrides: Any) -> TrainerConfig:
    """Engine settings from the recipe's ``train`` section (``overrides`` win, e.g. ``device``)."""
    t = recipe.train
    base = {
        "iterations": t.iterations,
        "batch_size": t.batch_size,
        "seed": t.seed,
        "amp": t.precision == "amp",
        "grad_clip": t.grad_clip,
        "val_every": t.val_every,
        "ckpt_every": t.ckpt_every,
    }
    return TrainerConfig(**{**base, **overrides})


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, Mapping):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    elif isinstance(value, list | tuple):
        out[prefix] = json.dumps(list(value))
    else:
        out[prefix] = value


def run_params(routine: BaselineRoutine) -> dict[str, Any]:
    """Reproducibility record: resolved component specs, SKB mode/fingerprint and the full recipe."""
    recipe, skf = routine.recipe, routine.skf
    params: dict[str, Any] = {
        "component.baseline": getattr(routine, "spec", recipe.baseline),
        "skf.enabled": skf.enabled,
        "skf.skb_mode": skf.skb_mode,
        "skf.skb_input": skf.skb_input,
    }
    if skf.se:
        params["component.se"] = resolved_spec(recipe.model.get("se") or routine.family.default_se)
    if routine.sch is not None:
        params["component.sch"] = resolved_spec(SCH_SPEC)
    if getattr(routine, "sa", None) is not None:
        params["component.sa"] = resolved_spec(SA_SPEC)
    if routine.skb is not None and hasattr(routine.skb, "describe"):
        params.update(routine.skb.describe())  # skb.spec, skb.pretrained, skb.fingerprint, ...
    cache = getattr(routine, "prior_cache", None)
    if cache is not None:
        params["skb.fingerprint"] = cache.fingerprint
    _flatten("recipe", recipe.model_dump(mode="json"), params)
    return params


def _init_from(routine: BaselineRoutine, uri: str) -> None:
    """Non-strict warm start (SNR-SKF from the SNR baseline, docs/method.md §7); reports skipped keys."""
    from components.checkpoints import load_checkpoint

    state = load_checkpoint(uri).state_dict
    result = routine.net.load_state_dict(state, strict=False)
    log.info(
        "initialised %s from %s: %d missing key(s) (e.g. new SE blocks), %d unexpected",
        routine.family.name,
        uri,
        len(result.missing_keys),
        len(result.unexpected_keys),
    )


def train(
    recipe: Recipe,
    train_dataset: Dataset,
    val_loader: Any = None,
    *,
    run_dir: str | Path,
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
    """Train ``recipe`` on ``train_dataset`` (validation batches from ``val_loader``, carved from train).

    In cached mode a dataset exposing a ``priors_loader`` attribute that is unset gets the cache's
    loader, so each sample carries priors cut and flipped like its crop. Extra ``params`` (dataset
    version, ...) are logged with the resolved specs, SKB mode and fingerprint. ``on_checkpoint`` gets
    every file of ``run_dir`` a resume needs, as it is written (:class:`~components.training.engine.Trainer`).
    """
    if recipe.stages:
        from components.training.stages import train_stages

        return train_stages(
            recipe, train_dataset, val_loader, run_dir=run_dir, skb=skb, prior_cache=prior_cache,
            baseline_spec=baseline_spec, logger=logger, progress=progress, resume=resume, params=params,
            on_checkpoint=on_checkpoint, **trainer_overrides,
        )  # fmt: skip
    torch.manual_seed(recipe.train.seed)  # identical network init for a given recipe
    routine = build_routine(baseline_spec, recipe, skb, prior_cache)
    if recipe.train.init_checkpoint:
        _init_from(routine, recipe.train.init_checkpoint)
    loader_hook = priors_loader_for(routine)
    if loader_hook is not None and getattr(train_dataset, "priors_loader", "absent") is None:
        train_dataset.priors_loader = loader_hook  # type: ignore[attr-defined]
    config = trainer_config(recipe, **trainer_overrides)
    if skb is not None and config.device:  # the SKB is not a trained module: place it like the network
        skb.to(torch.device(config.device))
    trainer = Trainer(
        routine, config, run_dir=run_dir, logger=logger, progress=progress, on_checkpoint=on_checkpoint
    )
    resolved = run_params(routine)
    device = select_device(config.device)
    sa = getattr(routine, "sa", None)
    if sa is not None:  # what "auto" became on this run's device
        resolved["skf.sa.precision"] = sa.resolved_precision(device)
    resolved["data.num_workers"] = data_workers(config.num_workers, device)
    return trainer.fit(train_dataset, val_loader, resume=resume, params={**resolved, **(params or {})})
