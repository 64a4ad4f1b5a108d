"""The segmenter training job: train ``skb/scene-segmenter@1`` on a labelled dataset version, once.

One MLflow run in experiment :data:`EXPERIMENT` per (config, dataset version): params (the config, the
dataset, the architecture), the loss curve ``train/loss``, validation ``val/*`` during training, and at
the end ``test/miou``, ``test/pixel_acc`` and ``test/iou/<class>`` on the test split. The package
(:mod:`components.segmenter.package`) is written to ``$SKF_HOME/segmenters/<hash[:16]>/``, logged as the
run's ``segmenter/`` artifacts and registered as a model version of ``skf-scene-segmenter`` (alias
``challenger``, unless a newer version holds it) whose source is that folder.

Idempotent like training: the run is tagged with the config hash (config, architecture, dataset manifest
and class names); a finished run with that hash is reused (registered first if it is not yet), so a rerun
does no work. A failed run is marked FAILED and a rerun starts afresh (training is minutes, not resumed).
``skf train-skb`` and the ``train-skb`` flow both call :func:`run_segmenter_training`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch

from components.errors import UserInputError
from components.segmenter.data import label_classes, load_split
from components.segmenter.package import (
    ARTIFACT_PATH,
    NUM_CLASSES,
    SCENE_SEGMENTER_SPEC,
    SHA_TAG,
    architecture,
    save_segmenter,
)
from components.segmenter.training import SegmenterConfig, SegmenterFit, SegmenterProgress, evaluate, fit

__all__ = [
    "CONFIG_HASH_TAG",
    "DEFAULT_MODEL_NAME",
    "EXPERIMENT",
    "SegmenterOutcome",
    "config_hash",
    "make_config",
    "run_segmenter_training",
    "segmenter_markdown",
]

EXPERIMENT = "skf-segmenter"
DEFAULT_MODEL_NAME = "skf-scene-segmenter"
CONFIG_HASH_TAG = "skf.segmenter.config_hash"
_HASH_FORMAT = 1
_LOG_EVERY = 25  # loss values are sent to MLflow in batches of this many steps


def make_config(overrides: Mapping[str, Any] | None = None, *, steps: int | None = None) -> SegmenterConfig:
    """A validated config from ``--set`` style overrides (and ``--steps``); bad keys or values: one line."""
    from pydantic import ValidationError

    values = dict(overrides or {})
    if steps is not None:
        values["steps"] = steps
    try:
        return SegmenterConfig.model_validate(values)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'config'}: {e['msg']}" for e in exc.errors())
        known = ", ".join(SegmenterConfig.model_fields)
        raise UserInputError(f"invalid segmenter setting ({problems}); settings are: {known}") from None


def config_hash(config: SegmenterConfig, *, manifest_sha256: str, classes: tuple[str, ...]) -> str:
    """sha256 of everything that determines the trained weights (device and registry name excluded)."""
    payload = {
        "format": _HASH_FORMAT,
        "spec": SCENE_SEGMENTER_SPEC,
        "config": config.model_dump(mode="json"),
        "architecture": architecture().to_dict(),
        "dataset_manifest": manifest_sha256,
        "classes": list(classes),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


@dataclasses.dataclass
class SegmenterOutcome:
    """What a training request produced (or found): the run, the registered version, the metrics."""

    run_id: str
    status: str  # "trained" | "skipped"
    config_hash: str
    dataset_version: str
    steps: int
    seconds: float
    sha256: str
    classes: list[str]
    metrics: dict[str, float]
    model_name: str | None = None
    model_version: str | None = None
    challenger: bool = False
    local_dir: str | None = None

    @property
    def checkpoint(self) -> str:
        """What to pass as ``--checkpoint`` / ``--skb-checkpoint``: the registered version, else the run."""
        return f"models:/{self.model_name}/{self.model_version}" if self.model_version else self.run_id

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "checkpoint": self.checkpoint}


# --------------------------------------------------------------------------------------------------
# MLflow
# --------------------------------------------------------------------------------------------------
def _experiment_id(client: Any) -> str:
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(EXPERIMENT)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(EXPERIMENT)
    except MlflowException:  # created by a concurrent request
        return client.get_experiment_by_name(EXPERIMENT).experiment_id


def _finished_run(client: Any, experiment_id: str, digest: str) -> Any:
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{CONFIG_HASH_TAG}` = '{digest}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0] if runs else None


def _registered(client: Any, name: str, run_id: str) -> Any:
    """The newest version of ``name`` made from ``run_id``, re-read so it carries its aliases (search
    results come without them)."""
    versions = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    if not versions:
        return None
    return client.get_model_version(name, str(max(int(v.version) for v in versions)))


def _register(client: Any, run: Any, name: str, metrics: Mapping[str, float]) -> tuple[str, bool]:
    """Register the run's ``segmenter/`` folder as a version of ``name``; move ``challenger`` to it if newer."""
    from mlflow.exceptions import MlflowException

    from components.model_registry import CHALLENGER, registry_lock

    existing = _registered(client, name, run.info.run_id)
    if existing is not None:
        return str(existing.version), CHALLENGER in (getattr(existing, "aliases", None) or [])
    try:
        client.create_registered_model(name, description=f"Scene segmenters for {SCENE_SEGMENTER_SPEC}")
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    tags = {
        SHA_TAG: run.data.tags[SHA_TAG],
        "skf.spec": SCENE_SEGMENTER_SPEC,
        "skf.dataset_version": run.data.tags.get("skf.dataset_version", ""),
        CONFIG_HASH_TAG: run.data.tags[CONFIG_HASH_TAG],
        **{f"skf.metric.{k}": repr(float(v)) for k, v in metrics.items() if k.startswith("test/")},
    }
    source = f"{run.info.artifact_uri}/{ARTIFACT_PATH}"
    mv = client.create_model_version(name, source=source, run_id=run.info.run_id, tags=tags)
    with registry_lock(name):
        current = (client.get_registered_model(name).aliases or {}).get(CHALLENGER)
        challenger = current is None or int(current) < int(mv.version)
        if challenger:
            client.set_registered_model_alias(name, CHALLENGER, mv.version)
    client.set_tag(run.info.run_id, "skf.registered_model", f"{name}/{mv.version}")
    return str(mv.version), challenger


