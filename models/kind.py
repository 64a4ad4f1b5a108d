"""KinD (Zhang et al., ACM MM 2019) and KinD++ (Zhang et al., IJCV 2021) with SKF's SE blocks.

Both are Retinex pipelines of three separately trained sub-networks (losses: ``components.kind_losses``):

* **decomposition** ``decom``: image S -> reflectance R (3 ch, sigmoid) and illumination I (1 ch, sigmoid);
* **reflectance restoration** ``restore``: the low-light R, guided by its I, -> a clean R̂;
* **illumination adjustment** ``adjust``: I and a ratio map -> the brightened Î.

The enhanced image is R̂ · Î (Î broadcast over the three colour channels).

Read from the TensorFlow code: ``zhangyhuaee/KinD`` ``model.py`` (``DecomNet_simple``, ``Restoration_net``,
``Illumination_adjust_net``) and ``evaluate.py`` / ``evaluate_LOLdataset.py``; ``zhangyhuaee/KinD_plus``
``model.py`` (``DecomNet``, ``Restoration_net``, ``Illumination_adjust_net``) and ``msia_BN_3_M.py`` (MSIA).
Attribute names follow the TF variable scopes (``g_conv1_1``, ``de_conv5_2``, ``up_6``, ``en_conv_1``...),
so a TF-checkpoint converter is a rename plus a transpose of each kernel.

TF -> PyTorch equivalences (the reason each choice below is exact, not approximate):

* ``lrelu`` is ``max(0.2·x, x)``, i.e. a leaky ReLU with slope 0.2;
* ``slim.conv2d`` with ``SAME`` padding and an odd kernel k is a conv with symmetric padding k // 2, with
  a bias; its *default* activation is ReLU, which matters in MSIA where the original passes none;
* ``slim.max_pool2d([2, 2], 2, 'SAME')`` on an odd side pads one ignored row/column at the bottom/right,
  which is ``max_pool2d(2, 2, ceil_mode=True)``;
* ``upsample_and_concat`` is a *bias-free* 2×2 stride-2 transposed conv whose ``output_shape`` is the skip
  feature's; for an odd skip side that is the full 2× output with its last row/column dropped (the
  gradient of a SAME conv whose padding sits at the bottom/right), then ``concat([up, skip])``;
* weights are Glorot-uniform and biases zero, the TF defaults (``slim``, ``tf.get_variable``,
  ``tf.layers``); ``tf.layers.batch_normalization`` is ``BatchNorm2d(eps=1e-3, momentum=0.01)``.

So KinD's three networks run on any H×W exactly as released. KinD++'s restoration net does not: MSIA's
pool-then-upsample branches only give back the input size when H and W are multiples of 4 (the
released ``evaluate.py`` crops the image down to multiples of 4).

Read against the paper / the task's assumptions:

* ``Illumination_adjust_net`` ends in a **3×3** conv to 1 channel *with* lrelu, then the sigmoid
  (both KinD and KinD++), not a 1×1 conv;
* KinD++'s decomposition and adjustment networks are layer-for-layer KinD's (only the TF scope names
  differ), so :class:`KinDPP` reuses :class:`KinDDecomNet` and :class:`KinDAdjustNet`;
* KinD++'s restoration net is **not** a U-Net: it runs at full resolution throughout, 3×3 convs in five
  groups (32-64 | 128-256 | 512-256 | 128-64 | 32 channels) with an MSIA after each of the first four. It
  takes R alone as input and injects I through the MSIA modules (:class:`MSIA`): a bias-free 3×3 conv of I
  and a sigmoid give a spatial attention on the feature, then branches at 1/1, 1/2 and 1/4 (max-pool,
  conv, BN, ReLU, transposed convs back) are concatenated with the attended feature and fused by a 1×1 conv.

Test pipeline (``forward``): R̂ · Î with the ratio map filled with :attr:`test_ratio` = 5.0, the fixed
value of KinD's ``evaluate.py`` (and the ``--ratio`` default of KinD++'s). Not included: ``evaluate.py``'s
post-processing (R̂ weighted by a blurred-gray map of R, then blended with the input by I), and the LOL
scripts' ratio taken from the ground truth's decomposition (:func:`illumination_ratio` computes it; pass it
as ``ratio``).

SKF (the paper gives no placement for KinD; this project's choice, docs/method.md §6.4): SE blocks refine
the restoration net's features, the deepest prior on the deepest feature:

* KinD's restoration U-Net: each decoder stage is upsample+concat -> two 3×3 convs. ``att_block_3``
  (F2) follows stage 6 (256 ch at 1/8), ``att_block_2`` (F1) stage 7 (128 ch at 1/4), ``att_block_1`` (F0)
  stage 8 (64 ch at 1/2): after the convs, where the stage's feature is final, before the next upsampling.
  Every prior is upsampled ×2 onto its host; the scales are released LLFlow-SKF's (1/8, 1/4, 1/2). The
  full-resolution stage 9 gets none: at 32 channels and 1/1 an SE block costs half of the whole SE time.
* KinD++'s restoration net has no decoder scales: all three hosts are at 1/1, one at each width of its
  narrowing half: ``att_block_3`` after ``de_conv4_1`` (128 ch), ``att_block_2`` after ``msia_4`` (64 ch),
  ``att_block_1`` after ``de_conv5_1`` (32 ch, before ``de_conv10``). The 256-channel features before them
  get none (an SE block there costs four times the 128-channel one). The priors are upsampled ×16, ×8, ×4.

The SE blocks live inside ``restore`` (``restore.att_block_{1,2,3}``), so the restoration stage trains them.

Sizes: :meth:`KinD.forward` reflect-pads to a multiple of :attr:`stride` (16 for KinD: the restoration
U-Net's four poolings; 4 for KinD++: MSIA's ×4 pooling) and crops back, like the other baselines; the
stage methods (:meth:`decompose`, :meth:`restore_reflectance`) pad the same way, so for sizes that are
multiples of the stride ``forward`` is exactly their composition. Priors are aligned with
:func:`models.padding.fit_prior`. Unlike KinD++ (whose released test crops to multiples of 4), KinD's
released test runs unpadded; on sides that are not multiples of 16 (LOL's 600-pixel width) the padded
``forward`` therefore differs from it near the bottom/right border. Calling the three sub-networks directly
(``model.decom(x)``, ``model.restore(r, i)``, ``model.adjust(i, ratio_map)``) reproduces the unpadded run.
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
    "MSIA",
    "KinD",
    "KinDAdjustNet",
    "KinDDecomNet",
    "KinDPP",
    "KinDPPRestorationNet",
    "KinDRestorationNet",
    "UpsampleConcat",
    "illumination_ratio",
]

LRELU_SLOPE = 0.2  # the originals' lrelu: tf.maximum(0.2 * x, x)

Ratio = float | Tensor


def _lrelu(x: Tensor) -> Tensor:
    return F.leaky_relu(x, LRELU_SLOPE)


def _conv(cin: int, cout: int, k: int = 3, bias: bool = True) -> nn.Conv2d:
    """A TF ``SAME`` conv with stride 1 (odd kernel: symmetric padding)."""
    return nn.Conv2d(cin, cout, k, padding=k // 2, bias=bias)


def _pool(x: Tensor, k: int = 2) -> Tensor:
    """TF ``SAME`` max-pool with stride = kernel: odd sides keep their last row/column."""
    return F.max_pool2d(x, k, k, ceil_mode=True)


def _tf_init(module: nn.Module) -> None:
    """TF defaults on every conv below ``module``: Glorot-uniform weights, zero biases.

    Call before SE blocks are added: they keep their own initialisation.
    """
    for m in module.modules():
        if isinstance(m, nn.Conv2d | nn.ConvTranspose2d | UpsampleConcat):
            nn.init.xavier_uniform_(m.weight)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)


def _default_se_factory() -> SEFactory:
    return partial(SemanticEmbedding, heads=2, ffn="gdfn", ffn_factor=2.66)


def _check_sem(net: nn.Module, skf: bool, sem: Sequence[Tensor] | None) -> None:
    """Stand-alone use of a restoration net: priors iff it was built with SE blocks."""
    if skf and sem is None:
        raise ValueError(f"{type(net).__name__} was built with skf=True and needs sem=(F0, F1, F2)")
    if not skf and sem is not None:
        raise ValueError(f"{type(net).__name__} was built with skf=False and has no SE blocks; pass sem=None")


def illumination_ratio(numerator: Tensor, denominator: Tensor, eps: float = 1e-4) -> Tensor:
    """Per-sample mean of ``numerator / (denominator + eps)`` (B), the originals' ratio statistic.

    LOL evaluation (both ``evaluate_LOLdataset.py``): ``ratio = illumination_ratio(I_high, I_low)``.
    Adjustment training (both ``*adjust*_train.py``): with ``r = illumination_ratio(I_low, I_high)`` per
    patch, I_low is brightened towards I_high with ratio ``1 / r + 1e-4`` and I_high darkened towards I_low
    with ratio ``r`` (one of the two directions at random per patch).
    """
    return (numerator / (denominator + eps)).flatten(1).mean(dim=1)


class UpsampleConcat(nn.Module):
    """The originals' ``upsample_and_concat``: bias-free 2×2 stride-2 transposed conv, then ``[up, skip]``.

    The weight is held directly (``<scope>.weight``, like TF's ``<scope>/weights``), in PyTorch's
    transposed-conv layout in×out×2×2. The output is cropped to the skip's size, as TF's ``output_shape``.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(in_channels, out_channels, 2, 2))
        nn.init.xavier_uniform_(self.weight)

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        up = F.conv_transpose2d(x, self.weight, stride=2)
        return torch.cat((crop(up, (skip.shape[-2], skip.shape[-1])), skip), dim=1)


