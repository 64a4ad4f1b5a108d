"""Labelled scene generator: determinism, LOL layout with label maps, class-dependent degradation, errors."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from components.data.layouts import scan_layout
from components.data.scenes import (
    SCENE_CLASSES,
    SceneOutputExistsError,
    degrade_scene,
    generate_scene_dataset,
    render_scene,
)
from components.data.validation import validate_scan

SIZE = (64, 96)


def _hashes(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _read(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_scene_dataset(tmp_path_factory.mktemp("scenes") / "a", seed=5, size=SIZE, train=4, test=2)


def test_same_seed_gives_identical_bytes_and_another_seed_differs(scenes: Path, tmp_path: Path) -> None:
    again = generate_scene_dataset(tmp_path / "b", seed=5, size=SIZE, train=4, test=2)
    assert _hashes(scenes) == _hashes(again)
    other = generate_scene_dataset(tmp_path / "c", seed=6, size=SIZE, train=4, test=2)
    images = {k: v for k, v in _hashes(other).items() if k.endswith(".png")}
    assert images.keys() == {k for k in _hashes(scenes) if k.endswith(".png")}
    assert not set(images.values()) & set(_hashes(scenes).values())


def test_one_stream_per_scene_so_adding_scenes_keeps_the_others(scenes: Path, tmp_path: Path) -> None:
    more = generate_scene_dataset(tmp_path / "more", seed=5, size=SIZE, train=6, test=2)
    before, after = _hashes(scenes), _hashes(more)
    assert {k: after[k] for k in before} == before
    assert len(after) == len(before) + 3 * 2  # two more train scenes: low, high, labels each


def test_lol_layout_with_label_maps_and_classes_file(scenes: Path) -> None:
    assert json.loads((scenes / "classes.json").read_text()) == list(SCENE_CLASSES)
    scan = scan_layout(scenes)
    assert scan.layout == "lol" and not scan.leftovers and not scan.ignored and not scan.refused
    assert scan.classes_file == "classes.json"
    result = validate_scan(scan)
    assert not result.quarantined and result.label_classes == SCENE_CLASSES
    roles = [(v.entry.split, v.entry.role) for v in result.valid]
    assert roles.count(("train", "label")) == 4 and roles.count(("test", "label")) == 2
    for subset in ("our485", "eval15"):
        for path in sorted((scenes / subset / "labels").glob("*.png")):
            labels = _read(path)
            assert labels.dtype == np.uint8 and labels.shape == SIZE  # single channel, image-sized
            assert set(np.unique(labels).tolist()) <= set(range(len(SCENE_CLASSES)))
            assert _read(scenes / subset / "low" / path.name).shape == (*SIZE, 3)


def test_every_scene_shows_sky_on_top_and_road_at_the_bottom(scenes: Path) -> None:
    for path in sorted((scenes / "our485" / "labels").glob("*.png")):
        labels = _read(path)
        assert (labels[0] == 0).mean() > 0.5 and (labels[-1] == 4).mean() > 0.5
        assert len(np.unique(labels)) >= 4


def _lut_error(index: np.ndarray, target: np.ndarray, bins: int) -> float:
    """MSE of the best lookup table from ``index`` to ``target`` (per channel, fitted on the data)."""
    err = 0.0
    for c in range(3):
        i = index[:, c]
        mean = np.bincount(i, target[:, c], bins) / np.maximum(np.bincount(i, minlength=bins), 1)
        err += float(((mean[i] - target[:, c]) ** 2).mean())
    return err / 3


def test_degradation_depends_on_the_class_so_no_global_curve_inverts_it() -> None:
    rng = np.random.default_rng(0)
    highs, lows, labels = [], [], []
    for _ in range(6):
        high, lab = render_scene(SIZE, rng)
        highs.append(high)
        lows.append(degrade_scene(high, lab, rng))
        labels.append(lab)
    high = np.stack(highs).reshape(-1, 3).astype(np.float64)
    low = np.stack(lows).reshape(-1, 3).astype(np.int64)
    lab = np.stack(labels).reshape(-1).astype(np.int64)

    ratio = np.array([low[lab == k].mean() / high[lab == k].mean() for k in range(len(SCENE_CLASSES))])
    assert ratio.max() / ratio.min() > 4  # sky keeps ~35% of its light, road ~4%
    casts = np.array([low[lab == k].mean(0) / high[lab == k].mean(0) for k in range(len(SCENE_CLASSES))])
    casts /= casts.mean(1, keepdims=True)
    assert casts[0, 2] > 1.2 and casts[4, 2] < 0.8  # sky turns blue, road yellow: opposite casts
    # The best class-blind per-channel curve leaves far more error than one curve per class.
    blind = _lut_error(low, high, 256)
    aware = _lut_error(lab[:, None] * 256 + low, high, 256 * len(SCENE_CLASSES))
    assert aware < 0.5 * blind


def test_bad_arguments_and_existing_output_are_clear_errors(scenes: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="multiples of 32"):
        generate_scene_dataset(tmp_path / "x", size=(100, 96))
    with pytest.raises(ValueError, match="multiples of 32"):
        generate_scene_dataset(tmp_path / "x", size=(0, 96))
    with pytest.raises(ValueError, match="at least one train and one test scene"):
        generate_scene_dataset(tmp_path / "x", train=0, test=0)
    with pytest.raises(ValueError, match="at least one train and one test scene"):
        generate_scene_dataset(tmp_path / "x", train=2, test=0)
    assert not (tmp_path / "x").exists()
    with pytest.raises(SceneOutputExistsError, match="overwrite=True") as info:
        generate_scene_dataset(scenes, seed=5, size=SIZE, train=4, test=2)
    assert isinstance(info.value, ValueError) and isinstance(info.value, FileExistsError)


def test_overwrite_replaces_the_previous_dataset(tmp_path: Path) -> None:
    out = generate_scene_dataset(tmp_path / "o", seed=1, size=SIZE, train=3, test=1)
    generate_scene_dataset(out, seed=2, size=SIZE, train=1, test=1, overwrite=True)
    assert sorted(p.name for p in (out / "our485" / "labels").iterdir()) == ["scene-0000.png"]
    fresh = generate_scene_dataset(tmp_path / "fresh", seed=2, size=SIZE, train=1, test=1)
    assert _hashes(out) == _hashes(fresh)


def test_scene_data_command_writes_scenes_and_refuses_zero_images(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from flows.cli import app

    runner = CliRunner()
    done = runner.invoke(
        app,
        ["scene-data", str(tmp_path / "s"), "--train", "2", "--test", "1", "--height", "64", "--width", "64"],
    )
    assert done.exit_code == 0, done.output
    assert "wrote 2 train and 1 test labelled scenes" in done.output
    assert len(list((tmp_path / "s" / "our485" / "labels").iterdir())) == 2
    refused = runner.invoke(app, ["scene-data", str(tmp_path / "t"), "--train", "0"])
    assert refused.exit_code != 0 and not (tmp_path / "t" / "our485").exists()
    # the CLI boundary (flows.cli.main) prints this UserInputError as its one `error:` line
    assert "at least one train and one test scene, got train=0" in str(refused.exception)
