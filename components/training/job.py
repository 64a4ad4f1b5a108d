"""The training job: train a :class:`~components.training.plan.TrainingPlan` on a dataset version, once.

The run's identity is its *config hash*: the effective recipe, the resolved component specs, the SKB
fingerprint, the dataset manifest and the validation carve. A finished :class:`TrainingRun` row (or a
finished MLflow run tagged ``skf.config_hash``) with that hash makes a rerun a no-op; an unfinished one is
resumed from its last checkpoint under ``$SKF_HOME/runs/<hash>`` in the same MLflow run. While another
process trains the same configuration it holds the row's lease; this one waits and joins its result, or
takes the run over when the lease expires.

Besides the engine's checkpoints, a finished run holds the enhancer package (``enhancer-package/``: spec
JSON with the resolved specs and SKB fingerprint, network and SKB weights as safetensors), which is what
evaluation and registration load. The ``train-model`` flow and ``skf train`` both call :func:`run_training`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import hashlib
import json
import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from components import registry
from components.errors import SKFError, UserInputError
from components.tracking import CONFIG_HASH_TAG, finished_run, mlflow_client
from components.training.plan import OFF, TrainingPlan

__all__ = [
    "CHECKPOINT_ARTIFACT",
    "LEASE_TTL_S",
    "TrainOutcome",
    "TrainingInterrupted",
    "build_skb",
    "config_hash",
    "ensure_priors",
    "log_package",
    "progress_every_tenth",
    "run_training",
    "train_markdown",
]

CHECKPOINT_ARTIFACT = "checkpoints/latest.pt"
_HASH_FORMAT = 1
_log = logging.getLogger(__name__)
LEASE_TTL_S = 60.0  # a training that stops renewing its lease for this long is taken over
WAIT_POLL_S = 2.0  # how often an identical request checks whether the running one finished


class TrainingInterrupted(SKFError, RuntimeError):
    """Raised by ``stop_after_step``: training stopped on purpose after a checkpointed step."""


def config_hash(
    plan: TrainingPlan, *, skb_fingerprint: str | None, manifest_sha256: str, val_fraction: float
) -> str:
    """sha256 of everything that determines the trained weights (device and logging excluded)."""
    payload = {
        "format": _HASH_FORMAT,
        "recipe": plan.recipe.model_dump(mode="json"),
        "baseline": plan.baseline,
        "skb": plan.skb,
        "skb_fingerprint": skb_fingerprint,
        "dataset_manifest": manifest_sha256,
        "val_fraction": val_fraction,
    }
    if plan.world_size > 1:  # the recipe's batch is per process: N processes train other weights
        payload["world_size"] = plan.world_size
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()


# --------------------------------------------------------------------------------------------------
# The training job (Prefect-free; the `train` task in flows/train.py wraps it)
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class TrainOutcome:
    run_id: str
    checkpoint_uri: str
    config_hash: str
    dataset_version: str
    status: str  # "trained" | "resumed" | "skipped" | "joined"
    steps: int
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)
    skb_pretrained: bool | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _run_row(catalog: Any, digest: str, version_id: int) -> dict[str, Any] | None:
    """The newest TrainingRun of (config hash, dataset version) as plain data."""
    import sqlalchemy as sa

    from components.catalog import TrainingRun

    with catalog.session() as session:
        row = session.scalars(
            sa.select(TrainingRun)
            .where(TrainingRun.config_hash == digest, TrainingRun.dataset_version_id == version_id)
            .order_by(TrainingRun.id.desc())
            .limit(1)
        ).first()
        if row is None:
            return None
        return {"id": row.id, "status": row.status, "run_id": row.mlflow_run_id, "ckpt": row.checkpoint_uri}


def _upsert_row(catalog: Any, row_id: int | None, **values: Any) -> int:
    from components.catalog import TrainingRun

    with catalog.session() as session:
        row = session.get(TrainingRun, row_id) if row_id is not None else None
        if row is None:
            row = TrainingRun(**values)
            session.add(row)
        else:
            for key, value in values.items():
                setattr(row, key, value)
        session.flush()
        return row.id


def build_skb(plan: TrainingPlan, device: str | None = None) -> Any:
    """The plan's SKB (strictly loaded from its checkpoint, or seeded random weights), or ``None``."""
    if plan.skb is None:
        return None
    settings = plan.recipe.skf.skb_settings  # e.g. LLFlow-SKF: the log image, and optionally train-mode BN
    return registry.create(plan.skb, checkpoint=plan.skb_checkpoint, device=device, **settings)


