"""Label maps in SQL: each distinct map stored once, keyed by its SHA-256, and referred to by the
jobs that use it (``jobs.label_map_sha256``; NULL: the COCO categories, the default).

A map's row is written in the transaction that records its first job and never changed: the
same SHA-256 is the same categories. Rows are kept when their jobs are pruned (a few kilobytes
each, and a concurrent submit may be about to refer to one again).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, select

from storage.schema import LabelMapRecord

from .sql import Transactions

label_maps_t = LabelMapRecord.__table__


def record_label_map(conn: Connection, sha256: str, categories: list[dict[str, Any]]) -> None:
    """Store the map unless a row with its SHA-256 exists already (in ``conn``'s transaction)."""
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    conn.execute(insert(label_maps_t).values(sha256=sha256, categories=list(categories))
                 .on_conflict_do_nothing(index_elements=["sha256"]))


def read_label_map(conn: Connection, sha256: str) -> list[dict[str, Any]] | None:
    """The categories stored under ``sha256``, or None."""
    return conn.scalar(select(label_maps_t.c.categories).where(label_maps_t.c.sha256 == sha256))


class LabelMaps(Transactions):
    """A job's label map, read back."""

    def label_map_categories(self, sha256: str) -> list[dict[str, Any]] | None:
        """The categories of the label map stored under ``sha256`` (a job's label_map_sha256)."""
        return self._query(lambda conn: read_label_map(conn, sha256))
