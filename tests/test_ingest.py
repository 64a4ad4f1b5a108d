"""Ingestion: quarantine reasons, idempotency, versioning, crash safety, archives, S3, the flow and the CLI."""

from __future__ import annotations

import io
import json
import os
import tarfile
import zipfile
from pathlib import Path

import boto3
import pytest
import sqlalchemy as sa
from data_fixtures import bomb_png, make_lol, png_bytes, write_png

from components.catalog import DatasetVersion, Image, QuarantinedInput
from components.data.ingest import IngestError, get_version, ingest, list_versions
from components.data.layouts import LayoutError
from components.data.validation import InvalidImage, inspect_bytes
from components.storage import open_storage


def _count(catalog, model) -> int:
    with catalog.session() as s:
        return s.scalar(sa.select(sa.func.count()).select_from(model))


def _reasons(result) -> dict[str, str]:
    return {q.rel_path: q.reason for q in result.quarantined}


# --------------------------------------------------------------------------------------------- bad inputs
def _bad_lol_tree(root: Path) -> dict[str, str]:
    """A LOL tree with 3 good pairs plus one case of every per-file and per-pair problem."""
    make_lol(root, train=2, test=1)
    low, high = root / "our485" / "low", root / "our485" / "high"
    (low / "txt.png").write_text("this is not an image")
    write_png(high / "txt.png", 900)
    (low / "empty.png").write_bytes(b"")
    write_png(high / "empty.png", 901)
    full = png_bytes(902)
    (low / "cut.png").write_bytes(full[: len(full) // 2])
    write_png(high / "cut.png", 903)
    os.symlink(root / "does-not-exist.png", low / "gone.png")
    write_png(high / "gone.png", 904)
    write_png(low / "big.png", 905, (64, 64))  # over max_pixels=2000 below
    write_png(high / "big.png", 906, (64, 64))
    write_png(low / "wide.png", 907, (32, 32))
    write_png(high / "wide.png", 908, (32, 48))
    write_png(low / "alone.png", 909)
    (low / "dup.png").write_bytes((low / "1.png").read_bytes())  # same content as our485/low/1.png
    write_png(high / "dup.png", 910)
    return {
        "our485/low/txt.png": "not-an-image",
        "our485/high/txt.png": "unpaired-leftover",
        "our485/low/empty.png": "empty-file",
        "our485/high/empty.png": "unpaired-leftover",
        "our485/low/cut.png": "truncated",
        "our485/high/cut.png": "unpaired-leftover",
        "our485/low/gone.png": "symlink",  # links are refused, never followed (was: unreadable)
        "our485/high/gone.png": "unpaired-leftover",
        "our485/low/big.png": "decompression-bomb",
        "our485/high/big.png": "decompression-bomb",
        "our485/low/wide.png": "size-mismatch",
        "our485/high/wide.png": "size-mismatch",
        "our485/low/alone.png": "unpaired-leftover",
        "our485/low/dup.png": "duplicate-content",
        "our485/high/dup.png": "unpaired-leftover",
    }


def test_every_bad_input_is_quarantined_and_valid_files_are_ingested(tmp_path, catalog, storage) -> None:
    root = tmp_path / "src"
    expected = _bad_lol_tree(root)
    result = ingest(str(root), name="bad", catalog=catalog, storage=storage, max_pixels=2000)

    assert result.created and result.ref == "bad@1"
    assert _reasons(result) == expected
    assert result.counts == {"test": {"high": 1, "low": 1}, "train": {"high": 2, "low": 2}}
    partner = next(q for q in result.quarantined if q.rel_path == "our485/high/cut.png")
    assert "our485/low/cut.png" in partner.detail and "truncated" in partner.detail

    # Nothing dropped silently: every file of the tree is either an image of the version or quarantined.
    version = get_version("bad@1", catalog=catalog)
    all_files = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_symlink() or p.is_file()}
    assert {r.rel_path for r in version.images} | set(expected) == all_files

    with catalog.session() as s:
        rows = {q.rel_path: q.reason for q in s.scalars(sa.select(QuarantinedInput))}
    assert rows == expected
    report = json.loads(storage.get_bytes("reports/bad/v1-quarantine.json"))
    assert report["reasons"]["unpaired-leftover"] == 6
    assert storage.exists("reports/bad/v1-quarantine.md")
    for rec in version.images:  # content-addressed and hash-verified on read
        assert storage.get_bytes(f"images/{rec.sha256[:2]}/{rec.sha256}.png", sha256=rec.sha256)


def test_pillow_bomb_header_is_refused_before_decoding() -> None:
    with pytest.raises(InvalidImage) as err:
        inspect_bytes(bomb_png())
    assert err.value.reason == "decompression-bomb"


def test_nothing_valid_is_an_error_naming_the_reasons(tmp_path, catalog, storage) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.png").write_text("nope")
    with pytest.raises(IngestError, match="not-an-image=1"):
        ingest(str(tmp_path / "src"), name="empty", catalog=catalog, storage=storage)
    assert _count(catalog, DatasetVersion) == 0


def test_unknown_layout_is_a_clear_error(tmp_path, catalog, storage) -> None:
    (tmp_path / "src" / "x" / "y" / "z").mkdir(parents=True)
    (tmp_path / "src" / "w" / "y" / "z").mkdir(parents=True)
    write_png(tmp_path / "src" / "x" / "y" / "z" / "a.png", 1)
    write_png(tmp_path / "src" / "w" / "y" / "z" / "a.png", 2)
    with pytest.raises(LayoutError, match="our485"):
        ingest(str(tmp_path / "src"), name="x", catalog=catalog, storage=storage)


def test_unpaired_folders_are_ingested_with_duplicates_quarantined(tmp_path, catalog, storage) -> None:
    root = tmp_path / "src"
    for s, seed in (("LIME", 10), ("MEF", 20)):
        for i in range(2):
            write_png(root / s / f"{i}.png", seed + i)
    (root / "MEF" / "copy.png").write_bytes((root / "LIME" / "0.png").read_bytes())
    result = ingest(str(root), name="unpaired", catalog=catalog, storage=storage)
    assert result.layout == "unpaired"
    assert result.counts == {"unpaired": {"unpaired": 4}}
    assert _reasons(result) == {"MEF/copy.png": "duplicate-content"}


# --------------------------------------------------------------------------------------------- versions
def test_reingest_is_idempotent(tmp_path, catalog, storage) -> None:
    root = make_lol(tmp_path / "src")
    first = ingest(str(root), name="lol", catalog=catalog, storage=storage)
    rows = (_count(catalog, Image), _count(catalog, DatasetVersion), _count(catalog, QuarantinedInput))
    again = ingest(str(root), name="lol", catalog=catalog, storage=storage)
    assert not again.created
    assert (again.version, again.version_id, again.manifest_sha256) == (
        1,
        first.version_id,
        first.manifest_sha256,
    )
    assert (
        _count(catalog, Image),
        _count(catalog, DatasetVersion),
        _count(catalog, QuarantinedInput),
    ) == rows


def test_changed_content_makes_a_new_version_with_changes(tmp_path, catalog, storage) -> None:
    root = make_lol(tmp_path / "src", train=3, test=1)
    v1 = ingest(str(root), name="lol", catalog=catalog, storage=storage)
    assert v1.changes == {
        "added": ["test/101", "train/1", "train/2", "train/3"],
        "removed": [],
        "changed": [],
    }

    write_png(root / "our485" / "high" / "2.png", 777)  # changed
    for role in ("low", "high"):
        (root / "our485" / role / "3.png").unlink()  # removed
        write_png(root / "our485" / role / "4.png", 780 if role == "low" else 781)  # added
    v2 = ingest(str(root), name="lol", catalog=catalog, storage=storage)

    assert v2.created and v2.version == 2
    assert v2.changes == {"added": ["train/4"], "removed": ["train/3"], "changed": ["train/2"]}
    assert [v.version for v in list_versions("lol", catalog=catalog)] == [1, 2]
    old = get_version("lol@1", catalog=catalog)
    assert {r.pair_key for r in old.images} == {"test/101", "train/1", "train/2", "train/3"}
    assert get_version("lol", catalog=catalog).version == 2
    with catalog.session() as s:
        parent = s.scalar(sa.select(DatasetVersion.parent_id).where(DatasetVersion.version == 2))
    assert parent == v1.version_id


@pytest.mark.parametrize("fail_on", ["images/", "reports/"])
def test_failure_halfway_leaves_no_half_version(tmp_path, catalog, storage, monkeypatch, fail_on) -> None:
    root = make_lol(tmp_path / "src", train=3, test=1)
    ingest(
        str(make_lol(tmp_path / "old", train=1, test=1, seed=7)), name="lol", catalog=catalog, storage=storage
    )
    before = (_count(catalog, DatasetVersion), _count(catalog, Image))
    calls = {"n": 0}

    def flaky(real):  # images are streamed with put_file, reports written with put_bytes
        def put(key, data, **kw):
            calls["n"] += 1
            if key.startswith(fail_on) and calls["n"] > 2:
                raise OSError("disk full")
            return real(key, data, **kw)

        return put

    real_puts = {m: getattr(storage, m) for m in ("put_bytes", "put_file")}
    for method, real in real_puts.items():
        monkeypatch.setattr(storage, method, flaky(real))
    with pytest.raises(OSError, match="disk full"):
        ingest(str(root), name="lol", catalog=catalog, storage=storage)
    assert (_count(catalog, DatasetVersion), _count(catalog, Image)) == before
    assert get_version("lol", catalog=catalog).version == 1

    for method, real in real_puts.items():
        monkeypatch.setattr(storage, method, real)
    assert ingest(str(root), name="lol", catalog=catalog, storage=storage).version == 2


def test_ingest_uses_settings_defaults(skf_home: Path, tmp_path: Path) -> None:
    result = ingest(str(make_lol(tmp_path / "src", train=1, test=1)), name="defaults")
    assert result.report_uri == str(skf_home / "store" / "reports" / "defaults" / "v1-quarantine.json")
    assert (skf_home / "catalog.db").exists()


# --------------------------------------------------------------------------------------------- archives
def _tree_members(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root.parent).as_posix(): p.read_bytes() for p in sorted(root.rglob("*.png"))}


