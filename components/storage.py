"""One object-store interface over local folders and ``s3://bucket/prefix``.

Every artefact of the pipeline (dataset images, cached priors, checkpoints) goes through this module,
so the rest of the code never branches on where bytes live. Two guarantees hold on both backends:

* writes are atomic: a reader sees the old object or the complete new one, never a partial file
  (temp file + fsync + ``os.replace`` locally, a single PUT on S3);
* reads can be verified: pass the expected ``sha256`` (the catalog stores one for every object) and a
  mismatch raises :class:`IntegrityError`. On S3 the hash is also kept in the object metadata
  (``x-amz-meta-sha256``) and checked on every full read.

S3 uses boto3's standard configuration (environment, profiles, ``AWS_ENDPOINT_URL`` for MinIO or any
S3-compatible store). Transient failures (throttling, 5xx, ``RequestTimeout``, dropped connections) are
retried with exponential backoff; anything else fails at once with the URI in the message.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import random
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any, TypeVar

from components.errors import SKFError

__all__ = [
    "IntegrityError",
    "LocalStorage",
    "S3Storage",
    "Storage",
    "StorageError",
    "local_path",
    "make_s3_client",
    "open_storage",
    "read_uri",
    "s3_client",
    "sha256_bytes",
    "sha256_file",
    "split_s3_uri",
]

_CHUNK = 1 << 20
_TMP_PREFIX = ".skf-tmp-"
T = TypeVar("T")


class IntegrityError(SKFError):
    """Stored content does not match the sha256 it was expected to have."""


class StorageError(SKFError, RuntimeError):
    """A storage operation failed for a reason retrying will not fix (or retries ran out)."""


# --------------------------------------------------------------------------------------------- hashing
def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _check(uri: str, actual: str, expected: str | None) -> None:
    if expected is not None and actual != expected.lower():
        raise IntegrityError(
            f"{uri}: sha256 is {actual}, expected {expected}; the object is corrupt or was replaced"
        )


def _validate_key(key: str) -> str:
    """Keys are relative POSIX paths; anything that could escape the root is rejected."""
    if not isinstance(key, str) or not key:
        raise ValueError(f"storage key must be a non-empty string, got {key!r}")
    if key.startswith("/") or "\\" in key or (len(key) > 1 and key[1] == ":"):
        raise ValueError(f"storage key {key!r} must be relative (no leading '/', no drive, no backslash)")
    parts = key.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"storage key {key!r} must not contain empty, '.' or '..' segments")
    return key


def _validate_prefix(prefix: str) -> str:
    if prefix == "":
        return prefix
    # A prefix may end with '/' (a "folder") but must otherwise be a valid key.
    _validate_key(prefix[:-1] if prefix.endswith("/") else prefix)
    return prefix


# --------------------------------------------------------------------------------------------- local
@contextlib.contextmanager
def _atomic_writer(dest: Path) -> Iterator[IO[bytes]]:
    """Yield a temp file beside ``dest``; on clean exit fsync it and rename it over ``dest``.

    On any exception the temp file is removed and ``dest`` is untouched.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename durable; not possible on every platform
        dir_fd = os.open(dest.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _write_verified(dest: Path, chunks: Iterable[bytes], uri: str, *expected: str | None) -> str:
    """Atomically write ``chunks`` to ``dest``, hashing on the way; a mismatch leaves nothing behind."""
    h = hashlib.sha256()
    with _atomic_writer(dest) as f:
        for chunk in chunks:
            h.update(chunk)
            f.write(chunk)
        for sha in expected:
            _check(uri, h.hexdigest(), sha)
    return h.hexdigest()


def _file_chunks(f: IO[bytes]) -> Iterator[bytes]:
    return iter(lambda: f.read(_CHUNK), b"")


class Storage(ABC):
    """Key/value object store rooted at :attr:`root_uri`; keys are relative POSIX paths."""

    root_uri: str

    @abstractmethod
    def uri_for(self, key: str) -> str:
        """Absolute URI (local path or ``s3://``) of ``key``; what the catalog records."""

    @abstractmethod
    def put_bytes(self, key: str, data: bytes, *, sha256: str | None = None) -> str:
        """Atomically store ``data`` (checked against ``sha256`` first, if given); return its URI."""

    @abstractmethod
    def put_file(self, key: str, path: str | os.PathLike[str]) -> str:
        """Atomically store the file at ``path``; return its URI."""

    @abstractmethod
    def get_bytes(self, key: str, *, sha256: str | None = None) -> bytes:
        """Read the whole object, verifying its hash; ``FileNotFoundError`` if it does not exist."""

    @abstractmethod
    def get_file(self, key: str, dest: str | os.PathLike[str], *, sha256: str | None = None) -> Path:
        """Atomically copy the object to ``dest`` with hash verification; return ``dest``."""

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def list(self, prefix: str = "") -> Iterator[str]:
        """Keys under the root starting with ``prefix`` (plain string prefix, like S3), sorted."""

    @abstractmethod
    def open(self, key: str, mode: str = "rb") -> IO[bytes]:
        """A binary stream for large objects; not hash-verified (use ``get_*`` for verified reads)."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove the object; deleting a missing key is a no-op (as on S3)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.root_uri!r})"


class LocalStorage(Storage):
    """Objects as files under a root folder."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser().resolve()
        self.root_uri = str(self.root)

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*_validate_key(key).split("/"))

    def uri_for(self, key: str) -> str:
        return str(self._path(key))

    def put_bytes(self, key: str, data: bytes, *, sha256: str | None = None) -> str:
        path = self._path(key)
        _check(str(path), sha256_bytes(data), sha256)
        _write_verified(path, [bytes(data)], str(path))
        return str(path)

    def put_file(self, key: str, path: str | os.PathLike[str]) -> str:
        dest = self._path(key)
        with open(path, "rb") as src:
            _write_verified(dest, _file_chunks(src), str(dest))
        return str(dest)

    def get_bytes(self, key: str, *, sha256: str | None = None) -> bytes:
        path = self._path(key)
        try:
            data = path.read_bytes()
        except (FileNotFoundError, IsADirectoryError):
            raise FileNotFoundError(f"{path} does not exist in {self.root_uri}") from None
        _check(str(path), sha256_bytes(data), sha256)
        return data

    def get_file(self, key: str, dest: str | os.PathLike[str], *, sha256: str | None = None) -> Path:
        dest = Path(dest)
        with self.open(key) as src:
            _write_verified(dest, _file_chunks(src), self.uri_for(key), sha256)
        return dest

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str = "") -> Iterator[str]:
        _validate_prefix(prefix)
        # Walk only the deepest folder the prefix pins down, then filter by the string prefix.
        folder = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        start = self.root.joinpath(*folder.split("/")) if folder else self.root
        if not start.is_dir():
            return iter(())
        keys = []
        for dirpath, _dirs, files in os.walk(start):
            rel_dir = Path(dirpath).relative_to(self.root).as_posix()
            for name in files:
                if name.startswith(_TMP_PREFIX):
                    continue
                key = name if rel_dir == "." else f"{rel_dir}/{name}"
                if key.startswith(prefix):
                    keys.append(key)
        return iter(sorted(keys))

    def open(self, key: str, mode: str = "rb") -> IO[bytes]:
        if mode != "rb":
            raise ValueError(f"Storage.open supports only mode 'rb' (writes go through put_*), got {mode!r}")
        path = self._path(key)
        try:
            return open(path, "rb")
        except (FileNotFoundError, IsADirectoryError):
            raise FileNotFoundError(f"{path} does not exist in {self.root_uri}") from None

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------- S3
# Error codes that say "try again later"; botocore retries them too, these names are for our messages.
_TRANSIENT_CODES = frozenset(
    {
        "RequestTimeout",
        "RequestTimeoutException",
        "Throttling",
        "ThrottlingException",
        "SlowDown",
        "RequestLimitExceeded",
        "ServiceUnavailable",
        "InternalError",
        "500",
        "502",
        "503",
        "504",
    }
)
_MISSING_CODES = frozenset({"404", "NoSuchKey", "NotFound"})


