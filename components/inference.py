"""The deployable enhancer: a baseline network plus the SKB it needs, running the baseline's test-time flow.

:class:`Enhancer` maps a (B, 3, H, W) batch in [0, 1] (any H, W) to an enhanced batch of the same size,
clamped to [0, 1]. The flow -- what the SKB is run on, and when -- belongs to the baseline's family
(:meth:`components.baselines.BaselineFamily.enhance`, following the released test code, docs/method.md
§6); the enhancer only supplies priors from its SKB. Plain baselines (``skf=False``) run without an SKB.

An enhancer is rebuilt from a small JSON-able :class:`EnhancerSpec` plus two state dicts
(:func:`build_enhancer`), which is what the model registry stores: no pickled Python objects.
:func:`save_enhancer` / :func:`load_enhancer_dir` write and read that package as files (safetensors).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from components.baselines import get_family
from components.checkpoints import load_strict
from components.errors import SKFError
from components.registry import create, resolved_spec
from components.skb import SKB_SETTINGS, Priors, SemanticKnowledgeBank, needs_labels

log = logging.getLogger(__name__)

SPEC_FORMAT = 1
SPEC_FILE = "enhancer_spec.json"
NET_FILE = "enhancer.safetensors"
SKB_FILE = "skb.safetensors"
#: The SKB settings an enhancer may fix (everything else comes from the SKB's registered builder).


class EnhancerSpecError(SKFError, ValueError):
    """An enhancer spec or its weights do not describe a buildable, consistent model."""


# --------------------------------------------------------------------------------------------------
# Spec
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class EnhancerSpec:
    """Everything needed to rebuild an :class:`Enhancer` besides its weights, as plain data.

    ``baseline``/``skb`` are resolved ``kind/name@version`` specs; ``baseline_kwargs`` the builder
    overrides (network sizes); ``skb_settings`` the SKB builder options that change its output
    (``bn_mode``, ``input_transform``, ``pad_multiple``, ``amp``); ``skb_fingerprint``,
    ``skb_weights`` and ``skb_pretrained`` record the exact SKB the weights were trained with, and are
    checked when the enhancer is rebuilt.
    """

    baseline: str
    skf: bool = True
    baseline_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    skb: str | None = None
    skb_settings: dict[str, Any] = dataclasses.field(default_factory=dict)
    skb_fingerprint: str | None = None
    skb_weights: str | None = None
    skb_pretrained: bool = False
    two_pass: bool = False
    format: int = SPEC_FORMAT

    def __post_init__(self) -> None:
        if self.format != SPEC_FORMAT:
            raise EnhancerSpecError(
                f"enhancer spec format {self.format} is not supported (this code reads format {SPEC_FORMAT})"
            )
        if self.skf and not self.skb:
            raise EnhancerSpecError(f"{self.baseline} with skf=True needs an SKB spec (skb=...)")
        if not self.skf and (self.skb or self.two_pass):
            raise EnhancerSpecError("a plain baseline (skf=False) has no SKB and no two-pass flow")
        unknown = sorted(set(self.skb_settings) - set(SKB_SETTINGS))
        if unknown:
            raise EnhancerSpecError(f"unknown skb_settings {unknown}; allowed: {list(SKB_SETTINGS)}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EnhancerSpec:
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - fields)
        if unknown:
            raise EnhancerSpecError(
                f"unknown enhancer spec fields {unknown}; expected a subset of {sorted(fields)}"
            )
        return cls(**dict(data))

    @classmethod
    def from_json(cls, text: str) -> EnhancerSpec:
        return cls.from_dict(json.loads(text))

    def describe(self) -> dict[str, str]:
        """Flat ``enhancer.*`` strings for MLflow tags and params."""
        return {
            "enhancer.baseline": self.baseline,
            "enhancer.skf": str(self.skf).lower(),
            "enhancer.baseline_kwargs": json.dumps(self.baseline_kwargs, sort_keys=True),
            "enhancer.two_pass": str(self.two_pass).lower(),
            "skb.spec": self.skb or "none",
            "skb.fingerprint": self.skb_fingerprint or "none",
            "skb.weights": self.skb_weights or "none",
            "skb.pretrained": str(self.skb_pretrained).lower() if self.skf else "n/a",
        }


def make_spec(
    baseline: str,
    net: nn.Module,
    skb: SemanticKnowledgeBank | None = None,
    *,
    baseline_kwargs: Mapping[str, Any] | None = None,
    two_pass: bool = False,
) -> EnhancerSpec:
    """The spec of a live network (built by ``create(baseline, skf=..., **baseline_kwargs)``) and SKB."""
    skf = bool(getattr(net, "skf", False))
    if skf and skb is None:
        raise EnhancerSpecError(f"{baseline} was built with SE blocks (skf=True) and needs its SKB")
    kwargs = {k: v for k, v in (baseline_kwargs or {}).items() if k != "skf"}
    if skb is None or not skf:
        return EnhancerSpec(resolved_spec(baseline), skf=False, baseline_kwargs=kwargs, two_pass=two_pass)
    return EnhancerSpec(
        baseline=resolved_spec(baseline),
        skf=True,
        baseline_kwargs=kwargs,
        skb=resolved_spec(skb.spec),
        skb_settings={k: getattr(skb, k) for k in SKB_SETTINGS},
        skb_fingerprint=skb.fingerprint,
        skb_weights=skb.weights_id,
        skb_pretrained=bool(skb.pretrained),
        two_pass=two_pass,
    )


# --------------------------------------------------------------------------------------------------
# The module
# --------------------------------------------------------------------------------------------------
class Enhancer(nn.Module):
    """Enhancer network + its SKB, running the baseline's test-time flow (see the module docstring)."""

    def __init__(self, net: nn.Module, skb: SemanticKnowledgeBank | None, spec: EnhancerSpec) -> None:
        super().__init__()
        family = get_family(spec.baseline)
        if not isinstance(net, family.network):
            raise EnhancerSpecError(
                f"{spec.baseline} builds a {family.network.__name__}, not a {type(net).__name__}"
            )
        if spec.skf != bool(getattr(net, "skf", False)):
            raise EnhancerSpecError(f"spec says skf={spec.skf} but the network was built with skf={net.skf}")
        if spec.skf and skb is None:
            raise EnhancerSpecError("an SKF enhancer needs its SKB")
        if spec.two_pass and not family.supports_two_pass:
            raise EnhancerSpecError(f"{spec.baseline} has no two-pass test flow; use two_pass=False")
        self.family = family
        self.net = net
        self.skb = skb if spec.skf else None
        self.spec = spec
        if self.skb is not None:
            family.check_skb(net, self.skb)

    @property
    def pretrained_skb(self) -> bool:
        """Whether the SKB holds real segmenter weights (never promote a model whose SKB does not)."""
        return self.skb is not None and bool(self.skb.pretrained)

    def state_dicts(self) -> tuple[dict[str, Tensor], dict[str, Tensor] | None]:
        """(network, SKB segmenter) state dicts, as :func:`build_enhancer` takes them."""
        net = dict(self.net.state_dict())
        skb = dict(self.skb.model.state_dict()) if self.skb is not None else None
        return net, skb

    @property
    def needs_labels(self) -> bool:
        """Whether the SKB makes its priors from label maps (the oracle): ``forward`` then needs ``labels``."""
        return self.skb is not None and needs_labels(self.skb)

    def forward(self, x: Tensor, labels: Tensor | None = None) -> Tensor:
        """``x``: (B, 3, H, W) float in [0, 1], any H, W. Returns the enhanced batch, clamped to [0, 1].

        ``labels`` (B, H, W) class ids feed an SKB made from label maps (benchmarks only); others ignore it.
        """
        if x.ndim != 4 or x.shape[1] != 3 or not x.is_floating_point():
            raise ValueError(
                f"Enhancer expects a float (B, 3, H, W) batch in [0, 1]; got {x.dtype} {tuple(x.shape)}"
            )
        if self.needs_labels and labels is None:
            raise EnhancerSpecError(
                f"the SKB {self.spec.skb} makes its priors from ground-truth label maps: pass labels=(B, H, W); "
                "such an enhancer exists for benchmarks and cannot enhance unlabelled images"
            )
        priors_for = None
        if self.skb is not None:
            priors_for = functools.partial(self._priors, labels=labels if self.needs_labels else None)
        out = self.family.enhance(self.net, x, priors_for, two_pass=self.spec.two_pass)
        return out.clamp(0.0, 1.0)

    def _priors(self, stage: str, image: Tensor, labels: Tensor | None = None) -> Priors:
        """Priors of ``image`` from the enhancer's SKB, whatever the stage (the released test flows)."""
        assert self.skb is not None
        grad = torch.is_grad_enabled() and image.requires_grad
        if labels is not None:
            return self.skb(image, labels=labels.to(image.device), grad=grad)
        return self.skb(image, grad=grad)

    def extra_repr(self) -> str:
        return f"baseline={self.spec.baseline}, skf={self.spec.skf}, skb={self.spec.skb}, two_pass={self.spec.two_pass}"


