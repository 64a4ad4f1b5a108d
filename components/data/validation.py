"""Decide which scanned files are usable images, and quarantine the rest with a machine-readable reason.

Per file (each fully decoded with Pillow, truncated images are errors, decompression bombs are errors):
``unreadable``, ``empty-file``, ``not-an-image``, ``truncated``, ``decompression-bomb``. Across files:
``duplicate-content`` (same sha256 as an earlier file of the same role; the first by sorted path is kept),
and for paired layouts ``unpaired-leftover`` (no valid partner) and ``size-mismatch`` (both quarantined).
A valid file is never dropped: it is either returned as valid or quarantined with a reason and detail.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import threading
import warnings
import zlib
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageFile, UnidentifiedImageError

from components.data.layouts import Entry, LayoutScan

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "REASONS",
    "ImageInfo",
    "InvalidImage",
    "QuarantineRecord",
    "ValidatedEntry",
    "ValidationResult",
    "inspect_bytes",
    "inspect_file",
    "validate_scan",
]

DEFAULT_MAX_PIXELS = 64_000_000
REASONS: tuple[str, ...] = (
    "unreadable",
    "empty-file",
    "not-an-image",
    "truncated",
    "decompression-bomb",
    "duplicate-content",
    "unpaired-leftover",
    "size-mismatch",
    "archive-path-traversal",
)
_FORMAT_EXT = {
    "PNG": "png",
    "JPEG": "jpg",
    "BMP": "bmp",
    "TIFF": "tif",
    "WEBP": "webp",
    "PPM": "ppm",
    "GIF": "gif",
}
# Signatures of image formats: a file that starts like an image but fails to open is damaged, not foreign.
_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"BM", b"GIF87a", b"GIF89a", b"II*\x00", b"MM\x00*")
_pillow_lock = threading.Lock()


class InvalidImage(Exception):
    """A file failed validation; ``reason`` is one of :data:`REASONS`."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class ImageInfo:
    sha256: str
    width: int
    height: int
    format: str  # Pillow format name, e.g. PNG
    ext: str  # canonical extension for that format, e.g. png
    nbytes: int


@dataclass(frozen=True)
class ValidatedEntry:
    entry: Entry
    info: ImageInfo


@dataclass(frozen=True)
class QuarantineRecord:
    rel_path: str
    reason: str
    detail: str
    sha256: str | None = None

    def to_dict(self) -> dict[str, str | None]:
        return {"path": self.rel_path, "reason": self.reason, "detail": self.detail, "sha256": self.sha256}


@dataclass
class ValidationResult:
    valid: list[ValidatedEntry] = field(default_factory=list)
    quarantined: list[QuarantineRecord] = field(default_factory=list)


# --------------------------------------------------------------------------------------------- one file
@contextlib.contextmanager
def _strict_pillow() -> Iterator[None]:
    """Truncated images and decompression-bomb warnings become errors for the duration of the block."""
    with _pillow_lock:
        previous = ImageFile.LOAD_TRUNCATED_IMAGES
        ImageFile.LOAD_TRUNCATED_IMAGES = False
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                yield
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = previous


def _looks_like_image(data: bytes) -> bool:
    return data.startswith(_MAGIC) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")


