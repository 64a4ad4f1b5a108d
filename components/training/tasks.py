"""Per-baseline training tasks (DRBN, SNR-Net, each with or without SKF) and the ``train`` entry point.

A task turns a :class:`~components.recipes.Recipe` into what the engine runs: the network (and the SA
discriminator), Adam optimisers, the per-iteration LR schedule, and one iteration of the official
recipe (docs/method.md §6) with the clean-implementation choices of §5.3 and §10:

* DRBN-SKF: recurrences 1–3 → SKB on their output r₃ *with gradients to the input* (weights frozen) →
  recurrence 4 with SE(F1, F0, Z) → SKB on ŷ₁ → D step (SA, persistent D, detached ŷ₁) → G step on
  −ΣSSIM + SCH + 0.1·adv. With ``skb_mode: cached`` (``skb_input: lq``) no HRNet runs in the step: the
  crop's cached priors feed SE, SCH and SA (a fast approximation; the released code cannot cache).
* SNR-SKF: priors of the low-light crop from the prior cache (batch key ``priors``), or the SKB run
  online on ``lq``/``gt`` per recipe; Charbonnier-sum + 10⁴·SCH on every 50th step.

Batches are dicts with ``low``/``high`` images in [0, 1] (what
:class:`~components.data.torch_dataset.PairedImageDataset` yields) and, in cached mode, ``priors``.
"""

from __future__ import annotations

import json
import logging
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
from components.recipes import OptimizerConfig, Recipe, RecipeError, SchedulerConfig
from components.registry import create, resolved_spec
from components.skb import Priors
from components.training.engine import FitResult, Progress, StepContext, Trainer, TrainerConfig, select_device
from components.training.loggers import RunLogger

__all__ = [
    "DRBNTask",
    "SKFTaskError",
    "SNRTask",
    "build_optimizer",
    "build_scheduler",
    "build_task",
    "check_model_overrides",
    "run_params",
    "train",
    "trainer_config",
]

log = logging.getLogger(__name__)

SCH_SPEC = "loss/sch@1"
SA_SPEC = "loss/sa@1"
# SE blocks are built inside the networks; these are the registry names of the variants they use.
SE_SPECS = {"drbn": "se/restormer-xattn-gdfn@1", "snr-net": "se/restormer-xattn-dual-gated@1"}
_SCH_NORMALIZERS = {"nhw": "nhw", "n59hw3": "nchw3"}  # recipe name -> loss/sch@1 name


class SKFTaskError(SKFError, ValueError):
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


def lr_factor(cfg: SchedulerConfig) -> Callable[[int], float]:
    """Multiplier of the base lr after ``it`` iterations: linear warm-up, then multistep/step decay."""
    milestones = list(cfg.milestones or [])

    def factor(it: int) -> float:
        warm = min(1.0, (it + 1) / cfg.warmup) if cfg.warmup else 1.0
        if cfg.name == "multistep":
            decays = sum(1 for m in milestones if it >= m)
        elif cfg.name == "step":
            decays = it // int(cfg.step_size or 1)
        else:
            decays = 0
        return warm * cfg.gamma**decays

    return factor


def build_scheduler(optimizer: Optimizer, cfg: SchedulerConfig) -> LRScheduler:
    """A per-iteration ``LambdaLR``; its state (the iteration count) resumes exactly."""
    return LambdaLR(optimizer, lr_factor(cfg))


# ---------------------------------------------------------------------------------------------------
# Shared task machinery
# ---------------------------------------------------------------------------------------------------
def psnr(pred: Tensor, target: Tensor) -> Tensor:
    """Mean per-image PSNR (data range 1) of clamped predictions."""
    mse = (pred.float().clamp(0, 1) - target.float()).square().flatten(1).mean(1)
    return (10 * torch.log10(1.0 / mse.clamp_min(1e-10))).mean()


def _grid(rows: Sequence[Tensor], max_images: int = 2) -> Tensor:
    """(3, k·H, 3·W) grid: per image, low | enhanced | ground truth side by side."""
    low, pred, high = (t[:max_images].float().clamp(0, 1) for t in rows)
    return torch.cat([torch.cat([a, b, c], dim=-1) for a, b, c in zip(low, pred, high, strict=True)], dim=-2)


