"""The segmenter's data: low-light images and their label maps of one split, and random training crops.

Why the low-light image: in cached mode the SKB segments the low-light input (docs/method.md §2.5), so
that is what the segmenter must recognise classes in. Images are read through storage and verified
against their sha256 (:func:`~components.data.torch_dataset.load_rgb` / ``load_label``) once, then kept in
memory as uint8: a labelled set the size of LOL (485 pairs of 600x400) takes about 470 MB.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from components.data.records import LABEL_ROLE, DatasetVersionRecord, ImageRecord, pairs_of
from components.errors import UserInputError

__all__ = [
    "LabelledImages",
    "UnlabelledDatasetError",
    "crop_size",
    "label_classes",
    "load_split",
    "sample_batch",
]

SIZE_ALIGN = 32  # HRNet downsamples by 32: training crops are multiples of it


class UnlabelledDatasetError(UserInputError):
    """The dataset version has no label maps (or not for every pair) to train a segmenter on."""


@dataclasses.dataclass(frozen=True)
class LabelledImages:
    """The low-light images (uint8 H×W×3) and class-id maps (uint8 H×W) of one split, in pair order."""

    split: str
    images: tuple[np.ndarray, ...]
    labels: tuple[np.ndarray, ...]
    keys: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.images)

    def image(self, i: int) -> Tensor:
        """Image ``i`` as float (1, 3, H, W) in [0, 1]."""
        return torch.from_numpy(self.images[i]).permute(2, 0, 1).float().div_(255.0).unsqueeze(0)

    def label(self, i: int) -> Tensor:
        """Label map ``i`` as int64 (1, H, W)."""
        return torch.from_numpy(self.labels[i].astype(np.int64)).unsqueeze(0)


def label_classes(version: DatasetVersionRecord) -> tuple[str, ...]:
    """The version's class names (ids 0..K-1); a version without label maps is a clear error."""
    if not version.has_labels or not version.label_classes:
        raise UnlabelledDatasetError(
            f"dataset {version.ref} has no label maps to train a segmenter on: ingest a labelled source (a LOL "
            "tree with labels/ beside low/ and high/ and a classes.json; see docs/segmenter.md)"
        )
    return tuple(version.label_classes)


def _labelled_lows(
    records: Sequence[ImageRecord], split: str, ref: str
) -> list[tuple[ImageRecord, ImageRecord]]:
    """(low, label) records of ``split``; a pair without a label map is an error naming it."""
    labels = {(r.split, r.pair_key): r for r in records if r.role == LABEL_ROLE}
    out, missing = [], []
    for low, _high in pairs_of(records, split):
        label = labels.get((low.split, low.pair_key))
        if label is None:
            missing.append(low.rel_path or low.pair_key)
        else:
            out.append((low, label))
    if missing:
        raise UnlabelledDatasetError(
            f"dataset {ref}: {len(missing)} {split} pair(s) have no label map (e.g. {', '.join(missing[:3])}); "
            "add labels/<name>.png for each pair and ingest again"
        )
    return out


def load_split(records: Sequence[ImageRecord], split: str, ref: str, num_classes: int) -> LabelledImages:
    """Read and check every (low image, label map) of ``split`` (ids must be below ``num_classes``)."""
    from components.data.torch_dataset import load_label, load_rgb

    images, labels, keys = [], [], []
    for low, label in _labelled_lows(records, split, ref):
        rgb, ids = load_rgb(low), load_label(label)
        if ids.shape != rgb.shape[:2]:
            raise UnlabelledDatasetError(
                f"dataset {ref}: label map {label.rel_path or label.uri} is {ids.shape}, its image {rgb.shape[:2]}"
            )
        if ids.size and int(ids.max()) >= num_classes:
            raise UnlabelledDatasetError(
                f"dataset {ref}: label map {label.rel_path or label.uri} holds id {int(ids.max())}, but classes.json "
                f"names {num_classes} classes"
            )
        images.append(rgb)
        labels.append(ids)
        keys.append(low.pair_key)
    return LabelledImages(split, tuple(images), tuple(labels), tuple(keys))


def crop_size(data: LabelledImages, wanted: int) -> int:
    """``wanted``, shrunk to the largest multiple of 32 that fits every image (at least 32)."""
    fits = min(min(img.shape[:2]) for img in data.images) // SIZE_ALIGN * SIZE_ALIGN
    if fits < SIZE_ALIGN:
        raise UnlabelledDatasetError(
            f"{data.split} images must be at least {SIZE_ALIGN}x{SIZE_ALIGN} pixels to train the segmenter on"
        )
    return min(wanted, fits)


def sample_batch(
    data: LabelledImages, batch_size: int, crop: int, generator: torch.Generator, hflip: bool
) -> tuple[Tensor, Tensor]:
    """A batch of random ``crop``×``crop`` windows (float images, int64 labels), each flipped left-right with
    p 0.5 when ``hflip``. No vertical flips: sky above road is part of what the classes look like."""
    xs, ys = [], []
    picks = torch.randint(len(data), (batch_size,), generator=generator).tolist()
    for i in picks:
        h, w = data.images[i].shape[:2]
        top = int(torch.randint(h - crop + 1, (1,), generator=generator))
        left = int(torch.randint(w - crop + 1, (1,), generator=generator))
        flip = hflip and bool(torch.rand(1, generator=generator) < 0.5)
        img = data.images[i][top : top + crop, left : left + crop]
        ids = data.labels[i][top : top + crop, left : left + crop]
        if flip:
            img, ids = img[:, ::-1], ids[:, ::-1]
        xs.append(np.ascontiguousarray(img))
        ys.append(np.ascontiguousarray(ids))
    x = torch.from_numpy(np.stack(xs)).permute(0, 3, 1, 2).float().div_(255.0)
    y = torch.from_numpy(np.stack(ys).astype(np.int64))
    return x, y
