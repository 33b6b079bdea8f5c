"""`panoptic-batch prune`: old finished jobs leave the database with their images' rows and
per-class statistics; newer, pending and running jobs stay whole; outputs in DEST stay; on
SQLite and PostgreSQL, through the console script."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from datetime import timedelta

import pytest
from sqlalchemy import func, select, update

from storage.jobs import ImageSuccess, JobStore
from storage.schema import Image, ImageClass, Job, utcnow



def prune(*args, db_url):
    exe = shutil.which("panoptic-batch", path=os.path.dirname(sys.executable)) or shutil.which("panoptic-batch")
    assert exe, "the panoptic-batch console script is not installed"
    return subprocess.run([exe, "prune", *args], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PANOPTIC_DATABASE_URL=db_url))


def make_job(store: JobStore, dest, name: str, images: int, outcome: str | None, finished_days_ago: float | None):
    """A job of `images` images, each succeeded with two classes (outcome "succeeded"), failed, or
    left pending (None); its finished_at moved `finished_days_ago` into the past."""
    job_id = store.create_job(name=name, source="s3://in/photos", dest=str(dest), model="detr-r50",
                              weights="random", threshold=0.85, min_size=800, max_size=1333)
    ids = [i for batch in store.add_images(job_id, ((f"{name}-{i}.jpg", f"s3://in/{name}-{i}.jpg", "e", 1)
                                                     for i in range(images))) for i in batch]
    store.finalize_submission(job_id)
    if outcome is not None:
        token = uuid.uuid4().hex
        assert len(store.claim_many(ids, token, 60)) == images
        for image_id in ids:
            if outcome == "succeeded":
                out = dest / f"{name}-{image_id}.json"
                out.write_text("{}")                       # an output that prune must leave alone
                store.record_successes(token, [ImageSuccess(
                    image_id=image_id, output_png=str(out.with_suffix(".png")), output_json=str(out), height=4,
                    width=4, segments_info=[{"category_id": 1, "area": 3}, {"category_id": 2, "area": 5}])])
            else:
                store.record_failure(image_id, token, "failed for the test")
    if finished_days_ago is not None:
        with store.engine.begin() as conn:
            conn.execute(update(Job.__table__).where(Job.__table__.c.id == job_id)
                         .values(finished_at=utcnow() - timedelta(days=finished_days_ago)))
    return job_id


def counts(store: JobStore, job_id: str) -> tuple[int, int, int]:
    with store.engine.connect() as conn:
        return tuple(conn.scalar(select(func.count()).select_from(table).where(column == job_id)) for table, column in (
            (Job.__table__, Job.__table__.c.id), (Image.__table__, Image.__table__.c.job_id),
            (ImageClass.__table__, ImageClass.__table__.c.job_id)))


def test_prune_deletes_old_finished_jobs_rows_and_nothing_else(db_url, tmp_path):
    store = JobStore(db_url)
    dest = tmp_path / "dest"
    dest.mkdir()
    old_ok = make_job(store, dest, "old-ok", 3, "succeeded", 40)
    old_failed = make_job(store, dest, "old-failed", 2, "failed", 40)
    recent = make_job(store, dest, "recent", 2, "succeeded", 1)
    pending = make_job(store, dest, "pending", 2, None, None)
    running = make_job(store, dest, "running", 2, None, None)
    with store.engine.begin() as conn:                     # created long ago, still running
        conn.execute(update(Job.__table__).where(Job.__table__.c.id.in_([pending, running]))
                     .values(created_at=utcnow() - timedelta(days=90)))
        conn.execute(update(Job.__table__).where(Job.__table__.c.id == running).values(state="running"))
    cancelled = make_job(store, dest, "cancelled", 1, None, None)
    assert store.cancel(cancelled)
    with store.engine.begin() as conn:
        conn.execute(update(Job.__table__).where(Job.__table__.c.id == cancelled)
                     .values(finished_at=utcnow() - timedelta(days=35)))
    before = {job: counts(store, job) for job in (old_ok, old_failed, recent, pending, running, cancelled)}
    assert before[old_ok] == (1, 3, 6) and before[old_failed] == (1, 2, 0)
    outputs = sorted(p.name for p in dest.iterdir())
    assert len(outputs) == 5

    dry = prune("--older-than", "30d", "--dry-run", "--json", db_url=db_url)
    assert dry.returncode == 0, dry.stderr
    listed = json.loads(dry.stdout)
    assert listed["dry_run"] is True
    assert {(j["id"], j["state"], j["images"], j["class_rows"]) for j in listed["jobs"]} == {
        (old_ok, "succeeded", 3, 6), (old_failed, "failed", 2, 0), (cancelled, "cancelled", 1, 0)}
    assert {job: counts(store, job) for job in before} == before          # a dry run deletes nothing

    only_failed = prune("--older-than", "30d", "--state", "failed", db_url=db_url)
    assert only_failed.returncode == 0, only_failed.stderr
    assert f"deleted job {old_failed} (old-failed, failed" in only_failed.stdout
    assert "deleted 1 jobs, 2 images, 0 class rows" in only_failed.stdout
    assert counts(store, old_failed) == (0, 0, 0) and counts(store, old_ok) == before[old_ok]

    rest = prune("--older-than", "4w", db_url=db_url)
    assert rest.returncode == 0, rest.stderr
    assert "deleted 2 jobs, 4 images, 6 class rows" in rest.stdout and "outputs in DEST are kept" in rest.stdout
    assert counts(store, old_ok) == (0, 0, 0) and counts(store, cancelled) == (0, 0, 0)
    for job in (recent, pending, running):                 # newer, pending and running jobs: whole
        assert counts(store, job) == before[job]
    assert store.class_stats(recent) == [{"category_id": 1, "segments": 2, "images": 2, "pixels": 6},
                                         {"category_id": 2, "segments": 2, "images": 2, "pixels": 10}]
    assert sorted(p.name for p in dest.iterdir()) == outputs                # DEST untouched

    again = prune("--older-than", "30d", db_url=db_url)
    assert again.returncode == 0 and "deleted 0 jobs" in again.stdout


def test_prune_never_deletes_a_job_that_runs_again(db_url, tmp_path):
    """A job selected as finished but retried before its deletion runs is left alone."""
    store = JobStore(db_url)
    dest = tmp_path / "dest"
    dest.mkdir()
    job = make_job(store, dest, "retried", 2, "failed", 40)
    assert store.reset_failed(job)                          # running again
    assert store.delete_jobs([job], only_finished=True) == {}
    assert counts(store, job) == (1, 2, 0)


@pytest.mark.parametrize("value", ["30", "d", "1x", "-3d", "1d 2h"])
def test_prune_refuses_a_duration_it_cannot_read(value, tmp_path):
    result = prune("--older-than", value, db_url=f"sqlite:///{tmp_path / 'jobs.db'}")
    assert result.returncode == 2 and "is not a duration" in result.stderr, result.stderr
