"""A trained scene segmenter on disk and in MLflow: ``segmenter.safetensors`` + ``segmenter.json``.

Why this format: nothing is unpickled (safetensors holds tensors only; the JSON holds the architecture,
class names, dataset version, input transform and the weights' sha256), and the JSON says exactly which
weights belong to it.

Trust: the segmenter is first-party (trained and registered by this project), so it is not pinned in
``components/weights.py`` like third-party files; instead its bytes must hash to the sha256 recorded when
it was trained:

* ``models:/<name>@<alias>`` / ``models:/<name>/<n>``: the ``skf.segmenter.sha256`` tag of the model
  version, held by the MLflow tracking store (not the artifact store), which must also equal the tag on
  the run that produced it and the digest in the JSON;
* a run id or ``runs:/<run id>[/segmenter]``: the run's tag, then the JSON;
* a local folder or ``.safetensors`` file: the JSON beside it (this catches a swapped or damaged file,
  not someone who can rewrite both), or ``expected_sha256`` when the caller pins one.

The weights are read once into memory, hashed, and decoded from those same bytes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor, nn

from components.errors import SKFError
from components.storage import IntegrityError, sha256_bytes
from components.weights import SHA256_HEX
from models.hrnet import HRNetConfig, hrnet_w48_lite_config

__all__ = [
    "ARTIFACT_PATH",
    "FORMAT",
    "NUM_CLASSES",
    "SCENE_SEGMENTER_SPEC",
    "SHA_TAG",
    "SPEC_FILE",
    "WEIGHTS_FILE",
    "LoadedSegmenter",
    "SegmenterFiles",
    "SegmenterIntegrityError",
    "SegmenterPackageError",
    "architecture",
    "load_state",
    "read_segmenter",
    "save_segmenter",
]

SCENE_SEGMENTER_SPEC = "skb/scene-segmenter@1"
NUM_CLASSES = 59  # the W48 SKB's logit channels: label ids 0..K-1 are trained, the rest never win
SPEC_FILE = "segmenter.json"
WEIGHTS_FILE = "segmenter.safetensors"
ARTIFACT_PATH = "segmenter"  # the run artifact folder and the registered version's source
SHA_TAG = "skf.segmenter.sha256"
FORMAT = 1
_RUN_ID = re.compile(r"[0-9a-f]{32}")


class SegmenterPackageError(SKFError, ValueError):
    """A segmenter checkpoint is missing, unreadable, or not a ``skf train-skb`` package."""


class SegmenterIntegrityError(IntegrityError):
    """The segmenter weights do not hash to the sha256 recorded for them: refused, not used."""


def architecture() -> HRNetConfig:
    """The one architecture ``skb/scene-segmenter@1`` has: HRNet-W48-lite with 59 logit channels."""
    return hrnet_w48_lite_config(NUM_CLASSES)


@dataclasses.dataclass(frozen=True)
class SegmenterFiles:
    """Where :func:`save_segmenter` wrote a package, and the sha256 of its weights file."""

    directory: Path
    spec_path: Path
    weights_path: Path
    sha256: str


@dataclasses.dataclass(frozen=True)
class LoadedSegmenter:
    """A verified package: its tensors, its JSON spec, the weights' sha256 and where it came from."""

    state_dict: dict[str, Tensor]
    spec: dict[str, Any]
    sha256: str
    source: str

    @property
    def classes(self) -> tuple[str, ...]:
        return tuple(self.spec["classes"])

    @property
    def input_transform(self) -> str:
        return str(self.spec["input_transform"])


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------
def _write_atomic(path: Path, data: bytes) -> None:
    """Temp file + rename, so a reader never sees half a file under the final name."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def save_segmenter(
    model: nn.Module, directory: str | os.PathLike[str], meta: Mapping[str, Any]
) -> SegmenterFiles:
    """Write ``model``'s weights as safetensors and the JSON spec (``meta`` plus what loading checks).

    ``meta`` must hold ``classes`` (names of label ids 0..K-1) and ``input_transform``; anything else
    (dataset version, config hash, metrics) is recorded as given.
    """
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    data = save_safetensors(state, metadata={"format": "skf-segmenter", "spec": SCENE_SEGMENTER_SPEC})
    digest = sha256_bytes(data)
    spec = {
        **meta,
        "format": FORMAT,
        "spec": SCENE_SEGMENTER_SPEC,
        "architecture": {"name": architecture().name, "config": architecture().to_dict()},
        "num_classes": NUM_CLASSES,
        "weights_file": WEIGHTS_FILE,
        "weights_sha256": digest,
    }
    _check_spec(spec, str(out / SPEC_FILE))
    _write_atomic(out / WEIGHTS_FILE, data)
    _write_atomic(out / SPEC_FILE, (json.dumps(spec, indent=2, sort_keys=True) + "\n").encode())
    return SegmenterFiles(out, out / SPEC_FILE, out / WEIGHTS_FILE, digest)


# --------------------------------------------------------------------------------------------------
# Reading and verifying
# --------------------------------------------------------------------------------------------------
def _check_spec(spec: Any, where: str) -> dict[str, Any]:
    """The JSON spec, checked to describe this component's architecture; else a one-line error."""
    from components.skb import INPUT_TRANSFORMS

    def bad(why: str) -> SegmenterPackageError:
        return SegmenterPackageError(
            f"{where}: {why}; it is not a package written by `skf train-skb` for {SCENE_SEGMENTER_SPEC} "
            "(retrain with `skf train-skb NAME@V`)"
        )

    if not isinstance(spec, dict) or spec.get("format") != FORMAT:
        raise bad(f"unknown format {spec.get('format') if isinstance(spec, dict) else spec!r}")
    if spec.get("spec") != SCENE_SEGMENTER_SPEC:
        raise bad(f"it is for {spec.get('spec')!r}")
    try:
        arch = HRNetConfig.from_dict(spec["architecture"]["config"])
    except (KeyError, TypeError, ValueError) as exc:
        raise bad(f"unreadable architecture ({exc})") from None
    if arch != architecture():
        raise bad("its architecture is not HRNet-W48-lite with 59 classes")
    classes = spec.get("classes")
    if not (
        isinstance(classes, list)
        and 1 <= len(classes) <= NUM_CLASSES
        and all(isinstance(c, str) for c in classes)
    ):
        raise bad(f"'classes' must list 1..{NUM_CLASSES} class names, got {classes!r}")
    if spec.get("input_transform") not in INPUT_TRANSFORMS:
        raise bad(f"unknown input_transform {spec.get('input_transform')!r}")
    if not SHA256_HEX.fullmatch(str(spec.get("weights_sha256", ""))):
        raise bad("it records no weights_sha256")
    return spec


