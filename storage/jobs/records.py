"""What the job store returns and raises: plain records of jobs and images, and the errors a
caller tells apart (no such job, an ambiguous id prefix, a state that forbids the operation)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from storage.schema import FINISHED_JOB_STATES


TIMING_FIELDS = ("decode_ms", "model_ms", "postprocess_ms", "upload_ms")
_MIN_PREFIX = 4


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
