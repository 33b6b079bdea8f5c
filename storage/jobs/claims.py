"""Claims, leases and fencing: an image is taken with a lease and a fencing token in one
conditional UPDATE, kept by heartbeats, given back, and changed only while its token still holds
it (`_fenced_finish`, which results.py records through)."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import timedelta

from sqlalchemy import Connection, case, select, update

from storage.schema import utcnow

from .records import ClaimedImage
from .sql import _IN_CHUNK, Transactions, _chunks, images_t, jobs_t


def _check_token(token: str) -> None:
    # A None token would compare as IS NULL and match unleased rows: refuse it outright.
    if not isinstance(token, str) or not token:
        raise ValueError("a lease token must be a non-empty string")


def _fenced_finish(conn: Connection, image_id: int, token: str, values: dict) -> str | None:
    """Apply ``values`` to the image if ``token`` still holds it; return its job id, else None."""
    row = conn.execute(
        update(images_t)
        .where(images_t.c.id == image_id, images_t.c.lease_token == token,
               images_t.c.state == "running")
        .values(lease_token=None, lease_expires_at=None, **values)
        .returning(images_t.c.job_id)
    ).first()
    return None if row is None else row.job_id


class Claims(Transactions):
    """Taking, keeping and giving back images."""

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
