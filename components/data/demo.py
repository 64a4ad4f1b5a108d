"""Deterministic demo dataset: synthetic low-light pairs in the LOL layout, from photos bundled offline.

The high-quality images are random crops of colour photographs shipped inside the scikit-image wheel
(read straight from the installed package, never downloaded). The low-light image of each crop is
simulated with a simple camera model: exposure scaling, a gamma curve, a colour cast, then
Poisson-Gaussian (shot + read) noise, quantised to uint8. Train and test are split by source photo, so
no photo contributes to both. Given the seed, the output is bit-exact reproducible.
"""

from __future__ import annotations

import importlib.resources
import io
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["DEMO_PHOTOS", "LowLightModel", "generate_demo_dataset", "load_photo", "synthesize_low_light"]

# Natural colour photographs bundled in the scikit-image wheel (not fetched through pooch).
# motorcycle_right is left out on purpose: it is the same scene as motorcycle_left (a stereo pair).
DEMO_PHOTOS: tuple[str, ...] = (
    "astronaut.png",
    "chelsea.png",
    "coffee.png",
    "rocket.jpg",
    "motorcycle_left.png",
)


@dataclass(frozen=True)
class LowLightModel:
    """Ranges the per-pair degradation parameters are drawn from (uniformly)."""

    exposure: tuple[float, float] = (0.1, 0.3)  # global exposure scale
    gamma: tuple[float, float] = (1.2, 1.8)  # applied as x ** gamma (darkens shadows further)
    cast: tuple[float, float] = (0.85, 1.15)  # per-channel gains, renormalised to mean 1
    photons: tuple[float, float] = (60.0, 250.0)  # full-well photon count: shot-noise strength
    read_noise: tuple[float, float] = (0.002, 0.01)  # std of the Gaussian read noise, in [0, 1] units


def load_photo(name: str) -> np.ndarray:
    """An RGB uint8 photo from scikit-image's installed data folder (offline)."""
    resource = importlib.resources.files("skimage.data").joinpath(name)
    if not resource.is_file():
        raise FileNotFoundError(
            f"scikit-image does not ship {name!r} in its wheel; choose from {', '.join(DEMO_PHOTOS)}"
        )
    with Image.open(io.BytesIO(resource.read_bytes())) as img:
        return np.asarray(img.convert("RGB"), dtype=np.uint8)


def synthesize_low_light(
    high: np.ndarray, rng: np.random.Generator, model: LowLightModel | None = None
) -> np.ndarray:
    """Low-light uint8 version of an RGB uint8 image, with parameters drawn from ``rng``."""
    m = model or LowLightModel()
    exposure = rng.uniform(*m.exposure)
    gamma = rng.uniform(*m.gamma)
    gains = rng.uniform(*m.cast, size=3)
    gains = gains / gains.mean()
    photons = rng.uniform(*m.photons)
    sigma = rng.uniform(*m.read_noise)

    x = high.astype(np.float64) / 255.0
    clean = np.clip(exposure * np.power(x, gamma) * gains, 0.0, 1.0)
    noisy = rng.poisson(clean * photons) / photons + rng.normal(0.0, sigma, size=clean.shape)
    return np.clip(np.rint(noisy * 255.0), 0, 255).astype(np.uint8)


def _save_png(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format="PNG", compress_level=6)


def generate_demo_dataset(
    out_dir: str | Path,
    *,
    seed: int = 0,
    size: tuple[int, int] = (128, 192),
    pairs_per_photo: int = 6,
    test_photos: int = 1,
    photos: tuple[str, ...] = DEMO_PHOTOS,
    model: LowLightModel | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``out_dir/our485/{low,high}`` (train) and ``out_dir/eval15/{low,high}`` (test); return ``out_dir``.

    ``size`` is (height, width), both multiples of 32. The defaults give 24 train and 6 test pairs of
    128x192 (4 train photos, 1 test photo, 6 crops each), enough for a demo that trains in minutes on CPU.
    File names are ``<photo>-<k>.png``, identical in ``low`` and ``high``.
    """
    height, width = size
    if height % 32 or width % 32 or height <= 0 or width <= 0:
        raise ValueError(f"size must be (height, width) multiples of 32, got {size}")
    if not 0 < test_photos < len(photos):
        raise ValueError(f"test_photos must be between 1 and {len(photos) - 1} (photos: {len(photos)})")
    if pairs_per_photo < 1:
        raise ValueError(f"pairs_per_photo must be >= 1, got {pairs_per_photo}")

    out = Path(out_dir)
    targets = [out / "our485", out / "eval15"]
    if any(t.exists() for t in targets):
        if not overwrite:
            raise FileExistsError(
                f"{out} already holds a demo dataset (our485/ or eval15/); pass --overwrite (overwrite=True) to replace it"
            )
        for t in targets:
            shutil.rmtree(t, ignore_errors=True)

    order = np.random.default_rng(seed).permutation(len(photos))
    test_ids = set(order[:test_photos].tolist())
    for index, name in enumerate(photos):
        photo = load_photo(name)
        ph, pw = photo.shape[:2]
        if ph < height or pw < width:
            raise ValueError(
                f"crop {height}x{width} does not fit photo {name} ({ph}x{pw}); use a smaller size"
            )
        subset = "eval15" if index in test_ids else "our485"
        stem = Path(name).stem
        for k in range(pairs_per_photo):
            # One independent stream per (seed, photo, crop): adding photos or crops never shifts the others.
            rng = np.random.default_rng(np.random.SeedSequence([seed, index, k]))
            top = int(rng.integers(0, ph - height + 1))
            left = int(rng.integers(0, pw - width + 1))
            high = np.ascontiguousarray(photo[top : top + height, left : left + width])
            low = synthesize_low_light(high, rng, model)
            file_name = f"{stem}-{k:02d}.png"
            _save_png(high, out / subset / "high" / file_name)
            _save_png(low, out / subset / "low" / file_name)
    return out
