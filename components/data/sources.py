"""Turn an ingestion source (folder, archive, ``s3://`` prefix) into a local folder that can be scanned.

Archives are untrusted input: members are never handed to ``extractall``. The whole member list is
checked first (member count and total uncompressed size against SKF_MAX_ARCHIVE_MEMBERS and
SKF_MAX_ARCHIVE_BYTES, encryption, file/folder name clashes) and nothing is written when it fails. Then
only regular files (and links whose target stays inside the archive, materialised as copies) are written,
below a fresh temporary folder, counting the bytes actually written: a header that understates a member's
size cannot blow past the limits either. Members with absolute paths, ``..`` segments, links that point
outside, device files or FIFOs are refused with reason ``archive-path-traversal``; members over
SKF_MAX_FILE_BYTES with ``too-large``; every copy of a path stored twice with ``duplicate-member``. The
caller reports them as quarantined inputs and the rest of the archive is still extracted.

Temporary folders live under one known parent (``$TMPDIR/skf-ingest-<uid>``) and hold an exclusive
``flock`` while in use. The kernel drops the lock when the process dies, however it dies (SIGKILL
included), so the next ingest removes any unlocked folder it finds there: a killed ingest never leaves
its extraction behind for long.
"""

from __future__ import annotations

import contextlib
import lzma
import os
import posixpath
import shutil
import stat
import tarfile
import tempfile
import time
import zipfile
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from components.errors import SKFError, UserInputError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no stale-folder detection, cleanup in finally only
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "ARCHIVE_SUFFIXES",
    "DUPLICATE_MEMBER",
    "PATH_TRAVERSAL",
    "TOO_LARGE",
    "ArchiveError",
    "ArchiveLimits",
    "MaterializedSource",
    "Refusal",
    "SourceError",
    "ScratchSpaceError",
    "SourceNotFoundError",
    "cleanup_stale_dirs",
    "extract_archive",
    "is_archive",
    "materialize",
    "scratch_dir",
]

PATH_TRAVERSAL = "archive-path-traversal"
TOO_LARGE = "too-large"
DUPLICATE_MEMBER = "duplicate-member"
ARCHIVE_SUFFIXES: tuple[str, ...] = (
    ".zip",
    ".tar.gz",
    ".tgz",
    ".tar",
    ".tar.bz2",
    ".tbz2",
    ".tar.xz",
    ".txz",
)
_CHUNK = 1 << 20
_TEMP_PREFIX = "skf-ingest-"
_LOCK_NAME = ".skf-lock"
_UNLOCKED_GRACE_S = 600  # a folder without its lock file may be one being created right now
# What reading a damaged compressed stream raises, besides the archive modules' own errors.
_STREAM_ERRORS = (EOFError, zlib.error, lzma.LZMAError, OSError, ValueError, NotImplementedError)


class SourceError(SKFError, ValueError):
    """The source does not exist or is not a folder, a supported archive or an ``s3://`` prefix."""


class SourceNotFoundError(SourceError, UserInputError):
    """The named source path does not exist (a bad argument: exit code 2)."""


class ArchiveError(SourceError):
    """An archive that cannot be extracted safely or completely (too big, encrypted, corrupt, clashing names)."""


class ScratchSpaceError(SKFError, OSError):
    """Writing the temporary extraction failed (disk full, permissions): a local problem, not the archive's."""


@dataclass(frozen=True)
class Refusal:
    """An archive member (or object key) that was not materialised, and why."""

    rel_path: str
    reason: str
    detail: str


@dataclass
class MaterializedSource:
    """A local folder holding the source's files, plus what was refused on the way."""

    uri: str  # the source as the user named it (recorded in the catalog)
    root: Path
    kind: str  # folder | archive | s3
    refused: list[Refusal] = field(default_factory=list)