def ensure_priors(version_ref: str, skb: Any, splits: tuple[str, ...] = ("train",)) -> None:
    """Cached mode trains on the prior cache: compute whatever is missing (nothing, normally)."""
    from components.precompute import precompute_priors

    summary = precompute_priors(version_ref, skb.spec, skb=skb, splits=splits)
    if summary.failed:
        from components.prior_cache import MissingPriorsError

        raise MissingPriorsError(
            f"priors missing for {summary.failed} training image(s) of {version_ref}: "
            f"{next(iter(summary.errors.items()))}; run `skf precompute {version_ref}` and fix them"
        )


def _datasets(version: Any, plan: TrainingPlan, labelled: bool = False) -> tuple[Any, Any]:
    """Train set and validation loader; ``labelled``: samples carry their label maps (a label-fed SKB)."""
    from torch.utils.data import DataLoader

    from components.baselines import get_family
    from components.data.torch_dataset import PairedImageDataset, carve_validation, label_loader

    seed, val_fraction = plan.recipe.train.seed, plan.val_fraction
    records = carve_validation(version, val_fraction, seed=seed) if val_fraction > 0 else list(version.images)
    labels_of = label_loader(version) if labelled else None
    features = get_family(plan.recipe.baseline).input_features()  # LLFlow: histeq of the whole image
    aug = plan.recipe.train.augment
    train_ds = PairedImageDataset(
        records, "train", crop=plan.recipe.train.crop, augment=True, seed=seed, labels_of=labels_of,
        input_features=features, flips=(aug.hflip, aug.vflip, aug.transpose),
    )  # fmt: skip
    if val_fraction <= 0:
        return train_ds, None
    val_ds = PairedImageDataset(
        records, "val", crop=None, augment=False, seed=seed, labels_of=labels_of, input_features=features
    )
    return train_ds, DataLoader(val_ds, batch_size=1, shuffle=False)


def log_package(plan: TrainingPlan, skb: Any, checkpoint: Path, run_id: str) -> str:
    """Rebuild the trained network from ``checkpoint`` and log it with its SKB as the run's enhancer package."""
    from components.checkpoints import load_strict
    from components.inference import Enhancer, make_spec
    from components.model_registry import log_enhancer_package
    from components.training.checkpoint import load_training_state

    net = registry.create(plan.baseline, **plan.recipe.builder_kwargs())
    load_strict(net, load_training_state(checkpoint)["modules"]["net"], source=str(checkpoint))
    spec = make_spec(
        plan.baseline,
        net,
        skb,
        baseline_kwargs=dict(plan.recipe.model),
        two_pass=plan.recipe.skf.two_pass_test and plan.recipe.skf.se,
    )
    return log_enhancer_package(Enhancer(net.cpu(), skb, spec), run_id)


def _done_run(client: Any, row: dict[str, Any] | None, digest: str) -> Any:
    """The finished MLflow run of this configuration, from the catalog row or (no row) from MLflow tags."""
    if row is not None and row["status"] == "finished" and row["run_id"]:
        return client.get_run(row["run_id"])
    if row is None:
        return finished_run(client, digest)
    return None


def _reused(done: Any, plan: TrainingPlan, skb: Any, digest: str, version: Any, status: str) -> TrainOutcome:
    """The outcome of a finished run read back from MLflow (a skipped or joined request)."""
    return TrainOutcome(
        run_id=done.info.run_id,
        checkpoint_uri=f"{done.info.artifact_uri}/{CHECKPOINT_ARTIFACT}",
        config_hash=digest,
        dataset_version=version.ref,
        status=status,
        steps=int(done.data.params.get("trainer.iterations", plan.recipe.train.iterations)),
        metrics={k: v for k, v in done.data.metrics.items() if k.startswith(("train/", "val/"))},
        skb_pretrained=None if skb is None else bool(skb.pretrained),
    )


