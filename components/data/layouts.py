"""Recognise the directory layouts low-light datasets ship in, and turn them into labelled file entries.

Supported trees (directory names are matched case-insensitively, file names exactly):

* ``lol``: ``our485/{low,high}`` (train) and ``eval15/{low,high}`` (test) with identical file names, usually
  wrapped in ``LOLdataset/``; a source that *is* ``our485/`` or ``eval15/`` is read as that one split;
* ``lol-v2-real`` / ``lol-v2-synthetic``: ``Real_captured|Synthetic/{Train,Test}/{Low,Normal}`` (test folders
  sometimes spelled ``{low,high}``). Accepted as ``LOL-v2/`` (holding either or both subsets: name the
  subset when both are there), as ``Real_captured/`` or ``Synthetic/`` itself (the folder, or the last
  segment of an ``s3://`` prefix, gives the subset), or as a bare ``{Train,Test}/{Low,Normal}`` tree when the
  layout is named explicitly;
* ``unpaired``: images directly in a folder, or one level down in per-set subfolders (MEF, LIME, NPE, DICM).

A split of a paired layout may hold an optional ``labels/`` folder beside its low and high folders: per-pixel
class-id maps, each named like the low image it belongs to (same stem), with the class names in a
``classes.json`` at the layout root (or above it, up to the source root). They become entries of role
``label`` under the pair's key; a label map without a paired low image of that stem is a leftover.

Pairs are made by name only: identical stem (``r000da54ft.png`` in both folders), else identical after
stripping the role prefix (``low00001.png`` / ``normal00001.png``). A file without a partner, or whose name
pairs with several files, is a leftover (quarantined as ``unpaired-leftover``, the detail names the missing
partner). Pairing by sorted order is an explicit opt-in (``pair_by="order"``, or a layout written
``lol-v2-real+pair-by-order``), and the recorded layout string then carries ``+pair-by-order``.

``auto`` never reads a paired tree as unpaired images: low/high folders it cannot place raise
:class:`LayoutError` saying which ``--layout`` to pass.

The scan never opens, or follows, anything: entries are typed with ``lstat`` semantics. Symlinks (to files
or folders, inside the source or not) are *refused* as ``symlink``, FIFOs, sockets and devices as
``special-file``, and files whose name is not UTF-8 as ``non-utf8-name`` (the name shown with ``\\xNN``
escapes, so it can be stored as text). ``LayoutScan.refused`` is quarantined as it is, never read.
Whether a regular file is a usable image is decided by :mod:`components.data.validation`. Every file below
the root is an entry, a leftover, refused, or listed as ignored (outside the layout's folders), so nothing
is dropped silently.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from components.data.records import LABEL_ROLE
from components.errors import SKFError

__all__ = [
    "CLASSES_FILE",
    "IMAGE_EXTENSIONS",
    "LABEL_ROLE",
    "LAYOUTS",
    "NON_UTF8_NAME",
    "PAIR_BY",
    "PAIR_BY_ORDER_SUFFIX",
    "SPECIAL_FILE",
    "SYMLINK",
    "UNPAIRED_LEFTOVER",
    "Entry",
    "LayoutError",
    "LayoutScan",
    "Leftover",
    "detect_layout",
    "parse_layout",
    "scan_layout",
]

LAYOUTS: tuple[str, ...] = ("lol", "lol-v2-real", "lol-v2-synthetic", "unpaired")
PAIR_BY: tuple[str, ...] = ("name", "order")
PAIR_BY_ORDER_SUFFIX = "+pair-by-order"
IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".gif"}
)
# Quarantine reasons the scan assigns, in validation's vocabulary (it assigns the per-content ones, and
# refuses links and special files again when it opens a file).
UNPAIRED_LEFTOVER = "unpaired-leftover"
LABELS_DIR = "labels"
CLASSES_FILE = "classes.json"
SYMLINK = "symlink"
SPECIAL_FILE = "special-file"  # FIFO, socket, device
NON_UTF8_NAME = "non-utf8-name"

_EXPECTED_TREES = (
    "  lol:              our485/{low,high}/*, eval15/{low,high}/*  (same file names in low and high)\n"
    "  lol-v2-real:      Real_captured/{Train,Test}/{Low,Normal}/*  (or {low,high}; low00001/normal00001)\n"
    "  lol-v2-synthetic: Synthetic/{Train,Test}/{Low,Normal}/*  (or {low,high}; same names)\n"
    "  unpaired:         images directly in the folder, or in per-set subfolders (MEF/, LIME/, NPE/, DICM/)"
)
_LOL_SPLITS = {"our485": "train", "eval15": "test"}
_V2_ROOTS = {"lol-v2-real": "real_captured", "lol-v2-synthetic": "synthetic"}
_V2_SPLITS = {"train": "train", "test": "test"}
_LOW_DIRS = ("low",)
_HIGH_DIRS = ("high", "normal")
_PREFIXES = {
    "low": re.compile(r"^low[_-]?(?=.)", re.I),
    "high": re.compile(r"^(?:normal|high)[_-]?(?=.)", re.I),
}
_PARTNER_PREFIXES = {"low": ("normal", "high"), "high": ("low",)}
_SPECIAL_KINDS: tuple[tuple[Callable[[int], bool], str], ...] = (
    (stat.S_ISFIFO, "FIFO"),
    (stat.S_ISSOCK, "socket"),
    (stat.S_ISCHR, "character device"),
    (stat.S_ISBLK, "block device"),
)
_MAX_WRAPPER_DEPTH = 3  # archives often wrap the dataset in one or two top-level folders


class LayoutError(SKFError, ValueError):
    """The source does not look like any supported layout (or matches several)."""


@dataclass(frozen=True)
class Entry:
    """One file of the layout: where it is (relative to the scanned root) and what it is."""

    rel_path: str  # POSIX path relative to the source root, always valid UTF-8 text
    split: str  # train | test | unpaired ("" for a refused file outside the layout's folders)
    role: str  # low | high | label | unpaired ("" likewise)
    pair_key: str  # "<split>/<name>" for pairs, the relative path for unpaired images and leftovers


@dataclass(frozen=True)
class Leftover:
    """A file the scan could not pair, or will not let anyone open; quarantined with ``reason``/``detail``."""

    entry: Entry
    detail: str
    reason: str = UNPAIRED_LEFTOVER

    @property
    def rel_path(self) -> str:
        return self.entry.rel_path


@dataclass
class LayoutScan:
    """Result of :func:`scan_layout`.

    ``leftovers`` are regular files without a partner: validation reads them (to hash them) before it
    quarantines them. ``refused`` files must never be opened: quarantine them as they are.
    """

    layout: str  # as recorded in the catalog, e.g. "lol" or "lol-v2-real+pair-by-order"
    root: Path  # the scanned source root; every ``rel_path`` is relative to it
    layout_root: Path  # where the layout's trees start (below ``root`` when wrapped in folders)
    entries: list[Entry] = field(default_factory=list)
    leftovers: list[Leftover] = field(default_factory=list)
    refused: list[Leftover] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)  # regular files outside the layout's trees
    # ``classes.json`` naming the label maps' class ids (relative path), when the source has label maps;
    # "" when it has labels but no such file (validation then quarantines the label maps).
    classes_file: str | None = None

    @property
    def paired(self) -> bool:
        return parse_layout(self.layout)[0] != "unpaired"


@dataclass(frozen=True)
class _Item:
    """A directory entry typed without following it: ``file``, ``dir``, ``symlink``, ``FIFO``, ..."""

    path: Path
    kind: str


@dataclass(frozen=True)
class _Split:
    split: str
    low_dir: Path
    high_dir: Path
    labels_dir: Path | None = None


# --------------------------------------------------------------------------------------------- listing
def _visible(name: str) -> bool:
    return not name.startswith(".") and name != "__MACOSX"


def _kind(entry: os.DirEntry[str]) -> str:
    """What ``entry`` is, from its ``lstat`` (a symlink is a symlink, whatever it points to)."""
    if entry.is_symlink():
        return "symlink"
    if entry.is_dir(follow_symlinks=False):
        return "dir"
    if entry.is_file(follow_symlinks=False):
        return "file"
    try:
        mode = entry.stat(follow_symlinks=False).st_mode
    except OSError:
        return "entry that vanished during the scan"
    return next((name for test, name in _SPECIAL_KINDS if test(mode)), "special file")


def _list(folder: Path) -> list[_Item]:
    """Visible entries of ``folder``, spelled exactly as on disk, sorted by name; nothing is opened."""
    try:
        with os.scandir(folder) as it:
            items = [_Item(Path(e.path), _kind(e)) for e in it if _visible(e.name)]
    except OSError as exc:
        raise LayoutError(
            f"cannot list {folder}: {exc.strerror or exc}; make the folder readable and retry"
        ) from exc
    return sorted(items, key=lambda i: i.path.name)


def _walk(folder: Path) -> Iterator[_Item]:
    """Every non-folder entry below ``folder``; links to folders are yielded, never descended into."""
    for item in _list(folder):
        if item.kind == "dir":
            yield from _walk(item.path)
        else:
            yield item


def _subdir(folder: Path, *names: str) -> Path | None:
    """The real (not symlinked) subfolder of ``folder`` named one of ``names``, case-insensitively."""
    found = [i.path for i in _list(folder) if i.kind == "dir" and i.path.name.lower() in names]
    if len(found) > 1:
        raise LayoutError(
            f"{folder} has several folders for one role ({', '.join(p.name for p in found)}); "
            "merge them into one and retry"
        )
    return found[0] if found else None


def _rel(path: Path, root: Path) -> str:
    """POSIX path relative to ``root`` as storable text: bytes that are not UTF-8 shown as ``\\xNN``."""
    return os.fsencode(path.relative_to(root).as_posix()).decode("utf-8", "backslashreplace")


def _is_utf8(path: Path, root: Path) -> bool:
    try:
        path.relative_to(root).as_posix().encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _is_image_name(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


# --------------------------------------------------------------------------------------------- refusals
def _refusal(item: _Item, root: Path, split: str = "", role: str = "") -> Leftover | None:
    """A :class:`Leftover` for an entry the scan must not hand on to be opened, else ``None``."""
    rel = _rel(item.path, root)
    entry = Entry(rel, split, role, rel)
    if item.kind == "symlink":
        try:
            target = os.fsencode(os.readlink(item.path)).decode("utf-8", "backslashreplace")
        except OSError:
            target = "?"
        detail = f"symlink -> {target}: links are never followed; copy the file itself into the source"
        return Leftover(entry, detail, SYMLINK)
    if item.kind != "file":
        return Leftover(entry, f"{item.kind}, not a regular file: it was not read", SPECIAL_FILE)
    if not _is_utf8(item.path, root):
        detail = "the name is not valid UTF-8 (shown with \\x escapes); rename the file to UTF-8"
        return Leftover(entry, detail, NON_UTF8_NAME)
    return None


# --------------------------------------------------------------------------------------------- matching
def parse_layout(layout: str, pair_by: str | None = None) -> tuple[str, str]:
    """``(layout, pair_by)`` of a ``layout=`` value, which may carry the ``+pair-by-order`` opt-in."""
    base, plus, option = layout.partition("+")
    if base != "auto" and base not in LAYOUTS:
        raise LayoutError(f"unknown layout {layout!r}; choose one of: auto, {', '.join(LAYOUTS)}")
    if plus and f"+{option}" != PAIR_BY_ORDER_SUFFIX:
        raise LayoutError(
            f"unknown layout option '+{option}' in {layout!r}; the only one is {PAIR_BY_ORDER_SUFFIX}"
        )
    if pair_by is not None and pair_by not in PAIR_BY:
        raise LayoutError(f"unknown pair_by {pair_by!r}; choose name (the default) or order")
    if plus and pair_by == "name":
        raise LayoutError(f"layout {layout!r} asks to pair by order but pair_by='name'; drop one of them")
    chosen = "order" if plus else (pair_by or "name")
    if chosen == "order" and base == "unpaired":
        raise LayoutError("pairing by order applies to paired layouts only, not to 'unpaired'")
    return base, chosen


def _recorded(layout: str, pair_by: str) -> str:
    return layout + (PAIR_BY_ORDER_SUFFIX if pair_by == "order" else "")


def _with_roles(candidates: list[tuple[str, Path | None]]) -> list[_Split]:
    """The splits of ``candidates`` that hold both a low and a high folder."""
    out: list[_Split] = []
    for split, folder in candidates:
        if folder is None:
            continue
        low, high = _subdir(folder, *_LOW_DIRS), _subdir(folder, *_HIGH_DIRS)
        if low is not None and high is not None:
            out.append(_Split(split, low, high, _subdir(folder, LABELS_DIR)))
    return out


def _layout_splits(current: Path, name: str, layout: str, explicit: bool) -> list[_Split]:
    """The low/high folders of ``layout`` at ``current`` (named ``name``); empty when it does not match."""
    if layout == "lol":
        if name.lower() in _LOL_SPLITS:
            return _with_roles([(_LOL_SPLITS[name.lower()], current)])
        return _with_roles([(split, _subdir(current, d)) for d, split in _LOL_SPLITS.items()])
    subset = _V2_ROOTS[layout]
    if name.lower() in set(_V2_ROOTS.values()) - {subset}:
        return []  # the other subset's folder (lol-v2-real asked, Synthetic/ found): never relabel it
    base = _subdir(current, subset)
    if base is None and (name.lower() == subset or explicit):
        base = current  # pointed at Real_captured/ itself, or a bare Train/Test tree named by --layout
    if base is None:
        return []
    return _with_roles([(split, _subdir(base, d)) for d, split in _V2_SPLITS.items()])


def _looks_unpaired(current: Path) -> bool:
    items = list(_walk(current))
    flat = all(len(i.path.relative_to(current).parts) <= 2 for i in items)
    return flat and any(_is_image_name(i.path) for i in items)


def _paired_folders(current: Path, root: Path) -> list[str]:
    """``low + high`` folder pairs at or one level below ``current`` (a paired tree no layout placed)."""
    folders = [current, *(i.path for i in _list(current) if i.kind == "dir")]
    found = []
    for folder in folders:
        low, high = _subdir(folder, *_LOW_DIRS), _subdir(folder, *_HIGH_DIRS)
        if low is not None and high is not None:
            found.append(f"{_rel(low, root)} + {_rel(high, root)}")
    return found


def _unplaced_pairs_message(label: str, folders: list[str]) -> str:
    return (
        f"{label} holds paired low/high folders ({', '.join(folders)}) outside any layout that names its "
        "dataset, so they were not read as unpaired images; for a LOL-v2 Train/Test tree pass "
        "--layout lol-v2-real or --layout lol-v2-synthetic, for LOL put the folders under our485/ (train) "
        "and eval15/ (test)"
    )


def _find_root(
    root: Path, name: str, candidates: tuple[str, ...], label: str
) -> tuple[Path, dict[str, list[_Split]], list[str]]:
    """Descend through single wrapper folders until a layout matches.

    Returns (layout root, {layout: splits} of the matches, unplaced low/high folders seen). Paired layouts
    are tried first; under ``auto`` a level holding low/high folders that no paired layout places is an
    error rather than a set of unpaired images.
    """
    current, current_name, unplaced = root, name, []
    explicit = len(candidates) == 1
    for _ in range(_MAX_WRAPPER_DEPTH + 1):
        found = {
            layout: splits
            for layout in candidates
            if layout != "unpaired" and (splits := _layout_splits(current, current_name, layout, explicit))
        }
        if found:
            return current, found, []
        unplaced = unplaced or _paired_folders(current, root)
        if unplaced and not explicit:
            raise LayoutError(_unplaced_pairs_message(label, unplaced))
        if "unpaired" in candidates and _looks_unpaired(current):
            return current, {"unpaired": []}, []
        items = _list(current)
        dirs = [i.path for i in items if i.kind == "dir"]
        if len(dirs) != 1 or any(_is_image_name(i.path) for i in items if i.kind != "dir"):
            break
        current, current_name = dirs[0], dirs[0].name
    return root, {}, unplaced


# --------------------------------------------------------------------------------------------- pairing
def _group(files: list[Path], key: Callable[[Path], str]) -> dict[str, list[Path]]:
    out: dict[str, list[Path]] = {}
    for path in files:
        out.setdefault(key(path), []).append(path)
    return out


def _strip_role(path: Path, role: str) -> str:
    return _PREFIXES[role].sub("", path.stem, count=1)


def _match(
    lows: list[Path],
    highs: list[Path],
    keys: tuple[Callable[[Path], str], Callable[[Path], str]],
    taken: set[str],
) -> tuple[dict[str, tuple[Path, Path]], dict[Path, str]]:
    """Pairs whose key occurs once on each side; files whose key is shared (or already used) are ambiguous."""
    low_by, high_by = _group(lows, keys[0]), _group(highs, keys[1])
    pairs: dict[str, tuple[Path, Path]] = {}
    ambiguous: dict[Path, str] = {}
    for key in sorted(low_by.keys() & high_by.keys()):
        group = low_by[key] + high_by[key]
        if len(group) == 2 and key not in taken:
            pairs[key] = (group[0], group[1])
            continue
        names = ", ".join(f"{p.parent.name}/{p.name}" for p in group)
        for path in group:
            ambiguous[path] = f"ambiguous pair name {key!r} ({names}); rename or remove the extra files"
    return pairs, ambiguous


def _orphan_detail(path: Path, role: str, partner_dir: Path, root: Path) -> str:
    stripped = _strip_role(path, role)
    names = [path.stem]
    if stripped != path.stem:
        names += [prefix + stripped for prefix in _PARTNER_PREFIXES[role]]
    wanted = " or ".join(repr(n) for n in names)
    return f"orphan: no matching file in {_rel(partner_dir, root)} (its partner would be named {wanted})"


def _pair_by_name(
    lows: list[Path], highs: list[Path], split: _Split, root: Path
) -> tuple[dict[str, tuple[Path, Path]], list[Leftover]]:
    """Pair by identical stem, then by the stem without its role prefix; everything else is a leftover."""
    pairs, problems = _match(lows, highs, (lambda p: p.stem, lambda p: p.stem), set())
    used = {p for pair in pairs.values() for p in pair} | problems.keys()
    rest_low, rest_high = [p for p in lows if p not in used], [p for p in highs if p not in used]
    keys = (lambda p: _strip_role(p, "low"), lambda p: _strip_role(p, "high"))
    more, more_problems = _match(rest_low, rest_high, keys, set(pairs))
    pairs.update(more)
    problems.update(more_problems)
    used = {p for pair in pairs.values() for p in pair}
    leftovers: list[Leftover] = []
    for role, files, partner_dir in (("low", lows, split.high_dir), ("high", highs, split.low_dir)):
        for path in files:
            if path in used:
                continue
            rel = _rel(path, root)
            detail = problems.get(path) or _orphan_detail(path, role, partner_dir, root)
            leftovers.append(Leftover(Entry(rel, split.split, role, rel), detail))
    return pairs, leftovers


def _pair_by_order(
    lows: list[Path], highs: list[Path], split: _Split, root: Path
) -> tuple[dict[str, tuple[Path, Path]], list[Leftover]]:
    """Opt-in: the n-th low file (sorted by name) with the n-th high file, keyed by the low file's name."""
    if len(lows) != len(highs):
        raise LayoutError(
            f"pairing by order needs as many files in {_rel(split.low_dir, root)} as in "
            f"{_rel(split.high_dir, root)} ({len(lows)} vs {len(highs)}); fix the folders or pair by name"
        )
    keys = [_strip_role(p, "low") for p in lows]
    if len(set(keys)) != len(keys):
        keys = [p.name for p in lows]
    return dict(zip(keys, zip(lows, highs, strict=True), strict=True)), []