def test_zip_path_traversal_is_refused_and_the_rest_ingested(tmp_path, catalog, storage) -> None:
    good = _tree_members(make_lol(tmp_path / "tree" / "LOL", train=2, test=1))
    archive = tmp_path / "lol.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for name, data in good.items():
            zf.writestr(name, data)
        zf.writestr("../evil.png", png_bytes(1))
        zf.writestr("/abs/evil.png", png_bytes(2))
        link = zipfile.ZipInfo("LOL/our485/low/link.png")
        link.external_attr = (0o120777 << 16) | 0
        zf.writestr(link, "../../../../../etc/passwd")
    result = ingest(str(archive), name="zipped", catalog=catalog, storage=storage)
    reasons = _reasons(result)
    assert reasons["../evil.png"] == reasons["/abs/evil.png"] == "archive-path-traversal"
    assert reasons["LOL/our485/low/link.png"] == "archive-path-traversal"
    assert result.counts == {"test": {"high": 1, "low": 1}, "train": {"high": 2, "low": 2}}
    assert not (tmp_path / "evil.png").exists()


def test_tar_path_traversal_links_and_devices_are_refused(tmp_path, catalog, storage) -> None:
    good = _tree_members(make_lol(tmp_path / "tree" / "LOL", train=2, test=1))
    archive = tmp_path / "lol.tar.gz"

    def add(tf, name, data=b"", **attrs):
        info = tarfile.TarInfo(name)
        info.size = len(data)
        for k, v in attrs.items():
            setattr(info, k, v)
        tf.addfile(info, io.BytesIO(data) if data else None)

    with tarfile.open(archive, "w:gz") as tf:
        for name, data in good.items():
            add(tf, name, data)
        add(tf, "../../escape.png", png_bytes(1))
        add(tf, "LOL/our485/low/sym.png", type=tarfile.SYMTYPE, linkname="/etc/passwd")
        add(tf, "LOL/our485/low/hard.png", type=tarfile.LNKTYPE, linkname="../outside.png")
        add(tf, "LOL/our485/low/dev.png", type=tarfile.CHRTYPE, devmajor=1, devminor=3)
        # A link that stays inside is materialised as a copy (here it duplicates our485/high/1.png).
        add(tf, "LOL/eval15/high/copy.png", type=tarfile.SYMTYPE, linkname="../../our485/high/1.png")
    result = ingest(str(archive), name="tarred", catalog=catalog, storage=storage)
    reasons = _reasons(result)
    for name in (
        "../../escape.png",
        "LOL/our485/low/sym.png",
        "LOL/our485/low/hard.png",
        "LOL/our485/low/dev.png",
    ):
        assert reasons[name] == "archive-path-traversal", name
    assert reasons["LOL/eval15/high/copy.png"] == "unpaired-leftover"
    assert result.counts["train"] == {"high": 2, "low": 2}
    assert not (tmp_path.parent / "escape.png").exists()


