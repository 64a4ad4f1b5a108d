"""PSNR and SSIM exactly as scikit-image computes them, batched in torch (CPU or GPU).

The official SKF ``evaluation.py`` scores uint8 RGB images with ``skimage.metrics``; these functions
reproduce those numbers (float64, to 1e-10 in practice) without a per-image NumPy round trip. Inputs are
float (N, C, H, W) tensors on 8-bit levels k/255, as :meth:`Protocol.prepare` returns them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_RANGE = 255.0


def _levels(x: torch.Tensor) -> torch.Tensor:
    return (x.to(torch.float64) * _RANGE).round()


def psnr_uint8(output: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``peak_signal_noise_ratio(ref, out, data_range=255)`` per image, shape (N,); ``inf`` when equal."""
    mse = (_levels(output) - _levels(reference)).pow(2).mean(dim=(1, 2, 3))
    return 10.0 * torch.log10(_RANGE**2 / mse)


def ssim_uint8(output: torch.Tensor, reference: torch.Tensor, win_size: int = 7) -> torch.Tensor:
    """``structural_similarity(ref, out, channel_axis=-1, data_range=255)`` per image, shape (N,).

    Uniform ``win_size`` window, sample covariance (``N/(N-1)``), K1=0.01, K2=0.03; the SSIM map is
    averaged over the window-valid region of each channel (skimage crops ``(win_size-1)//2`` pixels of
    border), then over channels.
    """
    if min(output.shape[-2:]) < win_size:
        raise ValueError(
            f"SSIM with a {win_size}x{win_size} window needs images at least that large, got {tuple(output.shape)}"
        )
    x, y = _levels(output), _levels(reference)
    n, c, h, w = x.shape
    # Filter all five statistics of all channels in one pooling call.
    stack = torch.cat([x, y, x * x, y * y, x * y], dim=1).view(n * 5 * c, 1, h, w)
    mx, my, mxx, myy, mxy = (
        F.avg_pool2d(stack, win_size, stride=1).view(n, 5, c, h - win_size + 1, -1).unbind(1)
    )
    cov_norm = win_size**2 / (win_size**2 - 1.0)
    vx = cov_norm * (mxx - mx * mx)
    vy = cov_norm * (myy - my * my)
    vxy = cov_norm * (mxy - mx * my)
    c1 = (0.01 * _RANGE) ** 2
    c2 = (0.03 * _RANGE) ** 2
    ssim_map = ((2 * mx * my + c1) * (2 * vxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return ssim_map.mean(dim=(1, 2, 3))
