"""SKF training losses: SCH (semantic colour histograms) and SA (semantic-guided adversarial).

Registered as ``loss/sch@1`` and ``loss/sa@1``. The maths lives in :mod:`models.sch` and
:mod:`models.discriminator`; this module adds the per-baseline presets, schedules and the
official-compatibility switch (docs/method.md §4, §5, §10).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from components.registry import register
from models.discriminator import Discriminator
from models.sch import Normalizer, sch_loss

__all__ = [
    "SAPrecision",
    "SADiscriminatorLoss",
    "SemanticAdversarialLoss",
    "SemanticColorHistogramLoss",
    "build_sa",
    "build_sch",
    "native_bf16",
    "resolve_sa_precision",
]

SAPrecision = Literal["auto", "fp32", "bf16"]


@functools.lru_cache(maxsize=1)
def _cpu_native_bf16() -> bool:
    try:  # oneDNN's probe for AVX512-BF16 / AMX; absent or failing -> no native bf16
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` runs bf16 convolutions in hardware: a CPU with AVX512-BF16 or AMX (through
    oneDNN), a CUDA GPU of compute capability 8.0 or newer. Elsewhere bf16 is emulated and slower."""
    if device.type == "cpu":
        return _cpu_native_bf16()
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.get_device_capability(device) >= (8, 0)
    return False


def _check_sa_precision(precision: str) -> None:
    if precision not in get_args(SAPrecision):
        raise ValueError(f"SA precision must be 'auto', 'fp32' or 'bf16', got {precision!r}")


def resolve_sa_precision(
    precision: SAPrecision, device: torch.device, official_compat: bool = False
) -> Literal["fp32", "bf16"]:
    """What an SA ``precision`` means on ``device``: ``"auto"`` -> bf16 where :func:`native_bf16`, else fp32.

    In official-compat mode ``"auto"`` is fp32: there the D loss is not detached from the generator (as
    released), so the D step's passes also feed the generator's gradient.
    """
    _check_sa_precision(precision)
    if precision == "auto":
        return "bf16" if native_bf16(device) and not official_compat else "fp32"
    return precision


