"""Open the catalog database: one engine per URL per process, schema brought to head by Alembic.

SQLite (the embedded default) gets WAL journaling, a busy timeout and enforced foreign keys so that
several Prefect tasks can read while one writes and ``ON DELETE CASCADE`` behaves as on PostgreSQL.
Migrations run on first open in a process, under a lock (a PostgreSQL advisory lock, or a lock file
beside the SQLite database), so workers starting together on a fresh catalog do not race.

A catalog leaves a *marker* when its schema is first created (beside a SQLite file; under
``$SKF_HOME/catalogs/`` for a server). If the database later turns up empty or missing while its marker
remains, :func:`open_catalog` refuses to create a fresh, empty schema in its place (which would silently
orphan every stored dataset, prior and run) unless ``SKF_CATALOG_RESET=1`` acknowledges the reset.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import StaticPool

from components.errors import SKFError

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
_SQLITE_BUSY_TIMEOUT_MS = 30_000
_PG_LOCK_KEY = 0x534B46  # "SKF": advisory-lock id held while migrating
RESET_ENV = "SKF_CATALOG_RESET"  # "1": a missing catalog may be recreated empty (deliberate reset)
MARKER_SUFFIX = ".skf-catalog"

_cache: dict[str, Catalog] = {}
_cache_lock = threading.Lock()


class CatalogError(SKFError):
    """The catalog cannot be opened or used (unreachable server, lost database)."""


class CatalogLostError(CatalogError):
    """The catalog existed but is gone (deleted, replaced or emptied); nothing is recreated silently."""


def masked_url(url: str | URL) -> str:
    """The URL as it may be shown to users: the password replaced by ``***``."""
    return make_url(url).render_as_string(hide_password=True)


@dataclass
class Catalog:
    """Handle on an open catalog; :meth:`session` is the unit of work."""

    url: str
    engine: Engine
    _factory: sessionmaker[Session] = field(repr=False)
    _identity: tuple[int, int] | None = field(default=None, repr=False)  # SQLite file (device, inode)

    def __repr__(self) -> str:
        return f"Catalog({masked_url(self.url)!r})"

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

    def check_present(self) -> None:
        """Raise :class:`CatalogLostError` if the database this handle opened is gone.

        A deleted SQLite file stays writable through pooled connections (they keep the unlinked inode),
        so results written after a deletion would vanish silently; the file identity is checked instead.
        A server whose schema is gone is lost too; one that cannot be reached raises a plain
        :class:`CatalogError` (it may come back: callers that can wait retry on it).
        """
        if self._identity is not None and _file_identity(self.engine.url) != self._identity:
            raise CatalogLostError(
                f"the catalog {masked_url(self.url)} was deleted or replaced while this command ran; "
                "its results were not recorded: restore the database file from a backup and rerun"
            )
        try:
            with self.engine.connect() as conn:
                conn.execute(sa.text("SELECT version_num FROM alembic_version"))
        except sa.exc.DBAPIError as exc:
            server = self.engine.dialect.name != "sqlite"
            if server and isinstance(exc, sa.exc.OperationalError | sa.exc.InterfaceError):
                raise _unreachable(self.engine.url, exc, doing="reach") from exc
            raise CatalogLostError(
                f"the catalog {masked_url(self.url)} can no longer be read ({_first_line(exc.orig)}); "
                "its results were not recorded: restore it from a backup and rerun"
            ) from exc


def _first_line(exc: BaseException | None) -> str:
    text = str(exc or "").strip()
    return text.splitlines()[0].strip() if text else type(exc).__name__


def _file_identity(url: URL) -> tuple[int, int] | None:
    """(device, inode) of a SQLite catalog file; None when it does not exist (or for other backends)."""
    if not _is_sqlite_file(url):
        return None
    try:
        st = os.stat(Path(url.database).expanduser())
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def _sqlite_blank(url: URL) -> bool:
    """The SQLite catalog file is missing or empty (0 bytes): connecting would make a new database."""
    try:
        return os.stat(Path(url.database).expanduser()).st_size == 0
    except FileNotFoundError:
        return True


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


@contextlib.contextmanager
def _migration_transaction(engine: Engine) -> Iterator[sa.Connection]:
    """A transaction that holds PostgreSQL's advisory migration lock until it commits."""
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_LOCK_KEY})
        yield conn


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Bring the schema to ``revision``; a no-op when it is already there.

    Concurrent first opens serialise: the next process must see the schema the previous one committed,
    so every lock is released only after the commit (SQLite: the lock file is taken before the
    transaction begins and dropped after it ends; PostgreSQL: a transaction-scoped advisory lock).
    """
    from alembic import command

    with _sqlite_migration_lock(engine), _migration_transaction(engine) as conn:
        command.upgrade(alembic_config(conn), revision)


# ------------------------------------------------------------------------------------------ markers
def marker_path(url: str | URL) -> Path | None:
    """Where the "this catalog exists" marker of ``url`` lives; None for in-memory SQLite."""
    url = make_url(url)
    if url.get_backend_name() == "sqlite":
        if not _is_sqlite_file(url):
            return None
        db = Path(url.database).expanduser().resolve()
        return db.with_name(db.name + MARKER_SUFFIX)
    from components.settings import get_settings

    digest = hashlib.sha256(masked_url(url).encode()).hexdigest()[:16]
    return get_settings().home / "catalogs" / f"{digest}{MARKER_SUFFIX}"


def _reset_acknowledged() -> bool:
    return os.environ.get(RESET_ENV, "").strip().lower() in ("1", "true", "yes")


def _refuse_reset(url: URL, marker: Path) -> None:
    """Raise unless the user acknowledged that a vanished catalog may start over empty."""
    if _reset_acknowledged():
        return
    try:
        created = json.loads(marker.read_text(encoding="utf-8")).get("created_at", "earlier")
    except (OSError, ValueError):
        created = "earlier"
    raise CatalogLostError(
        f"the catalog {masked_url(url)} is missing or empty, but one was created there ({created}; "
        f"marker {marker}): restore the database from a backup, or set {RESET_ENV}=1 to start a new, "
        "empty catalog deliberately"
    )


def _write_marker(url: URL, marker: Path) -> None:
    marker.parent.mkdir(parents=True, exist_ok=True)
    payload = {"url": masked_url(url), "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")}
    tmp = marker.with_name(f".{marker.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload) + "\n", encoding="utf-8")
    os.replace(tmp, marker)


def _migrate(engine: Engine) -> None:
    """:func:`upgrade`, refusing to create a fresh schema where the marker says a catalog existed.

    The check, the migration and the marker write all happen under the migration lock (SQLite), so a
    process that waited on a concurrent first open sees the committed schema, not an empty database.
    """
    from alembic import command

    marker = marker_path(engine.url)
    with _sqlite_migration_lock(engine):
        with _migration_transaction(engine) as conn:
            fresh = not sa.inspect(conn).has_table("alembic_version")
            if fresh and marker is not None and marker.is_file():
                _refuse_reset(engine.url, marker)
            command.upgrade(alembic_config(conn), "head")
        if marker is not None and (fresh or not marker.is_file()):
            _write_marker(engine.url, marker)


def _unreachable(url: URL, exc: sa.exc.DBAPIError, doing: str = "open") -> CatalogError:
    detail = _first_line(exc.orig)
    if url.password:
        detail = detail.replace(str(url.password), "***")
    return CatalogError(
        f"cannot {doing} the catalog {masked_url(url)}: {detail}; check that the database is running and "
        "reachable, or point SKF_CATALOG_URL at the right one"
    )


def _open(url: URL, key: str) -> Catalog:
    """Create the engine, migrate (guarded by the marker) and wrap it; errors as one-line CatalogErrors."""
    marker = marker_path(url)
    if _is_sqlite_file(url) and _sqlite_blank(url) and marker is not None and marker.is_file():
        _refuse_reset(url, marker)  # before connecting: SQLite would create (or format) an empty file
    engine = create_catalog_engine(url)
    try:
        _migrate(engine)
    except sa.exc.DBAPIError as exc:
        engine.dispose()
        raise _unreachable(url, exc) from exc
    except BaseException:
        engine.dispose()
        raise
    return Catalog(
        url=key,
        engine=engine,
        _factory=sessionmaker(engine, expire_on_commit=False),
        _identity=_file_identity(url),
    )


def open_catalog(url: str | None = None) -> Catalog:
    """The catalog at ``url`` (default: ``SKF_CATALOG_URL`` / the SQLite file under ``SKF_HOME``).

    Engines are cached per URL within a process, and migrations run the first time a URL is opened. A
    cached SQLite catalog whose file was deleted or replaced is opened again (and refused, see
    :func:`_migrate`), never served from connections to the vanished file.
    """
    if url is None:
        from components.settings import get_settings

        url = get_settings().catalog_url
    parsed = make_url(url)
    key = parsed.render_as_string(hide_password=False)
    with _cache_lock:
        catalog = _cache.get(key)
        if catalog is not None and catalog._identity != _file_identity(parsed):
            catalog.engine.dispose()
            del _cache[key]
            catalog = None
        if catalog is None:
            catalog = _open(parsed, key)
            _cache[key] = catalog
    return catalog


def close_catalogs() -> None:
    """Dispose every cached engine (tests, or after ``fork`` so children open their own connections)."""
    with _cache_lock:
        for catalog in _cache.values():
            catalog.engine.dispose()
        _cache.clear()
