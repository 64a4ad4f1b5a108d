"""Reconstruction losses of the plain baselines (docs/method.md §7); SKF's SCH/SA live elsewhere.

* ``ssim-pyramid`` (DRBN): −[SSIM(ŷ₁, y) + SSIM(ŷ₂, y[::2, ::2]) + SSIM(ŷ₄, y[::4, ::4])] with the
  11×11 Gaussian-window SSIM (σ 1.5, C1 1e-4, C2 9e-4, zero padding, per channel, mean over everything)
  of DRBN's ``pytorch_ssim``. Identical images give −3.
* ``charbonnier`` (SNR): Σ √((ŷ − y)² + ε) with ε = 1e-6, *summed* over all elements as released (so
  its scale grows with batch and crop size — the official learning rate was tuned for that).
* ``flow-nll`` (LLFlow): the mean negative log-likelihood, in bits per pixel, of the GT's latent under a
  unit Gaussian centred on the colour map μ or, with probability ``gt_ratio`` per batch, on the GT's own
  chromaticity (docs/method.md §6.3).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.llflow import FlowEncoding, nll_bits

__all__ = [
    "BASELINE_LOSSES",
    "CharbonnierLoss",
    "FlowNLLLoss",
    "SSIMPyramidLoss",
    "build_baseline_loss",
    "gaussian_window",
    "ssim",
]


def gaussian_window(size: int = 11, sigma: float = 1.5, dtype: torch.dtype = torch.float32) -> Tensor:
    """Normalised 2-D Gaussian window (size×size), the outer product of a 1-D Gaussian."""
    coords = torch.arange(size, dtype=torch.float64) - size // 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    return torch.outer(g, g).to(dtype)


def ssim(
    x: Tensor,
    y: Tensor,
    window_size: int = 11,
    sigma: float = 1.5,
    c1: float = 1e-4,
    c2: float = 9e-4,
    window: Tensor | None = None,
) -> Tensor:
    """Mean SSIM of two B×C×H×W images (data range 1), per channel, zero-padded borders.

    The five local statistics (μx, μy, E[x²], E[y²], E[xy]) come from one grouped conv over a stacked
    5·C-channel tensor, always in at least fp32: under AMP the prediction arrives in fp16/bf16 next to an
    fp32 target, and the variance terms (E[x²] − μx², against c2 = 9e-4) cancel badly in half precision.
    """
    if x.shape != y.shape or x.dim() != 4:
        raise ValueError(
            f"ssim expects two B×C×H×W tensors of one shape, got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    c = x.shape[1]
    dtype = torch.promote_types(torch.promote_types(x.dtype, y.dtype), torch.float32)
    x, y = x.to(dtype), y.to(dtype)
    if window is None:
        window = gaussian_window(window_size, sigma, dtype)
    window = window.to(device=x.device, dtype=dtype)
    kernel = window.expand(5 * c, 1, *window.shape[-2:])
    stats = F.conv2d(
        torch.cat((x, y, x * x, y * y, x * y), dim=1), kernel, padding=window.shape[-1] // 2, groups=5 * c
    )
    mu_x, mu_y, e_xx, e_yy, e_xy = stats.split(c, dim=1)
    mu_xx, mu_yy, mu_xy = mu_x * mu_x, mu_y * mu_y, mu_x * mu_y
    num = (2 * mu_xy + c1) * (2 * (e_xy - mu_xy) + c2)
    den = (mu_xx + mu_yy + c1) * ((e_xx - mu_xx) + (e_yy - mu_yy) + c2)
    return (num / den).mean()


class SSIMPyramidLoss(nn.Module):
    """DRBN loss: −Σ_s SSIM(ŷ_s, y[::s, ::s]) over the network's (full, half, quarter) outputs."""

    def __init__(self, window_size: int = 11, sigma: float = 1.5, c1: float = 1e-4, c2: float = 9e-4) -> None:
        super().__init__()
        self.c1, self.c2 = c1, c2
        self.register_buffer("window", gaussian_window(window_size, sigma), persistent=False)

    def forward(self, outputs: Sequence[Tensor], target: Tensor) -> Tensor:
        """``outputs``: (ŷ₁, ŷ₂, ŷ₄, ...) at strides 1, 2, 4, ...; ``target``: full-resolution y."""
        if isinstance(outputs, Tensor):
            outputs = (outputs,)
        total = target.new_zeros(())
        for level, pred in enumerate(outputs):
            stride = 2**level
            ref = target[..., ::stride, ::stride]
            if pred.shape != ref.shape:
                raise ValueError(
                    f"output {level} has shape {tuple(pred.shape)} but y[::{stride}, ::{stride}] has "
                    f"{tuple(ref.shape)}; outputs must be ordered full, half, quarter resolution"
                )
            total = total - ssim(pred, ref, c1=self.c1, c2=self.c2, window=self.window)
        return total