class _BaseTask:
    """Recipe-driven optimiser/scheduler/loss plumbing common to all baselines."""

    family = ""

    def __init__(self, net: nn.Module, recipe: Recipe, skb: nn.Module | None) -> None:
        self.net = net
        self.recipe = recipe
        self.skf = recipe.skf
        self.skb = skb
        self.rec_losses = {
            name: (build_baseline_loss(name, **term.params), term.weight, term.every)
            for name, term in recipe.losses.items()
        }
        self.sch = None
        if self.skf.sch.enabled:
            self.sch = create(
                SCH_SPEC,
                num_classes=self._num_classes(),
                weight=self.skf.sch.weight,
                normalizer=_SCH_NORMALIZERS[self.skf.sch.normalizer],
                every=self.skf.sch.every,
            )
        self._optimizers: dict[str, Optimizer] | None = None
        self._schedulers: dict[str, LRScheduler] | None = None

    def _num_classes(self) -> int:
        return int(getattr(self.skb, "num_classes", 59))

    # TrainingTask -------------------------------------------------------------------------------
    def modules(self) -> dict[str, nn.Module]:
        return {"net": self.net}

    def _param_lrs(self) -> dict[str, tuple[nn.Module, float]]:
        return {"net": (self.net, self.recipe.optimizer.lr)}

    def optimizers(self) -> dict[str, Optimizer]:
        if self._optimizers is None:
            self._optimizers = {
                name: build_optimizer(
                    [p for p in m.parameters() if p.requires_grad], self.recipe.optimizer, lr=lr
                )
                for name, (m, lr) in self._param_lrs().items()
            }
        return self._optimizers

    def schedulers(self) -> dict[str, LRScheduler]:
        if self._schedulers is None:
            self._schedulers = {
                n: build_scheduler(o, self.recipe.scheduler) for n, o in self.optimizers().items()
            }
        return self._schedulers

    # helpers ------------------------------------------------------------------------------------
    def reconstruction(self, outputs: Any, target: Tensor, step: int) -> Tensor:
        total = target.new_zeros((), dtype=torch.float32)
        for loss, weight, every in self.rec_losses.values():
            if step % every == 0:
                total = total + weight * loss(outputs, target).float()
        return total

    def _run_skb(self, image: Tensor, *, grad: bool) -> Priors:
        if self.skb is None:
            raise SKFTaskError(
                f"recipe {self.recipe.name!r} runs the SKB online but no SKB was given: pass "
                "skb=create('skb/hrnet-w48-pascal@1', checkpoint=...)"
            )
        return self.skb(image, grad=grad).to(image.device)

    def _batch_priors(self, batch: Mapping[str, Any]) -> Priors:
        maps = batch.get("priors")
        if maps is None:
            raise SKFTaskError(
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
        return self._run_skb(image, grad=False)

    def test_priors(self, batch: Mapping[str, Any]) -> Priors:
        """Priors at evaluation time: always of the low-light input (online when an SKB is present)."""
        if self.skb is not None:
            return self._run_skb(batch["low"], grad=False)
        return self._batch_priors(batch)


# ---------------------------------------------------------------------------------------------------
# DRBN
# ---------------------------------------------------------------------------------------------------
def _drbn_sem(priors: Priors, size: tuple[int, int]) -> tuple[Tensor, Tensor, Tensor]:
    """DRBN's SE inputs (F1, F0, Z) with Z the full-resolution logits (channels-last, the SE's layout)."""
    return priors.f1, priors.f0, priors.full_logits(size, channels_last=True)


class DRBNTask(_BaseTask):
    """DRBN and DRBN-SKF (docs/method.md §6, §5.3)."""

    family = "drbn"

    def __init__(self, net: nn.Module, recipe: Recipe, skb: nn.Module | None) -> None:
        super().__init__(net, recipe, skb)
        self.sa = None
        if self.skf.sa.enabled:
            self.sa = create(
                SA_SPEC,
                num_classes=self._num_classes(),
                lam=self.skf.sa.global_weight,
                weight=self.skf.sa.weight,
                official_compat=self.skf.sa.official_bugs,
                precision=self.skf.sa.precision,
            )
            self._disc = self.sa.discriminator  # the raw D: checkpointed and optimised

    def modules(self) -> dict[str, nn.Module]:
        mods = {"net": self.net}
        if self.sa is not None:
            mods["disc"] = self._disc
        return mods

    def _param_lrs(self) -> dict[str, tuple[nn.Module, float]]:
        lrs = super()._param_lrs()
        if self.sa is not None:  # D lr = G lr × ratio (official 1e-7), decayed on the same schedule
            lrs["disc"] = (self._disc, self.recipe.optimizer.lr * self.skf.sa.d_lr_ratio)
        return lrs

    def _sem_source(
        self, batch: Mapping[str, Any], cached: Priors | None
    ) -> Callable[[Tensor], Any] | Any | None:
        if not self.skf.se:
            return None
        if self.skf.skb_input == "intermediate":  # segment r₃ with gradients to it (weights frozen)
            return lambda r3: _drbn_sem(self._run_skb(r3, grad=True), r3.shape[-2:])
        return _drbn_sem(cached if cached is not None else self.fixed_priors(batch), batch["low"].shape[-2:])

    def train_step(self, batch: Mapping[str, Any], step: int, ctx: StepContext) -> dict[str, Tensor]:
        low, high = batch["low"], batch["high"]
        size = high.shape[-2:]
        # Cached mode runs no HRNet at all: the crop's cached priors feed SE and stand in for HRNet(ŷ₁)
        # in SCH (labels) and SA (masks, 62-ch input); the released code segments ŷ₁ online instead.
        cached = self._batch_priors(batch) if self.skf.skb_mode == "cached" and self.skf.enabled else None
        with ctx.autocast():
            outputs = ctx.modules["net"](low, sem=self._sem_source(batch, cached))
        fake = outputs[0].float()
        metrics: dict[str, Tensor] = {}
        need_out_priors = self.sch is not None or self.sa is not None
        out_priors = cached
        if need_out_priors and cached is None:
            out_priors = self._run_skb(fake, grad=True)

        if self.sa is not None:
            assert out_priors is not None
            if self.sa.discriminator is not ctx.modules["disc"]:  # use the DDP-wrapped D when distributed
                self.sa.discriminator = ctx.modules["disc"]
            probs = out_priors.probabilities(size)
            real_probs = None
            if not self.sa.official_compat and cached is None:
                real_probs = self._run_skb(high, grad=False).probabilities(size)
            d_out = self.sa.discriminator_loss(fake, high, probs, real_probs)
            # Official-compat D loss is not detached from G, so keep that graph for the G backward.
            ctx.backward_step(d_out.loss, "disc", name="sa_d", retain_graph=self.sa.official_compat)
            metrics["d_loss"] = d_out.loss.detach()

        rec = self.reconstruction(outputs, high, step)
        g_loss = rec
        metrics["rec"] = rec.detach()
        if self.sch is not None and self.sch.should_apply(step):
            assert out_priors is not None
            sch = self.sch(fake, high, out_priors.labels(size))
            g_loss = g_loss + sch
            metrics["sch"] = sch.detach()
        if self.sa is not None:
            adv = self.sa.generator_loss(fake, probs)
            g_loss = g_loss + adv
            metrics["adv"] = adv.detach()
        ctx.backward_step(g_loss, "net", name="g_loss")
        metrics["g_loss"] = g_loss.detach()
        return metrics

    def enhance(self, low: Tensor) -> Tensor:
        """Inference as released: one pass, SE priors from the SKB on the recurrence-3 output."""
        if not self.skf.se:
            return self.net(low)[0]
        if self.skf.skb_input == "intermediate":
            return self.net(low, sem=lambda r3: _drbn_sem(self._run_skb(r3, grad=False), r3.shape[-2:]))[0]
        return self.net(low, sem=_drbn_sem(self.test_priors({"low": low}), low.shape[-2:]))[0]

    def validate(self, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        pred = self.enhance(batch["low"])
        return {"psnr": psnr(pred, batch["high"]), "ssim": ssim(pred.float().clamp(0, 1), batch["high"])}

    def sample_images(self, batch: Mapping[str, Any]) -> Tensor:
        return _grid((batch["low"], self.enhance(batch["low"]), batch["high"]))


# ---------------------------------------------------------------------------------------------------
# SNR-Net
# ---------------------------------------------------------------------------------------------------
def _snr_sem(priors: Priors) -> tuple[Tensor, Tensor, Tensor]:
    return priors.f0, priors.f1, priors.f2


class SNRTask(_BaseTask):
    """SNR-Net and SNR-SKF (docs/method.md §6): Charbonnier-sum + 10⁴·SCH every 50 steps, no SA."""

    family = "snr-net"

    def __init__(self, net: nn.Module, recipe: Recipe, skb: nn.Module | None) -> None:
        super().__init__(net, recipe, skb)
        if self.skf.sa.enabled:
            raise SKFTaskError(
                "SA is only defined for DRBN-SKF (docs/method.md §5); set skf.sa.enabled=false"
            )
        if self.skf.skb_input == "intermediate":
            raise SKFTaskError("SNR-SKF segments a fixed image: set skf.skb_input to 'lq' or 'gt'")

    def train_step(self, batch: Mapping[str, Any], step: int, ctx: StepContext) -> dict[str, Tensor]:
        low, high = batch["low"], batch["high"]
        sch_due = self.sch is not None and self.sch.should_apply(step)
        priors = self.fixed_priors(batch) if (self.skf.se or sch_due) else None
        with ctx.autocast():
            pred = ctx.modules["net"](low, sem=_snr_sem(priors) if self.skf.se else None)
        rec = self.reconstruction(pred, high, step)
        loss = rec
        metrics = {"rec": rec.detach()}
        if sch_due:
            assert priors is not None and self.sch is not None
            sch = self.sch(pred.float(), high, priors.labels(high.shape[-2:]))
            loss = loss + sch
            metrics["sch"] = sch.detach()
        ctx.backward_step(loss, "net", name="loss")
        metrics["loss"] = loss.detach()
        return metrics

    def enhance(self, low: Tensor, batch: Mapping[str, Any] | None = None) -> Tensor:
        """Test-time enhancement: priors of the input, then (``two_pass_test``) of the first output."""
        if not self.skf.se:
            return self.net(low)
        first = self.net(low, sem=_snr_sem(self.test_priors(batch or {"low": low})))
        if not self.skf.two_pass_test or self.skb is None:
            return first
        return self.net(low, sem=_snr_sem(self._run_skb(first.clamp(0, 1), grad=False)))

    def validate(self, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        pred = self.enhance(batch["low"], batch)
        return {"psnr": psnr(pred, batch["high"]), "ssim": ssim(pred.float().clamp(0, 1), batch["high"])}

    def sample_images(self, batch: Mapping[str, Any]) -> Tensor:
        return _grid((batch["low"], self.enhance(batch["low"], batch), batch["high"]))


# ---------------------------------------------------------------------------------------------------
# Factory and entry point
# ---------------------------------------------------------------------------------------------------
_TASKS: dict[str, type[_BaseTask]] = {"baseline/drbn": DRBNTask, "baseline/snr-net": SNRTask}


def _needs_skb(recipe: Recipe) -> bool:
    """Online mode runs the SKB in the step (DRBN: on r₃ and ŷ₁); cached mode reads priors only."""
    return recipe.skf.enabled and recipe.skf.skb_mode == "online"


def build_task(
    baseline_spec: str | None,
    recipe: Recipe,
    skb: nn.Module | None = None,
    prior_cache: Any = None,
) -> _BaseTask:
    """The task for ``baseline_spec`` (default: the recipe's) with the recipe's SKF switches.

    ``skb`` is required whenever the SKB runs inside the step (online mode, DRBN's SCH/SA on its own
    output); ``prior_cache`` (a :class:`~components.prior_cache.PriorCache`) feeds cached mode, through
    :meth:`priors_loader` on the dataset.
    """
    spec = resolved_spec(baseline_spec or recipe.baseline)
    family = spec.split("@", 1)[0]
    if family not in _TASKS:
        raise SKFTaskError(f"no training task for {spec}; supported: {', '.join(sorted(_TASKS))}")
    if skb is None and _needs_skb(recipe):
        raise SKFTaskError(
            f"recipe {recipe.name!r} (skb_mode={recipe.skf.skb_mode}, SCH/SA on the network output) runs the "
            "SKB during training: pass skb=create('skb/hrnet-w48-pascal@1', checkpoint=...)"
        )
    if recipe.skf.enabled and recipe.skf.skb_mode == "cached" and prior_cache is None:
        log.info("cached priors: batches must carry 'priors' (dataset priors_loader); no prior_cache given")
    try:
        net = create(spec, **recipe.builder_kwargs())
    except (TypeError, ValueError, RuntimeError) as exc:
        raise SKFTaskError(
            f"cannot build {spec} with model overrides {dict(recipe.model)}: {exc}; fix the model.* values"
        ) from exc
    task = _TASKS[family](net, recipe, skb)
    task.spec = spec  # type: ignore[attr-defined]
    task.prior_cache = prior_cache  # type: ignore[attr-defined]
    return task


def _network_class(spec: str) -> type[nn.Module]:
    from models.drbn import DRBN
    from models.snr_net import SNRNet

    return {"baseline/drbn": DRBN, "baseline/snr-net": SNRNet}[spec.split("@", 1)[0]]


def _check_override(spec: str, key: str, value: Any, default: Any) -> None:
    """One ``model.<key>`` value against the builder default's type: counts must be positive integers."""
    if isinstance(default, bool) or default is None:
        return
    if isinstance(default, int):
        lowest = 0 if key.endswith("_blocks") else 1
        if isinstance(value, bool) or not isinstance(value, int) or value < lowest:
            raise RecipeError(
                f"model.{key}={value!r} is not valid for {spec}: it must be an integer >= {lowest} "
                f"(default {default}); e.g. --set model.{key}={default}"
            )
    elif isinstance(default, float) and (isinstance(value, bool) or not isinstance(value, int | float)):
        raise RecipeError(
            f"model.{key}={value!r} is not valid for {spec}: it must be a number (default {default})"
        )


def check_model_overrides(spec: str, model: Mapping[str, Any]) -> None:
    """Reject unknown or ill-typed ``model.*`` overrides before any work (the builder would fail later,
    or build a network that only breaks in its first forward pass, e.g. ``model.nf=0``)."""
    import inspect

    family = resolved_spec(spec).split("@", 1)[0]
    if family not in _TASKS:
        return
    params = dict(inspect.signature(_network_class(family)).parameters)
    params.pop("seg", None)  # set by skf.se, never by model.*
    for key, value in model.items():
        if key not in params:
            raise RecipeError(f"model.{key}: unknown key for {spec}; known: {', '.join(sorted(params))}")
        _check_override(spec, key, value, params[key].default)


def priors_loader_for(task: _BaseTask) -> Any:
    """The dataset hook delivering crop-aligned cached priors, or ``None`` when the task needs none."""
    cache = getattr(task, "prior_cache", None)
    if not task.skf.enabled or task.skf.skb_mode != "cached" or cache is None:
        return None
    from components.prior_cache import PriorsLoader

    return PriorsLoader.from_cache(cache)


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


def run_params(task: _BaseTask) -> dict[str, Any]:
    """Reproducibility record: resolved component specs, SKB mode/fingerprint and the full recipe."""
    recipe, skf = task.recipe, task.skf
    params: dict[str, Any] = {
        "component.baseline": getattr(task, "spec", recipe.baseline),
        "skf.enabled": skf.enabled,
        "skf.skb_mode": skf.skb_mode,
        "skf.skb_input": skf.skb_input,
    }
    if skf.se:
        params["component.se"] = SE_SPECS[task.family]
    if task.sch is not None:
        params["component.sch"] = resolved_spec(SCH_SPEC)
    if getattr(task, "sa", None) is not None:
        params["component.sa"] = resolved_spec(SA_SPEC)
    if task.skb is not None and hasattr(task.skb, "describe"):
        params.update(task.skb.describe())  # skb.spec, skb.pretrained, skb.fingerprint, ...
    cache = getattr(task, "prior_cache", None)
    if cache is not None:
        params["skb.fingerprint"] = cache.fingerprint
    _flatten("recipe", recipe.model_dump(mode="json"), params)
    return params


def _init_from(task: _BaseTask, uri: str) -> None:
    """Non-strict warm start (SNR-SKF from the SNR baseline, docs/method.md §7); reports skipped keys."""
    from components.checkpoints import load_checkpoint

    state = load_checkpoint(uri).state_dict
    result = task.net.load_state_dict(state, strict=False)
    log.info(
        "initialised %s from %s: %d missing key(s) (e.g. new SE blocks), %d unexpected",
        task.family,
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
    **trainer_overrides: Any,
) -> FitResult:
    """Train ``recipe`` on ``train_dataset`` (validation batches from ``val_loader``, carved from train).

    In cached mode a dataset exposing a ``priors_loader`` attribute that is unset gets the cache's
    loader, so each sample carries priors cut and flipped like its crop. Extra ``params`` (dataset
    version, ...) are logged with the resolved specs, SKB mode and fingerprint.
    """
    torch.manual_seed(recipe.train.seed)  # identical network init for a given recipe
    task = build_task(baseline_spec, recipe, skb, prior_cache)
    if recipe.train.init_checkpoint:
        _init_from(task, recipe.train.init_checkpoint)
    loader_hook = priors_loader_for(task)
    if loader_hook is not None and getattr(train_dataset, "priors_loader", "absent") is None:
        train_dataset.priors_loader = loader_hook  # type: ignore[attr-defined]
    config = trainer_config(recipe, **trainer_overrides)
    if skb is not None and config.device:  # the SKB is not a trained module: place it like the network
        skb.to(torch.device(config.device))
    trainer = Trainer(task, config, run_dir=run_dir, logger=logger, progress=progress)
    resolved = run_params(task)
    sa = getattr(task, "sa", None)
    if sa is not None:  # what "auto" became on this run's device
        resolved["skf.sa.precision"] = sa.resolved_precision(select_device(config.device))
    return trainer.fit(train_dataset, val_loader, resume=resume, params={**resolved, **(params or {})})