@dataclass(frozen=True)
class ArchiveLimits:
    """Bounds on one archive: total bytes written, member count, and bytes per member."""

    max_bytes: int
    max_members: int
    max_file_bytes: int

    @classmethod
    def from_settings(cls) -> ArchiveLimits:
        from components.settings import get_settings

        limits = get_settings().limits
        return cls(limits.max_archive_bytes, limits.max_archive_members, limits.max_file_bytes)


def is_archive(name: str) -> bool:
    return name.lower().endswith(ARCHIVE_SUFFIXES)


# --------------------------------------------------------------------------------------------- safety
def _safe_relpath(name: str) -> str | None:
    """Normalised relative POSIX path of an archive member, or ``None`` if it could escape the folder."""
    name = name.replace("\\", "/")
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        return None
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        return None
    return "/".join(parts)


def _link_target(member_rel: str, target: str, *, relative_to_member: bool) -> str | None:
    """Member path a link points to (inside the archive), or ``None`` when it points outside."""
    target = target.replace("\\", "/")
    if target.startswith("/") or (len(target) > 1 and target[1] == ":"):
        return None
    base = posixpath.dirname(member_rel) if relative_to_member else ""
    joined = posixpath.normpath(posixpath.join(base, target))
    if joined == ".." or joined.startswith("../") or joined in ("", "."):
        return None
    return joined


# --------------------------------------------------------------------------------------------- planning
@dataclass(frozen=True)
class _Member:
    """An archive member, format-neutral: ``kind`` is file | dir | link | special."""

    name: str
    kind: str
    size: int
    handle: Any  # ZipInfo / TarInfo, passed back to the format's opener
    link: str | None = None  # for links: the member path the link points to (None: outside)


@dataclass
class _Plan:
    writes: list[tuple[str, _Member]] = field(default_factory=list)  # (destination rel path, data member)
    refused: list[Refusal] = field(default_factory=list)
    total: int = 0


def _refuse_unsafe(members: list[_Member], limits: ArchiveLimits, plan: _Plan) -> dict[str, _Member]:
    """Refuse traversal, special and oversized members and every copy of a duplicated path; return the rest."""
    counts = Counter(_safe_relpath(m.name) for m in members if m.kind != "dir")
    kept: dict[str, _Member] = {}
    for m in members:
        rel = _safe_relpath(m.name)
        if rel is None:
            plan.refused.append(Refusal(m.name, PATH_TRAVERSAL, "absolute path or '..' in member name"))
        elif m.kind == "dir":
            continue
        elif m.kind == "special":
            plan.refused.append(Refusal(m.name, PATH_TRAVERSAL, "special file (device, FIFO or socket)"))
        elif counts[rel] > 1:
            detail = f"{counts[rel]} members are stored as {rel}; which one is meant is ambiguous"
            plan.refused.append(Refusal(m.name, DUPLICATE_MEMBER, detail))
        elif m.kind == "file" and m.size > limits.max_file_bytes:
            detail = f"{m.size} bytes exceeds SKF_MAX_FILE_BYTES={limits.max_file_bytes}"
            plan.refused.append(Refusal(m.name, TOO_LARGE, detail))
        else:
            kept[rel] = m
    return kept


def _check_clashes(archive: Path, members: list[_Member]) -> None:
    """A path that is both a file and a folder cannot be extracted faithfully: refuse the archive."""
    files = {rel for m in members if m.kind != "dir" and (rel := _safe_relpath(m.name))}
    folders = {rel for m in members if m.kind == "dir" and (rel := _safe_relpath(m.name))}
    for rel in list(files) + list(folders):
        parts = rel.split("/")
        folders.update("/".join(parts[:i]) for i in range(1, len(parts)))
    clash = sorted(files & folders)
    if clash:
        raise ArchiveError(
            f"{archive}: {clash[0]!r} is both a file and a folder in the archive; "
            "rename one of them and recreate the archive"
        )