# --------------------------------------------------------------------------------------------- S3
@pytest.mark.s3
def test_ingest_from_s3_prefix_into_s3_storage(tmp_path, catalog, s3_env) -> None:
    root = make_lol(tmp_path / "tree", train=2, test=1)
    client = boto3.client("s3")
    for path in sorted(root.rglob("*.png")):
        client.upload_file(str(path), s3_env, f"raw/lol/{path.relative_to(root).as_posix()}")
    store = open_storage(f"s3://{s3_env}/store")
    result = ingest(f"s3://{s3_env}/raw/lol", name="s3lol", catalog=catalog, storage=store)
    assert result.created and result.source_uri == f"s3://{s3_env}/raw/lol"
    assert result.counts == {"test": {"high": 1, "low": 1}, "train": {"high": 2, "low": 2}}
    version = get_version("s3lol", catalog=catalog)
    assert all(r.uri.startswith(f"s3://{s3_env}/store/images/") for r in version.images)
    again = ingest(f"s3://{s3_env}/raw/lol/", name="s3lol", catalog=catalog, storage=store)
    assert not again.created

    archive = tmp_path / "lol.zip"  # an archive object on S3 is downloaded, then extracted safely
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(root.rglob("*.png")):
            zf.write(path, path.relative_to(root).as_posix())
    client.upload_file(str(archive), s3_env, "raw/lol.zip")
    zipped = ingest(f"s3://{s3_env}/raw/lol.zip", name="s3lol", catalog=catalog, storage=store)
    assert not zipped.created and zipped.manifest_sha256 == result.manifest_sha256


