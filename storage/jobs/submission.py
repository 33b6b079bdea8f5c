"""Recording a job and its images, as `submit` and `run` do: the job row (and its label map), image
rows in batches, output names (first come, first served), images failed before any work, the end
of a submission, and what earlier jobs already did (so that unchanged images are skipped)."""

from __future__ import annotations

import functools
import secrets
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from sqlalchemy import Connection, Text, any_, bindparam, func, insert, select, update
from sqlalchemy.exc import IntegrityError

from storage.objects import mask_url
from storage.schema import utcnow

from .label_maps import record_label_map
from .queries import StatusQueries
from .records import JobStatus
from .sql import _IN_CHUNK, _chunks, _clip_error, _pg_text_array, images_t, jobs_t, names_t
from .states import _maybe_finish


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


@functools.cache
def _pg_insert_names():
    """PostgreSQL: output names bound as two arrays, ``ON CONFLICT DO NOTHING RETURNING name``."""
    from sqlalchemy.dialects.postgresql import ARRAY, insert as pg_insert

    rows = func.unnest(bindparam("names", type_=ARRAY(Text)), bindparam("keys", type_=ARRAY(Text))
                       ).table_valued("name", "key").render_derived()
    query = select(bindparam("job_id", type_=names_t.c.job_id.type), rows.c.name, rows.c.key)
    return (pg_insert(names_t).from_select(["job_id", "name", "key"], query)
            .on_conflict_do_nothing(index_elements=["job_id", "name"]).returning(names_t.c.name))


class Submission(StatusQueries):
    """Recording jobs and their images."""

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
            _maybe_finish(conn, full_id, now)

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
            _maybe_finish(conn, full_id, now)
            return failed

        return self._write(tx)

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
