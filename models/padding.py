"""Padding and layout helpers shared by the baseline networks.

The official DRBN and SNR networks only work when H and W are multiples of their internal stride
(strided convs give ⌈·/2⌉, transposed convs / PixelShuffle give exactly ×2, and SNR's 4×4 patch fold drops
remainders). We pad the bottom/right edges, run the network, and crop back, so any H×W works and inputs
that already are multiples run exactly as released. :func:`working_layout` picks the memory layout the
networks run in.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["crop", "exporting", "fit_prior", "pad_to_multiple", "scaled_size", "working_layout"]


def exporting() -> bool:
    """Whether ``torch.onnx.export`` is tracing the model. Shape-dependent shortcuts (skip a zero pad, skip a
    same-size resize, the SE blocks' integer-factor path) then take their general form, which gives the same
    result for every size, so the traced graph is valid for any H, W and not only the traced one."""
    return torch.onnx.is_in_onnx_export()


def working_layout(x: Tensor, channels_last: bool | None) -> Tensor:
    """``x`` in the memory layout a network runs in: channels-last if asked or, for ``None``, on CPU (where
    oneDNN's convolutions on narrow maps and the SE blocks' per-pixel LayerNorms need no reorders);
    otherwise unchanged (NCHW, the official layout, which measured as fast or faster on an H100)."""
    if channels_last or (channels_last is None and x.device.type == "cpu"):
        return x.contiguous(memory_format=torch.channels_last)
    return x


def scaled_size(size: tuple[int, int], scale: int) -> tuple[int, int]:
    """Spatial size at 1/``scale`` resolution under stride-2 halvings: (⌈H/s⌉, ⌈W/s⌉)."""
    # integer ceil (not math.ceil): under ONNX export the sizes are traced tensors and stay symbolic
    return (size[0] + scale - 1) // scale, (size[1] + scale - 1) // scale


def pad_to_multiple(x: Tensor, multiple: int) -> Tensor:
    """Pad the bottom/right of a B×C×H×W tensor to multiples of ``multiple``.

    Reflect padding (as SNR's own ``padtensor``) when the image is large enough for it, replicate
    otherwise (reflect needs pad < size). A no-op when H and W already are multiples; under ONNX export
    (:func:`exporting`) the pad is recorded even then, its amounts computed from the traced shape (zero
    where H or W already is a multiple). The mode is that of the traced size, so a graph traced with
    reflect padding needs H, W >= ``multiple``.
    """
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph == 0 and pw == 0 and not exporting():
        return x
    mode = "reflect" if ph < h and pw < w else "replicate"
    return F.pad(x, (0, pw, 0, ph), mode=mode)


def crop(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Top-left crop of the last two dimensions to ``size``."""
    return x[..., : size[0], : size[1]]


def fit_prior(sem: Tensor, valid: tuple[int, int], padded: tuple[int, int]) -> Tensor:
    """Align a semantic feature with a host feature computed on a padded image.

    ``sem`` covers the *unpadded* image. It is nearest-resized onto the valid host region ``valid`` (the
    same resize the SE block does in the official code, where host and image coincide) and then
    replicate-padded to the host's ``padded`` size, so semantics stay aligned with image content. When no
    padding happened the prior is returned as it is: the SE block resizes it itself (nearest, exactly as
    the official code) and, for an integer factor, runs its semantic branch at the prior's resolution.
    Under ONNX export (:func:`exporting`) the resize and the pad are always recorded (a same-size nearest
    resize and a zero pad change nothing), and the SE block then resizes nothing.
    """
    ph, pw = padded[0] - valid[0], padded[1] - valid[1]
    if exporting():
        return F.pad(F.interpolate(sem, size=valid, mode="nearest"), (0, pw, 0, ph), mode="replicate")
    if not (ph or pw):
        return sem
    if tuple(sem.shape[-2:]) != tuple(valid):
        sem = F.interpolate(sem, size=valid, mode="nearest")
    return F.pad(sem, (0, pw, 0, ph), mode="replicate")
