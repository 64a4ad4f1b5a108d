"""``skb/scene-segmenter@1``: the segmenter ``skf train-skb`` trained, as a drop-in SKB.

It *is* a :class:`~components.skb.SemanticKnowledgeBank` around an HRNet-W48-lite (59 logit channels, the
first K trained on the dataset's classes), so precompute, training, enhancer packaging and evaluation use
it like any other SKB. ``weights_id`` is ``sha256:<digest of segmenter.safetensors>``, so the fingerprint
-- and with it every cached prior and training config hash -- names the exact weights.

Building it (``create(SCENE_SEGMENTER_SPEC, checkpoint=...)``):

* ``checkpoint=`` a ``models:/`` URI, a run id or the package folder: the weights are verified against the
  sha256 recorded at training (:mod:`components.segmenter.package`) and loaded strictly;
* ``checkpoint=None`` (what precompute and training pass when the user gave none): fails at once with
  :class:`SegmenterCheckpointRequired`, which says to run ``skf train-skb`` first;
* no ``checkpoint`` argument at all: an empty shell that refuses to run or to give a fingerprint until
  weights are loaded into ``.model`` and ``weights_id`` is set -- exactly how
  :func:`components.inference.build_enhancer` rebuilds a packaged SKB from the package's own weights.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from torch import Tensor

from components.errors import UserInputError
from components.registry import register
from components.segmenter.package import SCENE_SEGMENTER_SPEC, architecture, load_state, read_segmenter
from components.skb import BnMode, InputTransform, Priors, SemanticKnowledgeBank
from models.hrnet import HRNet

__all__ = [
    "SCENE_SEGMENTER_SPEC",
    "SceneSegmenterSKB",
    "SegmenterCheckpointRequired",
    "build_scene_segmenter",
]

log = logging.getLogger(__name__)
UNLOADED = "unloaded"
_OMITTED: Any = object()  # "no checkpoint argument": the caller loads weights itself (build_enhancer)


class SegmenterCheckpointRequired(UserInputError):
    """``skb/scene-segmenter@1`` was asked for without trained weights."""


def _required(what: str) -> SegmenterCheckpointRequired:
    return SegmenterCheckpointRequired(
        f"{SCENE_SEGMENTER_SPEC} {what}: run `skf train-skb NAME@V` on a labelled dataset version first, then "
        "pass its model as the checkpoint (--checkpoint / --skb-checkpoint models:/skf-scene-segmenter@challenger)"
    )


class SceneSegmenterSKB(SemanticKnowledgeBank):
    """The trained scene segmenter as an SKB; see the module docstring."""

    def __init__(self, model: HRNet, *, label_classes: tuple[str, ...] = (), **kwargs: Any) -> None:
        super().__init__(model, spec=SCENE_SEGMENTER_SPEC, **kwargs)
        self.label_classes = tuple(label_classes)

    @property
    def loaded(self) -> bool:
        """Whether real weights are in place (a shell becomes loaded when ``weights_id`` names a digest)."""
        return self.weights_id.startswith("sha256:")

    def _require_weights(self) -> None:
        if not self.loaded:
            raise _required("has no weights loaded")

    def settings(self) -> dict[str, Any]:
        self._require_weights()
        return super().settings()

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "skb.label_classes": ",".join(self.label_classes)}

    def forward(self, x: Tensor, *, grad: bool = False) -> Priors:
        self._require_weights()
        return super().forward(x, grad=grad)


def _transform(requested: str | None, trained: str, source: str) -> InputTransform:
    """The input transform the segmenter was trained with; asking for another one is an error."""
    if requested is not None and requested != trained:
        raise UserInputError(
            f"{source} was trained with input_transform={trained!r}; it cannot run with {requested!r} "
            f"(leave input_transform unset, or retrain with `skf train-skb --set input_transform={requested}`)"
        )
    return trained  # type: ignore[return-value]


@register(SCENE_SEGMENTER_SPEC, description="HRNet-W48-lite trained by `skf train-skb` on a labelled dataset")
def build_scene_segmenter(
    *,
    checkpoint: str | os.PathLike[str] | None = _OMITTED,
    expected_sha256: str | None = None,
    bn_mode: BnMode = "eval",
    input_transform: InputTransform | None = None,
    pad_multiple: int = 32,
    amp: bool = True,
    device: str | torch.device | None = None,
    seed: int = 0,
    cache_dir: str | os.PathLike[str] | None = None,
) -> SceneSegmenterSKB:
    """The trained segmenter from ``checkpoint`` (verified, strict); ``seed`` and ``cache_dir`` are accepted
    for the common SKB builder signature and unused (nothing is random or downloaded to a cache)."""
    del seed, cache_dir
    settings = {"bn_mode": bn_mode, "pad_multiple": pad_multiple, "amp": amp, "device": device}
    model = HRNet(architecture())
    if checkpoint is _OMITTED:
        if expected_sha256 is not None:
            raise ValueError("expected_sha256 was given without a checkpoint")
        transform = input_transform or "linear"
        return SceneSegmenterSKB(
            model, weights_id=UNLOADED, pretrained=False, input_transform=transform, **settings
        )
    if checkpoint is None:
        raise _required("needs a checkpoint")
    loaded = read_segmenter(checkpoint, expected_sha256=expected_sha256)
    load_state(model, loaded)
    log.info("SKB %s loaded %s (sha256 %s)", SCENE_SEGMENTER_SPEC, loaded.source, loaded.sha256)
    return SceneSegmenterSKB(
        model,
        label_classes=loaded.classes,
        weights_id=f"sha256:{loaded.sha256}",
        pretrained=True,
        checkpoint=os.fspath(checkpoint),
        input_transform=_transform(input_transform, loaded.input_transform, os.fspath(checkpoint)),
        **settings,
    )
