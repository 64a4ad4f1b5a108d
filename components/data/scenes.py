"""Procedural labelled scenes whose low-light degradation depends on each pixel's class.

Why: on natural photos a class-blind global curve already recovers most of the image, so semantic priors
cannot show what they add. Here every class has its own exposure and colour cast, so the right enhancement
of a pixel depends on what it is: a benchmark where semantics decide (with the oracle SKB,
``skb/oracle-labels@1``, as the upper bound of what perfect semantics give).

Each scene is a random layout (sky band on top, road at the bottom, a wall or foliage background with
ellipses and polygons of foliage, skin and brick in between), rendered from textures bundled in the
scikit-image wheel (read from the installed package, never downloaded) and smooth procedural colours. The
output is the LOL layout (``our485/{low,high,labels}`` train, ``eval15/{low,high,labels}`` test, same file
names) plus ``classes.json`` listing :data:`SCENE_CLASSES` in id order. Label maps are single-channel
8-bit PNGs of class ids. Given the seed the output is bit-exact reproducible, with one random stream per
scene so adding scenes never changes the others.
"""

from __future__ import annotations

import functools
import importlib.resources
import io
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from skimage.draw import ellipse, polygon

__all__ = [
    "CLASSES_FILE",
    "LABELS_DIR",
    "SCENE_CLASSES",
    "SceneDegradation",
    "SceneOutputExistsError",
    "degrade_scene",
    "generate_scene_dataset",
    "render_scene",
]

SCENE_CLASSES: tuple[str, ...] = ("sky", "foliage", "skin", "brick", "road")
SKY, FOLIAGE, SKIN, BRICK, ROAD = range(len(SCENE_CLASSES))
LABELS_DIR = "labels"
CLASSES_FILE = "classes.json"
_SPLITS = (("our485", "train"), ("eval15", "test"))

# Grayscale textures bundled in the scikit-image wheel and the (dark, light) RGB tints they are mapped to.
_TEXTURES: dict[int, tuple[str, tuple[float, float, float], tuple[float, float, float]]] = {
    FOLIAGE: ("grass.png", (0.05, 0.22, 0.04), (0.45, 0.85, 0.30)),
    BRICK: ("brick.png", (0.30, 0.10, 0.06), (0.85, 0.45, 0.32)),
    ROAD: ("gravel.png", (0.18, 0.18, 0.19), (0.72, 0.72, 0.74)),
}
_SKIN_TONES = np.array([[0.96, 0.80, 0.69], [0.88, 0.67, 0.52], [0.72, 0.51, 0.38], [0.50, 0.34, 0.25]])


class SceneOutputExistsError(FileExistsError, ValueError):
    """The output folder already holds a scene dataset and ``overwrite`` was not given."""


@dataclass(frozen=True)
class SceneDegradation:
    """Per-class exposure and colour cast, then a global gamma and Poisson-Gaussian noise.

    ``exposure[k]`` and ``gains[k]`` belong to class ``k`` of :data:`SCENE_CLASSES`; they are jittered per
    scene by ``exposure_jitter`` and ``gain_jitter`` (relative, uniform). They are chosen far apart (sky
    0.35 vs road 0.05 exposure, opposite casts), so no single curve maps all classes back.
    """

    exposure: tuple[float, ...] = (0.35, 0.08, 0.22, 0.14, 0.05)
    gains: tuple[tuple[float, float, float], ...] = (
        (0.70, 0.90, 1.40),  # sky: blue cast
        (1.35, 0.75, 0.90),  # foliage: magenta cast
        (0.80, 1.10, 1.25),  # skin: cyan cast
        (0.95, 1.00, 1.05),  # brick: nearly neutral
        (1.25, 1.10, 0.65),  # road: yellow cast
    )
    exposure_jitter: float = 0.1
    gain_jitter: float = 0.04
    gamma: tuple[float, float] = (1.2, 1.5)
    photons: tuple[float, float] = (80.0, 250.0)  # full-well photon count: shot-noise strength
    read_noise: tuple[float, float] = (0.002, 0.008)  # std of the Gaussian read noise, in [0, 1] units

    def __post_init__(self) -> None:
        if len(self.exposure) != len(SCENE_CLASSES) or len(self.gains) != len(SCENE_CLASSES):
            raise ValueError(
                f"exposure and gains need one entry per class ({len(SCENE_CLASSES)}: "
                f"{', '.join(SCENE_CLASSES)}), got {len(self.exposure)} and {len(self.gains)}"
            )