# --------------------------------------------------------------------------------------------- scanning
def _role_files(
    folder: Path, split: str, role: str, scan: LayoutScan
) -> tuple[list[Path], dict[Path, Leftover]]:
    """Regular files directly in a role folder, and refusals of the rest (also put in ``scan.refused``)."""
    files: list[Path] = []
    refused: dict[Path, Leftover] = {}
    for item in _list(folder):
        if item.kind == "dir":
            continue  # files of subfolders are reported by the walk over the whole source
        refusal = _refusal(item, scan.root, split, role)
        if refusal is not None:
            scan.refused.append(refusal)
            refused[item.path] = refusal
        else:
            files.append(item.path)
    return files, refused


def _blame_refused(leftover: Leftover, partner_refused: dict[Path, Leftover]) -> Leftover:
    """An orphan whose partner exists but was refused says so, rather than calling the partner missing."""
    role = leftover.entry.role
    stem = PurePosixPath(leftover.rel_path).stem
    keys = {stem, _PREFIXES[role].sub("", stem, count=1)}
    partner_role = "high" if role == "low" else "low"
    for path, refusal in partner_refused.items():
        if {path.stem, _strip_role(path, partner_role)} & keys:
            detail = f"its partner {refusal.rel_path} was quarantined ({refusal.reason})"
            return Leftover(leftover.entry, detail, leftover.reason)
    return leftover