def _plan(archive: Path, members: list[_Member], limits: ArchiveLimits) -> _Plan:
    """Decide what to write, and refuse the whole archive if it is over the limits (before any write)."""
    if len(members) > limits.max_members:
        raise ArchiveError(
            f"{archive} has {len(members)} members, more than SKF_MAX_ARCHIVE_MEMBERS={limits.max_members}; "
            "raise SKF_MAX_ARCHIVE_MEMBERS if the archive is trusted"
        )
    _check_clashes(archive, members)
    plan = _Plan()
    kept = _refuse_unsafe(members, limits, plan)
    for rel, m in kept.items():
        if m.kind == "file":
            plan.writes.append((rel, m))
            continue
        target = kept.get(m.link) if m.link is not None else None
        if target is None or target.kind != "file":
            plan.refused.append(Refusal(m.name, PATH_TRAVERSAL, "link pointing outside the archive's files"))
            continue
        plan.writes.append((rel, target))  # a link is materialised as a copy: it costs its target's size
    plan.total = sum(m.size for _, m in plan.writes)
    if plan.total > limits.max_bytes:
        raise ArchiveError(
            f"{archive} would extract to {plan.total} bytes, more than SKF_MAX_ARCHIVE_BYTES="
            f"{limits.max_bytes}; raise SKF_MAX_ARCHIVE_BYTES if the archive is trusted"
        )
    return plan


# --------------------------------------------------------------------------------------------- writing
def _copy_bounded(src: IO[bytes], out: IO[bytes], budget: int, where: Path) -> int:
    """Copy at most ``budget`` bytes; return the count, or ``budget + 1`` as soon as the source has more."""
    written = 0
    while chunk := src.read(min(_CHUNK, budget - written + 1)):
        written += len(chunk)
        if written > budget:
            return written
        try:
            out.write(chunk)
        except OSError as exc:  # not the archive's fault: say so, instead of "corrupt archive"
            raise ScratchSpaceError(
                f"cannot write {where}: {exc.strerror or exc}; free space there or point TMPDIR elsewhere"
            ) from exc
    return written


def _write_member(dest_root: Path, rel: str, src: IO[bytes], budget: int) -> int:
    """Write one member below ``dest_root`` (never over an existing path); return the bytes written."""
    target = dest_root.joinpath(*rel.split("/"))
    # Belt and braces: the normalised path must still resolve below the extraction root.
    if not target.resolve().is_relative_to(dest_root.resolve()):
        raise SourceError(f"refusing to write {rel!r} outside {dest_root}")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        out = os.fdopen(os.open(target, flags, 0o600), "wb")
    except OSError as exc:
        raise ScratchSpaceError(f"cannot extract {rel} to {dest_root}: {exc.strerror or exc}") from exc
    with out:
        return _copy_bounded(src, out, budget, target)


def _write_plan(
    archive: Path, dest: Path, plan: _Plan, opener: Callable[[_Member], IO[bytes]], limits: ArchiveLimits
) -> None:
    """Write the planned members, checking every member's real size against its header and the total."""
    written_total = 0
    for rel, m in plan.writes:
        budget = min(m.size, limits.max_bytes - written_total)
        with opener(m) as src:
            written = _write_member(dest, rel, src, budget)
        if written > budget:
            raise ArchiveError(
                f"{archive}: member {m.name} holds more data than its header says ({m.size} bytes) or the "
                f"archive exceeds SKF_MAX_ARCHIVE_BYTES={limits.max_bytes}; the archive is damaged or hostile"
            )
        if written < m.size:
            raise ArchiveError(
                f"{archive} is truncated: member {m.name} has {written} of {m.size} bytes; "
                "download or create the archive again"
            )
        written_total += written


# --------------------------------------------------------------------------------------------- zip
def _zip_member(info: zipfile.ZipInfo) -> _Member:
    file_type = stat.S_IFMT((info.external_attr >> 16) & 0xFFFF)  # 0 when the creator stored no Unix mode
    if info.is_dir() or file_type == stat.S_IFDIR:
        return _Member(info.filename, "dir", 0, info)
    if file_type == stat.S_IFLNK:
        return _Member(info.filename, "link", info.file_size, info)
    if file_type not in (0, stat.S_IFREG):
        return _Member(info.filename, "special", 0, info)
    return _Member(info.filename, "file", info.file_size, info)


