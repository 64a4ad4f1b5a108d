"""The one module that touches pyiqa.

pyiqa is licensed for non-commercial use only. Keeping every call behind this adapter (built lazily, imported
only when a pyiqa-backed metric is requested) lets the backend be replaced without touching callers.

Weights never come from the network: each file a metric needs is located through
:func:`components.weights.ensure_local` (the torch hub cache, then ``SKF_WEIGHTS_URI``) and handed to pyiqa
as ``pretrained_model_path``; the torchvision AlexNet backbone of LPIPS is read by torchvision from
``$TORCH_HOME/hub/checkpoints``, where the same function puts it. A missing or unusable file raises
:class:`MetricUnavailableError` with the reason, before pyiqa would try a download.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Callable
from pathlib import Path

import torch

from components import weights as weights_mod
from components.evaluation.metrics import MetricSpec, MetricUnavailableError

log = logging.getLogger(__name__)

Scorer = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]

# pyiqa's LPIPS loads its linear layers with strict=False: check the file covers them, or a wrong file
# would silently leave random layers in place.
_LPIPS_ALEX_CHANNELS = (64, 192, 384, 256, 256)

_built: dict[tuple, Scorer] = {}


def _locate(spec: MetricSpec) -> list[Path]:
    paths = []
    for name in spec.weights:
        try:
            path, looked = weights_mod.ensure_local(name)
        except Exception as exc:  # integrity or storage failure: report, do not crash the evaluation
            raise MetricUnavailableError(spec.name, f"weights file {name} unusable: {exc}") from exc
        if path is None:
            raise MetricUnavailableError(
                spec.name,
                f"weights file {name} not found (looked in {', '.join(looked)}); put it in SKF_WEIGHTS_URI "
                "and run `skf weights sync`",
            )
        paths.append(path)
    return paths


def _check_lpips_file(path: Path) -> None:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise MetricUnavailableError("lpips", f"{path} is not a readable state dict: {exc}") from exc
    state = {k.removeprefix("module."): v for k, v in state.items()}
    for i, channels in enumerate(_LPIPS_ALEX_CHANNELS):
        key = f"lin{i}.model.1.weight"
        if key not in state or tuple(state[key].shape) != (1, channels, 1, 1):
            got = tuple(state[key].shape) if key in state else "missing"
            raise MetricUnavailableError(
                "lpips",
                f"{path} lacks {key} of shape (1, {channels}, 1, 1) (got {got}); not an LPIPS-alex file",
            )


def _file_key(paths: list[Path]) -> tuple:
    return tuple((str(p), p.stat().st_mtime_ns, p.stat().st_size) for p in paths)


def build(spec: MetricSpec, device: torch.device) -> Scorer:
    """A scorer ``(output, reference) -> (N,)`` for ``spec`` on ``device``; cached per weight files."""
    paths = _locate(spec)
    key = (spec.name, str(device), _file_key(paths))
    if key in _built:
        return _built[key]
    if spec.name == "lpips":
        _check_lpips_file(paths[0])
    options = dict(spec.backend_options)
    if paths:
        options["pretrained_model_path"] = str(paths[0])
    try:
        import pyiqa

        chatter = io.StringIO()
        with contextlib.redirect_stdout(chatter):  # pyiqa prints "Loading pretrained model ..."
            metric = pyiqa.create_metric(spec.backend_name, device=device, **options)
        if chatter.getvalue():
            log.debug("pyiqa: %s", chatter.getvalue().strip())
    except Exception as exc:
        raise MetricUnavailableError(
            spec.name, f"pyiqa could not build {spec.backend_name!r}: {type(exc).__name__}: {exc}"
        ) from exc

    def score(output: torch.Tensor, reference: torch.Tensor | None = None) -> torch.Tensor:
        with torch.no_grad():
            if spec.needs_reference:
                value = metric(output.float(), reference.float())
            else:
                value = metric(output.float())
        return value.reshape(-1)

    _built[key] = score
    return score
