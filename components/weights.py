"""Offline weight files: where the pipeline finds them and how they reach the caches that consume them.

The pipeline never downloads weights from a hub at run time. Files live in one place the operator controls,
``SKF_WEIGHTS_URI`` (a local folder or ``s3://bucket/prefix``), each under its published file name at the
root. :func:`sync_weights` copies them, sha256-verified, into the caches their consumers read:

* pyiqa metric files (NIQE statistics, LPIPS linear layers) -> ``$TORCH_HOME/hub/pyiqa/<name>``;
* torchvision backbones (AlexNet for LPIPS) and the SKB checkpoint -> ``$TORCH_HOME/hub/checkpoints/<name>``.

Cache folders are resolved at call time through :func:`torch.hub.get_dir`, so a ``TORCH_HOME`` changed after
import (tests, a CLI flag) is honoured. :func:`weights_status` reports, for every known file, whether it is
present, where it was looked for and its sha256.

Integrity: files whose name carries a digest prefix (torch hub convention, ``alexnet-owt-7be5be79.pth``)
are checked against it; files with a published full digest (NIQE) against that; a ``<name>.sha256`` sidecar
in the weights store, when present, is honoured for any file; every copy is verified against its source.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from components.settings import get_settings
from components.storage import IntegrityError, LocalStorage, Storage, open_storage, sha256_file

__all__ = [
    "KNOWN_WEIGHTS",
    "WeightSpec",
    "WeightStatus",
    "cache_path",
    "ensure_local",
    "get_spec",
    "sync_weights",
    "torch_hub_dir",
    "weights_status",
]


@dataclass(frozen=True)
class WeightSpec:
    """A weight file the pipeline knows by name."""

    name: str
    purpose: str
    cache: str  # sub-folder of the torch hub dir the consumer reads: "pyiqa" or "checkpoints"
    sha256: str | None = None  # full published digest, when known

    @property
    def sha256_prefix(self) -> str | None:
        """Digest prefix embedded in the file name (``name-<hex>.pth``), torch hub convention."""
        match = re.search(r"-([0-9a-f]{8,64})\.[A-Za-z0-9]+$", self.name)
        return match.group(1) if match else None


KNOWN_WEIGHTS: tuple[WeightSpec, ...] = (
    WeightSpec(
        "niqe_modelparameters.mat",
        "NIQE natural-scene statistics (metric niqe)",
        "pyiqa",
        sha256="3f0d0a895defe4de97df7ecccbc1920a35af0cd54528b5036e649e6fe136850b",
    ),
    WeightSpec("LPIPS_v0.1_alex-df73285e.pth", "LPIPS v0.1 linear layers (metric lpips)", "pyiqa"),
    WeightSpec("alexnet-owt-7be5be79.pth", "AlexNet ImageNet backbone (metric lpips)", "checkpoints"),
    WeightSpec(
        "hrnet_w48_pascal_context_cls59_480x480.pth",
        "SKB: HRNet-W48 PASCAL-Context-59 segmenter",
        "checkpoints",
    ),
)


@dataclass(frozen=True)
class WeightStatus:
    """Where one weight file was found (or not)."""

    name: str
    purpose: str
    present: bool
    path: str | None  # local path or URI where it was found
    sha256: str | None  # of the file found; None if absent or remote and not hashed
    looked_in: tuple[str, ...] = field(default_factory=tuple)
    note: str = ""


def get_spec(name: str) -> WeightSpec:
    for spec in KNOWN_WEIGHTS:
        if spec.name == name:
            return spec
    known = ", ".join(s.name for s in KNOWN_WEIGHTS)
    raise KeyError(f"unknown weight file {name!r}; known: {known}")


def torch_hub_dir() -> Path:
    """``$TORCH_HOME/hub`` as torch resolves it now (not at import time)."""
    import torch.hub

    return Path(torch.hub.get_dir())


def cache_path(spec: WeightSpec | str) -> Path:
    """Where the consumer of ``spec`` expects the file."""
    spec = get_spec(spec) if isinstance(spec, str) else spec
    return torch_hub_dir() / spec.cache / spec.name


def _source_uri(source_uri: str | None) -> str:
    return source_uri if source_uri is not None else get_settings().weights_uri


def _open_source(uri: str) -> tuple[Storage | None, str]:
    """The weights store, or None with the reason it cannot be read."""
    try:
        return open_storage(uri), ""
    except Exception as exc:  # a bad URI must not break status reporting
        return None, f"cannot open {uri}: {exc}"


def _exists(store: Storage | None, key: str) -> tuple[bool, str]:
    if store is None:
        return False, ""
    try:
        return store.exists(key), ""
    except Exception as exc:  # unreachable bucket, missing credentials
        return False, f"cannot read {store.uri_for(key)}: {exc}"


def _expected_digest(spec: WeightSpec, store: Storage) -> str | None:
    """Full digest to verify a copy against: published, else a sidecar, else the local source's own."""
    if spec.sha256:
        return spec.sha256
    sidecar = f"{spec.name}.sha256"
    if store.exists(sidecar):
        text = store.get_bytes(sidecar).decode("ascii", errors="replace").split()
        if text and re.fullmatch(r"[0-9a-f]{64}", text[0]):
            return text[0]
        raise IntegrityError(f"{store.uri_for(sidecar)} does not hold a sha256 hex digest; fix or delete it")
    if isinstance(store, LocalStorage):
        return sha256_file(store.root / spec.name)
    return None


