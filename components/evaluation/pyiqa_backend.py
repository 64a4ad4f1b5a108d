"""The one module that touches pyiqa.

pyiqa is licensed for non-commercial use only. Keeping every call behind this adapter (built lazily, imported
only when a pyiqa-backed metric is requested) lets the backend be replaced without touching callers.

Weights never come from the network, and no weight file is ever unpickled: pyiqa and torchvision read
``.pth`` files with ``torch.load(weights_only=False)``, which runs any code a file carries. So:

* every file a metric needs is located and checked against its pinned full sha256 by
  :mod:`components.weights` (cache, then ``SKF_WEIGHTS_URI``); a missing or refused file raises
  :class:`MetricUnavailableError` with the reason, before pyiqa would try a download;
* LPIPS is built with no pyiqa/torchvision loading at all: the AlexNet trunk is constructed empty and
  given the verified backbone, and the verified linear layers are loaded afterwards, both decoded by us
  with ``weights_only=True`` from the very bytes that were hashed;
* any other metric may receive a weight file only if pyiqa reads it without pickle (NIQE's ``.mat``,
  read by scipy); a pyiqa metric needing a ``.pth`` is refused rather than handed to pyiqa.
"""

from __future__ import annotations

import contextlib
import io
import logging
import threading
import types
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from components import weights as weights_mod
from components.evaluation.metrics import MetricSpec, MetricUnavailableError

log = logging.getLogger(__name__)

Scorer = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]

# pyiqa's LPIPS loads its linear layers with strict=False: check the file covers them, or a wrong file
# would silently leave random layers in place.
_LPIPS_ALEX_CHANNELS = (64, 192, 384, 256, 256)
_LPIPS_LINS, _LPIPS_ALEXNET = "LPIPS_v0.1_alex-df73285e.pth", "alexnet-owt-7be5be79.pth"
# Metrics whose weight files pyiqa reads without unpickling (scipy.io.loadmat for NIQE).
_PICKLE_FREE_FILES = {"niqe": (".mat",)}

_built: dict[tuple, Scorer] = {}
_lpips_build_lock = threading.Lock()  # the trunk hand-over below swaps a module attribute of pyiqa


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


