"""One training loop for every baseline.

A baseline plugs in through :class:`TrainingRoutine` (its modules, optimisers, schedulers and what one
iteration does); the :class:`Trainer` owns everything around it: device placement, AMP, gradient
clipping, non-finite detection, checkpoint/resume, seeding, DDP, validation, logging and progress.

Exact resume: a checkpoint holds the step, the data position (epoch + samples consumed on this rank),
all model/optimiser/scheduler/scaler states and every RNG stream of every rank. The sampler's order is
a function of ``(seed, epoch)`` only, so a resumed run replays the remaining batches of the epoch and
reaches bit-identical parameters on CPU. Augmentation must be reproducible too: either drawn in the
main process (``num_workers=0``; the global RNGs are restored), or derived from ``(seed, epoch, index)``
like :class:`~components.data.torch_dataset.PairedImageDataset`, whose ``set_epoch`` the engine calls.
"""

from __future__ import annotations

import logging
import math
import os
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import torch
import torch.distributed as dist
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler
from torch.utils.data import DataLoader, Dataset

from components.errors import SKFError
from components.training.checkpoint import (
    FORMAT_VERSION,
    CheckpointError,
    CheckpointManager,
    load_training_state,
)
from components.training.distributed import DistInfo, init_from_env, shutdown
from components.training.loggers import NullLogger, RunLogger
from components.training.rng import capture_rng_state, restore_rng_state, seed_everything
from components.training.sampler import ResumableSampler

log = logging.getLogger(__name__)

Batch = Any


class NonFiniteLossError(SKFError, RuntimeError):
    """A loss, metric or gradient became NaN/inf; training stopped before any state was corrupted on disk.

    ``last_checkpoint`` is the newest checkpoint written before the failure (untouched by it).
    """

    def __init__(self, step: int, name: str, value: float, last_checkpoint: Path | None = None) -> None:
        super().__init__(step, name, value)
        self.step = step
        self.name = name
        self.value = value
        self.last_checkpoint = last_checkpoint

    def __str__(self) -> str:
        where = (
            f"last good checkpoint: {self.last_checkpoint}"
            if self.last_checkpoint
            else "no checkpoint had been written yet"
        )
        return (
            f"non-finite {self.name} ({self.value}) at step {self.step}; training stopped, {where}. "
            "Lower the learning rate, enable grad_clip, or check the batch for NaN/inf pixels."
        )


CompileMode = Literal["off", "default", "reduce-overhead", "max-autotune"]


def data_workers(requested: int | None, device: torch.device) -> int:
    """DataLoader workers per training process: ``requested``, or for ``None`` none on CPU (workers would
    take the cores the step uses) and on CUDA the CPUs this process may use, shared by the processes of
    this host (``LOCAL_WORLD_SIZE``), one left for the step itself, at most 8."""
    if requested is not None:
        return requested
    if device.type != "cuda":
        return 0
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    per_process = cpus // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(0, min(8, per_process - 1))


class TrainerConfig(BaseModel):
    """Engine settings (baseline-independent); a recipe's ``train`` section maps onto these."""

    model_config = ConfigDict(extra="forbid")

    iterations: int = Field(gt=0, description="Total optimisation iterations (train_step calls).")
    batch_size: int = Field(gt=0, description="Per-process batch size.")
    num_workers: int | None = Field(
        0, ge=0, description="DataLoader worker processes per training process; None: auto (data_workers)."
    )
    seed: int = 0
    shuffle: bool = True
    drop_last: bool = True
    amp: bool = Field(False, description="Autocast + GradScaler; only takes effect on CUDA.")
    amp_dtype: Literal["float16", "bfloat16"] = "float16"
    grad_clip: float | None = Field(None, gt=0, description="Max global grad norm per optimiser.")
    val_every: int = Field(0, ge=0, description="Validate every N steps (0: never).")
    ckpt_every: int = Field(0, ge=0, description="Checkpoint every N steps (0: only at the end).")
    keep_last: int = Field(3, ge=1)
    log_every: int = Field(1, ge=1)
    deterministic: bool = False
    device: str | None = Field(None, description="Override device selection (e.g. 'cpu', 'cuda:1').")
    max_amp_skips: int = Field(25, ge=1, description="Consecutive scaler-skipped steps that mean divergence.")
    find_unused_parameters: bool = Field(True, description="DDP: SE blocks own tensors no forward uses.")
    log_checkpoint_artifact: bool = True
    compile: CompileMode = Field(
        "off",
        description="torch.compile the trained networks (in place: state-dict keys unchanged) with this mode; "
        "'reduce-overhead' adds CUDA graphs on GPU. The eager step is the reference it must match.",
    )