class SemanticColorHistogramLoss(nn.Module):
    """SCH loss: per-class soft colour histograms of ``pred`` vs ``target``, bin-averaged L1.

    Args:
        num_classes: classes of the label map (PASCAL-Context: 59).
        bins, sharpness: histogram bins over [0, 1] and sigmoid sharpness of the soft kernel.
        window: bins evaluated on each side of a value's own bin (the truncated mass is < 2.2e-7).
        normalizer: ``"nhw"`` (SNR, LLFlow) or ``"nchw3"`` (DRBN: N*num_classes*H*W*3).
        weight: multiplier applied in :meth:`forward`.
        every: apply on steps where ``step % every == 0`` (SNR: 50); see :meth:`should_apply`.
    """

    def __init__(
        self,
        num_classes: int = 59,
        bins: int = 256,
        sharpness: float = 400.0,
        window: int = 10,
        normalizer: Normalizer = "nhw",
        weight: float = 1.0,
        every: int = 1,
    ) -> None:
        super().__init__()
        if normalizer not in ("nhw", "nchw3"):
            raise ValueError(f"normalizer must be 'nhw' or 'nchw3', got {normalizer!r}")
        if every < 1 or bins < 1 or window < 0 or num_classes < 1:
            raise ValueError(
                f"invalid SCH settings: every={every}, bins={bins}, window={window}, num_classes={num_classes}"
            )
        self.num_classes = num_classes
        self.bins = bins
        self.sharpness = float(sharpness)
        self.window = window
        self.normalizer: Normalizer = normalizer
        self.weight = float(weight)
        self.every = every

    @classmethod
    def drbn(cls, **overrides: Any) -> SemanticColorHistogramLoss:
        """DRBN-SKF: weight 1 with the N*59*H*W*3 normaliser, every iteration."""
        return cls(**{"weight": 1.0, "normalizer": "nchw3", "every": 1, **overrides})

    @classmethod
    def snr(cls, **overrides: Any) -> SemanticColorHistogramLoss:
        """SNR-SKF: weight 1e4 with the N*H*W normaliser, only on every 50th iteration."""
        return cls(**{"weight": 1e4, "normalizer": "nhw", "every": 50, **overrides})

    @classmethod
    def llflow(cls, **overrides: Any) -> SemanticColorHistogramLoss:
        """LLFlow-SKF: weight 1 with the N*H*W normaliser, every iteration (added to the NLL)."""
        return cls(**{"weight": 1.0, "normalizer": "nhw", "every": 1, **overrides})

    def should_apply(self, step: int) -> bool:
        """Whether the loss is due on training step ``step`` (SNR computes it every 50 steps only)."""
        return step % self.every == 0

    def forward(
        self, pred: Tensor, target: Tensor, labels: Tensor, *, differentiate_target: bool = False
    ) -> Tensor:
        """``pred``/``target``: N×3×H×W in [0, 1]; ``labels``: N×H×W class map (or N×K×H×W scores).

        Returns ``weight * SCH`` as an fp32 scalar (computed in fp32 even under autocast). The target is a
        constant unless ``differentiate_target``: LLFlow compares two network outputs (μ and z) and the
        released loss backpropagates into both; the L1 is symmetric, so the target's gradient is the
        prediction-side gradient of the swapped call (one more histogram pass, no change in value).
        """
        if labels.dim() == 4 and labels.dtype.is_floating_point:
            if labels.shape[1] != self.num_classes:
                raise ValueError(
                    f"SCH got a {labels.shape[1]}-channel score map but num_classes={self.num_classes}"
                )
            labels = labels.argmax(dim=1)
        options = {
            "num_classes": self.num_classes,
            "bins": self.bins,
            "sharpness": self.sharpness,
            "window": self.window,
            "normalizer": self.normalizer,
        }
        loss = sch_loss(pred, target.detach(), labels, **options)
        if differentiate_target and target.requires_grad:
            swapped = sch_loss(target, pred.detach(), labels, **options)
            loss = loss + (swapped - swapped.detach())
        return self.weight * loss

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, bins={self.bins}, sharpness={self.sharpness}, "
            f"window={self.window}, normalizer={self.normalizer!r}, weight={self.weight}, every={self.every}"
        )


@dataclass(frozen=True)
class SADiscriminatorLoss:
    """Result of :meth:`SemanticAdversarialLoss.discriminator_loss`.

    ``regions`` holds, per image, the classes whose probability maps masked the two local inputs
    (in official-compat mode both are the second-largest class). ``fake_region``/``real_region`` are the
    chosen slot (0 or 1) per image: the region on which the discriminator errs most (clean mode: scored
    by the no-grad candidate pass, so the region losses carry no graph).
    """

    loss: Tensor
    regions: Tensor  # (B, 2) long class ids
    fake_region: Tensor  # (B,) long slot in {0, 1}
    real_region: Tensor  # (B,) long slot in {0, 1}
    fake_region_losses: Tensor  # (B, 2) per-image MSE of D(fake * M_i) to 0
    real_region_losses: Tensor  # (B, 2) per-image MSE of D(real * M_i) to 1

    @property
    def fake_class(self) -> Tensor:
        return self.regions.gather(1, self.fake_region[:, None]).squeeze(1)

    @property
    def real_class(self) -> Tensor:
        return self.regions.gather(1, self.real_region[:, None]).squeeze(1)


@contextmanager
def _frozen(module: nn.Module) -> Iterator[None]:
    """Build the graph with ``module``'s trainable parameters treated as constants, then restore them."""
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


@contextmanager
def _batch_stats_only(module: nn.Module) -> Iterator[None]:
    """Let ``module``'s BN layers normalise with batch statistics without updating their running stats."""
    bns = [
        m
        for m in module.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]
    for m in bns:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in bns:
            m.track_running_stats = True


def _region_candidates(image: Tensor, masks: Tensor) -> Tensor:
    """(B, 2, C, H, W): ``image`` masked by each of the two (B, 2, H, W) region maps."""
    return image[:, None] * masks[:, :, None].to(image.dtype)


