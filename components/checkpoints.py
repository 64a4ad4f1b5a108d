"""Loading weights safely: from a path, ``s3://`` or ``http(s)://``, hash-checked and strictly.

Every load goes through ``torch.load(..., weights_only=True)`` so a checkpoint can never run code, and
:func:`load_strict` refuses partial loads: the official SKF code silently keeps random weights for
keys it did not find (docs/method.md §2.1 and §10.7); here a mismatch is an error that names the keys.
"""

from __future__ import annotations

import fnmatch
import hashlib
import io
import logging
import os
import pickle
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from components.errors import SKFError

log = logging.getLogger(__name__)

DEFAULT_STRIP_PREFIXES: tuple[str, ...] = ("module.", "model.")
DEFAULT_IGNORE: tuple[str, ...] = ("loss.*",)
DEFAULT_ALLOW_MISSING: tuple[str, ...] = ("*num_batches_tracked",)
_CHUNK = 1 << 20


class CheckpointError(SKFError, RuntimeError):
    """A checkpoint could not be fetched, verified or decoded."""


class ChecksumMismatchError(CheckpointError):
    """The content's sha256 differs from the expected one."""


class StateDictMismatchError(CheckpointError):
    """A state dict does not cover the model exactly (missing, unexpected or mis-shaped keys)."""

    def __init__(self, missing: list[str], unexpected: list[str], mismatched: list[str], source: str = ""):
        self.missing, self.unexpected, self.mismatched = missing, unexpected, mismatched
        where = f" from {source}" if source else ""
        parts = [f"state dict{where} does not match the model"]
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
            if keys:
                shown = ", ".join(keys[:20]) + (f", ... ({len(keys) - 20} more)" if len(keys) > 20 else "")
                parts.append(f"{len(keys)} {label} key(s): {shown}")
        parts.append("check that the checkpoint belongs to this architecture/configuration")
        super().__init__("; ".join(parts))


@dataclass(frozen=True)
class LoadedCheckpoint:
    """A decoded checkpoint: its tensors, the sha256 of the file and where it came from."""

    state_dict: dict[str, Tensor]
    sha256: str
    source: str
    extra: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------
# Fetching
# --------------------------------------------------------------------------------------------------
def _check_hash(actual: str, expected: str | None, source: str) -> None:
    if expected is not None and actual.lower() != expected.lower():
        raise ChecksumMismatchError(
            f"sha256 mismatch for {source}: expected {expected.lower()}, got {actual}; "
            "the file is corrupt or not the checkpoint you meant (delete any cached copy and re-fetch)"
        )


def _sha256_path(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def default_cache_dir() -> Path:
    """``$SKF_HOME/cache/checkpoints`` -- where downloaded checkpoints are kept."""
    from components.settings import get_settings

    return get_settings().home / "cache" / "checkpoints"


def _download(url: str, cache_dir: Path, expected_sha256: str | None, timeout: float) -> tuple[Path, str]:
    """Fetch ``url`` into ``cache_dir`` (temp file + atomic rename); reuse a verified cached copy."""
    parsed = urllib.parse.urlparse(url)
    name = Path(urllib.parse.unquote(parsed.path)).name or "checkpoint.pth"
    target_dir = cache_dir / hashlib.sha256(url.encode()).hexdigest()[:16]
    target = target_dir / name
    if target.is_file():
        digest = _sha256_path(target)
        if expected_sha256 is None or digest == expected_sha256.lower():
            log.debug("using cached checkpoint %s for %s", target, url)
            return target, digest
        log.warning("cached %s does not match the expected sha256; downloading %s again", target, url)

    target_dir.mkdir(parents=True, exist_ok=True)
    request = urllib.request.Request(url, headers={"User-Agent": "skf-pipeline"})
    fd, tmp_name = tempfile.mkstemp(prefix=f".{name}.", suffix=".part", dir=target_dir)
    tmp = Path(tmp_name)
    try:
        digest = hashlib.sha256()
        received = 0
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(request, timeout=timeout) as resp:
            length = resp.headers.get("Content-Length")
            for chunk in iter(lambda: resp.read(_CHUNK), b""):
                out.write(chunk)
                digest.update(chunk)
                received += len(chunk)
        if length is not None and received != int(length):
            raise CheckpointError(f"download of {url} was truncated: got {received} of {length} bytes")
        actual = digest.hexdigest()
        _check_hash(actual, expected_sha256, url)
        os.replace(tmp, target)
        log.info("downloaded %s (%d bytes) to %s", url, received, target)
        return target, actual
    except urllib.error.HTTPError as exc:
        raise CheckpointError(f"download of {url} failed: HTTP {exc.code} {exc.reason}") from exc
    except urllib.error.URLError as exc:
        raise CheckpointError(
            f"cannot reach {url}: {exc.reason}; download the file yourself and pass its local path"
        ) from exc
    except (TimeoutError, ConnectionError) as exc:
        raise CheckpointError(
            f"download of {url} was interrupted: {exc!r}; retry or use a local copy"
        ) from exc
    finally:
        tmp.unlink(missing_ok=True)


def fetch_bytes_or_path(
    uri: str | os.PathLike[str],
    *,
    expected_sha256: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    timeout: float = 60.0,
) -> tuple[Path | bytes, str]:
    """Resolve ``uri`` to a local file (paths, http(s) downloads) or bytes (s3), plus its sha256."""
    text = os.fspath(uri)
    scheme = urllib.parse.urlparse(text).scheme.lower()
    if scheme in ("http", "https"):
        return _download(
            text, Path(cache_dir) if cache_dir else default_cache_dir(), expected_sha256, timeout
        )
    if scheme == "s3":
        from components import storage

        try:
            data = storage.read_uri(text, sha256=expected_sha256)
        except storage.IntegrityError as exc:
            raise ChecksumMismatchError(f"sha256 mismatch for {text}: {exc}") from exc
        except FileNotFoundError as exc:
            raise CheckpointError(f"checkpoint {text} does not exist") from exc
        digest = hashlib.sha256(data).hexdigest()
        _check_hash(digest, expected_sha256, text)
        return data, digest
    if scheme == "file":
        text = urllib.request.url2pathname(urllib.parse.urlparse(text).path)
    elif scheme and len(scheme) > 1:  # one letter is a Windows drive
        raise CheckpointError(
            f"unsupported checkpoint URI scheme {scheme!r} in {text!r}: use a path, s3:// or https://"
        )
    path = Path(text).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"checkpoint {path} does not exist (pass a local path, s3:// or https:// URI)"
        )
    digest = _sha256_path(path)
    _check_hash(digest, expected_sha256, str(path))
    return path, digest


