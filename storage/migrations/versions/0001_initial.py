"""Initial schema: jobs, images, image_classes.

Revision ID: 0001
Revises:
Create Date: 2026-05-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _utc() -> sa.DateTime:
    # timestamptz on PostgreSQL; on SQLite naive UTC (storage.schema.UTCDateTime does the conversion).
    return sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "jobs",
        sa.Column("id", sa.String(12), primary_key=True),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("source", sa.Text(), nullable=False),
        sa.Column("dest", sa.Text(), nullable=False),
        sa.Column("model", sa.String(64), nullable=False),
        sa.Column("weights", sa.Text(), nullable=False),
        sa.Column("weights_sha256", sa.String(64), nullable=True),
        sa.Column("threshold", sa.Float(), nullable=False),
        sa.Column("min_size", sa.Integer(), nullable=False),
        sa.Column("max_size", sa.Integer(), nullable=False),
        sa.Column("config", sa.JSON(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("total", sa.Integer(), nullable=False),
        sa.Column("succeeded", sa.Integer(), nullable=False),
        sa.Column("failed", sa.Integer(), nullable=False),
        sa.Column("created_at", _utc(), nullable=False),
        sa.Column("started_at", _utc(), nullable=True),
        sa.Column("submitted_at", _utc(), nullable=True),
        sa.Column("finished_at", _utc(), nullable=True),
    )
    op.create_index("ix_jobs_created_at", "jobs", ["created_at"])

    op.create_table(
        "images",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("job_id", sa.String(12), sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False),
        sa.Column("key", sa.Text(), nullable=False),
        sa.Column("uri", sa.Text(), nullable=False),
        sa.Column("etag", sa.String(255), nullable=True),
        sa.Column("size", sa.BigInteger(), nullable=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("lease_token", sa.String(64), nullable=True),
        sa.Column("lease_expires_at", _utc(), nullable=True),
        sa.Column("output_png", sa.Text(), nullable=True),
        sa.Column("output_json", sa.Text(), nullable=True),
        sa.Column("height", sa.Integer(), nullable=True),
        sa.Column("width", sa.Integer(), nullable=True),
        sa.Column("segments", sa.Integer(), nullable=True),
        sa.Column("decode_ms", sa.Float(), nullable=True),
        sa.Column("model_ms", sa.Float(), nullable=True),
        sa.Column("postprocess_ms", sa.Float(), nullable=True),
        sa.Column("upload_ms", sa.Float(), nullable=True),
        sa.Column("updated_at", _utc(), nullable=True),
        sa.UniqueConstraint("job_id", "key", name="uq_images_job_id_key"),
    )
    op.create_index("ix_images_job_id_state", "images", ["job_id", "state"])

    op.create_table(
        "image_classes",
        sa.Column("image_id", sa.Integer(), sa.ForeignKey("images.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("category_id", sa.Integer(), primary_key=True),
        sa.Column("job_id", sa.String(12), nullable=False),
        sa.Column("segments", sa.Integer(), nullable=False),
        sa.Column("pixels", sa.BigInteger(), nullable=False),
    )
    op.create_index("ix_image_classes_job_id_category_id", "image_classes", ["job_id", "category_id"])


def downgrade() -> None:
    op.drop_index("ix_image_classes_job_id_category_id", table_name="image_classes")
    op.drop_table("image_classes")
    op.drop_index("ix_images_job_id_state", table_name="images")
    op.drop_table("images")
    op.drop_index("ix_jobs_created_at", table_name="jobs")
    op.drop_table("jobs")
