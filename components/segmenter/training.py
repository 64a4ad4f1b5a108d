"""Fitting the segmenter and scoring it: the loop and the metrics, free of MLflow and the catalog.

The loss is cross-entropy over all 59 logit channels, upsampled to the crop as the SKB upsamples them
(:func:`models.hrnet.upsample_logits`): labels are ids 0..K-1, so the other channels are pushed down and
never win. Scoring segments each whole image the way the SKB does (input transform, reflect padding to 32,
crop, bilinear ×4, argmax over all channels) with BN in eval mode, and reports per-class IoU (classes
absent from both the labels and the prediction are left out), their mean (mIoU) and pixel accuracy.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from components.segmenter.data import LabelledImages, crop_size, sample_batch
from components.skb import InputTransform, apply_input_transform, reflect_pad_to_multiple
from models.hrnet import HRNet, labels_of, upsample_logits

__all__ = [
    "SegmenterConfig",
    "SegmenterFit",
    "SegmenterMetrics",
    "SegmenterProgress",
    "evaluate",
    "fit",
    "segment",
]

INIT_SCHEME = "kaiming"  # O(1) activations from the first step (models.hrnet.HRNet.init_weights)


class SegmenterConfig(BaseModel):
    """Everything that determines the trained weights (the device does not, and is not here)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    steps: int = Field(300, ge=1, description="Optimizer steps.")
    batch_size: int = Field(8, ge=1, description="Crops per step.")
    crop: int = Field(64, ge=32, multiple_of=32, description="Crop side (shrunk to fit the smallest image).")
    lr: float = Field(1e-3, gt=0, description="Adam learning rate, decayed by (1 - step/steps)^lr_power.")
    lr_power: float = Field(0.9, ge=0, description="Poly decay exponent (0: constant).")
    weight_decay: float = Field(0.0, ge=0, description="Adam weight decay.")
    hflip: bool = Field(True, description="Random left-right flips.")
    val_fraction: float = Field(0.1, ge=0, lt=1, description="Train pairs carved out for validation.")
    val_every: int = Field(100, ge=1, description="Validation every N steps (and at the end).")
    input_transform: InputTransform = Field("linear", description="What the SKB feeds the segmenter.")
    seed: int = Field(0, description="Initial weights, crops and the validation carve.")
    feature_supervision: float = Field(
        0.0,
        ge=0,
        description="Weight of per-scale class losses on F0, F1, F2 (training-only 1x1 probes): makes the "
        "features SE reads carry the classes, not only the head's logits.",
    )


@dataclasses.dataclass(frozen=True)
class SegmenterMetrics:
    """mIoU, pixel accuracy and per-class IoU (NaN: class in neither labels nor prediction)."""

    miou: float
    pixel_acc: float
    iou: tuple[float, ...]

    def flat(self, prefix: str, classes: tuple[str, ...]) -> dict[str, float]:
        """``{prefix/miou, prefix/pixel_acc, prefix/iou/<class>}`` without NaN entries (MLflow keys)."""
        out = {f"{prefix}/miou": self.miou, f"{prefix}/pixel_acc": self.pixel_acc}
        out.update(
            {f"{prefix}/iou/{c}": v for c, v in zip(classes, self.iou, strict=True) if not math.isnan(v)}
        )
        return out


@dataclasses.dataclass(frozen=True)
class SegmenterProgress:
    step: int
    total: int
    loss: float
    elapsed_s: float
    val: SegmenterMetrics | None = None

    @property
    def metrics(self) -> dict[str, float]:
        """The step's metrics, as the enhancer engine's progress names them (for shared progress loggers)."""
        return {"loss": self.loss}

    @property
    def val_metrics(self) -> dict[str, float] | None:
        return None if self.val is None else {"val/miou": self.val.miou, "val/pixel_acc": self.val.pixel_acc}


@dataclasses.dataclass
class SegmenterFit:
    """A trained model and its record: per-step losses, validation history, wall time, crop used."""

    model: HRNet
    losses: list[float]
    val_history: list[tuple[int, SegmenterMetrics]]
    seconds: float
    crop: int


