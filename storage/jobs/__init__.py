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

Tokens must be unique per claim (the workers' are random per chunk delivery, then name the holding
process: worker/lease.py): fencing can only tell claims apart by their tokens. Lease expiry is
compared against this process's clock (UTC), so the machines' clocks should agree to well within
a lease.

`JobStore` is the one object the rest of the code uses. It is put together here from one part
per idea, each in its own file:

    records.py      what it returns and raises: JobStatus, ImageRecord, ClaimedImage, ImageSuccess
    sql.py          what the parts share: tables, retried transactions, job ids, SQL helpers
    submission.py   recording a job and its images (submit, run)
    queries.py      reading a job's status, every job, a job's images
    claims.py       claims, leases and fencing: taking, keeping and giving back images
    results.py      recording results and failures; per-class statistics; the weights' hash
    states.py       a job's state: finished, cancelled, interrupted, resumed, reopened by retry
    reaping.py      what the reaper needs: expired leases, stale pending images, active jobs
    pruning.py      deleting old finished jobs
    label_maps.py   each job's label map, stored once per distinct map

Every method opens and closes its own transaction and returns plain dataclasses or dicts.
"""

from __future__ import annotations

from .claims import Claims
from .label_maps import LabelMaps
from .pruning import Pruning
from .queries import StatusQueries
from .reaping import Reaping
from .records import (TIMING_FIELDS, AmbiguousJobId, ClaimedImage, ImageRecord, ImageSuccess, JobNotFound,
                      JobStateError, JobStatus)
from .results import Results
from .states import JobStates
from .submission import Submission

__all__ = [
    "JobStore", "JobStatus", "ImageRecord", "ClaimedImage", "ImageSuccess",
    "JobNotFound", "AmbiguousJobId", "JobStateError", "TIMING_FIELDS",
]


class JobStore(Submission, StatusQueries, Claims, Results, JobStates, Reaping, Pruning, LabelMaps):
    """Jobs, images, leases and statistics in the database at ``url`` (see storage.db)."""
