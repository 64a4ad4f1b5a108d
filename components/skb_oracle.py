"""Oracle SKB: priors made from ground-truth label maps, shaped exactly like the W48 SKB's.

Why: on the labelled scene benchmark (:mod:`components.data.scenes`) it bounds what perfect semantics can
give an SKF enhancer, independently of how good a segmenter is. It is a drop-in for
``skb/hrnet-w48-lite@1`` wherever priors are precomputed: same maps, channels, grids and dtypes, and
feature magnitudes in the range a W48 SKB produces, so SE blocks built for W48 take them unchanged.

How the priors are made from a label map ``L`` (B×H×W int64, ids ``0..K-1``, K = ``label_classes``):

* one-hot ``L`` to B×K×H×W and average-pool it to each grid (1/4, 1/8, 1/16, ceil: partial border cells
  average their valid pixels), giving per-cell class fractions ``p``;
* features F0/F1/F2 = ``p`` times a fixed embedding per scale (K×48, K×96, K×192): ``FEATURE_RMS`` times
  the absolute value of a seeded standard normal, i.e. non-negative like HRNet's post-ReLU features with
  the root-mean-square a random-init W48-lite SKB gives on natural images (F0 2.5, F1 2.1, F2 2.3 measured
  on 128×192 to 256×256 photos and noise; dark images give about 6× less);
* logits at 1/4 with 59 channels: ``LOGIT_MARGIN * (2p - 1)`` in the first K channels (+10 for a pure
  cell of that class, -10 for none of it), ``-2 * LOGIT_MARGIN`` in the others, so the softmax is one-hot
  and the argmax of the upsampled logits is the majority class.

The image itself is only checked for shape: the label map decides everything. The oracle has no weights:
``pretrained`` is False (the promotion policy never promotes a model trained on it), and its fingerprint
starts with ``oracle`` so cache entries and runs say what made them. It must be called with the label
map, ``skb(x, labels=...)``; without one it raises :class:`OracleLabelsRequired`. Precompute does that
from the dataset version's label records (:func:`components.precompute.precompute_priors`); online use
(validation, evaluation, serving) has no labels and therefore fails loudly rather than guess.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from components.data.scenes import SCENE_CLASSES
from components.errors import SKFError
from components.registry import register
from components.skb import CACHE_DTYPE, FEATURE_STRIDES, LOGIT_STRIDE, Priors, _default_device
from models.hrnet import hrnet_w48_lite_config

__all__ = [
    "FEATURE_RMS",
    "LOGIT_MARGIN",
    "ORACLE_SPEC",
    "OracleLabelsRequired",
    "OracleSKB",
    "build_oracle_skb",
]

ORACLE_SPEC = "skb/oracle-labels@1"
NUM_CLASSES = 59  # logit channels of the W48 SKB (PASCAL-Context)
# Root-mean-square of a random-init skb/hrnet-w48-lite@1's F0, F1, F2 on natural images (see module doc).
FEATURE_RMS: tuple[float, float, float] = (2.5, 2.1, 2.3)
LOGIT_MARGIN = 10.0


class OracleLabelsRequired(SKFError, ValueError):
    """The oracle SKB was called without a label map (or with one that does not fit the image)."""


class _Embeddings(nn.Module):
    """The fixed class embeddings, one per feature scale, as buffers (so packaging sees a state dict)."""

    def __init__(self, label_classes: int, channels: tuple[int, int, int], seed: int) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(int(seed))
        for i, (c, rms) in enumerate(zip(channels, FEATURE_RMS, strict=True)):
            table = torch.randn(label_classes, c, generator=generator, dtype=torch.float64).abs() * rms
            self.register_buffer(f"e{i}", table.float())

    def tables(self) -> tuple[Tensor, Tensor, Tensor]:
        return self.e0, self.e1, self.e2


class OracleSKB(nn.Module):
    """Priors from ground-truth label maps with the W48 SKB's shapes; see the module docstring."""

    needs_labels = True  # precompute passes each image's label map as ``labels=``
    pretrained = False
    checkpoint = None
    # The segmenter settings an enhancer spec records (components.skb.SKB_SETTINGS): the oracle
    # runs no segmenter, so they are fixed and only describe it (no padding, fp32).
    bn_mode = "eval"
    input_transform = "linear"
    pad_multiple = 1
    amp = False

    def __init__(
        self,
        *,
        spec: str = ORACLE_SPEC,
        label_classes: int = len(SCENE_CLASSES),
        seed: int = 0,
        device: str | torch.device | None = None,
    ) -> None:
        super().__init__()
        if not 1 <= int(label_classes) <= NUM_CLASSES:
            raise ValueError(f"label_classes must be 1..{NUM_CLASSES}, got {label_classes}")
        config = hrnet_w48_lite_config(NUM_CLASSES)
        self.spec = spec
        self.label_classes = int(label_classes)
        self.seed = int(seed)
        self._channels = tuple(config.feature_channels[:3])
        self.weights_id = f"oracle:labels:seed={self.seed}:classes={self.label_classes}"
        self.model = _Embeddings(self.label_classes, self._channels, self.seed)
        self.to(device=torch.device(device) if device is not None else _default_device())

    # -- metadata (the surface of SemanticKnowledgeBank that callers use) -------------------------
    @property
    def feature_channels(self) -> tuple[int, int, int]:
        c = self._channels
        return c[0], c[1], c[2]

    @property
    def num_classes(self) -> int:
        return NUM_CLASSES

    @property
    def device(self) -> torch.device:
        return self.model.e0.device

    def settings(self) -> dict[str, Any]:
        """Everything that determines the priors, as plain data."""
        return {
            "component": self.spec,
            "oracle": "ground-truth label maps",
            "weights": self.weights_id,
            "feature_channels": list(self.feature_channels),
            "num_classes": NUM_CLASSES,
            "feature_rms": list(FEATURE_RMS),
            "logit_margin": LOGIT_MARGIN,
            "pool": "average, ceil grid",
            "cache_dtype": str(CACHE_DTYPE).removeprefix("torch."),
        }

    @property
    def fingerprint(self) -> str:
        """``oracle`` + sha256 of :meth:`settings` (64 characters, the prior-cache key of this SKB)."""
        blob = json.dumps(self.settings(), sort_keys=True, separators=(",", ":")).encode()
        return "oracle" + hashlib.sha256(blob).hexdigest()[:58]

    def describe(self) -> dict[str, Any]:
        """Flat parameters for MLflow / the catalog."""
        return {
            "skb.spec": self.spec,
            "skb.pretrained": False,
            "skb.oracle": True,
            "skb.weights": self.weights_id,
            "skb.checkpoint": "",
            "skb.arch": "oracle-labels",
            "skb.num_classes": NUM_CLASSES,
            "skb.label_classes": self.label_classes,
            "skb.fingerprint": self.fingerprint,
        }

    def extra_repr(self) -> str:
        return f"spec={self.spec}, label_classes={self.label_classes}, seed={self.seed}, oracle=True"

    # -- forward --------------------------------------------------------------------------------
    def forward(self, x: Tensor, *, labels: Tensor | None = None, grad: bool = False) -> Priors:
        """Priors of the label map ``labels`` (B, H, W) for the image ``x`` (B, 3, H, W).

        ``grad`` is accepted for drop-in use; the priors do not depend on ``x``, so nothing flows back.
        """
        onehot = self._one_hot(x, labels)
        with torch.no_grad():
            grids = [F.avg_pool2d(onehot, s, s, ceil_mode=True) for s in FEATURE_STRIDES]
            features = [
                torch.einsum("bkhw,kc->bchw", p, table).contiguous()
                for p, table in zip(grids, self.model.tables(), strict=True)
            ]
            p = grids[FEATURE_STRIDES.index(LOGIT_STRIDE)]
            rest = p.new_full((p.shape[0], NUM_CLASSES - self.label_classes, *p.shape[2:]), -2 * LOGIT_MARGIN)
            logits = torch.cat([LOGIT_MARGIN * (2 * p - 1), rest], dim=1)
        return Priors(*features, logits)

    def _one_hot(self, x: Tensor, labels: Tensor | None) -> Tensor:
        """Checks ``x`` and ``labels`` and returns the label map one-hot, float (B, K, H, W)."""
        if x.ndim != 4 or x.shape[1] != 3 or not x.is_floating_point():
            raise ValueError(f"SKB expects a float tensor (B, 3, H, W); got {x.dtype} {tuple(x.shape)}")
        if labels is None:
            raise OracleLabelsRequired(
                f"{self.spec} makes priors from ground-truth label maps: call it as skb(x, labels=...) with "
                "a (B, H, W) class-id map; precompute passes the dataset's label maps (ingest a labelled "
                "source), online use (validation, evaluation, serving) cannot"
            )
        if labels.shape != (x.shape[0], *x.shape[-2:]) or labels.is_floating_point():
            raise OracleLabelsRequired(
                f"labels must be an integer (B, H, W) map matching the image {tuple(x.shape)}; "
                f"got {labels.dtype} {tuple(labels.shape)}"
            )
        labels = labels.to(device=self.device, dtype=torch.int64)
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.label_classes):
            raise OracleLabelsRequired(
                f"label ids must be in 0..{self.label_classes - 1} for {self.spec} "
                f"(label_classes={self.label_classes}); got {int(labels.min())}..{int(labels.max())}"
            )
        return F.one_hot(labels, self.label_classes).permute(0, 3, 1, 2).float()


@register(ORACLE_SPEC, description="Oracle SKB: W48-shaped priors from ground-truth label maps (benchmarks)")
def build_oracle_skb(
    *,
    checkpoint: str | None = None,
    expected_sha256: str | None = None,
    label_classes: int = len(SCENE_CLASSES),
    seed: int = 0,
    device: str | torch.device | None = None,
    **segmenter_settings: Any,
) -> OracleSKB:
    """The oracle SKB; ``segmenter_settings`` (bn_mode, input_transform, ...) do not apply and are ignored."""
    if checkpoint is not None or expected_sha256 is not None:
        raise ValueError(f"{ORACLE_SPEC} has no weights: it takes no checkpoint")
    return OracleSKB(label_classes=label_classes, seed=seed, device=device)