def inspect_bytes(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageInfo:
    """Fully decode ``data``; return its description or raise :class:`InvalidImage`.

    ``max_pixels`` bounds width x height before any pixel is decoded. Pillow's own bomb limit
    (``Image.MAX_IMAGE_PIXELS``) also applies, so the effective limit is the smaller of the two.
    """
    if not data:
        raise InvalidImage("empty-file", "the file has 0 bytes")
    sha = hashlib.sha256(data).hexdigest()
    with _strict_pillow():
        try:
            img = Image.open(io.BytesIO(data))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise InvalidImage("decompression-bomb", str(exc)) from exc
        except (UnidentifiedImageError, SyntaxError, OSError, ValueError, EOFError) as exc:
            if _looks_like_image(data):
                raise InvalidImage("truncated", f"image header is damaged or cut short: {exc}") from exc
            raise InvalidImage("not-an-image", "Pillow cannot identify this file as an image") from exc
        with img:
            width, height = img.size
            if width * height > max_pixels:
                raise InvalidImage(
                    "decompression-bomb",
                    f"{width}x{height} = {width * height} pixels exceeds max_pixels={max_pixels}",
                )
            try:
                img.load()
            except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
                raise InvalidImage("decompression-bomb", str(exc)) from exc
            except (OSError, SyntaxError, ValueError, EOFError, zlib.error) as exc:
                raise InvalidImage("truncated", f"decoding failed: {exc}") from exc
            fmt = img.format or "UNKNOWN"
    return ImageInfo(sha, width, height, fmt, _FORMAT_EXT.get(fmt, fmt.lower()), len(data))


def inspect_file(path: str | Path, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageInfo:
    """:func:`inspect_bytes` on a file; unreadable files raise ``InvalidImage("unreadable", ...)``."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise InvalidImage("unreadable", f"{type(exc).__name__}: {exc.strerror or exc}") from exc
    return inspect_bytes(data, max_pixels=max_pixels)


# --------------------------------------------------------------------------------------------- batch
def validate_scan(
    scan: LayoutScan,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    progress: Callable[[int], None] | None = None,
) -> ValidationResult:
    """Validate every file of ``scan``; ``progress(n)`` is called after each file with the count so far."""
    result = ValidationResult()
    good: list[ValidatedEntry] = []
    leftover_detail = {lo.entry.rel_path: lo.detail for lo in scan.leftovers}
    files = [*scan.entries, *(lo.entry for lo in scan.leftovers)]
    for done, entry in enumerate(files, start=1):
        try:
            info = inspect_file(scan.root / entry.rel_path, max_pixels=max_pixels)
        except InvalidImage as exc:
            result.quarantined.append(QuarantineRecord(entry.rel_path, exc.reason, exc.detail))
        else:
            if entry.rel_path in leftover_detail:
                result.quarantined.append(
                    QuarantineRecord(
                        entry.rel_path, "unpaired-leftover", leftover_detail[entry.rel_path], info.sha256
                    )
                )
            else:
                good.append(ValidatedEntry(entry, info))
        if progress is not None:
            progress(done)

    good = _drop_duplicates(good, result.quarantined)
    if scan.paired:
        entry_of = {e.rel_path: e for e in files}
        bad_partner: dict[tuple[str, str], QuarantineRecord] = {}
        for q in result.quarantined:
            e = entry_of[q.rel_path]
            bad_partner.setdefault((e.split, e.pair_key), q)
        good = _check_pairs(good, result.quarantined, bad_partner)
    result.valid = sorted(good, key=lambda v: v.entry.rel_path)
    result.quarantined.sort(key=lambda q: (q.rel_path, q.reason))
    return result


def _drop_duplicates(
    items: list[ValidatedEntry], quarantined: list[QuarantineRecord]
) -> list[ValidatedEntry]:
    first: dict[tuple[str, str], str] = {}
    kept: list[ValidatedEntry] = []
    for item in sorted(items, key=lambda v: v.entry.rel_path):
        key = (item.entry.role, item.info.sha256)
        if key in first:
            detail = f"same content (sha256 {item.info.sha256[:12]}...) as {first[key]}"
            quarantined.append(
                QuarantineRecord(item.entry.rel_path, "duplicate-content", detail, item.info.sha256)
            )
        else:
            first[key] = item.entry.rel_path
            kept.append(item)
    return kept


def _check_pairs(
    items: list[ValidatedEntry],
    quarantined: list[QuarantineRecord],
    bad_partner: dict[tuple[str, str], QuarantineRecord],
) -> list[ValidatedEntry]:
    """Keep complete pairs of equal size; partners of quarantined files and mismatched pairs go to quarantine."""
    by_key: dict[tuple[str, str], dict[str, ValidatedEntry]] = defaultdict(dict)
    for item in items:
        by_key[(item.entry.split, item.entry.pair_key)][item.entry.role] = item
    kept: list[ValidatedEntry] = []
    for key, roles in by_key.items():
        low, high = roles.get("low"), roles.get("high")
        if low is None or high is None:
            (only,) = roles.values()
            partner = bad_partner.get(key)
            detail = (
                f"its partner {partner.rel_path} was quarantined ({partner.reason})"
                if partner is not None
                else "its partner is missing"
            )
            quarantined.append(
                QuarantineRecord(only.entry.rel_path, "unpaired-leftover", detail, only.info.sha256)
            )
            continue
        if (low.info.width, low.info.height) != (high.info.width, high.info.height):
            detail = (
                f"low {low.entry.rel_path} is {low.info.width}x{low.info.height} but high "
                f"{high.entry.rel_path} is {high.info.width}x{high.info.height}"
            )
            for item in (low, high):
                quarantined.append(
                    QuarantineRecord(item.entry.rel_path, "size-mismatch", detail, item.info.sha256)
                )
            continue
        kept.extend((low, high))
    return kept
