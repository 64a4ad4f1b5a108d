"""The result of one evaluation: per-image rows, aggregates, the protocol, and what could not be computed."""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from components.evaluation.metrics import MetricUnavailable, get_metric
from components.evaluation.protocols import Protocol


@dataclass
class EvaluationReport:
    """Scores of one image set under one protocol.

    ``rows`` hold one dict per image (``name`` plus one float per metric; ``None`` for an unavailable
    metric), ``aggregates`` the mean per metric (``None`` when unavailable). PSNR may be ``inf`` (identical
    images under the skimage-compatible protocols); it is kept, not clipped, in rows and aggregates.
    """

    protocol: Protocol
    metrics: tuple[str, ...]
    rows: list[dict[str, Any]]
    aggregates: dict[str, float | None]
    unavailable: dict[str, MetricUnavailable] = field(default_factory=dict)
    split: str = "test"
    paired: bool = True

    @property
    def num_images(self) -> int:
        return len(self.rows)

    def to_csv(self, path: str | Path) -> Path:
        """One row per image: name, each metric (empty when unavailable), and the protocol name."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["name", *self.metrics, "protocol"])
            for row in self.rows:
                cells = ["" if row.get(m) is None else repr(float(row[m])) for m in self.metrics]
                writer.writerow([row["name"], *cells, self.protocol.name])
        return path

    def to_markdown(self) -> str:
        """Aggregates table, the protocol record and the unavailable metrics with their reasons."""
        lines = [
            f"### Evaluation: {self.split}, {self.num_images} images, protocol `{self.protocol.name}`",
            "",
            "| metric | mean | better |",
            "|---|---|---|",
        ]
        for m in self.metrics:
            value = self.aggregates.get(m)
            shown = "unavailable" if value is None else f"{value:.4f}"
            better = "higher" if get_metric(m).higher_is_better else "lower"
            lines.append(f"| {m} | {shown} | {better} |")
        lines += ["", "Protocol:", ""]
        lines += [f"- {k}: {v}" for k, v in self.protocol.record().items()]
        if self.unavailable:
            lines += ["", "Unavailable:", ""]
            lines += [f"- {u.metric}: {u.reason}" for u in self.unavailable.values()]
        return "\n".join(lines) + "\n"

    def mlflow_metrics(self) -> dict[str, float]:
        """Finite aggregates as ``<split>/<metric>``; infinite ones are reported in :meth:`mlflow_tags`."""
        out = {}
        for m in self.metrics:
            value = self.aggregates.get(m)
            if value is not None and math.isfinite(value):
                out[f"{self.split}/{m}"] = float(value)
        out[f"{self.split}/num_images"] = float(self.num_images)
        return out

    def mlflow_params(self) -> dict[str, str]:
        """The protocol record as ``eval/<field>`` parameters."""
        return {f"eval/{k}": v for k, v in self.protocol.record().items()}

    def mlflow_tags(self) -> dict[str, str]:
        """Why metrics are missing (``eval/unavailable/<metric>``) and non-finite aggregates."""
        tags = {f"eval/unavailable/{u.metric}": u.reason[:4000] for u in self.unavailable.values()}
        for m in self.metrics:
            value = self.aggregates.get(m)
            if value is not None and not math.isfinite(value):
                tags[f"{self.split}/{m}"] = str(value)
        return tags