def _zip_link_target(zf: zipfile.ZipFile, m: _Member) -> str | None:
    rel = _safe_relpath(m.name)
    if rel is None or m.size > 4096:  # a link's target is a short path, never a payload
        return None
    return _link_target(rel, zf.read(m.handle).decode("utf-8", "replace"), relative_to_member=True)


def _extract_zip(path: Path, dest: Path, limits: ArchiveLimits) -> list[Refusal]:
    with zipfile.ZipFile(path) as zf:
        infos = zf.infolist()
        encrypted = next((i.filename for i in infos if i.flag_bits & 0x1), None)
        if encrypted is not None:
            raise ArchiveError(
                f"{path}: member {encrypted} is encrypted; extract the archive with its password and "
                "ingest the folder (or re-create the archive without encryption)"
            )
        members = [_zip_member(i) for i in infos]
        if len(members) <= limits.max_members:
            members = [
                _Member(m.name, m.kind, m.size, m.handle, _zip_link_target(zf, m)) if m.kind == "link" else m
                for m in members
            ]
        plan = _plan(path, members, limits)
        _write_plan(path, dest, plan, lambda m: zf.open(m.handle), limits)
    return plan.refused


# --------------------------------------------------------------------------------------------- tar
def _tar_member(m: tarfile.TarInfo) -> _Member:
    if m.isdir():
        return _Member(m.name, "dir", 0, m)
    if m.isreg():
        return _Member(m.name, "file", m.size, m)
    if m.issym() or m.islnk():
        rel = _safe_relpath(m.name)
        # Symlink targets are relative to the link's folder; hardlink targets name another member.
        link = _link_target(rel, m.linkname, relative_to_member=m.issym()) if rel else None
        return _Member(m.name, "link", 0, m, link)
    return _Member(m.name, "special", 0, m)


def _tar_members(path: Path, tf: tarfile.TarFile, limits: ArchiveLimits) -> list[_Member]:
    """Every member, read as a stream; stops as soon as there are more than the member limit allows."""
    members: list[_Member] = []
    for m in tf:
        members.append(_tar_member(m))
        if len(members) > limits.max_members:
            raise ArchiveError(
                f"{path} has more than SKF_MAX_ARCHIVE_MEMBERS={limits.max_members} members; "
                "raise SKF_MAX_ARCHIVE_MEMBERS if the archive is trusted"
            )
    return members


def _tar_opener(tf: tarfile.TarFile) -> Callable[[_Member], IO[bytes]]:
    def opener(m: _Member) -> IO[bytes]:
        src = tf.extractfile(m.handle)
        assert src is not None  # regular members always have a data stream
        return src

    return opener


def _extract_tar(path: Path, dest: Path, limits: ArchiveLimits) -> list[Refusal]:
    with tarfile.open(path, mode="r:*") as tf:
        plan = _plan(path, _tar_members(path, tf, limits), limits)
        _write_plan(path, dest, plan, _tar_opener(tf), limits)
    return plan.refused


def extract_archive(
    path: str | os.PathLike[str], dest: str | os.PathLike[str], *, limits: ArchiveLimits | None = None
) -> list[Refusal]:
    """Safely extract a zip or tar archive into ``dest``; return the members that were refused.

    Raises :class:`ArchiveError` (nothing is extracted when the member list fails the checks) for an
    archive over SKF_MAX_ARCHIVE_BYTES / SKF_MAX_ARCHIVE_MEMBERS, an encrypted zip, a name that is both a
    file and a folder, and a truncated or corrupt archive.
    """
    path, dest = Path(path), Path(dest)
    limits = limits or ArchiveLimits.from_settings()
    dest.mkdir(parents=True, exist_ok=True)
    try:
        if zipfile.is_zipfile(path):
            return _extract_zip(path, dest, limits)
        if tarfile.is_tarfile(path):
            return _extract_tar(path, dest, limits)
    except SKFError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, tarfile.TarError, *_STREAM_ERRORS) as exc:
        raise ArchiveError(
            f"{path} is truncated or corrupt ({type(exc).__name__}: {exc}); download or create it again"
        ) from exc
    raise SourceError(f"{path} is neither a zip nor a tar archive (supported: {', '.join(ARCHIVE_SUFFIXES)})")


