"""Open the catalog database: one engine per URL per process, schema brought to head by Alembic.

SQLite (the embedded default) gets WAL journaling, a busy timeout and enforced foreign keys so that
several Prefect tasks can read while one writes and ``ON DELETE CASCADE`` behaves as on PostgreSQL.
Migrations run on first open in a process, under a lock (a PostgreSQL advisory lock, or a lock file
beside the SQLite database), so workers starting together on a fresh catalog do not race.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import StaticPool

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
_SQLITE_BUSY_TIMEOUT_MS = 30_000
_PG_LOCK_KEY = 0x534B46  # "SKF": advisory-lock id held while migrating

_cache: dict[str, Catalog] = {}
_cache_lock = threading.Lock()


@dataclass
class Catalog:
    """Handle on an open catalog; :meth:`session` is the unit of work."""

    url: str
    engine: Engine
    _factory: sessionmaker[Session] = field(repr=False)

    def __repr__(self) -> str:
        return f"Catalog({make_url(self.url).render_as_string(hide_password=True)!r})"

    @contextlib.contextmanager
    def session(self) -> Iterator[Session]:
        """A session that commits when the block succeeds and rolls back when it raises."""
        with self._factory() as session:
            try:
                yield session
                session.commit()
            except BaseException:
                session.rollback()
                raise


def _is_sqlite_file(url: URL) -> bool:
    return url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:")


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    try:
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute(f"PRAGMA busy_timeout={_SQLITE_BUSY_TIMEOUT_MS}")
        cur.execute("PRAGMA foreign_keys=ON")
    finally:
        cur.close()


def create_catalog_engine(url: str | URL) -> Engine:
    """Engine with the per-backend settings the catalog relies on (no migrations)."""
    url = make_url(url)
    if url.get_backend_name() != "sqlite":
        return sa.create_engine(url, pool_pre_ping=True)
    if _is_sqlite_file(url):
        Path(url.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(url, connect_args={"timeout": _SQLITE_BUSY_TIMEOUT_MS / 1000})
    else:  # in-memory: one shared connection, or every checkout would see an empty database
        engine = sa.create_engine(url, poolclass=StaticPool, connect_args={"check_same_thread": False})
    sa.event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def alembic_config(connection: sa.Connection | None = None) -> Any:
    """Alembic ``Config`` built in code (no alembic.ini), pointing at the shipped migrations."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


@contextlib.contextmanager
def _sqlite_migration_lock(engine: Engine) -> Iterator[None]:
    """An exclusive lock file beside a SQLite catalog file, held around the whole migration transaction."""
    if not (engine.dialect.name == "sqlite" and _is_sqlite_file(engine.url)):
        yield
        return
    try:
        import fcntl
    except ImportError:  # Windows: SQLite's own locking and the busy timeout have to do
        yield
        return
    lock_path = Path(engine.url.database).expanduser().with_suffix(".migrate.lock")
    with open(lock_path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Bring the schema to ``revision``; a no-op when it is already there.

    Concurrent first opens serialise: the next process must see the schema the previous one committed,
    so every lock is released only after the commit (SQLite: the lock file is taken before the
    transaction begins and dropped after it ends; PostgreSQL: a transaction-scoped advisory lock).
    """
    from alembic import command

    with _sqlite_migration_lock(engine), engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_LOCK_KEY})
        command.upgrade(alembic_config(conn), revision)


def open_catalog(url: str | None = None) -> Catalog:
    """The catalog at ``url`` (default: ``SKF_CATALOG_URL`` / the SQLite file under ``SKF_HOME``).

    Engines are cached per URL within a process, and migrations run the first time a URL is opened.
    """
    if url is None:
        from components.settings import get_settings

        url = get_settings().catalog_url
    key = make_url(url).render_as_string(hide_password=False)
    with _cache_lock:
        catalog = _cache.get(key)
        if catalog is None:
            engine = create_catalog_engine(url)
            try:
                upgrade(engine)
            except Exception:
                engine.dispose()
                raise
            catalog = Catalog(url=key, engine=engine, _factory=sessionmaker(engine, expire_on_commit=False))
            _cache[key] = catalog
    return catalog


def close_catalogs() -> None:
    """Dispose every cached engine (tests, or after ``fork`` so children open their own connections)."""
    with _cache_lock:
        for catalog in _cache.values():
            catalog.engine.dispose()
        _cache.clear()
