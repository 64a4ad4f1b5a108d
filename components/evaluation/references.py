"""Classic, training-free enhancers scored beside every model: the bar a trained enhancer must clear.

A metric table with only the model's row cannot tell a working enhancer from a broken one: 12 dB PSNR is
good or bad depending on how far a one-line curve gets on the same images. Every paired evaluation therefore
also scores these references on the same inputs, under the same protocol and metrics:

* ``input``: the low-light image as is (what "no enhancement" scores);
* ``gamma``: ``x ** 0.4`` per channel (brightens shadows most, the simplest global curve);
* ``clahe``: scikit-image's contrast-limited adaptive histogram equalisation (on HSV value);
* ``hist-eq``: global histogram equalisation of the HSV value channel (hue and saturation kept).

None of them sees the reference image, so they are fair baselines under the ``raw`` protocol; under
``gt-mean`` the protocol rescales their output like the model's.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "GAMMA",
    "REFERENCE_ENHANCERS",
    "best_classic",
    "enhance_references",
    "headline",
    "score_references",
]

GAMMA = 0.4

ReferenceEnhancer = Callable[[np.ndarray], np.ndarray]  # H×W×3 float64 in [0, 1] -> same


def _identity(x: np.ndarray) -> np.ndarray:
    return x


def _gamma(x: np.ndarray) -> np.ndarray:
    return np.power(x, GAMMA)


def _clahe(x: np.ndarray) -> np.ndarray:
    from skimage.exposure import equalize_adapthist

    return equalize_adapthist(x)


def _hist_eq(x: np.ndarray) -> np.ndarray:
    from skimage.color import hsv2rgb, rgb2hsv
    from skimage.exposure import equalize_hist

    hsv = rgb2hsv(x)
    hsv[..., 2] = equalize_hist(hsv[..., 2])
    return hsv2rgb(hsv)


#: name -> enhancer; ``input`` first: it is the row every summary quotes beside the model.
REFERENCE_ENHANCERS: Mapping[str, ReferenceEnhancer] = {
    "input": _identity,
    "gamma": _gamma,
    "clahe": _clahe,
    "hist-eq": _hist_eq,
}


def enhance_references(lows: Sequence[Tensor], names: Sequence[str] | None = None) -> dict[str, list[Tensor]]:
    """Each reference enhancer's outputs for ``lows`` ((3, H, W) float in [0, 1]), same layout back."""
    chosen = list(REFERENCE_ENHANCERS) if names is None else list(names)
    unknown = sorted(set(chosen) - set(REFERENCE_ENHANCERS))
    if unknown:
        raise ValueError(
            f"unknown reference enhancer(s) {unknown}; choose from {sorted(REFERENCE_ENHANCERS)}"
        )
    out: dict[str, list[Tensor]] = {}
    for name in chosen:
        fn = REFERENCE_ENHANCERS[name]
        out[name] = [_apply(fn, x) for x in lows]
    return out


def _apply(fn: ReferenceEnhancer, x: Tensor) -> Tensor:
    """``fn`` on one (3, H, W) image, through a float64 H×W×3 array made for this image only."""
    array = x.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy().astype(np.float64)
    return torch.from_numpy(np.clip(fn(array), 0.0, 1.0).astype(np.float32)).permute(2, 0, 1).contiguous()


def best_classic(scores: Mapping[str, Mapping[str, float | None]], metric: str = "psnr") -> tuple[str, float]:
    """(name, value) of the best enhancing reference on ``metric`` (``input`` is not an enhancer)."""
    from components.evaluation.metrics import get_metric

    sign = 1.0 if get_metric(metric).higher_is_better else -1.0
    candidates = {
        name: row[metric] for name, row in scores.items() if name != "input" and row.get(metric) is not None
    }
    if not candidates:
        raise ValueError(f"no classic reference has a {metric!r} score")
    name = max(candidates, key=lambda n: sign * candidates[n])
    return name, float(candidates[name])


def score_references(
    lows: Sequence[Tensor],
    highs: Sequence[Tensor],
    protocol: str,
    metrics: Sequence[str],
    *,
    names: Sequence[str],
    device: torch.device,
    split: str,
) -> dict[str, Any]:
    """Every reference enhancer's :class:`~components.evaluation.report.EvaluationReport` on the pairs.

    One reference at a time, its outputs dropped once scored: the references add one set of images to
    what the evaluation holds, not four.
    """
    from components.evaluation.evaluate import evaluate_pairs

    reports = {}
    for ref in REFERENCE_ENHANCERS:
        outs = enhance_references(lows, names=[ref])[ref]
        reports[ref] = evaluate_pairs(outs, highs, protocol, metrics, names=names, device=device, split=split)
        del outs
    return reports


def headline(model: Mapping[str, float | None], references: Mapping[str, Mapping[str, float | None]]) -> str:
    """``model X dB vs input Y dB vs best classic Z dB (name)``, and the same for SSIM when scored."""
    parts = []
    for metric, unit, fmt in (("psnr", " dB", "{:.2f}"), ("ssim", "", "{:.3f}")):
        value, base = model.get(metric), references.get("input", {}).get(metric)
        if value is None or base is None:
            continue
        best, best_value = best_classic(references, metric)
        model_s, base_s, best_s = (fmt.format(v) + unit for v in (value, base, best_value))
        parts.append(f"{metric.upper()}: model {model_s} vs input {base_s} vs best classic {best_s} ({best})")
    return "; ".join(parts) if parts else "no PSNR/SSIM to compare"