def _record_reuse(catalog: Any, row: dict[str, Any] | None, done: Any, digest: str, version_id: int) -> None:
    """Backfill the catalog row of a run MLflow knows as finished (a concurrent backfill may win)."""
    from sqlalchemy.exc import IntegrityError as RowConflict

    if row is not None and row["status"] == "finished":
        return
    with contextlib.suppress(RowConflict):
        _upsert_row(
            catalog,
            None if row is None else row["id"],
            dataset_version_id=version_id,
            config_hash=digest,
            mlflow_run_id=done.info.run_id,
            status="finished",
            checkpoint_uri=f"{done.info.artifact_uri}/{CHECKPOINT_ARTIFACT}",
            finished_at=dt.datetime.now(dt.UTC),
        )


def _wait_for_lease(
    catalog: Any, digest: str, version_id: int, holder: str, log: Callable[[str], None]
) -> Any:
    """Claim the run's lease, waiting while another live process trains the same configuration.

    Returns the :class:`~components.catalog.leases.Claim`: acquired, or not acquired with status
    "finished" (the other process trained it: this request joins its result).
    """
    from components.catalog.leases import claim_run

    announced: str | None = None
    while True:
        claim = claim_run(catalog, digest, version_id, holder, LEASE_TTL_S)
        if claim.acquired or claim.status == "finished":
            return claim
        if claim.holder != announced:
            announced = claim.holder
            log(
                f"config {digest[:12]} is being trained by {claim.holder} (MLflow run {claim.run_id}); "
                "waiting to join its result"
            )
        time.sleep(WAIT_POLL_S)


def _explain(exc: BaseException, version: Any) -> BaseException | None:
    """A clearer one-line error for failures that have a known fix (None: keep the original)."""
    from components.storage import IntegrityError

    if isinstance(exc, IntegrityError):
        return IntegrityError(
            f"dataset {version.ref} has a corrupt stored object: {exc}. Re-ingest the dataset "
            f"(`skf ingest {version.source_uri} --name {version.name}`) to store it again"
        )
    return None


def _record_failure(catalog: Any, row_id: int, holder: str, logger: Any, status: str) -> None:
    """Mark the run failed in the catalog (if it is still there and ours) and in MLflow; never raises.

    The failure being reported matters more than a second one while recording it, so those are logged.
    """
    from components.catalog.leases import update_leased

    try:
        catalog.check_present()
        update_leased(catalog, row_id, holder, status="failed", lease_holder=None, lease_expires_at=None)
    except Exception as exc:
        _log.warning("could not mark training run %d failed in the catalog: %s", row_id, exc)
    if logger is None:
        return
    try:
        logger.close(status)
    except Exception as exc:
        _log.warning("could not mark MLflow run %s %s: %s", logger.run_id, status, exc)


def _datasets_for(version: Any, plan: TrainingPlan, labelled: bool = False) -> tuple[Any, Any]:
    """:func:`_datasets`, with a dataset that cannot be trained on reported as a one-line user error."""
    try:
        return _datasets(version, plan, labelled)
    except ValueError as exc:
        if isinstance(exc, SKFError):
            raise
        raise UserInputError(
            f"dataset {version.ref} cannot be trained on: {exc}; choose another version or --val-fraction"
        ) from exc


@dataclasses.dataclass
class _Job:
    """What one leased training needs (kept together so the steps stay small functions)."""

    plan: TrainingPlan
    version: Any
    skb: Any
    digest: str
    catalog: Any
    client: Any
    row_id: int
    holder: str
    previous_run: str | None


