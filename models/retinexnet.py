"""RetinexNet (Wei et al., BMVC 2018, "Deep Retinex Decomposition for Low-Light Enhancement"), with SKF's SE
blocks in its Enhance-Net decoder.

Two sub-networks, trained in sequence (losses in :mod:`components.retinex_losses`):

* **Decom-Net** (:class:`DecomNet`) splits an image into reflectance R (3 ch) and illumination I (1 ch), both
  through a sigmoid. Its input is the RGB image with its per-pixel channel maximum stacked in front (a
  cheap illumination hint). One 9×9 conv (``kernel_size * 3``) to 64 channels without activation, five
  3×3 conv+ReLU layers, one 3×3 conv to 4 channels. The same weights decompose the low and the normal image.
* **Enhance-Net** (:class:`EnhanceNet`, the official ``RelightNet``) predicts the adjusted illumination
  Î from concat(R, I): an encoder of one 3×3 conv (no activation) and three stride-2 3×3 conv+ReLU layers
  (1/2, 1/4, 1/8), a decoder of resize-convolutions (nearest-neighbour resize to the skip's size, 3×3
  conv+ReLU, *then* add the encoder skip), and a multi-scale fusion: the two coarser decoder outputs are
  nearest-resized to full size, concatenated with the finest (3×64 ch), fused by a 1×1 conv and mapped to
  one channel by a 3×3 conv — neither with an activation, so Î is unbounded.

The enhanced image is R_low · Î (Î repeated over the three colour channels), the official ``output_S``.

Read from the official TensorFlow code (``weichen582/RetinexNet``, ``model.py``); written anew here:

* convolutions reproduce TensorFlow's ``padding='same'`` exactly: *zero* padding (several PyTorch ports
  use replicate padding; the original does not), and for the stride-2 convolutions TensorFlow's
  asymmetric split, the odd extra row/column going to the bottom/right (:class:`SameConv2d`);
* ``tf.image.resize_nearest_neighbor`` (legacy, no half-pixel centres) is ``F.interpolate(mode="nearest")``
  with an explicit target size: both read source index ⌊dst · in/out⌋;
* module names follow the TensorFlow variable names where the original names them
  (``shallow_feature_extraction``, ``activated_layers.{0..4}`` for ``activated_layer_{0..4}``,
  ``recon_layer``) and the original's Python variable names otherwise (``conv0..3``, ``deconv1..3``,
  ``feature_fusion``, ``output``); the released weights are TensorFlow checkpoints, so no PyTorch
  state-dict layout is claimed.

SKF (``skf=True``): the paper names no insertion point for RetinexNet (docs/method.md §6.4); here SE blocks
refine the three coarsest decoder features, each where it enters the next resize-conv stage (and, for
``deconv1``/``deconv2``, the fusion): ``att_block_3`` on ``conv3`` (1/8, F2 192 ch from 1/16),
``att_block_2`` on ``deconv1`` (1/4, F1 96 ch from 1/8), ``att_block_1`` on ``deconv2`` (1/2, F0 48 ch from
1/4); every prior is upsampled ×2, and the scales are released LLFlow-SKF's. The full-resolution stage gets
none: a 64-channel SE block there costs most of a plain Enhance-Net step. The Decom-Net gets none: it must
stay a pure decomposition (its losses tie R to both images).

Differences from the official code:

* the paper denoises R_low with BM3D before recombination; the released code does not (its ``test`` saves
  R_low · Î directly), and neither do we;
* :meth:`RetinexNet.forward` pads the input bottom/right to a multiple of 8 (:func:`models.padding
  .pad_to_multiple`) and crops back, as the other networks here do, so every decoder stage is exactly
  twice the one below and the priors align with :func:`models.padding.fit_prior`. Official-sized inputs
  (LOL's 600×400) are multiples of 8 and run exactly as released; the sub-networks themselves, like the
  original, accept any size unpadded (:meth:`RetinexNet.decompose`, :meth:`RetinexNet.relight`);
* the output is not clamped (the official ``save_images`` clips to [0, 1] only when writing PNGs).
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

__all__ = ["DecomNet", "EnhanceNet", "RetinexNet", "SameConv2d", "tf_same_padding"]


def tf_same_padding(size: int, kernel_size: int, stride: int) -> tuple[int, int]:
    """(before, after) zero padding of one axis under TensorFlow's ``padding='same'``.

    The output has ⌈size / stride⌉ samples; the total padding is what that needs and, when odd, the extra
    sample goes *after* (bottom/right). For stride 1 and an odd kernel this is the symmetric k // 2.
    """
    # integer arithmetic only (no math.ceil, no max for kernel >= stride, where the total cannot be
    # negative): under ONNX export ``size`` is a traced tensor and the padding stays symbolic
    out = (size + stride - 1) // stride
    total = (out - 1) * stride + kernel_size - size
    if kernel_size < stride:
        total = max(total, 0)
    return total // 2, total - total // 2


class SameConv2d(nn.Conv2d):
    """``nn.Conv2d`` with TensorFlow's ``padding='same'`` (zeros), so strided layers sample the same pixels.

    Stride 1 with an odd kernel pads symmetrically inside the convolution (no extra copy); otherwise the
    input is zero-padded per call, asymmetrically as TensorFlow does. Parameters are a plain conv's.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1) -> None:
        static = stride == 1 and kernel_size % 2 == 1
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding=kernel_size // 2 if static else 0
        )
        self._static = static

    def forward(self, x: Tensor) -> Tensor:
        if not self._static:
            k, s = self.kernel_size[0], self.stride[0]
            top, bottom = tf_same_padding(x.shape[-2], k, s)
            left, right = tf_same_padding(x.shape[-1], k, s)
            x = F.pad(x, (left, right, top, bottom))
        return super().forward(x)


