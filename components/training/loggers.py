"""Run loggers: the protocol the engine talks to, a no-op one and an in-memory one for tests.

The engine only ever calls these five methods from rank 0, so a logger never needs to know about
distributed training. The MLflow implementation lives in :mod:`components.training.mlflow_logger`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch


@runtime_checkable
class RunLogger(Protocol):
    def log_params(self, params: Mapping[str, Any]) -> None:
        """Record run parameters (flat mapping; values are stringified by the backend)."""

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Record scalar metrics at a training step."""

    def log_image(self, image: torch.Tensor, name: str, step: int) -> None:
        """Record a ``(C,H,W)`` float image in [0, 1] (e.g. a sample grid) under a relative file name."""

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """Upload a local file (e.g. a checkpoint) into the run's artifact folder ``artifact_path``."""

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Attach searchable tags to the run."""


class NullLogger:
    """Discards everything; the default when no tracking is wanted."""

    def log_params(self, params: Mapping[str, Any]) -> None:
        return None

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        return None

    def log_image(self, image: torch.Tensor, name: str, step: int) -> None:
        return None

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        return None

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        return None


@dataclass
class InMemoryLogger:
    """Keeps every call in lists, so tests can assert on what the engine logged."""

    params: dict[str, Any] = field(default_factory=dict)
    metrics: list[tuple[int, dict[str, float]]] = field(default_factory=list)
    images: list[tuple[int, str, torch.Tensor]] = field(default_factory=list)
    artifacts: list[tuple[Path, str | None]] = field(default_factory=list)
    tags: dict[str, Any] = field(default_factory=dict)

    def log_params(self, params: Mapping[str, Any]) -> None:
        self.params.update(params)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        self.metrics.append((step, dict(metrics)))

    def log_image(self, image: torch.Tensor, name: str, step: int) -> None:
        self.images.append((step, name, image.detach().cpu()))

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self.artifacts.append((Path(path), artifact_path))

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self.tags.update(tags)

    def history(self, key: str) -> list[tuple[int, float]]:
        """All ``(step, value)`` pairs logged for ``key``."""
        return [(s, m[key]) for s, m in self.metrics if key in m]
