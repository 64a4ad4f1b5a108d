"""Plain, catalog-free views of dataset versions: what training, precompute and evaluation consume."""

from __future__ import annotations

import datetime as dt
import functools
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "LABEL_ROLE",
    "DatasetVersionRecord",
    "ImageRecord",
    "VersionSummary",
    "count_by_split_role",
    "label_of",
    "pairs_of",
]

LABEL_ROLE = "label"  # a per-pixel class-id map stored beside a pair (images.role is String(10))


@dataclass(frozen=True)
class ImageRecord:
    """One stored image of a dataset version (content-addressed: ``uri`` holds bytes hashing to ``sha256``)."""

    sha256: str
    split: str  # train | test | unpaired (| val after carve_validation)
    role: str  # low | high | label | unpaired
    pair_key: str
    uri: str
    width: int
    height: int
    rel_path: str = ""
    # How loading ``uri``'s bytes (the original file, unmodified) as RGB changes them, e.g.
    # "RGBA->RGB at load: alpha discarded (not composited)"; "" for plain, upright RGB.
    conversion: str = ""


@dataclass(frozen=True)
class VersionSummary:
    name: str
    version: int
    id: int
    manifest_sha256: str
    layout: str
    source_uri: str
    image_count: int
    created_at: dt.datetime | None
    changes: dict[str, Any] = field(default_factory=dict)

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"


@dataclass(frozen=True)
class DatasetVersionRecord(VersionSummary):
    """A version with its image records, sorted by (split, pair key, role).

    ``label_classes`` names the class ids of its label maps (``classes.json``, id order); empty when the
    version has none.
    """

    images: tuple[ImageRecord, ...] = ()
    label_classes: tuple[str, ...] = ()

    def records(self, split: str | None = None, role: str | None = None) -> list[ImageRecord]:
        return [
            r for r in self.images if (split is None or r.split == split) and (role is None or r.role == role)
        ]

    def pairs(self, split: str) -> list[tuple[ImageRecord, ImageRecord]]:
        return pairs_of(self.images, split)

    def counts(self) -> dict[str, dict[str, int]]:
        return count_by_split_role((r.split, r.role) for r in self.images)

    @property
    def has_labels(self) -> bool:
        return any(r.role == LABEL_ROLE for r in self.images)

    @functools.cached_property
    def _labels(self) -> dict[tuple[str, str], ImageRecord]:
        return _labels_by_key(self.images)

    def label_of(self, record: ImageRecord) -> ImageRecord | None:
        """The label map of ``record``'s pair (same split and pair key), or ``None`` when it has none."""
        return self._labels.get((record.split, record.pair_key))

    def labelled_pairs(self, split: str) -> list[tuple[ImageRecord, ImageRecord, ImageRecord | None]]:
        """(low, high, label or ``None``) of ``split``, in :meth:`pairs` order."""
        return [(low, high, self.label_of(low)) for low, high in self.pairs(split)]


def _labels_by_key(records: Iterable[ImageRecord]) -> dict[tuple[str, str], ImageRecord]:
    return {(r.split, r.pair_key): r for r in records if r.role == LABEL_ROLE}


def label_of(records: Iterable[ImageRecord], record: ImageRecord) -> ImageRecord | None:
    """The label record sharing ``record``'s split and pair key (a carved ``val`` pair keeps its label)."""
    return _labels_by_key(records).get((record.split, record.pair_key))


def pairs_of(records: Iterable[ImageRecord], split: str) -> list[tuple[ImageRecord, ImageRecord]]:
    """(low, high) record pairs of ``split``, sorted by pair key; incomplete pairs are an error."""
    by_key: dict[str, dict[str, ImageRecord]] = defaultdict(dict)
    for r in records:
        if r.split == split and r.role in ("low", "high"):
            by_key[r.pair_key][r.role] = r
    incomplete = sorted(k for k, roles in by_key.items() if len(roles) != 2)
    if incomplete:
        raise ValueError(f"split {split!r} has incomplete pairs (missing low or high): {incomplete[:5]}")
    return [(by_key[k]["low"], by_key[k]["high"]) for k in sorted(by_key)]


def count_by_split_role(split_roles: Iterable[tuple[str, str]]) -> dict[str, dict[str, int]]:
    """``{split: {role: count}}`` from (split, role) tuples, sorted by split then role."""
    counter = Counter(split_roles)
    out: dict[str, dict[str, int]] = {}
    for (split, role), n in sorted(counter.items()):
        out.setdefault(split, {})[role] = n
    return out
