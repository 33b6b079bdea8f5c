"""Results and class statistics: a processed image recorded with its per-class rows (segments
and pixels per category) and the job's counters in one fenced transaction, a failure likewise,
the sums per category over a job, and the hash of the weights that made them."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import Connection, delete, func, insert, select, update

from storage.schema import utcnow

from .claims import _check_token, _fenced_finish
from .records import TIMING_FIELDS, ImageSuccess
from .sql import _IN_CHUNK, Transactions, _chunks, _clip_error, classes_t, images_t, jobs_t
from .states import _maybe_finish


def _timings(timings: dict[str, Any] | None) -> dict[str, float | None]:
    timings = timings or {}
    out: dict[str, float | None] = {}
    for name in TIMING_FIELDS:
        value = timings.get(name, timings.get(name[:-3]))
        out[name] = None if value is None else float(value)
    return out


class Results(Transactions):
    """Recording what workers made of images, and summing it up."""

    def set_weights_sha256(self, job_id: str, sha: str) -> str:
        """Record the weights' SHA-256 unless one is recorded already; return the recorded one."""
        def tx(conn: Connection) -> str:
            full_id = self._resolve(conn, job_id)
            conn.execute(update(jobs_t).where(jobs_t.c.id == full_id, jobs_t.c.weights_sha256.is_(None))
                         .values(weights_sha256=sha))
            return conn.scalar(select(jobs_t.c.weights_sha256).where(jobs_t.c.id == full_id))

        return self._write(tx)

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
                job_id = _fenced_finish(conn, image_id, token, values)
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
                _maybe_finish(conn, job_id, now)
            return recorded

        return self._write(tx) if rows else []

    def record_failure(self, image_id: int, token: str, error: str) -> bool:
        """Record that the image failed, if ``token`` still holds its lease; False (no change) if not."""
        _check_token(token)
        now = utcnow()
        text = _clip_error(error)

        def tx(conn: Connection) -> bool:
            job_id = _fenced_finish(conn, image_id, token,
                                         dict(state="failed", error=text, updated_at=now))
            if job_id is None:
                return False
            conn.execute(delete(classes_t).where(classes_t.c.image_id == image_id))
            conn.execute(update(jobs_t).where(jobs_t.c.id == job_id)
                         .values(failed=jobs_t.c.failed + 1))
            _maybe_finish(conn, job_id, now)
            return True

        return self._write(tx)

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
