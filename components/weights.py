"""Offline weight files: where the pipeline finds them, and how they reach the caches -- verified first.

The pipeline never downloads weights from a hub at run time. Files live in one place the operator controls,
``SKF_WEIGHTS_URI`` (a local folder or ``s3://bucket/prefix``), each under its published file name at the
root. :func:`sync_weights` copies them into the caches their consumers read:

* pyiqa metric files (NIQE statistics, LPIPS linear layers) -> ``$TORCH_HOME/hub/pyiqa/<name>``;
* the AlexNet backbone of LPIPS and the SKB checkpoint -> ``$TORCH_HOME/hub/checkpoints/<name>``.

Small files the project may redistribute ship inside the package (:data:`BUNDLED_DIR`, today NIQE's
statistics): they are the fallback when the store lacks them, so NIQE works on a fresh offline clone. They
pass the same verification as any other copy.

Integrity rule (the weights store is *not* trusted): a file is placed in a cache, or handed to a library,
only if its full sha256 equals a digest pinned outside the store --

* in this module (:data:`KNOWN_WEIGHTS`) for files with an independently published digest, or
* by the operator (``SKF_PIN_SHA256="name=<hex>[,name=<hex>]"`` or ``skf weights sync --sha256 name=<hex>``)
  for files without one (the HRNet SKB checkpoint). An operator pin cannot override a code pin.

No pin means no copy (deny by default). Name digest prefixes (``-7be5be79``) and ``.sha256`` sidecars in the
store are ignored: both are forgeable by whoever can write the store. A copy is verified before it is renamed
into place, and a cached file that fails verification is removed and reported, never used.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from components.errors import SKFError, UserInputError
from components.settings import get_settings
from components.storage import IntegrityError, LocalStorage, Storage, open_storage, sha256_bytes, sha256_file

__all__ = [
    "BUNDLED_DIR",
    "KNOWN_WEIGHTS",
    "PIN_ENV",
    "UnknownWeightError",
    "UnpinnedWeightError",
    "WeightIntegrityError",
    "WeightSpec",
    "WeightStatus",
    "WeightsStoreError",
    "cache_path",
    "ensure_local",
    "expected_sha256",
    "get_spec",
    "operator_pins",
    "parse_pins",
    "pinned_sha256",
    "read_verified",
    "store_problem",
    "sync_weights",
    "torch_hub_dir",
    "weights_status",
]

PIN_ENV = "SKF_PIN_SHA256"
BUNDLED_DIR = Path(__file__).resolve().parent / "evaluation" / "assets"
_CHUNK = 1 << 20
#: A full sha256 as this project writes and accepts it: 64 lowercase hex digits.
SHA256_HEX = re.compile(r"[0-9a-f]{64}")


class WeightIntegrityError(IntegrityError):
    """A weight file is not the pinned one (or cannot be checked): it was refused, not used."""

    rows: list[WeightStatus]

    def __init__(self, message: str, rows: list[WeightStatus] | None = None) -> None:
        super().__init__(message)
        self.rows = rows or []


class UnpinnedWeightError(WeightIntegrityError):
    """No sha256 is pinned for a file, so it cannot be verified and is not placed (deny by default)."""


class UnknownWeightError(UserInputError, KeyError):
    """A weight file name the pipeline does not know (a KeyError too, as before)."""


class WeightsStoreError(SKFError):
    """The weights store (``SKF_WEIGHTS_URI``) cannot be read at all."""


@dataclass(frozen=True)
class WeightSpec:
    """A weight file the pipeline knows by name, with its published full sha256 when one exists."""

    name: str
    purpose: str
    cache: str  # sub-folder of the torch hub dir the consumer reads: "pyiqa" or "checkpoints"
    sha256: str | None = None  # full published digest; None: the operator must pin it
    size: int | None = None  # published size in bytes, for messages
    bundled: bool = False  # a copy ships in BUNDLED_DIR (used when the weights store lacks the file)


KNOWN_WEIGHTS: tuple[WeightSpec, ...] = (
    WeightSpec(
        "niqe_modelparameters.mat",
        "NIQE natural-scene statistics (metric niqe)",
        "pyiqa",
        sha256="3f0d0a895defe4de97df7ecccbc1920a35af0cd54528b5036e649e6fe136850b",
        size=10_928,
        bundled=True,
    ),
    WeightSpec(
        "LPIPS_v0.1_alex-df73285e.pth",
        "LPIPS v0.1 linear layers (metric lpips)",
        "pyiqa",
        sha256="df73285e35b22355a2df87cdb6b70b343713b667eddbda73e1977e0c860835c0",
        size=6_009,
    ),
    WeightSpec(
        "alexnet-owt-7be5be79.pth",
        "AlexNet ImageNet backbone (metric lpips)",
        "checkpoints",
        sha256="7be5be791159472b1fbf3c69796f7cb30dca7ad8466c2df70058c37116cdee02",
        size=244_408_911,
    ),
    WeightSpec(
        "hrnet_w48_pascal_context_cls59_480x480.pth",
        "SKB: HRNet-W48 PASCAL-Context-59 segmenter",
        "checkpoints",
    ),
)


@dataclass(frozen=True)
class WeightStatus:
    """Where one weight file was found (or not), and whether it passed verification."""

    name: str
    purpose: str
    present: bool
    path: str | None  # local path or URI where it was found
    sha256: str | None  # of the file found; None if absent or remote and not hashed
    looked_in: tuple[str, ...] = field(default_factory=tuple)
    note: str = ""
    refused: bool = False  # failed verification (or has no pin) and was not used


# ------------------------------------------------------------------------------------------------ pins
def get_spec(name: str) -> WeightSpec:
    for spec in KNOWN_WEIGHTS:
        if spec.name == name:
            return spec
    known = ", ".join(s.name for s in KNOWN_WEIGHTS)
    raise UnknownWeightError(f"unknown weight file {name!r}; known: {known}")


def parse_pins(entries: Iterable[str], source: str) -> dict[str, str]:
    """``name=<64 hex>`` entries (commas or whitespace between them) as a dict; bad ones raise."""
    pins: dict[str, str] = {}
    for entry in (e for text in entries for e in re.split(r"[,\s]+", text) if e):
        name, _, digest = entry.partition("=")
        digest = digest.strip().lower()
        if not SHA256_HEX.fullmatch(digest):
            raise UserInputError(f"{source}: {entry!r} is not name=<64 hex digits>; give the full sha256")
        pins[get_spec(name.strip()).name] = digest
    return pins


def operator_pins(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Pins set by the operator: ``$SKF_PIN_SHA256``, then ``extra`` (CLI ``--sha256``) on top."""
    pins = parse_pins([os.environ.get(PIN_ENV, "")], PIN_ENV)
    pins.update({get_spec(k).name: v.lower() for k, v in (extra or {}).items()})
    for name, digest in pins.items():
        published = get_spec(name).sha256
        if published and digest != published:
            raise UserInputError(
                f"{name}: operator pin {digest} contradicts the published sha256 {published} pinned in "
                f"components/weights.py; remove it from {PIN_ENV} / --sha256"
            )
    return pins


