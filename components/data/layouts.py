"""Recognise the directory layouts low-light datasets ship in, and turn them into labelled file entries.

Supported trees (directory names are matched case-insensitively):

* ``lol``: ``our485/{low,high}`` (train) and ``eval15/{low,high}`` (test), identical file names;
* ``lol-v2-real`` / ``lol-v2-synthetic``: ``Real_captured|Synthetic/{Train,Test}/{Low,Normal}``; the official
  test folders were renamed ``{low,high}``, so both spellings are accepted. Low/normal files are paired by
  identical name, else by the name without its role prefix (``low00001``/``normal00001``), else - only when
  no name matches at all and both sides have as many files - by sorted order, as the official loaders do;
* ``unpaired``: images directly in a folder, or one level down in per-set subfolders (MEF, LIME, NPE, DICM).

The scan only labels files; whether a file is a usable image is decided by :mod:`components.data.validation`.
Every file inside a role folder becomes an entry or a leftover, so nothing in the layout is dropped silently.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "IMAGE_EXTENSIONS",
    "LAYOUTS",
    "Entry",
    "LayoutError",
    "LayoutScan",
    "Leftover",
    "detect_layout",
    "scan_layout",
]

LAYOUTS: tuple[str, ...] = ("lol", "lol-v2-real", "lol-v2-synthetic", "unpaired")
IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".gif"}
)

_EXPECTED_TREES = (
    "  lol:              our485/{low,high}/*, eval15/{low,high}/*  (same file names in low and high)\n"
    "  lol-v2-real:      Real_captured/{Train,Test}/{Low,Normal}/*  (or {low,high})\n"
    "  lol-v2-synthetic: Synthetic/{Train,Test}/{Low,Normal}/*  (or {low,high})\n"
    "  unpaired:         images directly in the folder, or in per-set subfolders (MEF/, LIME/, NPE/, DICM/)"
)
_LOL_SPLITS = {"our485": "train", "eval15": "test"}
_V2_ROOTS = {"lol-v2-real": "real_captured", "lol-v2-synthetic": "synthetic"}
_V2_SPLITS = {"train": "train", "test": "test"}
_LOW_DIRS = ("low",)
_HIGH_DIRS = ("high", "normal")
_ROLE_PREFIX = re.compile(r"^(low|normal|high)[_\-]?", re.IGNORECASE)
_MAX_WRAPPER_DEPTH = 3  # archives often wrap the dataset in one or two top-level folders


class LayoutError(ValueError):
    """The source does not look like any supported layout (or matches several)."""


@dataclass(frozen=True)
class Entry:
    """One file of the layout: where it is (relative to the scanned root) and what it is."""

    rel_path: str  # POSIX path relative to the source root
    split: str  # train | test | unpaired
    role: str  # low | high | unpaired
    pair_key: str  # "<split>/<name>" for pairs, the relative path for unpaired images


@dataclass(frozen=True)
class Leftover:
    """A file inside a role folder that has no partner (paired layouts only)."""

    entry: Entry
    detail: str


@dataclass
class LayoutScan:
    """Result of :func:`scan_layout`."""

    layout: str
    root: Path  # the scanned source root; every ``rel_path`` is relative to it
    layout_root: Path  # where the layout's trees start (below ``root`` when wrapped in folders)
    entries: list[Entry] = field(default_factory=list)
    leftovers: list[Leftover] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)  # files outside the layout's trees

    @property
    def paired(self) -> bool:
        return self.layout != "unpaired"


# --------------------------------------------------------------------------------------------- helpers
def _visible(name: str) -> bool:
    return not name.startswith(".") and name != "__MACOSX"


def _children(path: Path) -> dict[str, Path]:
    """Visible entries of a folder keyed by lower-cased name (first spelling wins on a case clash)."""
    out: dict[str, Path] = {}
    try:
        names = sorted(os.listdir(path))
    except OSError:
        return out
    for name in names:
        if _visible(name):
            out.setdefault(name.lower(), path / name)
    return out


def _subdir(path: Path, *names: str) -> Path | None:
    children = _children(path)
    for name in names:
        p = children.get(name)
        if p is not None and p.is_dir():
            return p
    return None


def _files(folder: Path) -> list[Path]:
    """Visible files (and symlinks, even dangling ones, so they can be reported) directly in ``folder``."""
    return [p for p in _children(folder).values() if p.is_symlink() or p.is_file()]


def _walk_files(root: Path) -> Iterable[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if _visible(d))
        for name in sorted(filenames):
            if _visible(name):
                yield Path(dirpath) / name


def _rel(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def _is_image_name(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


# --------------------------------------------------------------------------------------------- matching
def _matches(root: Path, layout: str) -> bool:
    if layout == "lol":
        return any(
            _subdir(split_dir, *_LOW_DIRS) and _subdir(split_dir, *_HIGH_DIRS)
            for split_dir in (_subdir(root, s) for s in _LOL_SPLITS)
            if split_dir is not None
        )
    if layout in _V2_ROOTS:
        base = _subdir(root, _V2_ROOTS[layout])
        if base is None:
            return False
        return any(
            _subdir(split_dir, *_LOW_DIRS) and _subdir(split_dir, *_HIGH_DIRS)
            for split_dir in (_subdir(base, s) for s in _V2_SPLITS)
            if split_dir is not None
        )
    if layout == "unpaired":
        files = list(_walk_files(root))
        flat = all(len(p.relative_to(root).parts) <= 2 for p in files)
        return flat and any(_is_image_name(p) for p in files)
    raise LayoutError(f"unknown layout {layout!r}; choose one of: auto, {', '.join(LAYOUTS)}")


def _find_root(root: Path, candidates: tuple[str, ...]) -> tuple[Path, list[str]]:
    """Descend through single wrapper folders until a layout matches; return (layout root, matches).

    Paired layouts are tried before ``unpaired`` at each level, so a LOL tree is never read as loose images.
    """
    current = root
    for _ in range(_MAX_WRAPPER_DEPTH + 1):
        found = [name for name in candidates if name != "unpaired" and _matches(current, name)]
        if not found and "unpaired" in candidates and _matches(current, "unpaired"):
            found = ["unpaired"]
        if found:
            return current, found
        children = _children(current)
        dirs = [p for p in children.values() if p.is_dir()]
        files = [p for p in children.values() if not p.is_dir()]
        if len(dirs) != 1 or any(_is_image_name(f) for f in files):
            break
        current = dirs[0]
    return root, []


# --------------------------------------------------------------------------------------------- pairing
def _role_stem(stem: str) -> str:
    return _ROLE_PREFIX.sub("", stem, count=1)


def _pair_folder(low_dir: Path, high_dir: Path, split: str, root: Path) -> tuple[list[Entry], list[Leftover]]:
    """Pair the files of one low/high folder pair (see module docstring for the rules)."""
    lows, highs = _files(low_dir), _files(high_dir)

    def index(paths: list[Path], keyfn) -> tuple[dict[str, Path], list[Path]]:
        table: dict[str, Path] = {}
        clashes: list[Path] = []
        for p in paths:  # already sorted: the first spelling of a key wins
            key = keyfn(p)
            if key in table:
                clashes.append(p)
            else:
                table[key] = p
        return table, clashes

    def pairs_by(keyfn) -> tuple[dict[str, tuple[Path, Path]], list[Path]]:
        low_t, low_c = index(lows, keyfn)
        high_t, high_c = index(highs, keyfn)
        common = sorted(low_t.keys() & high_t.keys())
        return {k: (low_t[k], high_t[k]) for k in common}, low_c + high_c

    pairs, clashes = pairs_by(lambda p: p.stem)
    if not pairs:
        pairs, clashes = pairs_by(lambda p: _role_stem(p.stem))
    if not pairs and lows and len(lows) == len(highs):
        pairs = {_role_stem(lo.stem): (lo, hi) for lo, hi in zip(lows, highs, strict=True)}
        clashes = []
        if len(pairs) != len(lows):  # stems collapse after stripping: fall back to the low file name
            pairs = {lo.stem: (lo, hi) for lo, hi in zip(lows, highs, strict=True)}

    entries: list[Entry] = []
    used: set[Path] = set()
    for key, (lo, hi) in pairs.items():
        pair_key = f"{split}/{key}"
        entries.append(Entry(_rel(lo, root), split, "low", pair_key))
        entries.append(Entry(_rel(hi, root), split, "high", pair_key))
        used.update((lo, hi))

    leftovers: list[Leftover] = []
    clash_set = set(clashes)
    for role, paths, other in (("low", lows, high_dir), ("high", highs, low_dir)):
        for p in paths:
            if p in used:
                continue
            detail = (
                f"another {role} file in {_rel(p.parent, root)} has the same name stem"
                if p in clash_set
                else f"no matching file in {_rel(other, root)}"
            )
            entry = Entry(_rel(p, root), split, role, f"{split}/{p.stem}")
            leftovers.append(Leftover(entry, detail))
    return entries, leftovers


# --------------------------------------------------------------------------------------------- scanning
def _scan_paired(root: Path, layout_root: Path, layout: str) -> LayoutScan:
    scan = LayoutScan(layout=layout, root=root, layout_root=layout_root)
    if layout == "lol":
        split_dirs = [(split, _subdir(layout_root, name)) for name, split in _LOL_SPLITS.items()]
    else:
        base = _subdir(layout_root, _V2_ROOTS[layout])
        assert base is not None
        split_dirs = [(split, _subdir(base, name)) for name, split in _V2_SPLITS.items()]
    covered: set[Path] = set()
    for split, split_dir in split_dirs:
        if split_dir is None:
            continue
        low_dir, high_dir = _subdir(split_dir, *_LOW_DIRS), _subdir(split_dir, *_HIGH_DIRS)
        if low_dir is None or high_dir is None:
            continue
        entries, leftovers = _pair_folder(low_dir, high_dir, split, root)
        scan.entries.extend(entries)
        scan.leftovers.extend(leftovers)
        covered.update((low_dir, high_dir))
    for path in _walk_files(root):
        if path.parent not in covered:
            scan.ignored.append(_rel(path, root))
    scan.entries.sort(key=lambda e: e.rel_path)
    scan.leftovers.sort(key=lambda lo: lo.entry.rel_path)
    return scan


def _scan_unpaired(root: Path, layout_root: Path) -> LayoutScan:
    scan = LayoutScan(layout="unpaired", root=root, layout_root=layout_root)
    for path in _walk_files(root):
        rel = _rel(path, root)
        inside = path.is_relative_to(layout_root) and len(path.relative_to(layout_root).parts) <= 2
        if inside:
            scan.entries.append(Entry(rel, "unpaired", "unpaired", rel))
        else:
            scan.ignored.append(rel)
    return scan


def detect_layout(root: str | os.PathLike[str]) -> str:
    """Name of the layout found under ``root`` (see :func:`scan_layout` for the rules)."""
    return scan_layout(root).layout


def scan_layout(
    root: str | os.PathLike[str], layout: str = "auto", *, label: str | None = None
) -> LayoutScan:
    """Find ``layout`` (or detect it, for ``"auto"``) under ``root`` and list its files.

    Single wrapper folders (``LOLdataset/our485/...``) are descended automatically. Raises
    :class:`LayoutError` naming ``root`` and the expected trees when nothing matches, or when ``"auto"``
    finds several paired layouts (e.g. both LOL-v2 subsets): then pass the layout explicitly. ``label``
    names the source in those messages when ``root`` is a temporary copy (an extracted archive, an S3 prefix).
    """
    root = Path(root)
    name = label or str(root)
    if not root.is_dir():
        raise LayoutError(f"{name} is not a folder")
    if layout != "auto" and layout not in LAYOUTS:
        raise LayoutError(f"unknown layout {layout!r}; choose one of: auto, {', '.join(LAYOUTS)}")

    candidates = LAYOUTS if layout == "auto" else (layout,)
    layout_root, found = _find_root(root, candidates)
    if len(found) > 1:
        raise LayoutError(
            f"{name} matches several layouts ({', '.join(found)}); pass layout= one of them explicitly"
        )
    if found == ["unpaired"]:
        return _scan_unpaired(root, layout_root)
    if found:
        return _scan_paired(root, layout_root, found[0])

    wanted = "any supported layout" if layout == "auto" else f"the {layout!r} layout"
    raise LayoutError(f"{name} does not contain {wanted}. Expected one of these trees:\n{_EXPECTED_TREES}")
