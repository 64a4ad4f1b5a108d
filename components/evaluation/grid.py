"""The labelled sample grid of an evaluation: what a person looks at before reading any number.

One row per test image: centre crops of input | output | reference, a header naming the columns, and each
row's PSNR of the input and of the output printed on the crops, so a grey-noise output or a model that only
brightens is obvious at a glance.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["GRID_CROP", "GRID_IMAGES", "labelled_grid"]

GRID_IMAGES = 4
GRID_CROP = 128
_HEADER = 16  # pixels of header above the first row
_COLUMNS = ("input", "output", "reference")


def _centre_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    ch, cw = min(size, h), min(size, w)
    top, left = (h - ch) // 2, (w - cw) // 2
    return x[..., top : top + ch, left : left + cw]


def _strip(images: Sequence[torch.Tensor], size: int) -> tuple[torch.Tensor, list[int]]:
    """The crops of one row side by side (padded to one height), and each crop's left edge."""
    crops = [_centre_crop(x.float().clamp(0, 1), size) for x in images]
    h = max(c.shape[-2] for c in crops)
    crops = [F.pad(c, (0, 0, 0, h - c.shape[-2])) for c in crops]
    lefts = [sum(c.shape[-1] for c in crops[:i]) for i in range(len(crops))]
    return torch.cat(crops, dim=-1), lefts


def _label(draw: Any, xy: tuple[int, int], text: str) -> None:
    """White text on a black box: readable on any crop."""
    left, top, right, bottom = draw.textbbox(xy, text)
    draw.rectangle((left - 1, top - 1, right + 1, bottom + 1), fill=(0, 0, 0))
    draw.text(xy, text, fill=(255, 255, 255))


def labelled_grid(
    rows: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    psnr_input: Sequence[float | None] | None = None,
    psnr_output: Sequence[float | None] | None = None,
    size: int = GRID_CROP,
) -> Any:
    """A PIL image: a header (input | output | reference), then per image its three crops with PSNRs."""
    from PIL import Image, ImageDraw

    if not rows:
        raise ValueError("labelled_grid needs at least one (input, output, reference) row")
    strips = [_strip(images, size) for images in rows]
    width = max(s.shape[-1] for s, _ in strips)
    body = torch.cat([F.pad(s, (0, width - s.shape[-1])) for s, _ in strips], dim=-2)
    array = body.mul(255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    canvas = Image.new("RGB", (array.shape[1], array.shape[0] + _HEADER))
    canvas.paste(Image.fromarray(array), (0, _HEADER))
    draw = ImageDraw.Draw(canvas)
    for name, left in zip(_COLUMNS, strips[0][1], strict=False):
        draw.text((left + 3, 2), name, fill=(255, 255, 255))
    top = _HEADER
    for i, (strip, lefts) in enumerate(strips):
        for column, values in ((0, psnr_input), (1, psnr_output)):
            value = values[i] if values is not None and i < len(values) else None
            if value is not None and column < len(lefts):
                _label(draw, (lefts[column] + 3, top + 3), f"{value:.1f} dB")
        top += strip.shape[-2]
    return canvas