def _check_prefix(spec: WeightSpec, digest: str, where: str) -> None:
    prefix = spec.sha256_prefix
    if prefix and not digest.startswith(prefix):
        raise IntegrityError(
            f"{where}: sha256 {digest} does not start with {prefix}, the digest its name carries; "
            "the file is corrupt or not the published one - replace it with the original"
        )


def _verified(spec: WeightSpec, path: Path) -> tuple[str, str]:
    """(sha256, note) for a local file, the note flagging a mismatch with the published digest."""
    digest = sha256_file(path)
    if spec.sha256 and digest != spec.sha256:
        return digest, f"sha256 differs from the published {spec.sha256[:12]}..."
    if spec.sha256_prefix and not digest.startswith(spec.sha256_prefix):
        return digest, f"sha256 does not start with {spec.sha256_prefix} (its name's digest prefix)"
    return digest, ""


def _status(spec: WeightSpec, store: Storage | None, store_note: str) -> WeightStatus:
    cached = cache_path(spec)
    looked = [str(cached)]
    if store is not None:
        looked.append(store.uri_for(spec.name))
    if cached.is_file():
        digest, note = _verified(spec, cached)
        return WeightStatus(spec.name, spec.purpose, True, str(cached), digest, tuple(looked), note)
    found, note = _exists(store, spec.name)
    note = note or store_note
    if not found:
        return WeightStatus(spec.name, spec.purpose, False, None, None, tuple(looked), note)
    if isinstance(store, LocalStorage):
        digest, note = _verified(spec, store.root / spec.name)
    else:
        digest, note = None, "in the weights store, not cached yet (run `skf weights sync`)"
    return WeightStatus(spec.name, spec.purpose, True, store.uri_for(spec.name), digest, tuple(looked), note)


def weights_status(source_uri: str | None = None, names: Iterable[str] | None = None) -> list[WeightStatus]:
    """Status of every known weight file: cache first, then the weights store (``SKF_WEIGHTS_URI``)."""
    store, store_note = _open_source(_source_uri(source_uri))
    specs = KNOWN_WEIGHTS if names is None else tuple(get_spec(n) for n in names)
    return [_status(spec, store, store_note) for spec in specs]


def _sync_one(spec: WeightSpec, store: Storage) -> WeightStatus:
    dest = cache_path(spec)
    expected = _expected_digest(spec, store)
    if dest.is_file() and expected is not None and sha256_file(dest) == expected:
        status = _status(spec, store, "")
        return WeightStatus(**{**status.__dict__, "note": "already cached"})
    dest.parent.mkdir(parents=True, exist_ok=True)
    store.get_file(spec.name, dest, sha256=expected)  # raises IntegrityError on a mismatch
    digest = sha256_file(dest)
    try:
        _check_prefix(spec, digest, store.uri_for(spec.name))
    except IntegrityError:
        dest.unlink(missing_ok=True)
        raise
    return WeightStatus(
        spec.name, spec.purpose, True, str(dest), digest, (str(dest), store.uri_for(spec.name)), "synced"
    )


def sync_weights(source_uri: str | None = None, names: Iterable[str] | None = None) -> list[WeightStatus]:
    """Copy every known file present in the weights store into its cache, verified; report all files.

    Files absent from the store are left alone (reported as they stand). A digest mismatch raises
    :class:`~components.storage.IntegrityError` naming the file, and leaves no partial copy behind.
    """
    uri = _source_uri(source_uri)
    store = open_storage(uri)
    specs = KNOWN_WEIGHTS if names is None else tuple(get_spec(n) for n in names)
    out = []
    for spec in specs:
        if store.exists(spec.name):
            out.append(_sync_one(spec, store))
        else:
            out.append(_status(spec, store, ""))
    return out


def ensure_local(name: str, source_uri: str | None = None) -> tuple[Path | None, tuple[str, ...]]:
    """Local path of ``name`` in its cache, copying it from the weights store first if needed.

    Returns ``(path, looked_in)``; ``path`` is None when the file is nowhere to be found, so callers can
    report the metric as unavailable and say where they looked.
    """
    spec = get_spec(name)
    dest = cache_path(spec)
    if dest.is_file():
        return dest, (str(dest),)
    uri = _source_uri(source_uri)
    store, _ = _open_source(uri)
    looked = (str(dest), store.uri_for(name) if store is not None else uri)
    found, _ = _exists(store, name)
    if not found:
        return None, looked
    _sync_one(spec, store)
    return dest, looked