def _scan_paired(scan: LayoutScan, splits: list[_Split], pair_by: str) -> None:
    pair = _pair_by_order if pair_by == "order" else _pair_by_name
    covered: set[Path] = set()
    for split in splits:
        lows, low_refused = _role_files(split.low_dir, split.split, "low", scan)
        highs, high_refused = _role_files(split.high_dir, split.split, "high", scan)
        pairs, leftovers = pair(lows, highs, split, scan.root)
        for key, (low, high) in pairs.items():
            pair_key = f"{split.split}/{key}"
            scan.entries.append(Entry(_rel(low, scan.root), split.split, "low", pair_key))
            scan.entries.append(Entry(_rel(high, scan.root), split.split, "high", pair_key))
        refused = {"low": high_refused, "high": low_refused}
        scan.leftovers.extend(_blame_refused(lo, refused[lo.entry.role]) for lo in leftovers)
        covered.update((split.low_dir, split.high_dir))
        if split.labels_dir is not None:
            _scan_labels(scan, split, pairs, lows)
            covered.add(split.labels_dir)
    if any(split.labels_dir is not None for split in splits):
        scan.classes_file = _find_classes_file(scan)
    for item in _walk(scan.root):
        if item.path.parent not in covered and _rel(item.path, scan.root) != scan.classes_file:
            _refuse_or_ignore(scan, item)


