"""MLflow implementation of :class:`~components.training.loggers.RunLogger`.

Talks to the tracking server through an explicit ``MlflowClient`` and run id instead of MLflow's
global "active run", so several trainings (or a Prefect task next to a flow) never log into each
other's runs. Resuming a training passes the previous ``run_id`` to continue the same run.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import torch
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag

_MAX_PARAMS_PER_BATCH = 100  # MLflow's log_batch limits
_MAX_METRICS_PER_BATCH = 1000


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
        experiment: str = "skf",
        *,
        run_id: str | None = None,
        run_name: str | None = None,
        tags: Mapping[str, Any] | None = None,
    ) -> None:
        self.client = MlflowClient(tracking_uri=tracking_uri)
        run = None
        if run_id is None:
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
        self.client.log_image(self.run_id, image_to_uint8_hwc(image), artifact_file=name)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self.client.log_batch(self.run_id, tags=[RunTag(str(k), str(v)) for k, v in tags.items()])

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


def _param_value(value: Any) -> str:
    if isinstance(value, list | tuple):
        return ",".join(map(str, value))
    return str(value)
