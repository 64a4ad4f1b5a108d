"""Ingest of label maps: stored as role ``label``, paired by name, hashed, and bad ones quarantined alone."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
from data_fixtures import make_lol
from PIL import Image

from components.catalog import QuarantinedInput
from components.data.ingest import build_manifest, get_version, ingest
from components.data.scenes import SCENE_CLASSES, generate_scene_dataset
from components.storage import read_uri

SIZE = (64, 96)
# build_manifest of a fixed item list, recorded before label maps existed: the manifest formula is unchanged.
RECORDED_MANIFEST = "dcb957b99c9cf5ad8c16ea4f337e2b500e1bd0584369361fd35f0ac14e7dfd56"


@pytest.fixture(scope="module")
def scene_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_scene_dataset(
        tmp_path_factory.mktemp("src") / "scenes", seed=1, size=SIZE, train=3, test=1
    )


def _copy(src: Path, dest: Path) -> Path:
    return Path(shutil.copytree(src, dest))


def _expected_manifest(root: Path) -> str:
    """The manifest sha256 of a label-free LOL tree, computed from the files (the formula ingest documents)."""
    lines = []
    for subset, split in (("our485", "train"), ("eval15", "test")):
        for role in ("low", "high"):
            for path in sorted((root / subset / role).glob("*.png")):
                sha = hashlib.sha256(path.read_bytes()).hexdigest()
                item = {"split": split, "role": role, "pair_key": f"{split}/{path.stem}", "sha256": sha}
                lines.append(json.dumps(item, sort_keys=True, separators=(",", ":")))
    return hashlib.sha256(("\n".join(sorted(lines)) + "\n").encode()).hexdigest()


def _save(path: Path, array: np.ndarray) -> None:
    Image.fromarray(array).save(path, format="PNG")


def _reasons(result) -> dict[str, str]:
    return {q.rel_path: q.reason for q in result.quarantined}


def _details(result) -> dict[str, str]:
    return {q.rel_path: q.detail for q in result.quarantined}


# --------------------------------------------------------------------------------------------- unchanged
def test_manifest_formula_is_the_recorded_one() -> None:
    items = [("train", "low", "train/1", "a" * 64), ("train", "high", "train/1", "b" * 64)]
    assert build_manifest(items)[1] == RECORDED_MANIFEST


def test_unlabelled_dataset_hashes_exactly_as_before(tmp_path: Path, catalog, storage) -> None:
    src = make_lol(tmp_path / "lol", train=3, test=2)
    (src / "classes.json").write_text('["sky"]')  # a stray classes.json without labels/ changes nothing
    result = ingest(str(src), name="lol", catalog=catalog, storage=storage)
    assert result.manifest_sha256 == _expected_manifest(src)
    assert result.ignored == ["classes.json"] and result.label_classes == []
    version = get_version("lol", catalog=catalog)
    assert not version.has_labels and version.label_classes == ()
    assert all(version.label_of(low) is None for low, _ in version.pairs("train"))


# --------------------------------------------------------------------------------------------- labelled
def test_scene_folder_ingests_label_maps_through_the_catalog(scene_source: Path, catalog, storage) -> None:
    result = ingest(str(scene_source), name="scenes", catalog=catalog, storage=storage)
    assert result.created and not result.quarantined and not result.ignored
    assert result.counts == {
        "test": {"high": 1, "label": 1, "low": 1},
        "train": {"high": 3, "label": 3, "low": 3},
    }
    assert result.label_classes == list(SCENE_CLASSES)

    version = get_version("scenes", catalog=catalog)
    assert version.has_labels and version.label_classes == SCENE_CLASSES
    assert len(version.pairs("train")) == 3  # label maps never disturb the pairs
    for low, high, label in version.labelled_pairs("train"):
        assert label is not None and version.label_of(low) == label == version.label_of(high)
        assert label.role == "label" and label.pair_key == low.pair_key
        assert label.rel_path == f"our485/labels/{Path(low.rel_path).name}"
        assert (label.width, label.height) == (low.width, low.height) and label.conversion == ""
        # The stored object is the label file itself, byte for byte.
        assert read_uri(label.uri, sha256=label.sha256) == (scene_source / label.rel_path).read_bytes()

    again = ingest(str(scene_source), name="scenes", catalog=catalog, storage=storage)
    assert not again.created and again.version == 1 and again.label_classes == list(SCENE_CLASSES)


def test_label_maps_and_class_names_are_covered_by_the_version_hash(
    scene_source: Path, tmp_path: Path, catalog, storage
) -> None:
    labelled = ingest(str(scene_source), name="s", catalog=catalog, storage=storage)
    bare = _copy(scene_source, tmp_path / "bare")
    for subset in ("our485", "eval15"):
        shutil.rmtree(bare / subset / "labels")
    (bare / "classes.json").unlink()
    assert ingest(str(bare), name="bare", catalog=catalog, storage=storage).manifest_sha256 == (
        _expected_manifest(bare)
    )
    assert labelled.manifest_sha256 != _expected_manifest(bare)

    edited = _copy(scene_source, tmp_path / "edited")
    label = edited / "our485" / "labels" / "scene-0001.png"
    ids = np.asarray(Image.open(label)).copy()
    ids[0, 0] = (int(ids[0, 0]) + 1) % len(SCENE_CLASSES)
    _save(label, ids)
    changed = ingest(str(edited), name="s", catalog=catalog, storage=storage)
    assert changed.created and changed.version == 2 and changed.changes["changed"] == ["train/scene-0001"]

    renamed = _copy(scene_source, tmp_path / "renamed")
    (renamed / "classes.json").write_text(json.dumps(["sky", "trees", "skin", "brick", "road"]))
    other = ingest(str(renamed), name="s", catalog=catalog, storage=storage)
    assert other.created and other.manifest_sha256 != labelled.manifest_sha256
    assert get_version("s@3", catalog=catalog).label_classes[1] == "trees"


# --------------------------------------------------------------------------------------------- refusals
def test_bad_label_maps_are_quarantined_alone_with_a_reason(
    scene_source: Path, tmp_path: Path, catalog, storage
) -> None:
    src = _copy(scene_source, tmp_path / "bad")
    labels = src / "our485" / "labels"
    unknown = np.asarray(Image.open(labels / "scene-0000.png")).copy()
    unknown[:4, :4] = 7
    _save(labels / "scene-0000.png", unknown)
    _save(labels / "scene-0001.png", np.zeros((32, 96), np.uint8))  # half the height of its image
    _save(labels / "scene-0002.png", np.zeros((*SIZE, 3), np.uint8))  # RGB, not class ids
    _save(labels / "orphan.png", np.zeros(SIZE, np.uint8))

    result = ingest(str(src), name="bad", catalog=catalog, storage=storage)
    reasons, details = _reasons(result), _details(result)
    assert reasons == {
        "our485/labels/scene-0000.png": "unknown-class",
        "our485/labels/scene-0001.png": "size-mismatch",
        "our485/labels/scene-0002.png": "bad-label",
        "our485/labels/orphan.png": "unpaired-leftover",
    }
    assert details["our485/labels/scene-0000.png"] == (
        "label map our485/labels/scene-0000.png has class ids 7 but classes.json names 5 classes (ids 0-4); "
        "fix the map or add the class names to classes.json"
    )
    assert details["our485/labels/scene-0001.png"] == (
        "label map our485/labels/scene-0001.png is 96x32 but its low image our485/low/scene-0001.png is "
        "96x64; make the label map the size of its image"
    )
    assert "mode RGB" in details["our485/labels/scene-0002.png"]
    assert "single-channel 8-bit PNG" in details["our485/labels/scene-0002.png"]
    assert "orphan label map: no low image named 'orphan'" in details["our485/labels/orphan.png"]

    # Nothing else is lost: every pair is ingested, only the test pair keeps its label map.
    assert result.counts == {
        "test": {"high": 1, "label": 1, "low": 1},
        "train": {"high": 3, "low": 3},
    }
    version = get_version("bad", catalog=catalog)
    assert [label for _, _, label in version.labelled_pairs("train")] == [None, None, None]
    with catalog.session() as s:
        stored = dict(s.execute(sa.select(QuarantinedInput.rel_path, QuarantinedInput.reason)).all())
    assert stored == reasons
    report = json.loads(Path(result.report_uri).read_text())
    assert report["reasons"] == {
        "bad-label": 1,
        "size-mismatch": 1,
        "unknown-class": 1,
        "unpaired-leftover": 1,
    }


def test_label_maps_without_classes_json_are_quarantined(
    scene_source: Path, tmp_path: Path, catalog, storage
) -> None:
    src = _copy(scene_source, tmp_path / "noclasses")
    (src / "classes.json").unlink()
    result = ingest(str(src), name="nc", catalog=catalog, storage=storage)
    assert set(_reasons(result).values()) == {"label-classes"} and len(result.quarantined) == 4
    detail = _details(result)["our485/labels/scene-0000.png"]
    assert "no classes.json at the dataset root" in detail and "class names in id order" in detail
    assert result.counts == {"test": {"high": 1, "low": 1}, "train": {"high": 3, "low": 3}}

    (src / "classes.json").write_text("{not json")
    broken = ingest(str(src), name="nc", catalog=catalog, storage=storage)
    assert "classes.json is not valid JSON" in _details(broken)["eval15/labels/scene-0000.png"]


def test_label_of_a_broken_pair_is_quarantined_too(
    scene_source: Path, tmp_path: Path, catalog, storage
) -> None:
    src = _copy(scene_source, tmp_path / "nohigh")
    (src / "our485" / "high" / "scene-0002.png").unlink()  # no partner: seen by the scan
    cut = src / "our485" / "high" / "scene-0001.png"
    cut.write_bytes(cut.read_bytes()[:100])  # truncated partner: seen by validation
    result = ingest(str(src), name="nh", catalog=catalog, storage=storage)
    assert _reasons(result) == {
        "our485/high/scene-0001.png": "truncated",
        "our485/low/scene-0001.png": "unpaired-leftover",
        "our485/labels/scene-0001.png": "unpaired-leftover",
        "our485/low/scene-0002.png": "unpaired-leftover",
        "our485/labels/scene-0002.png": "unpaired-leftover",
    }
    details = _details(result)
    assert "its partner our485/high/scene-0001.png was quarantined" in details["our485/low/scene-0001.png"]
    assert "its low/high pair was quarantined" in details["our485/labels/scene-0001.png"]
    assert "our485/low/scene-0002.png is not part of a pair" in details["our485/labels/scene-0002.png"]


def test_identical_label_maps_are_not_duplicates_and_palette_maps_are_ids(
    scene_source: Path, tmp_path: Path, catalog, storage
) -> None:
    src = _copy(scene_source, tmp_path / "same")
    labels = src / "our485" / "labels"
    shutil.copy(labels / "scene-0000.png", labels / "scene-0001.png")
    ids = np.asarray(Image.open(labels / "scene-0002.png"))
    palette = Image.frombytes("P", (ids.shape[1], ids.shape[0]), ids.tobytes())  # indices are the ids
    palette.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255, 255, 255, 0, 0, 255, 255])
    palette.save(labels / "scene-0002.png")
    result = ingest(str(src), name="same", catalog=catalog, storage=storage)
    assert not result.quarantined and result.counts["train"]["label"] == 3
    version = get_version("same", catalog=catalog)
    _, _, first = version.labelled_pairs("train")[0]
    _, _, second = version.labelled_pairs("train")[1]
    assert first.sha256 == second.sha256 and first.pair_key != second.pair_key
    _, _, third = version.labelled_pairs("train")[2]
    with Image.open(src / third.rel_path) as img:
        assert img.mode == "P"


def test_ambiguous_linked_and_lossy_label_maps_are_quarantined(
    scene_source: Path, tmp_path: Path, catalog, storage
) -> None:
    src = _copy(scene_source, tmp_path / "odd")
    labels = src / "our485" / "labels"
    ids = np.asarray(Image.open(labels / "scene-0000.png"))
    Image.fromarray(ids).save(labels / "scene-0000.bmp")  # a second map for the same image
    (labels / "scene-0001.png").unlink()
    (labels / "scene-0001.png").symlink_to(labels / "scene-0002.png")
    Image.fromarray(ids).save(labels / "scene-0002.png", format="JPEG")  # lossy: ids would be blurred
    result = ingest(str(src), name="odd", catalog=catalog, storage=storage)
    reasons, details = _reasons(result), _details(result)
    assert reasons == {
        "our485/labels/scene-0000.bmp": "unpaired-leftover",
        "our485/labels/scene-0000.png": "unpaired-leftover",
        "our485/labels/scene-0001.png": "symlink",
        "our485/labels/scene-0002.png": "bad-label",
    }
    assert "ambiguous label map name 'scene-0000'" in details["our485/labels/scene-0000.png"]
    assert "is JPEG mode L" in details["our485/labels/scene-0002.png"]
    assert result.counts["train"] == {"high": 3, "low": 3}