def _scan_labels(
    scan: LayoutScan, split: _Split, pairs: dict[str, tuple[Path, Path]], lows: list[Path]
) -> None:
    """Label maps of ``split``, matched to its paired low images by stem; the rest are leftovers."""
    assert split.labels_dir is not None
    files, _ = _role_files(split.labels_dir, split.split, LABEL_ROLE, scan)  # refusals go to scan.refused
    key_of = _group([low for low, _ in pairs.values()], lambda p: p.stem)
    pair_key = {low: f"{split.split}/{key}" for key, (low, _) in pairs.items()}
    all_lows = {p.stem: p for p in lows}
    for stem, group in _group(files, lambda p: p.stem).items():
        lows_of_stem = key_of.get(stem, [])
        for path in group:
            rel = _rel(path, scan.root)
            if len(group) == 1 and len(lows_of_stem) == 1:
                scan.entries.append(Entry(rel, split.split, LABEL_ROLE, pair_key[lows_of_stem[0]]))
                continue
            detail = _label_leftover_detail(stem, group, lows_of_stem, all_lows.get(stem), split, scan.root)
            scan.leftovers.append(Leftover(Entry(rel, split.split, LABEL_ROLE, rel), detail))


def _label_leftover_detail(
    stem: str, group: list[Path], lows: list[Path], unpaired_low: Path | None, split: _Split, root: Path
) -> str:
    if len(group) > 1:
        names = ", ".join(p.name for p in group)
        return f"ambiguous label map name {stem!r} ({names}); keep one label map per low image"
    if len(lows) > 1:
        names = ", ".join(p.name for p in lows)
        return (
            f"several paired low images are named {stem!r} ({names}); rename them so one owns the label map"
        )
    if unpaired_low is not None:
        return (
            f"its low image {_rel(unpaired_low, root)} is not part of a pair (see its own quarantine entry)"
        )
    return (
        f"orphan label map: no low image named {stem!r} in {_rel(split.low_dir, root)}; "
        "name each label map after its low image"
    )


