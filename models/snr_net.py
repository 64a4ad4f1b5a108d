"""SNR-Aware low-light enhancement network (Xu et al., CVPR 2022) with SKF's SE blocks (docs/method.md §6).

Encoder: three convs (1/1, 1/2, 1/4) → residual blocks at 1/4. Two branches at 1/4 are blended by the SNR
mask: a local residual-CNN branch (``recon_trunk_light``) where the signal-to-noise ratio is high, and a
long-range transformer branch (``transformer``: 4×4 patches of the 64-ch map as 1024-d tokens, 6 pre-norm
layers, attention restricted to high-SNR patches) where it is low. Decoder: ``recon_trunk`` → two
PixelShuffle ×2 stages with encoder skips → ``conv_last`` + the input. With ``skf=True`` SKF inserts SE
blocks before each skip concat: ``att_block_3`` (F2, 192 ch) at 1/4, ``att_block_2`` (F1, 96 ch) at 1/2,
``att_block_1`` (F0, 48 ch) at 1/1, all with the dual-gated FFN.

State-dict keys follow the released SNR-SKF checkpoints (``SNR_SKF_LOL.pth``; strip ``module.``), read from
``SNR_SKF/models/archs/low_light_transformer_seg.py`` and ``transformer/{Layers,SubLayers}.py``:
``conv_first_{1,2,3}``, ``feature_extraction.0.conv{1,2}``, ``recon_trunk.0.*``, ``recon_trunk_light.{0..5}.*``,
``transformer.layer_stack.{0..5}.slf_attn.{w_qs,w_ks,w_vs,fc}.weight``, ``...slf_attn.layer_norm.*``,
``...pos_ffn.{w_1,w_2,layer_norm}.*``, ``upconv1``, ``upconv2``, ``HRconv``, ``conv_last``,
``att_block_{1,2,3}.*``. Unverified: the residual-block names ``conv1``/``conv2`` come from EDVR's
``arch_util.ResidualBlock_noBN`` (``arch_util.py`` is missing from the SKF snapshot; the same group's
SDSD repository was read instead); the binary checkpoints themselves were not available offline.

Differences from the official code:
* inputs are reflect-padded bottom/right to a multiple of 16 and the output is cropped back (official
  ``test()`` does not pad, so for W=600 the 4×4 fold leaves the last feature columns zero, docs/method.md §10.2, and
  sizes that are not multiples of 4 crash); the SNR mask is computed before padding and padded the same
  way, as in the official ``test4()``; semantic priors are aligned with :func:`models.padding.fit_prior`;
* the unused coordinate grid (``xs``) and the ``.cuda()`` call in the forward pass are dropped;
* ``mask=None`` computes the SNR mask from the input with :func:`snr_mask` (official: precomputed by the
  data pipeline from a cv2 5×5 box blur with the same reflect-101 border);
* a model built with ``skf=True`` requires ``sem``; the plain baseline has no ``att_block_*`` at all.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.padding import crop, exporting, pad_to_multiple, working_layout
from models.se import SEFactory, SemanticEmbedding
from models.semantics import align_priors, checked_sem

__all__ = ["LUMA_WEIGHTS", "PatchTransformer", "ResidualBlockNoBN", "SNRNet", "box_blur", "snr_mask"]

LUMA_WEIGHTS = (0.299, 0.587, 0.114)


def box_blur(x: Tensor, size: int = 5) -> Tensor:
    """Mean filter with a reflect-101 border (``cv2.blur``'s default), per channel."""
    pad = size // 2
    return F.avg_pool2d(F.pad(x, (pad, pad, pad, pad), mode="reflect"), size, stride=1)


def snr_mask(low: Tensor, blurred: Tensor | None = None, eps: float = 1e-4) -> Tensor:
    """SNR map in [0, 1] (B×1×H×W) of a low-light RGB image in [0, 1] (docs/method.md §6).

    With luma L of ``low`` and L̄ of its 5×5 box blur: m = L̄ / (|L − L̄| + eps), divided by its per-image
    maximum (+ eps) and clamped to [0, 1]. High values mark smooth, well-exposed (high-SNR) regions.
    """
    if low.dim() != 4 or low.shape[1] != 3:
        raise ValueError(f"snr_mask expects B×3×H×W RGB, got shape {tuple(low.shape)}")
    blurred = box_blur(low) if blurred is None else blurred
    weights = low.new_tensor(LUMA_WEIGHTS).view(1, 3, 1, 1)
    luma = (low * weights).sum(dim=1, keepdim=True)
    luma_blur = (blurred * weights).sum(dim=1, keepdim=True)
    mask = luma_blur / ((luma - luma_blur).abs() + eps)
    peak = mask.flatten(1).amax(dim=1).view(-1, 1, 1, 1)
    return (mask / (peak + eps)).clamp(0.0, 1.0)


class ResidualBlockNoBN(nn.Module):
    """conv-ReLU-conv with identity skip (EDVR); convs initialised Kaiming×0.1 as in the original."""

    def __init__(self, nf: int = 64) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(nf, nf, 3, padding=1)
        self.conv2 = nn.Conv2d(nf, nf, 3, padding=1)
        for conv in (self.conv1, self.conv2):
            nn.init.kaiming_normal_(conv.weight, a=0, mode="fan_in")
            conv.weight.data.mul_(0.1)
            nn.init.zeros_(conv.bias)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv2(F.relu(self.conv1(x)))


def _blocks(nf: int, n: int) -> nn.Sequential:
    return nn.Sequential(*(ResidualBlockNoBN(nf) for _ in range(n)))


class MultiHeadSelfAttention(nn.Module):
    """Pre-norm multi-head self-attention with a key mask (official ``MultiHeadAttention4``).

    Masked keys get a logit of exactly −1e9 (``masked_fill``, not an additive bias), so a query whose keys
    are all masked attends uniformly, as released.
    """

    def __init__(self, d_model: int, heads: int = 8, d_k: int = 64, d_v: int = 64) -> None:
        super().__init__()
        self.heads, self.d_k, self.d_v = heads, d_k, d_v
        self.w_qs = nn.Linear(d_model, heads * d_k, bias=False)
        self.w_ks = nn.Linear(d_model, heads * d_k, bias=False)
        self.w_vs = nn.Linear(d_model, heads * d_v, bias=False)
        self.fc = nn.Linear(heads * d_v, d_model, bias=False)
        self.layer_norm = nn.LayerNorm(d_model, eps=1e-6)

    def forward(self, x: Tensor, keep: Tensor | None = None) -> Tensor:
        """``x``: B×L×d tokens; ``keep``: B×L bool, the keys that may be attended to."""
        b, n, _ = x.shape
        y = self.layer_norm(x)
        q = self.w_qs(y).view(b, n, self.heads, self.d_k).transpose(1, 2)
        k = self.w_ks(y).view(b, n, self.heads, self.d_k).transpose(1, 2)
        v = self.w_vs(y).view(b, n, self.heads, self.d_v).transpose(1, 2)
        logits = (q / self.d_k**0.5) @ k.transpose(-2, -1)
        if keep is not None:
            # -1e9 as released; clamp to the dtype's range so fp16 autocast does not overflow to -inf
            fill = max(-1e9, torch.finfo(logits.dtype).min)
            logits = logits.masked_fill(~keep[:, None, None, :], fill)
        out = (logits.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, self.heads * self.d_v)
        return x + self.fc(out)


class PositionwiseFeedForward(nn.Module):
    """Pre-norm two-layer ReLU MLP with residual (official ``PositionwiseFeedForward4``)."""

    def __init__(self, d_model: int, d_inner: int) -> None:
        super().__init__()
        self.w_1 = nn.Linear(d_model, d_inner)
        self.w_2 = nn.Linear(d_inner, d_model)
        self.layer_norm = nn.LayerNorm(d_model, eps=1e-6)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.w_2(F.relu(self.w_1(self.layer_norm(x))))


class EncoderLayer(nn.Module):
    def __init__(self, d_model: int, d_inner: int, heads: int, d_k: int, d_v: int) -> None:
        super().__init__()
        self.slf_attn = MultiHeadSelfAttention(d_model, heads, d_k, d_v)
        self.pos_ffn = PositionwiseFeedForward(d_model, d_inner)

    def forward(self, x: Tensor, keep: Tensor | None = None) -> Tensor:
        return self.pos_ffn(self.slf_attn(x, keep))


class PatchTransformer(nn.Module):
    """Official ``Encoder_patch66``: a stack of encoder layers on patch tokens (no positional encoding)."""

    def __init__(
        self,
        d_model: int = 1024,
        d_inner: int = 2048,
        n_layers: int = 6,
        heads: int = 8,
        d_k: int = 64,
        d_v: int = 64,
    ) -> None:
        super().__init__()
        self.layer_stack = nn.ModuleList(
            EncoderLayer(d_model, d_inner, heads, d_k, d_v) for _ in range(n_layers)
        )

    def forward(self, tokens: Tensor, keep: Tensor | None = None) -> Tensor:
        for layer in self.layer_stack:
            tokens = layer(tokens, keep)
        return tokens


class SNRNet(nn.Module):
    """SNR-aware network (official ``low_light_transformer_seg`` with ``HR_in=True``).

    Args:
        skf: build the SE blocks ``att_block_{1,2,3}`` (SNR-SKF); ``False`` is the plain baseline.
        nf: feature width (official 64; the decoder's 64-ch layers follow ``nf``).
        front_blocks, back_blocks, light_blocks: residual blocks in ``feature_extraction``,
            ``recon_trunk`` and ``recon_trunk_light`` (official 1, 1, 6).
        n_layers, heads, d_inner: transformer size (official 6, 8, 2048; tokens are nf·16-d).
        mask_threshold: a 4×4 patch whose mean SNR is ≤ this is not attended to (official 0.5).
        se_kwargs: overrides for the SE blocks (official: heads 2, dual-gated FFN, factor 2.66).
        se_factory: ``(sem_channels, channels) -> module`` building each SE block instead (any SE variant
            whose shapes fit); ``se_kwargs`` is then unused.
        channels_last: the memory layout inside (the output is NCHW either way); ``None`` picks by device:
            channels-last on CPU, where the SE blocks then make no layout copies (their per-pixel
            LayerNorms want channels-last), NCHW (the official layout) on CUDA. The plain network
            measured within noise of itself in either layout, on this CPU and on an H100.
    """

    stride = 16  # two stride-2 convs, then 4×4 patches
    patch = 4
    #: Which SKB outputs ``sem`` must hold, in order (att_block_1, att_block_2, att_block_3).
    sem_inputs = ("F0", "F1", "F2")

    def __init__(
        self,
        skf: bool = False,
        nf: int = 64,
        front_blocks: int = 1,
        back_blocks: int = 1,
        light_blocks: int = 6,
        n_layers: int = 6,
        heads: int = 8,
        d_inner: int = 2048,
        mask_threshold: float = 0.5,
        se_kwargs: dict | None = None,
        channels_last: bool | None = None,
        se_factory: SEFactory | None = None,
    ) -> None:
        super().__init__()
        self.skf = skf
        self.channels_last = channels_last
        self.mask_threshold = mask_threshold
        self.conv_first_1 = nn.Conv2d(3, nf, 3, 1, 1)
        self.conv_first_2 = nn.Conv2d(nf, nf, 3, 2, 1)
        self.conv_first_3 = nn.Conv2d(nf, nf, 3, 2, 1)
        self.feature_extraction = _blocks(nf, front_blocks)
        self.recon_trunk = _blocks(nf, back_blocks)
        self.recon_trunk_light = _blocks(nf, light_blocks)
        d_model = nf * self.patch * self.patch
        self.transformer = PatchTransformer(d_model, d_inner, n_layers, heads)
        self.upconv1 = nn.Conv2d(nf * 2, nf * 4, 3, 1, 1)
        self.upconv2 = nn.Conv2d(nf * 2, nf * 4, 3, 1, 1)
        self.pixel_shuffle = nn.PixelShuffle(2)
        self.HRconv = nn.Conv2d(nf * 2, nf, 3, 1, 1)
        self.conv_last = nn.Conv2d(nf, 3, 3, 1, 1)
        if skf:
            se = {"heads": 2, "ffn": "dual-gated", "ffn_factor": 2.66, **(se_kwargs or {})}
            build = se_factory or partial(SemanticEmbedding, **se)
            self.att_block_1 = build(48, nf)  # F0 -> host at 1/1
            self.att_block_2 = build(96, nf)  # F1 -> host at 1/2
            self.att_block_3 = build(192, nf)  # F2 -> host at 1/4

    @staticmethod
    def _lrelu(x: Tensor) -> Tensor:
        return F.leaky_relu(x, 0.1)

    def forward(self, low: Tensor, mask: Tensor | None = None, sem: Sequence[Tensor] | None = None) -> Tensor:
        """``low``: B×3×H×W in [0, 1], any H, W; ``mask``: B×1×H×W SNR map (default ``snr_mask(low)``);
        ``sem``: (F0, F1, F2) from the SKB (required iff built with ``skf=True``). Returns B×3×H×W."""
        if low.dim() != 4 or low.shape[1] != 3:
            raise ValueError(f"SNRNet expects B×3×H×W RGB, got shape {tuple(low.shape)}")
        size = (low.shape[-2], low.shape[-1])
        if mask is None:
            mask = snr_mask(low)
        elif mask.shape[0] != low.shape[0] or mask.shape[1] != 1 or mask.shape[-2:] != low.shape[-2:]:
            raise ValueError(
                f"mask must be B×1×H×W like the input, got {tuple(mask.shape)} for {tuple(low.shape)}"
            )
        x = working_layout(pad_to_multiple(low, self.stride), self.channels_last)
        mask = pad_to_multiple(mask, self.stride)
        priors = self._align(size, x.shape[-2:], sem)

        fea_1 = self._lrelu(self.conv_first_1(x))
        fea_2 = self._lrelu(self.conv_first_2(fea_1))
        fea_3 = self._lrelu(self.conv_first_3(fea_2))
        fea = self.feature_extraction(fea_3)
        fea_light = self.recon_trunk_light(fea)

        mask = F.interpolate(mask, size=fea.shape[-2:], mode="nearest")
        # F.fold returns NCHW: back to the working layout, or the whole decoder (and the SE blocks' inputs)
        # would run in NCHW and pay layout copies
        fea = working_layout(self._long_range(fea, mask) * (1 - mask) + fea_light * mask, self.channels_last)

        out = self.recon_trunk(fea)
        if priors is not None:
            out = self.att_block_3(out, priors[2])
        out = self._lrelu(self.pixel_shuffle(self.upconv1(torch.cat((out, fea_3), dim=1))))
        if priors is not None:
            out = self.att_block_2(out, priors[1])
        out = self._lrelu(self.pixel_shuffle(self.upconv2(torch.cat((out, fea_2), dim=1))))
        if priors is not None:
            out = self.att_block_1(out, priors[0])
        out = self._lrelu(self.HRconv(torch.cat((out, fea_1), dim=1)))
        out = self.conv_last(out) + x
        return crop(out, size).contiguous()

    def _long_range(self, fea: Tensor, mask: Tensor) -> Tensor:
        """Transformer branch: 4×4 patches → tokens (attending only to high-SNR patches) → fold back."""
        p = self.patch
        if exporting():  # the same patches as reshapes: ONNX export cannot translate fold with a traced size
            return self._long_range_reshaped(fea, mask)
        tokens = F.unfold(fea, kernel_size=p, stride=p).transpose(1, 2)  # B×L×(C·p·p)
        keep = F.unfold(mask, kernel_size=p, stride=p).mean(dim=1) > self.mask_threshold  # B×L
        tokens = self.transformer(tokens, keep)
        return F.fold(tokens.transpose(1, 2), output_size=fea.shape[-2:], kernel_size=p, stride=p)

    def _long_range_reshaped(self, fea: Tensor, mask: Tensor) -> Tensor:
        """:meth:`_long_range` with the non-overlapping p×p unfold/fold written as view/permute/reshape (the
        same values in the same order, H and W being multiples of p after padding), for ONNX export."""
        p = self.patch

        def unfold(t: Tensor) -> Tensor:  # B×C×H×W -> B×(C·p·p)×L, F.unfold's channel and patch order
            b, c, h, w = t.shape
            t = t.reshape(b, c, h // p, p, w // p, p).permute(0, 1, 3, 5, 2, 4)
            return t.reshape(b, c * p * p, (h // p) * (w // p))

        tokens = unfold(fea).transpose(1, 2)
        keep = unfold(mask).mean(dim=1) > self.mask_threshold
        tokens = self.transformer(tokens, keep)
        b, c, h, w = fea.shape
        out = tokens.transpose(1, 2).reshape(b, c, p, p, h // p, w // p).permute(0, 1, 4, 2, 5, 3)
        return out.reshape(b, c, h, w)

    def _align(
        self, size: tuple[int, int], padded: Sequence[int], sem: Sequence[Tensor] | None
    ) -> list[Tensor] | None:
        """The priors fitted to their hosts on the padded image (:func:`models.semantics.align_priors`)."""
        checked = checked_sem("SNRNet", self.skf, sem)
        return None if checked is None else align_priors(checked, size, padded, (1, 2, 4))
