"""Catalog: Alembic-migrated schema on SQLite and PostgreSQL, constraints, cascades, sessions."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from data_fixtures import lose_catalog
from sqlalchemy.exc import IntegrityError

from components.catalog import (
    Base,
    Catalog,
    Dataset,
    DatasetVersion,
    Image,
    PriorCacheEntry,
    QuarantinedInput,
    TrainingRun,
    close_catalogs,
    open_catalog,
    upgrade,
)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    # A server catalog's "it existed" marker lives under SKF_HOME: keep it out of the checkout.
    monkeypatch.setenv("SKF_HOME", str(tmp_path / "skf-home"))
    monkeypatch.delenv("SKF_CATALOG_RESET", raising=False)
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'nested' / 'dir' / 'catalog.db'}"
    else:
        yield request.getfixturevalue("postgres_url")
    close_catalogs()


@pytest.fixture()
def catalog(db_url: str) -> Catalog:
    return open_catalog(db_url)


def _version(ds: Dataset, number: int, manifest: str, **kw: object) -> DatasetVersion:
    return DatasetVersion(
        dataset=ds, version=number, manifest_sha256=manifest, source_uri="/data/lol", layout="lol", **kw
    )


def _image(v: DatasetVersion, key: str, role: str) -> Image:
    return Image(
        version=v,
        sha256=(key + role).ljust(64, "0")[:64],
        split="train",
        role=role,
        pair_key=key,
        rel_path=f"our485/{role}/{key}.png",
        uri=f"/store/{key}-{role}.png",
        width=8,
        height=6,
    )


def _populate(catalog: Catalog) -> None:
    with catalog.session() as s:
        ds = Dataset(name="lol")
        v1 = _version(ds, 1, "a" * 64, changes={"added": ["1"], "removed": [], "changed": []})
        s.add_all([ds, v1, _image(v1, "1", "low"), _image(v1, "1", "high")])
        s.flush()
        v2 = _version(ds, 2, "b" * 64, parent_id=v1.id)
        s.add_all([v2, _image(v2, "2", "low")])
        s.flush()
        s.add_all(
            [
                QuarantinedInput(
                    dataset_id=ds.id,
                    version_id=v1.id,
                    source_uri="/data/lol",
                    rel_path="bad.png",
                    reason="truncated",
                ),
                PriorCacheEntry(
                    image_sha256="c" * 64, fingerprint="f" * 64, uri="/p/c.pt", sha256="d" * 64, nbytes=10
                ),
                TrainingRun(dataset_version_id=v2.id, config_hash="e" * 64),
            ]
        )


def _count(catalog: Catalog, model: type[Base]) -> int:
    with catalog.session() as s:
        return s.scalar(sa.select(sa.func.count()).select_from(model))


def test_rows_round_trip(catalog: Catalog) -> None:
    _populate(catalog)
    with catalog.session() as s:
        ds = s.scalars(sa.select(Dataset).where(Dataset.name == "lol")).one()
        assert [v.ref for v in ds.versions] == ["lol@1", "lol@2"]
        v1, v2 = ds.versions
        assert v1.changes == {"added": ["1"], "removed": [], "changed": []} and v2.changes == {}
        assert v2.parent_id == v1.id
        assert sorted(i.role for i in v1.images) == ["high", "low"]
        q = s.scalars(sa.select(QuarantinedInput)).one()
        assert (q.reason, q.detail, q.version_id) == ("truncated", "", v1.id)
        run = s.scalars(sa.select(TrainingRun)).one()
        assert run.status == "running" and run.created_at is not None


def test_unique_constraints(catalog: Catalog) -> None:
    _populate(catalog)
    duplicates = [
        lambda s, ds: _version(ds, 3, "a" * 64),  # same manifest as v1: must find v1, not insert
        lambda s, ds: _version(ds, 1, "9" * 64),  # same version number
        lambda s, ds: Dataset(name="lol"),
        lambda s, ds: PriorCacheEntry(
            image_sha256="c" * 64, fingerprint="f" * 64, uri="x", sha256="0" * 64, nbytes=1
        ),
    ]
    for make in duplicates:
        with pytest.raises(IntegrityError), catalog.session() as s:
            ds = s.scalars(sa.select(Dataset)).one()
            s.add(make(s, ds))
    # The same manifest in another dataset is a different version.
    with catalog.session() as s:
        s.add(_version(Dataset(name="lol-v2"), 1, "a" * 64))
    assert _count(catalog, DatasetVersion) == 3


def test_cascade_delete(catalog: Catalog) -> None:
    _populate(catalog)
    with catalog.session() as s:  # deleting a parent version detaches its child and quarantine rows
        s.delete(s.scalars(sa.select(TrainingRun)).one())
        s.delete(s.scalars(sa.select(DatasetVersion).where(DatasetVersion.version == 1)).one())
    with catalog.session() as s:
        assert s.scalars(sa.select(DatasetVersion.parent_id)).one() is None
        assert s.scalars(sa.select(QuarantinedInput.version_id)).one() is None
    assert _count(catalog, Image) == 1
    with catalog.session() as s:
        s.delete(s.scalars(sa.select(Dataset)).one())
    for model in (Dataset, DatasetVersion, Image, QuarantinedInput):
        assert _count(catalog, model) == 0, model.__name__
    assert _count(catalog, PriorCacheEntry) == 1  # priors are keyed by content, not by dataset


def test_session_rolls_back_on_error(catalog: Catalog) -> None:
    with pytest.raises(RuntimeError), catalog.session() as s:
        s.add(Dataset(name="ghost"))
        s.flush()
        raise RuntimeError("boom")
    assert _count(catalog, Dataset) == 0


def test_migrations_idempotent_and_engine_cached(db_url: str) -> None:
    first = open_catalog(db_url)
    assert open_catalog(db_url) is first
    with first.session() as s:
        s.add(Dataset(name="keep"))
    upgrade(first.engine)  # already at head: nothing happens
    close_catalogs()
    second = open_catalog(db_url)  # a fresh process-level open runs the migration step again
    assert second is not first
    with second.engine.connect() as conn:
        assert conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalars().all() == ["0002"]
    with second.session() as s:
        assert s.scalars(sa.select(Dataset.name)).all() == ["keep"]


def test_schema_matches_orm(catalog: Catalog) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    with catalog.engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        assert compare_metadata(ctx, Base.metadata) == []
        assert set(sa.inspect(conn).get_table_names()) == set(Base.metadata.tables) | {"alembic_version"}


def test_sqlite_settings(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "cat.db"
    catalog = open_catalog(f"sqlite:///{path}")
    try:
        assert path.is_file()
        with catalog.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000
    finally:
        close_catalogs()


def test_default_url_from_settings(skf_home: Path) -> None:
    try:
        catalog = open_catalog()
        assert catalog.url == f"sqlite:///{skf_home / 'catalog.db'}"
        assert (skf_home / "catalog.db").is_file()
    finally:
        close_catalogs()


def test_in_memory_sqlite_shares_one_database() -> None:
    try:
        catalog = open_catalog("sqlite://")
        with catalog.session() as s:
            s.add(Dataset(name="mem"))
        assert _count(catalog, Dataset) == 1
    finally:
        close_catalogs()


def test_sqlite_migration_lock_is_held_until_the_schema_is_committed(tmp_path: Path) -> None:
    """The next process may only read the schema after this one committed it (else it migrates again)."""
    import fcntl

    from components.catalog.db import create_catalog_engine, upgrade

    db = tmp_path / "catalog.db"
    engine = create_catalog_engine(f"sqlite:///{db}")
    held: list[bool] = []

    def lock_taken_at_commit(_conn: object) -> None:
        with open(db.with_suffix(".migrate.lock"), "a") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                held.append(True)
            else:
                fcntl.flock(fh, fcntl.LOCK_UN)
                held.append(False)

    sa.event.listen(engine, "commit", lock_taken_at_commit)
    try:
        upgrade(engine)
    finally:
        engine.dispose()
    assert held and all(held)


def test_concurrent_first_open_from_several_processes(db_url: str) -> None:
    """Workers starting together on a fresh catalog must not race each other's migrations."""
    import subprocess
    import sys

    code = (
        "import sys; from components.catalog import open_catalog; "
        "c = open_catalog(sys.argv[1]); c.engine.dispose()"
    )
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    procs = [
        subprocess.Popen([sys.executable, "-c", code, db_url], env=env, stderr=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], errors
    with open_catalog(db_url).engine.connect() as conn:
        assert conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalars().all() == ["0002"]


# ------------------------------------------------------------------------------------ a lost catalog
def _sqlite_file(db_url: str) -> Path | None:
    url = sa.engine.make_url(db_url)
    return Path(url.database) if url.get_backend_name() == "sqlite" else None


def test_a_lost_catalog_is_not_recreated_empty(db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from components.catalog import RESET_ENV, CatalogLostError

    _populate(open_catalog(db_url))
    close_catalogs()  # the next command, in a new process
    lose_catalog(db_url)
    for _ in range(2):  # refused every time, and nothing is created in its place
        with pytest.raises(CatalogLostError) as refused:
            open_catalog(db_url)
        db = _sqlite_file(db_url)
        assert db is None or not db.exists()
    message = str(refused.value)
    assert "is missing or empty, but one was created there" in message and "\n" not in message
    assert f"restore the database from a backup, or set {RESET_ENV}=1" in message

    monkeypatch.setenv(RESET_ENV, "1")  # the documented, deliberate reset
    assert _count(open_catalog(db_url), Dataset) == 0
    close_catalogs()
    monkeypatch.delenv(RESET_ENV)
    assert _count(open_catalog(db_url), Dataset) == 0  # the new catalog is the one that exists now
    close_catalogs()
    lose_catalog(db_url)
    with pytest.raises(CatalogLostError):  # and it is guarded in turn
        open_catalog(db_url)


def test_a_sqlite_catalog_replaced_by_an_empty_file_is_refused(tmp_path: Path) -> None:
    from components.catalog import CatalogLostError

    db = tmp_path / "catalog.db"
    open_catalog(f"sqlite:///{db}")
    close_catalogs()
    db.unlink()
    db.write_bytes(b"")  # e.g. `: > catalog.db`, or a restore that copied nothing
    with pytest.raises(CatalogLostError, match="missing or empty"):
        open_catalog(f"sqlite:///{db}")
    assert db.stat().st_size == 0


def test_a_catalog_lost_while_open_is_detected(db_url: str) -> None:
    from components.catalog import CatalogLostError

    catalog = open_catalog(db_url)
    _populate(catalog)
    catalog.check_present()
    lose_catalog(db_url)
    with pytest.raises(CatalogLostError, match="deleted or replaced|can no longer be read"):
        catalog.check_present()
    if _sqlite_file(db_url) is not None:  # the cached handle is not served for the vanished file
        with pytest.raises(CatalogLostError, match="missing or empty"):
            open_catalog(db_url)


def test_a_catalog_from_before_markers_gets_one_on_open(tmp_path: Path) -> None:
    from components.catalog import CatalogLostError
    from components.catalog.db import marker_path

    url = f"sqlite:///{tmp_path / 'catalog.db'}"
    open_catalog(url)
    close_catalogs()
    marker = marker_path(url)
    assert marker is not None and marker.is_file()
    marker.unlink()  # a catalog created by an older release
    open_catalog(url)
    close_catalogs()
    assert marker.is_file()
    lose_catalog(url)
    with pytest.raises(CatalogLostError):
        open_catalog(url)


def test_an_unreachable_server_is_a_one_line_error_without_the_password() -> None:
    from components.catalog import CatalogError
    from tests.conftest import free_port

    url = f"postgresql+psycopg2://skf:s3cret-pw@127.0.0.1:{free_port()}/skf?connect_timeout=3"
    with pytest.raises(CatalogError) as info:
        open_catalog(url)
    message = str(info.value)
    assert message.startswith("cannot open the catalog postgresql+psycopg2://skf:***@127.0.0.1:")
    assert "SKF_CATALOG_URL" in message and "s3cret-pw" not in message and "\n" not in message


# ------------------------------------------------------------------------------- training-run leases
def _version_id(catalog: Catalog) -> int:
    _populate(catalog)
    with catalog.session() as s:
        return s.scalars(sa.select(DatasetVersion.id).where(DatasetVersion.version == 2)).one()


def _expire(catalog: Catalog, row_id: int) -> None:
    import datetime as dt

    with catalog.session() as s:
        s.get(TrainingRun, row_id).lease_expires_at = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)


def test_a_training_run_lease_has_one_holder_until_it_expires(catalog: Catalog) -> None:
    from components.catalog.leases import LeaseLostError, claim_run, release_lease, renew_lease, update_leased

    vid, digest = _version_id(catalog), "7" * 64
    a = claim_run(catalog, digest, vid, "A")
    assert (a.acquired, a.status, a.holder) == (True, "running", "A")
    b = claim_run(catalog, digest, vid, "B")
    assert (b.acquired, b.row_id, b.holder) == (False, a.row_id, "A")  # B waits for A
    assert claim_run(catalog, digest, vid, "A").acquired  # A's own claim is renewed
    assert not update_leased(catalog, a.row_id, "B", status="failed")  # B cannot write A's row
    assert renew_lease(catalog, a.row_id, "A")

    _expire(catalog, a.row_id)  # A died: its lease lapses and B takes the run over
    b = claim_run(catalog, digest, vid, "B")
    assert (b.acquired, b.row_id, b.holder) == (True, a.row_id, "B")
    assert not renew_lease(catalog, a.row_id, "A")
    with pytest.raises(LeaseLostError, match="no longer leased to this process"):
        release_lease(catalog, a.row_id, "A", status="finished")  # A's late result is not recorded

    release_lease(catalog, b.row_id, "B", status="finished", mlflow_run_id="run-b")
    c = claim_run(catalog, digest, vid, "C")  # a finished run is never leased again
    assert (c.acquired, c.status, c.run_id, c.holder) == (False, "finished", "run-b", None)
    with catalog.session() as s:
        rows = s.scalars(sa.select(TrainingRun).where(TrainingRun.config_hash == digest)).all()
        assert [(r.status, r.mlflow_run_id, r.lease_holder, r.lease_expires_at) for r in rows] == [
            ("finished", "run-b", None, None)
        ]


def test_the_lease_keeper_renews_and_notices_a_takeover(catalog: Catalog) -> None:
    import time

    from components.catalog.leases import LeaseKeeper, LeaseLostError, claim_run

    vid, digest, ttl = _version_id(catalog), "9" * 64, 0.4
    a = claim_run(catalog, digest, vid, "A", ttl)
    with LeaseKeeper(catalog, a.row_id, "A", ttl) as keeper:
        time.sleep(3 * ttl)  # well past the first expiry: renewed meanwhile
        assert not claim_run(catalog, digest, vid, "B", ttl).acquired
        keeper.check()
        with catalog.session() as s:  # B took over (A was deemed dead), in one write the keeper cannot race
            s.get(TrainingRun, a.row_id).lease_holder = "B"
        deadline = time.monotonic() + 10
        while keeper.lost is None and time.monotonic() < deadline:
            time.sleep(0.05)
        with pytest.raises(LeaseLostError, match="another process took the run over"):
            keeper.check()


def test_concurrent_claims_elect_exactly_one_holder(catalog: Catalog) -> None:
    import threading

    from components.catalog.leases import claim_run

    vid, digest = _version_id(catalog), "8" * 64
    start = threading.Barrier(6)
    claims: dict[str, object] = {}

    def claim(holder: str) -> None:
        start.wait()
        try:
            claims[holder] = claim_run(catalog, digest, vid, holder)
        except BaseException as exc:  # reported below
            claims[holder] = exc

    threads = [threading.Thread(target=claim, args=(f"h{i}",)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not [c for c in claims.values() if isinstance(c, BaseException)], claims
    winners = [h for h, c in claims.items() if c.acquired]  # type: ignore[attr-defined]
    assert len(winners) == 1, claims
    assert {c.holder for c in claims.values()} == set(winners)  # type: ignore[attr-defined]
    with catalog.session() as s:
        assert s.scalar(sa.select(sa.func.count()).where(TrainingRun.config_hash == digest)) == 1


def test_one_training_run_row_per_configuration(catalog: Catalog) -> None:
    vid = _version_id(catalog)
    with pytest.raises(IntegrityError), catalog.session() as s:
        s.add(TrainingRun(dataset_version_id=vid, config_hash="e" * 64))  # _populate made one already


def test_migration_0002_keeps_the_newest_of_duplicate_runs(db_url: str) -> None:
    from components.catalog.db import create_catalog_engine

    engine = create_catalog_engine(db_url)
    try:
        upgrade(engine, "0001")
        with engine.begin() as conn:  # two identical trainings started together on the old schema
            conn.execute(
                sa.text("INSERT INTO datasets (id, name, created_at) VALUES (1, 'lol', :t)"),
                {"t": "2025-01-01"},
            )
            conn.execute(
                sa.text(
                    "INSERT INTO dataset_versions (id, dataset_id, version, manifest_sha256, source_uri, layout, "
                    "changes, image_count, created_at) VALUES (1, 1, 1, :m, '/d', 'lol', '{}', 0, :t)"
                ),
                {"m": "a" * 64, "t": "2025-01-01"},
            )
            for run_id, digest, status in ((1, "e", "failed"), (2, "e", "running"), (3, "f", "finished")):
                conn.execute(
                    sa.text(
                        "INSERT INTO training_runs (id, dataset_version_id, config_hash, mlflow_run_id, status, "
                        "created_at) VALUES (:id, 1, :h, :r, :s, :t)"
                    ),
                    {"id": run_id, "h": digest * 64, "r": f"run-{run_id}", "s": status, "t": "2025-01-01"},
                )
        upgrade(engine)
        with engine.connect() as conn:
            rows = conn.execute(
                sa.text("SELECT id, status, lease_holder FROM training_runs ORDER BY id")
            ).all()
        assert [tuple(r) for r in rows] == [(2, "running", None), (3, "finished", None)]
    finally:
        engine.dispose()
