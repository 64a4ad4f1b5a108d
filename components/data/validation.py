"""Decide which scanned files are usable images, and quarantine the rest with a machine-readable reason.

Per file: ``symlink``, ``special-file`` (device, FIFO, socket), ``outside-source``, ``too-large``,
``unreadable``, ``empty-file``, ``not-an-image``, ``truncated``, ``decompression-bomb``. Across files:
``duplicate-content`` (same sha256 as an earlier file of the same role; the first by sorted path is kept),
and for paired layouts ``unpaired-leftover`` (no valid partner) and ``size-mismatch`` (both quarantined).
A valid file is never dropped: it is either returned as valid or quarantined with a reason and detail.

Label maps (role ``label``, see :mod:`components.data.layouts`) are checked after their pair: a label map
whose pair was quarantined is an ``unpaired-leftover``; one that is not a lossless single-channel 8-bit
image is a ``bad-label``; one whose size differs from its low image a ``size-mismatch``; one holding class
ids that ``classes.json`` does not name an ``unknown-class``; and all of them are ``label-classes`` when
``classes.json`` is missing or malformed. A bad label map is quarantined alone: its pair is kept, so
labels never cost an image. Identical label maps are not duplicates (two scenes may share a layout).

Reading is the last line of defence against hostile trees, whatever the scan saw: a file is opened only
when every component of its path below the source root is a real folder and the file itself is a regular
file (``O_NOFOLLOW``, ``O_NONBLOCK`` so a FIFO swapped in cannot hang us, then ``fstat``). Memory stays
bounded: the size limit is checked before reading, the hash is computed in chunks, and the header's
width x height is checked before any pixel is decoded.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import stat
import threading
import warnings
import zlib
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from components.data.layouts import CLASSES_FILE, LABEL_ROLE, Entry, LayoutScan

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "REASONS",
    "ImageInfo",
    "InvalidImage",
    "QuarantineRecord",
    "ValidatedEntry",
    "ValidationResult",
    "describe_conversion",
    "inspect_bytes",
    "inspect_file",
    "inspect_source_file",
    "inspect_stream",
    "open_source_file",
    "resolve_limits",
    "validate_scan",
]

# Kept for callers that imported it; the effective default is the SKF_MAX_IMAGE_PIXELS setting.
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
    "symlink",
    "special-file",
    "outside-source",
    "too-large",
    "duplicate-member",
    "non-utf8-name",
    "bad-label",
    "unknown-class",
    "label-classes",
)
# Label maps hold class ids: single-channel 8-bit (palette indices count as ids) and losslessly stored.
LABEL_MODES: frozenset[str] = frozenset({"L", "P"})
LABEL_FORMATS: frozenset[str] = frozenset({"PNG", "BMP", "TIFF", "PPM"})
_MAX_CLASSES_BYTES = 1 << 20
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
_CHUNK = 1 << 20
_EXIF_ORIENTATION = 0x0112
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_DIR_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_NOFOLLOW", 0) | _CLOEXEC
_FILE_FLAGS = (
    os.O_RDONLY
    | getattr(os, "O_NOFOLLOW", 0)
    | getattr(os, "O_NONBLOCK", 0)
    | getattr(os, "O_NOCTTY", 0)
    | _CLOEXEC
)
# How the training/evaluation loader (``Image.convert("RGB")``) turns each mode into RGB, for the record.
_MODE_NOTES = {
    "1": "1-bit black/white expanded to RGB",
    "L": "greyscale replicated to 3 channels",
    "LA": "greyscale replicated to 3 channels, alpha discarded (not composited)",
    "P": "palette expanded to RGB",
    "PA": "palette expanded to RGB, alpha discarded (not composited)",
    "RGBA": "alpha discarded (not composited)",
    "RGBX": "padding channel dropped",
    "RGBa": "alpha discarded (not composited)",
    "CMYK": "naive CMYK to RGB (no ICC profile applied)",
    "YCbCr": "YCbCr converted to RGB",
    "LAB": "Lab converted to RGB",
    "HSV": "HSV converted to RGB",
    "I": "32-bit integer values clipped to 0..255",
    "I;16": "16-bit values clipped to 0..255",
    "I;16B": "16-bit values clipped to 0..255",
    "I;16L": "16-bit values clipped to 0..255",
    "F": "float values clipped to 0..255",
}
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
    mode: str = "RGB"  # Pillow mode of the stored bytes, e.g. L, RGBA, CMYK, P
    conversion: str = ""  # what loading it as RGB does to it; "" when nothing (plain RGB, upright)


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
    # Class names of the label maps (``classes.json``, id order); empty when no label map is valid.
    label_classes: tuple[str, ...] = ()


def resolve_limits(max_pixels: int | None, max_bytes: int | None) -> tuple[int, int]:
    """Explicit limits win (tests, callers); ``None`` means the SKF_MAX_IMAGE_PIXELS/FILE_BYTES settings."""
    if max_pixels is not None and max_bytes is not None:
        return max_pixels, max_bytes
    from components.settings import get_settings

    limits = get_settings().limits
    return (
        limits.max_image_pixels if max_pixels is None else max_pixels,
        limits.max_file_bytes if max_bytes is None else max_bytes,
    )


# --------------------------------------------------------------------------------------------- safe open
def _lstat_reason(name: str, dir_fd: int, shown: str, *, final: bool = False) -> InvalidImage | None:
    """Why ``name`` (in ``dir_fd``) must not be opened: a link, or (``final``) not a regular file."""
    try:
        st = os.lstat(name, dir_fd=dir_fd)
    except OSError as exc:
        return InvalidImage("unreadable", f"{type(exc).__name__}: {exc.strerror or exc}")
    if stat.S_ISLNK(st.st_mode):
        try:
            target = os.readlink(name, dir_fd=dir_fd)
        except OSError:
            target = "?"
        return InvalidImage("symlink", f"{shown} is a symbolic link (to {target}); links are never followed")
    return _special_reason(st, shown) if final else None


_KINDS = (
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISDIR, "a folder"),
)


def _special_reason(st: os.stat_result, shown: str) -> InvalidImage | None:
    if stat.S_ISREG(st.st_mode):
        return None
    kind = next((name for test, name in _KINDS if test(st.st_mode)), "an unknown kind of file")
    return InvalidImage("special-file", f"{shown} is {kind}, not a regular file; it was not read")


def _open_dir_chain(root: Path, parts: list[str]) -> int:
    """fd of the folder holding ``parts[-1]``, opened component by component without following links."""
    fd = os.open(root, _DIR_FLAGS & ~getattr(os, "O_NOFOLLOW", 0))
    try:
        for i, part in enumerate(parts[:-1]):
            reason = _lstat_reason(part, fd, "/".join(parts[: i + 1]))
            if reason is not None:
                raise reason
            try:
                child = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                raise InvalidImage("unreadable", f"{type(exc).__name__}: {exc.strerror or exc}") from exc
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


def _check_inside(root: Path, rel_path: str) -> None:
    real_root = os.path.realpath(root)
    real = os.path.realpath(os.path.join(real_root, *rel_path.split("/")))
    if os.path.commonpath([real_root, real]) != real_root:
        raise InvalidImage("outside-source", f"{rel_path} resolves to {real}, outside the source {real_root}")


def open_source_file(root: str | os.PathLike[str], rel_path: str) -> IO[bytes]:
    """Open ``root/rel_path`` for reading only if it is a regular file inside ``root`` reached without links.

    Raises :class:`InvalidImage` (``symlink``, ``special-file``, ``outside-source``, ``unreadable``)
    otherwise; a device or FIFO is never opened (checked with ``lstat`` first), and whatever is swapped in
    between that check and the open is caught by ``O_NOFOLLOW``, ``O_NONBLOCK`` and ``fstat``.
    """
    root = Path(root)
    parts = rel_path.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise InvalidImage("outside-source", f"{rel_path!r} is not a plain path below the source")
    try:
        dir_fd = _open_dir_chain(root, parts)
    except OSError as exc:
        raise InvalidImage("unreadable", f"{type(exc).__name__}: {exc.strerror or exc}") from exc
    try:
        f = _open_final(parts[-1], dir_fd, rel_path)
    finally:
        os.close(dir_fd)
    try:
        _check_inside(root, rel_path)  # belt and braces: the link-free walk cannot leave the root
    except InvalidImage:
        f.close()
        raise
    return f


def _open_final(name: str, dir_fd: int, shown: str) -> IO[bytes]:
    reason = _lstat_reason(name, dir_fd, shown, final=True)
    if reason is not None:
        raise reason
    try:
        fd = os.open(name, _FILE_FLAGS, dir_fd=dir_fd)
    except OSError as exc:  # ELOOP: a link was swapped in after the lstat
        raise InvalidImage("unreadable", f"{type(exc).__name__}: {exc.strerror or exc}") from exc
    reason = _special_reason(os.fstat(fd), shown)
    if reason is not None:
        os.close(fd)
        raise reason
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


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


def _digest(f: IO[bytes], max_bytes: int) -> tuple[str, int, bytes]:
    """(sha256, size, first bytes) of the stream, read in chunks; refuses past ``max_bytes``."""
    h = hashlib.sha256()
    size, head = 0, b""
    for chunk in iter(lambda: f.read(_CHUNK), b""):
        if not head:
            head = chunk[:16]
        size += len(chunk)
        if size > max_bytes:
            raise InvalidImage(
                "too-large", f"more than {max_bytes} bytes (raise SKF_MAX_FILE_BYTES to accept it)"
            )
        h.update(chunk)
    if size == 0:
        raise InvalidImage("empty-file", "the file has 0 bytes")
    return h.hexdigest(), size, head


def describe_conversion(mode: str, orientation: int | None, size: tuple[int, int]) -> str:
    """What loading these bytes as RGB does (the stored object is the original file); "" for nothing."""
    notes = []
    if mode != "RGB":
        notes.append(f"{mode}->RGB at load: {_MODE_NOTES.get(mode, 'converted by Pillow')}")
    if orientation not in (None, 1):
        notes.append(
            f"EXIF orientation {orientation} not applied: pixels are used as stored ({size[0]}x{size[1]})"
        )
    return "; ".join(notes)


def _orientation(img: Image.Image) -> int | None:
    try:
        value = img.getexif().get(_EXIF_ORIENTATION)
    except Exception:  # a damaged EXIF block is not a damaged image
        return None
    return int(value) if isinstance(value, int) else None


def _decode(f: IO[bytes], head: bytes, max_pixels: int) -> tuple[int, int, str, str, str]:
    """(width, height, format, mode, conversion), checking the header's size before decoding pixels."""
    with _strict_pillow():
        try:
            img = Image.open(f)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise InvalidImage("decompression-bomb", str(exc)) from exc
        except (UnidentifiedImageError, SyntaxError, OSError, ValueError, EOFError) as exc:
            if _looks_like_image(head):
                raise InvalidImage("truncated", f"image header is damaged or cut short: {exc}") from exc
            raise InvalidImage("not-an-image", "Pillow cannot identify this file as an image") from exc
        with img:
            width, height = img.size
            if width * height > max_pixels:
                raise InvalidImage(
                    "decompression-bomb",
                    f"{width}x{height} = {width * height} pixels exceeds max_pixels={max_pixels} "
                    "(SKF_MAX_IMAGE_PIXELS)",
                )
            try:
                img.load()
            except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
                raise InvalidImage("decompression-bomb", str(exc)) from exc
            except (OSError, SyntaxError, ValueError, EOFError, zlib.error) as exc:
                raise InvalidImage("truncated", f"decoding failed: {exc}") from exc
            fmt, mode = img.format or "UNKNOWN", img.mode
            conversion = describe_conversion(mode, _orientation(img), (width, height))
    return width, height, fmt, mode, conversion