# --------------------------------------------------------------------------------------------- textures
@functools.cache
def _texture(name: str) -> np.ndarray:
    """A grayscale float texture in [0, 1] from scikit-image's installed data folder (offline)."""
    resource = importlib.resources.files("skimage.data").joinpath(name)
    if not resource.is_file():
        raise FileNotFoundError(f"scikit-image does not ship the texture {name!r} in its wheel")
    with Image.open(io.BytesIO(resource.read_bytes())) as img:
        gray = np.asarray(img.convert("L"), dtype=np.float64) / 255.0
    gray.setflags(write=False)
    return gray


def _tiled(texture: np.ndarray, shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """``texture`` wrapped around to ``shape`` from a random offset (any scene size works)."""
    th, tw = texture.shape
    rows = (np.arange(shape[0]) + int(rng.integers(th))) % th
    cols = (np.arange(shape[1]) + int(rng.integers(tw))) % tw
    return texture[np.ix_(rows, cols)]


def _tinted(k: int, shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    name, dark, light = _TEXTURES[k]
    t = _tiled(_texture(name), shape, rng)[..., None]
    dark_rgb, light_rgb = np.array(dark), np.array(light) * rng.uniform(0.9, 1.1)
    return dark_rgb + t * (light_rgb - dark_rgb)


def _sky(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Smooth vertical gradient from a deep zenith blue to a pale horizon."""
    zenith = np.array([0.15, 0.35, 0.80]) + rng.uniform(-0.05, 0.05, 3)
    horizon = np.array([0.70, 0.82, 0.95]) + rng.uniform(-0.05, 0.05, 3)
    t = np.linspace(0.0, 1.0, shape[0])[:, None, None]
    return np.broadcast_to(zenith + t * (horizon - zenith), (*shape, 3))


def _skin(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A skin tone with smooth low-frequency shading (blobs, no texture)."""
    tone = _SKIN_TONES[rng.integers(len(_SKIN_TONES))]
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]] / max(shape)
    phase = rng.uniform(0, 2 * np.pi, 2)
    shade = 0.85 + 0.15 * np.sin(6 * yy + phase[0]) * np.cos(5 * xx + phase[1])
    return tone * shade[..., None]


# --------------------------------------------------------------------------------------------- layout
def _layout(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A label map: sky on top, road below, a background of wall or foliage, random shapes on it."""
    h, w = shape
    labels = np.empty(shape, dtype=np.uint8)
    sky_end = int(h * rng.uniform(0.2, 0.35))
    road_start = int(h * rng.uniform(0.7, 0.85))
    background = int(rng.choice([BRICK, FOLIAGE]))
    labels[:sky_end], labels[sky_end:road_start], labels[road_start:] = SKY, background, ROAD
    # Every scene shows every class: one skin blob and one shape of the class not used as background.
    shapes = [SKIN, FOLIAGE if background == BRICK else BRICK]
    shapes += [int(k) for k in rng.choice([FOLIAGE, SKIN, BRICK], size=int(rng.integers(1, 5)))]
    for k in shapes:
        rr, cc = _shape(shape, sky_end, road_start, rng)
        labels[rr, cc] = k
    return labels


def _shape(
    shape: tuple[int, int], top: int, bottom: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates of a random ellipse or polygon centred in the middle band."""
    h, w = shape
    cy, cx = rng.uniform(top, max(bottom, top + 1)), rng.uniform(0, w)
    if rng.random() < 0.5:
        radii = rng.uniform(0.06, 0.2, 2) * (h, w)
        return ellipse(cy, cx, radii[0], radii[1], shape=shape, rotation=rng.uniform(-np.pi, np.pi))
    n = int(rng.integers(3, 7))
    angles = np.sort(rng.uniform(0, 2 * np.pi, n))
    radius = rng.uniform(0.08, 0.25) * min(h, w) * rng.uniform(0.6, 1.0, n)
    return polygon(cy + radius * np.sin(angles), cx + radius * np.cos(angles), shape=shape)


def render_scene(shape: tuple[int, int], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(high-quality RGB uint8 image, uint8 label map) of one random scene of ``shape`` (H, W)."""
    labels = _layout(shape, rng)
    layers = {SKY: _sky(shape, rng), SKIN: _skin(shape, rng)}
    layers.update({k: _tinted(k, shape, rng) for k in _TEXTURES})
    image = np.zeros((*shape, 3))
    for k, layer in layers.items():
        mask = labels == k
        image[mask] = layer[mask]
    return np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8), labels


# --------------------------------------------------------------------------------------------- degradation
def degrade_scene(
    high: np.ndarray, labels: np.ndarray, rng: np.random.Generator, model: SceneDegradation | None = None
) -> np.ndarray:
    """Low-light uint8 version of ``high`` where exposure and cast follow each pixel's class."""
    m = model or SceneDegradation()
    n = len(SCENE_CLASSES)
    exposure = np.asarray(m.exposure) * rng.uniform(1 - m.exposure_jitter, 1 + m.exposure_jitter, n)
    gains = np.asarray(m.gains) * rng.uniform(1 - m.gain_jitter, 1 + m.gain_jitter, (n, 3))
    gamma = rng.uniform(*m.gamma)
    photons = rng.uniform(*m.photons)
    sigma = rng.uniform(*m.read_noise)

    x = high.astype(np.float64) / 255.0
    clean = np.clip(exposure[labels][..., None] * np.power(x, gamma) * gains[labels], 0.0, 1.0)
    noisy = rng.poisson(clean * photons) / photons + rng.normal(0.0, sigma, size=clean.shape)
    return np.clip(np.rint(noisy * 255.0), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------- dataset
def _save_png(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format="PNG", compress_level=6)


def _check_arguments(size: tuple[int, int], train: int, test: int) -> None:
    height, width = size
    if height % 32 or width % 32 or height <= 0 or width <= 0:
        raise ValueError(f"size must be (height, width) multiples of 32, got {size}")
    if train < 1 or test < 1:
        raise ValueError(
            f"a scene dataset needs at least one train and one test scene, got train={train}, test={test}"
        )


def _clear(out: Path, overwrite: bool) -> None:
    targets = [out / "our485", out / "eval15", out / CLASSES_FILE]
    if not any(t.exists() for t in targets):
        return
    if not overwrite:
        raise SceneOutputExistsError(
            f"{out} already holds a dataset (our485/, eval15/ or {CLASSES_FILE}); pass overwrite=True to replace it"
        )
    for t in targets:
        if t.is_dir():
            shutil.rmtree(t)
        else:
            t.unlink(missing_ok=True)


def generate_scene_dataset(
    out_dir: str | Path,
    *,
    seed: int = 0,
    size: tuple[int, int] = (128, 192),
    train: int = 16,
    test: int = 4,
    model: SceneDegradation | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``train`` + ``test`` labelled scenes in the LOL layout under ``out_dir``; return ``out_dir``.

    ``size`` is (height, width), both multiples of 32. Files are ``scene-<k>.png`` in ``low``, ``high`` and
    ``labels`` of each split; ``classes.json`` at the root lists the class names in id order.
    """
    _check_arguments(size, train, test)
    out = Path(out_dir)
    _clear(out, overwrite)
    for split_index, ((folder, _split), count) in enumerate(zip(_SPLITS, (train, test), strict=True)):
        for k in range(count):
            # One independent stream per (seed, split, scene): adding scenes never shifts the others.
            rng = np.random.default_rng(np.random.SeedSequence([seed, split_index, k]))
            high, labels = render_scene(size, rng)
            low = degrade_scene(high, labels, rng, model)
            name = f"scene-{k:04d}.png"
            _save_png(high, out / folder / "high" / name)
            _save_png(low, out / folder / "low" / name)
            _save_png(labels, out / folder / LABELS_DIR / name)
    (out / CLASSES_FILE).write_text(json.dumps(list(SCENE_CLASSES), indent=2) + "\n")
    return out
