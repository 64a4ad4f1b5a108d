"""Issue 15, ingest side: reads never follow links, bounded memory and archives, races, one-line errors.

Scan-time refusal of links/FIFOs, case collisions, non-UTF-8 names and pairing are covered in
``test_layouts_hardening.py``; these tests exercise what happens at *read* time, in archives, under
concurrency and at the CLI.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import struct
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import warnings
import zipfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import sqlalchemy as sa
from conftest import REPO_ROOT
from data_fixtures import make_lol, png_bytes, write_png
from PIL import Image

import components.data.ingest as ingest_mod
from components.catalog import DatasetVersion, close_catalogs, open_catalog
from components.data import sources, validation
from components.data.ingest import IngestError, get_version, ingest, list_versions, parse_ref
from components.data.layouts import scan_layout
from components.data.sources import ArchiveError, cleanup_stale_dirs, materialize, scratch_dir
from components.data.validation import InvalidImage, inspect_bytes, open_source_file, validate_scan
from components.errors import UserInputError
from components.storage import open_storage
from flows.cli import main

MiB = 1 << 20


# --------------------------------------------------------------------------------------------- helpers
@pytest.fixture()
def scratch_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private TMPDIR, so that temp folders left behind by an ingest can be seen (and no other's)."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    return tmp


def _leftovers(tmp: Path) -> list[Path]:
    """Ingest temp folders under ``tmp`` (the per-user parent folder itself does not count)."""
    parent = tmp / f"skf-ingest-{os.getuid()}"
    return sorted(p for p in tmp.rglob("skf-ingest-*") if p != parent)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _stored_shas(root: Path) -> set[str]:
    return {_sha(p.read_bytes()) for p in root.rglob("*") if p.is_file()} if root.exists() else set()


def _versions(catalog: Any) -> int:
    with catalog.session() as s:
        return s.scalar(sa.select(sa.func.count()).select_from(DatasetVersion))


def _reasons(result: Any) -> dict[str, str]:
    return {q.rel_path: q.reason for q in result.quarantined}


def _tree_members(root: Path) -> list[tuple[str, bytes]]:
    return [(p.relative_to(root).as_posix(), p.read_bytes()) for p in sorted(root.rglob("*")) if p.is_file()]


def _zip(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # zipfile warns about the duplicate names we want
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
            for name, data in members:
                zf.writestr(name, data)
    return path


def _tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def _archive(kind: str, path_stem: Path, members: list[tuple[str, bytes]]) -> Path:
    return (
        _zip(path_stem.with_suffix(".zip"), members)
        if kind == "zip"
        else _tar(path_stem.with_suffix(".tar.gz"), members)
    )


def _spy_writes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record every archive member written to disk (its relative path)."""
    written: list[str] = []
    real = sources._write_member

    def spy(dest_root: Path, rel: str, *args: Any) -> Any:
        written.append(rel)
        return real(dest_root, rel, *args)

    monkeypatch.setattr(sources, "_write_member", spy)
    return written


