"""Layout detection and pairing on generated trees of each supported layout."""

from __future__ import annotations

from pathlib import Path

import pytest
from data_fixtures import make_lol, make_lol_v2, write_png

from components.data.layouts import LayoutError, detect_layout, scan_layout


def _pairs(scan) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    for e in scan.entries:
        out.setdefault(e.pair_key, {})[e.role] = e.rel_path
    return out


def test_lol_layout_pairs_by_name_and_splits(tmp_path: Path) -> None:
    make_lol(tmp_path, train=3, test=2)
    (tmp_path / "README.txt").write_text("LOL dataset")
    scan = scan_layout(tmp_path)
    assert scan.layout == "lol" and scan.paired
    pairs = _pairs(scan)
    assert sorted(pairs) == ["test/101", "test/102", "train/1", "train/2", "train/3"]
    assert pairs["train/2"] == {"low": "our485/low/2.png", "high": "our485/high/2.png"}
    assert pairs["test/101"] == {"low": "eval15/low/101.png", "high": "eval15/high/101.png"}
    assert {e.split for e in scan.entries} == {"train", "test"}
    assert scan.leftovers == []
    assert scan.ignored == ["README.txt"]


def test_lol_inside_wrapper_folder_keeps_source_relative_paths(tmp_path: Path) -> None:
    make_lol(tmp_path / "LOLdataset", train=1, test=1)
    scan = scan_layout(tmp_path)
    assert scan.layout == "lol"
    assert scan.layout_root == tmp_path / "LOLdataset"
    assert "LOLdataset/our485/low/1.png" in {e.rel_path for e in scan.entries}


def test_lol_v2_real_pairs_by_prefix_and_accepts_lowercase_test_dirs(tmp_path: Path) -> None:
    make_lol_v2(tmp_path, "Real_captured", train=3, test=2)
    scan = scan_layout(tmp_path)
    assert scan.layout == "lol-v2-real"
    pairs = _pairs(scan)
    assert sorted(pairs) == ["test/00691", "test/00692", "train/00001", "train/00002", "train/00003"]
    assert pairs["train/00002"] == {
        "low": "Real_captured/Train/Low/low00002.png",
        "high": "Real_captured/Train/Normal/normal00002.png",
    }
    assert pairs["test/00692"]["high"] == "Real_captured/Test/high/normal00692.png"


def test_lol_v2_synthetic_pairs_by_identical_name(tmp_path: Path) -> None:
    for split_dir in ("Train", "Test"):
        for i in range(2):
            write_png(tmp_path / "Synthetic" / split_dir / "Low" / f"r{i}.png", i)
            write_png(tmp_path / "Synthetic" / split_dir / "Normal" / f"r{i}.png", 10 + i)
    scan = scan_layout(tmp_path)
    assert scan.layout == "lol-v2-synthetic"
    assert sorted(_pairs(scan)) == ["test/r0", "test/r1", "train/r0", "train/r1"]


def test_sorted_order_pairing_is_an_explicit_opt_in_recorded_in_the_layout(tmp_path: Path) -> None:
    # Formerly the default fallback when no name matched; now names only, unless pair_by="order" is asked.
    base = tmp_path / "Real_captured" / "Train"
    for i, (lo, hi) in enumerate([("a.png", "x.png"), ("b.png", "y.png")]):
        write_png(base / "Low" / lo, i)
        write_png(base / "Normal" / hi, 10 + i)
    by_name = scan_layout(tmp_path)
    assert by_name.entries == [] and len(by_name.leftovers) == 4
    for scan in (scan_layout(tmp_path, pair_by="order"), scan_layout(tmp_path, "lol-v2-real+pair-by-order")):
        assert scan.layout == "lol-v2-real+pair-by-order" and scan.paired
        pairs = _pairs(scan)
        assert pairs["train/a"]["high"].endswith("Normal/x.png")
        assert pairs["train/b"]["high"].endswith("Normal/y.png")


def test_unmatched_files_become_leftovers(tmp_path: Path) -> None:
    make_lol_v2(tmp_path, train=2, test=0)
    write_png(tmp_path / "Real_captured" / "Train" / "Low" / "low00009.png", 99)
    scan = scan_layout(tmp_path)
    assert len(scan.entries) == 4
    assert [lo.entry.rel_path for lo in scan.leftovers] == ["Real_captured/Train/Low/low00009.png"]
    assert "no matching file" in scan.leftovers[0].detail


def test_auto_refuses_ambiguous_trees_and_override_picks_one(tmp_path: Path) -> None:
    make_lol_v2(tmp_path, "Real_captured", train=1, test=1)
    make_lol_v2(tmp_path, "Synthetic", train=2, test=1)
    with pytest.raises(LayoutError, match="lol-v2-real, lol-v2-synthetic"):
        scan_layout(tmp_path)
    real = scan_layout(tmp_path, "lol-v2-real")
    synthetic = scan_layout(tmp_path, "lol-v2-synthetic")
    assert len(real.entries) == 4 and len(synthetic.entries) == 6
    assert all(e.rel_path.startswith("Synthetic/") for e in synthetic.entries)
    assert any(p.startswith("Real_captured/") for p in synthetic.ignored)


@pytest.mark.parametrize("nested", [False, True])
def test_unpaired_flat_and_per_set_folders(tmp_path: Path, nested: bool) -> None:
    sets = ("LIME", "MEF") if nested else ("",)
    for s in sets:
        for i in range(2):
            write_png(tmp_path / s / f"img{i}.png", i)
    scan = scan_layout(tmp_path)
    assert scan.layout == "unpaired" and not scan.paired
    assert {(e.split, e.role) for e in scan.entries} == {("unpaired", "unpaired")}
    expected = sorted(f"{s}/img{i}.png".lstrip("/") for s in sets for i in range(2))
    assert sorted(e.pair_key for e in scan.entries) == expected


def test_nothing_matches_names_root_and_expected_trees(tmp_path: Path) -> None:
    write_png(tmp_path / "a" / "b" / "c" / "deep.png", 1)  # too deep for loose images, and two top folders
    write_png(tmp_path / "d" / "e" / "f" / "deep.png", 2)
    with pytest.raises(LayoutError) as err:
        scan_layout(tmp_path)
    message = str(err.value)
    assert str(tmp_path) in message
    for tree in ("our485/{low,high}", "Real_captured/{Train,Test}/{Low,Normal}", "unpaired"):
        assert tree in message


def test_empty_folder_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(LayoutError, match="does not contain any supported layout"):
        scan_layout(tmp_path)


def test_explicit_layout_that_does_not_match_is_an_error(tmp_path: Path) -> None:
    make_lol(tmp_path)
    with pytest.raises(LayoutError, match="lol-v2-real"):
        scan_layout(tmp_path, "lol-v2-real")
    with pytest.raises(LayoutError, match="unknown layout"):
        scan_layout(tmp_path, "lol3")
    assert detect_layout(tmp_path) == "lol"