def _find_classes_file(scan: LayoutScan) -> str:
    """``classes.json`` at the layout root or a folder above it (up to the source root); "" if none."""
    folder = scan.layout_root
    while True:
        found = [i for i in _list(folder) if i.path.name == CLASSES_FILE and i.kind == "file"]
        if found:
            return _rel(found[0].path, scan.root)
        if folder == scan.root or scan.root not in folder.parents:
            return ""
        folder = folder.parent


def _scan_unpaired(scan: LayoutScan) -> None:
    for item in _walk(scan.root):
        inside = item.path.is_relative_to(scan.layout_root)
        if inside and len(item.path.relative_to(scan.layout_root).parts) <= 2:
            refusal = _refusal(item, scan.root, "unpaired", "unpaired")
            if refusal is not None:
                scan.refused.append(refusal)
            else:
                rel = _rel(item.path, scan.root)
                scan.entries.append(Entry(rel, "unpaired", "unpaired", rel))
        else:
            _refuse_or_ignore(scan, item)


def _refuse_or_ignore(scan: LayoutScan, item: _Item) -> None:
    """A file outside the layout's folders: refused when it must not be opened, else ignored."""
    refusal = _refusal(item, scan.root)
    if refusal is not None:
        scan.refused.append(refusal)
    else:
        scan.ignored.append(_rel(item.path, scan.root))


