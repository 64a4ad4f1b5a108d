"""Evaluation protocols: how images are prepared and which PSNR/SSIM variant is computed.

Numbers from different low-light papers are not comparable unless the protocol is fixed, so every number
this package produces carries its protocol (:meth:`Protocol.record`). Four protocols:

``raw``
    float RGB in [0, 1] (outputs clamped), pyiqa ``psnr`` (RGB, data range 1, ``eps=1e-8`` so identical
    images score 80 dB instead of infinity) and pyiqa ``ssimc`` (RGB, 11x11 Gaussian window sigma 1.5,
    valid region, inputs rounded to 8-bit levels inside pyiqa). RGB SSIM is chosen over pyiqa's default
    Y-channel ``ssim`` so PSNR and SSIM look at the same signal, as the official SKF evaluation does.
``gt-mean``
    ``raw`` after the LLFlow/KinD brightness rescale: the output is multiplied by
    ``mean_gray(GT) / mean_gray(output)`` (BT.601 luma, as the released code computes both means with
    OpenCV's gray conversion), then clamped to [0, 1]. Removes global exposure error from the score.
``paper``
    the official SKF ``evaluation.py``: 8-bit RGB (outputs rounded to uint8 levels, as when saved to PNG),
    skimage ``peak_signal_noise_ratio`` (range 255; identical images give ``inf``) and
    ``structural_similarity(channel_axis=-1, data_range=255)`` (7x7 uniform window, sample covariance,
    per-channel mean), LPIPS on ``x / 127.5 - 1``. Implemented in torch (:mod:`.skimage_compat`).
``paper-gt-mean``
    the LLFlow-SKF ``test.py``/``Measure.py`` numbers: ``paper`` metrics after the GT-mean rescale of the
    *float* output: multiplied by the GT's gray mean (the gray weights of OpenCV's BGR2GRAY applied to an
    RGB array: R and B swapped, a quirk of the released code) over the mean of all the output's RGB values,
    clamped, and only then truncated (not rounded) to uint8.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BT601 = (0.299, 0.587, 0.114)
BT601_SWAPPED = (0.114, 0.587, 0.299)  # cv2.COLOR_BGR2GRAY applied to RGB data

_PSNR_VARIANTS = {
    "pyiqa": "pyiqa psnr: RGB, MSE over all channels, data range 1, eps 1e-8 (identical images: 80 dB)",
    "skimage": "skimage peak_signal_noise_ratio: uint8 RGB, data range 255 (identical images: inf)",
}
_SSIM_VARIANTS = {
    "pyiqa-ssimc": "pyiqa ssimc: RGB, 11x11 Gaussian window sigma 1.5, valid region, 8-bit rounded inputs",
    "skimage": "skimage structural_similarity: uint8 RGB, 7x7 uniform window, sample covariance, "
    "K1 0.01 K2 0.03, data range 255, per-channel mean",
}


@dataclass(frozen=True)
class Protocol:
    """How outputs and references are prepared, and which metric variants are computed on them."""

    name: str
    description: str
    eight_bit: bool  # evaluate on uint8 levels (values k/255)
    brightness: str = "none"  # "none" or "gt-mean"
    gray_weights: tuple[float, float, float] = BT601
    requantise: str = (
        "round"  # 8-bit protocols: how the rescaled output returns to uint8 ("round"/"truncate")
    )
    psnr: str = "pyiqa"  # key of _PSNR_VARIANTS
    ssim: str = "pyiqa-ssimc"  # key of _SSIM_VARIANTS
    #: GT-mean divisor: the output's gray mean, or (LLFlow's test.py) the mean over all its RGB values
    output_mean: str = "gray"
    #: 8-bit protocols: round the output to uint8 before the GT-mean rescale (False: rescale the float
    #: output, then quantise once, as LLFlow's test.py)
    quantise_output_first: bool = True

    def record(self) -> dict[str, str]:
        """The protocol as flat strings, stored with every number (report, CSV, MLflow params)."""
        scale = "none"
        if self.brightness == "gt-mean":
            w = ", ".join(f"{v:g}" for v in self.gray_weights)
            divisor = "mean_gray(output)" if self.output_mean == "gray" else "mean over RGB(output)"
            scale = f"output *= mean_gray(GT)/{divisor}, gray = ({w}) . RGB, then clamp"
        return {
            "protocol": self.name,
            "colour_space": "RGB",
            "data_range": "uint8 levels 0..255" if self.eight_bit else "float [0, 1]",
            "quantisation": (
                f"round to uint8; rescaled output: {self.requantise}" if self.eight_bit else "none (float)"
            ),
            "brightness": scale,
            "psnr_variant": _PSNR_VARIANTS[self.psnr],
            "ssim_variant": _SSIM_VARIANTS[self.ssim],
            "lpips_input": "pyiqa lpips (AlexNet, v0.1) on 2*x-1 of the prepared image (= x/127.5-1 on uint8)",
            "niqe_input": "pyiqa niqe on the prepared output, Y channel",
        }

    def prepare(
        self, output: torch.Tensor, reference: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Float (N, 3, H, W) images in [0, 1] as this protocol scores them (8-bit protocols: on k/255)."""
        out = _to_unit_float(output).clamp(0.0, 1.0)
        ref = None if reference is None else _to_unit_float(reference)
        if ref is not None and (ref.min() < 0 or ref.max() > 1):
            raise ValueError(
                f"reference images must lie in [0, 1] (got {ref.min().item():.4f}..{ref.max().item():.4f}); "
                "pass uint8 tensors or divide by 255"
            )
        rescale = self.brightness == "gt-mean"
        if self.eight_bit:
            if self.quantise_output_first or not rescale:
                out = quantise(out, "round")
            ref = None if ref is None else quantise(ref, "round")
        if rescale:
            if ref is None:
                raise ValueError(f"protocol {self.name!r} rescales by the reference: it needs paired images")
            out = gt_mean_rescale(out, ref, self.gray_weights, output_mean=self.output_mean)
            if self.eight_bit:
                out = quantise(out, self.requantise)
        return out, ref


