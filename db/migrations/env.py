"""Alembic environment for graftq's results database.

The URL comes from the caller's config (graftq), else `sqlalchemy.url` in alembic.ini,
else GRAFTQ_DATABASE_URL, else graftq's default SQLite file.
"""

from __future__ import annotations

import os

from alembic import context
from sqlalchemy import pool

from db import DEFAULT_DATABASE_URL
from db.session import create_database_engine
from db.tables import metadata

config = context.config
target_metadata = metadata


def _url() -> str:
    return (
        config.get_main_option("sqlalchemy.url")
        or os.environ.get("GRAFTQ_DATABASE_URL")
        or DEFAULT_DATABASE_URL
    )


def _configure(**kwargs: object) -> None:
    context.configure(
        target_metadata=target_metadata,
        render_as_batch=True,  # SQLite cannot ALTER most things; batch mode copies the table
        compare_type=True,
        **kwargs,
    )


def run_migrations_offline() -> None:
    _configure(url=_url(), literal_binds=True, dialect_opts={"paramstyle": "named"})
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _configure(connection=connection)
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = create_database_engine(_url(), poolclass=pool.NullPool)
    try:
        with engine.connect() as connection:
            _configure(connection=connection)
            with context.begin_transaction():
                context.run_migrations()
            connection.commit()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