def inspect_stream(f: IO[bytes], *, max_pixels: int | None = None, max_bytes: int | None = None) -> ImageInfo:
    """Hash ``f`` in chunks, then decode it from the start; return its description or raise InvalidImage."""
    max_pixels, max_bytes = resolve_limits(max_pixels, max_bytes)
    sha, size, head = _digest(f, max_bytes)
    f.seek(0)
    width, height, fmt, mode, conversion = _decode(f, head, max_pixels)
    return ImageInfo(sha, width, height, fmt, _FORMAT_EXT.get(fmt, fmt.lower()), size, mode, conversion)


def inspect_bytes(data: bytes, *, max_pixels: int | None = None, max_bytes: int | None = None) -> ImageInfo:
    """Fully decode ``data``; return its description or raise :class:`InvalidImage`.

    ``max_pixels`` bounds width x height before any pixel is decoded. Pillow's own bomb limit
    (``Image.MAX_IMAGE_PIXELS``) also applies, so the effective limit is the smaller of the two.
    """
    return inspect_stream(io.BytesIO(data), max_pixels=max_pixels, max_bytes=max_bytes)


def _check_size(f: IO[bytes], max_bytes: int) -> None:
    """Refuse a file by its ``fstat`` size before reading a byte of it (a sparse 6 GiB file costs nothing)."""
    size = os.fstat(f.fileno()).st_size
    if size > max_bytes:
        raise InvalidImage(
            "too-large", f"{size} bytes exceeds SKF_MAX_FILE_BYTES={max_bytes}; raise it to accept this file"
        )


