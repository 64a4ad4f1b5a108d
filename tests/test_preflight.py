"""Preflight: a missing checkpoint, bucket or source, or an unreachable MLflow, fails before any work."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest

from components.pipeline.preflight import (
    PreflightError,
    check_checkpoint,
    check_source,
    check_storage,
    check_tracking,
    preflight,
)
from tests.conftest import free_port
from tests.pipeline_fixtures import WorkCounter, install_work_spies, make_tiny_dataset, tiny_params


class _Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()
        self.wfile.write(b"OK")

    def log_message(self, *args: object) -> None:
        return


@pytest.fixture()
def health_server() -> Iterator[str]:
    """A real HTTP server on loopback answering ``/health`` like an MLflow server."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


# --------------------------------------------------------------------------------------------------
# Each check
# --------------------------------------------------------------------------------------------------
def test_local_checkpoint_and_source(tmp_path: Path) -> None:
    ckpt = tmp_path / "hrnet.pth"
    with pytest.raises(PreflightError, match=f"SKB checkpoint {ckpt} is not a file; pass the path"):
        check_checkpoint(str(ckpt))
    ckpt.write_bytes(b"weights")
    assert "present" in check_checkpoint(str(ckpt)) and "present" in check_checkpoint(ckpt.as_uri())
    with pytest.raises(PreflightError, match=r"dataset source .*nowhere does not exist; fix dataset.source"):
        check_source(str(tmp_path / "nowhere"))
    assert "present" in check_source(str(tmp_path))


def test_s3_checkpoint_source_and_storage(s3_env: str) -> None:
    bucket = s3_env
    boto3.client("s3").put_object(Bucket=bucket, Key="weights/hrnet.pth", Body=b"w")
    boto3.client("s3").put_object(Bucket=bucket, Key="raw/lol/our485/low/1.png", Body=b"p")
    assert "present" in check_checkpoint(f"s3://{bucket}/weights/hrnet.pth")
    with pytest.raises(
        PreflightError, match=f"SKB checkpoint s3://{bucket}/weights/other.pth does not exist"
    ):
        check_checkpoint(f"s3://{bucket}/weights/other.pth")
    assert "present" in check_source(f"s3://{bucket}/raw/lol")
    with pytest.raises(PreflightError, match=f"dataset source s3://{bucket}/raw/lol-v2 holds no objects"):
        check_source(f"s3://{bucket}/raw/lol-v2")
    assert "reachable" in check_storage(f"s3://{bucket}/store")
    for check in (check_storage, check_source, check_checkpoint):
        with pytest.raises(PreflightError, match="the bucket 'no-such-bucket' does not exist; create it"):
            check("s3://no-such-bucket/some/key")


def test_local_storage_must_be_a_writable_folder(tmp_path: Path) -> None:
    assert "writable" in check_storage(str(tmp_path / "new" / "store"))  # created on first write
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(PreflightError, match="is not a writable folder; fix SKF_STORAGE_URI"):
        check_storage(str(blocker / "store"))


def test_tracking_server_health(health_server: str) -> None:
    assert "healthy" in check_tracking(health_server)
    with pytest.raises(PreflightError, match=r"answered .*/nope/health with HTTP 404"):
        check_tracking(health_server + "/nope")
    down = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(PreflightError, match=f"MLflow tracking server {down} is unreachable"):
        check_tracking(down, timeout=2)


def test_tracking_database(postgres_url: str, tmp_path: Path) -> None:
    assert "connected" in check_tracking(postgres_url)
    bad = f"postgresql+psycopg2://skf:secret@127.0.0.1:{free_port()}/mlflow"
    with pytest.raises(PreflightError, match=r"tracking database .*127\.0\.0\.1.* is unreachable") as err:
        check_tracking(bad, timeout=2)
    assert "secret" not in str(err.value)  # the password is never printed
    assert "local store" in check_tracking((tmp_path / "mlruns").as_uri())


def test_preflight_runs_every_check_that_applies(tmp_path: Path, health_server: str) -> None:
    report = preflight(
        source=str(tmp_path),
        skb_checkpoint=None,
        storage_uri=str(tmp_path / "store"),
        tracking_uri=health_server,
    )
    assert len(report.checked) == 3 and any("MLflow" in line for line in report.checked)
    with pytest.raises(PreflightError, match="SKB checkpoint"):
        preflight(
            source=None,
            skb_checkpoint=str(tmp_path / "missing.pth"),
            storage_uri=str(tmp_path / "store"),
            tracking_uri=health_server,
        )


# --------------------------------------------------------------------------------------------------
# Through the flow
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_dataset(tmp_path_factory.mktemp("tiny-preflight") / "data")


def test_a_missing_checkpoint_fails_skf_train_before_ingest(
    prefect_harness: None,
    skf_home: Path,
    tiny_dataset: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import flows.ingest
    from flows.pipeline import skf_train

    work = install_work_spies(monkeypatch)
    ingested: list[str] = []
    monkeypatch.setattr(flows.ingest, "ingest", lambda source, **_: ingested.append(source))
    missing = tmp_path / "hrnet_w48_pascal_context_cls59_480x480.pth"
    params = tiny_params(tiny_dataset, training={"skb_checkpoint": str(missing)})
    with pytest.raises(PreflightError, match=f"SKB checkpoint {missing} is not a file"):
        skf_train(params=params)
    assert ingested == [] and work == WorkCounter()


def test_an_unreachable_tracking_server_fails_skf_train_before_ingest(
    prefect_harness: None,
    skf_home: Path,
    tiny_dataset: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import flows.ingest
    from flows.pipeline import skf_train

    ingested: list[str] = []
    monkeypatch.setattr(flows.ingest, "ingest", lambda source, **_: ingested.append(source))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    with pytest.raises(PreflightError, match="MLflow tracking server .* is unreachable"):
        skf_train(params=tiny_params(tiny_dataset))
    assert ingested == []
