"""Turn an ingestion source (folder, archive, ``s3://`` prefix) into a local folder that can be scanned.

Archives are untrusted input: members are never handed to ``extractall``. Each member is classified
first and only regular files (and links whose target stays inside the archive, materialised as copies)
are written, below a fresh temporary folder. Members with absolute paths, ``..`` segments, links that
point outside, device files or FIFOs are refused with reason ``archive-path-traversal`` and reported
by the caller as quarantined inputs; the rest of the archive is still extracted.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import shutil
import stat
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

__all__ = [
    "ARCHIVE_SUFFIXES",
    "PATH_TRAVERSAL",
    "MaterializedSource",
    "Refusal",
    "SourceError",
    "extract_archive",
    "is_archive",
    "materialize",
]

PATH_TRAVERSAL = "archive-path-traversal"
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


class SourceError(ValueError):
    """The source does not exist or is not a folder, a supported archive or an ``s3://`` prefix."""


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


def _write_member(dest_root: Path, rel: str, src: IO[bytes]) -> None:
    target = dest_root.joinpath(*rel.split("/"))
    # Belt and braces: the normalised path must still resolve below the extraction root.
    if not target.resolve().is_relative_to(dest_root.resolve()):
        raise SourceError(f"refusing to write {rel!r} outside {dest_root}")
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target, "wb") as out:
        shutil.copyfileobj(src, out, _CHUNK)


# --------------------------------------------------------------------------------------------- zip
def _zip_mode(info: zipfile.ZipInfo) -> int:
    return (info.external_attr >> 16) & 0xFFFF


def _extract_zip(path: Path, dest: Path) -> list[Refusal]:
    refused: list[Refusal] = []
    with zipfile.ZipFile(path) as zf:
        infos = zf.infolist()
        regular = {}
        links = []
        for info in infos:
            rel = _safe_relpath(info.filename)
            if rel is None:
                refused.append(Refusal(info.filename, PATH_TRAVERSAL, "absolute path or '..' in member name"))
                continue
            file_type = stat.S_IFMT(_zip_mode(info))  # 0 when the creator stored no Unix mode
            if info.is_dir() or file_type == stat.S_IFDIR:
                continue
            if file_type == stat.S_IFLNK:
                links.append((rel, info))
            elif file_type not in (0, stat.S_IFREG):
                refused.append(
                    Refusal(info.filename, PATH_TRAVERSAL, "special file (device, FIFO or socket)")
                )
            else:
                regular[rel] = info
        for rel, info in regular.items():
            with zf.open(info) as src:
                _write_member(dest, rel, src)
        for rel, info in links:
            target = _link_target(rel, zf.read(info).decode("utf-8", "replace"), relative_to_member=True)
            if target is None or target not in regular:
                refused.append(
                    Refusal(
                        info.filename, PATH_TRAVERSAL, "symbolic link pointing outside the archive's files"
                    )
                )
                continue
            with zf.open(regular[target]) as src:
                _write_member(dest, rel, src)
    return refused


# --------------------------------------------------------------------------------------------- tar
def _extract_tar(path: Path, dest: Path) -> list[Refusal]:
    refused: list[Refusal] = []
    with tarfile.open(path, mode="r:*") as tf:
        members = tf.getmembers()
        regular: dict[str, tarfile.TarInfo] = {}
        links: list[tuple[str, tarfile.TarInfo]] = []
        for m in members:
            rel = _safe_relpath(m.name)
            if rel is None:
                refused.append(Refusal(m.name, PATH_TRAVERSAL, "absolute path or '..' in member name"))
            elif m.isdir():
                continue
            elif m.isreg():
                regular[rel] = m
            elif m.issym() or m.islnk():
                links.append((rel, m))
            else:
                refused.append(Refusal(m.name, PATH_TRAVERSAL, "special file (device, FIFO or socket)"))
        for rel, m in regular.items():
            src = tf.extractfile(m)
            assert src is not None  # regular members always have a data stream
            with src:
                _write_member(dest, rel, src)
        for rel, m in links:
            # Symlink targets are relative to the link's folder; hardlink targets name another member.
            target = _link_target(rel, m.linkname, relative_to_member=m.issym())
            if target is None or target not in regular:
                kind = "symbolic" if m.issym() else "hard"
                refused.append(
                    Refusal(m.name, PATH_TRAVERSAL, f"{kind} link pointing outside the archive's files")
                )
                continue
            src = tf.extractfile(regular[target])
            assert src is not None
            with src:
                _write_member(dest, rel, src)
    return refused


def extract_archive(path: str | os.PathLike[str], dest: str | os.PathLike[str]) -> list[Refusal]:
    """Safely extract a zip or tar archive into ``dest``; return the members that were refused."""
    path, dest = Path(path), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    if zipfile.is_zipfile(path):
        return _extract_zip(path, dest)
    if tarfile.is_tarfile(path):
        return _extract_tar(path, dest)
    raise SourceError(f"{path} is neither a zip nor a tar archive (supported: {', '.join(ARCHIVE_SUFFIXES)})")


# --------------------------------------------------------------------------------------------- s3
def _download_prefix(uri: str, dest: Path, storage_factory: Callable[[str], Any]) -> list[Refusal]:
    store = storage_factory(uri)
    refused: list[Refusal] = []
    count = 0
    for key in store.list():
        rel = _safe_relpath(key)
        if rel is None or rel != key:
            refused.append(
                Refusal(key, PATH_TRAVERSAL, "object key is absolute or contains '.'/'..' segments")
            )
            continue
        if key.endswith("/"):  # "folder" marker objects
            continue
        store.get_file(key, dest.joinpath(*rel.split("/")))
        count += 1
    if count == 0 and not refused:
        raise SourceError(f"{uri} holds no objects; check the bucket and prefix")
    return refused


def _default_storage_factory(uri: str) -> Any:
    from components.storage import open_storage

    return open_storage(uri)


# --------------------------------------------------------------------------------------------- entry point
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
    """
    factory = storage_factory or _default_storage_factory
    uri = os.fspath(source)
    if uri.startswith("file://"):
        from urllib.parse import unquote, urlparse

        uri = unquote(urlparse(uri).path)

    if not uri.startswith("s3://"):
        path = Path(uri).expanduser()
        if path.is_dir():
            yield MaterializedSource(uri=str(path.resolve()), root=path.resolve(), kind="folder")
            return
        if not path.exists():
            raise SourceError(
                f"source {path} does not exist (expected a folder, an archive or s3://bucket/prefix)"
            )
        if not is_archive(path.name):
            raise SourceError(
                f"source {path} is a file but not a supported archive ({', '.join(ARCHIVE_SUFFIXES)})"
            )

    with tempfile.TemporaryDirectory(prefix="skf-ingest-", dir=tmp_dir) as tmp:
        tmp_path = Path(tmp)
        root = tmp_path / "root"
        root.mkdir()
        if uri.startswith("s3://"):
            if is_archive(uri.rstrip("/")):
                bucket_prefix, _, name = uri.rstrip("/").rpartition("/")
                archive = tmp_path / name
                factory(bucket_prefix).get_file(name, archive)
                refused = extract_archive(archive, root)
                yield MaterializedSource(uri=uri, root=root, kind="archive", refused=refused)
            else:
                refused = _download_prefix(uri.rstrip("/"), root, factory)
                yield MaterializedSource(uri=uri.rstrip("/"), root=root, kind="s3", refused=refused)
        else:
            path = Path(uri).expanduser().resolve()
            refused = extract_archive(path, root)
            yield MaterializedSource(uri=str(path), root=root, kind="archive", refused=refused)