class _CurveLogger:
    """Progress callback: the loss curve to MLflow in batches, validation metrics as they come."""

    def __init__(self, client: Any, run_id: str, classes: tuple[str, ...], progress: Any) -> None:
        self.client, self.run_id, self.classes, self.progress = client, run_id, classes, progress
        self.pending: list[Any] = []

    def __call__(self, p: SegmenterProgress) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.pending.append(Metric("train/loss", p.loss, now, p.step))
        if p.val is not None:
            self.pending += [Metric(k, v, now, p.step) for k, v in p.val.flat("val", self.classes).items()]
        if len(self.pending) >= _LOG_EVERY or p.step == p.total:
            self.client.log_batch(self.run_id, metrics=self.pending)
            self.pending = []
        if self.progress is not None:
            self.progress(p)


def _params(config: SegmenterConfig, version: Any, classes: tuple[str, ...], device: str) -> dict[str, str]:
    return {
        **{f"segmenter.{k}": str(v) for k, v in config.model_dump(mode="json").items()},
        "segmenter.spec": SCENE_SEGMENTER_SPEC,
        "segmenter.arch": architecture().name,
        "segmenter.num_classes": str(NUM_CLASSES),
        "segmenter.classes": ",".join(classes),
        "dataset.version": version.ref,
        "dataset.manifest": version.manifest_sha256,
        "device": device,
    }


# --------------------------------------------------------------------------------------------------
# The job
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Request:
    version: Any
    config: SegmenterConfig
    classes: tuple[str, ...]
    digest: str
    device: str


