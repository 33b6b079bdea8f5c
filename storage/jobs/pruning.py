"""Deleting old finished jobs with their images and per-class rows (`prune`); their outputs in
DEST are never touched, nor are jobs that still run."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, delete, func, select

from storage.schema import FINISHED_JOB_STATES

from .sql import Transactions, classes_t, images_t, jobs_t


class Pruning(Transactions):
    """Old finished jobs out of the database."""

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
