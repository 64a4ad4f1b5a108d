"""SKB -- the Semantic Knowledge Bank: a frozen HRNet segmenter that turns images into semantic priors.

``create("skb/hrnet-w48-pascal@1", checkpoint=...)`` returns a :class:`SemanticKnowledgeBank`; calling
it on a (B, 3, H, W) batch in [0, 1] gives :class:`Priors` -- F0, F1, F2 and the head logits at 1/4 --
for the *unpadded* image. Full-resolution logits, probabilities and labels are derived on demand.

Behaviour that differs from the official code on purpose (docs/method.md §2.2, §10): the input is
reflect-padded to a multiple of 32 and outputs are cropped back; BN is in eval mode unless
``bn_mode="train"`` (LLFlow-SKF's released behaviour); weights are frozen; loading is strict. The
:attr:`~SemanticKnowledgeBank.fingerprint` names everything that changes the priors, so cached priors
are addressed by (image sha256, fingerprint).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from components.checkpoints import load_checkpoint, load_strict
from components.registry import register
from models.hrnet import (
    HRNet,
    HRNetConfig,
    hrnet_w18_small_config,
    hrnet_w48_config,
    hrnet_w48_lite_config,
    labels_of,
    upsample_logits,
)

log = logging.getLogger(__name__)

BnMode = Literal["eval", "train"]
InputTransform = Literal["linear", "log", "imagenet"]
BN_MODES: tuple[str, ...] = ("eval", "train")
#: Builder options that change what the SKB outputs (recipes may set them; the fingerprint records them).
SKB_SETTINGS: tuple[str, ...] = ("bn_mode", "input_transform", "pad_multiple", "amp")
INPUT_TRANSFORMS: tuple[str, ...] = ("linear", "log", "imagenet")
CACHE_DTYPE = torch.float16
FEATURE_STRIDES: tuple[int, ...] = (4, 8, 16)
LOGIT_STRIDE = 4
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RANDOM_INIT_SCHEME = "kaiming"

_warned_random: set[str] = set()


def needs_labels(skb: Any) -> bool:
    """Whether ``skb`` makes its priors from label maps (``skb(x, labels=...)``), like the oracle SKB."""
    return bool(getattr(skb, "needs_labels", False))


# --------------------------------------------------------------------------------------------------
# Priors container
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Priors:
    """Semantic priors of a batch: F0 (1/4), F1 (1/8), F2 (1/16) and the head logits at 1/4.

    Sizes are ``ceil(H/s) x ceil(W/s)`` of the unpadded image. ``size`` arguments of the derived maps
    default to ``4 * logits grid``; pass the image's (H, W) to crop to it exactly.
    """

    f0: Tensor
    f1: Tensor
    f2: Tensor
    logits: Tensor
    #: full-resolution logits by (size, layout): a DRBN-SKF step needs them for SE, SCH's labels and SA's
    #: probabilities, and upsampling 59 channels to full resolution is not free, so it is done once
    _full: dict[tuple[tuple[int, int] | None, bool], Tensor] = dataclasses.field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    @property
    def features(self) -> tuple[Tensor, Tensor, Tensor]:
        return self.f0, self.f1, self.f2

    def __len__(self) -> int:
        return self.logits.shape[0]

    def _map(self, fn: Any) -> Priors:
        return Priors(*(fn(t) for t in (self.f0, self.f1, self.f2, self.logits)))

    def full_logits(self, size: tuple[int, int] | None = None, *, channels_last: bool = False) -> Tensor:
        """Pre-softmax logits at full resolution (bilinear x4, align_corners=True; what DRBN's SE uses),
        computed once per size and layout for this batch's priors (the maps below derive from them).

        ``channels_last=True`` upsamples a channels-last copy of the 1/4 logits: the result is channels-last
        (what the SE blocks work in, so they need no 16x larger copy), and the upsampling itself is faster in
        that layout on CPU. It equals the NCHW result to float rounding (~1e-6).
        """
        key = (None if size is None else (int(size[0]), int(size[1])), channels_last)
        if key not in self._full:
            logits = self.logits.float()
            if channels_last:
                logits = logits.contiguous(memory_format=torch.channels_last)
            self._full[key] = upsample_logits(logits, size)
        return self._full[key]

    def probabilities(self, size: tuple[int, int] | None = None) -> Tensor:
        """Class probabilities P (B, C, H, W), float32 (SA masks); ``models.hrnet.class_probabilities``."""
        return torch.softmax(
            self.full_logits(size), dim=1
        )  # NCHW: softmax over dim 1 is faster there than on CL

    def labels(self, size: tuple[int, int] | None = None) -> Tensor:
        """Hard argmax label map (B, H, W), int64 (SCH); ``models.hrnet.label_map``, taken on the channels-last
        logits (an argmax over channels is faster on them)."""
        return labels_of(self.full_logits(size, channels_last=True))

    def to(self, *args: Any, **kwargs: Any) -> Priors:
        """``Tensor.to`` applied to every map."""
        return self._map(lambda t: t.to(*args, **kwargs))

    def half(self) -> Priors:
        """The cache representation (float16)."""
        return self.to(CACHE_DTYPE)

    def float(self) -> Priors:
        return self.to(torch.float32)

    def detach(self) -> Priors:
        return self._map(Tensor.detach)

    def unbind(self) -> Iterator[Priors]:
        """Per-image priors (batch dimension kept, size 1), e.g. to cache image by image."""
        for i in range(len(self)):
            yield self._map(lambda t, i=i: t[i : i + 1])


# --------------------------------------------------------------------------------------------------
# Input handling
# --------------------------------------------------------------------------------------------------
def apply_input_transform(x: Tensor, transform: InputTransform) -> Tensor:
    """Map RGB in [0, 1] to what the segmenter is fed (see docs/method.md §2.2)."""
    if transform == "linear":
        return x
    if transform == "log":  # LLFlow-SKF feeds the log-domain low-light image
        return torch.log(torch.clamp(x + 1e-3, min=1e-3))
    if transform == "imagenet":  # what HRNet was trained on
        mean = x.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = x.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
        return (x - mean) / std
    raise ValueError(f"unknown input_transform {transform!r}; expected one of {INPUT_TRANSFORMS}")


def reflect_pad_to_multiple(x: Tensor, multiple: int) -> Tensor:
    """Pad bottom/right by reflection so H and W become multiples of ``multiple``.

    Reflection cannot pad more than ``size - 1`` at once, so tiny inputs are padded in rounds
    (replicating when a side is a single pixel).
    """
    h, w = x.shape[-2:]
    target_h, target_w = -(-h // multiple) * multiple, -(-w // multiple) * multiple
    while x.shape[-2] < target_h or x.shape[-1] < target_w:
        cur_h, cur_w = x.shape[-2:]
        if min(cur_h, cur_w) < 2:
            return F.pad(x, (0, target_w - cur_w, 0, target_h - cur_h), mode="replicate")
        pad_h = min(target_h - cur_h, cur_h - 1)
        pad_w = min(target_w - cur_w, cur_w - 1)
        x = F.pad(x, (0, pad_w, 0, pad_h), mode="reflect")
    return x


def _crop(t: Tensor, height: int, width: int, stride: int) -> Tensor:
    return t[..., : -(-height // stride), : -(-width // stride)]


# --------------------------------------------------------------------------------------------------
# The component
# --------------------------------------------------------------------------------------------------
class SemanticKnowledgeBank(nn.Module):
    """A frozen HRNet segmenter producing :class:`Priors`; see the module docstring."""

    def __init__(
        self,
        model: HRNet,
        *,
        spec: str,
        weights_id: str,
        pretrained: bool,
        checkpoint: str | None = None,
        bn_mode: BnMode = "eval",
        input_transform: InputTransform = "linear",
        pad_multiple: int = 32,
        amp: bool = True,
        device: str | torch.device | None = None,
    ):
        super().__init__()
        if bn_mode not in BN_MODES:
            raise ValueError(f"unknown bn_mode {bn_mode!r}; expected one of {BN_MODES}")
        if input_transform not in INPUT_TRANSFORMS:
            raise ValueError(
                f"unknown input_transform {input_transform!r}; expected one of {INPUT_TRANSFORMS}"
            )
        if int(pad_multiple) < 1:
            raise ValueError(f"pad_multiple must be >= 1 (1 disables padding), got {pad_multiple}")
        self.spec = spec
        self.weights_id = weights_id
        self.pretrained = pretrained
        self.checkpoint = checkpoint
        self.bn_mode: BnMode = bn_mode
        self.input_transform: InputTransform = input_transform
        self.pad_multiple = int(pad_multiple)
        self.amp = amp
        self.model = model
        self.model.requires_grad_(False)
        device = torch.device(device) if device is not None else _default_device()
        self.to(device=device, memory_format=torch.channels_last)
        self.train(False)

    # -- metadata -------------------------------------------------------------------------------
    @property
    def config(self) -> HRNetConfig:
        return self.model.config

    @property
    def feature_channels(self) -> tuple[int, int, int]:
        """Channels of F0, F1, F2 (what the SE blocks consume)."""
        c = self.config.feature_channels
        return c[0], c[1], c[2]

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def settings(self) -> dict[str, Any]:
        """Everything that determines the priors, as plain data."""
        return {
            "component": self.spec,
            "weights": self.weights_id,
            "arch": self.config.to_dict(),
            "bn_mode": self.bn_mode,
            "input_transform": self.input_transform,
            "pad": {"mode": "reflect", "multiple": self.pad_multiple, "crop": "ceil"},
            "compute": "bf16-autocast-on-cuda" if self.amp else "float32",
            "cache_dtype": str(CACHE_DTYPE).removeprefix("torch."),
        }

    @property
    def fingerprint(self) -> str:
        """sha256 over :meth:`settings` -- the prior-cache key component of this SKB."""
        blob = json.dumps(self.settings(), sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()

    def describe(self) -> dict[str, Any]:
        """Flat parameters for MLflow / the catalog."""
        return {
            "skb.spec": self.spec,
            "skb.pretrained": self.pretrained,
            "skb.weights": self.weights_id,
            "skb.checkpoint": self.checkpoint or "",
            "skb.arch": self.config.name,
            "skb.num_classes": self.num_classes,
            "skb.bn_mode": self.bn_mode,
            "skb.input_transform": self.input_transform,
            "skb.pad_multiple": self.pad_multiple,
            "skb.amp": self.amp,
            "skb.fingerprint": self.fingerprint,
        }

    def extra_repr(self) -> str:
        return (
            f"spec={self.spec}, pretrained={self.pretrained}, bn_mode={self.bn_mode}, "
            f"input_transform={self.input_transform}, pad_multiple={self.pad_multiple}"
        )

    # -- modes ----------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> SemanticKnowledgeBank:
        """The BN mode is a setting of the SKB, not of the surrounding training loop.

        A parent ``.train()`` / ``.eval()`` therefore does not flip it: BN stays in eval mode, or in
        train mode (batch statistics, as LLFlow-SKF) when ``bn_mode="train"``.
        """
        self.training = mode
        self.model.train(self.bn_mode == "train")
        return self

    # -- forward --------------------------------------------------------------------------------
    def forward(self, x: Tensor, *, grad: bool = False) -> Priors:
        """Priors of ``x`` (B, 3, H, W), RGB in [0, 1].

        ``grad=False`` runs under ``torch.inference_mode`` and returns ordinary (detached) tensors;
        ``grad=True`` lets gradients flow back to ``x`` (DRBN-SKF's online mode) -- the weights stay
        frozen either way.
        """
        if x.ndim != 4 or x.shape[1] != self.config.in_channels or not x.is_floating_point():
            raise ValueError(
                f"SKB expects a float tensor (B, {self.config.in_channels}, H, W); got {x.dtype} {tuple(x.shape)}"
            )
        height, width = x.shape[-2:]
        device = self.device
        with torch.enable_grad() if grad else torch.inference_mode():
            inp = apply_input_transform(x.to(device=device, dtype=torch.float32), self.input_transform)
            if self.pad_multiple > 1:
                inp = reflect_pad_to_multiple(inp, self.pad_multiple)
            inp = inp.contiguous(memory_format=torch.channels_last)
            with self._autocast(device):
                out = self.model(inp)
            maps = [_crop(f, height, width, s) for f, s in zip(out.features, FEATURE_STRIDES, strict=False)]
            maps.append(_crop(out.logits, height, width, LOGIT_STRIDE))
            if grad:
                maps = [m.float().contiguous() for m in maps]
        if not grad:  # copy out of inference mode so callers may feed them to autograd
            maps = [m.to(torch.float32, memory_format=torch.contiguous_format, copy=True) for m in maps]
        return Priors(*maps)

    def _autocast(self, device: torch.device) -> contextlib.AbstractContextManager[Any]:
        if self.amp and device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()


def _pinned_checkpoint_sha256(checkpoint: str | os.PathLike[str]) -> str | None:
    """The pin for a checkpoint named like a known weight file (operator's ``SKF_PIN_SHA256``), else None.

    Loading is weights-only either way (:func:`components.checkpoints.load_checkpoint`), so an unpinned
    file cannot run code; a pin makes a swapped file fail loudly instead of silently changing the priors.
    The digest actually loaded is recorded in ``weights_id`` and therefore in the fingerprint.
    """
    from urllib.parse import urlparse

    from components import weights

    text = os.fspath(checkpoint)
    name = os.path.basename(urlparse(text).path if "://" in text else text)
    known = {spec.name for spec in weights.KNOWN_WEIGHTS}
    return weights.pinned_sha256(name) if name in known else None


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# --------------------------------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------------------------------
def build_skb(
    spec: str,
    config: HRNetConfig,
    *,
    checkpoint: str | os.PathLike[str] | None = None,
    expected_sha256: str | None = None,
    bn_mode: BnMode = "eval",
    input_transform: InputTransform = "linear",
    pad_multiple: int = 32,
    seed: int = 0,
    device: str | torch.device | None = None,
    amp: bool = True,
    cache_dir: str | os.PathLike[str] | None = None,
) -> SemanticKnowledgeBank:
    """An SKB for ``config``: strictly loaded from ``checkpoint``, or seeded random weights without one."""
    model = HRNet(config)
    if checkpoint is not None:
        expected_sha256 = expected_sha256 or _pinned_checkpoint_sha256(checkpoint)
        loaded = load_checkpoint(checkpoint, expected_sha256=expected_sha256, cache_dir=cache_dir)
        load_strict(model, loaded.state_dict, source=loaded.source)
        weights_id, pretrained = f"sha256:{loaded.sha256}", True
        log.info("SKB %s loaded %s (sha256 %s)", spec, loaded.source, loaded.sha256)
    else:
        if expected_sha256 is not None:
            raise ValueError("expected_sha256 was given without a checkpoint")
        model.init_weights(RANDOM_INIT_SCHEME, generator=torch.Generator().manual_seed(int(seed)))
        arch = hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True).encode()).hexdigest()[:16]
        weights_id, pretrained = (
            f"random-init:seed={int(seed)}:init={RANDOM_INIT_SCHEME}:config={arch}",
            False,
        )
        if spec not in _warned_random:
            _warned_random.add(spec)
            log.warning(
                "SKB %s has NO checkpoint: using randomly initialised HRNet weights (seed=%d). Its priors "
                "carry no semantics -- fine for smoke tests and the demo, never for real results. Pass "
                "checkpoint=<path|s3://|https://> to hrnet_w48_pascal_context_cls59_480x480.pth.",
                spec,
                int(seed),
            )
    return SemanticKnowledgeBank(
        model,
        spec=spec,
        weights_id=weights_id,
        pretrained=pretrained,
        checkpoint=os.fspath(checkpoint) if checkpoint is not None else None,
        bn_mode=bn_mode,
        input_transform=input_transform,
        pad_multiple=pad_multiple,
        amp=amp,
        device=device,
    )


# Registered SKBs: (spec, HRNet preset, description). Each builder takes build_skb's keyword arguments
# (checkpoint, expected_sha256, bn_mode, input_transform, pad_multiple, seed, device, amp, cache_dir).
_SKB_PRESETS: tuple[tuple[str, Callable[[int], HRNetConfig], str], ...] = (
    (
        "skb/hrnet-w48-pascal@1",
        hrnet_w48_config,
        "Frozen HRNetV2-W48 PASCAL-Context (59 classes) segmenter; official checkpoint "
        "hrnet_w48_pascal_context_cls59_480x480.pth",
    ),
    (
        "skb/hrnet-w18-small-test@1",
        hrnet_w18_small_config,
        "Small random-or-loaded HRNet-W18 SKB (widths 18/36/72/144) for fast tests",
    ),
    (
        "skb/hrnet-w48-lite@1",
        hrnet_w48_lite_config,
        "HRNet with W48 widths, 1 module/stage: SE-compatible priors for tests and the CPU demo",
    ),
)


def _preset_builder(spec: str, preset: Callable[[int], HRNetConfig]) -> Callable[..., SemanticKnowledgeBank]:
    def build(**kwargs: Any) -> SemanticKnowledgeBank:
        return build_skb(spec, preset(59), **kwargs)

    build.__qualname__ = build.__name__ = f"build_{spec.split('/')[1].split('@')[0].replace('-', '_')}"
    return build


for _spec, _preset, _description in _SKB_PRESETS:
    register(_spec, description=_description)(_preset_builder(_spec, _preset))