def pinned_sha256(name: str, pins: Mapping[str, str] | None = None) -> str | None:
    """The full sha256 ``name`` must have (code pin, else operator pin), or None when nothing pins it.

    An operator pin that contradicts a code pin is an error: the published digest is the only valid one.
    """
    spec = get_spec(name)
    return spec.sha256 or operator_pins(pins).get(spec.name)


def expected_sha256(spec: WeightSpec, pins: Mapping[str, str] | None = None) -> str:
    """The pinned digest of ``spec``; :class:`UnpinnedWeightError` when there is none (deny by default)."""
    digest = pinned_sha256(spec.name, pins)
    if digest is None:
        raise UnpinnedWeightError(
            f"{spec.name}: no sha256 is pinned, so it is not trusted (the weights store cannot vouch for "
            f"itself); check the file against a source you trust, then pin it: `skf weights sync --sha256 "
            f"{spec.name}=<sha256>` or {PIN_ENV}={spec.name}=<sha256>"
        )
    return digest


def _mismatch(spec: WeightSpec, where: str, actual: str, expected: str, size: int | None) -> str:
    """One line: which file, expected vs actual digest, and what to do."""
    want = f"{expected}" + (f" ({spec.size:,} bytes)" if spec.size else "")
    got = f"{actual}" + (f" ({size:,} bytes)" if size is not None else "")
    return (
        f"{where}: sha256 {got} is not the pinned {want}; refused, not used -- the file is corrupt or was "
        f"replaced: put the published {spec.name} in SKF_WEIGHTS_URI and run `skf weights sync`"
    )