# --------------------------------------------------------------------------------------------------
# Building from spec + weights
# --------------------------------------------------------------------------------------------------
class _DropRandomInitWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "has NO checkpoint" not in record.getMessage()


@contextlib.contextmanager
def _quiet_random_init() -> Iterator[None]:
    """The SKB is built empty and then loaded, so its 'random weights' warning would be false."""
    logger, flt = logging.getLogger("components.skb"), _DropRandomInitWarning()
    logger.addFilter(flt)
    try:
        yield
    finally:
        logger.removeFilter(flt)


def build_enhancer(
    spec: EnhancerSpec,
    net_state: Mapping[str, Tensor],
    skb_state: Mapping[str, Tensor] | None = None,
    *,
    device: str | torch.device = "cpu",
) -> Enhancer:
    """Rebuild an enhancer in eval mode from its spec and weights, strictly.

    The SKB is built from its registered spec and settings, loaded with ``skb_state`` and then must
    reproduce ``spec.skb_fingerprint`` -- otherwise the network would run on other priors than it was
    trained with, and the error says so.
    """
    net = create(spec.baseline, skf=spec.skf, **spec.baseline_kwargs)
    load_strict(net, net_state, source=f"{spec.baseline} weights")
    skb = None
    if spec.skf:
        if skb_state is None:
            raise EnhancerSpecError(f"{spec.baseline} with skf=True needs the SKB weights ({spec.skb})")
        quiet = _quiet_random_init() if spec.skb_pretrained else contextlib.nullcontext()
        with quiet:
            skb = create(spec.skb, device="cpu", **spec.skb_settings)
        load_strict(skb.model, skb_state, source=f"{spec.skb} weights")
        if spec.skb_weights:
            skb.weights_id = spec.skb_weights
        skb.pretrained = spec.skb_pretrained
        if spec.skb_fingerprint and skb.fingerprint != spec.skb_fingerprint:
            raise EnhancerSpecError(
                f"SKB {spec.skb} rebuilt with fingerprint {skb.fingerprint}, but the enhancer was trained with "
                f"{spec.skb_fingerprint}: the SKB component or its settings changed since the model was saved"
            )
        if not spec.skb_pretrained:
            log.warning(
                "enhancer %s uses a randomly initialised SKB (%s): fine for tests and the demo only",
                spec.baseline,
                spec.skb,
            )
    enhancer = Enhancer(net, skb, spec).to(device)
    return enhancer.eval()