class DecomNet(nn.Module):
    """Decom-Net: image → (R, I), each in (0, 1) through a sigmoid (official ``DecomNet``).

    Args:
        channels: feature width (official 64).
        kernel_size: kernel of the inner layers; the first layer uses ``3 * kernel_size`` (official 3, 9).
        layer_num: 3×3 conv+ReLU layers between the first and the last (official 5).
    """

    def __init__(self, channels: int = 64, kernel_size: int = 3, layer_num: int = 5) -> None:
        super().__init__()
        # input: [max over RGB, R, G, B]
        self.shallow_feature_extraction = SameConv2d(4, channels, kernel_size * 3)
        self.activated_layers = nn.ModuleList(
            SameConv2d(channels, channels, kernel_size) for _ in range(layer_num)
        )
        self.recon_layer = SameConv2d(channels, 4, kernel_size)

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor]:
        """``image``: B×3×H×W in [0, 1], any H, W. Returns R (B×3×H×W) and I (B×1×H×W)."""
        x = torch.cat((image.amax(dim=1, keepdim=True), image), dim=1)
        x = self.shallow_feature_extraction(x)  # no activation, as released
        for layer in self.activated_layers:
            x = F.relu(layer(x))
        x = torch.sigmoid(self.recon_layer(x))
        return x[:, :3], x[:, 3:4]


def _resize_to(x: Tensor, like: Tensor) -> Tensor:
    """Nearest-neighbour resize of ``x`` to ``like``'s spatial size (``tf.image.resize_nearest_neighbor``)."""
    if x.shape[-2:] == like.shape[-2:] and not exporting():  # exported: resize always (same size: a no-op)
        return x
    return F.interpolate(x, size=like.shape[-2:], mode="nearest")