# ------------------------------------------------------------------------------------------------ paths
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


# ------------------------------------------------------------------------------------------------ store
def _open_store(uri: str) -> Storage:
    """The weights store, checked readable: a missing folder or bucket is an error, not an empty store."""
    try:
        store = open_storage(uri)
    except Exception as exc:  # bad URI, unusable AWS configuration
        raise WeightsStoreError(f"cannot open the weights store {uri}: {exc}; fix SKF_WEIGHTS_URI") from exc
    if isinstance(store, LocalStorage):
        if not store.root.is_dir():
            raise WeightsStoreError(
                f"weights folder {store.root} does not exist; create it and put the weight files there, "
                "or point SKF_WEIGHTS_URI / --source at the right folder"
            )
        return store
    try:
        next(iter(store.list("")), None)  # one listing request: reachability, credentials, bucket
    except Exception as exc:
        raise WeightsStoreError(
            f"cannot read the weights store {uri}: {_one_line(exc)}; check the URI, AWS credentials and "
            "AWS_ENDPOINT_URL"
        ) from exc
    return store


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _try_open_store(uri: str) -> tuple[Storage | None, str]:
    try:
        return _open_store(uri), ""
    except WeightsStoreError as exc:
        return None, str(exc)


# ------------------------------------------------------------------------------------------------ verify
def _verify_file(spec: WeightSpec, path: Path, expected: str) -> str:
    """sha256 of ``path``; :class:`WeightIntegrityError` naming it when it is not ``expected``."""
    digest = sha256_file(path)
    if digest != expected:
        raise WeightIntegrityError(_mismatch(spec, str(path), digest, expected, path.stat().st_size))
    return digest


def _evict_if_bad(spec: WeightSpec, expected: str) -> str | None:
    """Remove a cached copy that fails verification; the reason, or None if the cache is clean."""
    dest = cache_path(spec)
    if not dest.is_file():
        return None
    try:
        _verify_file(spec, dest, expected)
    except WeightIntegrityError as exc:
        dest.unlink(missing_ok=True)
        return f"{exc} (removed from the cache)"
    return None


def read_verified(name: str, source_uri: str | None = None) -> bytes:
    """The bytes of ``name``, hashed in memory after reading: what is returned is exactly what was verified.

    Use this instead of a path when the bytes are decoded right away, so the file cannot change between
    the check and the load.
    """
    path, looked = ensure_local(name, source_uri)
    if path is None:
        raise FileNotFoundError(f"{name} not found (looked in {', '.join(looked)})")
    spec = get_spec(name)
    expected = expected_sha256(spec)
    data = path.read_bytes()
    digest = sha256_bytes(data)
    if digest != expected:
        raise WeightIntegrityError(_mismatch(spec, str(path), digest, expected, len(data)))
    return data


# ------------------------------------------------------------------------------------------------ status
def _store_has(store: Storage, spec: WeightSpec) -> tuple[bool, str]:
    try:
        return store.exists(spec.name), ""
    except Exception as exc:  # an object-level failure after the store itself answered
        return False, f"cannot read {store.uri_for(spec.name)}: {_one_line(exc)}"