# --------------------------------------------------------------------------------------------- flow and CLI
def test_ingest_flow_returns_summary_and_artifact(prefect_harness, skf_home: Path, tmp_path: Path) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from flows.ingest import ingest_dataset

    (tmp_path / "src").mkdir()
    root = make_lol(tmp_path / "src", train=2, test=1)
    (root / "our485" / "low" / "bad.png").write_text("not an image")
    summary = ingest_dataset(str(root), "flow-demo")
    assert json.loads(json.dumps(summary)) == summary
    assert summary["ref"] == "flow-demo@1" and summary["created"]
    assert summary["quarantine_reasons"] == {"not-an-image": 1}
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["ingest-flow-demo"]))
        )
    assert artifacts and "not-an-image" in artifacts[0].data


def test_cli_ingest_and_demo_data(skf_home: Path, tmp_path: Path, capsys) -> None:
    from typer.testing import CliRunner

    from flows.cli import app, main

    runner = CliRunner()
    root = make_lol(tmp_path / "src", train=2, test=1)
    (root / "eval15" / "low" / "bad.png").write_bytes(b"")
    ok = runner.invoke(app, ["ingest", str(root), "--name", "cli"])
    assert ok.exit_code == 0, ok.output
    assert "cli@1" in ok.output and "empty-file" in ok.output

    # Errors propagate to the CLI boundary (flows.cli.main), which prints one line.
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["ingest", str(tmp_path / "missing"), "--name", "cli"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error: ") and "does not exist" in err
    assert len(err.strip().splitlines()) == 1

    demo = runner.invoke(app, ["demo-data", str(tmp_path / "demo"), "--pairs", "1"])
    assert demo.exit_code == 0, demo.output
    assert "4 train and 1 test pairs" in demo.output