def _open_logger(job: _Job) -> Any:
    from components.settings import get_settings
    from components.training.mlflow_logger import MlflowLogger

    tags = {
        CONFIG_HASH_TAG: job.digest,
        "skf.dataset_version": job.version.ref,
        "skf.recipe": job.plan.recipe.name,
        "skf.baseline": job.plan.baseline,
        "skf.skb": job.plan.skb or OFF,
    }
    return MlflowLogger(
        get_settings().mlflow_tracking_uri,
        run_id=job.previous_run,
        run_name=f"{job.plan.recipe.name}-{job.version.ref}-{job.digest[:8]}",
        tags=None if job.previous_run else tags,  # a continued run already carries them
        dataset=job.version,
    )


def _train_run_dir(
    plan: TrainingPlan,
    version: Any,
    skb: Any,
    catalog: Any,
    run_dir: Path,
    *,
    logger: Any = None,
    on_progress: Callable[[Any], None] | None = None,
    on_checkpoint: Callable[[Path], None] | None = None,
) -> Any:
    """Priors, datasets and the training loop into ``run_dir`` (every rank of a multi-GPU run)."""
    from components.prior_cache import PriorCache
    from components.settings import get_settings
    from components.skb import needs_labels
    from components.storage import open_storage
    from components.training.routines import train

    cache = None
    if skb is not None and plan.recipe.skf.skb_mode == "cached":
        ensure_priors(version.ref, skb)
        cache = PriorCache(open_storage(get_settings().storage_uri), catalog, skb.fingerprint)
    train_ds, val_loader = _datasets_for(version, plan, labelled=needs_labels(skb))
    return train(
        plan.recipe,
        train_ds,
        val_loader,
        run_dir=run_dir,
        skb=skb,
        prior_cache=cache,
        baseline_spec=plan.baseline,
        logger=logger,
        progress=on_progress,
        resume=True,
        params={"dataset.version": version.ref, "dataset.manifest": version.manifest_sha256},
        on_checkpoint=on_checkpoint,
        device=plan.device,
        compile=plan.compile,
        num_workers=plan.num_workers,
    )


def _fit(
    job: _Job,
    logger: Any,
    run_dir: Path,
    on_progress: Callable[[Any], None],
    on_checkpoint: Callable[[Path], None],
) -> Any:
    """The training and the enhancer package: everything that may fail."""
    fit = _train_run_dir(
        job.plan,
        job.version,
        job.skb,
        job.catalog,
        run_dir,
        logger=logger,
        on_progress=on_progress,
        on_checkpoint=on_checkpoint,
    )
    if fit.checkpoint is None:
        raise RuntimeError(f"training of {job.plan.recipe.name} ended without a checkpoint in {run_dir}")
    log_package(job.plan, job.skb, fit.checkpoint, logger.run_id)
    return fit