class EnhanceNet(nn.Module):
    """Enhance-Net: (R, I) → adjusted illumination Î (B×1×H×W, unbounded) (official ``RelightNet``).

    Args:
        channels: feature width (official 64).
        kernel_size: kernel of every layer but the 1×1 fusion (official 3).
        skf: build the SE blocks ``att_block_{1,2,3}`` on the three decoder stages.
        sem_channels: channels of (F0, F1, F2) for ``att_block_1``, ``_2``, ``_3``.
        se_factory: ``(sem_channels, channels) -> module`` building each SE block (default: the
            GDFN SE block, 2 heads, factor 2.66).
    """

    def __init__(
        self,
        channels: int = 64,
        kernel_size: int = 3,
        skf: bool = False,
        sem_channels: Sequence[int] = (48, 96, 192),
        se_factory: SEFactory | None = None,
    ) -> None:
        super().__init__()
        self.skf = skf
        self.conv0 = SameConv2d(4, channels, kernel_size)  # input: [R, G, B, I]
        self.conv1 = SameConv2d(channels, channels, kernel_size, stride=2)
        self.conv2 = SameConv2d(channels, channels, kernel_size, stride=2)
        self.conv3 = SameConv2d(channels, channels, kernel_size, stride=2)
        self.deconv1 = SameConv2d(channels, channels, kernel_size)
        self.deconv2 = SameConv2d(channels, channels, kernel_size)
        self.deconv3 = SameConv2d(channels, channels, kernel_size)
        self.feature_fusion = SameConv2d(3 * channels, channels, 1)
        self.output = SameConv2d(channels, 1, kernel_size)
        if skf:
            if len(sem_channels) != 3:
                raise ValueError(f"sem_channels must give (F0, F1, F2) channels, got {tuple(sem_channels)}")
            build = se_factory or partial(SemanticEmbedding, heads=2, ffn="gdfn", ffn_factor=2.66)
            self.att_block_1 = build(sem_channels[0], channels)  # F0 (1/4) -> deconv2 at 1/2
            self.att_block_2 = build(sem_channels[1], channels)  # F1 (1/8) -> deconv1 at 1/4
            self.att_block_3 = build(sem_channels[2], channels)  # F2 (1/16) -> conv3 at 1/8

    def forward(self, R: Tensor, I: Tensor, sem: Sequence[Tensor] | None = None) -> Tensor:  # noqa: E741
        """``R``: B×3×H×W, ``I``: B×1×H×W, any H, W; ``sem``: (F0, F1, F2), already aligned to the image
        (required iff ``skf``; each is nearest-resized to its host by the SE block)."""
        if (sem is None) == self.skf:
            raise ValueError(
                "EnhanceNet needs sem=(F0, F1, F2) when built with skf=True and refuses it otherwise; "
                f"built with skf={self.skf}, got sem={'None' if sem is None else 'priors'}"
            )
        conv0 = self.conv0(torch.cat((R, I), dim=1))  # no activation, as released
        conv1 = F.relu(self.conv1(conv0))
        conv2 = F.relu(self.conv2(conv1))
        conv3 = F.relu(self.conv3(conv2))
        if sem is not None:
            conv3 = self.att_block_3(conv3, sem[2])
        # resize-conv stages: ReLU first, then the skip is added (as released)
        deconv1 = F.relu(self.deconv1(_resize_to(conv3, conv2))) + conv2
        if sem is not None:
            deconv1 = self.att_block_2(deconv1, sem[1])
        deconv2 = F.relu(self.deconv2(_resize_to(deconv1, conv1))) + conv1
        if sem is not None:
            deconv2 = self.att_block_1(deconv2, sem[0])
        deconv3 = F.relu(self.deconv3(_resize_to(deconv2, conv0))) + conv0
        gathered = torch.cat((_resize_to(deconv1, deconv3), _resize_to(deconv2, deconv3), deconv3), dim=1)
        return self.output(self.feature_fusion(gathered))  # neither layer has an activation