def _endpoint_url() -> str | None:
    """Service-specific endpoint first, then the global one (boto3 reads both; we pass it explicitly)."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def make_s3_client(max_attempts: int = 5) -> Any:
    """A new boto3 S3 client from the standard AWS configuration, with botocore's standard retries.

    ``max_attempts`` counts the first try: throttling, 5xx, ``RequestTimeout`` and connection errors
    are retried by botocore with exponential backoff and jitter.
    """
    import boto3
    from botocore.config import Config

    config = Config(
        retries={"total_max_attempts": max_attempts, "mode": "standard"},
        connect_timeout=10,
        read_timeout=60,
    )
    return boto3.session.Session().client("s3", endpoint_url=_endpoint_url(), config=config)


@functools.lru_cache(maxsize=16)
def _shared_client(_env_key: tuple[str | None, ...]) -> Any:
    return make_s3_client()


def s3_client() -> Any:
    """The process-wide S3 client for the current AWS environment (boto3 clients are thread-safe)."""
    env_key = tuple(
        os.environ.get(k)
        for k in (
            "AWS_ENDPOINT_URL_S3",
            "AWS_ENDPOINT_URL",
            "AWS_ACCESS_KEY_ID",
            "AWS_PROFILE",
            "AWS_DEFAULT_REGION",
            "AWS_REGION",
            "AWS_SESSION_TOKEN",
        )
    )
    return _shared_client(env_key)


def _configuration_error(what: str, uri: str, exc: Exception) -> StorageError:
    """A botocore failure that is about the local AWS configuration, as a one-line fix."""
    from botocore.exceptions import NoCredentialsError, NoRegionError, PartialCredentialsError

    if isinstance(exc, NoCredentialsError | PartialCredentialsError):
        return StorageError(
            f"S3 {what} {uri}: no usable AWS credentials ({exc}); set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) for the account that owns the bucket"
        )
    if isinstance(exc, NoRegionError):
        return StorageError(f"S3 {what} {uri}: no AWS region is configured; set AWS_DEFAULT_REGION")
    return StorageError(
        f"S3 {what} {uri} failed ({type(exc).__name__}: {exc}); check the AWS configuration "
        "(credentials, AWS_DEFAULT_REGION, AWS_ENDPOINT_URL)"
    )


def _client_for(root_uri: str) -> Any:
    """The shared S3 client; a configuration it cannot be built from becomes a :class:`StorageError`."""
    from botocore.exceptions import BotoCoreError

    try:
        return s3_client()
    except (BotoCoreError, ValueError) as exc:
        raise StorageError(
            f"cannot create an S3 client for {root_uri}: {exc}; check AWS_ENDPOINT_URL and AWS_DEFAULT_REGION"
        ) from exc


class S3Storage(Storage):
    """Objects under ``s3://bucket/prefix``: single-PUT writes, sha256 in metadata, retried transients.

    ``client`` may be injected (tests, custom sessions); ``retries`` bounds our own retry loop around
    connection-level failures that outlast botocore's retries (e.g. an endpoint restarting).
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        client: Any | None = None,
        retries: int = 3,
        backoff_s: float = 0.5,
    ) -> None:
        if not bucket:
            raise ValueError("S3 storage needs a bucket: s3://bucket[/prefix]")
        prefix = prefix.strip("/")
        if prefix:
            _validate_key(prefix)
        self.bucket = bucket
        self.prefix = f"{prefix}/" if prefix else ""
        self.root_uri = f"s3://{bucket}/{prefix}".rstrip("/")
        self.client = client if client is not None else _client_for(self.root_uri)
        self.retries = retries
        self.backoff_s = backoff_s

    def _key(self, key: str) -> str:
        return self.prefix + _validate_key(key)

    def uri_for(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"

    def _call(self, what: str, uri: str, fn: Callable[[], T]) -> T:
        """Run ``fn`` retrying connection failures with exponential backoff; map errors to clear ones."""
        from botocore.exceptions import BotoCoreError, ClientError, ConnectionError, HTTPClientError

        for attempt in range(self.retries + 1):
            try:
                return fn()
            except (ConnectionError, HTTPClientError) as exc:
                if attempt == self.retries:
                    raise StorageError(
                        f"S3 {what} {uri} failed after {attempt + 1} tries: cannot reach the endpoint "
                        f"({_endpoint_url() or 'AWS default'}): {exc}; check AWS_ENDPOINT_URL and the network"
                    ) from exc
                time.sleep(self.backoff_s * 2**attempt * (1 + random.random() / 2))
            except ClientError as exc:
                raise self._client_error(what, uri, exc) from exc
            except BotoCoreError as exc:  # no credentials, no region, bad parameters: retrying cannot help
                raise _configuration_error(what, uri, exc) from exc
        raise AssertionError("unreachable")

    @staticmethod
    def _client_error(what: str, uri: str, exc: Any) -> Exception:
        err = exc.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        msg = err.get("Message", "") or str(exc)
        if code in _MISSING_CODES or (status == 404 and code not in ("NoSuchBucket",)):
            return FileNotFoundError(f"{uri} does not exist")
        if code == "NoSuchBucket":
            bucket = uri[len("s3://") :].split("/", 1)[0]
            return StorageError(
                f"S3 {what} {uri}: the bucket {bucket!r} does not exist; create it or fix the URI "
                "(SKF_STORAGE_URI, or the s3:// source given)"
            )
        if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            return StorageError(
                f"S3 {what} {uri}: access denied ({code}); check the AWS credentials and policy"
            )
        if code in _TRANSIENT_CODES:
            return StorageError(f"S3 {what} {uri}: still failing after retries ({code}: {msg})")
        return StorageError(f"S3 {what} {uri} failed ({code}: {msg})")

    def put_bytes(self, key: str, data: bytes, *, sha256: str | None = None) -> str:
        uri = self.uri_for(key)
        digest = sha256_bytes(data)
        _check(uri, digest, sha256)
        self._call(
            "put",
            uri,
            lambda: self.client.put_object(
                Bucket=self.bucket, Key=self._key(key), Body=bytes(data), Metadata={"sha256": digest}
            ),
        )
        return uri

    def put_file(self, key: str, path: str | os.PathLike[str]) -> str:
        uri = self.uri_for(key)
        digest = sha256_file(path)

        def upload() -> Any:
            with open(path, "rb") as f:  # reopened per try so a retry re-sends from the start
                return self.client.put_object(
                    Bucket=self.bucket, Key=self._key(key), Body=f, Metadata={"sha256": digest}
                )

        self._call("put", uri, upload)
        return uri

    def get_bytes(self, key: str, *, sha256: str | None = None) -> bytes:
        uri = self.uri_for(key)

        def fetch() -> tuple[bytes, str | None]:
            resp = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
            return resp["Body"].read(), resp.get("Metadata", {}).get("sha256")

        data, stored = self._call("get", uri, fetch)
        digest = sha256_bytes(data)
        _check(uri, digest, sha256)
        _check(uri, digest, stored)
        return data

    def get_file(self, key: str, dest: str | os.PathLike[str], *, sha256: str | None = None) -> Path:
        dest = Path(dest)
        uri = self.uri_for(key)

        def download() -> None:
            resp = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
            stored = resp.get("Metadata", {}).get("sha256")
            _write_verified(dest, resp["Body"].iter_chunks(_CHUNK), uri, sha256, stored)

        self._call("get", uri, download)
        return dest

    def exists(self, key: str) -> bool:
        try:
            uri = self.uri_for(key)
            self._call("head", uri, lambda: self.client.head_object(Bucket=self.bucket, Key=self._key(key)))
        except FileNotFoundError:
            return False
        return True

    def list(self, prefix: str = "") -> Iterator[str]:
        full = self.prefix + _validate_prefix(prefix)
        uri = f"s3://{self.bucket}/{full}"
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": full}
        while True:  # one retried request per page, so a dropped connection does not restart the listing
            page = self._call("list", uri, lambda kw=dict(kwargs): self.client.list_objects_v2(**kw))
            for obj in page.get("Contents", []):
                yield obj["Key"][len(self.prefix) :]
            if not page.get("IsTruncated"):
                return
            kwargs["ContinuationToken"] = page["NextContinuationToken"]

    def open(self, key: str, mode: str = "rb") -> IO[bytes]:
        if mode != "rb":
            raise ValueError(f"Storage.open supports only mode 'rb' (writes go through put_*), got {mode!r}")
        uri = self.uri_for(key)
        resp = self._call("get", uri, lambda: self.client.get_object(Bucket=self.bucket, Key=self._key(key)))
        return resp["Body"]

    def delete(self, key: str) -> None:
        uri = self.uri_for(key)
        self._call("delete", uri, lambda: self.client.delete_object(Bucket=self.bucket, Key=self._key(key)))


# --------------------------------------------------------------------------------------------- entry points
def split_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/key`` -> ``(bucket, key)``."""
    bucket, _, key = uri[len("s3://") :].partition("/")
    return bucket, key


def local_path(uri: str) -> Path:
    """The folder or file a local path or ``file://`` URI names; other schemes are refused."""
    if uri.startswith("file://"):
        from urllib.parse import unquote, urlparse

        return Path(unquote(urlparse(uri).path))
    if "://" in uri:
        raise ValueError(f"unsupported storage URI {uri!r}: use a local path, file:// or s3://bucket/prefix")
    return Path(uri)


def open_storage(uri: str | os.PathLike[str]) -> Storage:
    """Storage rooted at a local path / ``file://`` URI or at ``s3://bucket[/prefix]``."""
    uri = os.fspath(uri)
    if uri.startswith("s3://"):
        return S3Storage(*split_s3_uri(uri))
    return LocalStorage(local_path(uri))


def read_uri(uri: str | os.PathLike[str], *, sha256: str | None = None) -> bytes:
    """Read one object by its full URI (as recorded in the catalog), verifying ``sha256`` if given."""
    uri = os.fspath(uri)
    if uri.startswith("s3://"):
        bucket, key = split_s3_uri(uri)
        return S3Storage(bucket).get_bytes(key, sha256=sha256)
    path = local_path(uri).expanduser().resolve()
    return LocalStorage(path.parent).get_bytes(path.name, sha256=sha256)
