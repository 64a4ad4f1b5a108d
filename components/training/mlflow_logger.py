"""MLflow implementation of :class:`~components.training.loggers.RunLogger`.

Talks to the tracking server through an explicit ``MlflowClient`` and run id instead of MLflow's
global "active run", so several trainings (or a Prefect task next to a flow) never log into each
other's runs. Resuming a training passes the previous ``run_id`` to continue the same run. The dataset
version trained on is logged as an MLflow dataset input (:meth:`MlflowLogger.log_dataset`), so the run's
"Datasets used" shows its name, version, manifest digest and source.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

import numpy as np
import torch
from mlflow import MlflowClient
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

_MAX_PARAMS_PER_BATCH = 100  # MLflow's log_batch limits
_MAX_METRICS_PER_BATCH = 1000
_MAX_DATASET_DIGEST = 36  # MLflow's datasets.digest column; the whole sha256 goes in an input tag


class DatasetRef(Protocol):
    """What :meth:`MlflowLogger.log_dataset` records (a catalog ``VersionSummary`` fits)."""

    name: str
    version: int
    manifest_sha256: str
    source_uri: str


def image_to_uint8_hwc(image: torch.Tensor) -> np.ndarray:
    """``(C,H,W)`` float in [0,1] (C = 1 or 3) to an ``(H,W,C)`` uint8 array for image artifacts."""
    if image.ndim != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"expected a (1|3, H, W) image tensor, got shape {tuple(image.shape)}")
    arr = image.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return arr


class MlflowLogger:
    """Logs params, per-step metrics, sample grids and checkpoints to one MLflow run."""

    def __init__(
        self,
        tracking_uri: str | None = None,
        experiment: str | None = None,
        *,
        run_id: str | None = None,
        run_name: str | None = None,
        tags: Mapping[str, Any] | None = None,
        dataset: DatasetRef | None = None,
    ) -> None:
        """``experiment`` defaults to :func:`components.tracking.experiment_name`; ``dataset`` (the
        version trained on) is logged as the run's training input."""
        self.client = MlflowClient(tracking_uri=tracking_uri)
        run = None
        if run_id is None:
            if experiment is None:
                from components.tracking import experiment_name

                experiment = experiment_name()
            exp = self.client.get_experiment_by_name(experiment)
            experiment_id = exp.experiment_id if exp else self.client.create_experiment(experiment)
            run = self.client.create_run(
                experiment_id, run_name=run_name, tags={k: str(v) for k, v in (tags or {}).items()}
            )
            run_id = run.info.run_id
        self.run_id = run_id
        # Continuing a run: a resume replays the steps after its checkpoint, whose metrics may already be
        # logged; those steps are not logged again, so every metric history keeps one value per step.
        self._logged_up_to: dict[str, int] = {} if run is not None else self._last_steps()
        if tags and run is None:  # continuing a run: add the tags to it
            self.set_tags(tags)
        if dataset is not None:  # also on a continued run: MLflow keeps one input per dataset
            self.log_dataset(dataset)

    def _last_steps(self) -> dict[str, int]:
        """The last step logged for each metric of the (continued) run."""
        keys = self.client.get_run(self.run_id).data.metrics
        return {key: max(m.step for m in self.client.get_metric_history(self.run_id, key)) for key in keys}

    # RunLogger ---------------------------------------------------------------------------------
    def log_params(self, params: Mapping[str, Any]) -> None:
        items = [Param(str(k), _param_value(v)) for k, v in params.items()]
        for i in range(0, len(items), _MAX_PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=items[i : i + _MAX_PARAMS_PER_BATCH])

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        items = [
            Metric(str(k), float(v), now, int(step))
            for k, v in metrics.items()
            if int(step) > self._logged_up_to.get(str(k), -1)
        ]
        for i in range(0, len(items), _MAX_METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=items[i : i + _MAX_METRICS_PER_BATCH])

    def log_image(self, image: torch.Tensor, name: str, step: int) -> None:
        """Logged under a key (the name's folder, e.g. ``samples``) and the step, so MLflow's image view
        shows the grids of one key as a sequence over training."""
        key = name.rsplit("/", 1)[0] if "/" in name else name.rsplit(".", 1)[0]
        self.client.log_image(self.run_id, image_to_uint8_hwc(image), key=key, step=step)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self.client.log_batch(self.run_id, tags=[RunTag(str(k), str(v)) for k, v in tags.items()])

    def log_dataset(self, dataset: DatasetRef, context: str = "training") -> None:
        """Record ``dataset`` as an input of the run: metadata only (nothing is read or uploaded).

        Name ``<name>@<version>``, digest the manifest sha256 (cut to MLflow's 36 characters; whole in
        tag ``skf.manifest_sha256``), source the URI it was ingested from.
        """
        from mlflow.data.meta_dataset import MetaDataset

        ref = f"{dataset.name}@{dataset.version}"
        meta = MetaDataset(
            _dataset_source(dataset.source_uri),
            name=ref,
            digest=dataset.manifest_sha256[:_MAX_DATASET_DIGEST],
        )
        tags = {
            MLFLOW_DATASET_CONTEXT: context,
            "skf.dataset_version": ref,
            "skf.manifest_sha256": dataset.manifest_sha256,
        }
        entry = DatasetInput(Dataset(**meta.to_dict()), [InputTag(k, v) for k, v in tags.items()])
        self.client.log_inputs(self.run_id, datasets=[entry])

    # lifecycle ---------------------------------------------------------------------------------
    def close(self, status: str = "FINISHED") -> None:
        """Mark the run terminated (``FINISHED``, ``FAILED`` or ``KILLED``)."""
        self.client.set_terminated(self.run_id, status=status)

    def __enter__(self) -> MlflowLogger:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.close("FINISHED")
        else:
            self.close("KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED")


def _dataset_source(uri: str) -> Any:
    """MLflow's source for ``uri`` (local path, ``s3://``, ``https://``...), chosen from the URI alone.

    A URI no MLflow source claims is kept verbatim as a URL source.
    """
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.http_dataset_source import HTTPDatasetSource
    from mlflow.exceptions import MlflowException

    with warnings.catch_warnings():  # a local path matches two equivalent resolvers; MLflow warns
        warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
        try:
            return resolve_dataset_source(uri)
        except MlflowException:
            return HTTPDatasetSource(uri)


def _param_value(value: Any) -> str:
    if isinstance(value, list | tuple):
        return ",".join(map(str, value))
    return str(value)
