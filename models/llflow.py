"""LLFlow (Wang et al., AAAI 2022) and LLFlow-SKF: a conditional normalising flow for low-light enhancement.

The network has two halves (docs/method.md §6.3):

* the **conditional encoder** (``RRDB``): the 6-channel input (log of the low-light image and its
  histogram-equalised copy, :func:`llflow_input`) plus its chromaticity and a gradient "noise map" go
  through an RRDB trunk at 1/2 resolution; it returns the conditioning features at 1/2, 1/4 and 1/8
  (``fea_up2``/``fea_up1``/``fea_up0``), the outputs of the stacked RRDB blocks, and the colour map μ
  (a full-resolution chromaticity estimate in (0, 1));
* the **flow** (``flowUpsamplerNet``): per level a squeeze, two unconditional steps (ActNorm + invertible
  1×1 convolution) and K conditional steps (+ an affine coupling conditioned on that level's feature). It
  maps an image (B×3×H×W) to a latent of B×192×H/8×W/8 and back exactly.

Training encodes the ground truth and scores the latent under N(squeeze(μ), I) (:func:`nll_bits`); the
released test decodes *from the colour map itself* (latent = squeeze2d(μ, 8), heat ignored), which is
:meth:`LLFlow.forward`. With ``skf=True`` SE blocks rewrite the three conditioning features with the SKB's
F0/F1/F2 (``att_block_1/2/3``, nearest-resized as released) before they condition the flow.

Module and parameter names mirror the released code (``RRDB.*``, ``flowUpsamplerNet.layers.#.*``,
``att_block_*``) so its checkpoints load strictly, including the parameters it never uses
(``flowUpsamplerNet.f``, ``RRDB.downconv3``, ``HRconv``, ``conv_last``, ``awb_para``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.se import SEFactory, SemanticEmbedding, SemanticEmbeddingBottleneck

__all__ = [
    "ActNorm",
    "ConditionEncoder",
    "ConditionalAffineCoupling",
    "FlowEncoding",
    "FlowStep",
    "FlowUpsamplerNet",
    "InvertibleConv1x1",
    "LLFlow",
    "LLFlowL",
    "equalize_histogram",
    "llflow_input",
    "nll_bits",
    "squeeze2d",
    "unsqueeze2d",
]

LATENT_FACTOR = 8  # three squeezes by 2: the latent lives at 1/8 resolution


# ---------------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------------
def equalize_histogram(image: Tensor) -> Tensor:
    """Per-channel histogram equalisation of B×C×H×W images in [0, 1], as ``cv2.equalizeHist`` on uint8.

    The darkest occupied level maps to 0, level ``v`` to round(255·(cdf(v) − cdf(first)) / (N − cdf(first)));
    a constant channel stays as it is. Vectorised (one scatter-add per call); memory O(B·C·256) beyond the
    image.
    """
    b, c, h, w = image.shape
    levels = (image.float().clamp(0, 1) * 255).round().long().flatten(2)  # B×C×HW
    hist = torch.zeros(b, c, 256, dtype=torch.float64, device=image.device)
    hist.scatter_add_(2, levels, torch.ones_like(levels, dtype=torch.float64))
    cdf = hist.cumsum(-1)
    occupied = hist > 0
    # the pixel count as the cdf's last entry (exact in float64), not float(h * w): a traced ONNX export
    # would record the count of the traced size as a constant
    total = cdf[..., -1:]
    first = torch.where(occupied, cdf, total + 1).amin(-1, keepdim=True)
    # cv2 computes the scale and the LUT in float32 and rounds half to even: the same arithmetic here, so
    # exact halves land on the same level (float64 would round some of them the other way)
    scale = torch.full_like(first, 255.0, dtype=torch.float32) / (total - first).clamp_min(1.0).float()
    lut = ((cdf - first).float() * scale).round().clamp(0, 255)
    constant = first >= total  # one occupied level: cv2 leaves the image as it is
    lut = torch.where(constant, torch.arange(256, device=image.device, dtype=lut.dtype), lut)
    out = lut.gather(2, levels) / 255.0
    return out.view(b, c, h, w).to(image.dtype if image.is_floating_point() else torch.float32)


def llflow_input(low: Tensor, histeq: Tensor | None = None) -> Tensor:
    """The released 6-channel input: log(clamp(x + 1e-3, 1e-3)) and the histogram-equalised image.

    ``histeq`` is passed when it was computed on a larger image than ``low`` (training equalises the full
    image before cropping, as released); otherwise it is computed here.
    """
    eq = equalize_histogram(low) if histeq is None else histeq.to(low.dtype)
    return torch.cat([torch.log(torch.clamp(low + 1e-3, min=1e-3)), eq], dim=1)


# ---------------------------------------------------------------------------------------------------
# Flow building blocks
# ---------------------------------------------------------------------------------------------------
def squeeze2d(x: Tensor, factor: int = 2) -> Tensor:
    """B×C×H×W -> B×(C·f²)×H/f×W/f, channel-major as released (channel c·f² + fy·f + fx)."""
    if factor == 1:
        return x
    b, c, h, w = x.shape
    if h % factor or w % factor:
        raise ValueError(f"squeeze2d needs H and W divisible by {factor}, got {h}x{w}; pad the input")
    x = x.view(b, c, h // factor, factor, w // factor, factor).permute(0, 1, 3, 5, 2, 4)
    return x.reshape(b, c * factor * factor, h // factor, w // factor)


def unsqueeze2d(x: Tensor, factor: int = 2) -> Tensor:
    """The inverse of :func:`squeeze2d`."""
    if factor == 1:
        return x
    b, c, h, w = x.shape
    x = x.view(b, c // (factor * factor), factor, factor, h, w).permute(0, 1, 4, 2, 5, 3)
    return x.reshape(b, c // (factor * factor), h * factor, w * factor)


def _pixels(x: Tensor) -> int:
    return int(x.shape[-2] * x.shape[-1])


class ActNorm(nn.Module):
    """Per-channel affine ``(x + bias)·exp(logs)``; initialised from the first training batch.

    As released, the data-dependent initialisation (zero mean, unit variance per channel) runs on the first
    forward pass in training mode unless ``bias`` is already non-zero (a loaded checkpoint).
    """

    def __init__(self, channels: int, scale: float = 1.0) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.logs = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.scale = float(scale)
        self.initialized = False

    def _initialize(self, x: Tensor) -> None:
        if self.initialized or not self.training:
            return
        if bool((self.bias != 0).any()):
            self.initialized = True
            return
        with torch.no_grad():
            bias = -x.float().mean(dim=(0, 2, 3), keepdim=True)
            var = (x.float() + bias).square().mean(dim=(0, 2, 3), keepdim=True)
            self.bias.copy_(bias)
            self.logs.copy_(torch.log(self.scale / (var.sqrt() + 1e-6)))
        self.initialized = True

    def forward(
        self, x: Tensor, logdet: Tensor | None = None, reverse: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        self._initialize(x)
        x = x * torch.exp(-self.logs) - self.bias if reverse else (x + self.bias) * torch.exp(self.logs)
        if logdet is not None:
            d = self.logs.sum() * _pixels(x)
            logdet = logdet - d if reverse else logdet + d
        return x, logdet


class InvertibleConv1x1(nn.Module):
    """Glow's invertible 1×1 convolution (full ``weight``, orthogonal init), log-det = H·W·log|det W|.

    The reverse pass needs W⁻¹ (computed in float64). Outside training it is computed once per weight
    version and kept, so inference and export see a constant instead of a matrix inversion in the graph;
    an in-place weight update (an EMA copy, a load) gives a new version and a fresh inverse.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.linalg.qr(torch.randn(channels, channels))[0])
        self._inverse: Tensor | None = None
        self._inverse_key: tuple[Any, ...] | None = None

    def _inverse_weight(self) -> Tensor:
        w = self.weight
        if self.training:
            return torch.linalg.inv(w.double()).to(w.dtype)
        key = (w.dtype, w.device, w._version, w.data_ptr())
        cached = self._inverse
        tracing = torch.jit.is_tracing() or torch.compiler.is_compiling()
        if cached is None or (not tracing and self._inverse_key != key):
            with torch.no_grad():  # outside training: once per weight (an in-place update makes a new key)
                cached = torch.linalg.inv(w.detach().double()).to(w.dtype)
            self._inverse, self._inverse_key = cached, key
        return cached

    def refresh(self) -> None:
        """Forget the cached inverse (the weights changed) and, outside training, compute it now."""
        self._inverse = None
        if not self.training:
            self._inverse_weight()

    def train(self, mode: bool = True) -> InvertibleConv1x1:
        super().train(mode)
        self.refresh()
        return self

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._inverse = None

    def forward(
        self, x: Tensor, logdet: Tensor | None = None, reverse: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        c = self.weight.shape[0]
        weight = self._inverse_weight() if reverse else self.weight
        z = F.conv2d(x, weight.view(c, c, 1, 1))
        if logdet is not None:
            d = torch.slogdet(self.weight.float() if self.weight.dtype == torch.float16 else self.weight)[1]
            d = d.to(logdet.dtype) * _pixels(x)
            logdet = logdet - d if reverse else logdet + d
        return z, logdet


class ActNormConv2d(nn.Conv2d):
    """Glow's conv: no bias, weights N(0, 0.05²), then an :class:`ActNorm` (``.actnorm``)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3) -> None:
        super().__init__(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False)
        nn.init.normal_(self.weight, 0.0, 0.05)
        self.actnorm = ActNorm(out_channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.actnorm(super().forward(x))[0]


class ZeroConv2d(nn.Conv2d):
    """Zero-initialised 3×3 conv with a learned per-channel output scale ``exp(3·logs)``."""

    def __init__(self, in_channels: int, out_channels: int, logscale_factor: float = 3.0) -> None:
        super().__init__(in_channels, out_channels, 3, padding=1)
        self.logs = nn.Parameter(torch.zeros(out_channels, 1, 1))
        self.logscale_factor = logscale_factor
        nn.init.zeros_(self.weight)
        nn.init.zeros_(self.bias)

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x) * torch.exp(self.logs * self.logscale_factor)


def _coupling_net(in_channels: int, out_channels: int, hidden: int) -> nn.Sequential:
    """conv3×3+ActNorm, ReLU, conv1×1+ActNorm, ReLU, zero conv (keys ``.0``, ``.2``, ``.4``)."""
    return nn.Sequential(
        ActNormConv2d(in_channels, hidden, 3),
        nn.ReLU(),
        ActNormConv2d(hidden, hidden, 1),
        nn.ReLU(),
        ZeroConv2d(hidden, out_channels),
    )


class ConditionalAffineCoupling(nn.Module):
    """``CondAffineSeparatedAndCond``: an affine map from the condition alone, then a coupling.

    ``fFeatures(cond)`` gives a shift and scale for all channels; then the second half of the channels is
    shifted and scaled by ``fAffine([first half, cond])``. Scales are ``sigmoid(s + 2) + eps`` (shift and
    scale interleaved in the net's output channels, as released).
    """

    def __init__(self, channels: int, cond_channels: int, hidden: int = 64, eps: float = 1e-4) -> None:
        super().__init__()
        self.channels = channels
        self.cond_channels = cond_channels
        self.half = channels // 2
        self.eps = eps
        self.fAffine = _coupling_net(self.half + cond_channels, 2 * (channels - self.half), hidden)
        self.fFeatures = _coupling_net(cond_channels, 2 * channels, hidden)

    def _scale_shift(self, net: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
        h = net(x)
        return torch.sigmoid(h[:, 1::2] + 2.0) + self.eps, h[:, 0::2]

    @staticmethod
    def _logdet(scale: Tensor) -> Tensor:
        return torch.log(scale).flatten(1).sum(1)

    def forward(
        self, z: Tensor, cond: Tensor, logdet: Tensor | None = None, reverse: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        if cond.shape[1] != self.cond_channels:
            raise ValueError(
                f"coupling expects a {self.cond_channels}-channel condition, got {cond.shape[1]}"
            )
        scale_ft, shift_ft = self._scale_shift(self.fFeatures, cond)
        if not reverse:
            z = (z + shift_ft) * scale_ft
            z1, z2 = z[:, : self.half], z[:, self.half :]
            scale, shift = self._scale_shift(self.fAffine, torch.cat([z1, cond], dim=1))
            z = torch.cat([z1, (z2 + shift) * scale], dim=1)
            if logdet is not None:
                logdet = logdet + self._logdet(scale_ft) + self._logdet(scale)
            return z, logdet
        z1, z2 = z[:, : self.half], z[:, self.half :]
        scale, shift = self._scale_shift(self.fAffine, torch.cat([z1, cond], dim=1))
        z = torch.cat([z1, z2 / scale - shift], dim=1)
        z = z / scale_ft - shift_ft
        if logdet is not None:
            logdet = logdet - self._logdet(scale) - self._logdet(scale_ft)
        return z, logdet


class FlowStep(nn.Module):
    """ActNorm, invertible 1×1 conv and (when conditioned) an affine coupling."""

    def __init__(self, channels: int, cond_channels: int | None = None, hidden: int = 64) -> None:
        super().__init__()
        self.actnorm = ActNorm(channels)
        self.invconv = InvertibleConv1x1(channels)
        self.conditioned = cond_channels is not None
        if cond_channels is not None:
            self.affine = ConditionalAffineCoupling(channels, cond_channels, hidden)

    def forward(
        self, z: Tensor, cond: Tensor | None, logdet: Tensor | None = None, reverse: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        if not reverse:
            z, logdet = self.actnorm(z, logdet)
            z, logdet = self.invconv(z, logdet)
            if self.conditioned:
                assert cond is not None
                z, logdet = self.affine(z, cond, logdet)
            return z, logdet
        if self.conditioned:
            assert cond is not None
            z, logdet = self.affine(z, cond, logdet, reverse=True)
        z, logdet = self.invconv(z, logdet, reverse=True)
        return self.actnorm(z, logdet, reverse=True)


class Squeeze(nn.Module):
    """Space-to-depth by 2 (no parameters)."""

    def forward(
        self, z: Tensor, cond: Tensor | None = None, logdet: Tensor | None = None, reverse: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        return (unsqueeze2d(z, 2) if reverse else squeeze2d(z, 2)), logdet


class FlowUpsamplerNet(nn.Module):
    """The flow: per level a squeeze, ``extra_steps`` unconditional steps and K conditional ones.

    ``layers`` are numbered as released (S: 0 squeeze, 1-2 plain, 3-6 coupled, 7 squeeze, ...). Level ``l``
    (1..L, at 1/2ˡ) is conditioned on ``conditions[l - 1]``. ``f`` is the released conv that is never called:
    kept so checkpoints load strictly.
    """

    def __init__(
        self,
        levels: int = 3,
        steps: int = 4,
        cond_channels: int = 64,
        hidden: int = 64,
        extra_steps: int = 2,
        unused_f_channels: int = 128,
    ) -> None:
        super().__init__()
        self.levels = levels
        self.layers = nn.ModuleList()
        self.level_of: list[int] = []
        channels = 3
        for level in range(1, levels + 1):
            channels *= 4
            blocks: list[nn.Module] = [Squeeze()]
            blocks += [FlowStep(channels) for _ in range(extra_steps)]
            blocks += [FlowStep(channels, cond_channels, hidden) for _ in range(steps)]
            self.layers.extend(blocks)
            self.level_of += [level] * len(blocks)
        self.latent_channels = channels
        self.f = nn.Sequential(nn.Conv2d(unused_f_channels, 2 * 3 * 64, 3, padding=1))

    def encode(self, x: Tensor, conditions: Sequence[Tensor], logdet: Tensor) -> tuple[Tensor, Tensor]:
        z: Tensor = x
        ld: Tensor | None = logdet
        for layer, level in zip(self.layers, self.level_of, strict=True):
            z, ld = layer(z, conditions[level - 1], ld)
        assert ld is not None
        return z, ld

    def decode(
        self, z: Tensor, conditions: Sequence[Tensor], logdet: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        for layer, level in zip(reversed(self.layers), reversed(self.level_of), strict=True):
            z, logdet = layer(z, conditions[level - 1], logdet, reverse=True)
        return z, logdet


# ---------------------------------------------------------------------------------------------------
# Conditional encoder
# ---------------------------------------------------------------------------------------------------
class ResidualDenseBlock(nn.Module):
    """Five densely connected 3×3 convs (growth ``gc``), output scaled by 0.2 and added to the input."""

    def __init__(self, nf: int = 64, gc: int = 32) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(nf, gc, 3, 1, 1)
        self.conv2 = nn.Conv2d(nf + gc, gc, 3, 1, 1)
        self.conv3 = nn.Conv2d(nf + 2 * gc, gc, 3, 1, 1)
        self.conv4 = nn.Conv2d(nf + 3 * gc, gc, 3, 1, 1)
        self.conv5 = nn.Conv2d(nf + 4 * gc, nf, 3, 1, 1)
        for conv in (self.conv1, self.conv2, self.conv3, self.conv4, self.conv5):
            nn.init.kaiming_normal_(conv.weight, a=0, mode="fan_in")
            conv.weight.data.mul_(0.1)
            nn.init.zeros_(conv.bias)

    def forward(self, x: Tensor) -> Tensor:
        feats = [x]
        for conv in (self.conv1, self.conv2, self.conv3, self.conv4):
            feats.append(F.leaky_relu(conv(torch.cat(feats, 1)), 0.2))
        return self.conv5(torch.cat(feats, 1)) * 0.2 + x


class RRDB(nn.Module):
    """Residual-in-residual dense block: three dense blocks, scaled residual."""

    def __init__(self, nf: int, gc: int = 32) -> None:
        super().__init__()
        self.RDB1 = ResidualDenseBlock(nf, gc)
        self.RDB2 = ResidualDenseBlock(nf, gc)
        self.RDB3 = ResidualDenseBlock(nf, gc)

    def forward(self, x: Tensor) -> Tensor:
        return self.RDB3(self.RDB2(self.RDB1(x))) * 0.2 + x


def _vertical_gradient(x: Tensor) -> Tensor:
    """0.5·(x[h+1] − x[h−1]) with zeros beyond the border (released ``gradient``)."""
    below = F.pad(x[:, :, 1:], (0, 0, 0, 1))
    above = F.pad(x[:, :, :-1], (0, 0, 1, 0))
    return 0.5 * (below - above)


class ConditionEncoder(nn.Module):
    """The released ``ConEncoder1``: features at 1/2, 1/4, 1/8, stacked RRDB outputs and the colour map."""

    def __init__(self, nf: int = 32, nb: int = 4, gc: int = 32, stack_blocks: Sequence[int] = (1,)) -> None:
        super().__init__()
        if any(not 0 <= b < nb for b in stack_blocks):
            raise ValueError(f"stack_blocks {list(stack_blocks)} must index the {nb} RRDB blocks")
        self.stack_blocks = tuple(int(b) for b in stack_blocks)
        in_channels = 6 + 3 + 3  # log + histeq input, chromaticity, noise map
        self.conv_first = nn.Conv2d(in_channels, nf, 3, 1, 1)
        self.conv_second = nn.Conv2d(nf, nf, 3, 1, 1)
        self.RRDB_trunk = nn.Sequential(*[RRDB(nf, gc) for _ in range(nb)])
        self.trunk_conv = nn.Conv2d(nf, nf, 3, 1, 1)
        self.downconv1 = nn.Conv2d(nf, nf, 3, 1, 1)
        self.downconv2 = nn.Conv2d(nf, nf, 3, 1, 1)
        self.downconv3 = nn.Conv2d(nf, nf, 3, 1, 1)  # released, never called
        self.HRconv = nn.Conv2d(nf, nf, 3, 1, 1)  # released, never called
        self.conv_last = nn.Conv2d(nf, 3, 3, 1, 1)  # released, never called
        self.awb_para = nn.Linear(nf, 3)  # released, never called
        self.fine_tune_color_map = nn.Sequential(nn.Conv2d(nf, 3, 1, 1), nn.Sigmoid())

    def forward(self, lq: Tensor) -> dict[str, Tensor]:
        raw = lq[:, :3].exp()
        chroma = raw / (raw.sum(dim=1, keepdim=True) + 1e-4)
        dy = _vertical_gradient(chroma)
        dx = _vertical_gradient(chroma.transpose(2, 3)).transpose(2, 3)
        noise = torch.maximum(dy.abs(), dx.abs())
        fea = self.conv_second(F.leaky_relu(self.conv_first(torch.cat([lq, chroma, noise], 1)), 0.2))
        head = F.max_pool2d(fea, 2)
        out: dict[str, Tensor] = {}
        fea = head
        for idx, block in enumerate(self.RRDB_trunk):
            fea = block(fea)
            if idx in self.stack_blocks:
                out[f"block_{idx}"] = fea
        down2 = head + self.trunk_conv(fea)
        half = dict(scale_factor=0.5, mode="bilinear", align_corners=False, recompute_scale_factor=True)
        down4 = self.downconv1(F.interpolate(down2, **half))
        down8 = self.downconv2(F.interpolate(F.leaky_relu(down4, 0.2), **half))
        out.update(
            fea_up2=down2,
            fea_up1=down4,
            fea_up0=down8,
            color_map=self.fine_tune_color_map(F.interpolate(down2, scale_factor=2.0, mode="nearest")),
        )
        return out


# ---------------------------------------------------------------------------------------------------
# The network
# ---------------------------------------------------------------------------------------------------
def nll_bits(z: Tensor, mean: Tensor, logdet: Tensor) -> Tensor:
    """Per-sample negative log-likelihood in bits per pixel, as released.

    ``z`` and ``mean`` are B×3×H×W (the latent unsqueezed, the colour map or GT chromaticity); unit variance,
    ``−½ log 2π`` per element, divided by ln 2 · H · W (pixels, not sub-pixels).
    """
    log_p = (-0.5 * ((z - mean).square() + math.log(2 * math.pi))).flatten(1).sum(1)
    return -(logdet + log_p) / (math.log(2.0) * _pixels(z))


class FlowEncoding(NamedTuple):
    """The training direction's output: the GT's latent as a B×3×H×W map (unsqueeze2d by 8), the colour
    map μ, the flow's log-determinant per sample, and (set by the loss's caller) the Gaussian mean used."""

    z: Tensor
    color_map: Tensor
    logdet: Tensor
    mean: Tensor | None = None


class LLFlow(nn.Module):
    """LLFlow (released ``LLFlow`` / ``LLFlow_noattblk``); default sizes are LLFlow-S.

    Args:
        skf: build the SE blocks ``att_block_{1,2,3}`` on the conditioning features at 1/8, 1/4, 1/2.
        nf, nb, gc: encoder width, RRDB blocks and growth (S: 32, 4, 32; L: 64, 24, 32).
        flow_steps, levels: K conditional steps per level and L levels (S: 4, 3; L: 12, 3).
        stack_blocks: RRDB blocks whose outputs are concatenated to every conditioning feature
            (S: (1,); L: (1, 3, 5, 7)).
        hidden: width of the coupling networks (64).
        sem_channels: the SKB's F0/F1/F2 widths (48, 96, 192) feeding att_block_1/2/3.
        se_factory: ``(sem_channels, channels) -> module`` for each SE block (default: the released
            variant for the size: GDFN γ 2.66 for S, the 192-wide bottleneck for L).
        heat: test-time sampling temperature: 0 decodes the colour map itself (as released, where the
            configured heat has no effect); > 0 decodes squeeze(μ) + heat·ε, a sample per call.
    """

    #: Which SKB outputs ``sem`` must hold, in order (att_block_1, att_block_2, att_block_3).
    sem_inputs = ("F0", "F1", "F2")
    #: Inputs are padded to a multiple of this (the flow squeezes three times).
    stride = LATENT_FACTOR

    def __init__(
        self,
        skf: bool = False,
        nf: int = 32,
        nb: int = 4,
        gc: int = 32,
        flow_steps: int = 4,
        levels: int = 3,
        stack_blocks: Sequence[int] = (1,),
        hidden: int = 64,
        sem_channels: Sequence[int] = (48, 96, 192),
        se_factory: SEFactory | None = None,
        heat: float = 0.0,
    ) -> None:
        super().__init__()
        if heat < 0:
            raise ValueError(f"heat must be >= 0, got {heat}")
        self.heat = float(heat)
        if levels != 3:
            raise ValueError(f"LLFlow conditions exactly 3 levels (1/2, 1/4, 1/8), got levels={levels}")
        stack = tuple(int(b) for b in stack_blocks)
        self.skf = skf
        self.cond_channels = nf * (1 + len(stack))
        self.RRDB = ConditionEncoder(nf, nb, gc, stack)
        if skf:
            build = se_factory or self._released_se
            c0, c1, c2 = sem_channels
            self.att_block_1 = build(c0, self.cond_channels)  # F0 -> fea_up0 at 1/8
            self.att_block_2 = build(c1, self.cond_channels)  # F1 -> fea_up1 at 1/4
            self.att_block_3 = build(c2, self.cond_channels)  # F2 -> fea_up2 at 1/2
        self.flowUpsamplerNet = FlowUpsamplerNet(
            levels, flow_steps, self.cond_channels, hidden, unused_f_channels=64 * (1 + len(stack))
        )

    def _released_se(self, sem_channels: int, channels: int) -> nn.Module:
        return SemanticEmbedding(sem_channels, channels, heads=2, ffn="gdfn", ffn_factor=2.66)

    # conditioning --------------------------------------------------------------------------------
    def conditions(self, lq: Tensor, sem: Sequence[Tensor] | None = None) -> dict[str, Tensor]:
        """Encoder features with the stacked RRDB outputs concatenated and (SKF) the SE blocks applied."""
        if lq.shape[1] != 6:
            raise ValueError(
                f"LLFlow takes the 6-channel input of llflow_input(), got {lq.shape[1]} channels"
            )
        h, w = lq.shape[-2:]
        if h % self.stride or w % self.stride:
            raise ValueError(f"LLFlow needs H and W divisible by {self.stride}, got {h}x{w}; pad the input")
        enc = self.RRDB(lq)
        stacked = torch.cat([enc[f"block_{b}"] for b in self.RRDB.stack_blocks], dim=1)
        conds = {"color_map": enc["color_map"]}
        for name in ("fea_up0", "fea_up1", "fea_up2"):
            feat = enc[name]
            conds[name] = torch.cat([feat, F.interpolate(stacked, size=feat.shape[-2:], mode="nearest")], 1)
        if self.skf:
            if sem is None or len(sem) != 3:
                raise ValueError(
                    "LLFlow-SKF needs sem=(F0, F1, F2) from the SKB; pass skf=False for the plain model"
                )
            conds["fea_up0"] = self.att_block_1(conds["fea_up0"], sem[0])
            conds["fea_up1"] = self.att_block_2(conds["fea_up1"], sem[1])
            conds["fea_up2"] = self.att_block_3(conds["fea_up2"], sem[2])
        return conds

    @staticmethod
    def _levels(conds: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        return conds["fea_up2"], conds["fea_up1"], conds["fea_up0"]

    # both directions -----------------------------------------------------------------------------
    def encode(self, gt: Tensor, conds: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """GT image -> (latent B×192×H/8×W/8, log-det of the flow per sample)."""
        logdet = gt.new_zeros(gt.shape[0])
        return self.flowUpsamplerNet.encode(gt, self._levels(conds), logdet)

    def decode(self, latent: Tensor, conds: dict[str, Tensor]) -> Tensor:
        """Latent -> image (the exact inverse of :meth:`encode` for the same conditions)."""
        return self.flowUpsamplerNet.decode(latent, self._levels(conds))[0]

    def mean_latent(self, conds: dict[str, Tensor]) -> Tensor:
        """The latent the released test decodes: squeeze2d(colour map, 8)."""
        return squeeze2d(conds["color_map"], LATENT_FACTOR)

    def forward(
        self,
        low: Tensor,
        sem: Sequence[Tensor] | None = None,
        *,
        histeq: Tensor | None = None,
        gt: Tensor | None = None,
        heat: float | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor | FlowEncoding:
        """Enhance ``low`` (B×3×H×W in [0, 1], H and W multiples of 8); with ``gt``, encode the GT instead.

        The 6-channel input is built here (:func:`llflow_input`); ``histeq`` overrides its equalised half
        (training equalises the whole image before cropping). Enhancing decodes from the colour map, or
        from μ + heat·ε. One entry point for both directions, so a DDP-wrapped network trains through it.
        """
        if hasattr(sem, "logits"):  # the SKB's Priors object: its length is the batch size, not 3 maps
            raise TypeError(
                "LLFlow takes sem=(F0, F1, F2) tensors, not a Priors object; map it with the family's "
                "sem_inputs(priors, size) (components.baselines)"
            )
        if low.shape[1] != 3:
            raise ValueError(f"LLFlow enhances RGB images (B×3×H×W in [0, 1]), got {low.shape[1]} channels")
        conds = self.conditions(llflow_input(low, histeq), sem)
        if gt is not None:
            latent, logdet = self.encode(gt, conds)
            return FlowEncoding(unsqueeze2d(latent, LATENT_FACTOR), conds["color_map"], logdet)
        latent = self.mean_latent(conds)
        heat = self.heat if heat is None else heat
        if heat:
            noise = torch.randn(latent.shape, generator=generator, device=latent.device, dtype=latent.dtype)
            latent = latent + heat * noise
        return self.decode(latent, conds)


class LLFlowL(LLFlow):
    """LLFlow-L (released ``LLFlow_pc_small``; plain: ``LLFlow_noattblk`` with the L sizes).

    nf 64, 24 RRDB blocks, K 12, stacked blocks (1, 3, 5, 7), so the conditioning features have 320
    channels; its SE blocks run at an inner width of 192 (``TransformerBlock_1``).
    """

    def __init__(
        self,
        skf: bool = False,
        nf: int = 64,
        nb: int = 24,
        gc: int = 32,
        flow_steps: int = 12,
        levels: int = 3,
        stack_blocks: Sequence[int] = (1, 3, 5, 7),
        hidden: int = 64,
        sem_channels: Sequence[int] = (48, 96, 192),
        se_factory: SEFactory | None = None,
        heat: float = 0.0,
    ) -> None:
        super().__init__(
            skf, nf, nb, gc, flow_steps, levels, stack_blocks, hidden, sem_channels, se_factory, heat
        )

    def _released_se(self, sem_channels: int, channels: int) -> nn.Module:
        return SemanticEmbeddingBottleneck(sem_channels, channels, inner=192, heads=2, ffn_factor=1.0)
