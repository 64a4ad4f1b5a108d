"""Using a registered enhancer: load it from MLflow and enhance numpy images, keeping their bit depth.

``load_enhancer("models:/skf-lol-v2@champion")`` downloads the MLflow model and rebuilds the
:class:`~components.inference.Enhancer` from its spec JSON and safetensors weights -- it never runs the
pyfunc's pickled or logged code. :func:`enhance_arrays` is the array-level API that ``skf enhance`` and
the pyfunc wrapper share.

The pyfunc interface (what ``mlflow.pyfunc.load_model(uri).predict(batch)`` takes): one float32 numpy
array (N, H, W, 3), RGB in [0, 1], channels last; it returns the enhanced batch with the same shape and
dtype. Use :func:`enhance_arrays` for uint8/uint16 images or batches of different sizes.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from components.inference import Enhancer, load_enhancer_files

#: Names of the MLflow model artifacts (``artifacts=`` of the pyfunc); see :mod:`components.model_registry`.
ARTIFACT_SPEC, ARTIFACT_NET, ARTIFACT_SKB, ARTIFACT_CARD = "enhancer_spec", "enhancer", "skb", "model_card"

_INT_DTYPES = (np.uint8, np.uint16)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------
def model_artifacts(model_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """Local paths of the enhancer artifacts inside a downloaded MLflow model directory."""
    from mlflow.models import Model

    root = Path(model_dir)
    conf = Model.load(str(root)).flavors.get("python_function", {})
    listed = conf.get("artifacts") or {}
    paths = {name: root / entry["path"] for name, entry in listed.items()}
    missing = [a for a in (ARTIFACT_SPEC, ARTIFACT_NET) if a not in paths or not paths[a].is_file()]
    if missing:
        raise FileNotFoundError(
            f"{root} is not an SKF enhancer model: artifacts {missing} are missing (log it with "
            "components.model_registry.log_enhancer)"
        )
    return paths


def load_enhancer(uri: str, *, device: str | torch.device | None = None) -> Enhancer:
    """The enhancer behind an MLflow model URI, in eval mode.

    ``uri``: ``models:/<name>@<alias>``, ``models:/<name>/<version>``, ``runs:/<run_id>/<path>``,
    ``models:/<model_id>`` or a local model directory. Weights are read as safetensors (or
    ``torch.load(weights_only=True)`` for ``.pt``); nothing pickled is executed.
    """
    import mlflow

    local = Path(uri) if Path(uri).is_dir() else Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
    paths = model_artifacts(local)
    enhancer = load_enhancer_files(
        paths[ARTIFACT_SPEC], paths[ARTIFACT_NET], paths.get(ARTIFACT_SKB), device=device or default_device()
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


def _to_rgb_float(image: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """(H, W, 3) float32 in [0, 1] plus the untouched alpha channel, if any."""
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[2] not in (1, 3, 4):
        raise ValueError(
            f"expected an (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) image, got shape {image.shape}"
        )
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
    x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).permute(0, 3, 1, 2).to(device)
    return enhancer(x).permute(0, 2, 3, 1).float().cpu().numpy()


def enhance_arrays(
    enhancer: Enhancer, images: Sequence[np.ndarray], *, batch_size: int = 4
) -> list[np.ndarray]:
    """Enhance RGB(A)/grey images of any sizes; each output has its input's shape and dtype.

    uint8 and uint16 keep their full range (a 16-bit image is enhanced at 16-bit precision and
    written back as uint16); floats are taken as [0, 1]. Alpha passes through unchanged; grey images
    are enhanced as RGB and returned as the channel mean. Equal-sized images are batched together.
    """
    prepared = [_to_rgb_float(np.asarray(img)) for img in images]
    results: list[np.ndarray | None] = [None] * len(prepared)
    by_size: dict[tuple[int, int], list[int]] = {}
    for i, (rgb, _) in enumerate(prepared):
        by_size.setdefault(rgb.shape[:2], []).append(i)
    for indices in by_size.values():
        for start in range(0, len(indices), max(1, batch_size)):
            chunk = indices[start : start + batch_size]
            out = enhance_batch(enhancer, np.stack([prepared[i][0] for i in chunk]))
            for i, enhanced in zip(chunk, out, strict=True):
                results[i] = _from_rgb_float(enhanced, np.asarray(images[i]), prepared[i][1])
    return [r for r in results if r is not None]


# --------------------------------------------------------------------------------------------------
# Image files
# --------------------------------------------------------------------------------------------------
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


class UnreadableImageError(ValueError):
    """A file is not a decodable image."""


def read_image(path: str | os.PathLike[str]) -> np.ndarray:
    """RGB(A) or grey array of ``path`` at its stored bit depth (uint8, or uint16 for 16-bit PNG/TIFF)."""
    import cv2

    data = np.fromfile(str(path), dtype=np.uint8)
    image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if image is None:
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
    ok, encoded = cv2.imencode(path.suffix or ".png", image)
    if not ok:
        raise ValueError(f"cannot encode a {image.dtype} {image.shape} image as {path.suffix or '.png'}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(encoded.tobytes())
    os.replace(tmp, path)
    return path