def _pick(candidates: Tensor, slot: Tensor) -> Tensor:
    """(B, C, H, W): per image, the candidate in ``slot`` (0 or 1)."""
    return candidates[torch.arange(candidates.shape[0], device=candidates.device), slot]


def _sq_err(score: Tensor, label: float) -> Tensor:
    """Per-image squared error of D's (B, 1) probability to a constant label, in fp32."""
    return (score.float().squeeze(1) - label).square()


class SemanticAdversarialLoss(nn.Module):
    """SA loss: LSGAN with a global term and a hardest-semantic-region local term.

    The module's parameters are exactly the discriminator's, so ``torch.optim.Adam(sa.parameters())``
    is the D optimiser. Two modes:

    * default (clean, docs/method.md §5.3 "D trained on both the 62-ch global input and the masked local
      inputs"): masks are the soft maps of the two largest classes; the D step sees ``fake`` and ``probs``
      detached. The global term uses only the image⊕probabilities (62-ch) input, the path the generator
      is scored on (no extra RGB global pass). For the local term the four region candidates are scored
      in a no-grad forward per domain (batch statistics, running stats untouched), the hardest region is
      picked per image for fake and for real, and only the selected masked inputs get a forward+backward:
      4 trained D passes + 2 cheap scoring passes instead of 8 trained ones. Fake and real keep separate
      D calls so BN normalises per-domain batches, as in the G step.
    * ``official_compat=True``: the released DRBN-SKF behaviour: both masks are the second-largest class
      (aliased buffers), no 62-ch D training, no detach, and the region max is taken over batch means.

    Precision of the D step: its six passes (two scoring, four trained) are more than half of a DRBN-SKF
    step in fp32 on a CPU. ``precision="auto"`` (default) runs them under bf16 autocast where the device
    does bf16 in hardware (:func:`native_bf16`; see ``benchmarks/RESULTS.md`` for the measured gain),
    fp32 elsewhere and in official-compat mode; ``"bf16"`` forces it, ``"fp32"`` keeps the ambient
    precision. Parameters, their gradients, BN statistics and every loss stay fp32. :meth:`generator_loss`,
    the pass whose gradient reaches the enhancement network, always runs in the ambient precision (fp32
    unless the caller autocasts), so the generator's adversarial gradient is the same in every mode. (The
    D's own gradient at its LSGAN loss is very sensitive to its input: in fp32, perturbing the input by
    0.4%, bf16's rounding, turns it by about as much as bf16 autocast does; the D learns at 1/1000 of the
    generator's rate.)

    Args:
        num_classes: channels of ``probs`` (59).
        lam: weight of the global term; the local term gets ``1 - lam`` (official 0.9).
        weight: multiplier of :meth:`generator_loss` (official 0.1).
        official_compat: reproduce the released behaviour, bugs included.
        precision: ``"auto"``, ``"fp32"`` or ``"bf16"`` for the D step's passes (see above).
    """

    def __init__(
        self,
        num_classes: int = 59,
        image_channels: int = 3,
        lam: float = 0.9,
        weight: float = 0.1,
        official_compat: bool = False,
        precision: SAPrecision = "auto",
    ) -> None:
        super().__init__()
        if not 0.0 <= lam <= 1.0:
            raise ValueError(f"lam must lie in [0, 1], got {lam}")
        _check_sa_precision(precision)
        self.precision = precision
        self.discriminator = Discriminator(image_channels=image_channels, num_classes=num_classes)
        self.num_classes = num_classes
        self.lam = float(lam)
        self.weight = float(weight)
        self.official_compat = official_compat

    def resolved_precision(self, device: torch.device) -> Literal["fp32", "bf16"]:
        """:func:`resolve_sa_precision` of this loss's ``precision`` and mode on ``device``."""
        return resolve_sa_precision(self.precision, device, self.official_compat)

    def _autocast(self, x: Tensor) -> AbstractContextManager[Any]:
        """bf16 autocast around a D pass on ``x``'s device when the resolved precision is bf16."""
        enabled = self.resolved_precision(x.device) == "bf16"
        return torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=enabled)

    def _check(self, image: Tensor, probs: Tensor, name: str) -> None:
        if probs.dim() != 4 or probs.shape[1] != self.num_classes:
            raise ValueError(f"SA probs must be B×{self.num_classes}×H×W, got {tuple(probs.shape)}")
        if image.shape[0] != probs.shape[0] or image.shape[-2:] != probs.shape[-2:]:
            raise ValueError(
                f"SA {name} {tuple(image.shape)} and probs {tuple(probs.shape)} differ in batch or size; "
                "resize the probabilities to the image resolution first"
            )

    @staticmethod
    def largest_regions(probs: Tensor) -> Tensor:
        """(B, 2) ids of the largest and second-largest classes by soft area ``sum_p P_k(p)``."""
        area = probs.detach().float().sum(dim=(2, 3))
        first = area.argmax(dim=1)
        second = area.scatter(1, first[:, None], float("-inf")).argmax(dim=1)
        return torch.stack([first, second], dim=1)

    def discriminator_loss(
        self, fake: Tensor, real: Tensor, probs: Tensor, real_probs: Tensor | None = None
    ) -> SADiscriminatorLoss:
        """D loss for enhanced ``fake`` vs ground-truth ``real`` with ``probs`` = softmax(HRNet(fake)).

        ``real_probs`` (softmax of HRNet(real)) pairs the real image in the 62-ch global term; without it
        the fake's probabilities are used. Ignored in official-compat mode.
        """
        self._check(fake, probs, "fake")
        if real.shape != fake.shape:
            raise ValueError(f"SA real {tuple(real.shape)} and fake {tuple(fake.shape)} shapes differ")
        if not self.official_compat:
            return self._clean_discriminator_loss(fake.detach(), real, probs.detach(), real_probs)
        regions = self.largest_regions(probs)[:, 1:].expand(-1, 2)  # both mask buffers alias class 2
        masks = probs.gather(1, regions[:, :, None, None].expand(-1, -1, *probs.shape[-2:]))
        m1, m2 = masks[:, :1], masks[:, 1:]
        with self._autocast(fake):
            d = self.discriminator
            fake_global, real_global = _sq_err(d(fake), 0.0), _sq_err(d(real), 1.0)
            fake_local = torch.stack([_sq_err(d(fake * m1), 0.0), _sq_err(d(fake * m2), 0.0)], dim=1)
            real_local = torch.stack([_sq_err(d(real * m1), 1.0), _sq_err(d(real * m2), 1.0)], dim=1)

        # MSE over the batch first, then the max over the two regions (ties -> region 2).
        fake_slot = (fake_local.mean(0)[0] <= fake_local.mean(0)[1]).long().expand(fake.shape[0])
        real_slot = (real_local.mean(0)[0] <= real_local.mean(0)[1]).long().expand(fake.shape[0])
        glob = fake_global.mean() + real_global.mean()
        local = fake_local.mean(0)[fake_slot[0]] + real_local.mean(0)[real_slot[0]]

        loss = self.lam * glob / 2 + (1.0 - self.lam) * local / 2
        return SADiscriminatorLoss(
            loss=loss,
            regions=regions.contiguous(),
            fake_region=fake_slot.contiguous(),
            real_region=real_slot.contiguous(),
            fake_region_losses=fake_local.detach(),
            real_region_losses=real_local.detach(),
        )

    def _clean_discriminator_loss(
        self, fake: Tensor, real: Tensor, probs: Tensor, real_probs: Tensor | None
    ) -> SADiscriminatorLoss:
        """Clean D loss: 62-ch global term + hardest-region local term, trained only on the selected region."""
        d = self.discriminator
        sem_real = real_probs.detach() if real_probs is not None else probs
        self._check(real, sem_real, "real")
        regions = self.largest_regions(probs)
        masks = probs.gather(1, regions[:, :, None, None].expand(-1, -1, *probs.shape[-2:]))  # (B, 2, H, W)

        # Score both region candidates without a graph; ties -> region 2, as the released if/else.
        fake_cand, real_cand = _region_candidates(fake, masks), _region_candidates(real, masks)
        fake_scores = self._score_candidates(fake_cand, 0.0)
        real_scores = self._score_candidates(real_cand, 1.0)
        fake_slot = (fake_scores[:, 0] <= fake_scores[:, 1]).long()
        real_slot = (real_scores[:, 0] <= real_scores[:, 1]).long()

        with self._autocast(fake):
            fake_sem = _sq_err(d(torch.cat([fake, probs], dim=1)), 0.0)
            real_sem = _sq_err(d(torch.cat([real, sem_real], dim=1)), 1.0)
            fake_local = _sq_err(d(_pick(fake_cand, fake_slot)), 0.0)
            real_local = _sq_err(d(_pick(real_cand, real_slot)), 1.0)

        glob = (fake_sem + real_sem).mean()
        local = (fake_local + real_local).mean()
        loss = self.lam * glob / 2 + (1.0 - self.lam) * local / 2
        return SADiscriminatorLoss(
            loss=loss,
            regions=regions.contiguous(),
            fake_region=fake_slot,
            real_region=real_slot,
            fake_region_losses=fake_scores,
            real_region_losses=real_scores,
        )

    def _score_candidates(self, candidates: Tensor, label: float) -> Tensor:
        """(B, 2) per-region squared errors from one no-grad pass over the B×2 candidates.

        BN uses the candidates' batch statistics but its running stats are left untouched, so the D step
        updates them only in its trained passes. The raw D is called (no DDP forward/buffer sync).
        """
        b = candidates.shape[0]
        d = getattr(self.discriminator, "module", self.discriminator)
        with torch.no_grad(), _batch_stats_only(d), self._autocast(candidates):
            score = d(candidates.flatten(0, 1))
        return _sq_err(score, label).view(b, 2)

    def generator_loss(self, fake: Tensor, probs: Tensor) -> Tensor:
        """``weight * MSE(D([fake; probs]), 1)``: global, 62-ch input; gradients reach ``fake`` and ``probs``."""
        self._check(fake, probs, "fake")
        # The raw D with frozen weights: the G backward needs D's input gradients only, so no weight
        # gradients are computed (a third of D's backward) and a DDP wrapper does not all-reduce them.
        d = getattr(self.discriminator, "module", self.discriminator)
        with _frozen(d):  # ambient precision whatever ``precision`` says (class docstring)
            score = d(torch.cat([fake, probs.to(fake.dtype)], dim=1))
        return self.weight * F.mse_loss(score.float(), torch.ones_like(score, dtype=torch.float32))

    def extra_repr(self) -> str:
        return (
            f"lam={self.lam}, weight={self.weight}, official_compat={self.official_compat}, "
            f"precision={self.precision!r}"
        )


_SCH_PRESETS = {
    "drbn": SemanticColorHistogramLoss.drbn,
    "snr": SemanticColorHistogramLoss.snr,
    "llflow": SemanticColorHistogramLoss.llflow,
}


@register("loss/sch@1", description="Semantic-guided colour histogram loss (vectorised, fp32)")
def build_sch(
    preset: Literal["drbn", "snr", "llflow"] | None = None, **kwargs: Any
) -> SemanticColorHistogramLoss:
    """``preset`` picks a baseline's weight/normaliser/frequency; ``kwargs`` override single settings."""
    if preset is None:
        return SemanticColorHistogramLoss(**kwargs)
    if preset not in _SCH_PRESETS:
        raise ValueError(f"unknown SCH preset {preset!r}; choose one of {sorted(_SCH_PRESETS)}")
    return _SCH_PRESETS[preset](**kwargs)


@register("loss/sa@1", description="Semantic-guided adversarial loss with its discriminator")
def build_sa(**kwargs: Any) -> SemanticAdversarialLoss:
    return SemanticAdversarialLoss(**kwargs)