def detect_layout(root: str | os.PathLike[str]) -> str:
    """Name of the layout found under ``root`` (see :func:`scan_layout` for the rules)."""
    return scan_layout(root).layout


def scan_layout(
    root: str | os.PathLike[str],
    layout: str = "auto",
    *,
    label: str | None = None,
    pair_by: str | None = None,
) -> LayoutScan:
    """Find ``layout`` (or detect it, for ``"auto"``) under ``root`` and list its files.

    Single wrapper folders (``LOLdataset/our485/...``) are descended automatically. Raises
    :class:`LayoutError` naming ``root`` and the expected trees when nothing matches, when ``"auto"``
    finds several paired layouts (e.g. both LOL-v2 subsets) or low/high folders it cannot place: then pass
    the layout explicitly. ``label`` names the source when ``root`` is a temporary copy (an extracted
    archive, an ``s3://`` prefix); its last segment also stands for the root's own name
    (``s3://bucket/LOL-v2/Real_captured``).
    ``pair_by="order"`` (or a ``+pair-by-order`` layout) pairs files by sorted order instead of by name.
    """
    root = Path(root)
    name = label or str(root)
    base, order = parse_layout(layout, pair_by)
    if not root.is_dir():
        raise LayoutError(f"{name} is not a folder; pass the folder (or archive) that holds the dataset")

    candidates = LAYOUTS if base == "auto" else (base,)
    root_name = PurePosixPath(label.rstrip("/")).name if label else root.name
    layout_root, found, unplaced = _find_root(root, root_name, candidates, name)
    if len(found) > 1:
        raise LayoutError(
            f"{name} matches several layouts ({', '.join(found)}); pass layout= one of them explicitly"
        )
    if not found:
        wanted = "any supported layout" if base == "auto" else f"the {base!r} layout"
        hint = f"\n{_unplaced_pairs_message(name, unplaced)}" if unplaced else ""
        raise LayoutError(
            f"{name} does not contain {wanted}. Expected one of these trees:\n{_EXPECTED_TREES}{hint}"
        )
    ((detected, splits),) = found.items()
    if detected == "unpaired" and order == "order":
        raise LayoutError(f"{name} holds unpaired images: pairing by order does not apply; drop it")
    scan = LayoutScan(layout=_recorded(detected, order), root=root, layout_root=layout_root)
    if detected == "unpaired":
        _scan_unpaired(scan)
    else:
        _scan_paired(scan, splits, order)
    scan.entries.sort(key=lambda e: e.rel_path)
    scan.leftovers.sort(key=lambda lo: lo.rel_path)
    scan.refused.sort(key=lambda lo: lo.rel_path)
    return scan
