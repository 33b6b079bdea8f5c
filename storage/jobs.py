"""The job repository: jobs, images, leases and per-class statistics in SQL.

Exactly-once effects come from here, not from the broker (see CONTRACTS.md, "Facts learned the
hard way"):

- :meth:`JobStore.claim` takes an image with a lease and a fencing token in one conditional
  ``UPDATE … WHERE pending OR lease expired``; a second claimant gets ``None``.
- :meth:`JobStore.heartbeat` extends the leases a token still holds.
- :meth:`JobStore.record_success` / :meth:`JobStore.record_failure` / :meth:`JobStore.release`
  apply only while the image is running under the same token, in one transaction with the job's
  counters (``x = x + 1``) and, for successes, the replacement of the image's per-class rows.
  A worker whose lease expired and was re-claimed changes nothing.

Tokens must be unique per claim (a fresh ``uuid4().hex`` per claim or per chunk delivery): fencing
can only tell claims apart by their tokens. Lease expiry is compared against this process's clock
(UTC), so the machines' clocks should agree to well within a lease.

Every method opens and closes its own transaction and returns plain dataclasses or dicts.
"""

from __future__ import annotations

import functools
import hashlib
import re
import secrets
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit, urlunsplit

from sqlalchemy import (Connection, Text, any_, bindparam, case, column, delete, func, insert, or_, select, table,
                        update)
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError

from storage.db import get_engine, write_engine
from storage.labelmaps import read_label_map, record_label_map
from storage.retry import retry_transient
from storage.schema import FINISHED_JOB_STATES, Image, ImageClass, Job, OutputName, utcnow

__all__ = [
    "JobStore", "JobStatus", "ImageRecord", "ClaimedImage",
    "JobNotFound", "AmbiguousJobId", "JobStateError", "TIMING_FIELDS",
]

T = TypeVar("T")

jobs_t = Job.__table__
images_t = Image.__table__
classes_t = ImageClass.__table__
names_t = OutputName.__table__

TIMING_FIELDS = ("decode_ms", "model_ms", "postprocess_ms", "upload_ms")
_ACTIVE_JOB_STATES = ("pending", "running")
# Stopped before the end, by `cancel` or by an interrupted `run`: `retry` (or the same `run`) reopens them.
_STOPPED_JOB_STATES = ("cancelled", "interrupted")
_MIN_PREFIX = 4
_HEX = re.compile(r"^[0-9a-f]+$")
_IN_CHUNK = 500  # ids per IN (…) list
_PAGE = 1000  # rows per page when streaming images
_MAX_ERROR_CHARS = 20_000
# PostgreSQL: deadlock detected, serialization failure. Such a transaction is safe to run again.
_RETRY_SQLSTATES = frozenset({"40P01", "40001"})
# PostgreSQL: the connection went away or could not be made for now (class 08: connection
# exception; 57P01-03: server shut down / crashed / starting up; 53300: too many connections).
_DISCONNECT_SQLSTATES = frozenset({"57P01", "57P02", "57P03", "53300"})
# Transactions and connects are retried across a database restart or a dropped connection with
# storage.retry's backoff: at most 12 tries and 0.05 + 0.1 + … + 5 + 5 ≈ 26 s of sleeping.
_DB_RETRY = dict(attempts=12, base_delay=0.05, max_delay=5.0)


class JobNotFound(KeyError):
    """No job has this id (or unique id prefix)."""

    def __init__(self, job_id: str, message: str | None = None):
        self.job_id = job_id
        self.message = message or (
            f"no job with id {job_id!r} (give a full job id or a unique prefix of at least "
            f"{_MIN_PREFIX} characters; `panoptic-batch status` lists the jobs)"
        )
        super().__init__(self.message)

    def __str__(self) -> str:  # KeyError would print the repr of its argument
        return self.message


class AmbiguousJobId(JobNotFound):
    """The prefix matches several jobs."""


class JobStateError(ValueError):
    """The job's state does not allow this operation (for example, retrying a cancelled job)."""


@dataclass(frozen=True)
class ClaimedImage:
    id: int
    job_id: str
    key: str
    uri: str
    etag: str | None
    attempts: int  # including this claim
    size: int | None = None


@dataclass(frozen=True)
class JobStatus:
    id: str
    name: str
    source: str
    dest: str
    model: str
    weights: str
    weights_sha256: str | None
    threshold: float
    state: str
    total: int
    succeeded: int
    failed: int
    pending: int
    running: int
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    rate: float  # images finished (succeeded + failed) per second since started_at
    min_size: int = 800
    max_size: int = 1333
    config: dict[str, Any] = field(default_factory=dict)
    submitted_at: datetime | None = None
    label_map_sha256: str | None = None     # None: the COCO categories (worker.labels.job_label_map)

    @property
    def finished(self) -> bool:
        return self.state in FINISHED_JOB_STATES

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: datetimes as ISO 8601 strings (UTC)."""
        return _json_ready(self)


def _json_ready(record) -> dict[str, Any]:
    return {key: value.isoformat() if isinstance(value, datetime) else value
            for key, value in asdict(record).items()}


@dataclass(frozen=True)
class ImageSuccess:
    """A processed image's result, as `JobStore.record_successes` records it."""
    image_id: int
    output_png: str
    output_json: str
    height: int
    width: int
    segments_info: Sequence[dict[str, Any]]
    timings: dict[str, Any] | None = None


