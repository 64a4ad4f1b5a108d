"""Layout scanning against real dataset nesting and hostile trees: name-only pairing, LOL-v2 roots,
case-colliding and non-UTF-8 names, links and special files (never opened, never followed)."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import sqlalchemy as sa
from data_fixtures import write_png

from components.catalog import QuarantinedInput
from components.data.ingest import get_version, ingest
from components.data.layouts import LayoutError, parse_layout, scan_layout

pytestmark = pytest.mark.timeout(30)  # a FIFO opened by mistake would block forever


def _pairs(scan) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    for e in scan.entries:
        out.setdefault(e.pair_key, {})[e.role] = e.rel_path
    return out


def _refused(scan) -> dict[str, str]:
    return {lo.rel_path: lo.reason for lo in scan.refused}


def _lol_v2(root: Path, real: int = 2, synthetic: int = 2) -> Path:
    """The public LOL-v2 nesting: Real_captured low*/normal* names, Synthetic identical names."""
    seed = 0
    for split in ("Train", "Test"):
        for i in range(real):
            k = i + 1 if split == "Train" else 690 + i
            write_png(root / "Real_captured" / split / "Low" / f"low{k:05d}.png", seed := seed + 1)
            write_png(root / "Real_captured" / split / "Normal" / f"normal{k:05d}.png", seed := seed + 1)
        for i in range(synthetic):
            name = f"r{split[:2].lower()}{i:02d}da54ft.png"
            write_png(root / "Synthetic" / split / "Low" / name, seed := seed + 1)
            write_png(root / "Synthetic" / split / "Normal" / name, seed := seed + 1)
    return root


def _lol_v1(root: Path, names: tuple[str, ...] = ("1.png", "22.png")) -> Path:
    """LOL v1 as downloaded: LOLdataset/our485|eval15/low|high with identical names."""
    for i, name in enumerate(names):
        for j, subset in enumerate(("our485", "eval15")):
            write_png(root / "LOLdataset" / subset / "low" / name, 100 * j + 2 * i)
            write_png(root / "LOLdataset" / subset / "high" / name, 100 * j + 2 * i + 1)
    return root


def _bytes_path(folder: Path, name: bytes) -> bytes:
    return os.fsencode(folder) + b"/" + name


def _write_bytes_name(folder: Path, name: bytes, seed: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    from data_fixtures import png_bytes

    try:
        fd = os.open(_bytes_path(folder, name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except OSError as exc:  # a filesystem that insists on UTF-8 names
        pytest.skip(f"cannot create a non-UTF-8 file name here: {exc}")
    with os.fdopen(fd, "wb") as f:
        f.write(png_bytes(seed))


# ------------------------------------------------------------------------------------------------- 1. pairing
def test_names_that_match_nowhere_are_orphans_not_pairs_by_order(tmp_path: Path) -> None:
    # The old scan paired these by sorted order (a<->b_gt, b<->c_gt, c<->d_gt): every pair wrong.
    for i, (low, high) in enumerate([("a.png", "b_gt.png"), ("b.png", "c_gt.png"), ("c.png", "d_gt.png")]):
        write_png(tmp_path / "our485" / "low" / low, 2 * i)
        write_png(tmp_path / "our485" / "high" / high, 2 * i + 1)
    scan = scan_layout(tmp_path)
    assert scan.layout == "lol" and scan.entries == []
    assert len(scan.leftovers) == 6
    detail = {lo.rel_path: lo.detail for lo in scan.leftovers}
    assert (
        detail["our485/low/a.png"]
        == "orphan: no matching file in our485/high (its partner would be named 'a')"
    )
    assert {lo.reason for lo in scan.leftovers} == {"unpaired-leftover"}


def test_lol_v2_pairs_by_role_prefix_and_reports_each_orphan_with_its_partner(tmp_path: Path) -> None:
    base = tmp_path / "LOL-v2" / "Real_captured" / "Train"
    for k in (1, 2, 4):
        write_png(base / "Low" / f"low{k:05d}.png", k)
    for k in (1, 2, 3):
        write_png(base / "Normal" / f"normal{k:05d}.png", 10 + k)
    scan = scan_layout(tmp_path / "LOL-v2")
    assert sorted(_pairs(scan)) == ["train/00001", "train/00002"]
    assert _pairs(scan)["train/00002"] == {
        "low": "Real_captured/Train/Low/low00002.png",
        "high": "Real_captured/Train/Normal/normal00002.png",
    }
    detail = {lo.rel_path: lo.detail for lo in scan.leftovers}
    assert "Real_captured/Train/Normal" in detail["Real_captured/Train/Low/low00004.png"]
    assert "'normal00004'" in detail["Real_captured/Train/Low/low00004.png"]
    assert "'low00003'" in detail["Real_captured/Train/Normal/normal00003.png"]


def test_pair_by_order_is_opt_in_checked_and_recorded_in_the_version(tmp_path, catalog, storage) -> None:
    for i, (low, high) in enumerate([("a.png", "x.png"), ("b.png", "y.png")]):
        write_png(tmp_path / "src" / "our485" / "low" / low, 2 * i)
        write_png(tmp_path / "src" / "our485" / "high" / high, 2 * i + 1)
    result = ingest(
        str(tmp_path / "src"), name="ordered", layout="lol+pair-by-order", catalog=catalog, storage=storage
    )
    assert result.layout == "lol+pair-by-order" and not result.quarantined
    version = get_version("ordered@1", catalog=catalog)
    assert version.layout == "lol+pair-by-order"
    assert {(r.pair_key, r.rel_path) for r in version.images if r.role == "high"} == {
        ("train/a", "our485/high/x.png"),
        ("train/b", "our485/high/y.png"),
    }
    write_png(tmp_path / "src" / "our485" / "high" / "z.png", 9)
    with pytest.raises(LayoutError, match=r"as many files in our485/low as in our485/high \(2 vs 3\)"):
        scan_layout(tmp_path / "src", pair_by="order")


@pytest.mark.parametrize(
    ("layout", "pair_by", "message"),
    [
        ("unpaired+pair-by-order", None, "paired layouts only"),
        ("lol+pair-by-size", None, "unknown layout option"),
        ("lol+pair-by-order", "name", "drop one of them"),
        ("lol", "sorted", "unknown pair_by"),
    ],
)
def test_bad_pairing_options_are_layout_errors(layout: str, pair_by: str | None, message: str) -> None:
    with pytest.raises(LayoutError, match=message):
        parse_layout(layout, pair_by)


def test_a_name_shared_by_several_files_pairs_with_none_of_them(tmp_path: Path) -> None:
    for name, seed in (("a.png", 1), ("a.jpg", 2), ("b.png", 3)):
        write_png(tmp_path / "eval15" / "low" / name, seed)
    for name, seed in (("a.png", 11), ("b.png", 13)):
        write_png(tmp_path / "eval15" / "high" / name, seed)
    scan = scan_layout(tmp_path)
    assert sorted(_pairs(scan)) == ["test/b"]
    detail = {lo.rel_path: lo.detail for lo in scan.leftovers}
    assert set(detail) == {"eval15/low/a.png", "eval15/low/a.jpg", "eval15/high/a.png"}
    assert all(d.startswith("ambiguous pair name 'a'") for d in detail.values())


# -------------------------------------------------------------------------------------------- 2. LOL-v2 roots
def test_lol_v2_root_needs_the_subset_named_and_both_subsets_scan(tmp_path: Path) -> None:
    root = _lol_v2(tmp_path / "LOL-v2")
    with pytest.raises(LayoutError, match="lol-v2-real, lol-v2-synthetic"):
        scan_layout(root)
    real, synthetic = scan_layout(root, "lol-v2-real"), scan_layout(root, "lol-v2-synthetic")
    assert sorted(_pairs(real)) == ["test/00690", "test/00691", "train/00001", "train/00002"]
    assert _pairs(synthetic)["train/rtr00da54ft"] == {
        "low": "Synthetic/Train/Low/rtr00da54ft.png",
        "high": "Synthetic/Train/Normal/rtr00da54ft.png",
    }
    assert not real.leftovers and not synthetic.leftovers
    assert all(p.startswith("Synthetic/") for p in real.ignored)


@pytest.mark.parametrize(
    ("subset", "layout"), [("Real_captured", "lol-v2-real"), ("Synthetic", "lol-v2-synthetic")]
)
def test_pointing_at_the_subset_folder_itself_is_detected(tmp_path: Path, subset: str, layout: str) -> None:
    root = _lol_v2(tmp_path / "LOL-v2")
    scan = scan_layout(root / subset)  # previously: LayoutError (Real_captured) or wrong layout
    assert scan.layout == layout and len(scan.entries) == 8 and not scan.leftovers and not scan.ignored
    assert all(e.rel_path.startswith(("Train/", "Test/")) for e in scan.entries)


def test_an_explicit_subset_never_reads_the_other_subset(tmp_path: Path) -> None:
    root = _lol_v2(tmp_path / "LOL-v2", real=0)  # only Synthetic/ is there
    for source in (root, root / "Synthetic"):
        with pytest.raises(LayoutError, match="does not contain the 'lol-v2-real' layout"):
            scan_layout(source, "lol-v2-real")


def test_a_bare_train_test_tree_needs_the_layout_named(tmp_path: Path) -> None:
    root = _lol_v2(tmp_path / "LOL-v2", synthetic=0)
    bare = tmp_path / "bare"
    (root / "Real_captured").rename(bare)
    with pytest.raises(LayoutError) as err:
        scan_layout(bare)
    message = str(err.value)
    assert "Train/Low + Train/Normal" in message and "--layout lol-v2-real" in message
    assert scan_layout(bare, "lol-v2-real").layout == "lol-v2-real"
    assert len(scan_layout(bare, "lol-v2-synthetic").entries) == 8
    # An s3:// prefix ending in the subset's name names it, as a local folder's own name does.
    assert scan_layout(bare, label="s3://bucket/raw/LOL-v2/Real_captured/").layout == "lol-v2-real"


def test_a_single_train_folder_is_never_downgraded_to_unpaired(tmp_path: Path) -> None:
    # The old scan descended into Train/ and returned 4 "unpaired" images with no error.
    for k in (1, 2):
        write_png(tmp_path / "Train" / "Low" / f"low{k:05d}.png", k)
        write_png(tmp_path / "Train" / "Normal" / f"normal{k:05d}.png", 10 + k)
    with pytest.raises(LayoutError, match="not read as unpaired images.*--layout lol-v2-real"):
        scan_layout(tmp_path)
    assert scan_layout(tmp_path, "unpaired").layout == "unpaired"  # only when asked for explicitly
    pairs = scan_layout(tmp_path, "lol-v2-real")
    assert sorted(_pairs(pairs)) == ["train/00001", "train/00002"]


def test_bare_low_high_folders_are_refused_under_auto(tmp_path: Path) -> None:
    for name in ("1.png", "2.png"):
        write_png(tmp_path / "pairs" / "low" / name, 1)
        write_png(tmp_path / "pairs" / "high" / name, 2)
    with pytest.raises(LayoutError, match=r"pairs/low \+ pairs/high.*our485/"):
        scan_layout(tmp_path)


def test_lol_v1_as_downloaded_and_a_split_folder_on_its_own(tmp_path: Path) -> None:
    root = _lol_v1(tmp_path)
    scan = scan_layout(root)
    assert scan.layout == "lol" and scan.layout_root == root / "LOLdataset"
    assert sorted(_pairs(scan)) == ["test/1", "test/22", "train/1", "train/22"]
    train = scan_layout(root / "LOLdataset" / "our485")
    assert train.layout == "lol" and sorted(_pairs(train)) == ["train/1", "train/22"]


def test_ingest_from_real_captured_records_the_layout(tmp_path, catalog, storage) -> None:
    root = _lol_v2(tmp_path / "LOL-v2", synthetic=0)
    result = ingest(str(root / "Real_captured"), name="lol-v2-real", catalog=catalog, storage=storage)
    assert result.created and result.layout == "lol-v2-real" and not result.quarantined
    assert result.counts == {"test": {"high": 2, "low": 2}, "train": {"high": 2, "low": 2}}


# ---------------------------------------------------------------------------------------------------- 3. case
def test_case_colliding_names_are_all_kept(tmp_path, catalog, storage) -> None:
    src = tmp_path / "src"
    for i, name in enumerate(("Case.png", "case.png", "other.png")):
        write_png(src / "our485" / "low" / name, 2 * i)
        write_png(src / "our485" / "high" / name, 2 * i + 1)
    write_png(src / "eval15" / "low" / "Solo.png", 50)  # no partner spelled the same way
    write_png(src / "eval15" / "low" / "solo.png", 51)
    write_png(src / "eval15" / "high" / "solo.png", 52)
    scan = scan_layout(src)
    assert sorted(_pairs(scan)) == ["test/solo", "train/Case", "train/case", "train/other"]
    assert [lo.rel_path for lo in scan.leftovers] == ["eval15/low/Solo.png"]

    result = ingest(str(src), name="cases", catalog=catalog, storage=storage)
    assert result.counts == {"test": {"high": 1, "low": 1}, "train": {"high": 3, "low": 3}}
    assert {q.rel_path: q.reason for q in result.quarantined} == {"eval15/low/Solo.png": "unpaired-leftover"}


def test_role_folders_colliding_in_case_are_an_error(tmp_path: Path) -> None:
    write_png(tmp_path / "our485" / "low" / "1.png", 1)
    write_png(tmp_path / "our485" / "Low" / "2.png", 2)
    write_png(tmp_path / "our485" / "high" / "1.png", 3)
    with pytest.raises(LayoutError, match=r"several folders for one role \(Low, low\)"):
        scan_layout(tmp_path)


# ----------------------------------------------------------------------------------------------- 4. non-UTF-8
def test_non_utf8_names_are_quarantined_with_escaped_names(tmp_path, catalog, storage) -> None:
    src = tmp_path / "src"
    _lol_v1(src)
    lol = src / "LOLdataset"
    _write_bytes_name(lol / "our485" / "low", b"\xff.png", 70)
    _write_bytes_name(lol / "our485" / "high", b"\xff.png", 71)
    _write_bytes_name(lol / "our485" / "high", b"caf\xe9.png", 72)
    _write_bytes_name(lol / "docs", b"n\xf6tes.png", 73)  # outside the layout: refused as well, not read

    scan = scan_layout(src)
    assert _refused(scan) == {
        "LOLdataset/our485/low/\\xff.png": "non-utf8-name",
        "LOLdataset/our485/high/\\xff.png": "non-utf8-name",
        "LOLdataset/our485/high/caf\\xe9.png": "non-utf8-name",
        "LOLdataset/docs/n\\xf6tes.png": "non-utf8-name",
    }
    for entry in [*scan.entries, *(lo.entry for lo in scan.leftovers + scan.refused)]:
        entry.rel_path.encode("utf-8")  # storable text everywhere

    # The catalog insert of the raw name used to raise UnicodeEncodeError and abort the whole ingest.
    result = ingest(str(src), name="bytes", catalog=catalog, storage=storage)
    assert result.created and result.counts["train"] == {"high": 2, "low": 2}
    with catalog.session() as s:
        rows = {q.rel_path: q.reason for q in s.scalars(sa.select(QuarantinedInput))}
    assert rows["LOLdataset/our485/low/\\xff.png"] == "non-utf8-name"
    report = json.loads(storage.get_bytes("reports/bytes/v1-quarantine.json"))
    assert report["reasons"]["non-utf8-name"] == 4
    assert "caf\\xe9.png" in storage.get_bytes("reports/bytes/v1-quarantine.md").decode()


# ------------------------------------------------------------------------------------------- 5. special files
def _hostile_tree(src: Path, outside: Path) -> dict[str, str]:
    """A LOL tree whose role folders hold links and special files; returns the quarantine reasons."""
    _lol_v1(src)
    lol = src / "LOLdataset"
    low, high = lol / "our485" / "low", lol / "our485" / "high"
    write_png(outside / "secret.png", 99)
    write_png(outside / "dir" / "inner.png", 98)
    os.symlink(outside / "secret.png", low / "out.png")
    os.symlink("/etc/passwd", low / "passwd.png")
    os.symlink(low / "1.png", low / "inside.png")  # even a link inside the source is not followed
    os.symlink(outside / "dir", low / "linkdir")
    os.mkfifo(low / "fifo.png")
    for name in ("out.png", "passwd.png", "inside.png", "fifo.png"):
        write_png(high / name, 200 + len(name))
    os.symlink(outside / "dir", lol / "eval15" / "linked-set")  # a folder link outside the role folders
    reasons = {
        "LOLdataset/our485/low/out.png": "symlink",
        "LOLdataset/our485/low/passwd.png": "symlink",
        "LOLdataset/our485/low/inside.png": "symlink",
        "LOLdataset/our485/low/linkdir": "symlink",
        "LOLdataset/our485/low/fifo.png": "special-file",
        "LOLdataset/eval15/linked-set": "symlink",
    }
    if len(os.fsencode(low / "sock.png")) < 100:  # AF_UNIX paths are short
        with socket.socket(socket.AF_UNIX) as sock:
            sock.bind(str(low / "sock.png"))
        reasons["LOLdataset/our485/low/sock.png"] = "special-file"
    return reasons


def test_links_and_special_files_are_refused_without_being_followed(tmp_path: Path) -> None:
    refused = _hostile_tree(tmp_path / "src", tmp_path / "outside")
    scan = scan_layout(tmp_path / "src")
    assert _refused(scan) == refused
    assert sorted(_pairs(scan)) == ["test/1", "test/22", "train/1", "train/22"]
    detail = {lo.rel_path: lo.detail for lo in scan.refused}
    assert detail["LOLdataset/our485/low/passwd.png"].startswith("symlink -> /etc/passwd")
    assert detail["LOLdataset/our485/low/fifo.png"].startswith("FIFO, not a regular file")
    partner = {lo.rel_path: lo.detail for lo in scan.leftovers}["LOLdataset/our485/high/fifo.png"]
    assert partner == "its partner LOLdataset/our485/low/fifo.png was quarantined (special-file)"
    assert not any(
        "inner.png" in p or "secret" in p for p in [*scan.ignored, *(e.rel_path for e in scan.entries)]
    )


def test_unpaired_folders_refuse_links_and_fifos_too(tmp_path: Path) -> None:
    write_png(tmp_path / "LIME" / "a.png", 1)
    os.symlink("/etc/passwd", tmp_path / "LIME" / "b.png")
    os.mkfifo(tmp_path / "LIME" / "c.png")
    scan = scan_layout(tmp_path)
    assert scan.layout == "unpaired" and [e.rel_path for e in scan.entries] == ["LIME/a.png"]
    assert _refused(scan) == {"LIME/b.png": "symlink", "LIME/c.png": "special-file"}


def test_ingest_quarantines_refused_files_with_their_reasons(tmp_path, catalog, storage) -> None:
    refused = _hostile_tree(tmp_path / "src", tmp_path / "outside")
    result = ingest(str(tmp_path / "src"), name="hostile", catalog=catalog, storage=storage)
    reasons = {q.rel_path: q.reason for q in result.quarantined}
    expected = dict(refused)
    for name in ("out.png", "passwd.png", "inside.png", "fifo.png"):
        expected[f"LOLdataset/our485/high/{name}"] = "unpaired-leftover"
    assert reasons == expected
    assert result.counts == {"test": {"high": 2, "low": 2}, "train": {"high": 2, "low": 2}}
    report = json.loads(storage.get_bytes("reports/hostile/v1-quarantine.json"))
    assert report["reasons"]["symlink"] == 5 and report["reasons"]["special-file"] == len(refused) - 5
    with catalog.session() as s:
        assert {q.rel_path for q in s.scalars(sa.select(QuarantinedInput))} == set(expected)


def test_cli_layout_option_carries_pair_by_order(skf_home: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from flows.cli import app

    for i, (low, high) in enumerate([("a.png", "x.png"), ("b.png", "y.png")]):
        write_png(tmp_path / "src" / "our485" / "low" / low, 2 * i)
        write_png(tmp_path / "src" / "our485" / "high" / high, 2 * i + 1)
    args = ["ingest", str(tmp_path / "src"), "--name", "cli-order"]
    by_name = CliRunner().invoke(app, args)
    assert by_name.exit_code != 0  # by name nothing pairs: four orphans, no valid image
    assert "unpaired-leftover=4" in " ".join(f"{by_name.output} {by_name.exception}".split())
    ordered = CliRunner().invoke(app, [*args, "--layout", "lol+pair-by-order"])
    assert ordered.exit_code == 0, ordered.output
    assert get_version("cli-order@1").layout == "lol+pair-by-order"
