"""Preflight: the services and inputs a ``skf-train`` run needs, checked before any work starts.

Parameter validation (:class:`~components.pipeline.params.SkfTrainParams`) checks what can be checked
without I/O. This module does the cheap I/O that would otherwise fail late: a missing HRNet checkpoint found
only after a full dataset download, an unreachable MLflow server found after training. Each check reads one
small thing (a HEAD request, a one-key listing, a health endpoint); none reads data.
"""

from __future__ import annotations

import os
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from components.errors import SKFError

__all__ = [
    "PreflightError",
    "PreflightReport",
    "check_checkpoint",
    "check_source",
    "check_storage",
    "check_tracking",
    "preflight",
]

TRACKING_TIMEOUT_S = 10.0


class PreflightError(SKFError):
    """A service or input the run needs is missing or unreachable; the message names it and the fix."""


@dataclass(frozen=True)
class PreflightReport:
    """What was checked, one line each, for the run's log."""

    checked: tuple[str, ...]


def _scheme(uri: str) -> str:
    scheme = urllib.parse.urlparse(uri).scheme.lower()
    return "" if len(scheme) <= 1 else scheme  # one letter is a Windows drive


def _s3_parts(uri: str) -> tuple[str, str]:
    bucket, _, key = uri[len("s3://") :].partition("/")
    return bucket, key


def _storage_error(uri: str, exc: Exception) -> PreflightError:
    return PreflightError(str(exc) if isinstance(exc, SKFError) else f"{uri}: {exc}")


def check_checkpoint(uri: str) -> str:
    """The SKB checkpoint exists (a local file or an S3 object); http(s) is left to the download."""
    from components import storage

    scheme = _scheme(uri)
    if scheme in ("http", "https"):
        return f"SKB checkpoint {uri}: fetched at first use (http)"
    if scheme == "s3":
        bucket, key = _s3_parts(uri)
        try:
            store = storage.S3Storage(bucket)
            next(iter(store.list(key)), None)  # HEAD cannot tell a missing bucket from a missing key
            found = bool(key) and store.exists(key)
        except (storage.StorageError, ValueError) as exc:
            raise _storage_error(uri, exc) from exc
        if not found:
            raise PreflightError(
                f"SKB checkpoint {uri} does not exist; upload it there or fix training.skb_checkpoint"
            )
        return f"SKB checkpoint {uri}: present"
    path = Path(urllib.request.url2pathname(urllib.parse.urlparse(uri).path) if scheme == "file" else uri)
    if not path.expanduser().is_file():
        raise PreflightError(
            f"SKB checkpoint {path} is not a file; pass the path of "
            "hrnet_w48_pascal_context_cls59_480x480.pth in training.skb_checkpoint"
        )
    return f"SKB checkpoint {path}: present"


def check_source(uri: str) -> str:
    """The dataset source exists: a local file or folder, or an S3 prefix with at least one object."""
    from components import storage

    if _scheme(uri) == "s3":
        bucket, prefix = _s3_parts(uri)
        try:
            first = next(iter(storage.S3Storage(bucket).list(prefix)), None)
        except (storage.StorageError, ValueError) as exc:
            raise _storage_error(uri, exc) from exc
        if first is None:
            raise PreflightError(
                f"dataset source {uri} holds no objects; upload the dataset or fix the prefix"
            )
        return f"dataset source {uri}: present"
    path = Path(uri).expanduser()
    if not path.exists():
        raise PreflightError(f"dataset source {path} does not exist; fix dataset.source")
    return f"dataset source {path}: present"


def check_storage(uri: str) -> str:
    """The storage root is usable: its bucket exists (S3), or its folder exists or can be created."""
    from components import storage

    if _scheme(uri) == "s3":
        bucket, prefix = _s3_parts(uri)
        try:
            next(iter(storage.S3Storage(bucket).list(prefix)), None)  # NoSuchBucket -> StorageError
        except (storage.StorageError, ValueError) as exc:
            raise _storage_error(uri, exc) from exc
        return f"storage {uri}: bucket {bucket!r} reachable"
    root = Path(urllib.request.url2pathname(urllib.parse.urlparse(uri).path) if _scheme(uri) else uri)
    existing = next((p for p in (root, *root.parents) if p.exists()), None)
    if existing is None or not existing.is_dir() or not os.access(existing, os.W_OK):
        raise PreflightError(
            f"storage {uri}: {existing or root} is not a writable folder; fix SKF_STORAGE_URI or its permissions"
        )
    return f"storage {uri}: writable"


def check_tracking(uri: str, timeout: float = TRACKING_TIMEOUT_S) -> str:
    """The MLflow tracking store answers: a server's ``/health``, or a database connection."""
    scheme = _scheme(uri)
    if scheme in ("http", "https"):
        import httpx

        url = uri.rstrip("/") + "/health"
        try:
            response = httpx.get(url, timeout=timeout)
        except httpx.HTTPError as exc:
            raise PreflightError(
                f"MLflow tracking server {uri} is unreachable ({type(exc).__name__}); start it or fix "
                "MLFLOW_TRACKING_URI"
            ) from exc
        if response.status_code != 200:
            raise PreflightError(
                f"MLflow tracking server {uri} answered {url} with HTTP {response.status_code}; check the "
                "server and MLFLOW_TRACKING_URI"
            )
        return f"MLflow {uri}: healthy"
    if scheme.split("+")[0] in ("postgresql", "mysql", "mssql", "sqlite"):
        import sqlalchemy

        connect_args = {"connect_timeout": int(timeout)} if scheme.startswith(("postgresql", "mysql")) else {}
        engine = sqlalchemy.create_engine(uri, connect_args=connect_args)
        try:
            with engine.connect():
                pass
        except sqlalchemy.exc.SQLAlchemyError as exc:
            safe = sqlalchemy.engine.make_url(uri).render_as_string(hide_password=True)
            raise PreflightError(
                f"MLflow tracking database {safe} is unreachable ({type(exc).__name__}); start it or fix "
                "MLFLOW_TRACKING_URI"
            ) from exc
        finally:
            engine.dispose()
        return f"MLflow {scheme} store: connected"
    return f"MLflow {uri}: local store"


def preflight(
    *,
    source: str | None,
    skb_checkpoint: str | None,
    storage_uri: str,
    tracking_uri: str,
) -> PreflightReport:
    """Run every check that applies; the first failure raises :class:`PreflightError`.

    ``source`` is ``None`` for the generated demo data; ``skb_checkpoint`` is ``None`` when the plan uses no
    SKB or a random one.
    """
    checked = [check_storage(storage_uri), check_tracking(tracking_uri)]
    if source is not None:
        checked.append(check_source(source))
    if skb_checkpoint is not None:
        checked.append(check_checkpoint(skb_checkpoint))
    return PreflightReport(tuple(checked))
