"""Alembic environment of the catalog.

``open_catalog`` runs migrations in-process and hands over its connection through
``config.attributes["connection"]``. Run by hand, ``alembic`` uses ``-x url=...``, else the
``sqlalchemy.url`` option, else the configured catalog (``SKF_CATALOG_URL`` / ``SKF_HOME``).
"""

from __future__ import annotations

from alembic import context

from components.catalog.models import Base

config = context.config
target_metadata = Base.metadata


def _configure(connection) -> None:  # type: ignore[no-untyped-def]
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",  # SQLite alters tables by copying them
        compare_type=True,
    )


def _url() -> str:
    url = context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option("sqlalchemy.url")
    if url:
        return url
    from components.settings import get_settings

    return get_settings().catalog_url


def run_migrations_offline() -> None:
    context.configure(url=_url(), target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _configure(connection)
        with context.begin_transaction():
            context.run_migrations()
        return
    from components.catalog.db import create_catalog_engine

    engine = create_catalog_engine(_url())
    try:
        with engine.begin() as conn:
            _configure(conn)
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