def _check_note(spec: WeightSpec, path: Path, pins: Mapping[str, str] | None) -> tuple[str, str, bool]:
    """(sha256, note, refused) for a local file, judged against its pin."""
    digest = sha256_file(path)
    try:
        expected = expected_sha256(spec, pins)
    except UnpinnedWeightError:
        return digest, f"no sha256 pinned: not verified, will not be synced (pin it with {PIN_ENV})", True
    if digest != expected:
        return digest, f"REFUSED: sha256 is not the pinned {expected[:16]}...", True
    return digest, "verified", False


def _status(
    spec: WeightSpec, store: Storage | None, store_note: str, pins: Mapping[str, str] | None
) -> WeightStatus:
    cached = cache_path(spec)
    looked = (str(cached), store.uri_for(spec.name)) if store is not None else (str(cached),)
    if cached.is_file():
        digest, note, refused = _check_note(spec, cached, pins)
        return WeightStatus(spec.name, spec.purpose, True, str(cached), digest, looked, note, refused)
    found, note = _store_has(store, spec) if store is not None else (False, store_note)
    if not found and _bundled(spec) is not None:
        bundled = BUNDLED_DIR / spec.name
        digest, check, refused = _check_note(spec, bundled, pins)
        note = f"bundled with the project, not cached yet: {check}"
        return WeightStatus(spec.name, spec.purpose, True, str(bundled), digest, looked, note, refused)
    if not found:
        return WeightStatus(spec.name, spec.purpose, False, None, None, looked, note)
    assert store is not None
    where = store.uri_for(spec.name)
    if isinstance(store, LocalStorage):
        digest, note, refused = _check_note(spec, store.root / spec.name, pins)
        note = f"in the weights store, not cached yet: {note}"
        return WeightStatus(spec.name, spec.purpose, True, where, digest, looked, note, refused)
    note = "in the weights store, not cached yet (run `skf weights sync`)"
    return WeightStatus(spec.name, spec.purpose, True, where, None, looked, note)


def store_problem(source_uri: str | None = None) -> str:
    """Why the weights store cannot be read (one line), or "" when it answers."""
    return _try_open_store(_source_uri(source_uri))[1]


def _specs(names: Iterable[str] | None) -> tuple[WeightSpec, ...]:
    return KNOWN_WEIGHTS if names is None else tuple(get_spec(n) for n in names)


def weights_status(
    source_uri: str | None = None, names: Iterable[str] | None = None, pins: Mapping[str, str] | None = None
) -> list[WeightStatus]:
    """Status of every known weight file (cache first, then the store); never raises for the store.

    An unreadable store is probed once, and its one-line reason becomes every absent file's note.
    """
    store, store_note = _try_open_store(_source_uri(source_uri))
    return [_status(spec, store, store_note, pins) for spec in _specs(names)]


# ------------------------------------------------------------------------------------------------ sync
def _copy_verified(spec: WeightSpec, store: Storage, expected: str) -> None:
    """Copy ``spec`` from the store into its cache through a temp file that is hashed before the rename.

    On a mismatch the temp file is deleted, so the cache never holds an unverified copy under its name.
    """
    dest = cache_path(spec)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=".skf-tmp-", dir=dest.parent)
    tmp, digest, size = Path(tmp_name), hashlib.sha256(), 0
    try:
        try:
            with os.fdopen(fd, "wb") as out, store.open(spec.name) as src:
                for chunk in iter(lambda: src.read(_CHUNK), b""):
                    out.write(chunk)
                    digest.update(chunk)
                    size += len(chunk)
        except Exception as exc:  # OS, storage and botocore errors raised while streaming the body
            raise WeightsStoreError(f"cannot copy {store.uri_for(spec.name)}: {_one_line(exc)}") from exc
        if digest.hexdigest() != expected:
            where = store.uri_for(spec.name)
            raise WeightIntegrityError(_mismatch(spec, where, digest.hexdigest(), expected, size))
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def _sync_one(spec: WeightSpec, store: Storage, pins: Mapping[str, str] | None) -> WeightStatus:
    """Verify the cached copy, else copy a verified one from the store; refusals raise."""
    dest, where = cache_path(spec), store.uri_for(spec.name)
    looked = (str(dest), where)
    in_store, note = _store_has(store, spec)
    if note:
        raise WeightsStoreError(note)
    if not in_store and _bundled(spec) is not None:
        store, in_store, where = _bundled(spec), True, str(BUNDLED_DIR / spec.name)
        looked = (*looked, where)
    if not in_store and not dest.is_file():
        return WeightStatus(spec.name, spec.purpose, False, None, None, looked)
    if not in_store and spec.sha256 is None and pinned_sha256(spec.name, pins) is None:
        return _status(spec, store, "", pins)  # unpinned file already cached: reported, left alone
    expected = expected_sha256(spec, pins)
    evicted = _evict_if_bad(spec, expected)
    if evicted is None and dest.is_file():
        return WeightStatus(spec.name, spec.purpose, True, str(dest), expected, looked, "already cached")
    if not in_store:
        raise WeightIntegrityError(f"{evicted}; no copy in {where} to replace it with")
    _copy_verified(spec, store, expected)
    note = "synced" + (" (replaced a cached copy that failed verification)" if evicted else "")
    return WeightStatus(spec.name, spec.purpose, True, str(dest), expected, looked, note)