# --------------------------------------------------------------------------------------------- temp folders
def _temp_parent(tmp_dir: str | os.PathLike[str] | None) -> Path:
    """The known parent of ingest temp folders; refuses one that another user could control."""
    parent = (
        Path(tmp_dir) if tmp_dir is not None else Path(tempfile.gettempdir()) / f"skf-ingest-{os.getuid()}"
    )
    parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = os.lstat(parent)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
        raise SourceError(
            f"temporary folder {parent} is not a folder owned by this user; remove it and retry"
        )
    return parent


def _is_stale(folder: Path) -> bool:
    """True when no live process holds the folder's lock (or it never got one and is old)."""
    try:
        fd = os.open(folder / _LOCK_NAME, os.O_RDWR | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        with contextlib.suppress(OSError):
            return time.time() - folder.stat().st_mtime > _UNLOCKED_GRACE_S
        return False
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False  # held: its ingest is still running
    finally:
        os.close(fd)
    return True


def cleanup_stale_dirs(tmp_dir: str | os.PathLike[str] | None = None) -> list[Path]:
    """Remove temp folders left by ingests that died (killed, crashed); return what was removed."""
    if fcntl is None:
        return []
    parent = _temp_parent(tmp_dir)
    removed = []
    for child in sorted(parent.iterdir()):
        ours = child.name.startswith(_TEMP_PREFIX) and not child.is_symlink() and child.is_dir()
        if ours and _is_stale(child):
            shutil.rmtree(child, ignore_errors=True)
            removed.append(child)
    return removed


@contextlib.contextmanager
def scratch_dir(tmp_dir: str | os.PathLike[str] | None = None) -> Iterator[Path]:
    """A private temp folder under the known parent, locked while in use and removed on exit.

    Folders of dead ingests are swept first, so even a SIGKILL mid-extraction leaves nothing for long.
    """
    cleanup_stale_dirs(tmp_dir)
    path = Path(tempfile.mkdtemp(prefix=_TEMP_PREFIX, dir=_temp_parent(tmp_dir)))
    lock = -1
    try:
        lock = _take_lock(path)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
        if lock >= 0:
            os.close(lock)


def _take_lock(folder: Path) -> int:
    """Create ``folder``'s lock file already locked, so a concurrent sweep never finds it unlocked.

    The file is locked under a temporary name and then renamed into place (atomic): a sweep sees either no
    lock file (a young folder, left alone for ``_UNLOCKED_GRACE_S``) or a held lock, never a free one.
    """
    pending = folder / f"{_LOCK_NAME}.new"
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(pending, flags, 0o600)
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.rename(pending, folder / _LOCK_NAME)
    except BaseException:
        os.close(fd)
        raise
    return fd


# --------------------------------------------------------------------------------------------- s3
def _download_prefix(
    uri: str, dest: Path, storage_factory: Callable[[str], Any], limits: ArchiveLimits
) -> list[Refusal]:
    """Download every object under ``uri``, held to the archive limits (an S3 prefix is as untrusted).

    More objects than SKF_MAX_ARCHIVE_MEMBERS, or more bytes in all than SKF_MAX_ARCHIVE_BYTES, refuse the
    whole prefix; an object over SKF_MAX_FILE_BYTES is deleted again and refused as ``too-large``.
    """
    store = storage_factory(uri)
    refused: list[Refusal] = []
    seen = downloaded = total = 0
    for key in store.list():
        rel = _safe_relpath(key)
        if rel is None or rel != key:
            refused.append(
                Refusal(key, PATH_TRAVERSAL, "object key is absolute or contains '.'/'..' segments")
            )
            continue
        if key.endswith("/"):  # "folder" marker objects
            continue
        seen += 1
        if seen > limits.max_members:
            raise ArchiveError(
                f"{uri} holds more than SKF_MAX_ARCHIVE_MEMBERS={limits.max_members} objects; "
                "raise SKF_MAX_ARCHIVE_MEMBERS if the source is trusted"
            )
        target = dest.joinpath(*rel.split("/"))
        store.get_file(key, target)
        size = target.stat().st_size
        if size > limits.max_file_bytes:
            target.unlink()
            detail = f"{size} bytes exceeds SKF_MAX_FILE_BYTES={limits.max_file_bytes}"
            refused.append(Refusal(key, TOO_LARGE, detail))
            continue
        total += size
        if total > limits.max_bytes:
            raise ArchiveError(
                f"{uri} holds more than SKF_MAX_ARCHIVE_BYTES={limits.max_bytes} bytes; "
                "raise SKF_MAX_ARCHIVE_BYTES if the source is trusted"
            )
        downloaded += 1
    if downloaded == 0 and not refused:
        raise SourceError(f"{uri} holds no objects; check the bucket and prefix")
    return refused


def _default_storage_factory(uri: str) -> Any:
    from components.storage import open_storage

    return open_storage(uri)


# --------------------------------------------------------------------------------------------- entry point
def _local_uri(source: str | os.PathLike[str]) -> str:
    uri = os.fspath(source)
    if uri.startswith("file://"):
        from urllib.parse import unquote, urlparse

        uri = unquote(urlparse(uri).path)
    return uri


def _check_local(path: Path) -> None:
    if not path.exists():
        raise SourceNotFoundError(
            f"source {path} does not exist (expected a folder, an archive or s3://bucket/prefix)"
        )
    if not is_archive(path.name):
        raise SourceError(
            f"source {path} is a file but not a supported archive ({', '.join(ARCHIVE_SUFFIXES)})"
        )


def _from_s3(uri: str, tmp: Path, root: Path, factory: Callable[[str], Any]) -> MaterializedSource:
    if is_archive(uri.rstrip("/")):
        bucket_prefix, _, name = uri.rstrip("/").rpartition("/")
        archive = tmp / name
        factory(bucket_prefix).get_file(name, archive)
        return MaterializedSource(uri=uri, root=root, kind="archive", refused=extract_archive(archive, root))
    refused = _download_prefix(uri.rstrip("/"), root, factory, ArchiveLimits.from_settings())
    return MaterializedSource(uri=uri.rstrip("/"), root=root, kind="s3", refused=refused)


@contextlib.contextmanager
def materialize(
    source: str | os.PathLike[str],
    *,
    storage_factory: Callable[[str], Any] | None = None,
    tmp_dir: str | os.PathLike[str] | None = None,
) -> Iterator[MaterializedSource]:
    """Yield the source as a local folder; temporary copies are removed when the block exits.

    * a folder is used in place (nothing is copied);
    * a local archive, or an ``s3://`` object whose name ends like an archive, is extracted safely;
    * any other ``s3://bucket/prefix`` is downloaded object by object (hash-verified by the storage layer).

    ``tmp_dir`` is the parent of the temporary folder (default ``$TMPDIR/skf-ingest-<uid>``).
    """
    uri = _local_uri(source)
    if not uri.startswith("s3://"):
        path = Path(uri).expanduser()
        if path.is_dir():
            yield MaterializedSource(uri=str(path.resolve()), root=path.resolve(), kind="folder")
            return
        _check_local(path)

    with scratch_dir(tmp_dir) as tmp:
        root = tmp / "root"
        root.mkdir()
        if uri.startswith("s3://"):
            yield _from_s3(uri, tmp, root, storage_factory or _default_storage_factory)
        else:
            path = Path(uri).expanduser().resolve()
            yield MaterializedSource(
                uri=str(path), root=root, kind="archive", refused=extract_archive(path, root)
            )
