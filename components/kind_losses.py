"""Training losses of KinD (ACM MM 2019) and KinD++ (IJCV 2021), one function per training stage.

Read from ``zhangyhuaee/KinD`` (``decomposition_net_train.py``, ``reflectance_restoration_net_train.py``,
``adjustment_net_train.py``, ``utils.py``) and ``zhangyhuaee/KinD_plus`` (the same scripts, the adjustment
one named ``illumination_adjustment_net_train.py``). Each ``*_terms`` function returns the *unweighted*
named terms; ``KIND_DEFAULT_WEIGHTS`` / ``KINDPP_DEFAULT_WEIGHTS`` hold the released weights per stage and
:func:`kind_total` combines them.

Details kept from the originals, because they change the values:

* the gradient operator (:func:`kind_gradient`) is TF's ``conv2d`` with the 2×2 kernel [[0, 0], [-1, 1]]
  (its transpose for y) and ``SAME`` padding, i.e. one zero row/column appended at the bottom/right: the
  x-difference is taken on the *next* row and the y-difference on the *next* column, and the last
  row/column see the zero border (so a flat non-zero map has gradients there, and the smoothness terms
  vanish only for I = 0). The absolute value (KinD++'s adjustment loss uses the signed one) is
  min-max normalised with the min and max of the **whole batch** tensor, + 1e-4 in the denominator;
* gray is ``tf.image.rgb_to_grayscale`` (0.2989, 0.5870, 0.1140);
* SSIM (:func:`kind_ssim`) is ``utils.tf_ssim``: 11×11 Gaussian window, σ 1.5, C1 = 1e-4, C2 = 9e-4,
  per channel, but over ``VALID`` windows only, so it is not ``components.baseline_losses.ssim``
  (zero-padded borders, which count border windows half-filled with zeros); the window itself is the
  same and is reused;
* the restoration target is not the decomposed R_high itself: KinD trains towards R_high ** 1.2,
  KinD++ towards (0.99 · R_high) ** 1.2 ("to improve the contrast"), see :func:`kind_restore_target`.

Released stage settings (for recipes): inputs min-max normalised per image (``utils.load_images``);
Adam, lr 1e-4. Decomposition: batch 10, 48×48 patches, 2000 epochs (KinD++ 2500). KinD restoration:
batch 4, 384×384, lr halved after epoch 800, /4 after 1250, /10 after 1500. KinD++ restoration: batch 10,
48×48, lr /2 after epoch 300, /4 after 500, /8 after 1500. Adjustment: batch 10, 48×48, 2000 epochs,
ratios as in :func:`models.kind.illumination_ratio`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from components.baseline_losses import gaussian_window

__all__ = [
    "KINDPP_DEFAULT_WEIGHTS",
    "KIND_DEFAULT_WEIGHTS",
    "TF_GRAY_WEIGHTS",
    "kind_adjust_terms",
    "kind_decom_terms",
    "kind_gradient",
    "kind_restore_target",
    "kind_restore_terms",
    "kind_ssim",
    "kind_total",
    "kindpp_adjust_terms",
    "kindpp_restore_target",
    "kindpp_restore_terms",
    "rgb_to_gray",
]

TF_GRAY_WEIGHTS = (0.2989, 0.5870, 0.1140)

KIND_DEFAULT_WEIGHTS: dict[str, dict[str, float]] = {
    "decom": {
        "recon_low": 1.0,
        "recon_high": 1.0,
        "equal_r": 0.01,
        "i_mutual": 0.2,
        "i_input_mutual_low": 0.15,
        "i_input_mutual_high": 0.15,
    },
    "restore": {"square": 1.0, "ssim": 1.0, "grad": 1.0},
    "adjust": {"square": 1.0, "grad": 1.0},
}

# KinD++: reflectance similarity 0.009; restoration without the gradient term; the adjustment's gradient
# term is on signed gradients (kindpp_adjust_terms)
KINDPP_DEFAULT_WEIGHTS: dict[str, dict[str, float]] = {
    "decom": {**KIND_DEFAULT_WEIGHTS["decom"], "equal_r": 0.009},
    "restore": {"square": 1.0, "ssim": 1.0},
    "adjust": {"square": 1.0, "grad": 1.0},
}

Direction = Literal["x", "y"]


def rgb_to_gray(x: Tensor) -> Tensor:
    """B×3×H×W -> B×1×H×W, 0.2989 R + 0.5870 G + 0.1140 B (``tf.image.rgb_to_grayscale``)."""
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"rgb_to_gray expects B×3×H×W, got shape {tuple(x.shape)}")
    return (x * x.new_tensor(TF_GRAY_WEIGHTS).view(1, 3, 1, 1)).sum(dim=1, keepdim=True)


def kind_gradient(x: Tensor, direction: Direction, absolute: bool = True) -> Tensor:
    """(g − min g) / (max g − min g + 1e-4), g = |∂x| (or ∂x), min/max over the whole batch (``utils.gradient``)."""
    if x.dim() != 4 or x.shape[1] != 1:
        raise ValueError(f"kind_gradient expects B×1×H×W (a 1-channel TF kernel), got shape {tuple(x.shape)}")
    p = F.pad(x, (0, 1, 0, 1))  # TF SAME for a 2×2 kernel: one zero row and column at the bottom/right
    if direction == "x":
        g = p[..., 1:, 1:] - p[..., 1:, :-1]
    elif direction == "y":
        g = p[..., 1:, 1:] - p[..., :-1, 1:]
    else:
        raise ValueError(f"direction must be 'x' or 'y', got {direction!r}")
    if absolute:
        g = g.abs()
    lo, hi = g.amin(), g.amax()
    return (g - lo) / (hi - lo + 1e-4)


def kind_ssim(x: Tensor, y: Tensor, window_size: int = 11, sigma: float = 1.5) -> Tensor:
    """Mean over channels of SSIM over VALID 11×11 Gaussian (σ 1.5) windows, C1 1e-4, C2 9e-4 (``utils.tf_ssim``)."""
    if x.shape != y.shape or x.dim() != 4:
        raise ValueError(
            f"kind_ssim expects two B×C×H×W tensors of one shape, got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    if min(x.shape[-2:]) < window_size:
        raise ValueError(
            f"kind_ssim uses VALID {window_size}×{window_size} windows: H, W must be ≥ {window_size}"
        )
    c = x.shape[1]
    dtype = torch.promote_types(torch.promote_types(x.dtype, y.dtype), torch.float32)
    x, y = x.to(dtype), y.to(dtype)
    kernel = (
        gaussian_window(window_size, sigma, dtype).to(x.device).expand(5 * c, 1, window_size, window_size)
    )
    stats = F.conv2d(torch.cat((x, y, x * x, y * y, x * y), dim=1), kernel, groups=5 * c)
    mu_x, mu_y, e_xx, e_yy, e_xy = stats.split(c, dim=1)
    c1, c2 = 0.01**2, 0.03**2
    num = (2 * mu_x * mu_y + c1) * (2 * (e_xy - mu_x * mu_y) + c2)
    den = (mu_x * mu_x + mu_y * mu_y + c1) * ((e_xx - mu_x * mu_x) + (e_yy - mu_y * mu_y) + c2)
    return (num / den).mean(dim=(0, 2, 3)).mean()  # per channel, then the channels' average, as released


def _grad_difference(a: Tensor, b: Tensor, absolute: bool) -> Tensor:
    return (
        (kind_gradient(a, "x", absolute) - kind_gradient(b, "x", absolute)).square()
        + (kind_gradient(a, "y", absolute) - kind_gradient(b, "y", absolute)).square()
    ).mean()


def _mutual(i_low: Tensor, i_high: Tensor) -> Tensor:
    """mean(Σ_d (∇_d I_l + ∇_d I_h) · exp(−10 (∇_d I_l + ∇_d I_h))), KinD ``mutual_i_loss``."""
    total = 0.0
    for d in ("x", "y"):
        g = kind_gradient(i_low, d) + kind_gradient(i_high, d)
        total = total + g * torch.exp(-10 * g)
    return total.mean()


def _input_mutual(i: Tensor, image: Tensor) -> Tensor:
    """mean(Σ_d |∇_d I / max(∇_d gray(S), 0.01)|), KinD ``mutual_i_input_loss``."""
    gray = rgb_to_gray(image)
    total = 0.0
    for d in ("x", "y"):
        total = total + (kind_gradient(i, d) / kind_gradient(gray, d).clamp_min(0.01)).abs()
    return total.mean()


def kind_decom_terms(
    low: Tensor, high: Tensor, r_low: Tensor, i_low: Tensor, r_high: Tensor, i_high: Tensor
) -> dict[str, Tensor]:
    """|R·I − S| (low, high), |R_l − R_h|, Σ_d g·e^(−10g) with g = ∇_d I_l + ∇_d I_h, Σ_d |∇_d I / max(∇_d gray S, 0.01)| (decomposition_net_train.py)."""
    return {
        "recon_low": (r_low * i_low - low).abs().mean(),
        "recon_high": (r_high * i_high - high).abs().mean(),
        "equal_r": (r_low - r_high).abs().mean(),
        "i_mutual": _mutual(i_low, i_high),
        "i_input_mutual_low": _input_mutual(i_low, low),
        "i_input_mutual_high": _input_mutual(i_high, high),
    }


def kind_restore_terms(r_hat: Tensor, r_target: Tensor) -> dict[str, Tensor]:
    """(R̂ − R_t)², 1 − SSIM(R̂, R_t), (∇gray R̂ − ∇gray R_t)² (KinD ``reflectance_restoration_net_train.py``)."""
    return {
        "square": (r_hat - r_target).square().mean(),
        "ssim": 1 - kind_ssim(r_hat, r_target),
        "grad": _grad_difference(rgb_to_gray(r_hat), rgb_to_gray(r_target), absolute=True),
    }


def kindpp_restore_terms(r_hat: Tensor, r_target: Tensor) -> dict[str, Tensor]:
    """(R̂ − R_t)², 1 − SSIM(R̂, R_t) (KinD++ ``reflectance_restoration_net_train.py``: no gradient term)."""
    return {"square": (r_hat - r_target).square().mean(), "ssim": 1 - kind_ssim(r_hat, r_target)}


def kind_adjust_terms(i_hat: Tensor, i_target: Tensor) -> dict[str, Tensor]:
    """(Î − I_t)², (∇Î − ∇I_t)² on |gradients| (KinD ``adjustment_net_train.py``)."""
    return {
        "square": (i_hat - i_target).square().mean(),
        "grad": _grad_difference(i_hat, i_target, absolute=True),
    }


def kindpp_adjust_terms(i_hat: Tensor, i_target: Tensor) -> dict[str, Tensor]:
    """(Î − I_t)², (∇Î − ∇I_t)² on signed gradients (KinD++ ``gradient_no_abs``)."""
    return {
        "square": (i_hat - i_target).square().mean(),
        "grad": _grad_difference(i_hat, i_target, absolute=False),
    }


def kind_restore_target(r_high: Tensor) -> Tensor:
    """R_high ** 1.2, KinD's restoration target from the decomposed normal-light R."""
    return r_high.clamp_min(0) ** 1.2


def kindpp_restore_target(r_high: Tensor) -> Tensor:
    """(0.99 · R_high) ** 1.2, KinD++'s restoration target from the decomposed normal-light R."""
    return (0.99 * r_high.clamp_min(0)) ** 1.2


def kind_total(terms: Mapping[str, Tensor], weights: Mapping[str, float]) -> Tensor:
    """Σ_k weights[k] · terms[k]; the two must name the same terms."""
    if set(terms) != set(weights):
        raise ValueError(f"terms {sorted(terms)} and weights {sorted(weights)} name different terms")
    return torch.stack([weights[k] * terms[k] for k in terms]).sum()