def _train_leased(
    job: _Job,
    keeper: Any,
    *,
    progress: Callable[[Any], None] | None,
    stop_after_step: int | None,
    log: Callable[[str], None],
) -> TrainOutcome:
    """Train while holding the run's lease; the row and the MLflow run end finished or failed, never running."""
    from components.catalog.leases import LeaseLostError, release_lease, update_leased
    from components.settings import get_settings
    from components.storage import open_storage
    from components.training.run_mirror import RunMirror, run_key
    from components.training.stages import has_checkpoint

    settings = get_settings()
    run_dir = settings.home / "runs" / job.digest[:16]
    mirror = RunMirror(open_storage(settings.storage_uri), run_dir, run_key(job.digest))
    if job.previous_run:  # an unfinished run: its checkpoints may come from another host
        mirror.pull()
    resuming = bool(job.previous_run) and has_checkpoint(run_dir)
    logger = None
    try:
        logger = _open_logger(job)
        if not update_leased(job.catalog, job.row_id, job.holder, mlflow_run_id=logger.run_id):
            raise LeaseLostError(
                f"training run {job.row_id} was taken over before it started; rerun the command"
            )
        log(
            f"{'resuming' if resuming else 'training'} {job.plan.recipe.name} on {job.version.ref} "
            f"(config {job.digest[:12]}, MLflow run {logger.run_id}, run dir {run_dir})"
        )
        _tell_followers({"train": True, "digest": job.digest, "resuming": resuming})

        def on_progress(p: Any) -> None:
            keeper.check()
            if progress is not None:
                progress(p)
            if stop_after_step is not None and p.step >= stop_after_step:
                raise TrainingInterrupted(f"stopped after step {p.step} (stop_after_step={stop_after_step})")

        fit = _fit(job, logger, run_dir, on_progress, mirror.push)
        checkpoint_uri = f"{job.client.get_run(logger.run_id).info.artifact_uri}/{CHECKPOINT_ARTIFACT}"
        release_lease(
            job.catalog,
            job.row_id,
            job.holder,
            status="finished",
            checkpoint_uri=checkpoint_uri,
            finished_at=dt.datetime.now(dt.UTC),
        )
    except BaseException as exc:
        killed = isinstance(exc, TrainingInterrupted | KeyboardInterrupt)
        _record_failure(job.catalog, job.row_id, job.holder, logger, "KILLED" if killed else "FAILED")
        clearer = _explain(exc, job.version)
        if clearer is not None:
            raise clearer from exc
        raise
    logger.close("FINISHED")
    return TrainOutcome(
        run_id=logger.run_id,
        checkpoint_uri=checkpoint_uri,
        config_hash=job.digest,
        dataset_version=job.version.ref,
        status="resumed" if resuming else "trained",
        steps=fit.step,
        metrics={**{f"train/{k}": v for k, v in fit.train_metrics.items()}, **fit.val_metrics},
        skb_pretrained=None if job.skb is None else bool(job.skb.pretrained),
    )


def run_training(
    version_ref: str,
    plan: TrainingPlan,
    *,
    progress: Callable[[Any], None] | None = None,
    stop_after_step: int | None = None,
    log: Callable[[str], None] = print,
) -> TrainOutcome:
    """Train ``plan`` on ``version_ref`` unless a finished run with the same config hash exists.

    Resumes an unfinished run of the same hash, into its MLflow run, from the newest intact checkpoint in
    ``$SKF_HOME/runs/<hash[:16]>`` or in ``runs/<hash[:16]>`` of the storage URI, where every checkpoint
    is copied as it is written (:mod:`components.training.run_mirror`): any host can resume it. While
    another process holds the run's lease (it is training the same configuration), this one waits and
    then returns that run's result (status ``joined``), or takes the run over if that process dies.
    ``stop_after_step`` raises :class:`TrainingInterrupted` once that step is done (checkpoint it by
    choosing a multiple of ``train.ckpt_every``) -- how tests and drills exercise resumption.
    """
    from components.catalog import open_catalog
    from components.catalog.leases import LeaseKeeper, new_holder_id
    from components.data.ingest import get_version

    if plan.nodes > 1 and not _in_process_group():
        from components.training.pytorchjob import launch_pytorchjob

        return launch_pytorchjob(version_ref, plan, stop_after_step=stop_after_step, log=log)
    if plan.gpus > 1 and not _in_process_group():
        from components.training.launch import launch_distributed

        return launch_distributed(version_ref, plan, stop_after_step=stop_after_step, log=log)
    catalog = open_catalog()
    version = get_version(version_ref, catalog=catalog)
    skb = build_skb(plan, plan.device)
    digest = config_hash(
        plan,
        skb_fingerprint=skb.fingerprint if skb is not None else None,
        manifest_sha256=version.manifest_sha256,
        val_fraction=plan.val_fraction,
    )
    client = mlflow_client()
    row = _run_row(catalog, digest, version.id)
    done = _done_run(client, row, digest)
    if done is not None:
        log(f"training skipped: run {done.info.run_id} already trained config {digest[:12]} on {version.ref}")
        _record_reuse(catalog, row, done, digest, version.id)
        _tell_followers({"train": False})
        return _reused(done, plan, skb, digest, version, "skipped")

    holder = new_holder_id()
    claim = _wait_for_lease(catalog, digest, version.id, holder, log)
    if not claim.acquired:
        log(f"joined: run {claim.run_id} trained config {digest[:12]} on {version.ref} meanwhile")
        _tell_followers({"train": False})
        return _reused(client.get_run(claim.run_id), plan, skb, digest, version, "joined")
    job = _Job(plan, version, skb, digest, catalog, client, claim.row_id, holder, claim.run_id)
    with LeaseKeeper(catalog, claim.row_id, holder, LEASE_TTL_S) as keeper:
        return _train_leased(job, keeper, progress=progress, stop_after_step=stop_after_step, log=log)


