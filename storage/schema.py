"""SQLAlchemy 2.x declarative models: jobs, images, image_classes, output_names, label_maps.

The migrations in ``storage/migrations/versions`` create exactly these tables; a test compares the
two. Timestamps are timezone-aware UTC in Python and stored as UTC on every backend (PostgreSQL:
``timestamptz``; SQLite, which has no time zones: naive UTC text, which sorts and compares like
the instants it stands for).
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

__all__ = [
    "Base", "Job", "Image", "ImageClass", "OutputName", "LabelMapRecord", "UTCDateTime", "utcnow",
    "JOB_STATES", "IMAGE_STATES", "FINISHED_JOB_STATES",
]

# interrupted: its `run` was stopped (SIGINT/SIGTERM) and gave its claims back; the same `run`
# command resumes it. Not finished: `retry` and `cancel` accept it.
JOB_STATES = ("pending", "running", "succeeded", "partial", "failed", "cancelled", "interrupted")
FINISHED_JOB_STATES = ("succeeded", "partial", "failed", "cancelled")
IMAGE_STATES = ("pending", "running", "succeeded", "failed")


def utcnow() -> datetime:
    """The current time, timezone-aware UTC (the only clock this package uses)."""
    return datetime.now(timezone.utc)


class UTCDateTime(TypeDecorator):
    """A datetime stored as UTC and always returned timezone-aware (UTC).

    Naive datetimes given to it are taken to be UTC already.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            value = value.replace(tzinfo=timezone.utc)
        value = value.astimezone(timezone.utc)
        if dialect.name == "sqlite":
            return value.replace(tzinfo=None)
        return value

    def process_result_value(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


class Base(DeclarativeBase):
    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: JSON()}


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(12), primary_key=True)
    name: Mapped[str] = mapped_column(String(255))
    source: Mapped[str] = mapped_column(Text)
    dest: Mapped[str] = mapped_column(Text)
    model: Mapped[str] = mapped_column(String(64))
    # The weights source as given (official, random, a path, s3://…, https://…), credentials masked.
    weights: Mapped[str] = mapped_column(Text)
    # SHA-256 of the weights actually loaded; set once, by the first worker that loads them.
    weights_sha256: Mapped[str | None] = mapped_column(String(64))
    threshold: Mapped[float] = mapped_column(Float)
    min_size: Mapped[int] = mapped_column(Integer)
    max_size: Mapped[int] = mapped_column(Integer)
    config: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    # The job's label map (--categories, or the weights' own); NULL: the 133 COCO categories.
    label_map_sha256: Mapped[str | None] = mapped_column(String(64), ForeignKey("label_maps.sha256"))
    state: Mapped[str] = mapped_column(String(16), default="pending")
    total: Mapped[int] = mapped_column(Integer, default=0)
    succeeded: Mapped[int] = mapped_column(Integer, default=0)
    failed: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # Set by finalize_submission: until then the job cannot finish (more images may be coming).
    submitted_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())

    __table_args__ = (Index("ix_jobs_created_at", "created_at"),)


class Image(Base):
    __tablename__ = "images"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(String(12), ForeignKey("jobs.id", ondelete="CASCADE"))
    key: Mapped[str] = mapped_column(Text)
    uri: Mapped[str] = mapped_column(Text)
    etag: Mapped[str | None] = mapped_column(String(255))
    size: Mapped[int | None] = mapped_column(BigInteger)
    state: Mapped[str] = mapped_column(String(16), default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text)
    lease_token: Mapped[str | None] = mapped_column(String(64))
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    output_png: Mapped[str | None] = mapped_column(Text)
    output_json: Mapped[str | None] = mapped_column(Text)
    height: Mapped[int | None] = mapped_column(Integer)
    width: Mapped[int | None] = mapped_column(Integer)
    segments: Mapped[int | None] = mapped_column(Integer)
    decode_ms: Mapped[float | None] = mapped_column(Float)
    model_ms: Mapped[float | None] = mapped_column(Float)
    postprocess_ms: Mapped[float | None] = mapped_column(Float)
    upload_ms: Mapped[float | None] = mapped_column(Float)
    updated_at: Mapped[datetime | None] = mapped_column(UTCDateTime())

    __table_args__ = (
        UniqueConstraint("job_id", "key", name="uq_images_job_id_key"),
        Index("ix_images_job_id_state", "job_id", "state"),
    )


class ImageClass(Base):
    """Per image and category: how many segments and pixels. Replaced, never added to."""

    __tablename__ = "image_classes"

    image_id: Mapped[int] = mapped_column(Integer, ForeignKey("images.id", ondelete="CASCADE"), primary_key=True)
    category_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[str] = mapped_column(String(12))
    segments: Mapped[int] = mapped_column(Integer)
    pixels: Mapped[int] = mapped_column(BigInteger)

    __table_args__ = (Index("ix_image_classes_job_id_category_id", "job_id", "category_id"),)


class OutputName(Base):
    """Which listed image claimed each output name of a job (worker.output.output_stem: the
    normalised path, extension dropped). The primary key is the output-conflict check: a second
    key with the same name, however far from the first in the listing, cannot be inserted. Filled
    by submit for every image listed, unchanged ones skipped by a nightly run included."""

    __tablename__ = "output_names"

    job_id: Mapped[str] = mapped_column(String(12), ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    name: Mapped[str] = mapped_column(Text, primary_key=True)
    key: Mapped[str] = mapped_column(Text)


class LabelMapRecord(Base):
    """A label map, stored once however many jobs use it (storage.jobs.label_maps): keyed by
    its SHA-256 (worker.labels.LabelMap.sha256), its categories as a COCO panoptic list."""

    __tablename__ = "label_maps"

    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    categories: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