@dataclass
class Progress:
    """What the progress callback sees after every iteration."""

    step: int
    total: int
    epoch: int
    metrics: dict[str, float]
    val_metrics: dict[str, float] | None
    elapsed_s: float


class DataWait:
    """How much of the training loop's step time is spent waiting for the next batch.

    ``batches`` times each fetch from the DataLoader; ``step_done`` closes the step that began when its
    batch arrived (the step ends in a device sync, so this is the device's time too). ``read`` returns
    ``perf/data_wait_share`` (waiting / (waiting + stepping)) and ``perf/step_s`` since the last read, so
    validation and checkpoints in between count for neither.
    """

    def __init__(self) -> None:
        self.waiting = self.stepping = 0.0
        self.steps = 0
        self._arrived: float | None = None

    def batches(self, loader: Iterable[Batch]) -> Iterator[Batch]:
        iterator = iter(loader)
        while True:
            start = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration:
                return
            self._arrived = time.perf_counter()
            self.waiting += self._arrived - start
            yield batch

    def step_done(self) -> None:
        if self._arrived is not None:
            self.stepping += time.perf_counter() - self._arrived
            self.steps += 1
            self._arrived = None

    def read(self) -> dict[str, float]:
        total = self.waiting + self.stepping
        out = (
            {}
            if not self.steps
            else {
                "perf/data_wait_share": self.waiting / total if total > 0 else 0.0,
                "perf/step_s": total / self.steps,
            }
        )
        self.waiting = self.stepping = 0.0
        self.steps = 0
        return out


@dataclass
class FitResult:
    step: int
    epoch: int
    checkpoint: Path | None
    train_metrics: dict[str, float] = field(default_factory=dict)
    val_metrics: dict[str, float] = field(default_factory=dict)


@runtime_checkable
class TrainingRoutine(Protocol):
    """What a baseline provides. The engine calls ``modules()`` first, moves them to the device, then
    ``optimizers()`` and ``schedulers()`` (build those lazily, over the placed parameters)."""

    def modules(self) -> dict[str, nn.Module]:
        """Trainable modules by name (e.g. ``{"net": ..., "disc": ...}``); frozen helpers stay out."""

    def optimizers(self) -> dict[str, Optimizer]: ...

    def schedulers(self) -> dict[str, LRScheduler]:
        """Stepped once per iteration by the engine."""

    def train_step(self, batch: Batch, step: int, ctx: StepContext) -> Mapping[str, torch.Tensor | float]:
        """One iteration; forward with ``ctx.modules[...]``, optimise with ``ctx.backward_step``."""

    def validate(self, batch: Batch) -> Mapping[str, torch.Tensor | float]:
        """Metrics on one validation batch (called under ``no_grad`` with modules in eval mode)."""

    def sample_images(self, batch: Batch) -> torch.Tensor:
        """A ``(3,H,W)`` image grid in [0,1] for visual inspection."""


