"""Storage: one contract over local folders and S3 (real boto3 HTTP calls to moto on loopback)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from components.storage import (
    IntegrityError,
    LocalStorage,
    S3Storage,
    Storage,
    StorageError,
    make_s3_client,
    open_storage,
    read_uri,
    sha256_bytes,
    sha256_file,
)


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    if request.param == "local":
        return open_storage(tmp_path / "store")
    bucket = request.getfixturevalue("s3_env")
    return open_storage(f"s3://{bucket}/runs/p1")


# ----------------------------------------------------------------------------------------- contract
def test_round_trip_bytes_and_files(store: Storage, tmp_path: Path) -> None:
    data = os.urandom(3000)
    uri = store.put_bytes("images/a/low.png", data)
    assert uri == store.uri_for("images/a/low.png")
    assert uri.startswith(store.root_uri) and uri.endswith("images/a/low.png")
    assert store.get_bytes("images/a/low.png") == data
    assert store.get_bytes("images/a/low.png", sha256=sha256_bytes(data)) == data
    assert read_uri(uri, sha256=sha256_bytes(data)) == data

    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(5000))
    store.put_file("ckpt/model.pt", src)
    dest = store.get_file("ckpt/model.pt", tmp_path / "out" / "model.pt", sha256=sha256_file(src))
    assert dest.read_bytes() == src.read_bytes()
    with store.open("ckpt/model.pt") as f:
        assert f.read() == src.read_bytes()

    store.put_bytes("images/a/low.png", b"replaced")  # overwrite is allowed and complete
    assert store.get_bytes("images/a/low.png") == b"replaced"


def test_hash_mismatch_raises_and_writes_nothing(store: Storage, tmp_path: Path) -> None:
    store.put_bytes("x.bin", b"payload")
    wrong = sha256_bytes(b"other")
    with pytest.raises(IntegrityError, match="x.bin"):
        store.get_bytes("x.bin", sha256=wrong)
    dest = tmp_path / "dl" / "x.bin"
    with pytest.raises(IntegrityError):
        store.get_file("x.bin", dest, sha256=wrong)
    assert not dest.exists()
    assert [p.name for p in dest.parent.iterdir()] == []  # no temp file left either
    with pytest.raises(IntegrityError):
        store.put_bytes("y.bin", b"payload", sha256=wrong)
    assert not store.exists("y.bin")


def test_list_exists_delete(store: Storage) -> None:
    for key in ("a/1", "a/2", "a/sub/3", "ab", "b/4"):
        store.put_bytes(key, key.encode())
    assert list(store.list()) == ["a/1", "a/2", "a/sub/3", "ab", "b/4"]
    assert list(store.list("a/")) == ["a/1", "a/2", "a/sub/3"]
    assert list(store.list("a")) == ["a/1", "a/2", "a/sub/3", "ab"]  # a string prefix, as on S3
    assert list(store.list("zzz/")) == []
    assert store.exists("a/1") and not store.exists("a/9") and not store.exists("a")
    store.delete("a/1")
    store.delete("a/1")  # idempotent
    assert not store.exists("a/1")
    assert "a/1" not in list(store.list())
    with pytest.raises(FileNotFoundError, match="a/1"):
        store.get_bytes("a/1")
    with pytest.raises(FileNotFoundError, match="a/1"):
        store.open("a/1")


@pytest.mark.parametrize("key", ["../escape", "a/../../b", "/abs/path", "a//b", "./a", "", "c:\\x"])
def test_unsafe_keys_rejected(store: Storage, key: str) -> None:
    with pytest.raises(ValueError, match="key"):
        store.put_bytes(key, b"x")


def test_open_is_read_only(store: Storage) -> None:
    store.put_bytes("k", b"v")
    with pytest.raises(ValueError, match="rb"):
        store.open("k", "wb")


# ----------------------------------------------------------------------------------------- local
def test_local_write_failure_leaves_old_content_and_no_partial_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = LocalStorage(tmp_path / "s")
    store.put_bytes("d/f.bin", b"old")

    def disk_full(_fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space"):
        store.put_bytes("d/f.bin", b"new content that never lands")
    with pytest.raises(OSError, match="No space"):
        store.put_bytes("d/g.bin", b"brand new")
    monkeypatch.undo()
    assert sorted(p.name for p in (tmp_path / "s" / "d").iterdir()) == ["f.bin"]
    assert store.get_bytes("d/f.bin") == b"old"


def test_local_list_skips_in_flight_temp_files(tmp_path: Path) -> None:
    store = LocalStorage(tmp_path)
    store.put_bytes("k/real", b"1")
    (tmp_path / "k" / ".skf-tmp-abc123").write_bytes(b"partial")
    assert list(store.list()) == ["k/real"]


def test_open_storage_and_read_uri_forms(tmp_path: Path) -> None:
    (tmp_path / "f.txt").write_bytes(b"hello")
    assert isinstance(open_storage(tmp_path), LocalStorage)
    assert open_storage(tmp_path.as_uri()).get_bytes("f.txt") == b"hello"
    assert read_uri((tmp_path / "f.txt").as_uri()) == b"hello"
    assert read_uri(str(tmp_path / "f.txt"), sha256=sha256_bytes(b"hello")) == b"hello"
    with pytest.raises(IntegrityError):
        read_uri(tmp_path / "f.txt", sha256="0" * 64)
    with pytest.raises(ValueError, match="s3://"):
        open_storage("gs://bucket/x")


# ----------------------------------------------------------------------------------------- S3
@pytest.fixture()
def bucket(s3_env: str) -> str:
    return s3_env


@pytest.fixture()
def attempts() -> list[str]:
    return []


def _count_sends(client: object, log: list[str]) -> None:
    client.meta.events.register("before-send.s3", lambda request, **_: log.append(request.method))  # type: ignore[attr-defined]


@pytest.mark.s3
def test_s3_client_uses_standard_aws_config(bucket: str, s3_endpoint: str) -> None:
    client = make_s3_client()
    assert client.meta.endpoint_url == s3_endpoint
    assert client.meta.config.retries == {"total_max_attempts": 5, "mode": "standard"}
    assert open_storage(f"s3://{bucket}").root_uri == f"s3://{bucket}"


@pytest.mark.s3
def test_s3_sha256_in_metadata_verified_on_read(bucket: str, tmp_path: Path) -> None:
    store = S3Storage(bucket, "p")
    store.put_bytes("obj", b"good")
    head = store.client.head_object(Bucket=bucket, Key="p/obj")
    assert head["Metadata"] == {"sha256": sha256_bytes(b"good")}
    # Someone replaces the bytes behind our back, keeping the old metadata: every full read notices.
    store.client.put_object(Bucket=bucket, Key="p/obj", Body=b"evil", Metadata=head["Metadata"])
    with pytest.raises(IntegrityError, match="s3://"):
        store.get_bytes("obj")
    with pytest.raises(IntegrityError):
        store.get_file("obj", tmp_path / "obj")
    assert not (tmp_path / "obj").exists()
    with pytest.raises(IntegrityError):
        read_uri(f"s3://{bucket}/p/obj")
    # Objects written by other tools (no metadata) still read, and verify when a hash is given.
    store.client.put_object(Bucket=bucket, Key="p/plain", Body=b"plain")
    assert store.get_bytes("plain") == b"plain"
    with pytest.raises(IntegrityError):
        store.get_bytes("plain", sha256=sha256_bytes(b"x"))


@pytest.mark.s3
def test_s3_list_paginates(bucket: str, attempts: list[str]) -> None:
    store = S3Storage(bucket, client=make_s3_client())
    keys = [f"k/{i:02d}" for i in range(7)]
    for k in keys:
        store.put_bytes(k, b"x")
    pages = []

    def small_pages(params: dict, **_: object) -> None:
        params["MaxKeys"] = 3
        pages.append(params.get("ContinuationToken"))

    store.client.meta.events.register("before-parameter-build.s3.ListObjectsV2", small_pages)
    assert list(store.list("k/")) == keys
    assert len(pages) == 3 and pages[0] is None and all(pages[1:])


def _flaky(failures: int, exc_factory, log: list[str]):  # type: ignore[no-untyped-def]
    def handler(request, **_):  # type: ignore[no-untyped-def]
        log.append(request.method)
        if len(log) <= failures:
            raise exc_factory(request)
        return None

    return handler


def _canned(status: int, code: str, failures: int, log: list[str]):  # type: ignore[no-untyped-def]
    """A before-send handler answering the first ``failures`` requests with an S3 error response."""
    from botocore.awsrequest import AWSResponse

    class _Raw:
        def __init__(self, body: bytes) -> None:
            self.body = body

        def stream(self, **_: object):  # type: ignore[no-untyped-def]
            yield self.body

    body = f"<?xml version='1.0'?><Error><Code>{code}</Code><Message>injected</Message></Error>".encode()

    def handler(request, **_):  # type: ignore[no-untyped-def]
        log.append(request.method)
        if len(log) <= failures:
            return AWSResponse(request.url, status, {"Content-Type": "application/xml"}, _Raw(body))
        return None

    return handler


@pytest.mark.s3
def test_s3_transient_5xx_retried_by_botocore(bucket: str, attempts: list[str]) -> None:
    store = S3Storage(bucket, client=make_s3_client(max_attempts=3))
    store.client.meta.events.register("before-send.s3", _canned(503, "SlowDown", 1, attempts))
    store.put_bytes("k", b"v")
    assert attempts == ["PUT", "PUT"]
    assert store.get_bytes("k") == b"v"

    attempts.clear()
    down = S3Storage(bucket, client=make_s3_client(max_attempts=2))
    down.client.meta.events.register("before-send.s3", _canned(500, "InternalError", 99, attempts))
    with pytest.raises(StorageError, match=rf"s3://{bucket}/k: still failing after retries \(InternalError"):
        down.get_bytes("k")
    assert attempts == ["GET", "GET"]


@pytest.mark.s3
def test_s3_connection_error_retried(bucket: str, attempts: list[str]) -> None:
    from botocore.exceptions import EndpointConnectionError

    def drop(request):  # type: ignore[no-untyped-def]
        return EndpointConnectionError(endpoint_url=request.url)

    # botocore's own retries are off here, so only our wrapper can recover from the two failures.
    store = S3Storage(bucket, client=make_s3_client(max_attempts=1), retries=3, backoff_s=0.01)
    store.client.meta.events.register("before-send.s3", _flaky(2, drop, attempts))
    store.put_bytes("k", b"v")
    assert attempts == ["PUT"] * 3
    assert store.get_bytes("k") == b"v"

    attempts.clear()
    dead = S3Storage(bucket, client=make_s3_client(max_attempts=1), retries=2, backoff_s=0.01)
    dead.client.meta.events.register("before-send.s3", _flaky(99, drop, attempts))
    with pytest.raises(StorageError, match=rf"s3://{bucket}/k failed after 3 tries"):
        dead.get_bytes("k")
    assert len(attempts) == 3


@pytest.mark.s3
def test_s3_non_transient_errors_fail_at_once(bucket: str, attempts: list[str]) -> None:
    missing = S3Storage(f"{bucket}-missing", client=make_s3_client())
    _count_sends(missing.client, attempts)
    with pytest.raises(
        StorageError, match=rf"s3://{bucket}-missing/k: the bucket '{bucket}-missing' does not exist"
    ):
        missing.put_bytes("k", b"v")
    assert attempts == ["PUT"]

    attempts.clear()
    store = S3Storage(bucket, client=make_s3_client())
    _count_sends(store.client, attempts)
    with pytest.raises(FileNotFoundError, match=rf"s3://{bucket}/nope"):
        store.get_bytes("nope")
    assert attempts == ["GET"]

    attempts.clear()
    denied = S3Storage(bucket, client=make_s3_client())
    denied.client.meta.events.register("before-send.s3", _canned(403, "AccessDenied", 99, attempts))
    with pytest.raises(StorageError, match=rf"s3://{bucket}/k: access denied"):
        denied.put_bytes("k", b"v")
    assert attempts == ["PUT"]