def inspect_source_file(
    root: str | os.PathLike[str],
    rel_path: str,
    *,
    max_pixels: int | None = None,
    max_bytes: int | None = None,
) -> ImageInfo:
    """:func:`inspect_stream` on ``root/rel_path``, opened with :func:`open_source_file`."""
    max_pixels, max_bytes = resolve_limits(max_pixels, max_bytes)
    with open_source_file(root, rel_path) as f:
        _check_size(f, max_bytes)
        try:
            return inspect_stream(f, max_pixels=max_pixels, max_bytes=max_bytes)
        except OSError as exc:
            raise InvalidImage("unreadable", f"{type(exc).__name__}: {exc.strerror or exc}") from exc


def inspect_file(
    path: str | Path, *, max_pixels: int | None = None, max_bytes: int | None = None
) -> ImageInfo:
    """:func:`inspect_source_file` on one file (its folder is the root); links and special files refused."""
    path = Path(path)
    return inspect_source_file(path.parent, path.name, max_pixels=max_pixels, max_bytes=max_bytes)


# --------------------------------------------------------------------------------------------- batch
def validate_scan(
    scan: LayoutScan,
    *,
    max_pixels: int | None = None,
    max_bytes: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> ValidationResult:
    """Validate every file of ``scan``; ``progress(n)`` is called after each file with the count so far.

    ``max_pixels``/``max_bytes`` default to the SKF_MAX_IMAGE_PIXELS/SKF_MAX_FILE_BYTES settings.
    """
    max_pixels, max_bytes = resolve_limits(max_pixels, max_bytes)
    result = ValidationResult()
    # Files the scan refused (links, special files, unusable names) are quarantined as they are, unread.
    refused = list(scan.refused)
    result.quarantined += [QuarantineRecord(lo.entry.rel_path, lo.reason, lo.detail) for lo in refused]
    good: list[ValidatedEntry] = []
    leftover_of = {lo.entry.rel_path: lo for lo in scan.leftovers}
    files = [*scan.entries, *(lo.entry for lo in scan.leftovers)]
    for done, entry in enumerate(files, start=1):
        try:
            info = inspect_source_file(scan.root, entry.rel_path, max_pixels=max_pixels, max_bytes=max_bytes)
        except InvalidImage as exc:
            result.quarantined.append(QuarantineRecord(entry.rel_path, exc.reason, exc.detail))
        else:
            leftover = leftover_of.get(entry.rel_path)
            if leftover is not None:
                reason = getattr(leftover, "reason", "unpaired-leftover")
                result.quarantined.append(
                    QuarantineRecord(entry.rel_path, reason, leftover.detail, info.sha256)
                )
            else:
                good.append(ValidatedEntry(entry, info))
        if progress is not None:
            progress(done)

    labels = [v for v in good if v.entry.role == LABEL_ROLE]
    good = _drop_duplicates([v for v in good if v.entry.role != LABEL_ROLE], result.quarantined)
    if scan.paired:
        entry_of = {e.rel_path: e for e in [*files, *(lo.entry for lo in refused)]}
        bad_partner: dict[tuple[str, str], QuarantineRecord] = {}
        for q in result.quarantined:
            e = entry_of[q.rel_path]
            if e.role != LABEL_ROLE:  # a bad label map is never the reason a pair breaks
                bad_partner.setdefault((e.split, e.pair_key), q)
        good = _check_pairs(good, result.quarantined, bad_partner)
    if labels:
        classes = read_label_classes(scan)
        kept = _check_labels(scan, labels, good, classes, result.quarantined, max_bytes)
        result.label_classes = classes if isinstance(classes, tuple) and kept else ()
        good += kept
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


# --------------------------------------------------------------------------------------------- label maps
def read_label_classes(scan: LayoutScan) -> tuple[str, ...] | str:
    """The class names of ``scan``'s ``classes.json`` in id order, or why they cannot be used (a str)."""
    where = "at the dataset root (beside our485/ and eval15/)"
    if not scan.classes_file:
        return f"no {CLASSES_FILE} {where} names the class ids; add one listing the class names in id order"
    try:
        with open_source_file(scan.root, scan.classes_file) as f:
            data = f.read(_MAX_CLASSES_BYTES + 1)
    except (InvalidImage, OSError) as exc:
        return f"{scan.classes_file} cannot be read ({exc}); make it a regular readable file {where}"
    try:
        names = json.loads(data) if len(data) <= _MAX_CLASSES_BYTES else None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return f"{scan.classes_file} is not valid JSON ({exc}); write a JSON list of class names"
    ok = isinstance(names, list) and 0 < len(names) <= 256 and all(isinstance(n, str) and n for n in names)
    if not ok or len(set(names)) != len(names):
        return (
            f"{scan.classes_file} must be a JSON list of 1 to 256 distinct, non-empty class names "
            '(id order, e.g. ["sky", "road"])'
        )
    return tuple(names)


def _check_labels(
    scan: LayoutScan,
    labels: list[ValidatedEntry],
    pairs: list[ValidatedEntry],
    classes: tuple[str, ...] | str,
    quarantined: list[QuarantineRecord],
    max_bytes: int,
) -> list[ValidatedEntry]:
    """The label maps that belong to a kept pair and pass :func:`_label_problem`; the rest are quarantined."""
    low_of = {(v.entry.split, v.entry.pair_key): v for v in pairs if v.entry.role == "low"}
    kept: list[ValidatedEntry] = []
    for label in labels:
        low = low_of.get((label.entry.split, label.entry.pair_key))
        if low is None:
            detail = "its low/high pair was quarantined (see their entries), so the label map has no image"
            problem: tuple[str, str] | None = ("unpaired-leftover", detail)
        elif isinstance(classes, str):
            problem = ("label-classes", f"cannot check {label.entry.rel_path}: {classes}")
        else:
            try:
                problem = _label_problem(scan, label, low, len(classes), max_bytes)
            except InvalidImage as exc:
                problem = (exc.reason, exc.detail)
            except OSError as exc:
                problem = ("unreadable", f"{type(exc).__name__}: {exc.strerror or exc}")
        if problem is None:
            kept.append(label)
        else:
            quarantined.append(QuarantineRecord(label.entry.rel_path, *problem, label.info.sha256))
    return kept


def _label_problem(
    scan: LayoutScan, label: ValidatedEntry, low: ValidatedEntry, n_classes: int, max_bytes: int
) -> tuple[str, str] | None:
    """(reason, one-line detail with the fix) of a label map that cannot be used, else ``None``."""
    rel, info = label.entry.rel_path, label.info
    if info.mode not in LABEL_MODES or info.format not in LABEL_FORMATS:
        return (
            "bad-label",
            f"label map {rel} is {info.format} mode {info.mode}; save class ids as a single-channel 8-bit "
            "PNG (mode L)",
        )
    if (info.width, info.height) != (low.info.width, low.info.height):
        return (
            "size-mismatch",
            f"label map {rel} is {info.width}x{info.height} but its low image {low.entry.rel_path} is "
            f"{low.info.width}x{low.info.height}; make the label map the size of its image",
        )
    ids = _class_ids(scan, label, max_bytes)
    unknown = ids[ids >= n_classes]
    if unknown.size:
        shown = ", ".join(str(int(i)) for i in unknown[:8])
        return (
            "unknown-class",
            f"label map {rel} has class ids {shown} but {scan.classes_file} names {n_classes} classes "
            f"(ids 0-{n_classes - 1}); fix the map or add the class names to {scan.classes_file}",
        )
    return None


def _class_ids(scan: LayoutScan, label: ValidatedEntry, max_bytes: int) -> np.ndarray:
    """The distinct ids of a label map, decoded from bytes that still hash to what validation saw."""
    with open_source_file(scan.root, label.entry.rel_path) as f:
        data = f.read(max_bytes + 1)
    if hashlib.sha256(data).hexdigest() != label.info.sha256:
        raise InvalidImage("unreadable", f"{label.entry.rel_path} changed during validation; retry")
    with _strict_pillow(), Image.open(io.BytesIO(data)) as img:
        return np.unique(np.asarray(img))
