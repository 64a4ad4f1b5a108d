"""The scene segmenter: an HRNet-W48-lite trained on a labelled dataset version, used as an SKB.

Why: the random SKB carries no semantics and the oracle (``skb/oracle-labels@1``) needs ground-truth
label maps, so neither shows what a *learned* segmenter gives an SKF enhancer. This package trains one on
the low-light images of a labelled version (:mod:`components.segmenter.job`, ``skf train-skb``), stores
it as safetensors + a JSON spec in MLflow (:mod:`components.segmenter.package`), and serves it as
``skb/scene-segmenter@1`` (:mod:`components.segmenter.skb`). The user guide is ``docs/segmenter.md``.
"""

from __future__ import annotations

from components.segmenter.package import (
    SCENE_SEGMENTER_SPEC,
    SegmenterIntegrityError,
    SegmenterPackageError,
)

__all__ = ["SCENE_SEGMENTER_SPEC", "SegmenterIntegrityError", "SegmenterPackageError"]
