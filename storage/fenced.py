"""Fenced writes: outputs written only while their claim holds, never over a newer claim's.

A worker paused past its lease (SIGSTOP, a long GC, a network partition) may wake up after the
reaper gave its image to another worker, which wrote the outputs and recorded them. Its own
record is refused (storage.jobs fences it by token), but a plain PUT would still replace the
newer outputs with its stale ones. :func:`publish` closes that window:

1. look at each output (its etag, or that it is absent);
2. check that the claim still holds (token current, lease unexpired): then no newer claim has
   existed since ours began, so what step 1 saw was not written by one;
3. write each output only if it is still as seen (S3 ``If-Match`` / ``If-None-Match: *``, which
   the store applies atomically). If a newer claim wrote in between, the write is refused and
   the loop looks again, now finding the claim gone.

On folders the comparison is made just before the rename (storage.objects.write_bytes), which
narrows the window to a few system calls but cannot close it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from storage import objects
from storage.retry import retry_transient

__all__ = ["ClaimLost", "publish"]

log = logging.getLogger(__name__)
_warned_unconditional: list[bool] = []      # once per process

# Looks before giving up when every conditional write finds the object changed again while the
# claim still holds (another job writing the same DEST at the same time).
_ROUNDS = 4


class ClaimLost(RuntimeError):
    """The claim expired or another worker took the image: its outputs were not written."""


def _seen(uri: str):
    """The object's etag, or None when there is none yet; objects.ANY when this worker may not
    look (a policy granting PutObject on DEST but not GetObject: S3 answers 403), in which case
    the write is checked against the claim only."""
    try:
        return retry_transient(lambda: objects.stat(uri).etag, what=f"stat {uri}")
    except objects.ObjectNotFound:
        return None
    except objects.ObjectStoreError as exc:
        if "AccessDenied" not in str(exc) and "403" not in str(exc):
            raise
        if not _warned_unconditional:
            _warned_unconditional.append(True)
            log.warning("cannot read outputs in DEST (%s): they are written after checking the claim, but not "
                        "conditionally; grant the workers s3:GetObject on DEST to close that window", exc)
        return objects.ANY


def publish(outputs: Sequence[tuple[str, bytes, str]], holds_claim: Callable[[], bool]) -> None:
    """Write ``(uri, data, content_type)`` outputs while ``holds_claim()``; each only if nobody
    wrote it since it was looked at. Raises :class:`ClaimLost` (having written nothing after the
    claim was lost), or an ObjectStoreError as plain writes do."""
    for _ in range(_ROUNDS):
        seen = [_seen(uri) for uri, _, _ in outputs]
        if not holds_claim():
            raise ClaimLost("the claim expired and another worker took the image: its outputs were not written")
        try:
            for (uri, data, content_type), etag in zip(outputs, seen):
                retry_transient(lambda: objects.write_bytes(uri, data, content_type, expect=etag),
                                what=f"write {uri}")
            return
        except objects.PreconditionFailed:
            continue        # written meanwhile: look again (a newer claim shows as holds_claim() False)
    raise objects.ObjectStoreError(f"write {outputs[0][0]}: the outputs kept changing while being written "
                                   "(is another job writing to the same DEST?)")
