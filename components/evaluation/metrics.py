"""The metric table: what each metric means, which way is better, and what it needs to run."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from components.errors import SKFError


@dataclass(frozen=True)
class MetricSpec:
    """One image-quality metric as the evaluation reports it.

    ``backend_name``/``backend_options`` say how the pyiqa adapter builds it; ``weights`` are file names from
    :data:`components.weights.KNOWN_WEIGHTS` that must be available locally, in the order the backend takes
    them (the first is passed as ``pretrained_model_path``).
    """

    name: str
    higher_is_better: bool
    needs_reference: bool
    description: str
    weights: tuple[str, ...] = ()
    backend_name: str = ""
    backend_options: dict[str, Any] = field(default_factory=dict)


METRICS: dict[str, MetricSpec] = {
    spec.name: spec
    for spec in (
        MetricSpec(
            "psnr",
            higher_is_better=True,
            needs_reference=True,
            description="peak signal-to-noise ratio over RGB, dB",
            backend_name="psnr",
            backend_options={"test_y_channel": False},
        ),
        MetricSpec(
            "ssim",
            higher_is_better=True,
            needs_reference=True,
            description="structural similarity; window and channels depend on the protocol",
            backend_name="ssimc",
            backend_options={"downsample": False, "test_y_channel": False},
        ),
        MetricSpec(
            "lpips",
            higher_is_better=False,
            needs_reference=True,
            description="LPIPS v0.1, AlexNet backbone (learned perceptual distance)",
            weights=("LPIPS_v0.1_alex-df73285e.pth", "alexnet-owt-7be5be79.pth"),
            backend_name="lpips",
            backend_options={"net": "alex", "version": "0.1"},
        ),
        MetricSpec(
            "niqe",
            higher_is_better=False,
            needs_reference=False,
            description="NIQE, no-reference naturalness (Y channel)",
            weights=("niqe_modelparameters.mat",),
            backend_name="niqe",
            backend_options={"test_y_channel": True},
        ),
    )
}

PAIRED_DEFAULT: tuple[str, ...] = ("psnr", "ssim", "lpips", "niqe")
UNPAIRED_DEFAULT: tuple[str, ...] = ("niqe",)


def get_metric(name: str) -> MetricSpec:
    try:
        return METRICS[name.lower()]
    except KeyError:
        raise KeyError(f"unknown metric {name!r}; known: {', '.join(METRICS)}") from None


@dataclass(frozen=True)
class MetricUnavailable:
    """A metric that could not be computed, and why (missing weights, backend failure)."""

    metric: str
    reason: str


class MetricUnavailableError(SKFError, RuntimeError):
    """Raised by a backend when a metric cannot be built or run; the evaluation records it, never crashes."""

    def __init__(self, metric: str, reason: str) -> None:
        super().__init__(f"{metric}: {reason}")
        self.record = MetricUnavailable(metric, reason)