def _to_unit_float(x: torch.Tensor) -> torch.Tensor:
    if x.dtype == torch.uint8:
        return x.float() / 255.0
    if not x.is_floating_point():
        raise TypeError(f"images must be uint8 or floating point tensors, got {x.dtype}")
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def quantise(x: torch.Tensor, mode: str) -> torch.Tensor:
    """Snap [0, 1] values to 8-bit levels k/255, rounding or truncating like ``astype(np.uint8)``."""
    scaled = x * 255.0
    if mode == "round":
        levels = scaled.round()
    elif mode == "truncate":
        # A small tolerance keeps exact levels (k/255 * 255 may land at k - 1e-6) on k.
        levels = torch.floor(scaled + 1e-4)
    else:
        raise ValueError(f"unknown quantisation {mode!r}; use 'round' or 'truncate'")
    return levels.clamp(0, 255) / 255.0


def gray_mean(x: torch.Tensor, weights: tuple[float, float, float] = BT601) -> torch.Tensor:
    """Mean gray level per image, shape (N, 1, 1, 1)."""
    w = torch.tensor(weights, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * w).sum(dim=1, keepdim=True).mean(dim=(2, 3), keepdim=True)


def gt_mean_rescale(
    output: torch.Tensor,
    reference: torch.Tensor,
    weights: tuple[float, float, float] = BT601,
    *,
    output_mean: str = "gray",
) -> torch.Tensor:
    """Scale each output so its mean level matches its reference's mean gray level, then clamp to [0, 1].

    ``output_mean="rgb"`` divides by the mean over all the output's RGB values (LLFlow's ``test.py``).
    """
    if output_mean not in ("gray", "rgb"):
        raise ValueError(f"output_mean must be 'gray' or 'rgb', got {output_mean!r}")
    divisor = (
        gray_mean(output, weights) if output_mean == "gray" else output.mean(dim=(1, 2, 3), keepdim=True)
    )
    scale = gray_mean(reference, weights) / divisor.clamp_min(1e-8)
    return (output * scale).clamp(0.0, 1.0)


PROTOCOLS: dict[str, Protocol] = {
    p.name: p
    for p in (
        Protocol("raw", "float RGB, pyiqa psnr/ssimc", eight_bit=False),
        Protocol(
            "gt-mean", "raw after the GT-mean brightness rescale", eight_bit=False, brightness="gt-mean"
        ),
        Protocol(
            "paper",
            "official SKF evaluation.py (uint8, skimage)",
            eight_bit=True,
            psnr="skimage",
            ssim="skimage",
        ),
        Protocol(
            "paper-gt-mean",
            "LLFlow-SKF test.py: GT-mean (swapped gray weights, RGB-mean divisor), truncated uint8, skimage",
            eight_bit=True,
            brightness="gt-mean",
            gray_weights=BT601_SWAPPED,
            requantise="truncate",
            output_mean="rgb",
            quantise_output_first=False,
            psnr="skimage",
            ssim="skimage",
        ),
    )
}


def get_protocol(protocol: str | Protocol) -> Protocol:
    if isinstance(protocol, Protocol):
        return protocol
    try:
        return PROTOCOLS[protocol]
    except KeyError:
        raise KeyError(f"unknown protocol {protocol!r}; known: {', '.join(PROTOCOLS)}") from None
