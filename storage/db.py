"""Database engine, sessions and automatic migrations.

- URL: the argument, else ``PANOPTIC_DATABASE_URL``, else ``sqlite:///panoptic-batch.db`` (a file in
  the current working directory; relative SQLite paths are made absolute on first use).
  ``postgresql://`` and ``postgres://`` URLs use psycopg 3.
- One engine per (URL, process): engines are cached, and a forked child drops the parent's
  (without closing the parent's connections) and makes its own.
- The schema is created or upgraded with Alembic ``upgrade head`` the first time a process uses a
  URL. Several processes may do this at once: on PostgreSQL the upgrade runs under a transaction-
  level advisory lock; on SQLite it runs inside one ``BEGIN IMMEDIATE`` transaction (SQLite's DDL is
  transactional), so a second process waits (busy_timeout, 30 s) and then finds the schema current.
- SQLite connections: WAL journal, busy_timeout 30 s, foreign keys on. SQLAlchemy, not the sqlite3
  module, emits BEGIN, so every transaction (DDL included) is real; write transactions use
  ``BEGIN IMMEDIATE`` (see :func:`write_engine`) so they take the write lock up front and wait for it
  instead of failing half-way with "database is locked".
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import Engine, create_engine, event, func, pool, select
from sqlalchemy.engine import URL, make_url
from sqlalchemy.orm import Session

__all__ = [
    "DEFAULT_URL", "ENV_VAR", "database_url", "get_engine", "write_engine", "session",
    "upgrade", "alembic_config", "dispose_all", "SchemaTooNew",
]

ENV_VAR = "PANOPTIC_DATABASE_URL"
DEFAULT_URL = "sqlite:///panoptic-batch.db"
SQLITE_BUSY_TIMEOUT_S = 30
PG_CONNECT_TIMEOUT_S = 10
MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
# Any fixed 64-bit number, the same in every process: the key of the migration advisory lock.
_PG_MIGRATION_LOCK_KEY = 0x70616E6F70746963  # "panoptic"
# Execution option that makes a SQLite transaction start with BEGIN IMMEDIATE.
WRITE_OPTION = "panoptic_write"

_lock = threading.RLock()
_engines: dict[tuple[str, int], Engine] = {}
_migrated: set[str] = set()  # URLs upgraded by this process (or its parent before a fork)


def database_url(url: str | URL | None = None) -> str:
    """The URL to use, normalised: argument > $PANOPTIC_DATABASE_URL > the default SQLite file."""
    if url is None or url == "":
        url = os.environ.get(ENV_VAR) or DEFAULT_URL
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    elif (parsed.get_backend_name() == "sqlite" and not _is_memory_sqlite(parsed)
          and not parsed.database.startswith("file:")):
        # Pin a relative file to the working directory of now, not of whenever a connection opens.
        parsed = parsed.set(database=str(Path(parsed.database).expanduser().absolute()))
    return parsed.render_as_string(hide_password=False)


def _is_memory_sqlite(url: URL) -> bool:
    return url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:")


def _create_engine(url_str: str) -> Engine:
    url = make_url(url_str)
    if url.get_backend_name() != "sqlite":
        # A server that accepts the connection and never answers (a hung host, a wrong port behind
        # a proxy) would be waited on forever: give up after a while (the URL may say otherwise).
        connect_args = {} if "connect_timeout" in url.query else {"connect_timeout": PG_CONNECT_TIMEOUT_S}
        return create_engine(url, pool_pre_ping=True, future=True, connect_args=connect_args)

    kwargs: dict = {"connect_args": {"timeout": SQLITE_BUSY_TIMEOUT_S, "check_same_thread": False}}
    if _is_memory_sqlite(url):
        kwargs["poolclass"] = pool.StaticPool  # one shared in-memory database, not one per connection
    elif url.database:
        Path(url.database).expanduser().resolve().parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, **kwargs)

    @event.listens_for(engine, "connect")
    def _sqlite_connect(dbapi_connection, _record):
        # Let SQLAlchemy emit BEGIN (below) instead of the sqlite3 module's legacy transaction control.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_S * 1000}")
            if not _is_memory_sqlite(url):
                cursor.execute("PRAGMA journal_mode = WAL")
            cursor.execute("PRAGMA foreign_keys = ON")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _sqlite_begin(conn):
        conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get(WRITE_OPTION) else "BEGIN")

    return engine


def _after_fork_in_child() -> None:
    # The child must not use (or close) the parent's pooled connections: forget them without closing.
    for engine in list(_engines.values()):
        engine.dispose(close=False)
    _engines.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def get_engine(url: str | URL | None = None, *, migrate: bool = True) -> Engine:
    """The process's engine for ``url`` (see :func:`database_url`), schema upgraded on first use."""
    url_str = database_url(url)
    key = (url_str, os.getpid())
    engine = _engines.get(key)
    if engine is not None and (not migrate or url_str in _migrated):
        return engine
    with _lock:
        engine = _engines.get(key)
        if engine is None:
            engine = _create_engine(url_str)
            _engines[key] = engine
        if migrate and url_str not in _migrated:
            upgrade(engine)
            _migrated.add(url_str)
    return engine


def write_engine(engine: Engine) -> Engine:
    """The same engine (and pool), for write transactions: ``BEGIN IMMEDIATE`` on SQLite."""
    return engine.execution_options(**{WRITE_OPTION: True})


def alembic_config(url: str | URL | None = None):
    """An Alembic Config for this package's migrations, built in code (no alembic.ini)."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR).replace("%", "%%"))
    cfg.set_main_option("sqlalchemy.url", database_url(url).replace("%", "%%"))
    return cfg


class SchemaTooNew(RuntimeError):
    """The database was migrated by a newer panoptic-batch than this one (a rolling upgrade's old
    worker, or a machine left behind): this code neither knows nor may change its schema."""


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Run ``alembic upgrade`` on ``engine``; safe when several processes do it at once.
    SchemaTooNew when the database is at a revision these migrations do not have."""
    from alembic import command
    from alembic.migration import MigrationContext
    from alembic.script import ScriptDirectory

    cfg = alembic_config(engine.url)
    with engine.connect() as conn:
        conn.execution_options(**{WRITE_OPTION: True})
        conn.begin()  # SQLite: BEGIN IMMEDIATE, held (and waited for) until the commit below
        if engine.dialect.name == "postgresql":
            conn.execute(select(func.pg_advisory_xact_lock(_PG_MIGRATION_LOCK_KEY)))
        script = ScriptDirectory.from_config(cfg)
        known = {rev.revision for rev in script.walk_revisions()}
        unknown = [rev for rev in MigrationContext.configure(conn).get_current_heads() if rev not in known]
        if unknown:
            raise SchemaTooNew(
                f"its schema is at revision {', '.join(unknown)}, newer than this panoptic-batch's "
                f"({', '.join(script.get_heads())}): a newer panoptic-batch migrated it; install that version here")
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)
        conn.commit()


def dispose_all() -> None:
    """Close every engine this process made (tests; long-lived processes changing URLs)."""
    with _lock:
        for (url_str, pid), engine in list(_engines.items()):
            if pid == os.getpid():
                engine.dispose()
            del _engines[(url_str, pid)]
        _migrated.clear()


@contextmanager
def session(url: str | URL | None = None, *, write: bool = False) -> Iterator[Session]:
    """An ORM session in one transaction: committed on success, rolled back on error."""
    engine = get_engine(url)
    bind = write_engine(engine) if write else engine
    with Session(bind, expire_on_commit=False) as s, s.begin():
        yield s