class CharbonnierLoss(nn.Module):
    """Σ √((x − y)² + eps) (``reduction="sum"``, SNR's ``cb``) or its mean."""

    def __init__(self, eps: float = 1e-6, reduction: Literal["sum", "mean"] = "sum") -> None:
        super().__init__()
        if reduction not in ("sum", "mean"):
            raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
        self.eps, self.reduction = eps, reduction

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:
        if isinstance(pred, (tuple, list)):  # multi-output networks: the first output is the image
            pred = pred[0]
        if pred.shape != target.shape:
            raise ValueError(f"Charbonnier: prediction {tuple(pred.shape)} vs target {tuple(target.shape)}")
        value = torch.sqrt((pred - target) ** 2 + self.eps)
        return value.sum() if self.reduction == "sum" else value.mean()


class FlowNLLLoss(nn.Module):
    """LLFlow's objective: mean NLL (bits per pixel) of the encoded GT under N(μ, I).

    μ is chosen once per batch by :meth:`choose_mean` (the routine needs the same μ for SCH): the
    encoder's colour map, or with probability ``gt_ratio`` the GT chromaticity y / (Σ_c y + 1e-4) (released
    ``train_gt_ratio`` 0.2). The draw uses torch's global generator, so a resumed run repeats it.
    """

    def __init__(self, gt_ratio: float = 0.2) -> None:
        super().__init__()
        if not 0.0 <= gt_ratio <= 1.0:
            raise ValueError(f"gt_ratio must be in [0, 1], got {gt_ratio}")
        self.gt_ratio = float(gt_ratio)

    def choose_mean(self, color_map: Tensor, target: Tensor) -> Tensor:
        if float(torch.rand(())) < self.gt_ratio:
            return target / (target.sum(dim=1, keepdim=True) + 1e-4)
        return color_map

    def forward(self, outputs: FlowEncoding, target: Tensor) -> Tensor:
        if not isinstance(outputs, FlowEncoding) or outputs.mean is None:
            raise ValueError("flow-nll scores an LLFlow encoding with its chosen mean (FlowEncoding.mean)")
        return nll_bits(outputs.z, outputs.mean, outputs.logdet).mean()


#: Loss names a recipe's ``losses`` section may use, with their constructors.
BASELINE_LOSSES: dict[str, Callable[..., nn.Module]] = {
    "ssim-pyramid": SSIMPyramidLoss,
    "charbonnier": CharbonnierLoss,
    "flow-nll": FlowNLLLoss,
}


def build_baseline_loss(name: str, **params: object) -> nn.Module:
    """Instantiate a baseline loss by recipe name (``ssim-pyramid``, ``charbonnier``, ``flow-nll``)."""
    try:
        factory = BASELINE_LOSSES[name]
    except KeyError:
        raise ValueError(
            f"unknown baseline loss {name!r}; available: {', '.join(sorted(BASELINE_LOSSES))}"
        ) from None
    return factory(**params)