def _refusal(spec: WeightSpec, store: Storage, exc: WeightIntegrityError) -> WeightStatus:
    looked = (str(cache_path(spec)), store.uri_for(spec.name))
    return WeightStatus(spec.name, spec.purpose, False, None, None, looked, f"REFUSED: {exc}", True)


def sync_weights(
    source_uri: str | None = None, names: Iterable[str] | None = None, pins: Mapping[str, str] | None = None
) -> list[WeightStatus]:
    """Bring every known file in the store into its cache, verified against its pin; report all files.

    Every file is tried; if any was refused (digest mismatch, no pin, bad cached copy) a
    :class:`WeightIntegrityError` naming each refused file is raised at the end, with the per-file rows
    in ``.rows``. A missing or unreadable store raises :class:`WeightsStoreError`.
    """
    operator_pins(pins)  # a contradicting or malformed pin is an error before anything is touched
    store = _open_store(_source_uri(source_uri))
    rows: list[WeightStatus] = []
    errors: list[WeightIntegrityError] = []
    for spec in _specs(names):
        try:
            rows.append(_sync_one(spec, store, pins))
        except WeightIntegrityError as exc:
            rows.append(_refusal(spec, store, exc))
            errors.append(exc)
    if errors:
        kinds = {type(e) for e in errors}
        cls = kinds.pop() if len(kinds) == 1 else WeightIntegrityError
        raise cls(" | ".join(str(e) for e in errors), rows)
    return rows


def _bundled(spec: WeightSpec) -> Storage | None:
    """The package's own folder as a store, for a file that ships with the project (None otherwise)."""
    if spec.bundled and (BUNDLED_DIR / spec.name).is_file():
        return LocalStorage(BUNDLED_DIR)
    return None


def ensure_local(name: str, source_uri: str | None = None) -> tuple[Path | None, tuple[str, ...]]:
    """Local, verified path of ``name`` in its cache, copying it from the weights store first if needed.

    Returns ``(path, looked_in)``; ``path`` is None when the file is nowhere to be found. A cached copy that
    fails verification is removed; with no good copy in the store that raises :class:`WeightIntegrityError`.
    """
    spec = get_spec(name)
    expected = expected_sha256(spec)
    dest = cache_path(spec)
    evicted = _evict_if_bad(spec, expected)
    if evicted is None and dest.is_file():
        return dest, (str(dest),)
    uri = _source_uri(source_uri)
    store, _ = _try_open_store(uri)
    looked = (str(dest), store.uri_for(name) if store is not None else uri)
    found = store is not None and _store_has(store, spec)[0]
    if not found and _bundled(spec) is not None:
        store, found = _bundled(spec), True
    if not found:
        if evicted:
            raise WeightIntegrityError(f"{evicted}; no copy in {looked[1]} to replace it with")
        return None, looked
    _copy_verified(spec, store, expected)
    return dest, looked
