"""Helpers for the prior-cache tests: tiny LOL-layout datasets and SKB stand-ins that count or encode."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from components.skb import Priors

SMALL_SKB = "skb/hrnet-w18-small-test@1"


class PriorsLike:
    """Looks like the SKB's :class:`Priors` (``logits``, a length) without being one: the networks must
    refuse it with a TypeError naming Priors rather than read its attributes."""

    logits = torch.zeros(1, 59, 16, 16)

    def __len__(self) -> int:
        return 1


def coordinate_image(height: int, width: int, tag: int) -> np.ndarray:
    """RGB uint8 whose pixel (y, x) is (y, x, tag): a crop/flip of it says where each pixel came from."""
    assert height <= 256 and width <= 256
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([y, x, np.full_like(y, tag)], axis=-1).astype(np.uint8)


def write_lol(
    root: Path, train: list[tuple[int, int]], test: list[tuple[int, int]], *, coords: bool = False
) -> Path:
    """A LOL tree (``our485``/``eval15``, ``low``/``high``) with one pair per listed (H, W)."""
    rng = np.random.default_rng(0)
    tag = 0
    for split, sizes in (("our485", train), ("eval15", test)):
        for role in ("low", "high"):
            (root / split / role).mkdir(parents=True, exist_ok=True)
        for i, (h, w) in enumerate(sizes):
            tag += 1
            low = coordinate_image(h, w, tag) if coords else rng.integers(0, 60, (h, w, 3), dtype=np.uint8)
            high = rng.integers(100, 255, (h, w, 3), dtype=np.uint8)
            Image.fromarray(low).save(root / split / "low" / f"{i}.png")
            Image.fromarray(high).save(root / split / "high" / f"{i}.png")
    return root


class CountingSKB:
    """Wraps an SKB and records every forward call (batch shape), thread-safely."""

    def __init__(self, skb: Any, fail_on_size: tuple[int, int] | None = None) -> None:
        self.skb = skb
        self.fingerprint = skb.fingerprint
        self.pretrained = skb.pretrained
        self.spec = skb.spec
        self.calls: list[tuple[int, ...]] = []
        self.fail_on_size = fail_on_size
        self._lock = threading.Lock()

    @property
    def images(self) -> int:
        return sum(shape[0] for shape in self.calls)

    def __call__(self, x: Tensor) -> Priors:
        with self._lock:
            self.calls.append(tuple(x.shape))
        if self.fail_on_size is not None and tuple(x.shape[-2:]) == self.fail_on_size:
            raise RuntimeError(f"simulated SKB failure for size {self.fail_on_size}")
        return self.skb(x)


class CoordinateSKB:
    """SKB stand-in whose priors encode grid coordinates: channel 0 = row, 1 = column, 2 = image tag.

    With :func:`coordinate_image` inputs, cell (i, j) of any cropped/flipped prior map must name the
    same source cell as the image pixels it covers.
    """

    fingerprint = "coordinates-test-0001"
    pretrained = False
    spec = "skb/coordinates-test@1"

    def __call__(self, x: Tensor) -> Priors:
        b, _, h, w = x.shape
        tags = (x[:, 2, 0, 0] * 255).round()
        maps = []
        for stride in (4, 8, 16, 4):
            rows, cols = -(-h // stride), -(-w // stride)
            r = torch.arange(rows, dtype=torch.float32).view(1, 1, rows, 1).expand(b, 1, rows, cols)
            c = torch.arange(cols, dtype=torch.float32).view(1, 1, 1, cols).expand(b, 1, rows, cols)
            t = tags.view(b, 1, 1, 1).expand(b, 1, rows, cols)
            maps.append(torch.cat([r, c, t], dim=1))
        return Priors(*maps)
