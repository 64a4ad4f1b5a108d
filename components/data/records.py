"""Plain, catalog-free views of dataset versions: what training, precompute and evaluation consume."""

from __future__ import annotations

import datetime as dt
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["DatasetVersionRecord", "ImageRecord", "VersionSummary", "count_by_split_role", "pairs_of"]


@dataclass(frozen=True)
class ImageRecord:
    """One stored image of a dataset version (content-addressed: ``uri`` holds bytes hashing to ``sha256``)."""

    sha256: str
    split: str  # train | test | unpaired (| val after carve_validation)
    role: str  # low | high | unpaired
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
    """A version with its image records, sorted by (split, pair key, role)."""

    images: tuple[ImageRecord, ...] = ()

    def records(self, split: str | None = None, role: str | None = None) -> list[ImageRecord]:
        return [
            r for r in self.images if (split is None or r.split == split) and (role is None or r.role == role)
        ]

    def pairs(self, split: str) -> list[tuple[ImageRecord, ImageRecord]]:
        return pairs_of(self.images, split)

    def counts(self) -> dict[str, dict[str, int]]:
        return count_by_split_role((r.split, r.role) for r in self.images)


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
