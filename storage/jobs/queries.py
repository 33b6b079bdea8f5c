"""Reading what the store holds: a job's status (by id or unique prefix), every job, an image, a
job's images a page at a time, and which of some images are not a job's."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from sqlalchemy import Connection, func, select

from storage.schema import utcnow

from .records import _IMAGE_FIELDS, ImageRecord, JobStatus
from .sql import _IN_CHUNK, Transactions, _chunks, images_t, jobs_t


_PAGE = 1000  # rows per page when streaming images


class StatusQueries(Transactions):
    """Jobs and images as records."""

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
