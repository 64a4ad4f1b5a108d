"""Preflight: the services and inputs a ``skf-train`` run needs, checked before any work starts.

Parameter validation (:class:`~components.pipeline.params.SkfTrainParams`) checks what can be checked
without I/O. This module does the cheap I/O that would otherwise fail late: a missing HRNet checkpoint found
only after a full dataset download, an unreachable MLflow server found after training. Each check reads one
small thing (a HEAD request, a one-key listing, a health endpoint); none reads data.
"""

from __future__ import annotations

import os
import urllib.parse
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


def _first_s3_key(uri: str) -> tuple[str, str, str | None]:
    """``(bucket, key, the first stored key starting with key)``; one listing request, which (unlike a HEAD)
    tells a missing bucket (a :class:`PreflightError` naming it) from a missing object."""
    from components import storage

    bucket, key = storage.split_s3_uri(uri)
    try:
        return bucket, key, next(iter(storage.S3Storage(bucket).list(key)), None)
    except (storage.StorageError, ValueError) as exc:
        raise PreflightError(str(exc) if isinstance(exc, SKFError) else f"{uri}: {exc}") from exc


def check_checkpoint(uri: str) -> str:
    """The SKB checkpoint exists (a local file or an S3 object); http(s) is left to the download."""
    from components.storage import local_path

    scheme = _scheme(uri)
    if scheme in ("http", "https"):
        return f"SKB checkpoint {uri}: fetched at first use (http)"
    if scheme == "s3":
        _, key, first = _first_s3_key(uri)
        if not key or first != key:  # a listing is sorted: the key itself comes before longer ones
            raise PreflightError(
                f"SKB checkpoint {uri} does not exist; upload it there or fix training.skb_checkpoint"
            )
        return f"SKB checkpoint {uri}: present"
    path = local_path(uri) if scheme == "file" else Path(uri)
    if not path.expanduser().is_file():
        raise PreflightError(
            f"SKB checkpoint {path} is not a file; pass the path of "
            "hrnet_w48_pascal_context_cls59_480x480.pth in training.skb_checkpoint"
        )
    return f"SKB checkpoint {path}: present"


def check_source(uri: str) -> str:
    """The dataset source exists: a local file or folder, or an S3 prefix with at least one object."""
    if _scheme(uri) == "s3":
        if _first_s3_key(uri)[2] is None:
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
    from components.storage import local_path

    if _scheme(uri) == "s3":
        bucket, _, _ = _first_s3_key(uri)  # NoSuchBucket -> PreflightError
        return f"storage {uri}: bucket {bucket!r} reachable"
    try:
        root = local_path(uri)
    except ValueError as exc:  # a scheme no storage backend serves
        raise PreflightError(f"{exc}; fix SKF_STORAGE_URI") from exc
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
