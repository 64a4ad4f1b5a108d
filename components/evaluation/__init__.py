"""Image-quality evaluation with explicit protocols (PSNR, SSIM, LPIPS, NIQE).

pyiqa (non-commercial licence) is used only behind :mod:`components.evaluation.pyiqa_backend`; the
skimage-compatible PSNR/SSIM of the ``paper`` protocols are our own torch code.
"""

from components.evaluation.evaluate import evaluate_pairs, evaluate_unpaired
from components.evaluation.metrics import (
    METRICS,
    PAIRED_DEFAULT,
    UNPAIRED_DEFAULT,
    MetricSpec,
    MetricUnavailable,
    MetricUnavailableError,
    get_metric,
)
from components.evaluation.protocols import PROTOCOLS, Protocol, get_protocol, gt_mean_rescale, quantise
from components.evaluation.report import EvaluationReport

__all__ = [
    "METRICS",
    "PAIRED_DEFAULT",
    "PROTOCOLS",
    "UNPAIRED_DEFAULT",
    "EvaluationReport",
    "MetricSpec",
    "MetricUnavailable",
    "MetricUnavailableError",
    "Protocol",
    "evaluate_pairs",
    "evaluate_unpaired",
    "get_metric",
    "get_protocol",
    "gt_mean_rescale",
    "quantise",
]