def _within(seconds: float, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` in a daemon thread; fail (instead of hanging the suite) if it blocks, e.g. on a FIFO."""
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["value"] = fn()
        except BaseException as exc:
            out["error"] = exc

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), f"still blocked after {seconds} s (a FIFO or device was opened)"
    if "error" in out:
        raise out["error"]
    return out["value"]


def _python(script: str, *args: str, env: dict[str, str] | None = None, timeout: float = 120) -> Any:
    """Run ``script`` in a fresh interpreter; return the JSON it prints last."""
    proc = subprocess.run(
        [sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO_ROOT,
        env={**os.environ, **(env or {})},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------- item 2
_INGEST_LINKS = """
import json, resource, sys
# The old code read /dev/zero without bound: cap the address space so it fails instead of eating the host.
resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))
from components.catalog import open_catalog
from components.data.ingest import ingest
from components.storage import open_storage
r = ingest(sys.argv[1], name="links", catalog=open_catalog(sys.argv[2]), storage=open_storage(sys.argv[3]))
print(json.dumps({"reasons": {q.rel_path: q.reason for q in r.quarantined}, "counts": r.counts}))
"""


def test_folder_ingest_never_opens_links_devices_or_fifos(tmp_path: Path) -> None:
    """Links to /etc/passwd, an outside image and /dev/zero, and a FIFO: quarantined, unread, promptly."""
    src = make_lol(tmp_path / "src", train=2, test=1)
    secret = write_png(tmp_path / "outside" / "secret.png", 4242)
    low, high = src / "our485" / "low", src / "our485" / "high"
    os.symlink("/etc/passwd", low / "passwd.png")
    os.symlink(secret, low / "out.png")
    os.symlink("/dev/zero", low / "zero.png")
    os.mkfifo(low / "fifo.png")
    for i, name in enumerate(("passwd.png", "out.png", "zero.png", "fifo.png")):
        write_png(high / name, 700 + i)
    os.symlink("/dev/zero", src / "notes.png")  # outside the layout's folders: refused too, never read

    store = tmp_path / "store"
    out = _python(_INGEST_LINKS, str(src), f"sqlite:///{tmp_path / 'c.db'}", str(store), timeout=90)

    reasons = out["reasons"]
    for name in ("passwd.png", "out.png", "zero.png"):
        assert reasons[f"our485/low/{name}"] == "symlink", reasons
        assert reasons[f"our485/high/{name}"] == "unpaired-leftover"
    assert reasons["our485/low/fifo.png"] == "special-file"
    assert reasons["notes.png"] == "symlink"
    assert out["counts"] == {"test": {"high": 1, "low": 1}, "train": {"high": 2, "low": 2}}
    assert _sha(secret.read_bytes()) not in _stored_shas(store)


def test_files_swapped_after_the_scan_are_refused_at_read_time(tmp_path: Path) -> None:
    """Whatever the scan saw, reading refuses a file or folder that became a link or a FIFO since."""
    src = make_lol(tmp_path / "src", train=3, test=1)
    scan = scan_layout(src)
    low, high = src / "our485" / "low", src / "our485" / "high"
    outside = tmp_path / "outside"
    outside.mkdir()
    # A valid image of the right size, so that following the link would have been accepted.
    (low / "1.png").rename(outside / "1.png")
    os.symlink(outside / "1.png", low / "1.png")
    (low / "2.png").unlink()
    os.mkfifo(low / "2.png")
    high.rename(outside / "high")  # the whole role folder becomes a link to a copy outside
    os.symlink(outside / "high", high)

    result = _within(20, lambda: validate_scan(scan))

    reasons = _reasons(result)
    assert reasons["our485/low/1.png"] == "symlink"
    assert reasons["our485/low/2.png"] == "special-file"
    assert {reasons[f"our485/high/{i}.png"] for i in (1, 2, 3)} == {"symlink"}
    assert sorted(v.entry.rel_path for v in result.valid) == ["eval15/high/101.png", "eval15/low/101.png"]


def test_open_source_file_refuses_what_a_race_swaps_in(tmp_path: Path, monkeypatch) -> None:
    """Even if the ``lstat`` check is passed and the path swapped just before ``open``, nothing is followed."""
    root = tmp_path / "src"
    write_png(root / "ok.png", 1)
    secret = write_png(tmp_path / "secret.png", 2)
    os.symlink(secret, root / "link.png")
    os.mkfifo(root / "fifo.png")
    (root / "sub").mkdir()

    with open_source_file(root, "ok.png") as f:
        assert f.read() == (root / "ok.png").read_bytes()
    expected = {"link.png": "symlink", "fifo.png": "special-file", "sub": "special-file"}
    expected |= {"../secret.png": "outside-source", "sub/../../secret.png": "outside-source"}
    for rel, reason in expected.items():
        with pytest.raises(InvalidImage) as info:
            _within(10, lambda rel=rel: open_source_file(root, rel))
        assert info.value.reason == reason, rel

    # The race: lstat "saw" a regular file, then a link or a FIFO took its place before the open.
    monkeypatch.setattr(validation, "_lstat_reason", lambda *a, **kw: None)
    with pytest.raises(InvalidImage) as info:
        _within(10, lambda: open_source_file(root, "link.png"))  # O_NOFOLLOW: ELOOP
    assert info.value.reason == "unreadable"
    with pytest.raises(InvalidImage) as info:
        _within(10, lambda: open_source_file(root, "fifo.png"))  # O_NONBLOCK + fstat: never blocks
    assert info.value.reason == "special-file"


def test_file_swapped_between_validation_and_storage_is_not_stored(tmp_path, catalog, storage, monkeypatch):
    """The store re-opens each file safely and checks its hash: a swapped-in link fails the ingest cleanly."""
    src = make_lol(tmp_path / "src", train=2, test=1)
    secret = write_png(tmp_path / "outside" / "secret.png", 4242)
    real_validate = ingest_mod.validate_scan

    def validate_then_swap(*args: Any, **kwargs: Any) -> Any:
        result = real_validate(*args, **kwargs)
        target = src / "our485" / "low" / "1.png"
        target.unlink()
        os.symlink(secret, target)
        return result

    monkeypatch.setattr(ingest_mod, "validate_scan", validate_then_swap)
    with pytest.raises(IngestError, match="our485/low/1.png changed while being ingested"):
        ingest(str(src), name="swap", catalog=catalog, storage=storage)
    assert _sha(secret.read_bytes()) not in _stored_shas(tmp_path / "store")
    assert _versions(catalog) == 0


# --------------------------------------------------------------------------------------------- item 6
def test_oversized_file_is_quarantined_by_its_size_before_reading(tmp_path, catalog, storage, monkeypatch):
    """A 6 GiB sparse file costs one ``fstat``: it is refused as too-large without hashing a byte."""
    src = make_lol(tmp_path / "src", train=1, test=1)
    huge = src / "our485" / "low" / "huge.png"
    with open(huge, "wb") as f:
        f.truncate(6 << 30)
    write_png(src / "our485" / "high" / "huge.png", 5)
    hashed: list[int] = []
    real_inspect = validation.inspect_stream

    def spy(f: Any, **kwargs: Any) -> Any:
        hashed.append(os.fstat(f.fileno()).st_size)
        return real_inspect(f, **kwargs)

    monkeypatch.setattr(validation, "inspect_stream", spy)
    result = ingest(str(src), name="huge", catalog=catalog, storage=storage)
    q = {q.rel_path: q for q in result.quarantined}
    assert q["our485/low/huge.png"].reason == "too-large"
    assert "SKF_MAX_FILE_BYTES" in q["our485/low/huge.png"].detail
    assert q["our485/high/huge.png"].reason == "unpaired-leftover"
    assert hashed and max(hashed) < MiB  # the big one was never streamed


def test_in_memory_inputs_are_bounded_by_the_byte_limit_too() -> None:
    with pytest.raises(InvalidImage) as info:
        inspect_bytes(png_bytes(1), max_bytes=100)
    assert info.value.reason == "too-large"


_INGEST_RSS = """
import json, resource, sys
from components.catalog import open_catalog
from components.data.ingest import ingest
from components.storage import open_storage
catalog, storage = open_catalog(sys.argv[3]), open_storage(sys.argv[4])
ingest(sys.argv[1], name="warm", catalog=catalog, storage=storage)  # lazy imports, Pillow plugins
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
r = ingest(sys.argv[2], name="big", catalog=catalog, storage=storage)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"growth_kib": after - before, "reasons": {q.rel_path: q.reason for q in r.quarantined},
                  "counts": r.counts}))
"""


@pytest.mark.slow  # ~15 s on 2 cores: reads 2.4 GiB and writes ~0.8 GiB
def test_ingest_streams_large_files_with_bounded_memory(tmp_path: Path) -> None:
    """A 2 GiB file is hashed, and a 384 MiB image stored, in chunks: peak RSS grows by far less."""
    warm = make_lol(tmp_path / "warm", train=1, test=1, seed=3)
    src = make_lol(tmp_path / "src", train=1, test=1)
    low, high = src / "our485" / "low", src / "our485" / "high"
    with open(low / "huge.png", "wb") as f:  # 2 GiB of (sparse) zeros: hashed, then not-an-image
        f.truncate(2 << 30)
    write_png(high / "huge.png", 11)
    big = png_bytes(12)  # a valid PNG padded with zeros to 384 MiB: valid, so it is also stored
    with open(low / "big.png", "wb") as f:
        f.write(big)
        f.truncate(384 * MiB)
    write_png(high / "big.png", 13)

    store = tmp_path / "store"
    args = (str(warm), str(src), f"sqlite:///{tmp_path / 'c.db'}", str(store))
    out = _python(_INGEST_RSS, *args, env={"SKF_MAX_FILE_BYTES": str(3 << 30)}, timeout=300)

    assert out["reasons"]["our485/low/huge.png"] == "not-an-image"
    assert out["counts"]["train"] == {"high": 2, "low": 2}  # 1.png and big.png
    assert (low / "big.png").stat().st_size in {p.stat().st_size for p in store.rglob("*.png")}
    assert out["growth_kib"] * 1024 < 128 * MiB, out


@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_archive_over_the_size_limit_is_refused_before_anything_is_written(
    kind, tmp_path, catalog, storage, scratch_tmp, monkeypatch
) -> None:
    """A few KiB that would inflate to 8 MiB, against SKF_MAX_ARCHIVE_BYTES=4 MiB: nothing is written."""
    members = _tree_members(make_lol(tmp_path / "tree", train=1, test=1)) + [
        ("pad/zeros.bin", bytes(8 * MiB))
    ]
    archive = _archive(kind, tmp_path / "bomb", members)
    assert archive.stat().st_size < 200_000
    monkeypatch.setenv("SKF_MAX_ARCHIVE_BYTES", str(4 * MiB))
    written = _spy_writes(monkeypatch)
    with pytest.raises(ArchiveError, match="SKF_MAX_ARCHIVE_BYTES"):
        ingest(str(archive), name="bomb", catalog=catalog, storage=storage)
    assert written == [] and _leftovers(scratch_tmp) == []
    assert _stored_shas(tmp_path / "store") == set() and _versions(catalog) == 0


@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_archive_with_too_many_members_is_refused_before_anything_is_written(
    kind, tmp_path, catalog, storage, scratch_tmp, monkeypatch
) -> None:
    members = _tree_members(make_lol(tmp_path / "tree", train=2, test=1))  # 6 members
    archive = _archive(kind, tmp_path / "many", members)
    monkeypatch.setenv("SKF_MAX_ARCHIVE_MEMBERS", "5")
    written = _spy_writes(monkeypatch)
    with pytest.raises(ArchiveError, match="SKF_MAX_ARCHIVE_MEMBERS=5"):
        ingest(str(archive), name="many", catalog=catalog, storage=storage)
    assert written == [] and _leftovers(scratch_tmp) == [] and _versions(catalog) == 0

    monkeypatch.setenv("SKF_MAX_ARCHIVE_MEMBERS", "6")  # at the limit is fine
    assert ingest(str(archive), name="many", catalog=catalog, storage=storage).version == 1


def test_archive_member_over_the_file_limit_is_quarantined_unwritten(
    tmp_path, catalog, storage, monkeypatch
) -> None:
    members = _tree_members(make_lol(tmp_path / "tree", train=1, test=1))
    archive = _zip(tmp_path / "a.zip", [*members, ("our485/low/zeros.png", bytes(2 * MiB))])
    monkeypatch.setenv("SKF_MAX_FILE_BYTES", str(MiB))
    written = _spy_writes(monkeypatch)
    result = ingest(str(archive), name="member", catalog=catalog, storage=storage)
    assert _reasons(result)["our485/low/zeros.png"] == "too-large"
    assert "our485/low/zeros.png" not in written and len(written) == len(members)
    assert result.counts["train"] == {"high": 1, "low": 1}


def test_s3_prefix_is_held_to_the_archive_limits(tmp_path: Path, monkeypatch) -> None:
    """An object store prefix is as untrusted as an archive: same count, total and per-file limits."""
    bucket = open_storage(tmp_path / "bucket")
    for name, data in _tree_members(make_lol(tmp_path / "tree", train=1, test=1)):
        bucket.put_bytes(f"lol/{name}", data)
    bucket.put_bytes("lol/our485/low/zeros.png", bytes(2 * MiB))
    prefix = open_storage(tmp_path / "bucket" / "lol")

    def from_bucket(uri: str) -> Any:
        return prefix

    monkeypatch.setenv("SKF_MAX_FILE_BYTES", str(MiB))
    with materialize("s3://bucket/lol", storage_factory=from_bucket, tmp_dir=tmp_path / "t") as src:
        assert [(r.rel_path, r.reason) for r in src.refused] == [("our485/low/zeros.png", "too-large")]
        assert not (src.root / "our485" / "low" / "zeros.png").exists()
        assert len([p for p in src.root.rglob("*") if p.is_file()]) == 4

    monkeypatch.setenv("SKF_MAX_ARCHIVE_MEMBERS", "4")
    with (
        pytest.raises(ArchiveError, match="SKF_MAX_ARCHIVE_MEMBERS=4"),
        materialize("s3://bucket/lol", storage_factory=from_bucket, tmp_dir=tmp_path / "t"),
    ):
        pass
    monkeypatch.delenv("SKF_MAX_ARCHIVE_MEMBERS")
    monkeypatch.setenv("SKF_MAX_FILE_BYTES", str(4 * MiB))
    monkeypatch.setenv("SKF_MAX_ARCHIVE_BYTES", str(MiB))
    with (
        pytest.raises(ArchiveError, match="SKF_MAX_ARCHIVE_BYTES"),
        materialize("s3://bucket/lol", storage_factory=from_bucket, tmp_dir=tmp_path / "t"),
    ):
        pass
    assert list((tmp_path / "t").iterdir()) == []


_KILLED_INGEST = """
import sys, time
from pathlib import Path
from components.catalog import open_catalog
from components.data import sources
from components.data.ingest import ingest
from components.storage import open_storage
archive, marker, url, store = sys.argv[1:5]
real = sources._write_member

def stall(dest_root, *args):
    n = real(dest_root, *args)
    Path(marker).write_text(str(dest_root))  # one member is on disk: now get killed
    time.sleep(600)
    return n

sources._write_member = stall
ingest(archive, name="killed", catalog=open_catalog(url), storage=open_storage(store))
"""


def test_killed_archive_ingest_leaves_no_temp_folder_after_the_next_ingest(
    tmp_path, catalog, storage, scratch_tmp
) -> None:
    """SIGKILL mid-extraction skips every ``finally``; the next ingest sweeps the dead folder, not live ones."""
    archive = _zip(tmp_path / "lol.zip", _tree_members(make_lol(tmp_path / "tree", train=2, test=1)))
    marker = tmp_path / "extracting"
    child = subprocess.Popen(
        [sys.executable, "-c", _KILLED_INGEST, str(archive), str(marker), "sqlite://", str(tmp_path / "s2")],
        cwd=REPO_ROOT,
        env={**os.environ, "TMPDIR": str(scratch_tmp)},
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 90
        while not marker.exists() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert marker.exists(), child.stderr.read().decode() if child.poll() is not None else "no progress"
        child.send_signal(signal.SIGKILL)
        child.wait(30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        child.stderr.close()
    extraction = Path(marker.read_text())
    assert extraction.exists()  # the kill left it: nothing in the dead process could clean up
    (dead,) = _leftovers(scratch_tmp)

    with scratch_dir() as live:  # a folder in use by a running ingest must survive the sweep
        result = ingest(
            str(make_lol(tmp_path / "next", train=1, test=1)), name="next", catalog=catalog, storage=storage
        )
        assert result.version == 1
        assert live.exists() and not dead.exists()
        assert cleanup_stale_dirs() == [] and live.exists()
    assert _leftovers(scratch_tmp) == []


def test_a_temp_folder_being_created_is_never_swept(tmp_path: Path, monkeypatch) -> None:
    """A concurrent sweep that runs just before the new folder is locked must not take it for a dead one."""
    import fcntl

    real_flock = fcntl.flock
    swept: list[Path] = []

    def sweep_then_lock(fd: int, op: int) -> None:
        if op == fcntl.LOCK_EX:  # the creator is about to lock its folder: another ingest sweeps now
            swept.extend(cleanup_stale_dirs(tmp_path))
        real_flock(fd, op)

    monkeypatch.setattr(sources.fcntl, "flock", sweep_then_lock)
    with scratch_dir(tmp_path) as path:
        assert path.exists() and swept == []
        assert cleanup_stale_dirs(tmp_path) == [] and path.exists()
    assert not path.exists()


def test_unlocked_temp_folders_are_swept_only_once_old(tmp_path: Path) -> None:
    """A folder killed before its lock existed has no lock to test: it goes once it is clearly abandoned."""
    young, old = tmp_path / "skf-ingest-young", tmp_path / "skf-ingest-old"
    for folder in (young, old):
        (folder / "root").mkdir(parents=True)
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    assert cleanup_stale_dirs(tmp_path) == [old]
    assert young.exists() and not old.exists()


# --------------------------------------------------------------------------------------------- item 8
@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'race.db'}"
    else:
        yield request.getfixturevalue("postgres_url")
    close_catalogs()


@pytest.mark.parametrize("existing", [False, True], ids=["new-dataset", "existing-dataset"])
def test_concurrent_ingests_of_different_content_become_consecutive_versions(
    db_url: str, existing: bool, tmp_path: Path, monkeypatch
) -> None:
    """Two ingests reach the commit together, and read the latest version slowly: both succeed, in turn."""
    store = tmp_path / "store"
    first = 0
    if existing:
        seed_tree = make_lol(tmp_path / "v1", train=1, test=1, seed=1)
        first = ingest(
            str(seed_tree), name="race", catalog=open_catalog(db_url), storage=open_storage(store)
        ).version
    trees = [make_lol(tmp_path / f"t{i}", train=2, test=1, seed=10 + i) for i in range(2)]

    together = threading.Barrier(2, timeout=60)
    real_commit, real_latest = ingest_mod._commit_version, ingest_mod._latest_version

    def commit_together(*args: Any, **kwargs: Any) -> Any:
        together.wait()
        return real_commit(*args, **kwargs)

    def slow_latest(*args: Any, **kwargs: Any) -> Any:
        latest = real_latest(*args, **kwargs)
        time.sleep(0.3)  # widen the read-then-insert window a race would need
        return latest

    monkeypatch.setattr(ingest_mod, "_commit_version", commit_together)
    monkeypatch.setattr(ingest_mod, "_latest_version", slow_latest)

    def run(tree: Path) -> Any:
        return ingest(str(tree), name="race", catalog=open_catalog(db_url), storage=open_storage(store))

    with ThreadPoolExecutor(2) as pool:
        results = [f.result(timeout=180) for f in [pool.submit(run, t) for t in trees]]

    assert all(r.created for r in results)
    assert sorted(r.version for r in results) == [first + 1, first + 2]
    versions = list_versions("race", catalog=open_catalog(db_url))
    assert [v.version for v in versions] == list(range(1, first + 3))
    by_number = {v.version: v for v in versions}
    for r in results:
        assert by_number[r.version].manifest_sha256 == r.manifest_sha256
        assert (store / "reports" / "race" / f"v{r.version}-quarantine.json").is_file()
    with open_catalog(db_url).session() as s:  # each version's parent is the one before it: a chain
        rows = s.execute(
            sa.select(DatasetVersion.id, DatasetVersion.parent_id).order_by(DatasetVersion.version)
        )
        ids, parents = zip(*rows.all(), strict=True)
    assert list(parents) == [None, *ids[:-1]]


# --------------------------------------------------------------------------------------------- item 10
def _cli_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """Run the CLI; require exactly one ``error:`` line, no traceback and no "Aborted."; return it."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err and "Aborted" not in err and "unexpected" not in err, err
    assert info.value.code not in (0, None)
    return int(info.value.code), lines[0]


def _mark_encrypted(data: bytes) -> bytes:
    """Set the "encrypted" flag bit on every member, in the local headers and the central directory."""
    buf = bytearray(data)
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        for info in zf.infolist():
            buf[info.header_offset + 6] |= 0x01
    eocd = bytes(buf).rfind(b"PK\x05\x06")
    count, _, offset = struct.unpack_from("<HII", buf, eocd + 10)
    for _ in range(count):
        assert buf[offset : offset + 4] == b"PK\x01\x02"
        buf[offset + 8] |= 0x01
        name_len, extra_len, comment_len = struct.unpack_from("<HHH", buf, offset + 28)
        offset += 46 + name_len + extra_len + comment_len
    return bytes(buf)


def _encrypted_zip(tmp_path: Path) -> Path:
    plain = _zip(tmp_path / "plain.zip", _tree_members(make_lol(tmp_path / "tree", train=1, test=1)))
    path = tmp_path / "secret.zip"
    path.write_bytes(_mark_encrypted(plain.read_bytes()))
    return path


def _clashing_tar(tmp_path: Path) -> Path:
    members = _tree_members(make_lol(tmp_path / "tree", train=1, test=1))
    return _tar(tmp_path / "clash.tar.gz", [*members, ("our485/low", png_bytes(9))])


def _truncated_tgz(tmp_path: Path) -> Path:
    full = _tar(tmp_path / "full.tar.gz", _tree_members(make_lol(tmp_path / "tree", train=3, test=1)))
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size * 6 // 10])
    return cut


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (_encrypted_zip, "is encrypted"),
        (_clashing_tar, "'our485/low' is both a file and a folder"),
        (_truncated_tgz, "truncated or corrupt"),
    ],
    ids=["encrypted-zip", "tar-name-clash", "truncated-tar-gz"],
)
def test_broken_archives_are_one_line_cli_errors(
    make: Callable[[Path], Path], needle: str, skf_home: Path, tmp_path: Path, scratch_tmp: Path, capsys
) -> None:
    archive = make(tmp_path)
    _, line = _cli_error(["ingest", str(archive), "--name", "broken"], capsys)
    assert needle in line and str(archive) in line
    assert _leftovers(scratch_tmp) == []
    assert _stored_shas(skf_home / "store") == set() and _versions(open_catalog()) == 0


@pytest.mark.parametrize(
    ("ref", "needle"),
    [
        ("lol@x", "the version after '@' must be a whole number"),
        ("lol@0", "the version after '@' must be a whole number"),
        ("lol@99", "dataset 'lol' has no version 99; it has versions 1"),
        ("nope@1", "no dataset named 'nope'"),
        ("@1", "it has no dataset name"),
        ("a/b@1", "invalid dataset name 'a/b'"),
    ],
)
def test_bad_dataset_refs_are_one_line_cli_errors(ref: str, needle: str, skf_home, tmp_path, capsys) -> None:
    ingest(str(make_lol(tmp_path / "src", train=1, test=1)), name="lol")
    code, line = _cli_error(["train", ref], capsys)
    assert code == 2 and needle in line, line


def test_bad_dataset_name_on_ingest_is_a_one_line_cli_error(skf_home, tmp_path, capsys) -> None:
    src = make_lol(tmp_path / "src", train=1, test=1)
    code, line = _cli_error(["ingest", str(src), "--name", "lol@2"], capsys)
    assert code == 2 and "invalid dataset name 'lol@2'" in line


def test_demo_data_refusals_are_one_line_cli_errors(tmp_path, capsys) -> None:
    code, line = _cli_error(["demo-data", str(tmp_path / "demo"), "--height", "100"], capsys)
    assert code == 2 and "multiples of 32" in line


@pytest.mark.parametrize("ref", ["lol@x", "lol@0", "lol@-1", "lol@\uff11", "@3", " "])
def test_parse_ref_refuses_malformed_references(ref: str) -> None:
    with pytest.raises(UserInputError):
        parse_ref(ref)


def test_parse_ref_accepts_name_number_and_latest() -> None:
    assert parse_ref("lol@2") == ("lol", 2)
    assert parse_ref("lol@latest") == parse_ref("lol") == ("lol", None)


# --------------------------------------------------------------------------------------------- item 14
def _photo(seed: int, size: tuple[int, int] = (32, 24)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8))


def test_non_rgb_and_rotated_inputs_record_their_conversion(tmp_path, catalog, storage) -> None:
    src = make_lol(tmp_path / "src", train=1, test=1)
    low, high = src / "our485" / "low", src / "our485" / "high"
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    _photo(1).convert("L").save(low / "grey.png")
    _photo(2).convert("RGBA").save(low / "alpha.png")
    _photo(3).convert("CMYK").save(low / "cmyk.jpg", "JPEG")
    _photo(4).save(low / "rotated.jpg", "JPEG", exif=exif)
    for i, name in enumerate(("grey.png", "alpha.png", "cmyk.jpg", "rotated.jpg")):
        _photo(10 + i).save(high / name)

    result = ingest(str(src), name="conv", catalog=catalog, storage=storage)

    conv = result.conversions
    assert set(conv) == {f"our485/low/{n}" for n in ("grey.png", "alpha.png", "cmyk.jpg", "rotated.jpg")}
    assert conv["our485/low/grey.png"].startswith("L->RGB")
    assert (
        conv["our485/low/alpha.png"].startswith("RGBA->RGB")
        and "alpha discarded" in conv["our485/low/alpha.png"]
    )
    assert conv["our485/low/cmyk.jpg"].startswith("CMYK->RGB")
    assert "EXIF orientation 6" in conv["our485/low/rotated.jpg"]
    assert result.counts["train"] == {"high": 5, "low": 5}

    version = get_version("conv@1", catalog=catalog)  # recorded in the version, read back from the catalog
    assert {i.rel_path: i.conversion for i in version.images if i.conversion} == conv
    assert "conversions" not in version.changes
    report = json.loads(storage.get_bytes("reports/conv/v1-quarantine.json"))
    assert report["conversions"] == conv
    assert "CMYK->RGB" in storage.get_bytes("reports/conv/v1-quarantine.md").decode()


@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_duplicate_archive_members_are_quarantined_not_overwritten(kind, tmp_path, catalog, storage) -> None:
    members = _tree_members(make_lol(tmp_path / "tree", train=2, test=1))
    first = dict(members)["our485/low/1.png"]
    second = png_bytes(777)
    archive = _archive(kind, tmp_path / "dup", [*members, ("our485/low/1.png", second)])

    result = ingest(str(archive), name="dup", catalog=catalog, storage=storage)

    dup = [q for q in result.quarantined if q.rel_path == "our485/low/1.png"]
    assert [q.reason for q in dup] == ["duplicate-member", "duplicate-member"]
    assert "2 members" in dup[0].detail
    assert _reasons(result)["our485/high/1.png"] == "unpaired-leftover"
    shas = {i.sha256 for i in get_version("dup@1", catalog=catalog).images}
    assert _sha(first) not in shas and _sha(second) not in shas
    assert result.counts["train"] == {"high": 1, "low": 1}
