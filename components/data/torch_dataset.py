"""Paired low/high torch dataset with aligned augmentation, plus the train/validation carve.

Geometry of every training sample is explicit and reproducible: a crop box ``(top, left, h, w)`` whose
offsets are multiples of 16 and whose size is a multiple of 32, then optional horizontal flip, vertical
flip and transpose, in that order. The sample exposes both, so anything computed per image beforehand
(cached semantic priors at 1/4 or 1/8 resolution, masks) can be cut and flipped to match with
:func:`apply_geometry`. Two hooks carry such data:

* ``extra_targets``: ``{name: fn(low_sha256) -> array (H, W[, C])}`` at image resolution, augmented by
  albumentations together with low and high;
* ``input_features``: ``{name: fn(low image) -> array (H, W[, C])}`` computed from the whole low image before
  the crop (LLFlow's histogram equalisation), then augmented like ``extra_targets``;
* ``priors_loader``: ``fn(low_sha256, crop, flip) -> {name: tensor}`` for anything at another resolution;
  it receives the sample's geometry and applies it itself (typically with ``apply_geometry(t, crop, flip,
  stride=4)``).

Randomness depends only on ``(seed, epoch, index)``, so samples are identical across runs and worker counts.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import albumentations as A
import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from components.data.records import DatasetVersionRecord, ImageRecord, pairs_of

__all__ = [
    "CROP_ALIGN",
    "FLIP_OPS",
    "SIZE_ALIGN",
    "PairedImageDataset",
    "apply_geometry",
    "carve_validation",
    "label_loader",
    "load_label",
    "load_rgb",
]

CROP_ALIGN = 16  # crop offsets are multiples of this (priors at 1/4 and 1/8 resolution stay aligned)
SIZE_ALIGN = 32  # crop sizes are multiples of this (the baselines downsample up to 32x)
FLIP_OPS: tuple[str, ...] = ("hflip", "vflip", "transpose")  # order of application after the crop

ExtraTarget = Callable[[str], np.ndarray]
PriorsForCrop = Callable[[str, torch.Tensor, torch.Tensor], Mapping[str, torch.Tensor]]
Records = str | DatasetVersionRecord | Sequence[ImageRecord]


def load_rgb(record: ImageRecord) -> np.ndarray:
    """Read an image through storage (local or S3), verify its sha256, decode it to RGB uint8 (H, W, 3)."""
    from components.storage import read_uri

    data = read_uri(record.uri, sha256=record.sha256)
    with Image.open(io.BytesIO(data)) as img:
        return np.array(img.convert("RGB"), dtype=np.uint8)


def load_label(record: ImageRecord) -> np.ndarray:
    """Read a label map through storage, verify its sha256, return its class ids as uint8 (H, W).

    Ingest admits only single-channel 8-bit maps (mode L, or P whose indices are the ids), so the raw
    values are the ids: nothing is converted.
    """
    from components.storage import read_uri

    data = read_uri(record.uri, sha256=record.sha256)
    with Image.open(io.BytesIO(data)) as img:
        if img.mode not in ("L", "P"):
            raise ValueError(
                f"label map {record.rel_path or record.uri} is mode {img.mode}, not 8-bit class ids"
            )
        return np.array(img, dtype=np.uint8)


def label_loader(version: DatasetVersionRecord) -> Callable[[str], np.ndarray]:
    """``low image sha256 -> its label map`` for ``version`` (the ``labels_of`` of :class:`PairedImageDataset`)."""
    by_sha = {r.sha256: version.label_of(r) for r in version.images if r.role == "low"}

    def load(sha256: str) -> np.ndarray:
        record = by_sha.get(sha256)
        if record is None:
            raise ValueError(
                f"low image {sha256[:12]} of {version.ref} has no label map: ingest a labelled source "
                "(labels/ beside low/ and high/, and classes.json) to train with a label-fed SKB"
            )
        return load_label(record)

    return load


def apply_geometry(
    x: torch.Tensor,
    crop: Sequence[int] | torch.Tensor,
    flip: Sequence[bool] | torch.Tensor,
    *,
    stride: int = 1,
) -> torch.Tensor:
    """Apply a sample's crop box and flips to ``x`` of shape (..., H/stride, W/stride).

    ``crop`` is (top, left, h, w) at image resolution and ``flip`` the (hflip, vflip, transpose) flags of
    the sample. ``stride`` is the downsampling factor of ``x`` relative to the image (e.g. 4 for priors at
    1/4 resolution); the box must be divisible by it, which 16-aligned offsets guarantee up to 16.
    """
    top, left, h, w = (int(v) for v in crop)
    if any(v % stride for v in (top, left, h, w)):
        raise ValueError(f"crop {(top, left, h, w)} is not divisible by stride {stride}")
    top, left, h, w = top // stride, left // stride, h // stride, w // stride
    if x.shape[-2] < top + h or x.shape[-1] < left + w:
        raise ValueError(
            f"crop {(top, left, h, w)} (at stride {stride}) exceeds tensor of shape {tuple(x.shape)}"
        )
    out = x[..., top : top + h, left : left + w]
    hflip, vflip, transpose = (bool(f) for f in flip)
    if hflip:
        out = out.flip(-1)
    if vflip:
        out = out.flip(-2)
    if transpose:
        out = out.transpose(-1, -2)
    return out


def _to_tensor(array: np.ndarray) -> torch.Tensor:
    """HWC uint8 image -> CHW float in [0, 1]; other arrays keep their dtype, channels moved first."""
    t = torch.from_numpy(np.ascontiguousarray(array))
    if t.ndim == 3:
        t = t.permute(2, 0, 1).contiguous()
    return t.float().div_(255.0) if array.dtype == np.uint8 else t


def _as_records(source: Records, catalog: Any) -> list[ImageRecord]:
    if isinstance(source, str):
        from components.data.ingest import get_version

        return list(get_version(source, catalog=catalog).images)
    if isinstance(source, DatasetVersionRecord):
        return list(source.images)
    return list(source)


class PairedImageDataset(Dataset):
    """(low, high) pairs of one split of a dataset version, as float tensors in [0, 1].

    ``crop`` is a size (int or (h, w), multiples of 32, clamped to the image; a square request stays
    square) or ``None`` for whole images. With ``augment=True`` the crop position and the flips are random; otherwise the crop is a
    16-aligned centre crop and nothing is flipped. Transpose is only drawn for square crops, so every
    sample of a batch keeps the same shape. ``cache=True`` keeps decoded images in memory (per worker).
    """

    def __init__(
        self,
        source: Records,
        split: str = "train",
        crop: int | tuple[int, int] | None = 256,
        augment: bool = True,
        seed: int = 0,
        extra_targets: Mapping[str, ExtraTarget] | None = None,
        priors_loader: PriorsForCrop | None = None,
        cache: bool = False,
        catalog: Any = None,
        labels_of: Callable[[str], np.ndarray] | None = None,
        input_features: Mapping[str, Callable[[np.ndarray], np.ndarray]] | None = None,
        flips: Sequence[bool] = (True, True, True),
    ) -> None:
        self.pairs = pairs_of(_as_records(source, catalog), split)
        if not self.pairs:
            raise ValueError(f"split {split!r} has no (low, high) pairs")
        if crop is not None:
            ch, cw = (crop, crop) if isinstance(crop, int) else crop
            if ch <= 0 or cw <= 0 or ch % SIZE_ALIGN or cw % SIZE_ALIGN:
                raise ValueError(f"crop must be a positive multiple of {SIZE_ALIGN} (or None), got {crop}")
            crop = (ch, cw)
        self.split = split
        self.crop: tuple[int, int] | None = crop
        self.augment = augment
        #: which of (hflip, vflip, transpose) augmentation may draw (the recipe's ``train.augment``)
        self.flips = tuple(bool(f) for f in flips)
        if len(self.flips) != 3:
            raise ValueError(f"flips must be three flags (hflip, vflip, transpose), got {flips!r}")
        self.seed = seed
        self.epoch = 0
        self.extra_targets = dict(extra_targets or {})
        #: ``{name: fn(full low image, HWC uint8) -> array (H, W[, C])}``: computed on the whole image *before*
        #: the crop (LLFlow equalises the full image's histogram, as released), then cropped and flipped alike
        self.input_features = dict(input_features or {})
        reserved = {"image", "high", "mask", "low", "key", "crop", "flip", "labels"}
        clash = ((set(self.extra_targets) | set(self.input_features)) & reserved) | (
            set(self.extra_targets) & set(self.input_features)
        )
        if clash:
            raise ValueError(f"extra target names {sorted(clash)} collide with sample keys; rename them")
        self.priors_loader = priors_loader
        #: low image sha256 -> its (H, W) uint8 label map; samples then carry ``labels`` (int64, cropped and
        #: flipped with the images) for an SKB made from label maps (the oracle)
        self.labels_of = labels_of
        self._cache: dict[str, np.ndarray] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.pairs)

    def set_epoch(self, epoch: int) -> None:
        """Draw different crops/flips each epoch (call from the training loop, like DistributedSampler)."""
        self.epoch = epoch

    def _load(self, record: ImageRecord) -> np.ndarray:
        if self._cache is None:
            return load_rgb(record)
        if record.sha256 not in self._cache:
            self._cache[record.sha256] = load_rgb(record)
        return self._cache[record.sha256]

    def _crop_box(
        self, height: int, width: int, rng: np.random.Generator, name: str
    ) -> tuple[int, int, int, int]:
        if self.crop is None:
            return 0, 0, height, width
        ch = min(self.crop[0], height // SIZE_ALIGN * SIZE_ALIGN)
        cw = min(self.crop[1], width // SIZE_ALIGN * SIZE_ALIGN)
        if self.crop[0] == self.crop[1]:  # a square request stays square (batchable, transposable)
            ch = cw = min(ch, cw)
        if ch == 0 or cw == 0:
            raise ValueError(
                f"{name} is {height}x{width}, smaller than the minimum crop {SIZE_ALIGN}x{SIZE_ALIGN}"
            )
        slots_y, slots_x = (height - ch) // CROP_ALIGN, (width - cw) // CROP_ALIGN
        if self.augment:
            return (
                int(rng.integers(0, slots_y + 1)) * CROP_ALIGN,
                int(rng.integers(0, slots_x + 1)) * CROP_ALIGN,
                ch,
                cw,
            )
        return slots_y // 2 * CROP_ALIGN, slots_x // 2 * CROP_ALIGN, ch, cw

    def __getitem__(self, index: int) -> dict[str, Any]:
        low_rec, high_rec = self.pairs[index]
        low, high = self._load(low_rec), self._load(high_rec)
        if low.shape != high.shape:
            raise ValueError(f"{low_rec.uri} and {high_rec.uri} differ in size: {low.shape} vs {high.shape}")
        extras = {name: fn(low_rec.sha256) for name, fn in self.extra_targets.items()}
        extras.update({name: fn(low) for name, fn in self.input_features.items()})
        if self.labels_of is not None:
            extras["labels"] = self.labels_of(low_rec.sha256)
        for name, arr in extras.items():
            if arr.shape[:2] != low.shape[:2]:
                raise ValueError(
                    f"extra target {name!r} has shape {arr.shape}, expected {low.shape[:2]} + (C,)"
                )

        rng = np.random.default_rng(np.random.SeedSequence([self.seed, self.epoch, index]))
        top, left, ch, cw = self._crop_box(*low.shape[:2], rng, low_rec.uri)
        # Flips are drawn here, not inside albumentations: a freshly seeded Compose gives every transform the
        # same random stream, which would make the three flips all-or-nothing.
        drawn = rng.random(3) < 0.5 if self.augment else (False,) * 3
        hflip, vflip, transpose = (bool(b) and on for b, on in zip(drawn, self.flips, strict=True))
        transpose = transpose and ch == cw  # keeps every sample of a batch the same shape
        chosen = [(hflip, A.HorizontalFlip), (vflip, A.VerticalFlip), (transpose, A.Transpose)]
        compose = A.Compose(
            [A.Crop(x_min=left, y_min=top, x_max=left + cw, y_max=top + ch)]
            + [t(p=1.0) for on, t in chosen if on],
            additional_targets={"high": "image", **dict.fromkeys(extras, "mask")},
            seed=self.seed,
        )
        out = compose(image=low, high=high, **extras)
        flip = torch.tensor([hflip, vflip, transpose], dtype=torch.bool)
        crop = torch.tensor([top, left, ch, cw], dtype=torch.int64)

        sample: dict[str, Any] = {
            "low": _to_tensor(out["image"]),
            "high": _to_tensor(out["high"]),
            "key": low_rec.pair_key,
            "low_sha256": low_rec.sha256,
            "high_sha256": high_rec.sha256,
            "crop": crop,
            "flip": flip,
        }
        sample.update({name: _to_tensor(out[name]) for name in extras if name != "labels"})
        if "labels" in extras:
            sample["labels"] = torch.from_numpy(np.ascontiguousarray(out["labels"])).long()
        if self.priors_loader is not None:
            sample.update(self.priors_loader(low_rec.sha256, crop, flip))
        return sample


def carve_validation(
    records: DatasetVersionRecord | Sequence[ImageRecord], fraction: float, seed: int = 0
) -> list[ImageRecord]:
    """Move a deterministic ``fraction`` of the TRAIN pairs to split ``"val"``; test records are untouched.

    Whole pairs move (both low and high). At least one pair moves when ``fraction > 0``, and at least one
    stays in train. The choice depends only on the sorted train pair keys and ``seed``.
    """
    items = list(records.images if isinstance(records, DatasetVersionRecord) else records)
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"validation fraction must be in [0, 1), got {fraction}")
    keys = sorted({r.pair_key for r in items if r.split == "train"})
    if fraction == 0.0 or not keys:
        return items
    if len(keys) < 2:
        raise ValueError("cannot carve a validation split from a single training pair")
    n_val = min(max(1, round(fraction * len(keys))), len(keys) - 1)
    chosen = {keys[i] for i in np.random.default_rng(seed).permutation(len(keys))[:n_val]}
    return [replace(r, split="val") if r.split == "train" and r.pair_key in chosen else r for r in items]
