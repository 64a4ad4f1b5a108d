"""HWMNet (Fan, Liu & Liu, ICIP 2022, "Half Wavelet Attention on M-Net+ for Low-Light Image Enhancement"),
with SKF's SE blocks in its decoder.

Architecture (``depth`` = 4, width ``wf``; the released LOL model has ``wf`` = 96, 66,564,649 parameters):

* **M-Net+ encoder.** ``conv_01`` (3×3, 3 → wf) embeds the image. Level ``i`` = 0..3 runs a
  :class:`ConvBlock` (one half wavelet attention block on its input width, then a 1×1 ``tail`` to
  2^i·wf); levels 0-2 keep the tail output as the skip and halve it with a :class:`UnshuffleDown`
  (PixelUnshuffle ×2, 1×1 conv). Before levels 1-3 the *image* is bilinearly halved again and embedded by
  the same ``conv_01``; that "left bar" is concatenated to the incoming feature (the M-Net pyramid input),
  so level ``i`` sees (2^(i-1) + 1)·wf channels. The bottleneck (level 3) is at 1/8.
* **Decoder.** Three :class:`UpBlock` stages (1/4, 1/2, 1/1): PixelShuffle ×2 with a 1×1 conv, concat with
  the encoder skip after a 3×3 ``skip_conv``, then a :class:`ConvBlock` without downsampling.
* **Multi-scale output.** The bottleneck (``bottom_conv``, 3×3 to wf, bilinear ×8) and each decoder stage
  (``conv_up``: bilinear to full size, 3×3 to wf) give four full-resolution wf-channel maps, fused by
  selective kernel feature fusion (:class:`SelectiveFusion`, ``final_ff``); ``last`` (3×3 to 3 channels)
  plus the input is the output. One output image: no supervised attention module, no auxiliary outputs.
* **Half wavelet attention block** (:class:`HalfWaveletBlock`): half of the channels go through a one-level
  Haar DWT (4× the channels at half resolution), conv-PReLU-conv, parallel spatial and channel attention
  fused by a 1×1 conv with a residual, and the inverse DWT; the other half passes untouched. Both halves
  are merged by a 3×3 conv + PReLU plus a 1×1 projection of the block input. Biases are off inside the
  block, as released.

SKF (``skf=True``): HWMNet's decoder has features at 1/4, 1/2 and 1/1, exactly the three scales SKF uses.
An SE block refines each decoder stage right after its :class:`ConvBlock`, before the stage feeds both the
next stage and its ``conv_up`` branch of the fusion: ``att_block_3`` on ``up_path.0`` (1/4, 4·wf ch, F2 192
ch from 1/16), ``att_block_2`` on ``up_path.1`` (1/2, 2·wf, F1 96 ch from 1/8), ``att_block_1`` on
``up_path.2`` (1/1, wf, F0 48 ch from 1/4): every prior is upsampled ×4. The bottleneck (an encoder
feature) gets none. The SE blocks are pure additions: a plain checkpoint leaves exactly ``att_block_*``
missing.

State-dict keys and shapes equal those of ``HWMNet(in_chn=3, wf=96, depth=4)`` in the official code
(``github.com/FanChiMao/HWMNet``, ``model/HWMNet.py`` and ``WT/transform.py``; listed in
``tests/data/hwmnet_keys``), so the released ``model_bestPSNR.pth`` loads strictly once its top-level
``state_dict`` is taken and DataParallel's ``module.`` stripped. As released, each half wavelet block uses
*one* PReLU twice (inside ``body`` and as ``activate``): the state dict lists both ``body.1.weight`` and
``activate.weight`` (one tensor under two names), so it has 7 more entries' worth of elements (66,564,656)
than there are parameters.

Differences from the official code (all numerically neutral unless stated):

* ``wf`` defaults to 96, the width of both released checkpoints and of every official entry point
  (``train.py``, ``demo.py``); the official class default is 64 (29.6 M parameters), which no released
  weight fits;
* :meth:`HWMNet.forward` reflect-pads the bottom/right to a multiple of :attr:`HWMNet.stride` (16: three
  ×2 downsamplings and the DWT inside the bottleneck block) and crops back, as the official ``demo.py``
  does (``mul = 16``, ``F.pad(..., 'reflect')``); for an image too small to reflect (pad ≥ size) we
  replicate where the original would raise (:func:`models.padding.pad_to_multiple`). Unlike ``demo.py`` the
  output is not clamped to [0, 1] (the network itself does not clamp; the demo clamps before saving);
* the inverse DWT is built with ``pixel_shuffle`` in the input's dtype and device (the original allocates a
  float32 CUDA buffer and assigns the four phases into it), and the ×1 "upsampling" of the last
  ``conv_up`` branch is an identity (bilinear resizing by exactly 1 is one);
* the priors are aligned with :func:`models.padding.fit_prior`, as in the other networks here.

Original training settings (for the recipes; ``train.py``, ``training.yaml``, ``transform/dataset_RGB.py``,
``generate_patches.py``, ``README.md``):

* **data**: LOL, 485 training pairs; the README's LOL setting cuts them offline into 4,850 random 256×256
  patches (``generate_patches.py``, 10 per image) and validates on the 15 ``eval15`` pairs;
* **crop**: ``TRAIN_PS`` 256, a random crop per sample (reflect-padded first if an image is smaller, a no-op
  on pre-cut 256² patches); validation on the *centre* 256×256 crop (``VAL_PS`` 256), PSNR every epoch;
* **augmentation**: one of nine equally likely choices per sample (``random.randint(0, 8)``): identity
  (0 and 8, so 2/9), vertical flip, horizontal flip, rot90, rot180, rot270, rot90 of the vertical flip,
  rot90 of the horizontal flip (the eight dihedral transforms, identity twice as likely);
* **batch**: 2 (``OPTIM.BATCH``; with ``GPU: [0,1,2,3]`` DataParallel splits it, so batch 2 in total),
  shuffled, ``drop_last=False``;
* **loss**: Charbonnier only, mean of √((ŷ − y)² + ε²) with ε = 1e-3 (the registered ``charbonnier`` with eps 1e-6 = ε², ``reduction="mean"``);
  no edge, perceptual or SSIM term;
* **optimiser**: Adam, betas (0.9, 0.999), eps 1e-8, no weight decay, no gradient clipping, fp32;
* **schedule**, stepped per epoch: linear warm-up over 3 epochs (``GradualWarmupScheduler`` with
  multiplier 1, stepped once before training: epoch e ∈ {1, 2, 3} trains at e/3 of the initial rate in
  the ildoonet ``warmup_scheduler`` package it imports, whose copy is not in the snapshot read), then
  ``CosineAnnealingLR`` over ``EPOCHS`` − 3 epochs down to ``LR_MIN``. Two sets of numbers are published and disagree: ``training.yaml`` (mode
  ``HWMNet-96-LOL``) has 100 epochs, initial 2e-4, minimum 1e-6; the README's "Details of Hyperparameters"
  for LOL has 300 epochs ("200 is enough"), initial 5e-5, final 1e-5 (its MIT-5K line, 1e-4 → 1e-6 over
  100 epochs, is yet another). With 4,850 patches and batch 2 an epoch is 2,425 iterations (242,500 for
  100 epochs, 727,500 for 300);
* **seeds** 1234 (random, numpy, torch); the checkpoint kept is the best validation PSNR
  (``model_bestPSNR.pth``: ``{"epoch", "state_dict", "optimizer"}``);
* **test time**: reflect-pad bottom/right to a multiple of 16, run, clamp to [0, 1], crop
  (``demo.py``); metrics (``evaluation.py``) are PSNR/SSIM (skimage) and LPIPS (alex) on 8-bit RGB.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.padding import crop, pad_to_multiple
from models.se import SEFactory, SemanticEmbedding
from models.semantics import align_priors, checked_sem

__all__ = [
    "ChannelAttention",
    "ConvBlock",
    "HWMNet",
    "HalfWaveletBlock",
    "SelectiveFusion",
    "ShuffleUp",
    "SpatialAttention",
    "UnshuffleDown",
    "UpBlock",
    "haar_dwt",
    "haar_iwt",
]


def haar_dwt(x: Tensor) -> Tensor:
    """One-level orthonormal 2-D Haar transform: B×C×H×W (H, W even) → B×4C×H/2×W/2.

    The four sub-bands are concatenated band-major, (LL, HL, LH, HH), each C channels, with the official
    ``WT`` signs: for the 2×2 block [[a, c], [b, d]] (a top-left, b below it, c right of it),
    LL = (a+b+c+d)/2, HL = (−a−b+c+d)/2 (right minus left column), LH = (−a+b−c+d)/2 (bottom minus top
    row), HH = (a−b−c+d)/2. The transform is orthonormal, so :func:`haar_iwt` is its exact inverse.
    """
    if x.dim() != 4 or x.shape[-2] % 2 or x.shape[-1] % 2:
        raise ValueError(f"haar_dwt expects B×C×H×W with even H and W, got {tuple(x.shape)}")
    a, b = x[..., 0::2, 0::2], x[..., 1::2, 0::2]
    c, d = x[..., 0::2, 1::2], x[..., 1::2, 1::2]
    left, right = a + b, c + d  # column sums
    down_l, down_r = b - a, d - c  # row differences
    return 0.5 * torch.cat((left + right, right - left, down_l + down_r, down_r - down_l), dim=1)


def haar_iwt(x: Tensor) -> Tensor:
    """Inverse of :func:`haar_dwt`: B×4C×h×w (bands LL, HL, LH, HH) → B×C×2h×2w."""
    if x.dim() != 4 or x.shape[1] % 4:
        raise ValueError(f"haar_iwt expects B×4C×h×w, got {tuple(x.shape)}")
    ll, hl, lh, hh = x.chunk(4, dim=1)
    p, q = ll - hl, ll + hl  # left / right column, before the row split
    r, s = lh - hh, lh + hh
    a, b, c, d = p - r, p + r, q - s, q + s
    b_, ch, h, w = a.shape
    # pixel_shuffle reads channel c·4 + (2·row + col): phases (0,0)=a, (0,1)=c, (1,0)=b, (1,1)=d
    phases = torch.stack((a, c, b, d), dim=2).reshape(b_, ch * 4, h, w)
    return 0.5 * F.pixel_shuffle(phases, 2)


class SpatialAttention(nn.Module):
    """Gate every pixel by a sigmoid of a 5×5 conv over the channel-wise max and mean (official ``SALayer``)."""

    def __init__(self, kernel_size: int = 5) -> None:
        super().__init__()
        self.conv_du = nn.Sequential(
            nn.Conv2d(2, 1, kernel_size, padding=(kernel_size - 1) // 2, bias=False), nn.Sigmoid()
        )

    def forward(self, x: Tensor) -> Tensor:
        stats = torch.cat((x.amax(dim=1, keepdim=True), x.mean(dim=1, keepdim=True)), dim=1)
        return x * self.conv_du(stats)


class ChannelAttention(nn.Module):
    """Squeeze-and-excitation gate per channel, C → C//reduction → C, no biases (official ``CALayer``)."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        self.conv_du = nn.Sequential(
            nn.Conv2d(channels, channels // reduction, 1, bias=False),
            nn.ReLU(),
            nn.Conv2d(channels // reduction, channels, 1, bias=False),
            nn.Sigmoid(),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x * self.conv_du(x.mean(dim=(2, 3), keepdim=True))


class HalfWaveletBlock(nn.Module):
    """Half wavelet dual-attention block (official ``HWB``): C channels in, ``out_channels`` out, same size.

    The first C/2 channels are Haar-transformed (2C channels at half resolution) and refined there
    (``body``, ``WSA`` ∥ ``WCA``, ``conv1x1`` + residual) before the inverse transform; the second half is
    an identity path. Output: PReLU(conv3x3([wavelet path, identity path])) + conv1x1_final(input).

    One PReLU serves both ``body`` and ``activate`` (the same module, hence the same slope), as released;
    both names appear in the state dict.
    """

    def __init__(self, channels: int, out_channels: int | None = None, reduction: int = 16) -> None:
        super().__init__()
        if channels % 2:
            raise ValueError(
                f"HalfWaveletBlock splits its input in halves: channels must be even, got {channels}"
            )
        out_channels = channels if out_channels is None else out_channels
        wide = 2 * channels  # the DWT of C/2 channels has 4·C/2
        act = nn.PReLU()
        self.body = nn.Sequential(
            nn.Conv2d(wide, channels, 3, padding=1, bias=False),
            act,
            nn.Conv2d(channels, wide, 3, padding=1, bias=False),
        )
        self.WSA = SpatialAttention()
        self.WCA = ChannelAttention(wide, reduction)
        self.conv1x1 = nn.Conv2d(2 * wide, wide, 1, bias=False)
        self.conv3x3 = nn.Conv2d(channels, out_channels, 3, padding=1, bias=False)
        self.activate = act
        self.conv1x1_final = nn.Conv2d(channels, out_channels, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        wavelet, identity = x.chunk(2, dim=1)
        coeffs = haar_dwt(wavelet)
        res = self.body(coeffs)
        res = self.conv1x1(torch.cat((self.WSA(res), self.WCA(res)), dim=1)) + coeffs
        merged = torch.cat((haar_iwt(res), identity), dim=1)
        return self.activate(self.conv3x3(merged)) + self.conv1x1_final(x)


class UnshuffleDown(nn.Module):
    """×½ by PixelUnshuffle (4C channels) and a 1×1 conv with bias (official ``PS_down``)."""

    def __init__(self, in_channels: int, out_channels: int, factor: int = 2) -> None:
        super().__init__()
        self.factor = factor
        self.conv1 = nn.Conv2d(factor * factor * in_channels, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv1(F.pixel_unshuffle(x, self.factor))


class ShuffleUp(nn.Module):
    """×2 by PixelShuffle (C/4 channels) and a 1×1 conv with bias (official ``PS_up``)."""

    def __init__(self, in_channels: int, out_channels: int, factor: int = 2) -> None:
        super().__init__()
        self.factor = factor
        self.conv1 = nn.Conv2d(in_channels // (factor * factor), out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv1(F.pixel_shuffle(x, self.factor))


class ConvBlock(nn.Module):
    """One M-Net+ level (official ``UNetConvBlock``): a half wavelet block, then a 1×1 ``tail`` to
    ``out_channels``. ``forward`` returns the tail output (the skip of an encoder level); ``downsample``
    (present on encoder levels that continue downwards) halves it for the next level."""

    def __init__(self, in_channels: int, out_channels: int, downsample: bool) -> None:
        super().__init__()
        self.body = nn.Sequential(HalfWaveletBlock(in_channels, in_channels))
        self.downsample = UnshuffleDown(out_channels, out_channels) if downsample else None
        self.tail = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.tail(self.body(x))


class UpBlock(nn.Module):
    """A decoder stage (official ``UNetUpBlock``): ×2 up to ``out_channels``, concat the (``skip_conv``-ed)
    encoder skip, then a :class:`ConvBlock` on the 2·``out_channels`` = ``in_channels`` concat."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.up = ShuffleUp(in_channels, out_channels)
        self.conv_block = ConvBlock(in_channels, out_channels, downsample=False)

    def forward(self, x: Tensor, bridge: Tensor) -> Tensor:
        return self.conv_block(torch.cat((self.up(x), bridge), dim=1))


class SelectiveFusion(nn.Module):
    """Selective kernel feature fusion of ``branches`` same-shaped maps (official ``SKFF``).

    Global average of their sum → 1×1 conv to d = max(C / reduction, 4) + PReLU → one 1×1 conv per branch
    back to C → softmax *across branches* per channel → weighted sum of the branches.
    """

    def __init__(self, channels: int, branches: int = 3, reduction: int = 8) -> None:
        super().__init__()
        hidden = max(int(channels / reduction), 4)
        self.branches = branches
        self.conv_du = nn.Sequential(nn.Conv2d(channels, hidden, 1, bias=False), nn.PReLU())
        self.fcs = nn.ModuleList(nn.Conv2d(hidden, channels, 1, bias=False) for _ in range(branches))

    def forward(self, feats: Sequence[Tensor]) -> Tensor:
        if len(feats) != self.branches:
            raise ValueError(f"SelectiveFusion was built for {self.branches} branches, got {len(feats)}")
        stacked = torch.stack(tuple(feats), dim=1)  # B×n×C×H×W
        z = self.conv_du(stacked.sum(dim=1).mean(dim=(2, 3), keepdim=True))
        weights = torch.stack([fc(z) for fc in self.fcs], dim=1).softmax(dim=1)  # B×n×C×1×1
        return (stacked * weights).sum(dim=1)


def _bilinear(x: Tensor, factor: float) -> Tensor:
    """``nn.Upsample(scale_factor=factor, mode="bilinear", align_corners=False)`` as the original uses it."""
    return F.interpolate(x, scale_factor=factor, mode="bilinear", align_corners=False)


class HWMNet(nn.Module):
    """HWMNet (official ``HWMNet`` of ``model/HWMNet.py``), optionally with SKF's SE blocks.

    Args:
        skf: build the SE blocks ``att_block_{1,2,3}`` on the three decoder stages (HWMNet-SKF);
            ``False`` is the plain baseline, whose keys are exactly the released ones.
        in_chn: image channels, in and out (official 3).
        wf: base width; level i has 2^i·wf channels (released LOL/MIT-5K models: 96; the official class
            default, 64, has no released weights).
        depth: encoder levels (official 4: bottleneck at 1/8). ``skf`` needs ≥ 4 (a decoder stage at 1/4).
        sem_channels: channels of the priors (F0, F1, F2) (HRNet-W48 SKB: 48, 96, 192).
        se_factory: ``(sem_channels, channels) -> module`` building each SE block (default: the GDFN SE
            block, 2 heads, factor 2.66).
    """

    #: Input multiple the network needs, 2^depth (16 for the official depth 4; set per instance).
    stride = 16
    #: Which SKB outputs ``sem`` must hold, in order (att_block_1, att_block_2, att_block_3).
    sem_inputs = ("F0", "F1", "F2")
    #: Host scale (1/k) of att_block_1, att_block_2, att_block_3.
    se_scales = (1, 2, 4)

    def __init__(
        self,
        skf: bool = False,
        in_chn: int = 3,
        wf: int = 96,
        depth: int = 4,
        sem_channels: Sequence[int] = (48, 96, 192),
        se_factory: SEFactory | None = None,
    ) -> None:
        super().__init__()
        if depth < 2:
            raise ValueError(f"HWMNet needs depth >= 2 (one downsampling), got {depth}")
        if skf and depth < 4:
            raise ValueError(
                f"HWMNet-SKF puts SE blocks on decoder stages at 1/4, 1/2 and 1/1, which need depth >= 4; "
                f"got depth={depth}"
            )
        self.skf = skf
        self.in_chn, self.wf, self.depth = in_chn, wf, depth
        self.stride = 2**depth  # depth − 1 halvings, then the DWT inside the bottleneck block

        # encoder; attribute order follows the original so state-dict order matches too
        self.down_path = nn.ModuleList()
        prev = 0
        for level in range(depth):
            self.down_path.append(ConvBlock(prev + wf, 2**level * wf, downsample=level + 1 < depth))
            prev = 2**level * wf
        self.conv_01 = nn.Conv2d(in_chn, wf, 3, padding=1)

        # decoder, deepest stage first
        self.up_path = nn.ModuleList()
        self.skip_conv = nn.ModuleList()
        self.conv_up = nn.ModuleList()
        for level in reversed(range(depth - 1)):
            width = 2**level * wf
            self.up_path.append(UpBlock(prev, width))
            self.skip_conv.append(nn.Conv2d(width, width, 3, padding=1))
            resize = (
                nn.Upsample(scale_factor=2**level, mode="bilinear", align_corners=False)
                if level
                else nn.Identity()
            )
            self.conv_up.append(nn.Sequential(resize, nn.Conv2d(width, wf, 3, padding=1)))
            prev = width
        self.bottom_conv = nn.Conv2d(2 ** (depth - 1) * wf, wf, 3, padding=1)
        self.final_ff = SelectiveFusion(wf, branches=depth)
        self.last = nn.Conv2d(wf, in_chn, 3, padding=1)

        if skf:
            if len(sem_channels) != 3:
                raise ValueError(f"sem_channels must give (F0, F1, F2) channels, got {tuple(sem_channels)}")
            build = se_factory or partial(SemanticEmbedding, heads=2, ffn="gdfn", ffn_factor=2.66)
            self.att_block_1 = build(sem_channels[0], wf)  # F0 (1/4) -> last decoder stage, 1/1
            self.att_block_2 = build(sem_channels[1], 2 * wf)  # F1 (1/8) -> decoder stage at 1/2
            self.att_block_3 = build(sem_channels[2], 4 * wf)  # F2 (1/16) -> decoder stage at 1/4

    def forward(self, low: Tensor, sem: Sequence[Tensor] | None = None) -> Tensor:
        """``low``: B×in_chn×H×W in [0, 1], any H, W; ``sem``: (F0, F1, F2) from the SKB for this image
        (required iff built with ``skf=True``). Returns the enhanced image, B×in_chn×H×W, not clamped."""
        if low.dim() != 4 or low.shape[1] != self.in_chn:
            raise ValueError(f"HWMNet expects B×{self.in_chn}×H×W, got shape {tuple(low.shape)}")
        size = (low.shape[-2], low.shape[-1])
        x = pad_to_multiple(low, self.stride)
        priors = self._align(size, x.shape[-2:], sem)
        return crop(self._enhance(x, priors), size).contiguous()

    def _enhance(self, img: Tensor, priors: Sequence[Tensor] | None) -> Tensor:
        """The network on an image whose sides are multiples of :attr:`stride`."""
        feat = self.conv_01(img)
        skips: list[Tensor] = []
        pyramid = img
        for level, block in enumerate(self.down_path):
            if level:  # M-Net left bar: the image at this level's scale, embedded by the shared conv_01
                pyramid = _bilinear(pyramid, 0.5)
                feat = torch.cat((feat, self.conv_01(pyramid)), dim=1)
            feat = block(feat)
            if block.downsample is not None:
                skips.append(feat)
                feat = block.downsample(feat)

        se = self._se_by_stage(priors)
        branches = [_bilinear(self.bottom_conv(feat), 2 ** (self.depth - 1))]
        for stage, (up, skip_conv, to_full) in enumerate(
            zip(self.up_path, self.skip_conv, self.conv_up, strict=True)
        ):
            feat = up(feat, skip_conv(skips[-1 - stage]))
            if stage in se:
                block, prior = se[stage]
                feat = block(feat, prior)
            branches.append(to_full(feat))
        return self.last(self.final_ff(branches)) + img

    def _se_by_stage(self, priors: Sequence[Tensor] | None) -> dict[int, tuple[nn.Module, Tensor]]:
        """Decoder stage index -> (SE block, its prior); stage s of ``up_path`` sits at 1/2^(depth−2−s)."""
        if priors is None:
            return {}
        blocks = (self.att_block_1, self.att_block_2, self.att_block_3)
        last = self.depth - 2  # index of the full-resolution stage
        return {
            last - (k.bit_length() - 1): (block, prior)
            for k, block, prior in zip(self.se_scales, blocks, priors, strict=True)
        }

    def _align(
        self, size: tuple[int, int], padded: Sequence[int], sem: Sequence[Tensor] | None
    ) -> list[Tensor] | None:
        """The priors fitted to their hosts on the padded image (:func:`models.semantics.align_priors`)."""
        checked = checked_sem("HWMNet", self.skf, sem)
        return None if checked is None else align_priors(checked, size, padded, self.se_scales)