class RetinexNet(nn.Module):
    """RetinexNet: ``decom`` (:class:`DecomNet`) then ``enhance`` (:class:`EnhanceNet`); output R_low · Î.

    Args:
        skf: build the SE blocks ``enhance.att_block_{1,2,3}`` (RetinexNet-SKF); ``False`` is the plain
            baseline.
        channels: feature width of both sub-networks (official 64).
        kernel_size: conv kernel (official 3; Decom-Net's first layer uses 3× this).
        layer_num: Decom-Net's activated layers (official 5).
        sem_channels: channels of the priors (F0, F1, F2) (HRNet-W48 SKB: 48, 96, 192).
        se_factory: ``(sem_channels, channels) -> module`` building each SE block (default: GDFN SE
            block, 2 heads, factor 2.66).
        channels_last: the memory layout inside (the output is NCHW either way); ``None`` picks
            channels-last on CPU and NCHW on CUDA (:func:`models.padding.working_layout`).
    """

    stride = 8  # three stride-2 convs in the Enhance-Net encoder
    #: Which SKB outputs ``sem`` must hold, in order (att_block_1, att_block_2, att_block_3).
    sem_inputs = ("F0", "F1", "F2")

    def __init__(
        self,
        skf: bool = False,
        channels: int = 64,
        kernel_size: int = 3,
        layer_num: int = 5,
        sem_channels: Sequence[int] = (48, 96, 192),
        se_factory: SEFactory | None = None,
        channels_last: bool | None = None,
    ) -> None:
        super().__init__()
        self.skf = skf
        self.channels_last = channels_last
        self.decom = DecomNet(channels, kernel_size, layer_num)
        self.enhance = EnhanceNet(channels, kernel_size, skf, sem_channels, se_factory)

    def decompose(self, image: Tensor) -> tuple[Tensor, Tensor]:
        """R (B×3×H×W) and I (B×1×H×W), both in (0, 1), of a B×3×H×W image in [0, 1]; any H, W."""
        self._check_image(image)
        return self.decom(image)

    def relight(self, R: Tensor, I: Tensor, sem: Sequence[Tensor] | None = None) -> Tensor:  # noqa: E741
        """Adjusted illumination Î (B×1×H×W) for a decomposition (R, I) of any size, unpadded (as released).

        ``sem`` = (F0, F1, F2) for an image of R's size (required iff built with ``skf=True``)."""
        # unpadded, each host is ⌈size / k⌉ (TensorFlow 'same'), the priors' own extent: the SE blocks
        # nearest-resize them as released, no fitting needed
        return self.enhance(R, I, self._validate(sem))

    def forward(
        self,
        low: Tensor,
        sem: Sequence[Tensor] | None = None,
        *,
        stage: str | None = None,
        high: Tensor | None = None,
    ) -> Tensor | tuple[Tensor, ...]:
        """``low``: B×3×H×W in [0, 1], any H, W; ``sem``: (F0, F1, F2) from the SKB (required iff
        ``skf=True``). Returns the enhanced image R_low · Î, B×3×H×W (not clamped).

        ``stage`` runs one training stage's pass instead (through ``forward``, so a DDP-wrapped network
        trains through it): ``"decom"`` returns (R_low, I_low, R_high, I_high) of ``low`` and ``high``;
        ``"relight"`` returns (R_low, Î) with the decomposition computed without gradients (the Decom-Net
        is frozen in that stage, as in the original's second phase).
        """
        if stage == "decom":
            if high is None:
                raise ValueError("the decom stage decomposes low and high: pass high=")
            return (*self.decompose(low), *self.decompose(high))
        if stage == "relight":
            with torch.no_grad():
                R, I = self.decompose(low)  # noqa: E741
            return R, self.relight(R, I, sem)
        if stage is not None:
            raise ValueError(f"unknown RetinexNet stage {stage!r}; expected 'decom' or 'relight'")
        self._check_image(low)
        size = (low.shape[-2], low.shape[-1])
        x = working_layout(pad_to_multiple(low, self.stride), self.channels_last)
        priors = self._align(size, x.shape[-2:], sem)
        R, I = self.decom(x)  # noqa: E741
        out = R * self.enhance(R, I, priors)  # Î broadcast over RGB == the official concat of three copies
        return crop(out, size).contiguous()

    @staticmethod
    def _check_image(image: Tensor) -> None:
        if image.dim() != 4 or image.shape[1] != 3:
            raise ValueError(f"RetinexNet expects B×3×H×W RGB, got shape {tuple(image.shape)}")

    def _validate(self, sem: Sequence[Tensor] | None) -> Sequence[Tensor] | None:
        """``sem`` itself after checking it suits the model (:func:`models.semantics.checked_sem`)."""
        return checked_sem("RetinexNet", self.skf, sem)

    def _align(
        self, size: tuple[int, int], padded: Sequence[int], sem: Sequence[Tensor] | None
    ) -> list[Tensor] | None:
        """The priors fitted to the hosts of a padded image (:func:`models.padding.fit_prior`)."""
        sem = self._validate(sem)
        # host scales of att_block_1 (deconv2), _2 (deconv1), _3 (conv3)
        return None if sem is None else align_priors(sem, size, padded, (2, 4, 8))