def _read_package(
    folder: Path, label: str, expected: str | None, authority: str = "pinned by the caller (expected_sha256)"
) -> LoadedSegmenter:
    """Read the JSON and the weights of ``folder``; the bytes must hash to ``expected`` (which ``authority``
    recorded) when given, and to the digest in the JSON."""
    spec_path, weights_path = folder / SPEC_FILE, folder / WEIGHTS_FILE
    for path in (spec_path, weights_path):
        if not path.is_file():
            raise SegmenterPackageError(
                f"{label}: {path.name} is missing (a segmenter package is {SPEC_FILE} + {WEIGHTS_FILE}); "
                "pass the folder or model URI written by `skf train-skb`"
            )
    try:
        spec = json.loads(spec_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SegmenterPackageError(
            f"{label}: {SPEC_FILE} is not valid JSON ({exc}); retrain or restore it"
        ) from None
    spec = _check_spec(spec, f"{label} ({SPEC_FILE})")
    data = weights_path.read_bytes()
    digest = sha256_bytes(data)
    for want, who in (
        (expected, authority),
        (spec["weights_sha256"], f"in {SPEC_FILE}"),
    ):
        if want is not None and digest != want:
            raise SegmenterIntegrityError(
                f"{label}: {WEIGHTS_FILE} has sha256 {digest}, not the {want} {who}; refused, not used -- the "
                "file was changed or damaged after training: restore it or retrain with `skf train-skb`"
            )
    return LoadedSegmenter(_decode(data, label), spec, digest, label)


def _decode(data: bytes, label: str) -> dict[str, Tensor]:
    try:
        return dict(load_safetensors(data))
    except (SafetensorError, ValueError) as exc:
        raise SegmenterPackageError(
            f"{label}: {WEIGHTS_FILE} is not a readable safetensors file ({exc})"
        ) from None


def _local(path: Path, expected: str | None) -> LoadedSegmenter:
    """A folder holding the package, or its ``.safetensors`` file (the JSON must sit beside it)."""
    if path.is_dir():
        return _read_package(path, str(path), expected)
    if path.is_file() and path.suffix == ".safetensors":
        if path.name != WEIGHTS_FILE:
            raise SegmenterPackageError(
                f"{path}: a segmenter weights file is named {WEIGHTS_FILE} with {SPEC_FILE} beside it; "
                "pass the folder written by `skf train-skb`"
            )
        return _read_package(path.parent, str(path), expected)
    if path.is_file():
        raise SegmenterPackageError(
            f"{path}: not a segmenter package (expected a folder with {SPEC_FILE} + {WEIGHTS_FILE}); "
            "pickled .pt/.pth checkpoints are not accepted for this SKB"
        )
    raise SegmenterPackageError(
        f"segmenter checkpoint {path} does not exist; pass models:/<name>@<alias>, a run id, or the folder "
        "written by `skf train-skb`"
    )


@contextlib.contextmanager
def _downloaded(artifact_uri: str) -> Iterator[Path]:
    """A temporary local copy of an MLflow artifact folder, removed afterwards."""
    import mlflow

    with tempfile.TemporaryDirectory(prefix="skf-segmenter-") as tmp:
        try:
            local = mlflow.artifacts.download_artifacts(artifact_uri=artifact_uri, dst_path=tmp)
        except Exception as exc:  # MLflow and storage errors alike: the package cannot be fetched
            reason = " ".join(str(exc).split())[:300] or type(exc).__name__
            raise SegmenterPackageError(
                f"cannot download the segmenter package {artifact_uri}: {reason}; check the run and MLflow"
            ) from exc
        yield Path(local)


def _run_digest(client: Any, run_id: str, uri: str) -> str:
    """The sha256 the run recorded for its segmenter; a run without one is not a segmenter run."""
    from components.model_registry import check_model_uri

    check_model_uri(client, f"runs:/{run_id}")  # a missing run: one line naming it
    digest = client.get_run(run_id).data.tags.get(SHA_TAG)
    if not digest:
        raise SegmenterPackageError(
            f"{uri}: run {run_id} has no {SHA_TAG} tag, so it did not train a segmenter; pass a run of `skf train-skb`"
        )
    return digest


def _from_model_uri(uri: str, expected: str | None) -> LoadedSegmenter:
    from components.model_registry import check_model_uri
    from components.tracking import mlflow_client

    client = mlflow_client()
    version = check_model_uri(client, uri)
    digest = (version.tags or {}).get(SHA_TAG) if version is not None else None
    if not digest:
        raise SegmenterPackageError(
            f"{uri} is not a scene segmenter registered by `skf train-skb` (its version has no {SHA_TAG} tag)"
        )
    if version.run_id and _run_digest(client, version.run_id, uri) != digest:
        raise SegmenterIntegrityError(
            f"{uri}: the model version records sha256 {digest} but its run {version.run_id} records another; "
            "refused -- the registry was edited: register the segmenter again with `skf train-skb`"
        )
    _agree(digest, expected, uri)
    with _downloaded(version.source) as folder:
        return _read_package(folder, uri, digest, "recorded in MLflow for this model version")


def _from_run(run_id: str, uri: str, path: str, expected: str | None) -> LoadedSegmenter:
    from components.tracking import mlflow_client

    client = mlflow_client()
    digest = _run_digest(client, run_id, uri)
    _agree(digest, expected, uri)
    with _downloaded(f"runs:/{run_id}/{path}") as folder:
        return _read_package(folder, uri, digest, f"recorded in MLflow on run {run_id}")


def _agree(recorded: str, expected: str | None, uri: str) -> None:
    if expected is not None and expected.lower() != recorded:
        raise SegmenterIntegrityError(
            f"{uri}: MLflow records sha256 {recorded} for this segmenter, not the expected {expected.lower()}; refused"
        )


def read_segmenter(
    checkpoint: str | os.PathLike[str], *, expected_sha256: str | None = None
) -> LoadedSegmenter:
    """The verified package behind ``checkpoint``: ``models:/...``, a run id, ``runs:/<id>[/path]``, or a
    local folder / ``segmenter.safetensors`` (see the module docstring for what each is checked against)."""
    text = os.fspath(checkpoint).strip()
    expected = expected_sha256.lower() if expected_sha256 else None
    if text.startswith("models:/"):
        return _from_model_uri(text, expected)
    if text.startswith("runs:/"):
        run_id, _, path = text[len("runs:/") :].partition("/")
        return _from_run(run_id, text, path.strip("/") or ARTIFACT_PATH, expected)
    if _RUN_ID.fullmatch(text) and not Path(text).exists():
        return _from_run(text, text, ARTIFACT_PATH, expected)
    if "://" in text and not text.startswith("file://"):
        raise SegmenterPackageError(
            f"unsupported segmenter checkpoint {text!r}: pass models:/<name>@<alias>, models:/<name>/<n>, a run "
            "id, runs:/<run id>, or a local folder"
        )
    return _local(Path(text.removeprefix("file://")).expanduser(), expected)


def load_state(model: nn.Module, loaded: LoadedSegmenter) -> None:
    """Strictly load a verified package into an HRNet-W48-lite (every key and shape must match)."""
    from components.checkpoints import load_strict

    load_strict(model, loaded.state_dict, source=loaded.source)
