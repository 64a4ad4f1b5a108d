"""Score image sets: paired (PSNR, SSIM, LPIPS, NIQE) and unpaired (NIQE), batched on CPU or GPU."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch

from components.evaluation import pyiqa_backend, skimage_compat
from components.evaluation.metrics import (
    PAIRED_DEFAULT,
    UNPAIRED_DEFAULT,
    MetricSpec,
    MetricUnavailable,
    MetricUnavailableError,
    get_metric,
)
from components.evaluation.protocols import Protocol, get_protocol
from components.evaluation.report import EvaluationReport

Images = torch.Tensor | Sequence[torch.Tensor]
Scorer = pyiqa_backend.Scorer


def _scorer(spec: MetricSpec, protocol: Protocol, device: torch.device) -> Scorer:
    if spec.name == "psnr" and protocol.psnr == "skimage":
        return skimage_compat.psnr_uint8
    if spec.name == "ssim" and protocol.ssim == "skimage":
        return skimage_compat.ssim_uint8
    return pyiqa_backend.build(spec, device)


def _as_list(images: Images, what: str) -> list[torch.Tensor]:
    if isinstance(images, torch.Tensor):
        if images.dim() != 4:
            raise ValueError(f"{what}: expected an (N, 3, H, W) tensor, got shape {tuple(images.shape)}")
        return list(images.unbind(0))
    out = []
    for i, img in enumerate(images):
        if img.dim() == 4 and img.shape[0] == 1:
            img = img[0]
        if img.dim() != 3:
            raise ValueError(f"{what}[{i}]: expected a (3, H, W) image, got shape {tuple(img.shape)}")
        out.append(img)
    return out


def _batches(
    outputs: list[torch.Tensor], references: list[torch.Tensor] | None, names: list[str], batch_size: int
) -> Iterator[tuple[list[str], torch.Tensor, torch.Tensor | None]]:
    """Consecutive same-size images stacked into batches of at most ``batch_size``."""
    start = 0
    while start < len(outputs):
        end = start + 1
        while end < len(outputs) and end - start < batch_size and outputs[end].shape == outputs[start].shape:
            end += 1
        out = torch.stack(outputs[start:end])
        ref = None if references is None else torch.stack(references[start:end])
        yield names[start:end], out, ref
        start = end


def _validate(outputs: list[torch.Tensor], references: list[torch.Tensor] | None, names: list[str]) -> None:
    if references is not None and len(references) != len(outputs):
        raise ValueError(f"{len(outputs)} outputs but {len(references)} references: pair them one to one")
    if len(names) != len(outputs):
        raise ValueError(f"{len(names)} names for {len(outputs)} images")
    for i, out in enumerate(outputs):
        if out.shape[0] != 3:
            raise ValueError(f"image {names[i]!r}: expected 3 RGB channels, got shape {tuple(out.shape)}")
        if references is not None and references[i].shape != out.shape:
            raise ValueError(
                f"image {names[i]!r}: output {tuple(out.shape)} and reference {tuple(references[i].shape)} "
                "differ in shape; crop or pad them to the same size before evaluating"
            )


def _run(
    outputs: Images,
    references: Images | None,
    protocol: str | Protocol,
    metrics: Sequence[str],
    names: Sequence[str] | None,
    device: str | torch.device | None,
    batch_size: int,
    split: str,
) -> EvaluationReport:
    proto = get_protocol(protocol)
    specs = [get_metric(m) for m in metrics]
    paired = references is not None
    for spec in specs:
        if spec.needs_reference and not paired:
            raise ValueError(f"metric {spec.name!r} needs reference images; use evaluate_pairs")
    if not paired and proto.brightness != "none":
        raise ValueError(
            f"protocol {proto.name!r} rescales by the reference and cannot score unpaired images"
        )
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    outs = _as_list(outputs, "outputs")
    refs = None if references is None else _as_list(references, "references")
    image_names = [f"{i:05d}" for i in range(len(outs))] if names is None else [str(n) for n in names]
    _validate(outs, refs, image_names)

    scorers: dict[str, Scorer] = {}
    unavailable: dict[str, MetricUnavailable] = {}
    for spec in specs:
        try:
            scorers[spec.name] = _scorer(spec, proto, dev)
        except MetricUnavailableError as exc:
            unavailable[spec.name] = exc.record

    values: dict[str, list[float]] = {name: [] for name in scorers}
    for batch_names, out, ref in _batches(outs, refs, image_names, batch_size):
        out, ref = proto.prepare(out.to(dev), None if ref is None else ref.to(dev))
        for name, score in list(scorers.items()):
            try:
                values[name].extend(score(out, ref).detach().to("cpu", torch.float64).tolist())
            except Exception as exc:  # a metric failing on some input must not sink the others
                reason = f"failed on {batch_names[0]!r}: {type(exc).__name__}: {exc}"
                unavailable[name] = MetricUnavailable(name, reason)
                del scorers[name], values[name]

    rows = [
        {"name": n, **{m: (values[m][i] if m in values else None) for m in metrics}}
        for i, n in enumerate(image_names)
    ]
    aggregates = {
        m: (math.fsum(values[m]) / len(values[m]) if m in values and values[m] else None) for m in metrics
    }
    return EvaluationReport(proto, tuple(metrics), rows, aggregates, unavailable, split=split, paired=paired)


def evaluate_pairs(
    outputs: Images,
    references: Images,
    protocol: str | Protocol = "raw",
    metrics: Sequence[str] = PAIRED_DEFAULT,
    *,
    names: Sequence[str] | None = None,
    device: str | torch.device | None = None,
    batch_size: int = 8,
    split: str = "test",
) -> EvaluationReport:
    """Score enhanced ``outputs`` against ``references`` (same order) under ``protocol``.

    Images are an (N, 3, H, W) tensor or a sequence of (3, H, W) tensors (sizes may differ), uint8 or float
    in [0, 1]; outputs are clamped to [0, 1]. No-reference metrics (NIQE) score the outputs. A metric whose
    weights are missing, or that fails, is reported in ``unavailable`` with the reason.
    """
    return _run(outputs, references, protocol, metrics, names, device, batch_size, split)


def evaluate_unpaired(
    outputs: Images,
    protocol: str | Protocol = "raw",
    metrics: Sequence[str] = UNPAIRED_DEFAULT,
    *,
    names: Sequence[str] | None = None,
    device: str | torch.device | None = None,
    batch_size: int = 8,
    split: str = "test",
) -> EvaluationReport:
    """Score images without references (NIQE) under a protocol without brightness rescaling."""
    return _run(outputs, None, protocol, metrics, names, device, batch_size, split)