def save_enhancer(enhancer: Enhancer, directory: str | os.PathLike[str]) -> dict[str, Path]:
    """Write spec JSON + safetensors weights into ``directory``; returns {artifact name: path}."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    net_state, skb_state = enhancer.state_dicts()
    paths = {"spec": out / SPEC_FILE, "enhancer": out / NET_FILE}
    paths["spec"].write_text(enhancer.spec.to_json())
    save_file(_contiguous_cpu(net_state), paths["enhancer"], metadata={"baseline": enhancer.spec.baseline})
    if skb_state is not None:
        paths["skb"] = out / SKB_FILE
        save_file(_contiguous_cpu(skb_state), paths["skb"], metadata={"skb": enhancer.spec.skb or ""})
    return paths


def load_enhancer_files(
    spec_path: str | os.PathLike[str],
    net_path: str | os.PathLike[str],
    skb_path: str | os.PathLike[str] | None = None,
    *,
    device: str | torch.device = "cpu",
) -> Enhancer:
    """Inverse of :func:`save_enhancer` given the individual files (safetensors or weights-only ``.pt``)."""
    spec = EnhancerSpec.from_json(Path(spec_path).read_text())
    net_state = _read_state(net_path)
    skb_state = _read_state(skb_path) if skb_path is not None else None
    return build_enhancer(spec, net_state, skb_state, device=device)


def load_enhancer_dir(directory: str | os.PathLike[str], *, device: str | torch.device = "cpu") -> Enhancer:
    """Inverse of :func:`save_enhancer`."""
    d = Path(directory)
    skb = d / SKB_FILE
    return load_enhancer_files(d / SPEC_FILE, d / NET_FILE, skb if skb.is_file() else None, device=device)


def _contiguous_cpu(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """CPU copies safetensors can write: a tensor listed under two names (HWMNet's shared PReLU, as in
    the released state dict) is written once per name, each its own copy."""
    out: dict[str, Tensor] = {}
    seen: set[int] = set()
    for key, value in state.items():
        tensor = value.detach().to("cpu").contiguous()
        ptr = tensor.untyped_storage().data_ptr() if tensor.numel() else None
        if ptr is not None and ptr in seen:
            tensor = tensor.clone()
        elif ptr is not None:
            seen.add(ptr)
        out[key] = tensor
    return out


def _read_state(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    p = Path(path)
    if p.suffix == ".safetensors":
        return load_file(str(p))
    state = torch.load(p, map_location="cpu", weights_only=True)
    if not isinstance(state, Mapping):
        raise EnhancerSpecError(f"{p} holds a {type(state).__name__}, expected a state dict")
    return dict(state)
