"""Alembic environment for panoptic-batch.

Run programmatically by ``storage.db`` (no alembic.ini): it passes an open connection in
``config.attributes["connection"]``. For hand-made revisions, build the same Config with
``storage.db.alembic_config(url)`` and call ``alembic.command.revision(cfg, autogenerate=True)``.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine, pool

from storage.schema import Base

config = context.config
target_metadata = Base.metadata


def _configure(**kwargs) -> None:
    context.configure(
        target_metadata=target_metadata,
        # SQLite cannot ALTER most things; batch mode rebuilds tables there, and is a no-op elsewhere.
        render_as_batch=True,
        compare_type=True,
        **kwargs,
    )


def run_migrations_offline() -> None:
    _configure(url=config.get_main_option("sqlalchemy.url"), literal_binds=True,
               dialect_opts={"paramstyle": "named"})
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _configure(connection=connection)
        with context.begin_transaction():
            context.run_migrations()
        return
    from storage.db import database_url

    url = config.get_main_option("sqlalchemy.url") or database_url()
    engine = create_engine(url, poolclass=pool.NullPool)
    try:
        with engine.connect() as connection:
            _configure(connection=connection)
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
