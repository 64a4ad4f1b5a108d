"""Shared fixtures: isolated SKF_HOME, a loopback S3 endpoint, PostgreSQL, a Prefect test harness."""

from __future__ import annotations

import logging
import os
import socket
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

# Must precede any prefect/mlflow/pyiqa import made by the modules under test.
_SESSION_DIR = Path(tempfile.mkdtemp(prefix="skf-tests-"))
os.environ.setdefault("PREFECT_HOME", str(_SESSION_DIR / "prefect"))
os.environ.setdefault("TORCH_HOME", str(_SESSION_DIR / "torch"))
# A session-private MLflow store for any test that does not choose one (MLflow's own default would be a
# ./mlflow.db in the checkout).
os.environ.setdefault("MLFLOW_TRACKING_URI", (_SESSION_DIR / "mlruns").as_uri())
os.environ.update(
    {
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "true",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "MLFLOW_ALLOW_FILE_STORE": "true",
        "PREFECT_LOGGING_LEVEL": os.environ.get("PREFECT_LOGGING_LEVEL", "WARNING"),
    }
)
for _k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
    os.environ.pop(_k, None)

REPO_ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def skf_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private SKF_HOME with SQLite catalog, local store and file MLflow under ``tmp_path``."""
    from tests.pipeline_fixtures import use_home

    return use_home(monkeypatch, tmp_path / "skf-home")


@pytest.fixture()
def catalog(tmp_path: Path):
    """A SQLite catalog under ``tmp_path`` (modules that test other databases define their own)."""
    from components.catalog import open_catalog

    return open_catalog(f"sqlite:///{tmp_path / 'catalog.db'}")


@pytest.fixture()
def storage(tmp_path: Path):
    """A local object store under ``tmp_path``."""
    from components.storage import open_storage

    return open_storage(tmp_path / "store")


@pytest.fixture()
def weights_dirs(skf_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """An empty torch cache (``TORCH_HOME``) and weights folder (``SKF_WEIGHTS_URI``), read at call time."""
    torch_home = tmp_path / "torch"
    store = tmp_path / "weights"
    store.mkdir()
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    monkeypatch.setenv("SKF_WEIGHTS_URI", str(store))
    return {"torch_home": torch_home, "store": store}


@pytest.fixture()
def unbundled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Hide the weight files bundled with the package, so only the cache and the store can supply them."""
    from components import weights

    empty = tmp_path / "no-bundled-weights"
    empty.mkdir()
    monkeypatch.setattr(weights, "BUNDLED_DIR", empty)
    return empty


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A real S3 HTTP endpoint (moto's threaded server) on loopback, for real boto3 calls."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # per-request lines leak into captured stderr
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture()
def s3_env(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Standard AWS configuration pointing at the loopback endpoint, and a fresh bucket; yields its name."""
    import boto3

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    bucket = f"skf-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=bucket)
    yield bucket


def _postgres_url() -> str | None:
    url = os.environ.get("SKF_TEST_POSTGRES_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/test")
    try:
        import sqlalchemy as sa

        engine = sa.create_engine(url, connect_args={"connect_timeout": 3})
        with engine.connect() as conn:
            conn.execute(sa.text("select 1"))
        engine.dispose()
        return url
    except Exception:
        return None


@pytest.fixture()
def postgres_url(skf_home: Path) -> Iterator[str]:
    """A fresh schema on the real PostgreSQL server; fails (not skips) in CI when the server is absent.

    Depends on ``skf_home`` so the catalog's "it existed" marker lands in the test's home, not the checkout.
    """
    url = _postgres_url()
    if url is None:
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL on 127.0.0.1:5432 is required in CI (.ci/run starts it)")
        pytest.skip("no PostgreSQL on 127.0.0.1:5432")
    import sqlalchemy as sa

    schema = f"t_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(url)
    with admin.begin() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    try:
        sep = "&" if "?" in url else "?"
        yield f"{url}{sep}options=-csearch_path%3D{schema}"
    finally:
        with admin.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    """A temporary Prefect API for flow tests (one per test session)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