def _load_splits(req: _Request) -> tuple[Any, Any, Any]:
    """(train, val or None, test) images and label maps, the validation pairs carved from train."""
    from components.data.torch_dataset import carve_validation

    config, version, k = req.config, req.version, len(req.classes)
    try:
        records = carve_validation(version, config.val_fraction, seed=config.seed)
    except ValueError as exc:
        raise UserInputError(f"dataset {version.ref}: {exc}; use --set val_fraction=0") from None
    train = load_split(records, "train", version.ref, k)
    if not len(train):
        raise UserInputError(f"dataset {version.ref} has no labelled train pairs to train the segmenter on")
    val = load_split(records, "val", version.ref, k) if config.val_fraction else None
    return train, val, load_split(records, "test", version.ref, k)


def _scores(result: SegmenterFit, test: Any, req: _Request) -> dict[str, float]:
    """The run's result metrics: final loss and time, last validation, and the test split."""
    metrics = {"train/loss_final": result.losses[-1], "train/seconds": result.seconds}
    if result.val_history:
        metrics.update(result.val_history[-1][1].flat("val", req.classes))
    if len(test):
        scored = evaluate(result.model, test, len(req.classes), req.config.input_transform, req.device)
        metrics.update(scored.flat("test", req.classes))
    return metrics


def _train_in_run(client: Any, run_id: str, req: _Request, progress: Any) -> None:
    """Load the splits, fit, score, then write the package locally and log it with the metrics."""
    from mlflow.entities import Metric

    from components.settings import get_settings

    train, val, test = _load_splits(req)
    curve = _CurveLogger(client, run_id, req.classes, progress)
    result = fit(req.config, train, val, len(req.classes), device=req.device, progress=curve)
    metrics = _scores(result, test, req)
    meta = {
        "classes": list(req.classes),
        "input_transform": req.config.input_transform,
        "dataset_version": req.version.ref,
        "dataset_manifest": req.version.manifest_sha256,
        "config_hash": req.digest,
        "training": req.config.model_dump(mode="json"),
        "crop_used": result.crop,
        "metrics": metrics,
        "mlflow_run_id": run_id,
    }
    files = save_segmenter(result.model, get_settings().home / "segmenters" / req.digest[:16], meta)
    client.log_artifacts(run_id, str(files.directory), ARTIFACT_PATH)
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, req.config.steps) for k, v in metrics.items()])
    client.set_tag(run_id, SHA_TAG, files.sha256)