class StepContext:
    """Handed to ``train_step``: the placed (possibly DDP-wrapped) modules, autocast and an optimiser
    step that applies loss scaling, clipping and non-finite checks. Call ``backward_step`` at most once
    per optimiser per iteration (GradScaler unscales each optimiser once)."""

    def __init__(
        self,
        *,
        device: torch.device,
        modules: dict[str, nn.Module],
        optimizers: dict[str, Optimizer],
        scaler: torch.amp.GradScaler,
        amp_enabled: bool,
        amp_dtype: torch.dtype,
        grad_clip: float | None,
    ) -> None:
        self.device = device
        self.modules = modules
        self.optimizers = optimizers
        self.scaler = scaler
        self.amp_enabled = amp_enabled
        self.amp_dtype = amp_dtype
        self.grad_clip = grad_clip
        self.step = 0
        self.skipped = False  # set when GradScaler skipped an optimiser step this iteration

    def autocast(self) -> AbstractContextManager[Any]:
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype, enabled=self.amp_enabled)

    def check_finite(self, value: torch.Tensor, name: str) -> None:
        if not bool(torch.isfinite(value.detach()).all()):
            raise NonFiniteLossError(self.step, name, _first_bad(value))

    def backward_step(
        self, loss: torch.Tensor, optimizer: str, *, name: str = "loss", retain_graph: bool = False
    ) -> torch.Tensor:
        """Zero grads, backprop ``loss``, clip, check gradients, step ``optimizer``; returns the grad norm."""
        opt = self.optimizers[optimizer]
        self.check_finite(loss, f"loss '{name}'")
        opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward(retain_graph=retain_graph)
        if self.scaler.is_enabled():
            self.scaler.unscale_(opt)
        params = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
        if not params:
            raise RuntimeError(
                f"loss '{name}' produced no gradient for optimiser '{optimizer}' at step {self.step}: "
                "is the loss detached from that optimiser's parameters?"
            )
        if self.grad_clip:
            norm = nn.utils.clip_grad_norm_(params, self.grad_clip)
        else:
            norm = nn.utils.get_total_norm([p.grad for p in params])
        if not bool(torch.isfinite(norm)):
            if not self.scaler.is_enabled():
                raise NonFiniteLossError(
                    self.step, f"gradient of '{name}' (optimiser '{optimizer}')", float(norm)
                )
            self.skipped = True  # fp16 overflow: GradScaler skips this step and lowers its scale
        self.scaler.step(opt)
        return norm.detach()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _first_bad(value: torch.Tensor) -> float:
    flat = value.detach().float().reshape(-1)
    bad = flat[~torch.isfinite(flat)]
    return float(bad[0]) if bad.numel() else float("nan")


