"""Using a registered enhancer: load it from MLflow and enhance numpy images, keeping their bit depth.

``load_enhancer("models:/skf-lol-v2@champion")`` downloads the MLflow model and rebuilds the
:class:`~components.inference.Enhancer` from its spec JSON and safetensors weights -- it never runs the
pyfunc's pickled or logged code. :func:`enhance_arrays` is the array-level API that ``skf enhance`` and
the pyfunc wrapper share.

The pyfunc interface (what ``mlflow.pyfunc.load_model(uri).predict(batch)`` takes): one float32 numpy
array (N, H, W, 3), RGB in [0, 1], channels last; it returns the enhanced batch with the same shape and
dtype. Use :func:`enhance_arrays` for uint8/uint16 images or batches of different sizes.

Bounded memory (``skf enhance``): :func:`read_image` reads the size from the file header and refuses an
image over ``SKF_MAX_ENHANCE_PIXELS`` before any pixel is decoded; :func:`enhance_image` runs an image
with a side over ``SKF_ENHANCE_TILE`` in tiles of at most that side, each with :data:`TILE_MARGIN` pixels
of context that is cropped away (no blending), so the network never sees more than one tile. Tiles start
on a 16-pixel grid, so padding and strided convolutions line up with an untiled run: a model whose
receptive field fits in the margin gives the untiled result. The SKF models do not quite: the SKB
(HRNet) segments each tile with only the tile for context, and SNR-Net's transformer attends within the
tile, so a tiled result differs slightly from an untiled one (no visible seams: every kept pixel had
``TILE_MARGIN`` pixels of context). Raise ``SKF_ENHANCE_TILE`` above the image side to avoid tiling.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from components.errors import SKFError
from components.inference import Enhancer, load_enhancer_files

#: Names of the MLflow model artifacts (``artifacts=`` of the pyfunc); see :mod:`components.model_registry`.
ARTIFACT_SPEC, ARTIFACT_NET, ARTIFACT_SKB, ARTIFACT_CARD = "enhancer_spec", "enhancer", "skb", "model_card"

_INT_DTYPES = (np.uint8, np.uint16)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------
class ModelPackageError(SKFError, FileNotFoundError):
    """A model directory or download is not a loadable SKF enhancer (missing, damaged or foreign files)."""


_URI_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:/")
_MODEL_FORMS = (
    "models:/<name>@<alias>, models:/<name>/<version>, runs:/<run_id>/enhancer or an MLflow model dir"
)


def model_artifacts(model_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """Local paths of the enhancer artifacts inside a downloaded MLflow model directory."""
    from mlflow.exceptions import MlflowException
    from mlflow.models import Model

    root = Path(model_dir)
    try:
        conf = Model.load(str(root)).flavors.get("python_function", {})
    except (MlflowException, OSError, ValueError) as exc:
        raise ModelPackageError(
            f"{root} is not an MLflow model directory (no readable MLmodel file); pass {_MODEL_FORMS}"
        ) from exc
    listed = conf.get("artifacts") or {}
    paths = {name: root / entry["path"] for name, entry in listed.items()}
    missing = [a for a in (ARTIFACT_SPEC, ARTIFACT_NET) if a not in paths or not paths[a].is_file()]
    if missing:
        raise ModelPackageError(
            f"{root} is not an SKF enhancer model: artifacts {missing} are missing (log it with "
            "components.model_registry.log_enhancer)"
        )
    return paths


def _local_model_dir(path: str) -> Path:
    local = Path(path).expanduser()
    if not local.exists():
        raise ModelPackageError(f"model {path!r}: no such directory and not a model URI; pass {_MODEL_FORMS}")
    if not local.is_dir():
        raise ModelPackageError(
            f"model {path!r} is a file, not a model directory (a checkpoint must be registered first); "
            f"pass {_MODEL_FORMS}"
        )
    return local


def _download(uri: str, dest: Path) -> Path:
    import mlflow
    from mlflow.exceptions import MlflowException

    from components.model_registry import ModelNotFoundError

    try:
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dest)))
    except (MlflowException, OSError) as exc:
        reason = " ".join(str(getattr(exc, "message", None) or exc).split())[:300]
        raise ModelNotFoundError(
            f"cannot download {uri} from MLflow at {mlflow.get_tracking_uri()} ({reason}); pass {_MODEL_FORMS}"
        ) from exc


@contextlib.contextmanager
def downloaded(uri: str) -> Iterator[Path]:
    """A local copy of model/artifact ``uri`` for the block: a local folder as is, else a temp download.

    The download is removed when the block ends (a registered model with its bundled code is tens of
    MB; leaving it in the temp folder leaked that much per ``skf enhance``/``skf evaluate``).
    """
    if not _URI_SCHEME.match(uri):
        yield _local_model_dir(uri)
        return
    from mlflow import MlflowClient

    from components.model_registry import check_model_uri

    check_model_uri(MlflowClient(), uri)
    with tempfile.TemporaryDirectory(prefix="skf-model-") as tmp:
        yield _download(uri, Path(tmp))


def load_checked(source: str, build: Callable[[], Enhancer]) -> Enhancer:
    """``build()``, with damaged or incompatible weight files reported as a :class:`ModelPackageError`."""
    import pickle

    from safetensors import SafetensorError

    try:
        return build()
    except SKFError:
        raise
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError, pickle.UnpicklingError) as exc:
        reason = " ".join(str(exc).split())[:300] or type(exc).__name__
        raise ModelPackageError(
            f"{source}: the enhancer files cannot be loaded ({type(exc).__name__}: {reason}); they are "
            "damaged or from an incompatible version: register the model again"
        ) from exc


def load_enhancer(uri: str, *, device: str | torch.device | None = None) -> Enhancer:
    """The enhancer behind an MLflow model URI, in eval mode.

    ``uri``: ``models:/<name>@<alias>``, ``models:/<name>/<version>``, ``runs:/<run_id>/<path>``,
    ``models:/<model_id>`` or a local model directory. Weights are read as safetensors (or
    ``torch.load(weights_only=True)`` for ``.pt``); nothing pickled is executed. An unknown URI, name,
    alias or version raises :class:`~components.model_registry.ModelNotFoundError` (listing what exists),
    damaged files :class:`ModelPackageError`; a download is deleted once the weights are in memory.
    """
    with downloaded(uri) as local:
        paths = model_artifacts(local)
        enhancer = load_checked(
            uri,
            lambda: load_enhancer_files(
                paths[ARTIFACT_SPEC],
                paths[ARTIFACT_NET],
                paths.get(ARTIFACT_SKB),
                device=device or default_device(),
            ),
        )
    return enhancer.eval()


# --------------------------------------------------------------------------------------------------
# Arrays
# --------------------------------------------------------------------------------------------------
def _scale(dtype: np.dtype) -> float:
    if dtype in _INT_DTYPES:
        return float(np.iinfo(dtype).max)
    if np.issubdtype(dtype, np.floating):
        return 1.0
    raise TypeError(f"unsupported image dtype {dtype}: use uint8, uint16 or float in [0, 1]")


def _check_image(image: np.ndarray) -> None:
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 3, 4)):
        raise ValueError(
            f"expected an (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) image, got shape {image.shape}"
        )
    _scale(image.dtype)


def _to_rgb_float(image: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """(H, W, 3) float32 in [0, 1] plus the untouched alpha channel, if any."""
    _check_image(image)
    if image.ndim == 2:
        image = image[..., None]
    alpha = image[..., 3:] if image.shape[2] == 4 else None
    rgb = np.repeat(image, 3, axis=2) if image.shape[2] == 1 else image[..., :3]
    return rgb.astype(np.float32) / _scale(image.dtype), alpha


def _from_rgb_float(rgb: np.ndarray, like: np.ndarray, alpha: np.ndarray | None) -> np.ndarray:
    """Back to the input's dtype, range and channel layout (grey inputs get the mean of the channels)."""
    if like.ndim == 2 or like.shape[2] == 1:
        rgb = rgb.mean(axis=2, keepdims=True)
    scale = _scale(like.dtype)
    out = rgb * scale
    if like.dtype in _INT_DTYPES:
        out = np.clip(np.rint(out), 0, scale)
    out = out.astype(like.dtype)
    if alpha is not None:
        out = np.concatenate([out, alpha], axis=2)
    return out.reshape(like.shape)


