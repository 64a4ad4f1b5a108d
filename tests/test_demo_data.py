"""Demo dataset: bit-exact determinism, LOL layout, split by source photo, plausible low-light pairs."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from components.data.demo import DEMO_PHOTOS, generate_demo_dataset, load_photo
from components.data.layouts import scan_layout
from components.data.validation import validate_scan


def _hashes(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in root.rglob("*.png")
    }


def _read(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def _find_crop(photo: np.ndarray, crop: np.ndarray) -> bool:
    """Whether ``crop`` is an exact sub-array of ``photo`` (candidates from its first 8 pixels)."""
    h, w = crop.shape[:2]
    windows = np.lib.stride_tricks.sliding_window_view(photo, (1, 8, 3))[..., 0, :, :]
    ys, xs = np.nonzero((windows[..., 0, :, :] == crop[0, :8]).all(axis=(-1, -2)))
    return any(np.array_equal(photo[y : y + h, x : x + w], crop) for y, x in zip(ys, xs, strict=True))


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_demo_dataset(tmp_path_factory.mktemp("demo") / "a", seed=3)


def test_two_runs_are_bit_identical_and_seed_matters(demo: Path, tmp_path: Path) -> None:
    again = generate_demo_dataset(tmp_path / "b", seed=3)
    assert _hashes(demo) == _hashes(again)
    other = generate_demo_dataset(tmp_path / "c", seed=4, pairs_per_photo=1)
    assert not set(_hashes(other).values()) & set(_hashes(demo).values())


def test_lol_layout_with_default_counts_and_sizes(demo: Path) -> None:
    scan = scan_layout(demo)
    assert scan.layout == "lol" and not scan.leftovers and not scan.ignored
    result = validate_scan(scan)
    assert not result.quarantined
    splits = [v.entry.split for v in result.valid if v.entry.role == "low"]
    assert splits.count("train") == 24 and splits.count("test") == 6
    assert {(v.info.height, v.info.width) for v in result.valid} == {(128, 192)}


def test_train_and_test_come_from_different_photos(demo: Path) -> None:
    photo_of = {Path(n).stem: n for n in DEMO_PHOTOS}
    used: dict[str, set[str]] = {"our485": set(), "eval15": set()}
    for subset, names in used.items():
        for path in sorted((demo / subset / "high").glob("*.png")):
            stem = path.stem.rsplit("-", 1)[0]
            names.add(stem)
            # The name is honest: the high image is an exact crop of the photo it is named after.
            assert _find_crop(load_photo(photo_of[stem]), _read(path)), path
    assert used["our485"] and used["eval15"] and not used["our485"] & used["eval15"]


def test_low_images_are_dark_noisy_versions_of_high(demo: Path) -> None:
    for path in sorted((demo / "our485" / "low").glob("*.png"))[:6]:
        low = _read(path).astype(np.float64)
        high = _read(demo / "our485" / "high" / path.name).astype(np.float64)
        assert low.mean() < 0.4 * high.mean()
        assert np.corrcoef(low.ravel(), high.ravel())[0, 1] > 0.5  # same scene, not random
        assert len(np.unique(low)) > 8  # noise and content, not a constant image


def test_bad_arguments_are_rejected(tmp_path: Path, demo: Path) -> None:
    with pytest.raises(ValueError, match="multiples of 32"):
        generate_demo_dataset(tmp_path / "x", size=(100, 192))
    with pytest.raises(ValueError, match="does not fit photo"):
        generate_demo_dataset(tmp_path / "y", size=(320, 192))
    with pytest.raises(FileExistsError):
        generate_demo_dataset(demo)