@dataclass(frozen=True)
class ImageRecord:
    id: int
    job_id: str
    key: str
    uri: str
    etag: str | None
    size: int | None
    state: str
    attempts: int
    error: str | None
    lease_token: str | None
    lease_expires_at: datetime | None
    output_png: str | None
    output_json: str | None
    height: int | None
    width: int | None
    segments: int | None
    decode_ms: float | None
    model_ms: float | None
    postprocess_ms: float | None
    upload_ms: float | None
    updated_at: datetime | None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: datetimes as ISO 8601 strings (UTC)."""
        return _json_ready(self)


_IMAGE_FIELDS = tuple(ImageRecord.__dataclass_fields__)


# ---------------------------------------------------------------------------------------------
# Credentials in URLs

_SECRET_QUERY_KEYS = re.compile(
    r"^(x-amz-(credential|signature|security-token)|x-goog-(credential|signature)|awsaccesskeyid|"
    r"signature|sig|token|access_token|auth|authorization|api_key|apikey|key|password|secret|"
    r"client_secret)$",
    re.IGNORECASE,
)


def _mask_url_fallback(value: str) -> str:
    """Hide the password (or a bare user token) and signed-URL secrets; leave non-URLs alone."""
    if "://" not in value:
        return value
    try:
        parts = urlsplit(value)
    except ValueError:
        return value
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        user, colon, _password = userinfo.partition(":")
        netloc = f"{user}:***@{host}" if colon else f"***@{host}"
    query = parts.query
    if query:
        pairs = []
        for pair in query.split("&"):
            name, eq, _val = pair.partition("=")
            pairs.append(f"{name}=***" if eq and _SECRET_QUERY_KEYS.match(unquote(name)) else pair)
        query = "&".join(pairs)
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def mask_url(value: str) -> str:
    """storage.objects.mask_url when that exists, else the small fallback above."""
    try:
        from storage.objects import mask_url as objects_mask_url
    except ImportError:
        return _mask_url_fallback(value)
    return objects_mask_url(value)


# ---------------------------------------------------------------------------------------------


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


def _check_token(token: str) -> None:
    # A None token would compare as IS NULL and match unleased rows: refuse it outright.
    if not isinstance(token, str) or not token:
        raise ValueError("a lease token must be a non-empty string")


def _timings(timings: dict[str, Any] | None) -> dict[str, float | None]:
    timings = timings or {}
    out: dict[str, float | None] = {}
    for name in TIMING_FIELDS:
        value = timings.get(name, timings.get(name[:-3]))
        out[name] = None if value is None else float(value)
    return out


def _pg_text_array(values: list[str]):
    """A bound ``text[]`` parameter (PostgreSQL)."""
    from sqlalchemy.dialects.postgresql import ARRAY

    return bindparam(None, values, type_=ARRAY(Text))


def _clip_error(error) -> str:
    text = str(error)
    return text if len(text) <= _MAX_ERROR_CHARS else text[:_MAX_ERROR_CHARS] + "… (truncated)"


def _insert_new_images(conn: Connection, rows: list[dict[str, Any]]) -> list[int]:
    """INSERT image rows, skipping keys the job has already (ON CONFLICT DO NOTHING); new ids, sorted."""
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as dialect_insert
    else:
        from sqlalchemy.dialects.sqlite import insert as dialect_insert
    stmt = (dialect_insert(images_t)
            .on_conflict_do_nothing(index_elements=["job_id", "key"])
            .returning(images_t.c.id))
    return sorted(conn.scalars(stmt, rows).all())


@functools.cache
def _pg_insert_images():
    """PostgreSQL: ``INSERT INTO images … SELECT … FROM unnest(:keys, :uris, :etags, :sizes)
    ON CONFLICT (job_id, key) DO NOTHING RETURNING id``, the per-batch values bound as arrays."""
    from sqlalchemy.dialects.postgresql import ARRAY, insert as pg_insert

    c = images_t.c
    rows = func.unnest(*(bindparam(name, type_=ARRAY(column.type))
                         for name, column in (("keys", c.key), ("uris", c.uri), ("etags", c.etag), ("sizes", c.size)))
                       ).table_valued("key", "uri", "etag", "size").render_derived()
    constant = {name: bindparam(name, type_=c[name].type) for name in ("job_id", "state", "attempts", "updated_at")}
    query = select(constant["job_id"], rows.c.key, rows.c.uri, rows.c.etag, rows.c.size,
                   constant["state"], constant["attempts"], constant["updated_at"])
    return (pg_insert(images_t)
            .from_select(["job_id", "key", "uri", "etag", "size", "state", "attempts", "updated_at"], query)
            .on_conflict_do_nothing(index_elements=["job_id", "key"])
            .returning(images_t.c.id))


def _of_broker(broker: str):
    """Jobs whose config records ``broker``, or no broker at all (jobs older than the record)."""
    recorded = jobs_t.c.config["broker"].as_string()
    return or_(recorded == broker, recorded.is_(None))


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


@functools.cache
def _pg_insert_names():
    """PostgreSQL: output names bound as two arrays, ``ON CONFLICT DO NOTHING RETURNING name``."""
    from sqlalchemy.dialects.postgresql import ARRAY, insert as pg_insert

    rows = func.unnest(bindparam("names", type_=ARRAY(Text)), bindparam("keys", type_=ARRAY(Text))
                       ).table_valued("name", "key").render_derived()
    query = select(bindparam("job_id", type_=names_t.c.job_id.type), rows.c.name, rows.c.key)
    return (pg_insert(names_t).from_select(["job_id", "name", "key"], query)
            .on_conflict_do_nothing(index_elements=["job_id", "name"]).returning(names_t.c.name))


class JobStore:
    """Jobs, images, leases and statistics in the database at ``url`` (see storage.db)."""

    def __init__(self, url: str | None = None):
        self._url = url

    # -- plumbing -------------------------------------------------------------------------------

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

    @staticmethod
    def _maybe_finish(conn: Connection, job_id: str, now: datetime) -> None:
        """Finish a submitted, active job whose images are all done (same transaction as the counters)."""
        conn.execute(
            update(jobs_t)
            .where(
                jobs_t.c.id == job_id,
                jobs_t.c.state.in_(_ACTIVE_JOB_STATES),
                jobs_t.c.submitted_at.is_not(None),
                jobs_t.c.succeeded + jobs_t.c.failed >= jobs_t.c.total,
            )
            .values(
                state=case(
                    (jobs_t.c.failed == 0, "succeeded"),
                    (jobs_t.c.succeeded == 0, "failed"),
                    else_="partial",
                ),
                finished_at=now,
            )
        )

    # -- jobs -----------------------------------------------------------------------------------

    def create_job(self, name: str | None, source: str, dest: str, model: str, weights: str,
                   threshold: float, min_size: int, max_size: int, config: dict | None = None,
                   label_map: tuple[str, list[dict[str, Any]]] | None = None) -> str:
        """A new pending job; returns its id (12 random hex digits). ``label_map``: (SHA-256,
        categories) of the job's label map, stored in the same transaction; None: COCO's."""
        now = utcnow()
        values = dict(
            name=name or source.rstrip("/").rsplit("/", 1)[-1] or source,
            source=source, dest=dest, model=model,
            weights=mask_url(str(weights)),
            weights_sha256=None,
            threshold=float(threshold), min_size=int(min_size), max_size=int(max_size),
            config=dict(config or {}),
            state="pending", total=0, succeeded=0, failed=0, created_at=now,
            label_map_sha256=label_map[0] if label_map else None,
        )

        def tx(conn: Connection) -> None:
            if label_map:
                record_label_map(conn, *label_map)
            conn.execute(insert(jobs_t).values(id=job_id, **values))

        for _ in range(10):
            job_id = secrets.token_hex(6)
            try:
                self._write(tx)
            except IntegrityError:  # 48-bit id collision: draw again
                continue
            return job_id
        raise RuntimeError("could not draw an unused job id")

    def add_images(self, job_id: str, entries: Iterable[tuple[str, str, str | None, int | None]],
                   batch_size: int = 1000) -> Iterator[list[int]]:
        """Insert ``(key, uri, etag, size)`` entries in batches; yield each batch's new image ids.

        A generator: nothing happens until it is iterated. Each batch is one transaction (bulk
        insert + ``jobs.total`` bump) committed before its ids are yielded, so the caller can enqueue
        them at once; memory stays bounded by ``batch_size``. Keys already in the job (or repeated
        in the batch) are skipped. Call :meth:`finalize_submission` when done.
        """
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        job_id = self.resolve(job_id)
        batch: list[tuple] = []
        for entry in entries:
            batch.append(entry)
            if len(batch) >= batch_size:
                yield self._insert_batch(job_id, batch)
                batch = []
        if batch:
            yield self._insert_batch(job_id, batch)

    def _insert_batch(self, job_id: str, batch: list[tuple]) -> list[int]:
        now = utcnow()
        rows: dict[str, dict[str, Any]] = {}
        for entry in batch:
            key, uri, etag, size = (tuple(entry) + (None, None))[:4]
            if key not in rows:
                rows[key] = dict(job_id=job_id, key=key, uri=uri, etag=etag,
                                 size=None if size is None else int(size),
                                 state="pending", attempts=0, updated_at=now)

        def tx(conn: Connection) -> list[int]:
            if conn.dialect.name == "postgresql":
                # One statement with four array parameters: its text is short and the same for
                # every batch, where a multi-row VALUES list of 1,000 × 8 placeholders had to be
                # rendered by SQLAlchemy and re-parsed by psycopg for each batch (a fifth of submit).
                columns = {name: [row[name] for row in rows.values()] for name in ("key", "uri", "etag", "size")}
                ids = sorted(conn.scalars(_pg_insert_images(), dict(
                    job_id=job_id, state="pending", attempts=0, updated_at=now,
                    keys=columns["key"], uris=columns["uri"], etags=columns["etag"], sizes=columns["size"])).all())
            else:
                ids = _insert_new_images(conn, list(rows.values()))
            if ids:
                conn.execute(update(jobs_t).where(jobs_t.c.id == job_id)
                             .values(total=jobs_t.c.total + len(ids)))
            return ids

        return self._write(tx)

    def claim_output_names(self, job_id: str, entries: Sequence[tuple[str, str]]) -> dict[str, str]:
        """Record ``(key, output name)`` pairs of the job, first come first served, in one
        transaction. Returns ``{key: the key that holds its name}`` for every key whose name was
        claimed before it, in an earlier call or earlier in ``entries``: an output conflict. A key
        that holds its name already (a batch recorded twice) is not one. The database decides (a
        primary key on job and name), so keys far apart in a listing of millions are still caught."""
        first: dict[str, str] = {}                  # name → its first key in this batch
        later: dict[str, str] = {}                  # key → the name another key here took first
        for key, name in entries:
            if first.setdefault(name, key) != key:
                later[key] = name
        if not first:
            return {}

        def tx(conn: Connection) -> dict[str, str]:
            names = list(first)
            if conn.dialect.name == "postgresql":
                inserted = set(conn.scalars(_pg_insert_names(), dict(
                    job_id=job_id, names=names, keys=[first[name] for name in names])).all())
            else:
                from sqlalchemy.dialects.sqlite import insert as sqlite_insert
                inserted = set(conn.scalars(
                    sqlite_insert(names_t).on_conflict_do_nothing().returning(names_t.c.name),
                    [dict(job_id=job_id, name=name, key=first[name]) for name in names]).all())
            holders: dict[str, str] = {}
            taken = [name for name in names if name not in inserted]
            for group in _chunks(taken, _IN_CHUNK):
                holders.update(conn.execute(select(names_t.c.name, names_t.c.key)
                                            .where(names_t.c.job_id == job_id, names_t.c.name.in_(group))).all())
            return holders

        holders = self._write(tx)
        conflicts = {first[name]: holder for name, holder in holders.items() if holder != first[name]}
        for key, name in later.items():             # the holder, not a first key that lost too
            conflicts[key] = holders.get(name, first[name])
        return conflicts

    def add_failed_images(self, job_id: str, entries: Iterable[tuple[str, str, str | None, int | None, str]]) -> list[int]:
        """Record ``(key, uri, etag, size, error)`` images that fail before any work is done (their
        outputs would overwrite another image's, say), in one transaction; they count in the
        job's total and failed. Keys already in the job are skipped. Returns the new ids."""
        job_id = self.resolve(job_id)
        now = utcnow()
        rows: dict[str, dict[str, Any]] = {}
        for key, uri, etag, size, error in entries:
            rows.setdefault(key, dict(job_id=job_id, key=key, uri=uri, etag=etag,
                                      size=None if size is None else int(size), state="failed",
                                      attempts=0, error=_clip_error(error), updated_at=now))
        if not rows:
            return []

        def tx(conn: Connection) -> list[int]:
            ids = _insert_new_images(conn, list(rows.values()))
            if ids:
                conn.execute(update(jobs_t).where(jobs_t.c.id == job_id).values(
                    total=jobs_t.c.total + len(ids), failed=jobs_t.c.failed + len(ids)))
            return ids

        return self._write(tx)

    def finalize_submission(self, job_id: str) -> JobStatus:
        """Mark the job fully submitted; finish it now if every image is already done (or none)."""
        now = utcnow()

        def tx(conn: Connection) -> None:
            full_id = self._resolve(conn, job_id)
            conn.execute(update(jobs_t).where(jobs_t.c.id == full_id, jobs_t.c.submitted_at.is_(None))
                         .values(submitted_at=now))
            self._maybe_finish(conn, full_id, now)

        self._write(tx)
        return self.job(job_id)

    def fail_unfinished(self, job_id: str, error: str) -> int:
        """Fail the job's pending images with ``error`` and mark it fully submitted, so that it
        finishes (a submission that could not queue them: nothing would ever process them).
        Running images finish as their workers record them. Returns how many were failed."""
        now = utcnow()
        text = _clip_error(error)

        def tx(conn: Connection) -> int:
            full_id = self._resolve(conn, job_id)
            failed = conn.execute(update(images_t)
                                  .where(images_t.c.job_id == full_id, images_t.c.state == "pending")
                                  .values(state="failed", error=text, updated_at=now)).rowcount
            conn.execute(update(jobs_t).where(jobs_t.c.id == full_id)
                         .values(failed=jobs_t.c.failed + failed,
                                 submitted_at=func.coalesce(jobs_t.c.submitted_at, now)))
            self._maybe_finish(conn, full_id, now)
            return failed

        return self._write(tx)

    def delete_jobs(self, job_ids: Iterable[str], only_finished: bool = False) -> dict[str, dict[str, int]]:
        """Delete jobs with their images and per-class rows (outputs in DEST are not touched).

        With ``only_finished``, a job that is not finished when its transaction runs (a `retry`
        made it run again) is left alone. One transaction per job. Returns, per job deleted,
        ``{"images": n, "class_rows": n}``."""
        deleted: dict[str, dict[str, int]] = {}
        for job_id in job_ids:
            def tx(conn: Connection, job_id=job_id) -> dict[str, int] | None:
                where = [jobs_t.c.id == job_id]
                if only_finished:
                    where.append(jobs_t.c.state.in_(FINISHED_JOB_STATES))
                # The job's row locked first (PG): a concurrent retry waits, then finds nothing.
                if conn.scalar(select(jobs_t.c.id).where(*where).with_for_update()) is None:
                    return None
                class_rows = conn.execute(delete(classes_t).where(classes_t.c.job_id == job_id)).rowcount
                images = conn.execute(delete(images_t).where(images_t.c.job_id == job_id)).rowcount
                conn.execute(delete(jobs_t).where(jobs_t.c.id == job_id))
                return {"images": images, "class_rows": class_rows}

            counts = self._write(tx)
            if counts is not None:
                deleted[job_id] = counts
        return deleted

    def finished_before(self, cutoff: datetime, states: Iterable[str] = FINISHED_JOB_STATES) -> list[dict[str, Any]]:
        """Finished jobs (in ``states``) that finished before ``cutoff``, oldest first, with their
        row counts: ``{"id", "name", "state", "finished_at", "images", "class_rows"}``."""
        states = tuple(states)
        if not states or set(states) - set(FINISHED_JOB_STATES):
            raise ValueError(f"only finished jobs ({', '.join(FINISHED_JOB_STATES)}) can be selected")

        def query(conn: Connection) -> list[dict[str, Any]]:
            rows = conn.execute(select(jobs_t.c.id, jobs_t.c.name, jobs_t.c.state, jobs_t.c.finished_at)
                                .where(jobs_t.c.state.in_(states), jobs_t.c.finished_at < cutoff)
                                .order_by(jobs_t.c.finished_at, jobs_t.c.id)).all()
            found = []
            for row in rows:
                images = conn.scalar(select(func.count()).select_from(images_t).where(images_t.c.job_id == row.id))
                class_rows = conn.scalar(select(func.count()).select_from(classes_t)
                                         .where(classes_t.c.job_id == row.id))
                found.append({"id": row.id, "name": row.name, "state": row.state, "finished_at": row.finished_at,
                              "images": int(images or 0), "class_rows": int(class_rows or 0)})
            return found

        return self._query(query)

    def set_weights_sha256(self, job_id: str, sha: str) -> str:
        """Record the weights' SHA-256 unless one is recorded already; return the recorded one."""
        def tx(conn: Connection) -> str:
            full_id = self._resolve(conn, job_id)
            conn.execute(update(jobs_t).where(jobs_t.c.id == full_id, jobs_t.c.weights_sha256.is_(None))
                         .values(weights_sha256=sha))
            return conn.scalar(select(jobs_t.c.weights_sha256).where(jobs_t.c.id == full_id))

        return self._write(tx)

    def cancel(self, job_id: str) -> bool:
        """Cancel a pending, running or interrupted job (claims stop; results of images in flight
        still count). `retry` undoes it.

        Returns False when the job had already finished or been cancelled.
        """
        now = utcnow()

        def tx(conn: Connection) -> bool:
            full_id = self._resolve(conn, job_id)
            result = conn.execute(update(jobs_t)
                                  .where(jobs_t.c.id == full_id,
                                         jobs_t.c.state.in_(_ACTIVE_JOB_STATES + ("interrupted",)))
                                  .values(state="cancelled", finished_at=now))
            return result.rowcount == 1

        return self._write(tx)

    def interrupt(self, job_id: str) -> bool:
        """Mark a pending or running job interrupted (its `run` was stopped; its claims are given
        back by then). Returns False when the job had finished or was cancelled meanwhile."""
        def tx(conn: Connection) -> bool:
            full_id = self._resolve(conn, job_id)
            return conn.execute(update(jobs_t)
                                .where(jobs_t.c.id == full_id, jobs_t.c.state.in_(_ACTIVE_JOB_STATES))
                                .values(state="interrupted")).rowcount == 1

        return self._write(tx)

    def find_interrupted(self, run_key: str) -> str | None:
        """The newest interrupted job whose config has this ``run_key`` (the same `run` command)."""
        return self._query(lambda conn: conn.scalar(
            select(jobs_t.c.id)
            .where(jobs_t.c.state == "interrupted", jobs_t.c.config["run_key"].as_string() == run_key)
            .order_by(jobs_t.c.created_at.desc(), jobs_t.c.id).limit(1)))

    def resume(self, job_id: str) -> list[int]:
        """Reopen an interrupted job for the process that resumes it: running again, and every image
        of it still running goes back to pending (its holder, if any, was the interrupted run:
        its token is void). Returns the pending image ids, to process. JobStateError unless the
        job is interrupted."""
        now = utcnow()

        def tx(conn: Connection) -> list[int]:
            full_id = self._resolve(conn, job_id)
            reopened = conn.execute(update(jobs_t).where(jobs_t.c.id == full_id, jobs_t.c.state == "interrupted")
                                    .values(state="running",
                                            started_at=func.coalesce(jobs_t.c.started_at, now))).rowcount
            if reopened != 1:
                raise JobStateError(f"job {full_id} is not interrupted; it cannot be resumed")
            conn.execute(update(images_t).where(images_t.c.job_id == full_id, images_t.c.state == "running")
                         .values(state="pending", lease_token=None, lease_expires_at=None, updated_at=now))
            self._maybe_finish(conn, full_id, now)      # nothing was left (a retry that found nothing)
            return list(conn.scalars(select(images_t.c.id).where(images_t.c.job_id == full_id,
                                                                 images_t.c.state == "pending")
                                     .order_by(images_t.c.id)).all())

        return self._write(tx)

    def reset_failed(self, job_id: str, unless_error_starts: str | None = None,
                     reopen_as: str = "running") -> list[int]:
        """Failed images back to pending (attempts and error cleared); the job runs again.

        Images whose error starts with ``unless_error_starts`` stay failed (failures that running
        again would not mend, or would make harmful). A cancelled or interrupted job is reopened
        (see :meth:`reset_images`). Returns the ids to enqueue.
        """
        return self.reset_images(job_id, states=("failed",), unless_error_starts=unless_error_starts,
                                 reopen_as=reopen_as)

    def reset_images(self, job_id: str, image_ids: Iterable[int] | None = None,
                     states: Iterable[str] = ("failed",), unless_error_starts: str | None = None,
                     reopen_as: str = "running") -> list[int]:
        """Put finished images (``states`` among failed/succeeded) back to pending for reprocessing.

        Counters are decremented and a reset image's class rows are dropped in the same
        transaction; the job goes back to running. Running images cannot be reset (their lease
        holder would still write), nor images whose error starts with ``unless_error_starts``.
        Returns the ids reset.

        The job goes to state ``reopen_as``: ``running``, or ``interrupted`` for a job of `run`
        (which has no broker: the same `run` command resumes it). A cancelled or interrupted job
        is reopened so, and its pending images are returned too: their queued messages were
        dropped while it was stopped.
        """
        if reopen_as not in ("running", "interrupted"):
            raise ValueError("a job is reopened as running or interrupted")
        states = tuple(states)
        if not states or set(states) - {"failed", "succeeded"}:
            raise ValueError("only failed and succeeded images can be reset")
        wanted = None if image_ids is None else sorted({int(i) for i in image_ids})
        now = utcnow()

        def tx(conn: Connection) -> list[int]:
            full_id = self._resolve(conn, job_id)
            job_state = conn.scalar(select(jobs_t.c.state).where(jobs_t.c.id == full_id))
            stopped = job_state in _STOPPED_JOB_STATES
            # Before the reset below adds to them: the images that waited when the job stopped.
            waiting = list(conn.scalars(select(images_t.c.id).where(
                images_t.c.job_id == full_id, images_t.c.state == "pending")).all()) if stopped else []
            reset: list[tuple[int, str]] = []
            groups = [None] if wanted is None else list(_chunks(wanted, _IN_CHUNK))
            for group in groups:
                where = [images_t.c.job_id == full_id, images_t.c.state.in_(states)]
                if group is not None:
                    where.append(images_t.c.id.in_(group))
                if unless_error_starts:
                    where.append(or_(images_t.c.error.is_(None),
                                     ~images_t.c.error.startswith(unless_error_starts, autoescape=True)))
                # Old states first (RETURNING gives new values), under the rows' locks.
                old = conn.execute(select(images_t.c.id, images_t.c.state).where(*where)
                                   .with_for_update()).all()
                if not old:
                    continue
                ids = [row.id for row in old]
                conn.execute(update(images_t).where(images_t.c.id.in_(ids))
                             .values(state="pending", attempts=0, error=None, lease_token=None,
                                     lease_expires_at=None, updated_at=now))
                conn.execute(delete(classes_t).where(classes_t.c.image_id.in_(ids)))
                reset.extend((row.id, row.state) for row in old)
            if not reset and not stopped:
                return []
            n_failed = sum(1 for _, s in reset if s == "failed")
            n_succeeded = len(reset) - n_failed
            conn.execute(update(jobs_t).where(jobs_t.c.id == full_id).values(
                failed=jobs_t.c.failed - n_failed,
                succeeded=jobs_t.c.succeeded - n_succeeded,
                state=reopen_as,
                started_at=func.coalesce(jobs_t.c.started_at, jobs_t.c.created_at),
                finished_at=None,
            ))
            if stopped:
                self._maybe_finish(conn, full_id, now)     # un-cancelled with nothing left to do
            return sorted([i for i, _ in reset] + waiting)

        return self._write(tx)

    def job(self, job_id: str) -> JobStatus:
        """The job's status; ``job_id`` may be a unique prefix (≥ 4 characters)."""
        def query(conn: Connection):
            full_id = self._resolve(conn, job_id)
            row = conn.execute(select(jobs_t).where(jobs_t.c.id == full_id)).one()
            running = conn.scalar(select(func.count()).select_from(images_t)
                                  .where(images_t.c.job_id == full_id, images_t.c.state == "running"))
            return row, running

        row, running = self._query(query)       # workers ask between batches: survive a disconnect
        return self._status(row, running or 0)

    def jobs(self) -> list[JobStatus]:
        """Every job, newest first."""
        with self._read() as conn:
            rows = conn.execute(select(jobs_t).order_by(jobs_t.c.created_at.desc(), jobs_t.c.id)).all()
            running = dict(conn.execute(
                select(images_t.c.job_id, func.count()).where(images_t.c.state == "running")
                .group_by(images_t.c.job_id)).all())
        return [self._status(row, running.get(row.id, 0)) for row in rows]

    @staticmethod
    def _status(row, running: int) -> JobStatus:
        done = row.succeeded + row.failed
        rate = 0.0
        if row.started_at is not None:
            elapsed = ((row.finished_at or utcnow()) - row.started_at).total_seconds()
            if elapsed > 0:
                rate = done / elapsed
        return JobStatus(
            id=row.id, name=row.name, source=row.source, dest=row.dest, model=row.model,
            weights=row.weights, weights_sha256=row.weights_sha256, threshold=row.threshold,
            state=row.state, total=row.total, succeeded=row.succeeded, failed=row.failed,
            pending=max(row.total - done - running, 0), running=running,
            created_at=row.created_at, started_at=row.started_at, finished_at=row.finished_at,
            rate=rate, min_size=row.min_size, max_size=row.max_size, config=dict(row.config or {}),
            submitted_at=row.submitted_at, label_map_sha256=row.label_map_sha256,
        )

    def label_map_categories(self, sha256: str) -> list[dict[str, Any]] | None:
        """The categories of the label map stored under ``sha256`` (a job's label_map_sha256)."""
        return self._query(lambda conn: read_label_map(conn, sha256))

    # -- images ---------------------------------------------------------------------------------

    def claim(self, image_id: int, token: str, lease_seconds: float, job_id: str | None = None) -> ClaimedImage | None:
        """Take the image (pending, or running with an expired lease) for ``token``; None if not.

        Also None when the job is cancelled, or when ``job_id`` is given and the image is not
        one of that job's. Moves a pending job to running on its first claim.
        """
        claimed = self.claim_many([image_id], token, lease_seconds, job_id=job_id)
        return claimed[0] if claimed else None

    def claim_many(self, image_ids: Iterable[int], token: str, lease_seconds: float,
                   job_id: str | None = None) -> list[ClaimedImage]:
        """`claim` for several images in one transaction (a worker claims its chunk at once):
        the images taken, in the order given; the others are done, held by someone else, their
        job is cancelled, or (``job_id`` given) they are not that job's: a chunk message names
        its job, and an image of another job must never be processed into this one's DEST."""
        _check_token(token)
        order = {int(image_id): i for i, image_id in enumerate(image_ids)}
        if not order:
            return []
        now = utcnow()
        expires = now + timedelta(seconds=lease_seconds)

        def tx(conn: Connection) -> list[ClaimedImage]:
            job_live = (select(jobs_t.c.id)
                        .where(jobs_t.c.id == images_t.c.job_id, jobs_t.c.state != "cancelled")
                        .exists())
            claimable = (images_t.c.state == "pending") | (
                (images_t.c.state == "running") & (images_t.c.lease_expires_at < now))
            own = [] if job_id is None else [images_t.c.job_id == job_id]
            rows = []
            for group in _chunks(sorted(order), _IN_CHUNK):
                rows += conn.execute(
                    update(images_t)
                    .where(images_t.c.id.in_(group), claimable, job_live, *own)
                    .values(state="running", lease_token=token, lease_expires_at=expires,
                            attempts=images_t.c.attempts + 1, updated_at=now)
                    .returning(images_t.c.id, images_t.c.job_id, images_t.c.key, images_t.c.uri,
                               images_t.c.etag, images_t.c.attempts, images_t.c.size)
                ).all()
            for started in sorted({row.job_id for row in rows}):
                conn.execute(update(jobs_t).where(jobs_t.c.id == started, jobs_t.c.state == "pending")
                             .values(state="running", started_at=now))
            return [ClaimedImage(id=row.id, job_id=row.job_id, key=row.key, uri=row.uri, etag=row.etag,
                                 attempts=row.attempts, size=row.size)
                    for row in sorted(rows, key=lambda row: order[row.id])]

        return self._write(tx)

    def images_outside_job(self, job_id: str, image_ids: Iterable[int]) -> dict[int, str | None]:
        """Of ``image_ids``, those that are not images of ``job_id``: id → the job they belong
        to, or None for an id no image has."""
        ids = sorted({int(i) for i in image_ids})

        def query(conn: Connection) -> dict[int, str | None]:
            owners: dict[int, str] = {}
            for group in _chunks(ids, _IN_CHUNK):
                owners.update(conn.execute(select(images_t.c.id, images_t.c.job_id)
                                           .where(images_t.c.id.in_(group))).all())
            return {i: owners.get(i) for i in ids if owners.get(i) != job_id}

        return self._query(query)

    def database_id(self) -> str:
        """What tells this database from any other, the same from every client (chunk messages
        carry it, so that a worker connected to another database leaves them on the broker):
        PostgreSQL's cluster system identifier and the database's oid; SQLite's file path."""
        return _database_id(self.engine.url.render_as_string(hide_password=False))

    def holds_claim(self, image_id: int, token: str) -> bool:
        """Whether ``token`` still holds the image: running under it, lease not expired. While it
        does, no other claim on the image can have been made since this one."""
        _check_token(token)
        now = utcnow()
        return self._query(lambda conn: conn.scalar(
            select(images_t.c.id).where(images_t.c.id == image_id, images_t.c.lease_token == token,
                                        images_t.c.state == "running", images_t.c.lease_expires_at > now)
        ) is not None)

    def heartbeat(self, token: str, image_ids: Iterable[int], lease_seconds: float) -> int:
        """Extend the leases ``token`` still holds among ``image_ids``; returns how many."""
        _check_token(token)
        ids = sorted({int(i) for i in image_ids})
        if not ids:
            return 0
        now = utcnow()
        expires = now + timedelta(seconds=lease_seconds)

        def tx(conn: Connection) -> int:
            count = 0
            for group in _chunks(ids, _IN_CHUNK):
                result = conn.execute(
                    update(images_t)
                    .where(images_t.c.id.in_(group), images_t.c.lease_token == token,
                           images_t.c.state == "running")
                    .values(lease_expires_at=expires, updated_at=now))
                count += result.rowcount
            return count

        return self._write(tx)

    def _fenced_finish(self, conn: Connection, image_id: int, token: str, values: dict) -> str | None:
        """Apply ``values`` to the image if ``token`` still holds it; return its job id, else None."""
        row = conn.execute(
            update(images_t)
            .where(images_t.c.id == image_id, images_t.c.lease_token == token,
                   images_t.c.state == "running")
            .values(lease_token=None, lease_expires_at=None, **values)
            .returning(images_t.c.job_id)
        ).first()
        return None if row is None else row.job_id

    def record_success(self, image_id: int, token: str, *, output_png: str, output_json: str,
                       height: int, width: int, segments_info: Iterable[dict[str, Any]],
                       timings: dict[str, Any] | None = None) -> bool:
        """Record a processed image, if ``token`` still holds its lease; False (no change) if not.

        One transaction: the image row, its per-class rows (replaced: segments and pixels per
        category_id, from ``segments_info``' ``category_id`` and ``area``), ``jobs.succeeded + 1``,
        and finishing the job when nothing is left. ``timings`` keys: decode_ms, model_ms,
        postprocess_ms, upload_ms (or without ``_ms``), in milliseconds.
        """
        (recorded,) = self.record_successes(token, [ImageSuccess(
            image_id, output_png=output_png, output_json=output_json, height=height, width=width,
            segments_info=list(segments_info), timings=timings)])
        return recorded

    def record_successes(self, token: str, successes: Sequence[ImageSuccess]) -> list[bool]:
        """`record_success` for several images held by ``token``, in one transaction (a worker
        records a batch at once: one commit instead of one per image). Returns, per image,
        whether it was recorded (False: the claim had expired and the image is another's)."""
        _check_token(token)
        now = utcnow()
        rows = []
        for success in successes:
            per_class: dict[int, list[int]] = {}
            for segment in success.segments_info:
                counts = per_class.setdefault(int(segment["category_id"]), [0, 0])
                counts[0] += 1
                counts[1] += int(segment["area"])
            values = dict(state="succeeded", output_png=success.output_png, output_json=success.output_json,
                          height=int(success.height), width=int(success.width),
                          segments=len(success.segments_info), error=None, updated_at=now,
                          **_timings(success.timings))
            rows.append((success.image_id, values, per_class))

        def tx(conn: Connection) -> list[bool]:
            recorded, per_job, classes = [], {}, []
            for image_id, values, per_class in rows:
                job_id = self._fenced_finish(conn, image_id, token, values)
                recorded.append(job_id is not None)
                if job_id is None:
                    continue
                per_job.setdefault(job_id, []).append(image_id)
                classes += [dict(image_id=image_id, job_id=job_id, category_id=category, segments=n, pixels=px)
                            for category, (n, px) in sorted(per_class.items())]
            done = [image_id for ids in per_job.values() for image_id in ids]
            for group in _chunks(done, _IN_CHUNK):
                conn.execute(delete(classes_t).where(classes_t.c.image_id.in_(group)))
            if classes:
                conn.execute(insert(classes_t), classes)
            for job_id, ids in per_job.items():
                conn.execute(update(jobs_t).where(jobs_t.c.id == job_id)
                             .values(succeeded=jobs_t.c.succeeded + len(ids)))
                self._maybe_finish(conn, job_id, now)
            return recorded

        return self._write(tx) if rows else []

    def record_failure(self, image_id: int, token: str, error: str) -> bool:
        """Record that the image failed, if ``token`` still holds its lease; False (no change) if not."""
        _check_token(token)
        now = utcnow()
        text = _clip_error(error)

        def tx(conn: Connection) -> bool:
            job_id = self._fenced_finish(conn, image_id, token,
                                         dict(state="failed", error=text, updated_at=now))
            if job_id is None:
                return False
            conn.execute(delete(classes_t).where(classes_t.c.image_id == image_id))
            conn.execute(update(jobs_t).where(jobs_t.c.id == job_id)
                         .values(failed=jobs_t.c.failed + 1))
            self._maybe_finish(conn, job_id, now)
            return True

        return self._write(tx)

    def release(self, image_id: int, token: str, count_attempt: bool = False) -> bool:
        """Give a claimed, unprocessed image back (pending again). The claim's attempt is not
        counted unless ``count_attempt`` (the image may have been why its worker failed)."""
        _check_token(token)
        now = utcnow()
        attempts = images_t.c.attempts if count_attempt else case((images_t.c.attempts > 0, images_t.c.attempts - 1),
                                                                 else_=0)

        def tx(conn: Connection) -> bool:
            result = conn.execute(
                update(images_t)
                .where(images_t.c.id == image_id, images_t.c.lease_token == token,
                       images_t.c.state == "running")
                .values(state="pending", lease_token=None, lease_expires_at=None, updated_at=now,
                        attempts=attempts))
            return result.rowcount == 1

        return self._write(tx)

    def expired(self, job_id: str | None = None, limit: int | None = None) -> list[int]:
        """Ids of running images whose lease has expired (for a reaper to re-enqueue)."""
        now = utcnow()
        with self._read() as conn:
            stmt = select(images_t.c.id).where(images_t.c.state == "running",
                                               images_t.c.lease_expires_at < now)
            if job_id is not None:
                stmt = stmt.where(images_t.c.job_id == self._resolve(conn, job_id))
            stmt = stmt.order_by(images_t.c.id)
            if limit is not None:
                stmt = stmt.limit(limit)
            return list(conn.scalars(stmt).all())

    def previous_successes(self, source: str, dest: str, fingerprint: str, keys: Iterable[str]) -> dict[str, str | None]:
        """For the keys that succeeded in an earlier job from `source` to `dest` whose config has
        this model `fingerprint`: key → the ETag it had then (the latest success wins)."""
        keys = sorted(set(keys))
        with self._read() as conn:
            candidates = conn.execute(select(jobs_t.c.id, jobs_t.c.config)
                                      .where(jobs_t.c.source == source, jobs_t.c.dest == dest)).all()
            job_ids = [r.id for r in candidates if (r.config or {}).get("fingerprint") == fingerprint]
            found: dict[str, tuple] = {}
            if not job_ids:
                return {}
            # PostgreSQL: all keys as one array parameter (``key = ANY(:keys)``): a short query text,
            # where IN lists of 500 placeholders were rendered and re-parsed for every batch.
            postgres = conn.dialect.name == "postgresql"
            for group in [keys] if postgres else _chunks(keys, _IN_CHUNK):
                matches = images_t.c.key == any_(_pg_text_array(group)) if postgres else images_t.c.key.in_(group)
                rows = conn.execute(select(images_t.c.key, images_t.c.etag, images_t.c.updated_at)
                                    .where(images_t.c.job_id.in_(job_ids), matches,
                                           images_t.c.state == "succeeded")).all()
                for row in rows:
                    if row.key not in found or row.updated_at > found[row.key][1]:
                        found[row.key] = (row.etag, row.updated_at)
        return {key: etag for key, (etag, _) in found.items()}

    def update_config(self, job_id: str, **values: Any) -> None:
        """Merge `values` into the job's config (e.g. the count of skipped images)."""
        def tx(conn: Connection) -> None:
            full_id = self._resolve(conn, job_id)
            config = conn.scalar(select(jobs_t.c.config).where(jobs_t.c.id == full_id).with_for_update())
            conn.execute(update(jobs_t).where(jobs_t.c.id == full_id).values(config={**(config or {}), **values}))

        self._write(tx)

    def release_expired(self, limit: int = 10_000, broker: str | None = None) -> dict[str, list[int]]:
        """Running images whose lease expired go back to pending, their old token void (a late
        result from the lost worker is refused); returns {job id: image ids} to queue again.

        ``broker``: only images of jobs submitted through it (see :meth:`active_jobs`)."""
        now = utcnow()
        of_broker = [] if broker is None else [images_t.c.job_id.in_(
            select(jobs_t.c.id).where(_of_broker(broker)).scalar_subquery())]

        def tx(conn: Connection) -> dict[str, list[int]]:
            rows = conn.execute(
                select(images_t.c.id, images_t.c.job_id)
                .where(images_t.c.state == "running", images_t.c.lease_expires_at < now, *of_broker)
                .order_by(images_t.c.id).limit(limit).with_for_update(skip_locked=True)).all()
            by_job: dict[str, list[int]] = {}
            for group in _chunks([r.id for r in rows], _IN_CHUNK):
                conn.execute(update(images_t)
                             .where(images_t.c.id.in_(group), images_t.c.state == "running",
                                    images_t.c.lease_expires_at < now)
                             .values(state="pending", lease_token=None, lease_expires_at=None, updated_at=now))
            for row in rows:
                by_job.setdefault(row.job_id, []).append(row.id)
            return by_job

        return self._write(tx)

    def active_jobs(self, broker: str | None = None) -> list[tuple[str, dict[str, Any]]]:
        """``(id, config)`` of every fully submitted job that is still pending or running, oldest first.

        ``broker``: only the jobs submitted through that broker (the masked URL recorded in their
        config as ``broker``), and older jobs that recorded none: a reaper re-queues only its own
        broker's jobs, never another deployment's that shares this database, nor a `run`'s."""
        return self._query(lambda conn: [(row.id, dict(row.config or {})) for row in conn.execute(
            select(jobs_t.c.id, jobs_t.c.config)
            .where(jobs_t.c.state.in_(_ACTIVE_JOB_STATES), jobs_t.c.submitted_at.is_not(None),
                   *([] if broker is None else [_of_broker(broker)]))
            .order_by(jobs_t.c.created_at, jobs_t.c.id)).all()])

    def touch_stale_pending(self, job_id: str, older_than: float, limit: int = 10_000) -> list[int]:
        """Pending images of the job untouched for ``older_than`` seconds: marked as touched now,
        their ids returned to be queued again.

        For images whose broker message was lost (Redis restarted without persistence, a reaper
        that released images but could not queue them). The caller decides when images are
        suspect (the reaper: only when the job's queue is empty); touching them makes each come
        back at most once per ``older_than``. A second message for an image that still has one is
        harmless: the claim decides who processes it.
        """
        now = utcnow()
        cutoff = now - timedelta(seconds=older_than)

        def tx(conn: Connection) -> list[int]:
            ids = list(conn.scalars(
                select(images_t.c.id)
                .where(images_t.c.job_id == job_id, images_t.c.state == "pending",
                       images_t.c.updated_at.is_(None) | (images_t.c.updated_at < cutoff))
                .order_by(images_t.c.id).limit(limit).with_for_update(skip_locked=True)).all())
            for group in _chunks(ids, _IN_CHUNK):
                conn.execute(update(images_t).where(images_t.c.id.in_(group), images_t.c.state == "pending")
                             .values(updated_at=now))
            return ids

        return self._write(tx)

    def image(self, image_id: int) -> ImageRecord | None:
        with self._read() as conn:
            row = conn.execute(select(images_t).where(images_t.c.id == image_id)).first()
        return None if row is None else ImageRecord(**{k: row._mapping[k] for k in _IMAGE_FIELDS})

    def images(self, job_id: str, state: str | None = None) -> Iterator[ImageRecord]:
        """The job's images (optionally in one state), by id, fetched a page at a time."""
        with self._read() as conn:
            full_id = self._resolve(conn, job_id)
        last_id = None
        while True:
            stmt = select(images_t).where(images_t.c.job_id == full_id)
            if state is not None:
                stmt = stmt.where(images_t.c.state == state)
            if last_id is not None:
                stmt = stmt.where(images_t.c.id > last_id)
            with self._read() as conn:
                rows = conn.execute(stmt.order_by(images_t.c.id).limit(_PAGE)).all()
            for row in rows:
                yield ImageRecord(**{k: row._mapping[k] for k in _IMAGE_FIELDS})
            if len(rows) < _PAGE:
                return
            last_id = rows[-1].id

    def class_stats(self, job_id: str) -> list[dict[str, int]]:
        """Per category over the job's succeeded images: segments, images, pixels."""
        with self._read() as conn:
            full_id = self._resolve(conn, job_id)
            rows = conn.execute(
                select(classes_t.c.category_id,
                       func.sum(classes_t.c.segments).label("segments"),
                       func.count().label("images"),
                       func.sum(classes_t.c.pixels).label("pixels"))
                .join(images_t, images_t.c.id == classes_t.c.image_id)
                .where(classes_t.c.job_id == full_id, images_t.c.state == "succeeded")
                .group_by(classes_t.c.category_id)
                .order_by(classes_t.c.category_id)
            ).all()
        return [dict(category_id=int(r.category_id), segments=int(r.segments), images=int(r.images),
                     pixels=int(r.pixels)) for r in rows]
