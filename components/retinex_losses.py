"""RetinexNet's training losses (Wei et al., BMVC 2018), as in the official TensorFlow ``model.py``.

RetinexNet trains in two phases with separate optimisers (``var_list``): the Decom-Net on the
decomposition loss, then the Enhance-Net ("RelightNet") on the relight loss. In the original graph the
relight loss does reach the decomposition outputs R_low and I_low, but the relight optimiser only updates
the RelightNet variables, so the decomposition stays fixed in that phase; the equivalent here is to
*detach* R_low and I_low before the Enhance-Net (the training routine does; these functions do not).

Terms are returned unweighted, by the official attribute names (``recon_loss_mutal_*`` spelled
``mutual``); :data:`RETINEX_DEFAULT_WEIGHTS` holds the official weights, read from ``loss_Decom`` and
``loss_Relight``. R is B×3×H×W, I is B×1×H×W (broadcast over RGB, the official concat of three copies).

The illumination smoothness (:func:`illumination_smoothness`, the official ``smooth``) weights the
illumination's gradient by exp(−10 · the 3×3 mean of the reflectance's gradient), on the grey reflectance.
The official code does *not* take a plain per-pixel ∇R: it box-filters |∇R| first (``ave_gradient``). Its
2×2 difference kernels with TensorFlow's ``padding='same'`` zero-pad one row and column at the bottom/right,
so the last row/column see a step to 0 and a constant illumination does *not* score 0: only its interior
does (:func:`image_gradient`).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "GRAY_WEIGHTS",
    "RETINEX_DEFAULT_WEIGHTS",
    "box_mean3",
    "illumination_smoothness",
    "image_gradient",
    "retinex_decom_terms",
    "retinex_relight_terms",
    "rgb_to_gray",
]

#: ``tf.image.rgb_to_grayscale``'s weights (they sum to 0.9999, as released).
GRAY_WEIGHTS = (0.2989, 0.5870, 0.1140)

#: Official weights: ``loss_Decom`` and ``loss_Relight`` of ``model.py``. Note equal_R is 0.01 in the code.
RETINEX_DEFAULT_WEIGHTS: dict[str, dict[str, float]] = {
    "decom": {
        "recon_loss_low": 1.0,
        "recon_loss_high": 1.0,
        "recon_loss_mutual_low": 0.001,
        "recon_loss_mutual_high": 0.001,
        "equal_R_loss": 0.01,
        "Ismooth_loss_low": 0.1,
        "Ismooth_loss_high": 0.1,
    },
    "relight": {"relight_loss": 1.0, "Ismooth_loss_delta": 3.0},
}


def rgb_to_gray(rgb: Tensor) -> Tensor:
    """gray = 0.2989·R + 0.5870·G + 0.1140·B (B×3×H×W → B×1×H×W), ``tf.image.rgb_to_grayscale``."""
    if rgb.dim() != 4 or rgb.shape[1] != 3:
        raise ValueError(f"rgb_to_gray expects B×3×H×W, got shape {tuple(rgb.shape)}")
    w = rgb.new_tensor(GRAY_WEIGHTS).view(1, 3, 1, 1)
    return (rgb * w).sum(dim=1, keepdim=True)


def image_gradient(x: Tensor, direction: str) -> Tensor:
    """|∂x| = |x[i+1, j+1] − x[i+1, j]| ("x") or |x[i+1, j+1] − x[i, j+1]| ("y"), zeros outside (official
    ``gradient``: kernel [[0, 0], [−1, 1]] or its transpose, TF ``padding='same'`` = pad bottom/right by 1)."""
    p = F.pad(x, (0, 1, 0, 1))
    if direction == "x":
        return (p[..., 1:, 1:] - p[..., 1:, :-1]).abs()
    if direction == "y":
        return (p[..., 1:, 1:] - p[..., :-1, 1:]).abs()
    raise ValueError(f"direction must be 'x' or 'y', got {direction!r}")


def box_mean3(x: Tensor) -> Tensor:
    """3×3 mean over the pixels inside the image (official ``average_pooling2d(3, 1, 'same')``, which
    leaves the padding out of the count)."""
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


def illumination_smoothness(illumination: Tensor, reflectance: Tensor) -> Tensor:
    """mean(|∂ₓI|·exp(−10·box3(|∂ₓ gray(R)|)) + |∂ᵧI|·exp(−10·box3(|∂ᵧ gray(R)|))), official ``smooth``."""
    gray = rgb_to_gray(reflectance)
    total = 0
    for d in ("x", "y"):
        total = total + image_gradient(illumination, d) * (-10 * box_mean3(image_gradient(gray, d))).exp()
    return total.mean()


def _l1(a: Tensor, b: Tensor) -> Tensor:
    return (a - b).abs().mean()


def retinex_decom_terms(
    low: Tensor, high: Tensor, R_low: Tensor, I_low: Tensor, R_high: Tensor, I_high: Tensor
) -> dict[str, Tensor]:
    """The unweighted terms of the official ``loss_Decom`` (weights: ``RETINEX_DEFAULT_WEIGHTS["decom"]``).

    * ``recon_loss_low``: mean|R_low·I_low − low|; ``recon_loss_high``: mean|R_high·I_high − high|;
    * ``recon_loss_mutual_low``: mean|R_high·I_low − low|; ``recon_loss_mutual_high``: mean|R_low·I_high −
      high| (official ``recon_loss_mutal_*``);
    * ``equal_R_loss``: mean|R_low − R_high| (reflectance consistency);
    * ``Ismooth_loss_low``: smoothness(I_low, R_low); ``Ismooth_loss_high``: smoothness(I_high, R_high).
    """
    return {
        "recon_loss_low": _l1(R_low * I_low, low),
        "recon_loss_high": _l1(R_high * I_high, high),
        "recon_loss_mutual_low": _l1(R_high * I_low, low),
        "recon_loss_mutual_high": _l1(R_low * I_high, high),
        "equal_R_loss": _l1(R_low, R_high),
        "Ismooth_loss_low": illumination_smoothness(I_low, R_low),
        "Ismooth_loss_high": illumination_smoothness(I_high, R_high),
    }


def retinex_relight_terms(R_low: Tensor, I_delta: Tensor, high: Tensor) -> dict[str, Tensor]:
    """The unweighted terms of the official ``loss_Relight`` (weights: ``RETINEX_DEFAULT_WEIGHTS["relight"]``).

    * ``relight_loss``: mean|R_low·Î − high|;
    * ``Ismooth_loss_delta``: smoothness(Î, R_low).

    Pass a detached ``R_low`` to train the Enhance-Net alone, as the official second phase does.
    """
    return {
        "relight_loss": _l1(R_low * I_delta, high),
        "Ismooth_loss_delta": illumination_smoothness(I_delta, R_low),
    }
