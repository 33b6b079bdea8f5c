"""What the reaper needs: images whose lease expired (back to pending, their token void), pending
images untouched for long (their broker message may be lost), and the active jobs of one broker."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from sqlalchemy import Connection, or_, select, update

from storage.schema import utcnow

from .sql import _ACTIVE_JOB_STATES, _IN_CHUNK, Transactions, _chunks, images_t, jobs_t


def _of_broker(broker: str):
    """Jobs whose config records ``broker``, or no broker at all (jobs older than the record)."""
    recorded = jobs_t.c.config["broker"].as_string()
    return or_(recorded == broker, recorded.is_(None))


class Reaping(Transactions):
    """Finding the work whose worker or message was lost."""

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