def segment(model: HRNet, image: Tensor, input_transform: InputTransform) -> Tensor:
    """Label map (B, H, W) of ``image`` (B, 3, H, W) exactly as the SKB derives it (eval-mode BN)."""
    height, width = image.shape[-2:]
    x = reflect_pad_to_multiple(apply_input_transform(image, input_transform), 32)
    logits = model(x).logits[..., : -(-height // 4), : -(-width // 4)]
    return labels_of(upsample_logits(logits.float(), (height, width)))


def _confusion(pred: Tensor, target: Tensor, k: int) -> np.ndarray:
    """(K, K+1) counts: rows true class, columns predicted class, the last column "any other channel"."""
    pred = pred.clamp(max=k)  # every channel >= K is one "other" bucket
    idx = target.reshape(-1) * (k + 1) + pred.reshape(-1)
    return torch.bincount(idx.cpu(), minlength=k * (k + 1)).reshape(k, k + 1).numpy()


@torch.no_grad()
def evaluate(
    model: HRNet, data: LabelledImages, k: int, input_transform: InputTransform, device: Any
) -> SegmenterMetrics:
    """Score ``model`` on every image of ``data`` (whole images, one at a time: sizes may differ)."""
    was_training = model.training
    model.eval()
    counts = np.zeros((k, k + 1), dtype=np.int64)
    try:
        for i in range(len(data)):
            pred = segment(model, data.image(i).to(device), input_transform)
            counts += _confusion(pred, data.label(i).to(device), k)
    finally:
        model.train(was_training)
    tp = np.diag(counts[:, :k]).astype(np.float64)
    union = counts.sum(1) + counts[:, :k].sum(0) - tp
    iou = np.where(union > 0, tp / np.maximum(union, 1), np.nan)
    return SegmenterMetrics(
        miou=float(np.nanmean(iou)) if np.isfinite(iou).any() else 0.0,
        pixel_acc=float(tp.sum() / max(counts.sum(), 1)),
        iou=tuple(float(v) for v in iou),
    )


def new_model(seed: int) -> HRNet:
    """HRNet-W48-lite with 59 channels, initialised from ``seed``."""
    from components.segmenter.package import architecture

    model = HRNet(architecture())
    model.init_weights(INIT_SCHEME, generator=torch.Generator().manual_seed(int(seed)))
    return model


def _feature_probes(model: HRNet, k: int) -> nn.ModuleList:
    """One 1x1 classifier per SE-facing feature map (F0, F1, F2); trained alongside, never packaged."""
    return nn.ModuleList(nn.Conv2d(c, k, 1) for c in model.config.stage4.out_channels[:3])


def _feature_loss(probes: nn.ModuleList, features: Sequence[Tensor], labels: Tensor) -> Tensor:
    """Mean cross-entropy of each probe's class scores, upsampled to the crop, against the labels."""
    size = labels.shape[-2:]
    losses = [
        F.cross_entropy(F.interpolate(probe(f), size=size, mode="bilinear", align_corners=False), labels)
        for probe, f in zip(probes, features, strict=False)
    ]
    return torch.stack(losses).mean()


def fit(
    config: SegmenterConfig,
    train: LabelledImages,
    val: LabelledImages | None,
    k: int,
    *,
    device: str | torch.device,
    progress: Callable[[SegmenterProgress], None] | None = None,
) -> SegmenterFit:
    """Train a fresh model for ``config.steps`` Adam steps on random crops of ``train``."""
    torch.manual_seed(config.seed)
    model = new_model(config.seed).to(device).train()
    probes = _feature_probes(model, k).to(device) if config.feature_supervision > 0 else None
    params = [*model.parameters(), *(probes.parameters() if probes is not None else ())]
    optimizer = torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: max(0.0, 1.0 - s / config.steps) ** config.lr_power
    )
    crop = crop_size(train, config.crop)
    generator = torch.Generator().manual_seed(config.seed)
    losses: list[float] = []
    history: list[tuple[int, SegmenterMetrics]] = []
    start = time.perf_counter()
    for step in range(1, config.steps + 1):
        x, y = sample_batch(train, config.batch_size, crop, generator, config.hflip)
        x, y = apply_input_transform(x.to(device), config.input_transform), y.to(device)
        out = model(x)
        loss = F.cross_entropy(upsample_logits(out.logits, (crop, crop)), y)
        if probes is not None:
            loss = loss + config.feature_supervision * _feature_loss(probes, out.features, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
        metrics = None
        if val is not None and len(val) and (step % config.val_every == 0 or step == config.steps):
            metrics = evaluate(model, val, k, config.input_transform, device)
            history.append((step, metrics))
        if progress is not None:
            progress(SegmenterProgress(step, config.steps, losses[-1], time.perf_counter() - start, metrics))
    return SegmenterFit(model.eval(), losses, history, time.perf_counter() - start, crop)
