"""Catalog: Alembic-migrated schema on SQLite and PostgreSQL, constraints, cascades, sessions."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
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
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
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
        assert conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalars().all() == ["0001"]
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
        assert conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalars().all() == ["0001"]