class KinDDecomNet(nn.Module):
    """KinD's ``DecomNet_simple`` (also KinD++'s ``DecomNet``): image -> (R, I).

    A three-level U-Net (32-64-128 channels, one 3×3 conv per level) gives R through a 1×1 conv and a
    sigmoid; the illumination branch convolves the first-level feature once more, concatenates it with the
    U-Net's last decoder feature and maps the 64 channels to I with a 1×1 conv and a sigmoid (the released
    code's 1×1 heads replace the paper's 3×3 ones, "to get better results").
    """

    def __init__(self, channels: int = 32) -> None:
        super().__init__()
        c = channels
        self.g_conv1_1 = _conv(3, c)
        self.g_conv2_1 = _conv(c, 2 * c)
        self.g_conv3_1 = _conv(2 * c, 4 * c)
        self.g_up_1 = UpsampleConcat(4 * c, 2 * c)
        self.g_conv8_1 = _conv(4 * c, 2 * c)
        self.g_up_2 = UpsampleConcat(2 * c, c)
        self.g_conv9_1 = _conv(2 * c, c)
        self.g_conv10 = _conv(c, 3, 1)
        self.l_conv1_2 = _conv(c, c)
        self.l_conv1_4 = _conv(2 * c, 1, 1)
        _tf_init(self)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``x``: B×3×H×W, any H, W. Returns R (B×3×H×W) and I (B×1×H×W), both in (0, 1)."""
        c1 = _lrelu(self.g_conv1_1(x))
        c2 = _lrelu(self.g_conv2_1(_pool(c1)))
        c3 = _lrelu(self.g_conv3_1(_pool(c2)))
        c8 = _lrelu(self.g_conv8_1(self.g_up_1(c3, c2)))
        c9 = _lrelu(self.g_conv9_1(self.g_up_2(c8, c1)))
        r = torch.sigmoid(self.g_conv10(c9))
        l2 = _lrelu(self.l_conv1_2(c1))
        i = torch.sigmoid(self.l_conv1_4(torch.cat((l2, c9), dim=1)))
        return r, i


class KinDAdjustNet(nn.Module):
    """KinD's ``Illumination_adjust_net`` (KinD++'s is identical): (I, ratio map) -> Î.

    Four 3×3 convs on the 2-channel input (32, 32, 32, then 1 channel), each followed by lrelu, the last
    one included, then a sigmoid: as released (the lrelu before the sigmoid is in both repositories).
    """

    def __init__(self, channels: int = 32) -> None:
        super().__init__()
        c = channels
        self.en_conv_1 = _conv(2, c)
        self.en_conv_2 = _conv(c, c)
        self.en_conv_3 = _conv(c, c)
        self.en_conv_4 = _conv(c, 1)
        _tf_init(self)

    def forward(self, i: Tensor, ratio_map: Tensor) -> Tensor:
        """``i``, ``ratio_map``: B×1×H×W. Returns Î, B×1×H×W in (0, 1)."""
        x = torch.cat((i, ratio_map), dim=1)
        for conv in (self.en_conv_1, self.en_conv_2, self.en_conv_3, self.en_conv_4):
            x = _lrelu(conv(x))
        return torch.sigmoid(x)


class KinDRestorationNet(nn.Module):
    """KinD's ``Restoration_net``: (R, I) -> R̂, a five-level U-Net, optionally with SKF's SE blocks.

    Encoder: two 3×3 convs per level (32, 64, 128, 256, 512 channels for ``channels=32``) with 2×2
    max-pools between; decoder: :class:`UpsampleConcat` with the encoder feature of the same level, then
    two 3×3 convs; all lrelu; a 3×3 conv to 3 channels and a sigmoid. SE blocks (``skf=True``) follow
    decoder stages 6, 7 and 8 (1/8, 1/4, 1/2), see the module docstring.
    """

    #: Input side multiple at which no pooling rounds up (the U-Net accepts any size, see module docstring).
    stride = 16
    #: Host scale of att_block_1, att_block_2, att_block_3 (1/2, 1/4, 1/8).
    sem_scales = (2, 4, 8)

    def __init__(
        self,
        channels: int = 32,
        skf: bool = False,
        sem_channels: Sequence[int] = (48, 96, 192),
        se_factory: SEFactory | None = None,
    ) -> None:
        super().__init__()
        self.skf = skf
        c = channels
        self.de_conv1_1 = _conv(4, c)
        self.de_conv1_2 = _conv(c, c)
        self.de_conv2_1 = _conv(c, 2 * c)
        self.de_conv2_2 = _conv(2 * c, 2 * c)
        self.de_conv3_1 = _conv(2 * c, 4 * c)
        self.de_conv3_2 = _conv(4 * c, 4 * c)
        self.de_conv4_1 = _conv(4 * c, 8 * c)
        self.de_conv4_2 = _conv(8 * c, 8 * c)
        self.de_conv5_1 = _conv(8 * c, 16 * c)
        self.de_conv5_2 = _conv(16 * c, 16 * c)
        self.up_6 = UpsampleConcat(16 * c, 8 * c)
        self.de_conv6_1 = _conv(16 * c, 8 * c)
        self.de_conv6_2 = _conv(8 * c, 8 * c)
        self.up_7 = UpsampleConcat(8 * c, 4 * c)
        self.de_conv7_1 = _conv(8 * c, 4 * c)
        self.de_conv7_2 = _conv(4 * c, 4 * c)
        self.up_8 = UpsampleConcat(4 * c, 2 * c)
        self.de_conv8_1 = _conv(4 * c, 2 * c)
        self.de_conv8_2 = _conv(2 * c, 2 * c)
        self.up_9 = UpsampleConcat(2 * c, c)
        self.de_conv9_1 = _conv(2 * c, c)
        self.de_conv9_2 = _conv(c, c)
        self.de_conv10 = _conv(c, 3)
        _tf_init(self)
        if skf:
            build = se_factory or _default_se_factory()
            self.att_block_1 = build(sem_channels[0], 2 * c)  # F0 -> decoder stage 8, 1/2
            self.att_block_2 = build(sem_channels[1], 4 * c)  # F1 -> decoder stage 7, 1/4
            self.att_block_3 = build(sem_channels[2], 8 * c)  # F2 -> decoder stage 6, 1/8

    @staticmethod
    def _two(a: nn.Conv2d, b: nn.Conv2d, x: Tensor) -> Tensor:
        return _lrelu(b(_lrelu(a(x))))

    def forward(self, r: Tensor, i: Tensor, sem: Sequence[Tensor] | None = None) -> Tensor:
        """``r``: B×3×H×W, ``i``: B×1×H×W, any H, W; ``sem``: aligned (F0, F1, F2) iff ``skf``.

        Returns R̂, B×3×H×W in (0, 1).
        """
        _check_sem(self, self.skf, sem)
        c1 = self._two(self.de_conv1_1, self.de_conv1_2, torch.cat((r, i), dim=1))
        c2 = self._two(self.de_conv2_1, self.de_conv2_2, _pool(c1))
        c3 = self._two(self.de_conv3_1, self.de_conv3_2, _pool(c2))
        c4 = self._two(self.de_conv4_1, self.de_conv4_2, _pool(c3))
        c5 = self._two(self.de_conv5_1, self.de_conv5_2, _pool(c4))
        c6 = self._two(self.de_conv6_1, self.de_conv6_2, self.up_6(c5, c4))
        if sem is not None:
            c6 = self.att_block_3(c6, sem[2])
        c7 = self._two(self.de_conv7_1, self.de_conv7_2, self.up_7(c6, c3))
        if sem is not None:
            c7 = self.att_block_2(c7, sem[1])
        c8 = self._two(self.de_conv8_1, self.de_conv8_2, self.up_8(c7, c2))
        if sem is not None:
            c8 = self.att_block_1(c8, sem[0])
        c9 = self._two(self.de_conv9_1, self.de_conv9_2, self.up_9(c8, c1))
        return torch.sigmoid(self.de_conv10(c9))


class _PoolUpsample(nn.Module):
    """One MSIA branch (``pool_upsamping_3_M``): [max-pool ×s] -> conv -> ReLU -> BN -> ReLU -> [up ×s].

    The ReLU right after the conv and after each transposed conv are slim's default ``activation_fn``
    (the original passes none); level 4 uses a 1×1 conv and two ×2 transposed convs, level 2 a 3×3 conv
    and one, level 1 a 3×3 conv and no resampling.
    """

    def __init__(self, channels: int, level: int, bn_momentum: float = 0.01) -> None:
        super().__init__()
        if level not in (1, 2, 4):
            raise ValueError(f"MSIA levels are 1, 2 and 4, got {level}")
        self.level = level
        self.pu_conv = _conv(channels, channels, 1 if level == 4 else 3)
        self.bn = nn.BatchNorm2d(channels, eps=1e-3, momentum=bn_momentum)
        if level == 4:
            self.conv_up_1 = nn.ConvTranspose2d(channels, channels, 2, 2)
        if level > 1:
            self.conv_up = nn.ConvTranspose2d(channels, channels, 2, 2)

    def forward(self, x: Tensor) -> Tensor:
        if self.level > 1:
            x = F.max_pool2d(x, self.level, self.level)
        x = F.relu(self.bn(F.relu(self.pu_conv(x))))
        if self.level == 4:
            x = F.relu(self.conv_up_1(x))
        if self.level > 1:
            x = F.relu(self.conv_up(x))
        return x


class MSIA(nn.Module):
    """KinD++'s multi-scale illumination attention (``msia_3_M``).

    ``attention``: a bias-free 3×3 conv of I (1 -> 1 channel) and a sigmoid weight the feature per pixel;
    the attended feature and its three :class:`_PoolUpsample` branches (1/1, 1/2, 1/4) are concatenated
    (4C channels) and fused back to C by the 1×1 ``multi_scale_feature`` conv (+ slim's default ReLU).
    H and W must be multiples of 4.
    """

    def __init__(self, channels: int, bn_momentum: float = 0.01) -> None:
        super().__init__()
        self.attention = _conv(1, 1, 3, bias=False)
        self.pu1 = _PoolUpsample(channels, 1, bn_momentum)
        self.pu2 = _PoolUpsample(channels, 2, bn_momentum)
        self.pu4 = _PoolUpsample(channels, 4, bn_momentum)
        self.multi_scale_feature = _conv(4 * channels, channels, 1)

    def forward(self, x: Tensor, i: Tensor) -> Tensor:
        x = x * torch.sigmoid(self.attention(i))
        return F.relu(self.multi_scale_feature(torch.cat((x, self.pu1(x), self.pu2(x), self.pu4(x)), dim=1)))


class KinDPPRestorationNet(nn.Module):
    """KinD++'s ``Restoration_net`` (scope ``Denoise_Net``): (R, I) -> R̂ at full resolution, with MSIA.

    3×3 lrelu convs 3->32->64, MSIA, ->128->256, MSIA, ->512->256, MSIA, ->128->64, MSIA, ->32, then a 3×3
    conv to 3 channels and a sigmoid (for ``channels=32``). I enters only through the MSIA attentions.
    The released variables of MSIA k sit under scopes ``de_conv{k}`` (attention) and ``de_conv{k}pu{1,2,4}``
    / ``de_conv{k}multi_scale_feature``; here they are ``msia_{k}.*``. SE blocks (``skf=True``) follow
    ``msia_3``, ``msia_4`` and ``de_conv5_1``, see the module docstring.
    """

    #: MSIA's ×4 pool-and-upsample branch needs H and W divisible by 4.
    stride = 4
    #: All three hosts are at full resolution.
    sem_scales = (1, 1, 1)

    def __init__(
        self,
        channels: int = 32,
        skf: bool = False,
        sem_channels: Sequence[int] = (48, 96, 192),
        se_factory: SEFactory | None = None,
        bn_momentum: float = 0.01,
    ) -> None:
        super().__init__()
        self.skf = skf
        c = channels
        self.de_conv1_1 = _conv(3, c)
        self.de_conv1_2 = _conv(c, 2 * c)
        self.msia_1 = MSIA(2 * c, bn_momentum)
        self.de_conv2_1 = _conv(2 * c, 4 * c)
        self.de_conv2_2 = _conv(4 * c, 8 * c)
        self.msia_2 = MSIA(8 * c, bn_momentum)
        self.de_conv3_1 = _conv(8 * c, 16 * c)
        self.de_conv3_2 = _conv(16 * c, 8 * c)
        self.msia_3 = MSIA(8 * c, bn_momentum)
        self.de_conv4_1 = _conv(8 * c, 4 * c)
        self.de_conv4_2 = _conv(4 * c, 2 * c)
        self.msia_4 = MSIA(2 * c, bn_momentum)
        self.de_conv5_1 = _conv(2 * c, c)
        self.de_conv10 = _conv(c, 3)
        _tf_init(self)
        if skf:
            build = se_factory or _default_se_factory()
            self.att_block_1 = build(sem_channels[0], c)  # F0 -> after de_conv5_1
            self.att_block_2 = build(sem_channels[1], 2 * c)  # F1 -> after msia_4
            self.att_block_3 = build(sem_channels[2], 4 * c)  # F2 -> after de_conv4_1

    def forward(self, r: Tensor, i: Tensor, sem: Sequence[Tensor] | None = None) -> Tensor:
        """``r``: B×3×H×W, ``i``: B×1×H×W with H, W multiples of 4; ``sem``: aligned (F0, F1, F2) iff ``skf``.

        Returns R̂, B×3×H×W in (0, 1).
        """
        _check_sem(self, self.skf, sem)
        h, w = r.shape[-2:]
        if h % self.stride or w % self.stride:
            raise ValueError(
                f"KinDPPRestorationNet needs H and W divisible by {self.stride} (MSIA's ×4 branch), got "
                f"{h}x{w}; pad the input (KinDPP.restore_reflectance does)"
            )
        x = _lrelu(self.de_conv1_2(_lrelu(self.de_conv1_1(r))))
        x = self.msia_1(x, i)
        x = _lrelu(self.de_conv2_2(_lrelu(self.de_conv2_1(x))))
        x = self.msia_2(x, i)
        x = _lrelu(self.de_conv3_2(_lrelu(self.de_conv3_1(x))))
        x = self.msia_3(x, i)
        x = _lrelu(self.de_conv4_1(x))
        if sem is not None:
            x = self.att_block_3(x, sem[2])
        x = _lrelu(self.de_conv4_2(x))
        x = self.msia_4(x, i)
        if sem is not None:
            x = self.att_block_2(x, sem[1])
        x = _lrelu(self.de_conv5_1(x))
        if sem is not None:
            x = self.att_block_1(x, sem[0])
        return torch.sigmoid(self.de_conv10(x))


class _KinDPipeline(nn.Module):
    """Shared wrapper: children ``decom``, ``restore``, ``adjust``; see :class:`KinD`."""

    #: The original test-time illumination ratio (``evaluate.py``: ``ratio = 5.0``).
    test_ratio = 5.0
    #: Which SKB outputs ``sem`` must hold, in order (att_block_1, att_block_2, att_block_3).
    sem_inputs = ("F0", "F1", "F2")
    stride: int
    restore: KinDRestorationNet | KinDPPRestorationNet

    def __init__(self, skf: bool, decom_channels: int, adjust_channels: int) -> None:
        super().__init__()
        self.skf = skf
        self.decom = KinDDecomNet(decom_channels)
        self.adjust = KinDAdjustNet(adjust_channels)

    @staticmethod
    def _check_image(x: Tensor, what: str, channels: int) -> None:
        if x.dim() != 4 or x.shape[1] != channels:
            raise ValueError(f"{what} must be B×{channels}×H×W, got shape {tuple(x.shape)}")

    def decompose(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``x``: B×3×H×W in [0, 1] -> (R: B×3×H×W, I: B×1×H×W), both in (0, 1)."""
        self._check_image(x, "the image", 3)
        size = (x.shape[-2], x.shape[-1])
        r, i = self.decom(pad_to_multiple(x, self.stride))
        return crop(r, size), crop(i, size)

    def restore_reflectance(self, r: Tensor, i: Tensor, sem: Sequence[Tensor] | None = None) -> Tensor:
        """R (B×3×H×W), I (B×1×H×W) of the low-light image, ``sem`` = (F0, F1, F2) iff ``skf`` -> R̂."""
        self._check_image(r, "R", 3)
        self._check_image(i, "I", 1)
        size = (r.shape[-2], r.shape[-1])
        rp, ip = pad_to_multiple(r, self.stride), pad_to_multiple(i, self.stride)
        priors = self._align(size, rp.shape[-2:], sem)
        return crop(self.restore(rp, ip, priors), size)

    def adjust_illumination(self, i: Tensor, ratio: Ratio | None = None) -> Tensor:
        """I (B×1×H×W) and a ratio -> Î (B×1×H×W).

        ``ratio``: a number or 0-d tensor (one ratio for the batch), a B-tensor (one per image) or a
        B×1×H×W map; the first two are broadcast to a constant map as the originals feed it. ``None`` is
        :attr:`test_ratio`. Only 3×3 convs: any size runs unpadded, exactly as released.
        """
        self._check_image(i, "I", 1)
        return self.adjust(i, self._ratio_map(i, self.test_ratio if ratio is None else ratio))

    def forward(
        self,
        low: Tensor,
        sem: Sequence[Tensor] | None = None,
        ratio: Ratio | None = None,
        *,
        stage: str | None = None,
        high: Tensor | None = None,
    ) -> Tensor | tuple[Tensor, ...]:
        """``low``: B×3×H×W in [0, 1], any H, W; ``sem``: (F0, F1, F2) iff ``skf``; ``ratio``: as in
        :meth:`adjust_illumination` (default :attr:`test_ratio`). Returns R̂ · Î, B×3×H×W.

        ``stage`` runs one training stage's pass instead (through ``forward``, so a DDP-wrapped network
        trains through it), with the sub-networks trained earlier run without gradients:

        * ``"decom"``: (R_low, I_low, R_high, I_high) of ``low`` and ``high``;
        * ``"adjust"``: (Î, I_target): per sample, at random, I_low brightened towards I_high (ratio
          1/r + 1e-4) or I_high darkened towards I_low (ratio r), r = mean(I_low / (I_high + 1e-4)), as
          the originals' adjustment training;
        * ``"restore"``: (R̂, R_high, Î): R̂ from R_low, I_low (and ``sem``), the decomposed R_high for the
          family's restoration target, and Î with the ground truth's ratio (for losses on the image R̂ · Î).
        """
        if stage is not None:
            return self._stage_pass(stage, low, high, sem)
        self._check_image(low, f"{type(self).__name__}'s input", 3)
        size = (low.shape[-2], low.shape[-1])
        x = pad_to_multiple(low, self.stride)
        priors = self._align(size, x.shape[-2:], sem)
        r, i = self.decom(x)
        r_hat = self.restore(r, i, priors)
        i_hat = self.adjust(i, self._ratio_map(i, self.test_ratio if ratio is None else ratio))
        return crop(r_hat * i_hat, size)

    def _stage_pass(
        self, stage: str, low: Tensor, high: Tensor | None, sem: Sequence[Tensor] | None
    ) -> tuple[Tensor, ...]:
        if high is None:
            raise ValueError(f"the {stage!r} stage needs the normal-light image: pass high=")
        if stage == "decom":
            return (*self.decompose(low), *self.decompose(high))
        if stage not in ("adjust", "restore"):
            raise ValueError(
                f"unknown {type(self).__name__} stage {stage!r}; expected decom, adjust or restore"
            )
        with torch.no_grad():
            r_low, i_low = self.decompose(low)
            r_high, i_high = self.decompose(high)
        if stage == "adjust":
            r = illumination_ratio(i_low, i_high)
            brighten = torch.rand(low.shape[0], device=low.device) < 0.5
            pick = brighten.view(-1, 1, 1, 1)
            source = torch.where(pick, i_low, i_high)
            target = torch.where(pick, i_high, i_low)
            ratio = torch.where(brighten, 1 / r + 1e-4, r)
            return self.adjust_illumination(source, ratio), target
        with torch.no_grad():
            i_hat = self.adjust_illumination(i_low, illumination_ratio(i_high, i_low))
        return self.restore_reflectance(r_low, i_low, sem), r_high, i_hat

    @staticmethod
    def _ratio_map(i: Tensor, ratio: Ratio) -> Tensor:
        if not isinstance(ratio, Tensor):
            return torch.full_like(i, float(ratio))
        ratio = ratio.to(device=i.device, dtype=i.dtype)
        if ratio.dim() == 0:
            return ratio.expand_as(i)
        if ratio.dim() == 1 and ratio.shape[0] == i.shape[0]:
            return ratio.view(-1, 1, 1, 1).expand_as(i)
        if ratio.shape == i.shape:
            return ratio
        raise ValueError(
            f"ratio must be a number, a B-tensor or a B×1×H×W map like I {tuple(i.shape)}, got "
            f"shape {tuple(ratio.shape)}"
        )

    def _align(
        self, size: tuple[int, int], padded: Sequence[int], sem: Sequence[Tensor] | None
    ) -> list[Tensor] | None:
        """The priors fitted to their hosts on the padded image (:func:`models.semantics.align_priors`)."""
        checked = checked_sem(type(self).__name__, self.skf, sem)
        return None if checked is None else align_priors(checked, size, padded, self.restore.sem_scales)


class KinD(_KinDPipeline):
    """KinD (``DecomNet_simple`` + ``Restoration_net`` + ``Illumination_adjust_net``), optionally with SKF.

    Args:
        skf: build the SE blocks ``restore.att_block_{1,2,3}``; ``False`` is the plain baseline.
        decom_channels, restore_channels, adjust_channels: base widths (all 32 as released; the U-Nets
            double them per level).
        sem_channels: channels of F0, F1, F2 (the SKB's 48, 96, 192).
        se_factory: ``(sem_channels, channels) -> module`` building each SE block (default
            :class:`~models.se.SemanticEmbedding` with 2 heads and the gated-dconv FFN, factor 2.66).
    """

    stride = KinDRestorationNet.stride  # four 2× poolings in the restoration U-Net

    def __init__(
        self,
        skf: bool = False,
        decom_channels: int = 32,
        restore_channels: int = 32,
        adjust_channels: int = 32,
        sem_channels: Sequence[int] = (48, 96, 192),
        se_factory: SEFactory | None = None,
    ) -> None:
        super().__init__(skf, decom_channels, adjust_channels)
        self.restore = KinDRestorationNet(restore_channels, skf, sem_channels, se_factory)


class KinDPP(_KinDPipeline):
    """KinD++ (KinD's decomposition and adjustment nets + the MSIA restoration net), optionally with SKF.

    Arguments as :class:`KinD`. The restoration net has BatchNorm: ``train()`` uses batch statistics, as the
    original's ``training=True``; ``eval()`` the running ones, as its test scripts. ``bn_momentum`` is
    TF's ``1 - decay`` (0.01 as released): after a few hundred steps (a CPU smoke run) the running
    statistics are still mostly their initial 0 / 1 at 0.01, so the smoke network uses 0.1.
    """

    stride = KinDPPRestorationNet.stride  # MSIA's ×4 pooling

    def __init__(
        self,
        skf: bool = False,
        decom_channels: int = 32,
        restore_channels: int = 32,
        adjust_channels: int = 32,
        sem_channels: Sequence[int] = (48, 96, 192),
        se_factory: SEFactory | None = None,
        bn_momentum: float = 0.01,
    ) -> None:
        super().__init__(skf, decom_channels, adjust_channels)
        self.restore = KinDPPRestorationNet(restore_channels, skf, sem_channels, se_factory, bn_momentum)