@torch.inference_mode()
def enhance_batch(enhancer: Enhancer, batch: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) float32 in [0, 1] -> enhanced (N, H, W, 3) float32 (the pyfunc contract)."""
    if batch.ndim != 4 or batch.shape[-1] != 3:
        raise ValueError(f"expected an (N, H, W, 3) batch, got shape {batch.shape}")
    device = next(enhancer.parameters()).device
    # Copied into a tensor with canonical strides: a view such as ``rgb[None]`` has a zero stride on its
    # batch axis, which steers the kernels to another layout and changes the last float bit.
    x = torch.empty(batch.shape, dtype=torch.float32, device=device)
    x.copy_(torch.from_numpy(np.asarray(batch, dtype=np.float32)))
    x = x.permute(0, 3, 1, 2)
    return enhancer(x).permute(0, 2, 3, 1).float().cpu().numpy()


# --------------------------------------------------------------------------------------------------
# Tiles: bounded memory for large images (see the module docstring for what tiling changes)
# --------------------------------------------------------------------------------------------------
#: Pixels of context each tile gets on every side beyond the part that is kept (at most a quarter tile).
TILE_MARGIN = 64
#: Tiles start on this grid: SNR-Net pads to 16 and DRBN downsamples by 4, so padding and strides line up.
TILE_ALIGN = 16

Span = tuple[int, int, int, int]  # window start, window end, kept start, kept end (along one axis)


def tile_spans(size: int, tile: int, margin: int = TILE_MARGIN) -> list[Span]:
    """How one axis of ``size`` pixels is cut into windows of at most ``tile`` pixels.

    A window keeps ``[kept start, kept end)`` and has up to ``margin`` pixels of context on each side
    (less at the image border); kept parts tile the axis exactly. ``size <= tile``: one window, no tiling.
    """
    if size <= tile:
        return [(0, size, 0, size)]
    margin = min(margin, tile // 4) // TILE_ALIGN * TILE_ALIGN
    step = max(TILE_ALIGN, (tile - 2 * margin) // TILE_ALIGN * TILE_ALIGN)
    return [
        (max(0, start - margin), min(size, start + step + margin), start, min(size, start + step))
        for start in range(0, size, step)
    ]


def enhance_image(
    enhancer: Enhancer, image: np.ndarray, *, tile: int | None = None, margin: int = TILE_MARGIN
) -> np.ndarray:
    """Enhance one RGB(A)/grey image; an image with a side over ``tile`` runs tile by tile.

    ``tile`` defaults to ``SKF_ENHANCE_TILE``. Memory is the input, the output (same dtype) and one
    tile's activations, whatever the image size; each window is converted to float on its own.
    """
    image = np.asarray(image)
    _check_image(image)
    if tile is None:
        from components.settings import get_settings

        tile = get_settings().limits.enhance_tile
    rows, cols = tile_spans(image.shape[0], tile, margin), tile_spans(image.shape[1], tile, margin)
    if len(rows) == len(cols) == 1:
        rgb, alpha = _to_rgb_float(image)
        return _from_rgb_float(enhance_batch(enhancer, rgb[None])[0], image, alpha)
    out = np.empty_like(image)
    for y0, y1, ky0, ky1 in rows:
        for x0, x1, kx0, kx1 in cols:
            window = image[y0:y1, x0:x1]
            rgb, alpha = _to_rgb_float(window)
            enhanced = _from_rgb_float(enhance_batch(enhancer, rgb[None])[0], window, alpha)
            out[ky0:ky1, kx0:kx1] = enhanced[ky0 - y0 : ky1 - y0, kx0 - x0 : kx1 - x0]
    return out


def enhance_arrays(
    enhancer: Enhancer, images: Sequence[np.ndarray], *, batch_size: int = 4, tile: int | None = None
) -> list[np.ndarray]:
    """Enhance RGB(A)/grey images of any sizes; each output has its input's shape and dtype.

    uint8 and uint16 keep their full range (a 16-bit image is enhanced at 16-bit precision and
    written back as uint16); floats are taken as [0, 1]. Alpha passes through unchanged; grey images
    are enhanced as RGB and returned as the channel mean. Equal-sized images are batched together;
    an image with a side over ``tile`` (default ``SKF_ENHANCE_TILE``) goes through :func:`enhance_image`.
    """
    if tile is None:
        from components.settings import get_settings

        tile = get_settings().limits.enhance_tile
    arrays = [np.asarray(img) for img in images]
    results: list[np.ndarray | None] = [None] * len(arrays)
    by_size: dict[tuple[int, int], list[int]] = {}
    for i, img in enumerate(arrays):
        _check_image(img)
        if max(img.shape[:2]) > tile:
            results[i] = enhance_image(enhancer, img, tile=tile)
        else:
            by_size.setdefault(img.shape[:2], []).append(i)
    for indices in by_size.values():
        for start in range(0, len(indices), max(1, batch_size)):
            chunk = indices[start : start + batch_size]
            prepared = [_to_rgb_float(arrays[i]) for i in chunk]
            out = enhance_batch(enhancer, np.stack([rgb for rgb, _ in prepared]))
            for i, enhanced, (_, alpha) in zip(chunk, out, prepared, strict=True):
                results[i] = _from_rgb_float(enhanced, arrays[i], alpha)
    return [r for r in results if r is not None]


# --------------------------------------------------------------------------------------------------
# Image files
# --------------------------------------------------------------------------------------------------
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


class UnreadableImageError(SKFError, ValueError):
    """A file is not a decodable image."""


class ImageTooLargeError(UnreadableImageError):
    """An image has more pixels (or bytes) than the enhance limits allow; found before decoding."""


_BOMB_PIXELS = re.compile(r"\((\d+) pixels\)")


def _too_large(path: str | os.PathLike[str], size: str, limit: int) -> ImageTooLargeError:
    return ImageTooLargeError(
        f"{path}: {size} exceeds SKF_MAX_ENHANCE_PIXELS={limit:,}; downscale or crop the image, or raise "
        "SKF_MAX_ENHANCE_PIXELS"
    )


def image_size(path: str | os.PathLike[str], *, max_pixels: int | None = None) -> tuple[int, int]:
    """(width, height) from the file header, refusing more than ``max_pixels`` before any decoding.

    ``max_pixels`` defaults to ``SKF_MAX_ENHANCE_PIXELS``; the file size is held to ``SKF_MAX_FILE_BYTES``.
    """
    from PIL import Image

    from components.settings import get_settings

    limits = get_settings().limits
    limit = limits.max_enhance_pixels if max_pixels is None else max_pixels
    nbytes = Path(path).stat().st_size
    if nbytes > limits.max_file_bytes:
        raise ImageTooLargeError(
            f"{path}: {nbytes:,} bytes exceeds SKF_MAX_FILE_BYTES={limits.max_file_bytes:,}; "
            "shrink the file or raise SKF_MAX_FILE_BYTES"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                width, height = img.size
    except Image.DecompressionBombError as exc:  # Pillow's own limit, above ours by default
        found = _BOMB_PIXELS.search(str(exc))
        raise _too_large(path, f"{int(found[1]):,} pixels" if found else "the image", limit) from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        if isinstance(exc, PermissionError | IsADirectoryError):
            raise
        raise UnreadableImageError(
            f"{path}: not a readable image (corrupt, truncated or unsupported format)"
        ) from exc
    if width * height > limit:
        raise _too_large(path, f"{width}x{height} = {width * height:,} pixels", limit)
    return width, height


def read_image(path: str | os.PathLike[str], *, max_pixels: int | None = None) -> np.ndarray:
    """RGB(A) or grey array of ``path`` at its stored bit depth (uint8, or uint16 for 16-bit PNG/TIFF).

    The size is checked from the header first (:func:`image_size`), so an image over the pixel limit
    costs no decoding memory.
    """
    import cv2

    width, height = image_size(path, max_pixels=max_pixels)
    data = np.fromfile(str(path), dtype=np.uint8)
    try:
        image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    except cv2.error:
        image = None
    if image is None or image.shape[:2] != (height, width):
        raise UnreadableImageError(f"{path}: not a readable image (corrupt, truncated or unsupported format)")
    if image.dtype not in _INT_DTYPES:
        raise UnreadableImageError(
            f"{path}: {image.dtype} pixels are not supported (8- or 16-bit images only)"
        )
    if image.ndim == 3 and image.shape[2] == 3:
        image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    elif image.ndim == 3 and image.shape[2] == 4:
        image = cv2.cvtColor(image, cv2.COLOR_BGRA2RGBA)
    return image


def write_image(path: str | os.PathLike[str], image: np.ndarray) -> Path:
    """Write an array from :func:`read_image` (same channel order and dtype) atomically."""
    import cv2

    path = Path(path)
    if image.ndim == 3 and image.shape[2] == 3:
        image = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    elif image.ndim == 3 and image.shape[2] == 4:
        image = cv2.cvtColor(image, cv2.COLOR_RGBA2BGRA)
    try:
        ok, encoded = cv2.imencode(path.suffix or ".png", image)
    except cv2.error:
        ok = False
    if not ok:
        raise ValueError(f"cannot encode a {image.dtype} {image.shape} image as {path.suffix or '.png'}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(encoded.tobytes())
    os.replace(tmp, path)
    return path