def _load_verified_state(metric: str, name: str) -> dict[str, torch.Tensor]:
    """The state dict in weight file ``name``: bytes verified against the pin, decoded weights-only."""
    try:
        data = weights_mod.read_verified(name)
    except Exception as exc:
        raise MetricUnavailableError(metric, f"weights file {name} unusable: {exc}") from exc
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise MetricUnavailableError(
            metric, f"{name} is not a readable weights-only state dict: {exc}"
        ) from exc
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise MetricUnavailableError(metric, f"{name} does not hold a flat state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}  # as pyiqa's clean_state_dict


def _check_lpips_lins(state: Mapping[str, torch.Tensor], name: str) -> None:
    for i, channels in enumerate(_LPIPS_ALEX_CHANNELS):
        key = f"lin{i}.model.1.weight"
        if key not in state or tuple(state[key].shape) != (1, channels, 1, 1):
            got = tuple(state[key].shape) if key in state else "missing"
            raise MetricUnavailableError(
                "lpips",
                f"{name} lacks {key} of shape (1, {channels}, 1, 1) (got {got}); not an LPIPS-alex file",
            )


def _verified_alexnet_models(alex_state: Mapping[str, torch.Tensor]) -> types.SimpleNamespace:
    """A stand-in for ``torchvision.models`` whose ``alexnet()`` returns the verified backbone.

    pyiqa's LPIPS trunk calls ``models.alexnet(weights='IMAGENET1K_V1')`` whatever ``pnet_rand`` says, which
    makes torchvision unpickle the cached file; this builds the same network empty and loads our state.
    """
    from torchvision.models import alexnet

    def verified_alexnet(weights: Any = None, **kwargs: Any) -> torch.nn.Module:
        if str(weights) not in ("IMAGENET1K_V1", "AlexNet_Weights.IMAGENET1K_V1"):
            raise RuntimeError(f"pyiqa asked for AlexNet weights {weights!r}; only IMAGENET1K_V1 is verified")
        net = alexnet(weights=None, **kwargs)
        net.load_state_dict(alex_state, strict=True)  # what torchvision does with the downloaded file
        return net

    return types.SimpleNamespace(alexnet=verified_alexnet)


@contextlib.contextmanager
def _trunk_from(models: types.SimpleNamespace) -> Iterator[None]:
    """Point pyiqa's LPIPS module at ``models`` while it constructs its trunk (serialised by a lock)."""
    from pyiqa.archs import lpips_arch

    with _lpips_build_lock:
        original = lpips_arch.models
        lpips_arch.models = models
        try:
            yield
        finally:
            lpips_arch.models = original


def _create_lpips(spec: MetricSpec, device: torch.device) -> Any:
    """pyiqa's LPIPS metric with verified trunk and linear layers, nothing loaded by pyiqa/torchvision."""
    options = dict(spec.backend_options)
    if options.get("net", "alex") != "alex":
        raise MetricUnavailableError(
            spec.name, f"only the AlexNet LPIPS is supported, not {options['net']!r}"
        )
    lins = _load_verified_state(spec.name, _LPIPS_LINS)
    _check_lpips_lins(lins, _LPIPS_LINS)
    alex = _load_verified_state(spec.name, _LPIPS_ALEXNET)
    options.update(pretrained=False, pretrained_model_path=None, pnet_rand=False)
    import pyiqa

    with _trunk_from(_verified_alexnet_models(alex)):
        metric = pyiqa.create_metric(spec.backend_name, device=device, **options)
    metric.net.load_state_dict(lins, strict=False)  # pyiqa's own semantics for this file (lins covered)
    return metric.to(device)


def _create_other(spec: MetricSpec, device: torch.device, paths: list[Path]) -> Any:
    """A pyiqa metric that needs no weights, or only files pyiqa reads without pickle."""
    allowed = _PICKLE_FREE_FILES.get(spec.name, ())
    unsafe = [p for p in paths if not (allowed and p.name.endswith(allowed))]
    if unsafe:
        raise MetricUnavailableError(
            spec.name, f"pyiqa would unpickle {unsafe[0].name}; refused (no safe loader for this metric)"
        )
    options = dict(spec.backend_options)
    if paths:
        options["pretrained_model_path"] = str(paths[0])
    import pyiqa

    return pyiqa.create_metric(spec.backend_name, device=device, **options)


def _create(spec: MetricSpec, device: torch.device, paths: list[Path]) -> Any:
    try:
        chatter = io.StringIO()
        with contextlib.redirect_stdout(chatter):  # pyiqa prints "Loading pretrained model ..."
            if spec.name == "lpips":
                metric = _create_lpips(spec, device)
            else:
                metric = _create_other(spec, device, paths)
        if chatter.getvalue():
            log.debug("pyiqa: %s", chatter.getvalue().strip())
    except MetricUnavailableError:
        raise
    except Exception as exc:
        raise MetricUnavailableError(
            spec.name, f"pyiqa could not build {spec.backend_name!r}: {type(exc).__name__}: {exc}"
        ) from exc
    return metric


def _file_key(paths: list[Path]) -> tuple:
    return tuple((str(p), p.stat().st_mtime_ns, p.stat().st_size) for p in paths)


def build(spec: MetricSpec, device: torch.device) -> Scorer:
    """A scorer ``(output, reference) -> (N,)`` for ``spec`` on ``device``; cached per weight files."""
    paths = _locate(spec)
    key = (spec.name, str(device), _file_key(paths))
    if key in _built:
        return _built[key]
    metric = _create(spec, device, paths)

    def score(output: torch.Tensor, reference: torch.Tensor | None = None) -> torch.Tensor:
        with torch.no_grad():
            if spec.needs_reference:
                value = metric(output.float(), reference.float())
            else:
                value = metric(output.float())
        return value.reshape(-1)

    _built[key] = score
    return score
