"""A job's state: finished when its last image is, cancelled, interrupted and resumed (`run`),
and reopened by `retry` (failed or succeeded images back to pending, their class rows dropped)."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

from sqlalchemy import Connection, case, delete, func, or_, select, update

from storage.schema import utcnow

from .records import JobStateError
from .sql import _ACTIVE_JOB_STATES, _IN_CHUNK, Transactions, _chunks, classes_t, images_t, jobs_t


# Stopped before the end, by `cancel` or by an interrupted `run`: `retry` (or the same `run`) reopens them.
_STOPPED_JOB_STATES = ("cancelled", "interrupted")


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


def _newest_job_of_run(run_key: str, *conditions):
    """The id of the newest job made by the `run` command of this ``run_key`` that meets ``conditions``."""
    return (select(jobs_t.c.id)
            .where(jobs_t.c.config["run_key"].as_string() == run_key, *conditions)
            .order_by(jobs_t.c.created_at.desc(), jobs_t.c.id).limit(1))


class JobStates(Transactions):
    """Cancelling, interrupting, resuming and reopening jobs."""

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
        return self._query(lambda conn: conn.scalar(_newest_job_of_run(run_key, jobs_t.c.state == "interrupted")))

    def find_unfinished(self, run_key: str) -> tuple[str, dict[str, datetime]] | None:
        """The newest submitted job with this ``run_key`` that is still pending or running (its
        `run` is at work, or was killed outright), and the leases live on its images: {token: the
        latest expiry}. None when there is no such job."""
        now = utcnow()

        def query(conn: Connection) -> tuple[str, dict[str, datetime]] | None:
            job_id = conn.scalar(_newest_job_of_run(run_key, jobs_t.c.state.in_(_ACTIVE_JOB_STATES),
                                                    jobs_t.c.submitted_at.is_not(None)))
            if job_id is None:
                return None
            leases = conn.execute(
                select(images_t.c.lease_token, func.max(images_t.c.lease_expires_at))
                .where(images_t.c.job_id == job_id, images_t.c.state == "running",
                       images_t.c.lease_expires_at > now)
                .group_by(images_t.c.lease_token)).all()
            return job_id, {token: expires for token, expires in leases}

        return self._query(query)

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
            _maybe_finish(conn, full_id, now)      # nothing was left (a retry that found nothing)
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
                _maybe_finish(conn, full_id, now)     # un-cancelled with nothing left to do
            return sorted([i for i, _ in reset] + waiting)

        return self._write(tx)