# --------------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------------
def _torch_load(source: Path | bytes, label: str) -> Any:
    handle: Any = io.BytesIO(source) if isinstance(source, bytes) else source
    try:
        return torch.load(handle, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"refused to load {label}: it is not a weights-only checkpoint (it pickles Python objects "
            f"beyond tensors, which could run code). Re-save its state_dict only. Detail: {exc}"
        ) from exc
    except Exception as exc:  # truncated or arbitrary bytes fail anywhere in the unpickler
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"{label} is not a readable torch checkpoint ({type(exc).__name__}: {detail}); check that the "
            "file is complete (compare its sha256 with the published one) or download it again"
        ) from exc


def strip_prefixes(
    state_dict: Mapping[str, Any], prefixes: Iterable[str] = DEFAULT_STRIP_PREFIXES
) -> dict[str, Any]:
    """Remove wrapper prefixes (``module.`` of DataParallel, ``model.`` of HRNet's FullModel), in order."""
    out = dict(state_dict)
    for prefix in prefixes:
        out = {(k[len(prefix) :] if k.startswith(prefix) else k): v for k, v in out.items()}
    return out


def extract_state_dict(
    obj: Any,
    *,
    nested_key: str | None = "state_dict",
    prefixes: Iterable[str] = DEFAULT_STRIP_PREFIXES,
    source: str = "checkpoint",
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The tensor mapping inside a decoded checkpoint (descending into ``nested_key``), plus the rest."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{source} holds a {type(obj).__name__}, expected a mapping of tensors")
    extra: dict[str, Any] = {}
    if nested_key and isinstance(obj.get(nested_key), Mapping):
        extra = {k: v for k, v in obj.items() if k != nested_key}
        obj = obj[nested_key]
    bad = [k for k, v in obj.items() if not isinstance(v, Tensor)]
    if bad:
        raise CheckpointError(
            f"{source} has non-tensor entries {bad[:10]}; expected a state dict (optionally under {nested_key!r})"
        )
    return strip_prefixes(obj, prefixes), extra


def load_checkpoint(
    uri: str | os.PathLike[str],
    *,
    expected_sha256: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    nested_key: str | None = "state_dict",
    prefixes: Iterable[str] = DEFAULT_STRIP_PREFIXES,
) -> LoadedCheckpoint:
    """Fetch, verify and decode a checkpoint into a prefix-stripped state dict with its sha256."""
    source, digest = fetch_bytes_or_path(uri, expected_sha256=expected_sha256, cache_dir=cache_dir)
    label = os.fspath(uri)
    state_dict, extra = extract_state_dict(
        _torch_load(source, label), nested_key=nested_key, prefixes=prefixes, source=label
    )
    return LoadedCheckpoint(state_dict=state_dict, sha256=digest, source=label, extra=extra)


def load_state_dict_from_uri(
    uri: str | os.PathLike[str],
    *,
    expected_sha256: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> dict[str, Tensor]:
    """State dict at ``uri`` (path, ``s3://``, ``http(s)://``), with ``state_dict`` nesting and
    ``module.``/``model.`` prefixes removed."""
    return load_checkpoint(uri, expected_sha256=expected_sha256, cache_dir=cache_dir).state_dict


# --------------------------------------------------------------------------------------------------
# Strict loading
# --------------------------------------------------------------------------------------------------
def _matches(key: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(key, p) for p in patterns)


def load_strict(
    model: nn.Module,
    state_dict: Mapping[str, Tensor],
    *,
    ignore: Iterable[str] = DEFAULT_IGNORE,
    allow_missing: Iterable[str] = DEFAULT_ALLOW_MISSING,
    source: str = "",
) -> int:
    """Load ``state_dict`` into ``model`` only if it covers every model key with the right shape.

    ``ignore``: glob patterns of checkpoint keys to drop (e.g. ``loss.*`` of HRNet's FullModel);
    ``allow_missing``: model keys that may be absent (BN ``num_batches_tracked`` counters, which old
    checkpoints lack and which do not affect outputs). Returns the number of tensors loaded.
    """
    ignore, allow_missing = tuple(ignore), tuple(allow_missing)
    wanted = model.state_dict()
    given = {k: v for k, v in state_dict.items() if not _matches(k, ignore)}
    missing = sorted(k for k in wanted if k not in given and not _matches(k, allow_missing))
    unexpected = sorted(k for k in given if k not in wanted)
    mismatched = sorted(
        f"{k} (checkpoint {tuple(given[k].shape)} vs model {tuple(v.shape)})"
        for k, v in wanted.items()
        if k in given and given[k].shape != v.shape
    )
    if missing or unexpected or mismatched:
        raise StateDictMismatchError(missing, unexpected, mismatched, source)
    result = model.load_state_dict(given, strict=False)
    assert not result.unexpected_keys and all(_matches(k, allow_missing) for k in result.missing_keys)
    return len(given)
