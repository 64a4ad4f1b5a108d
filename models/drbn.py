"""DRBN — Deep Recursive Band Network (Yang et al., CVPR 2020), with SKF's SE blocks (docs/method.md §6).

Four recurrences ``recur1..recur4`` of the same band network. Each one predicts the image coarse-to-fine at
1/4, 1/2 and 1/1 resolution and hands its features and outputs to the next. For SKF the network is split
in two: :meth:`DRBN.forward_1` runs recurrences 1–3; the SKB segments their full-resolution output; then
:meth:`DRBN.forward_2` runs recurrence 4 with three SE blocks (``recur4.fuseblk_{1,2,3}``) that inject
HRNet's F1 (96 ch, at 1/4), F0 (48 ch, at 1/2) and the full-resolution logits Z (59 ch, at 1/1).

State-dict keys follow the released DRBN-SKF checkpoints (``model_lol.pt``, ``model_lol_v2.pt``), e.g.
``recur1.SFENet1.weight``, ``recur2.RDBs.3.convs.1.conv.0.weight``, ``recur3.RDBs.0.LFF.bias``,
``recur1.UPNet4.0.weight``, ``recur4.Up2.weight``, ``recur4.fuseblk_1.attn.q.weight`` — read from
``DRBN_SKF/src/model/drbn.py``; the SE names come from :mod:`models.se`. Not verified against the binary
checkpoints themselves (not available offline); the test suite checks the layout and strict loading.

Differences from the official code (behaviour on official-sized inputs is unchanged):
* inputs are padded bottom/right to a multiple of 4 and outputs cropped back (the official network fails
  when H or W is not a multiple of 4); semantic priors are aligned with :func:`models.padding.fit_prior`;
* semantic priors are passed explicitly (``sem=(F1, F0, Z)``), no segmenter lives inside the network;
* a model built with ``skf=True`` requires priors in ``forward_2`` (the official code silently skips the
  SE blocks when they are missing).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.padding import crop, fit_prior, pad_to_multiple, scaled_size, working_layout
from models.se import SEFactory, SemanticEmbedding

__all__ = ["DRBN", "BandOutput", "DRBNBand", "DRBNState", "RDB"]

SemMaps = Sequence[Tensor]  # the SE inputs (F1, F0, Z), aligned by the network


class DenseLayer(nn.Module):
    """One densely connected conv: appends ``growth`` ReLU-activated channels to its input."""

    def __init__(self, in_channels: int, growth: int, kernel_size: int = 3) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, growth, kernel_size, padding=kernel_size // 2), nn.ReLU()
        )

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat((x, self.conv(x)), dim=1)


class RDB(nn.Module):
    """Residual dense block: ``n_layers`` dense layers, 1×1 local feature fusion (``LFF``), residual."""

    def __init__(self, channels: int, growth: int, n_layers: int) -> None:
        super().__init__()
        self.convs = nn.Sequential(*(DenseLayer(channels + i * growth, growth) for i in range(n_layers)))
        self.LFF = nn.Conv2d(channels + n_layers * growth, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.LFF(self.convs(x)) + x


class BandOutput(NamedTuple):
    """What one recurrence produces: images at 1/1, 1/2, 1/4 and the features at the same scales."""

    res1: Tensor
    res2: Tensor
    res4: Tensor
    feat1: Tensor
    feat2: Tensor
    feat4: Tensor


def _upsample2(x: Tensor) -> Tensor:
    # official ``nn.Upsample(scale_factor=2, mode='bilinear')`` (align_corners False)
    return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)


class DRBNBand(nn.Module):
    """One recurrence (official ``DRBN_BU``): a 3-scale U-shaped RDB network with band outputs.

    Args:
        in_channels: image channels; the input is the concat of the previous estimate and the low image.
        g0, growth, n_layers: RDB width, growth rate and dense layers (official 16, 8, 4).
        skf: add the SE blocks ``fuseblk_{1,2,3}`` (only recurrence 4 in DRBN-SKF).
        se_kwargs: passed to :class:`~models.se.SemanticEmbedding` (official: GDFN, tanh GELU).
        se_factory: ``(sem_channels, channels) -> module`` building each SE block instead (any SE variant
            whose shapes fit); ``se_kwargs`` is then unused.
    """

    def __init__(
        self,
        in_channels: int = 3,
        g0: int = 16,
        growth: int = 8,
        n_layers: int = 4,
        skf: bool = False,
        se_kwargs: dict | None = None,
        se_factory: SEFactory | None = None,
    ) -> None:
        super().__init__()
        k = 3
        self.SFENet1 = nn.Conv2d(in_channels * 2, g0, k, padding=1)
        self.SFENet2 = nn.Conv2d(g0, g0, k, padding=1)
        widths = [
            (g0, growth),
            (g0, growth),
            (2 * g0, 2 * growth),
            (2 * g0, 2 * growth),
            (g0, growth),
            (g0, growth),
        ]
        self.RDBs = nn.ModuleList(RDB(c, g, n_layers) for c, g in widths)
        self.UPNet = nn.Sequential(nn.Conv2d(g0, g0, k, padding=1), nn.Conv2d(g0, in_channels, k, padding=1))
        self.UPNet2 = nn.Sequential(nn.Conv2d(g0, g0, k, padding=1), nn.Conv2d(g0, in_channels, k, padding=1))
        self.UPNet4 = nn.Sequential(
            nn.Conv2d(2 * g0, g0, k, padding=1), nn.Conv2d(g0, in_channels, k, padding=1)
        )
        self.Down1 = nn.Conv2d(g0, g0, k, padding=1, stride=2)
        self.Down2 = nn.Conv2d(g0, 2 * g0, k, padding=1, stride=2)
        self.Up1 = nn.ConvTranspose2d(g0, g0, k + 1, stride=2, padding=1)
        self.Up2 = nn.ConvTranspose2d(2 * g0, g0, k + 1, stride=2, padding=1)
        self.skf = skf
        if skf:
            se = {"heads": 2, "ffn": "gdfn", "ffn_factor": 2.66, "gelu": "tanh", **(se_kwargs or {})}
            build = se_factory or partial(SemanticEmbedding, **se)
            self.fuseblk_1 = build(96, 2 * g0)  # F1 (1/8) -> host at 1/4
            self.fuseblk_2 = build(48, g0)  # F0 (1/4) -> host at 1/2
            self.fuseblk_3 = build(59, g0)  # logits Z (1/1) -> host at 1/1

    def forward(self, inp: Tensor, prev: BandOutput | None = None, sem: SemMaps | None = None) -> BandOutput:
        """``inp``: concat(previous estimate, low image); ``prev``: previous recurrence (None for the
        first); ``sem``: (F1, F0, Z) already aligned to the host sizes (requires ``skf=True``)."""
        f_first = F.relu(self.SFENet1(inp))
        f1 = F.relu(self.SFENet2(f_first))
        f2 = self.Down1(self.RDBs[0](f1))
        f4 = self.Down2(self.RDBs[1](f2))

        f4 = f4 + self.RDBs[3](self.RDBs[2](f4))
        if prev is not None:
            f4 = f4 + prev.feat4
        if sem is not None:
            f4 = self.fuseblk_1(f4, sem[0])
        f2 = f2 + self.RDBs[4](self.Up2(f4))
        if prev is not None:
            f2 = f2 + prev.feat2
        if sem is not None:
            f2 = self.fuseblk_2(f2, sem[1])
        f1 = f1 + self.RDBs[5](self.Up1(f2)) + f_first
        if prev is not None:
            f1 = f1 + prev.feat1
        if sem is not None:
            f1 = self.fuseblk_3(f1, sem[2])

        res4 = self.UPNet4(f4)
        res2 = self.UPNet2(f2) + _upsample2(res4)
        res1 = self.UPNet(f1) + _upsample2(res2)
        return BandOutput(res1, res2, res4, f1, f2, f4)


@dataclass
class DRBNState:
    """Hand-over from :meth:`DRBN.forward_1` to :meth:`DRBN.forward_2` (tensors at the padded size)."""

    low: Tensor  # padded low-light input
    band: BandOutput  # recurrence-3 outputs and features
    size: tuple[int, int]  # original H, W

    @property
    def image(self) -> Tensor:
        """Recurrence-3 full-resolution estimate, cropped to the input size: what the SKB segments."""
        return crop(self.band.res1, self.size)


class DRBN(nn.Module):
    """DRBN with optional SKF SE blocks in the 4th recurrence.

    Args:
        skf: build ``recur4.fuseblk_{1,2,3}`` (DRBN-SKF); ``False`` is the plain baseline.
        in_channels, g0, growth, n_layers: band-network sizes (official 3, 16, 8, 4).
        se_kwargs: overrides for the SE blocks (official: heads 2, GDFN γ 2.66, tanh GELU).
        channels_last: the memory layout inside (outputs are NCHW either way); ``None`` picks by device:
            channels-last on CPU, where the plain network runs ~35% faster (oneDNN's convolutions on these
            narrow maps need no reorders) and the SE blocks make no layout copies, NCHW (the official
            layout) on CUDA, where it measured slightly faster on an H100.

    Outputs are the full, half and quarter resolution images (ŷ₁, ŷ₂, ŷ₄) of recurrence 4, cropped to
    (H, W), (⌈H/2⌉, ⌈W/2⌉), (⌈H/4⌉, ⌈W/4⌉) — the shapes of ``y``, ``y[::2, ::2]``, ``y[::4, ::4]``.
    """

    stride = 4
    #: Which SKB outputs ``sem`` must hold, in order (fuseblk_1, fuseblk_2, fuseblk_3).
    sem_inputs = ("F1", "F0", "Z")

    def __init__(
        self,
        skf: bool = False,
        in_channels: int = 3,
        g0: int = 16,
        growth: int = 8,
        n_layers: int = 4,
        se_kwargs: dict | None = None,
        channels_last: bool | None = None,
        se_factory: SEFactory | None = None,
    ) -> None:
        super().__init__()
        band = {"in_channels": in_channels, "g0": g0, "growth": growth, "n_layers": n_layers}
        self.skf = skf
        self.channels_last = channels_last
        self.recur1 = DRBNBand(**band)
        self.recur2 = DRBNBand(**band)
        self.recur3 = DRBNBand(**band)
        self.recur4 = DRBNBand(**band, skf=skf, se_kwargs=se_kwargs, se_factory=se_factory)

    def forward_1(self, low: Tensor) -> DRBNState:
        """Recurrences 1–3. ``low``: B×3×H×W in [0, 1]; any H, W."""
        if low.dim() != 4:
            raise ValueError(f"DRBN expects a B×C×H×W tensor, got shape {tuple(low.shape)}")
        size = (low.shape[-2], low.shape[-1])
        x = working_layout(pad_to_multiple(low, self.stride), self.channels_last)
        out = self.recur1(torch.cat((x, x), dim=1))
        out = self.recur2(torch.cat((out.res1, x), dim=1), out)
        out = self.recur3(torch.cat((out.res1, x), dim=1), out)
        return DRBNState(x, out, size)

    def forward_2(self, state: DRBNState, sem: SemMaps | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Recurrence 4. ``sem`` = (F1, F0, Z) from the SKB run on ``state.image`` (SKF) or None."""
        sem = self._align(state, sem)
        out = self.recur4(torch.cat((state.band.res1, state.low), dim=1), state.band, sem)
        h, w = state.size
        return (
            crop(out.res1, (h, w)).contiguous(),
            crop(out.res2, scaled_size((h, w), 2)).contiguous(),
            crop(out.res4, scaled_size((h, w), 4)).contiguous(),
        )

    def forward(
        self, low: Tensor, sem: SemMaps | Callable[[Tensor], SemMaps] | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Full pass. ``sem`` is either the priors (F1, F0, Z) or a callable mapping the recurrence-3
        estimate (B×3×H×W) to them — DRBN-SKF segments its own intermediate output."""
        state = self.forward_1(low)
        priors = sem(state.image) if callable(sem) else sem
        return self.forward_2(state, priors)

    def _align(self, state: DRBNState, sem: SemMaps | None) -> list[Tensor] | None:
        if sem is None:
            if self.skf:
                raise ValueError(
                    "DRBN was built with skf=True (SKF) and needs sem=(F1, F0, Z) in forward_2; "
                    "build it with skf=False for the plain baseline"
                )
            return None
        if not self.skf:
            raise ValueError(
                "DRBN was built with skf=False and has no SE blocks; pass sem=None or build with skf=True"
            )
        if hasattr(sem, "logits"):  # the SKB's Priors object: its length is the batch size, not 3 maps
            raise TypeError(
                "DRBN takes sem=(F1, F0, Z) tensors, not a Priors object; map it with the family's "
                "sem_inputs(priors, size) (components.baselines)"
            )
        if len(sem) != 3:
            raise ValueError(f"DRBN expects sem=(F1, F0, Z), got {len(sem)} tensors")
        padded = state.low.shape[-2:]
        scales = (4, 2, 1)  # host scale of fuseblk_1, fuseblk_2, fuseblk_3
        return [
            fit_prior(s, scaled_size(state.size, k), (padded[0] // k, padded[1] // k))
            for s, k in zip(sem, scales, strict=True)
        ]
