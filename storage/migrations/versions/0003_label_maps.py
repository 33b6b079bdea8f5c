"""label_maps: each distinct label map once, by SHA-256; jobs.label_map_sha256 refers to it
(NULL, as for every job recorded before: the COCO categories).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-10
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "label_maps",
        sa.Column("sha256", sa.String(64), primary_key=True),
        sa.Column("categories", sa.JSON(), nullable=False),
    )
    if op.get_bind().dialect.name == "sqlite":
        # SQLite cannot add a constraint to a table, only a column that carries one; alembic's
        # batch mode would copy and drop `jobs`, whose drop cascades to every image.
        op.execute("ALTER TABLE jobs ADD COLUMN label_map_sha256 VARCHAR(64) REFERENCES label_maps (sha256)")
    else:
        op.add_column("jobs", sa.Column("label_map_sha256", sa.String(64), nullable=True))
        op.create_foreign_key("fk_jobs_label_map_sha256", "jobs", "label_maps", ["label_map_sha256"], ["sha256"])


def downgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":
        op.drop_constraint("fk_jobs_label_map_sha256", "jobs", type_="foreignkey")
    op.drop_column("jobs", "label_map_sha256")          # SQLite ≥ 3.35 drops it with its REFERENCES
    op.drop_table("label_maps")