# --------------------------------------------------------------------------------------------------
# Multi-GPU: rank 0 runs the job above, the other ranks follow (components.training.launch starts them)
# --------------------------------------------------------------------------------------------------
def _in_process_group() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _tell_followers(decision: dict[str, Any]) -> None:
    """Rank 0: whether the other ranks train (and which run directory); a no-op in one process."""
    if _in_process_group():
        import torch.distributed as dist

        dist.broadcast_object_list([decision], src=0)


def follow_leader(version_ref: str, plan: TrainingPlan) -> None:
    """A rank > 0 of a multi-GPU run: wait for rank 0's decision (it runs :func:`run_training`), then train
    in lockstep with it, from the checkpoint rank 0 resumes (fetched from the store when this process runs
    on another machine). No catalog row, MLflow run or copies here: rank 0 keeps those."""
    import torch.distributed as dist

    from components.catalog import open_catalog
    from components.data.ingest import get_version
    from components.settings import get_settings
    from components.storage import open_storage
    from components.training.run_mirror import RunMirror, run_key

    received: list[Any] = [None]
    dist.broadcast_object_list(received, src=0)
    decision = received[0]
    if not decision["train"]:
        return
    catalog = open_catalog()
    version = get_version(version_ref, catalog=catalog)
    settings = get_settings()
    run_dir = settings.home / "runs" / decision["digest"][:16]
    if decision.get("resuming"):  # on another machine (a PyTorchJob pod) the checkpoints are in the store
        RunMirror(open_storage(settings.storage_uri), run_dir, run_key(decision["digest"])).pull()
    _train_run_dir(plan, version, build_skb(plan, plan.device), catalog, run_dir)


# --------------------------------------------------------------------------------------------------
# Presentation (the flow's log and artifact)
# --------------------------------------------------------------------------------------------------
def train_markdown(outcome: Mapping[str, Any], plan: TrainingPlan) -> str:
    lines = [
        f"# Training `{plan.recipe.name}` on `{outcome['dataset_version']}`: {outcome['status']}",
        "",
        "| | |",
        "|---|---|",
        *(f"| {k} | `{v}` |" for k, v in plan.describe().items()),
        f"| config hash | `{outcome['config_hash'][:16]}` |",
        f"| MLflow run | `{outcome['run_id']}` |",
        f"| checkpoint | `{outcome['checkpoint_uri']}` |",
        f"| steps | {outcome['steps']} |",
    ]
    if outcome.get("metrics"):
        lines += ["", "| metric | value |", "|---|---:|"]
        lines += [f"| {k} | {v:.4f} |" for k, v in sorted(outcome["metrics"].items())]
    if outcome.get("skb_pretrained") is False:
        lines += ["", "**The SKB is randomly initialised: this model must never be promoted.**"]
    return "\n".join(lines) + "\n"


def progress_every_tenth(log: Callable[..., None]) -> Callable[[Any], None]:
    """A ``progress`` callback that logs a line per tenth of the run and at every validation."""
    last = [-1]

    def progress(p: Any) -> None:
        tenth = p.step * 10 // p.total
        if tenth != last[0] or p.val_metrics:
            last[0] = tenth
            shown = {**p.metrics, **(p.val_metrics or {})}
            log(
                "step %d/%d (%.0fs) %s",
                p.step,
                p.total,
                p.elapsed_s,
                ", ".join(f"{k}={v:.4g}" for k, v in shown.items()),
            )

    return progress