def move_to_device(batch: Batch, device: torch.device) -> Batch:
    """Recursively move tensors in dicts/lists/tuples to ``device``; other leaves pass through."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: move_to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, tuple | list):
        return type(batch)(move_to_device(v, device) for v in batch)
    return batch


def _cpu_kernels(device: torch.device) -> str:
    """On CPU, build/register the SE blocks' CPU kernels (:mod:`components.cpu_kernels`): ``"compiled"``, or
    ``"eager"`` when they are unavailable (a warning says why); ``"n/a"`` on other devices."""
    if device.type != "cpu":
        return "n/a"
    from components import cpu_kernels

    return "compiled" if cpu_kernels.load() else "eager"


def select_device(override: str | None, dist_info: DistInfo | None = None) -> torch.device:
    """The override if given, else CUDA (this process's local rank) when available, else CPU."""
    if override:
        return torch.device(override)
    if torch.cuda.is_available():
        return torch.device("cuda", dist_info.local_rank if dist_info else 0)
    return torch.device("cpu")


@dataclass
class _Position:
    step: int = 0
    epoch: int = 0
    consumed: int = 0  # batches this rank consumed in the current epoch
    # The last training and validation metrics, saved with each checkpoint: a run resumed at its final
    # step (crashed after that checkpoint) still reports them instead of empty metrics.
    train_metrics: dict[str, float] = field(default_factory=dict)
    val_metrics: dict[str, float] = field(default_factory=dict)


class Trainer:
    """Runs a :class:`TrainingRoutine` for ``config.iterations`` steps, with checkpoints under ``run_dir``."""

    def __init__(
        self,
        routine: TrainingRoutine,
        config: TrainerConfig,
        *,
        run_dir: str | Path,
        logger: RunLogger | None = None,
        progress: Callable[[Progress], None] | None = None,
        on_checkpoint: Callable[[Path], None] | None = None,
    ) -> None:
        """``on_checkpoint`` receives each checkpoint file once it is written (rank 0), e.g. to copy it
        where another host can resume from it."""
        self.routine = routine
        self.config = config
        self.run_dir = Path(run_dir)
        self.logger: RunLogger = logger or NullLogger()
        self.progress = progress
        self.on_checkpoint = on_checkpoint
        self.checkpoints = CheckpointManager(self.run_dir / "checkpoints", keep_last=config.keep_last)
        # Metrics and sample images wait for the next checkpoint before they are logged: a run resumed from
        # that checkpoint then never logs a step twice (its steps after the checkpoint were never logged).
        self._uncommitted: list[Callable[[], None]] = []

    # ------------------------------------------------------------------ public API
    def fit(
        self,
        train_dataset: Dataset,
        val_loader: Sequence[Batch] | DataLoader | None = None,
        *,
        resume: bool | str | Path = True,
        params: Mapping[str, Any] | None = None,
    ) -> FitResult:
        """Train to ``config.iterations``.

        ``resume=True`` continues from ``run_dir/checkpoints/latest.pt`` when it exists; a path resumes
        from that file; ``False`` starts fresh. ``params`` (resolved specs, SKB fingerprint, ...) are
        logged with the engine settings.
        """
        cfg = self.config
        device_type = (
            torch.device(cfg.device).type if cfg.device else ("cuda" if torch.cuda.is_available() else "cpu")
        )
        self.dist = init_from_env(device_type)
        try:
            return self._fit(train_dataset, val_loader, resume=resume, params=params or {})
        finally:
            shutdown(self.dist)

    # ------------------------------------------------------------------ setup
    def _fit(
        self, train_dataset: Dataset, val_loader: Any, *, resume: bool | str | Path, params: Mapping[str, Any]
    ) -> FitResult:
        cfg, info = self.config, self.dist
        self.device = select_device(cfg.device, info)
        seed_everything(cfg.seed + info.rank, deterministic=cfg.deterministic)
        cpu_ops = _cpu_kernels(self.device)

        amp_enabled = cfg.amp and self.device.type == "cuda"
        if cfg.amp and not amp_enabled:
            log.info("AMP requested on %s: disabled (autocast/GradScaler only run on CUDA)", self.device)
        amp_dtype = getattr(torch, cfg.amp_dtype)
        self.scaler = torch.amp.GradScaler(
            self.device.type, enabled=amp_enabled and amp_dtype == torch.float16
        )

        self.modules = self.routine.modules()
        for module in self.modules.values():
            module.to(self.device).train()
            if cfg.compile != "off":
                # in place (parameters and state-dict keys stay the same); static shapes: training crops are
                # fixed, and symbolic shapes trip inductor on the SE blocks' phase arithmetic
                module.compile(mode=cfg.compile, dynamic=False)
        self.optimizers = self.routine.optimizers()
        self.schedulers = self.routine.schedulers()
        wrapped = {name: self._wrap(m) for name, m in self.modules.items()}

        self.sampler = ResumableSampler(
            train_dataset, num_replicas=info.world_size, rank=info.rank, shuffle=cfg.shuffle, seed=cfg.seed
        )
        pos = _Position()
        source = self._resume_source(resume)
        if source is not None:
            pos = self._load(*source)

        if info.is_main:
            self.logger.log_params({**{f"trainer.{k}": v for k, v in cfg.model_dump().items()}, **params})
            self.logger.set_tags(
                {
                    "world_size": info.world_size,
                    "device": str(self.device),
                    "amp": amp_enabled,
                    "cpu_ops": cpu_ops,
                }
            )

        ctx = StepContext(
            device=self.device,
            modules=wrapped,
            optimizers=self.optimizers,
            scaler=self.scaler,
            amp_enabled=amp_enabled,
            amp_dtype=amp_dtype,
            grad_clip=cfg.grad_clip,
        )
        return self._loop(train_dataset, val_loader, ctx, pos)

    def _wrap(self, module: nn.Module) -> nn.Module:
        if not self.dist.is_distributed or not any(p.requires_grad for p in module.parameters()):
            return module
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(
            module, device_ids=device_ids, find_unused_parameters=self.config.find_unused_parameters
        )

    def _loader(self, dataset: Dataset, epoch: int) -> DataLoader:
        cfg = self.config
        # Per-epoch seeded generator: worker base seeds depend only on (seed, epoch, rank).
        gen = torch.Generator().manual_seed((cfg.seed * 1_000_003 + epoch) * 64 + self.dist.rank)
        return DataLoader(
            dataset,
            batch_size=cfg.batch_size,
            sampler=self.sampler,
            num_workers=data_workers(cfg.num_workers, self.device),
            drop_last=cfg.drop_last,
            pin_memory=self.device.type == "cuda",
            generator=gen,
        )

    # ------------------------------------------------------------------ loop
    def _loop(self, dataset: Dataset, val_loader: Any, ctx: StepContext, pos: _Position) -> FitResult:
        cfg, info = self.config, self.dist
        start = time.perf_counter()
        last_saved = pos.step if pos.step else None
        train_metrics: dict[str, float] = dict(pos.train_metrics)
        val_metrics: dict[str, float] = dict(pos.val_metrics)
        consecutive_skips = 0
        data_wait = DataWait()
        while pos.step < cfg.iterations:
            self.sampler.set_position(pos.epoch, pos.consumed * cfg.batch_size)
            if callable(getattr(dataset, "set_epoch", None)):  # per-epoch augmentation (seed, epoch, index)
                dataset.set_epoch(pos.epoch)
            loader = self._loader(dataset, pos.epoch)
            if pos.consumed == 0 and len(loader) == 0:
                raise ValueError(
                    f"training set of {len(dataset)} samples yields no batch of {cfg.batch_size} per process "
                    f"(world size {info.world_size}, drop_last={cfg.drop_last}): lower batch_size"
                )
            for batch in data_wait.batches(loader):
                pos.step += 1
                pos.consumed += 1
                ctx.step, ctx.skipped = pos.step, False
                try:
                    raw = self.routine.train_step(move_to_device(batch, self.device), pos.step, ctx)
                    train_metrics = pos.train_metrics = self._scalars(raw, pos.step)
                except NonFiniteLossError as err:
                    err.last_checkpoint = self.checkpoints.latest()
                    raise
                self.scaler.update()
                consecutive_skips = consecutive_skips + 1 if ctx.skipped else 0
                if consecutive_skips >= cfg.max_amp_skips:
                    raise NonFiniteLossError(
                        pos.step,
                        f"gradients ({consecutive_skips} consecutive AMP-skipped steps)",
                        math.inf,
                        self.checkpoints.latest(),
                    )
                for scheduler in self.schedulers.values():
                    scheduler.step()
                data_wait.step_done()
                if info.is_main and pos.step % cfg.log_every == 0:
                    lrs = {f"lr/{n}": float(o.param_groups[0]["lr"]) for n, o in self.optimizers.items()}
                    self._defer(
                        self.logger.log_metrics,
                        {**{f"train/{k}": v for k, v in train_metrics.items()}, **lrs, **data_wait.read()},
                        pos.step,
                    )
                # Validate before checkpointing: a checkpoint at step N promises that step N's metrics are
                # logged, so a crash in between resumes from the previous checkpoint and validates N again.
                step_val = None
                if (
                    val_loader is not None
                    and cfg.val_every
                    and pos.step % cfg.val_every == 0
                    and info.is_main
                ):
                    val_metrics = pos.val_metrics = step_val = self._validate(val_loader, ctx, pos.step)
                if cfg.ckpt_every and pos.step % cfg.ckpt_every == 0:
                    self._save(pos)
                    last_saved = pos.step
                if self.progress is not None and info.is_main:
                    self.progress(
                        Progress(
                            pos.step,
                            cfg.iterations,
                            pos.epoch,
                            train_metrics,
                            step_val,
                            time.perf_counter() - start,
                        )
                    )
                if pos.step >= cfg.iterations:
                    break
            else:
                pos.epoch += 1
                pos.consumed = 0
        if last_saved != pos.step:
            self._save(pos)
        latest = self.checkpoints.latest()
        if info.is_main and cfg.log_checkpoint_artifact and latest is not None:
            self.logger.log_artifact(latest, "checkpoints")
        return FitResult(pos.step, pos.epoch, latest, train_metrics, val_metrics)

    def _scalars(self, raw: Mapping[str, torch.Tensor | float], step: int) -> dict[str, float]:
        """Metrics as floats (one device sync), raising on the first non-finite one."""
        if not raw:
            return {}
        values = torch.stack(
            [torch.as_tensor(v).detach().float().reshape(()).cpu() for v in raw.values()]
        ).tolist()
        out = dict(zip(raw.keys(), values, strict=True))
        for key, value in out.items():
            if not math.isfinite(value):
                raise NonFiniteLossError(step, f"loss '{key}'", value)
        return out

    # ------------------------------------------------------------------ validation
    def _validate(self, val_loader: Any, ctx: StepContext, step: int) -> dict[str, float]:
        totals: dict[str, float] = {}
        batches = 0
        grid: torch.Tensor | None = None
        with self._eval_mode(), torch.no_grad(), ctx.autocast():
            for batch in val_loader:
                batch = move_to_device(batch, self.device)
                for key, value in self.routine.validate(batch).items():
                    totals[key] = totals.get(key, 0.0) + float(value)
                if grid is None:
                    grid = self.routine.sample_images(batch)
                batches += 1
        if batches == 0:
            raise ValueError("validation loader is empty: carve at least one batch from the training set")
        metrics = {f"val/{k}": v / batches for k, v in totals.items()}
        self._defer(self.logger.log_metrics, metrics, step)
        if grid is not None:
            image = grid.detach().float().clamp(0, 1).cpu()
            self._defer(self.logger.log_image, image, f"samples/step-{step:08d}.png", step)
        return metrics

    def _defer(self, log: Callable[..., None], *args: Any) -> None:
        """Log at the next checkpoint (see ``__init__``)."""
        self._uncommitted.append(lambda: log(*args))

    def _commit(self) -> None:
        """Log what waited for the checkpoint just written."""
        pending, self._uncommitted = self._uncommitted, []
        for log in pending:
            log()

    @contextmanager
    def _eval_mode(self) -> Iterator[None]:
        for module in self.modules.values():
            module.eval()
        try:
            yield
        finally:
            for module in self.modules.values():
                module.train()

    # ------------------------------------------------------------------ checkpoints
    def _save(self, pos: _Position) -> None:
        """Write a checkpoint (rank 0), after verifying no parameter went non-finite."""
        for name, module in self.modules.items():
            tensors = [t for t in (*module.parameters(), *module.buffers()) if t.is_floating_point()]
            if tensors and not bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all()):
                raise NonFiniteLossError(
                    pos.step, f"parameters of '{name}'", math.nan, self.checkpoints.latest()
                )
        rng = capture_rng_state()
        if self.dist.is_distributed:
            gathered: list[Any] = [None] * self.dist.world_size
            dist.all_gather_object(gathered, rng)
            rng_states = gathered
        else:
            rng_states = [rng]
        if not self.dist.is_main:
            return
        state = {
            "format": FORMAT_VERSION,
            "step": pos.step,
            "epoch": pos.epoch,
            "consumed": pos.consumed,
            "batch_size": self.config.batch_size,
            "world_size": self.dist.world_size,
            "modules": {n: m.state_dict() for n, m in self.modules.items()},
            "optimizers": {n: o.state_dict() for n, o in self.optimizers.items()},
            "schedulers": {n: s.state_dict() for n, s in self.schedulers.items()},
            "scaler": self.scaler.state_dict(),
            "rng": rng_states,
            "config": self.config.model_dump(mode="json"),
            "metrics": {"train": dict(pos.train_metrics), "val": dict(pos.val_metrics)},
        }
        path = self.checkpoints.save(state, pos.step)
        if self.on_checkpoint is not None:
            self.on_checkpoint(path)
        self._commit()

    def _resume_source(self, resume: bool | str | Path) -> tuple[Path, dict[str, Any]] | None:
        """The checkpoint to resume from and its state: the newest intact one of ``run_dir`` for ``True``."""
        if resume is False:
            return None
        if resume is True:
            return self.checkpoints.load_latest(map_location=self.device)
        path = Path(resume)
        return path, load_training_state(path, map_location=self.device)

    def _load(self, path: Path, state: dict[str, Any]) -> _Position:
        for kind, live in (
            ("modules", self.modules),
            ("optimizers", self.optimizers),
            ("schedulers", self.schedulers),
        ):
            saved = state[kind]
            if set(saved) != set(live):
                raise CheckpointError(
                    f"checkpoint {path} has {kind} {sorted(saved)} but the routine builds {sorted(live)}: "
                    "resume with the same baseline/recipe or start a fresh run_dir"
                )
            try:
                for name, obj in live.items():
                    obj.load_state_dict(saved[name])
            except (RuntimeError, ValueError, KeyError) as exc:
                raise CheckpointError(
                    f"checkpoint {path} does not fit this training ({kind}: {_first_line(exc)}); resume "
                    "with the same baseline/recipe or delete the run's checkpoints to start over"
                ) from exc
        if state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        rng_states = state["rng"]
        same_world = (
            state["world_size"] == self.dist.world_size and state["batch_size"] == self.config.batch_size
        )
        restore_rng_state(rng_states[self.dist.rank] if same_world else rng_states[0])
        metrics = state.get("metrics") or {}  # absent in checkpoints written before it was kept
        pos = _Position(
            state["step"],
            state["epoch"],
            state["consumed"],
            dict(metrics.get("train") or {}),
            dict(metrics.get("val") or {}),
        )
        if not same_world:
            warnings.warn(
                f"resuming {path} with world size/batch size {self.dist.world_size}/{self.config.batch_size} "
                f"(saved with {state['world_size']}/{state['batch_size']}): continuing from the next epoch, "
                "so the data order differs from an uninterrupted run",
                stacklevel=2,
            )
            pos = _Position(
                pos.step, pos.epoch + (1 if pos.consumed else 0), 0, pos.train_metrics, pos.val_metrics
            )
        if self.dist.is_main:
            log.info("resumed from %s at step %d (epoch %d)", path, pos.step, pos.epoch)
        return pos