def _train(
    client: Any, experiment_id: str, req: _Request, progress: Any, log_line: Callable[[str], None]
) -> Any:
    """A new run: tags and params, then training; the run ends FINISHED or FAILED, never RUNNING."""
    from mlflow.entities import Param

    tags = {
        CONFIG_HASH_TAG: req.digest,
        "skf.dataset_version": req.version.ref,
        "skf.spec": SCENE_SEGMENTER_SPEC,
        "mlflow.runName": f"segmenter-{req.version.ref}-{req.digest[:8]}",
    }
    run = client.create_run(experiment_id, tags=tags)
    run_id = run.info.run_id
    params = _params(req.config, req.version, req.classes, req.device)
    client.log_batch(run_id, params=[Param(k, v) for k, v in params.items()])
    log_line(
        f"training {SCENE_SEGMENTER_SPEC} on {req.version.ref} ({len(req.classes)} classes, {req.config.steps} steps, "
        f"device {req.device}; MLflow run {run_id} in experiment {EXPERIMENT})"
    )
    try:
        _train_in_run(client, run_id, req, progress)
    except BaseException as exc:
        client.set_terminated(run_id, "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    return client.get_run(run_id)


def _outcome(
    run: Any, status: str, req: _Request, name: str | None, version: str | None, challenger: bool
) -> SegmenterOutcome:
    from components.settings import get_settings

    local = get_settings().home / "segmenters" / req.digest[:16]
    metrics = {k: float(v) for k, v in run.data.metrics.items() if k.startswith(("test/", "val/", "train/"))}
    metrics.pop("train/loss", None)  # the curve, not a result
    return SegmenterOutcome(
        run_id=run.info.run_id,
        status=status,
        config_hash=req.digest,
        dataset_version=req.version.ref,
        steps=req.config.steps,
        seconds=float(run.data.metrics.get("train/seconds", 0.0)),
        sha256=run.data.tags.get(SHA_TAG, ""),
        classes=list(req.classes),
        metrics=metrics,
        model_name=name if version else None,
        model_version=version,
        challenger=challenger,
        local_dir=str(local) if local.is_dir() else None,
    )


def run_segmenter_training(
    version_ref: str,
    config: SegmenterConfig | None = None,
    *,
    device: str | None = None,
    model_name: str = DEFAULT_MODEL_NAME,
    register: bool = True,
    progress: Callable[[SegmenterProgress], None] | None = None,
    log: Callable[[str], None] = print,
) -> SegmenterOutcome:
    """Train the scene segmenter on ``version_ref`` unless a finished run with the same config hash exists.

    ``register`` adds the run's package as a version of ``model_name`` (alias ``challenger``); a reused run
    that was never registered is registered now.
    """
    from components.catalog import open_catalog
    from components.data.ingest import get_version
    from components.tracking import mlflow_client

    config = config or SegmenterConfig()
    version = get_version(version_ref, catalog=open_catalog())
    classes = label_classes(version)
    if len(classes) > NUM_CLASSES:
        raise UserInputError(
            f"dataset {version.ref} names {len(classes)} classes; {SCENE_SEGMENTER_SPEC} has {NUM_CLASSES} channels"
        )
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    digest = config_hash(config, manifest_sha256=version.manifest_sha256, classes=classes)
    req = _Request(version, config, classes, digest, str(device))
    client = mlflow_client()
    experiment_id = _experiment_id(client)
    run = _finished_run(client, experiment_id, digest)
    status = "skipped" if run is not None else "trained"
    if run is not None:
        log(
            f"segmenter training skipped: run {run.info.run_id} already trained config {digest[:12]} on {version.ref}"
        )
    else:
        run = _train(client, experiment_id, req, progress, log)
    metrics = {k: float(v) for k, v in run.data.metrics.items()}
    mv, challenger = _register(client, run, model_name, metrics) if register else (None, False)
    return _outcome(run, status, req, model_name, mv, challenger)


# --------------------------------------------------------------------------------------------------
# Presentation (CLI table, flow artifact)
# --------------------------------------------------------------------------------------------------
def segmenter_markdown(outcome: Mapping[str, Any]) -> str:
    """The flow's artifact: what was trained, where it is, the metrics, and how to use it."""
    ckpt = outcome["checkpoint"]
    lines = [
        f"# Scene segmenter on `{outcome['dataset_version']}`: {outcome['status']}",
        "",
        "| | |",
        "|---|---|",
        f"| SKB spec | `{SCENE_SEGMENTER_SPEC}` |",
        f"| classes | {', '.join(outcome['classes'])} |",
        f"| MLflow run | `{outcome['run_id']}` (experiment `{EXPERIMENT}`) |",
        f"| registered | `{ckpt}` |" if outcome.get("model_version") else "| registered | no |",
        f"| weights sha256 | `{outcome['sha256']}` |",
        f"| config hash | `{outcome['config_hash'][:16]}` |",
        f"| steps | {outcome['steps']} ({outcome['seconds']:.1f} s) |",
        "",
        "| metric | value |",
        "|---|---:|",
        *(f"| {k} | {v:.4f} |" for k, v in sorted(outcome["metrics"].items())),
        "",
        f"Use it: `skf precompute {outcome['dataset_version']} --skb {SCENE_SEGMENTER_SPEC} --checkpoint {ckpt}`, "
        f"then `skf train {outcome['dataset_version']} --skb {SCENE_SEGMENTER_SPEC} --skb-checkpoint {ckpt}`.",
    ]
    return "\n".join(lines) + "\n"
