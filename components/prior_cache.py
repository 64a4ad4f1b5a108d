"""Content-addressed cache of SKB priors: F0, F1, F2 and the 1/4-resolution logits, fp16, per image.

An entry is addressed by (image sha256, SKB fingerprint) and lives at
``priors/<fingerprint[:16]>/<sha[:2]>/<sha>.safetensors`` in the object store (local folder or S3),
indexed by a :class:`~components.catalog.models.PriorCacheEntry` row that records the file's sha256
and size. Reads are verified end to end (file hash against the catalog, safetensors structure,
shapes against the recorded image size); anything inconsistent is logged, counted, deleted and
reported as a miss, so it gets recomputed and is never fed to training.

Size per image (docs/method.md §2.6): for a 600x400 image the four maps hold
48*100*150 + 96*50*75 + 192*25*38 + 59*100*150 = 2,147,400 elements, i.e. 4,294,800 bytes in fp16
(~4.3 MB, plus a header of a few hundred bytes). In general
``elements = (48 + 59)*a + 96*b + 192*c`` with ``a, b, c`` the cells of the 1/4, 1/8, 1/16 grids.
Full-resolution logits/probabilities are never stored: ``Priors.full_logits`` regenerates them.

Files are written by our own canonical safetensors encoder (sorted JSON header, tensors in name
order): ``safetensors.torch.save`` serialises the metadata map in a random order, and concurrent
writers of one entry must produce byte-identical files for "first complete write wins" to hold.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
import struct
import threading
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import sqlalchemy as sa
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from sqlalchemy.exc import IntegrityError as RowConflict
from torch import Tensor

from components.catalog import Catalog, PriorCacheEntry, open_catalog
from components.errors import SKFError
from components.skb import FEATURE_STRIDES, LOGIT_STRIDE, Priors
from components.storage import IntegrityError, Storage, open_storage, sha256_bytes

log = logging.getLogger(__name__)

FORMAT = "skf-priors/1"
PRIOR_NAMES: tuple[str, ...] = ("f0", "f1", "f2", "logits")
STRIDES: dict[str, int] = {"f0": FEATURE_STRIDES[0], "f1": FEATURE_STRIDES[1], "f2": FEATURE_STRIDES[2]}
STRIDES["logits"] = LOGIT_STRIDE
CROP_ALIGN = max(STRIDES.values())  # crop offsets and sizes must sit on the coarsest (1/16) grid
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
_HEADER_ALIGN = 8


class CorruptEntryError(SKFError, ValueError):
    """A cached file does not decode to consistent priors (the message says what is wrong)."""


class MissingPriorsError(SKFError, LookupError):
    """Priors needed for training are not in the cache."""


def prior_key(fingerprint: str, image_sha256: str) -> str:
    """Storage key of one entry: ``priors/<fingerprint[:16]>/<sha[:2]>/<sha>.safetensors``."""
    sha = _check_sha(image_sha256)
    return f"priors/{fingerprint[:16]}/{sha[:2]}/{sha}.safetensors"


def grid_size(size: tuple[int, int], stride: int) -> tuple[int, int]:
    """Cells of the 1/stride grid of an (H, W) image (HRNet's stride-2 convs round up)."""
    return -(-size[0] // stride), -(-size[1] // stride)


def prior_elements(size: tuple[int, int], channels: Mapping[str, int] | None = None) -> int:
    """Elements one entry stores for an (H, W) image; 2,147,400 for 400x600 with the W48 channels."""
    channels = channels or {"f0": 48, "f1": 96, "f2": 192, "logits": 59}
    return sum(c * math.prod(grid_size(size, STRIDES[n])) for n, c in channels.items())


def _check_sha(image_sha256: str) -> str:
    if not isinstance(image_sha256, str) or not _SHA_RE.match(image_sha256):
        raise ValueError(f"image_sha256 must be 64 lowercase hex characters, got {image_sha256!r}")
    return image_sha256


# --------------------------------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------------------------------
def _unbatched(priors: Priors) -> dict[str, Tensor]:
    """The four maps of a single image as (C, h, w) CPU fp16 tensors."""
    maps = dict(zip(PRIOR_NAMES, (priors.f0, priors.f1, priors.f2, priors.logits), strict=True))
    out = {}
    for name, t in maps.items():
        if t.ndim == 4:
            if t.shape[0] != 1:
                raise ValueError(
                    f"cache one image at a time: {name} has batch size {t.shape[0]} (use Priors.unbind)"
                )
            t = t[0]
        if t.ndim != 3:
            raise ValueError(f"prior map {name} must be (1, C, h, w) or (C, h, w), got {tuple(t.shape)}")
        out[name] = t.detach().to("cpu", torch.float16).contiguous()
    return out


def encode_priors(image_sha256: str, fingerprint: str, image_size: tuple[int, int], priors: Priors) -> bytes:
    """Canonical safetensors bytes of one image's priors (deterministic for equal inputs)."""
    maps = _unbatched(priors)
    _validate_shapes(maps, image_size)
    for name, t in maps.items():
        if not bool(torch.isfinite(t).all()):
            raise ValueError(
                f"prior map {name} of image {image_sha256} has non-finite values in fp16; refusing to cache "
                "priors that would poison training (check the SKB weights and input range)"
            )
    metadata = {
        "format": FORMAT,
        "fingerprint": fingerprint,
        "image_sha256": image_sha256,
        "height": str(image_size[0]),
        "width": str(image_size[1]),
        "shapes": json.dumps(
            {n: list(t.shape) for n, t in maps.items()}, sort_keys=True, separators=(",", ":")
        ),
    }
    header: dict[str, Any] = {"__metadata__": metadata}
    blobs, offset = [], 0
    for name in sorted(maps):
        blob = maps[name].numpy().astype("<f2", copy=False).tobytes()
        header[name] = {
            "dtype": "F16",
            "shape": list(maps[name].shape),
            "data_offsets": [offset, offset + len(blob)],
        }
        blobs.append(blob)
        offset += len(blob)
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % _HEADER_ALIGN)
    return struct.pack("<Q", len(text)) + text + b"".join(blobs)


def _read_metadata(data: bytes) -> dict[str, str]:
    if len(data) < 8:
        raise CorruptEntryError(f"file of {len(data)} bytes is too short for a safetensors header")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        raise CorruptEntryError(f"header length {n} exceeds the file ({len(data)} bytes): truncated")
    try:
        header = json.loads(data[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptEntryError(f"unreadable safetensors header: {exc}") from exc
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(metadata, dict):
        raise CorruptEntryError("safetensors header has no __metadata__")
    return metadata


def decode_priors(data: bytes, *, image_sha256: str, fingerprint: str) -> tuple[Priors, tuple[int, int]]:
    """Parse and validate one entry; returns batch-1 fp16 priors and the image (H, W).

    Raises :class:`CorruptEntryError` for anything that is not exactly what :func:`encode_priors` writes.
    """
    metadata = _read_metadata(data)
    try:
        tensors = load_safetensors(data)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise CorruptEntryError(f"safetensors parse failed: {exc}") from exc
    expected = {"format": FORMAT, "fingerprint": fingerprint, "image_sha256": image_sha256}
    for field, want in expected.items():
        if metadata.get(field) != want:
            raise CorruptEntryError(f"metadata {field}={metadata.get(field)!r}, expected {want!r}")
    if set(tensors) != set(PRIOR_NAMES):
        raise CorruptEntryError(f"tensors {sorted(tensors)}, expected {sorted(PRIOR_NAMES)}")
    try:
        size = (int(metadata["height"]), int(metadata["width"]))
        shapes = json.loads(metadata["shapes"])
    except (KeyError, ValueError) as exc:
        raise CorruptEntryError(f"metadata lacks a valid size/shapes: {exc}") from exc
    for name, t in tensors.items():
        if t.dtype != torch.float16 or list(t.shape) != shapes.get(name):
            raise CorruptEntryError(
                f"{name}: {t.dtype} {list(t.shape)} but metadata says float16 {shapes.get(name)}"
            )
    try:
        _validate_shapes(tensors, size)
    except ValueError as exc:
        raise CorruptEntryError(str(exc)) from exc
    return Priors(*(tensors[n].unsqueeze(0) for n in PRIOR_NAMES)), size


def _validate_shapes(maps: Mapping[str, Tensor], size: tuple[int, int]) -> None:
    """Every map sits on the ceil(H/s) x ceil(W/s) grid of its stride; F0 and logits share the 1/4 grid."""
    for name in PRIOR_NAMES:
        want = grid_size(size, STRIDES[name])
        if tuple(maps[name].shape[-2:]) != want:
            raise ValueError(
                f"prior map {name} is {tuple(maps[name].shape[-2:])}, expected {want} for a "
                f"{size[0]}x{size[1]} image at stride {STRIDES[name]}"
            )


# --------------------------------------------------------------------------------------------------
# The cache
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class CacheStats:
    """What a :class:`PriorCache` saw; ``corrupt`` counts entries found damaged and deleted."""

    hits: int = 0
    misses: int = 0
    corrupt: int = 0
    writes: int = 0
    conflicts: int = 0
    bytes_written: int = 0
    corrupt_keys: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class CacheEntry:
    """Where an entry lives and what it must hash to; ``created`` is False when it already existed."""

    image_sha256: str
    uri: str
    sha256: str
    nbytes: int
    created: bool


class PriorCache:
    """Priors of one SKB (``fingerprint``) for many images, in ``storage`` and indexed in ``catalog``.

    Thread-safe: storage clients and catalog sessions are per call, counters are locked.
    """

    def __init__(self, storage: Storage, catalog: Catalog, fingerprint: str) -> None:
        if not fingerprint or not re.fullmatch(r"[0-9a-zA-Z._:-]+", fingerprint) or len(fingerprint) > 64:
            raise ValueError(
                f"fingerprint must be a short hex-like identifier (<= 64 chars), got {fingerprint!r}"
            )
        self.storage = storage
        self.catalog = catalog
        self.fingerprint = fingerprint
        self.stats = CacheStats()
        self._lock = threading.Lock()

    @classmethod
    def open(
        cls, fingerprint: str, *, storage_uri: str | None = None, catalog_url: str | None = None
    ) -> PriorCache:
        """A cache on the configured (or given) storage and catalog."""
        from components.settings import get_settings

        settings = get_settings()
        storage = open_storage(storage_uri or settings.storage_uri)
        return cls(storage, open_catalog(catalog_url or settings.catalog_url), fingerprint)

    def __repr__(self) -> str:
        return f"PriorCache({self.storage.root_uri!r}, fingerprint={self.fingerprint[:16]})"

    def key(self, image_sha256: str) -> str:
        return prior_key(self.fingerprint, image_sha256)

    def _count(self, **deltas: int) -> None:
        with self._lock:
            for name, delta in deltas.items():
                setattr(self.stats, name, getattr(self.stats, name) + delta)

    # -- catalog --------------------------------------------------------------------------------
    def _row(self, image_sha256: str) -> PriorCacheEntry | None:
        with self.catalog.session() as session:
            return session.scalar(
                sa.select(PriorCacheEntry).where(
                    PriorCacheEntry.image_sha256 == image_sha256,
                    PriorCacheEntry.fingerprint == self.fingerprint,
                )
            )

    def cached(self, image_sha256s: Iterable[str]) -> set[str]:
        """The subset of ``image_sha256s`` with a catalog row (no file reads; see :meth:`get` to verify)."""
        wanted = sorted(set(image_sha256s))
        found: set[str] = set()
        with self.catalog.session() as session:
            for i in range(0, len(wanted), 500):  # stay below SQL parameter limits
                found.update(
                    session.scalars(
                        sa.select(PriorCacheEntry.image_sha256).where(
                            PriorCacheEntry.fingerprint == self.fingerprint,
                            PriorCacheEntry.image_sha256.in_(wanted[i : i + 500]),
                        )
                    )
                )
        return found

    def _drop(self, row: PriorCacheEntry, reason: str) -> None:
        """Forget a damaged entry: log and count it, delete the file and exactly this row."""
        key = self.key(row.image_sha256)
        log.warning("prior cache: entry %s is corrupt (%s); deleting it so it is recomputed", row.uri, reason)
        with self._lock:
            self.stats.corrupt += 1
            self.stats.corrupt_keys.append(key)
        self.storage.delete(key)
        with self.catalog.session() as session:
            session.execute(
                sa.delete(PriorCacheEntry).where(
                    PriorCacheEntry.id == row.id, PriorCacheEntry.sha256 == row.sha256
                )
            )

    # -- read -----------------------------------------------------------------------------------
    def get(self, image_sha256: str) -> Priors | None:
        """Verified priors of one image (batch 1, fp16, CPU), or None when missing or found corrupt."""
        _check_sha(image_sha256)
        row = self._row(image_sha256)
        if row is None:
            self._count(misses=1)
            return None
        try:
            data = self.storage.get_bytes(self.key(image_sha256), sha256=row.sha256)
            if len(data) != row.nbytes:
                raise CorruptEntryError(f"{len(data)} bytes, catalog says {row.nbytes}")
            priors, _size = decode_priors(data, image_sha256=image_sha256, fingerprint=self.fingerprint)
        except FileNotFoundError:
            self._drop(row, "file missing")
        except (IntegrityError, CorruptEntryError) as exc:
            self._drop(row, str(exc))
        else:
            self._count(hits=1)
            return priors
        self._count(misses=1)
        return None

    # -- write ----------------------------------------------------------------------------------
    def put(
        self, image_sha256: str, priors: Priors, *, image_size: tuple[int, int] | None = None
    ) -> CacheEntry:
        """Store one image's priors atomically and index them; concurrent writers are safe.

        ``image_size`` is the image's (H, W); without it the 1/4 grid times 4 is recorded (exact for
        sizes divisible by 4, and consistent with the grids otherwise). An existing, present entry
        is kept (first complete write wins).
        """
        _check_sha(image_sha256)
        key = self.key(image_sha256)
        row = self._row(image_sha256)
        if row is not None:
            if self.storage.exists(key):
                return CacheEntry(image_sha256, row.uri, row.sha256, row.nbytes, created=False)
            self._drop(row, "file missing")
        if image_size is None:
            rows, cols = priors.logits.shape[-2:]
            image_size = (rows * LOGIT_STRIDE, cols * LOGIT_STRIDE)
        data = encode_priors(image_sha256, self.fingerprint, (int(image_size[0]), int(image_size[1])), priors)
        digest = sha256_bytes(data)
        uri = self.storage.put_bytes(key, data, sha256=digest)  # atomic: temp + rename / single PUT
        self._count(bytes_written=len(data))
        for _attempt in range(3):
            try:
                with self.catalog.session() as session:
                    session.add(
                        PriorCacheEntry(
                            image_sha256=image_sha256,
                            fingerprint=self.fingerprint,
                            uri=uri,
                            sha256=digest,
                            nbytes=len(data),
                        )
                    )
            except RowConflict:
                entry = self._resolve_conflict(image_sha256, digest, len(data))
                if entry is not None:
                    return entry
                # The winning row was dropped meanwhile (found corrupt, file deleted): rewrite and index ours.
                self.storage.put_bytes(key, data, sha256=digest)
                continue
            self._count(writes=1)
            return CacheEntry(image_sha256, uri, digest, len(data), created=True)
        raise RuntimeError(f"could not index priors of {image_sha256}: the catalog row kept changing; retry")

    def _resolve_conflict(self, image_sha256: str, digest: str, nbytes: int) -> CacheEntry | None:
        """Another writer indexed the entry first: keep its row.

        Equal priors give byte-identical files, so normally nothing else is needed. If the winner's
        bytes differ (e.g. computed on other hardware) and ours landed last in storage, the row is
        pointed at the file that is actually there; any remaining race is caught by :meth:`get`.
        """
        self._count(conflicts=1)
        row = self._row(image_sha256)
        if row is None:  # the winner was found corrupt and dropped in between
            return None
        if row.sha256 != digest:
            try:
                on_disk = sha256_bytes(self.storage.get_bytes(self.key(image_sha256)))
            except FileNotFoundError:
                on_disk = None
            if on_disk == digest:
                with self.catalog.session() as session:
                    session.execute(
                        sa.update(PriorCacheEntry)
                        .where(PriorCacheEntry.id == row.id)
                        .values(sha256=digest, nbytes=nbytes)
                    )
                return CacheEntry(image_sha256, row.uri, digest, nbytes, created=False)
        return CacheEntry(image_sha256, row.uri, row.sha256, row.nbytes, created=False)

    def delete(self, image_sha256: str) -> None:
        """Remove an entry (file and row) if present."""
        self.storage.delete(self.key(image_sha256))
        with self.catalog.session() as session:
            session.execute(
                sa.delete(PriorCacheEntry).where(
                    PriorCacheEntry.image_sha256 == image_sha256,
                    PriorCacheEntry.fingerprint == self.fingerprint,
                )
            )


# --------------------------------------------------------------------------------------------------
# Aligning cached full-image priors with training crops
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class CropBox:
    """A crop of the full image in pixels: rows ``[top, top + height)``, columns ``[left, left + width)``."""

    top: int
    left: int
    height: int
    width: int


@dataclasses.dataclass(frozen=True)
class Flips:
    """Geometric augmentation applied after cropping, in this order: hflip, vflip, transpose."""

    hflip: bool = False
    vflip: bool = False
    transpose: bool = False


def _plain(value: Any) -> Any:
    """Tensors and arrays (what a DataLoader sample carries) as Python lists."""
    return value.tolist() if hasattr(value, "tolist") and not isinstance(value, (list, tuple)) else value


def as_box(box: Any) -> CropBox:
    """A :class:`CropBox` from one, a (top, left, h, w) sequence/tensor, or an object with those fields."""
    box = _plain(box)
    if isinstance(box, CropBox):
        return box
    if isinstance(box, Sequence) and len(box) == 4:
        return CropBox(*(int(v) for v in box))
    try:
        return CropBox(
            int(box.top),
            int(box.left),
            int(getattr(box, "height", getattr(box, "h", None))),
            int(getattr(box, "width", getattr(box, "w", None))),
        )
    except (AttributeError, TypeError) as exc:
        raise TypeError(f"crop box must be (top, left, h, w) or have those attributes, got {box!r}") from exc


def as_flips(flips: Any) -> Flips:
    """A :class:`Flips` from one, an (hflip, vflip, transpose) sequence/tensor, or an object with those flags."""
    flips = _plain(flips)
    if flips is None:
        return Flips()
    if isinstance(flips, Flips):
        return flips
    if isinstance(flips, Sequence):
        if len(flips) > 3:
            raise TypeError(f"flips must be (hflip, vflip, transpose), got {flips!r}")
        return Flips(*(bool(v) for v in flips))
    return Flips(
        bool(getattr(flips, "hflip", False)),
        bool(getattr(flips, "vflip", False)),
        bool(getattr(flips, "transpose", getattr(flips, "rot90", False))),
    )


def apply_flips(t: Tensor, flips: Flips) -> Tensor:
    """Flip/transpose the last two (spatial) dimensions in the dataset's order: hflip, vflip, transpose."""
    if flips.hflip:
        t = t.flip(-1)
    if flips.vflip:
        t = t.flip(-2)
    if flips.transpose:
        t = t.transpose(-2, -1)
    return t


def _grid_span(start: int, length: int, stride: int, cells: int, what: str) -> slice:
    """Grid cells covering pixels ``[start, start + length)``; an unaligned end must be the image edge."""
    end = start + length
    stop = -(-end // stride)
    if stop > cells or (end % stride and stop != cells):
        raise ValueError(
            f"{what} [{start}, {end}) does not fit the {cells}-cell grid at stride {stride}: the crop must stay "
            f"inside the image and end on a multiple of {CROP_ALIGN} unless it reaches the image edge"
        )
    return slice(start // stride, stop)


def crop_priors(priors: Priors, box: Any, flips: Any = None) -> Priors:
    """The priors of an image crop: the box at 1/4, 1/8 and 1/16 of the cached full-image grids.

    Offsets must be multiples of 16 so the crop falls exactly on every grid; sizes too, unless the
    crop reaches the bottom/right image edge (a whole 600x400 image is a valid "crop"). The dataset
    draws offsets on multiples of 16 and sizes on multiples of 32. Flips act on the cropped maps as on
    the cropped image. This is the cached-mode approximation of running HRNet on the crop
    (docs/method.md §2.6: border context and flip equivariance differ slightly).
    """
    b, f = as_box(box), as_flips(flips)
    if b.top % CROP_ALIGN or b.left % CROP_ALIGN or min(b.top, b.left) < 0 or min(b.height, b.width) <= 0:
        raise ValueError(
            f"crop {b} does not sit on the 1/{CROP_ALIGN} prior grid: offsets must be non-negative multiples "
            f"of {CROP_ALIGN} and sizes positive; draw crops on that grid"
        )
    maps = []
    for name, t in zip(PRIOR_NAMES, _maps(priors), strict=True):
        s = STRIDES[name]
        rows = _grid_span(b.top, b.height, s, t.shape[-2], f"{name} rows")
        cols = _grid_span(b.left, b.width, s, t.shape[-1], f"{name} columns")
        maps.append(apply_flips(t[..., rows, cols], f).contiguous())
    return Priors(*maps)


class PriorsLoader:
    """The ``priors_loader`` hook of :class:`~components.data.torch_dataset.PairedImageDataset`.

    ``loader(low_sha256, crop, flip)`` returns ``{"priors": {"f0", "f1", "f2", "logits"}}`` (or the
    four maps at top level with ``key=None``): (C, h, w) tensors in ``dtype`` aligned with the sample's
    crop and flips, which the default collate stacks into batches; ``Priors(**batch["priors"])``
    rebuilds the container. It holds only URIs, so it pickles into DataLoader workers, each of which
    opens its own storage client and catalog engine. A missing or found-corrupt entry raises
    :class:`MissingPriorsError` naming the fix: corrupt data is never returned.
    """

    def __init__(
        self,
        storage_uri: str,
        catalog_url: str,
        fingerprint: str,
        *,
        dtype: torch.dtype = torch.float32,
        key: str | None = "priors",
    ) -> None:
        self.storage_uri = storage_uri
        self.catalog_url = catalog_url
        self.fingerprint = fingerprint
        self.dtype = dtype
        self.key = key
        self._cache: PriorCache | None = None

    @classmethod
    def from_cache(cls, cache: PriorCache, **kwargs: Any) -> PriorsLoader:
        return cls(cache.storage.root_uri, cache.catalog.url, cache.fingerprint, **kwargs)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_cache": None}

    @property
    def cache(self) -> PriorCache:
        if self._cache is None:
            self._cache = PriorCache(
                open_storage(self.storage_uri), open_catalog(self.catalog_url), self.fingerprint
            )
        return self._cache

    def full(self, image_sha256: str) -> Priors:
        """Verified full-image priors (batch 1, fp16) or :class:`MissingPriorsError`."""
        priors = self.cache.get(image_sha256)
        if priors is None:
            raise MissingPriorsError(
                f"no valid cached priors for image {image_sha256} with SKB fingerprint {self.fingerprint[:16]} "
                f"in {self.storage_uri}; run `skf precompute <dataset@version> --skb <spec>` first"
            )
        return priors

    def __call__(self, image_sha256: str, crop: Any = None, flip: Any = None) -> dict[str, Any]:
        priors = self.full(image_sha256)
        if crop is not None:
            priors = crop_priors(priors, crop, flip)
        elif flip is not None:
            priors = Priors(*(apply_flips(t, as_flips(flip)).contiguous() for t in _maps(priors)))
        maps = {n: t[0].to(self.dtype) for n, t in zip(PRIOR_NAMES, _maps(priors), strict=True)}
        return maps if self.key is None else {self.key: maps}


def _maps(priors: Priors) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return priors.f0, priors.f1, priors.f2, priors.logits
