"""What every part of the job store shares: the tables, transactions retried across database
restarts, dropped connections and deadlocks, job ids and their prefixes, and small SQL helpers."""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

from sqlalchemy import Connection, Text, bindparam, column, func, select, table
from sqlalchemy.exc import DBAPIError, OperationalError

from storage.db import get_engine, write_engine
from storage.retry import retry_transient
from storage.schema import Image, ImageClass, Job, OutputName

from .records import _MIN_PREFIX, AmbiguousJobId, JobNotFound


T = TypeVar("T")
jobs_t = Job.__table__
images_t = Image.__table__
classes_t = ImageClass.__table__
names_t = OutputName.__table__
_ACTIVE_JOB_STATES = ("pending", "running")
_HEX = re.compile(r"^[0-9a-f]+$")
_IN_CHUNK = 500  # ids per IN (…) list
_MAX_ERROR_CHARS = 20_000

# PostgreSQL: deadlock detected, serialization failure. Such a transaction is safe to run again.
_RETRY_SQLSTATES = frozenset({"40P01", "40001"})

# PostgreSQL: the connection went away or could not be made for now (class 08: connection
# exception; 57P01-03: server shut down / crashed / starting up; 53300: too many connections).
_DISCONNECT_SQLSTATES = frozenset({"57P01", "57P02", "57P03", "53300"})

# Transactions and connects are retried across a database restart or a dropped connection with
# storage.retry's backoff: at most 12 tries and 0.05 + 0.1 + … + 5 + 5 ≈ 26 s of sleeping.
_DB_RETRY = dict(attempts=12, base_delay=0.05, max_delay=5.0)


def _retryable(exc: BaseException, dialect: str = "postgresql") -> bool:
    """Whether running the transaction again may succeed: a deadlock or serialization failure, or
    a lost or refused connection (a database restart, ``pg_terminate_backend``, a network reset)."""
    if not isinstance(exc, DBAPIError):
        return False
    if exc.connection_invalidated:       # SQLAlchemy saw a disconnect; the pool dropped the connection
        return True
    sqlstate = getattr(exc.orig, "sqlstate", None)
    if sqlstate in _RETRY_SQLSTATES or sqlstate in _DISCONNECT_SQLSTATES or (sqlstate or "").startswith("08"):
        return True
    # psycopg reports a failed connect ("connection refused", "server closed the connection")
    # as an OperationalError without a SQLSTATE. SQLite's OperationalErrors are not about
    # connections (a busy database has waited out its busy_timeout already).
    return dialect == "postgresql" and isinstance(exc, OperationalError) and sqlstate is None


def _chunks(seq: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    for start in range(0, len(seq), size):
        yield seq[start:start + size]


def _pg_text_array(values: list[str]):
    """A bound ``text[]`` parameter (PostgreSQL)."""
    from sqlalchemy.dialects.postgresql import ARRAY

    return bindparam(None, values, type_=ARRAY(Text))


def _clip_error(error) -> str:
    text = str(error)
    return text if len(text) <= _MAX_ERROR_CHARS else text[:_MAX_ERROR_CHARS] + "… (truncated)"


@functools.cache
def _database_id(url: str) -> str:
    engine = get_engine(url)
    if engine.dialect.name != "postgresql":
        return "sqlite:" + hashlib.sha256(str(engine.url.database).encode()).hexdigest()[:16]
    databases = table("pg_database", column("oid"), column("datname"))
    control = func.pg_control_system().table_valued("system_identifier")
    with engine.connect() as conn:
        oid = conn.scalar(select(databases.c.oid).where(databases.c.datname == func.current_database()))
        try:
            cluster = conn.scalar(select(control.c.system_identifier))
        except DBAPIError:          # not allowed on some hosted services: the name tells clusters apart less well
            conn.rollback()
            cluster = conn.scalar(select(func.current_database()))
    return f"postgresql:{cluster}:{oid}"


class Transactions:
    """The database at ``url`` (see storage.db): transactions, read snapshots and job ids,
    for the parts of JobStore to build on."""

    def __init__(self, url: str | None = None):
        self._url = url

    @property
    def engine(self):
        return get_engine(self._url)  # per process; schema upgraded on first use

    def _write(self, fn: Callable[[Connection], T]) -> T:
        """Run ``fn`` in one write transaction (BEGIN IMMEDIATE on SQLite).

        Deadlocks, serialization failures and lost connections are retried with backoff
        (``_DB_RETRY``). Running a transaction again is safe: every one here either did not commit
        or, if the commit went through but its answer was lost, finds its work done (fenced
        updates match nothing the second time; image inserts skip existing keys). What such a
        lost answer can leave behind — a claim nobody works on, released images nobody queued —
        is recovered by the reaper (lease expiry, stale pending images); create_job would draw a
        new id and leave an empty, never-submitted job row.
        """
        engine = write_engine(self.engine)
        dialect = engine.dialect.name

        def transaction() -> T:
            with engine.begin() as conn:
                return fn(conn)

        return retry_transient(transaction, is_transient=lambda exc: _retryable(exc, dialect),
                               what="database transaction", **_DB_RETRY)

    def _read(self):
        """A read-only connection seeing one consistent snapshot (PG: REPEATABLE READ).

        Connecting is retried like a transaction in :meth:`_write` (the pool pings a connection
        before handing it out, so one the server dropped is replaced, not used)."""
        engine = self.engine
        if engine.dialect.name == "postgresql":
            engine = engine.execution_options(isolation_level="REPEATABLE READ")
        dialect = engine.dialect.name
        return retry_transient(engine.connect, is_transient=lambda exc: _retryable(exc, dialect),
                               what="database connect", **_DB_RETRY)

    def _query(self, fn: Callable[[Connection], T]) -> T:
        """``fn(conn)`` on a :meth:`_read` connection, run again if the connection is lost meanwhile."""
        dialect = self.engine.dialect.name

        def attempt() -> T:
            with self._read() as conn:
                return fn(conn)

        return retry_transient(attempt, is_transient=lambda exc: _retryable(exc, dialect),
                               what="database query", **_DB_RETRY)

    @staticmethod
    def _resolve(conn: Connection, job_id: str) -> str:
        """The full id of ``job_id`` (an id, or a unique prefix of at least 4 characters)."""
        if not isinstance(job_id, str) or not job_id:
            raise JobNotFound(str(job_id))
        if conn.scalar(select(jobs_t.c.id).where(jobs_t.c.id == job_id)) is not None:
            return job_id
        prefix = job_id.lower()
        if len(prefix) >= _MIN_PREFIX and _HEX.match(prefix):
            matches = conn.scalars(
                select(jobs_t.c.id).where(jobs_t.c.id.startswith(prefix, autoescape=True)).limit(5)
            ).all()
            if len(matches) == 1:
                return matches[0]
            if len(matches) > 1:
                raise AmbiguousJobId(job_id, f"job id prefix {job_id!r} is ambiguous: it matches "
                                             f"{', '.join(sorted(matches))}{', …' if len(matches) == 5 else ''}")
        raise JobNotFound(job_id)

    def resolve(self, job_id: str) -> str:
        """The full job id for an id or a unique prefix; JobNotFound otherwise."""
        return self._query(lambda conn: self._resolve(conn, job_id))

    def database_id(self) -> str:
        """What tells this database from any other, the same from every client (chunk messages
        carry it, so that a worker connected to another database leaves them on the broker):
        PostgreSQL's cluster system identifier and the database's oid; SQLite's file path."""
        return _database_id(self.engine.url.render_as_string(hide_password=False))
