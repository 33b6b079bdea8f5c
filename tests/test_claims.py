"""Claims and fencing on real services (SeaweedFS S3, PostgreSQL): a chunk only ever processes its
own job's images, and a worker that lost its claim never writes over a newer claim's outputs."""

from __future__ import annotations

import json
import logging

import boto3
import pytest
from sqlalchemy import update

from storage.jobs import JobStore
from storage.schema import Image, utcnow

from .test_job_control import png_bytes


def s3_job(store: JobStore, bucket: str, prefix: str, n: int) -> tuple[str, list[int]]:
    """A job of n tiny PNGs under s3://bucket/prefix, results to s3://bucket/out-prefix; its image ids."""
    from scheduler.submit import JobSpec, submit

    s3 = boto3.client("s3")
    for i in range(n):
        s3.put_object(Bucket=bucket, Key=f"{prefix}/img{i}.png", Body=png_bytes(i))
    spec = JobSpec(source=f"s3://{bucket}/{prefix}", dest=f"s3://{bucket}/out-{prefix}", model="detr-r50",
                   weights="random", threshold=0.0, min_size=64, max_size=96, chunk_size=32,
                   config={"batch_size": 2, "chunk_size": 32})
    chunks = []
    job_id = submit(store, spec, lambda job, ids: chunks.append(ids))
    return job_id, [i for ids in chunks for i in ids]


def dest_keys(bucket: str, prefix: str) -> list[str]:
    listed = boto3.client("s3").list_objects_v2(Bucket=bucket, Prefix=prefix)
    return sorted(o["Key"] for o in listed.get("Contents", []))


def test_a_chunk_naming_another_jobs_images_is_refused_and_logged(pg_database_url, s3_server, s3_bucket, caplog):
    from worker.pipeline import ChunkProcessor

    store = JobStore(pg_database_url)
    job_a, ids_a = s3_job(store, s3_bucket, "a", 2)
    job_b, ids_b = s3_job(store, s3_bucket, "b", 1)
    forged = ids_a + [ids_b[0] + 1000]                      # A's images, and an id nobody has
    with caplog.at_level(logging.WARNING, logger="worker.pipeline"):
        outcomes = ChunkProcessor(store, device="cpu").process(job_b, forged)

    assert sorted(o.image_id for o in outcomes) == sorted(forged)
    assert all(o.refused and not o.ok for o in outcomes)
    refusals = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(refusals) == 3 and sum(f"belongs to job {job_a}" in m for m in refusals) == 2
    assert dest_keys(s3_bucket, "out-") == []               # nothing written into B's DEST (or A's)
    a, b = store.job(job_a), store.job(job_b)
    assert (a.state, a.pending, a.succeeded) == ("pending", 2, 0)   # A's images untouched
    assert (b.succeeded, b.failed, b.pending) == (0, 0, 1)
    assert all(r.attempts == 0 for r in store.images(job_a))

    # The job's own chunk still runs, and a chunk mixing both processes only its job's images.
    outcomes = ChunkProcessor(store, device="cpu").process(job_b, ids_a[:1] + ids_b)
    assert sorted((o.image_id, o.ok, o.refused) for o in outcomes) == sorted(
        [(ids_a[0], False, True), (ids_b[0], True, False)])
    assert dest_keys(s3_bucket, "out-") == ["out-b/img0.json", "out-b/img0.png"]
    assert store.job(job_a).pending == 2


@pytest.mark.parametrize("pause", ["before_the_claim_check", "after_the_claim_check"])
def test_a_worker_paused_past_its_lease_does_not_overwrite_the_newer_result(
        pause, pg_database_url, s3_server, s3_bucket, monkeypatch, caplog):
    """Worker A claims the image, then stalls (SIGSTOP, GC, partition) just before or just after
    it checks its claim, long enough for the lease to expire and worker B to claim, write and
    record the image. A's outputs must not replace B's, and A reports a refusal, not a success."""
    from worker import pipeline
    from worker.pipeline import ChunkProcessor

    store_a, store_b = JobStore(pg_database_url), JobStore(pg_database_url)
    job_id, (image_id,) = s3_job(store_a, s3_bucket, "in", 1)
    writer = ["A"]
    real_document = pipeline.result_document
    monkeypatch.setattr(pipeline, "result_document",
                        lambda *args: {**real_document(*args), "writer": writer[0]})
    worker_b = ChunkProcessor(store_b, device="cpu")
    b_outcomes = []

    def worker_b_takes_over():
        # A's lease runs out while it stalls; the reaper or a redelivery gives the image to B.
        with store_a.engine.begin() as conn:
            conn.execute(update(Image.__table__).where(Image.__table__.c.id == image_id)
                         .values(lease_expires_at=utcnow()))
        writer[0] = "B"
        b_outcomes.extend(worker_b.process(job_id, [image_id]))
        writer[0] = "A"

    real_holds = store_a.holds_claim
    checks = []

    def stalling_holds_claim(image, token):
        checks.append(image)
        if len(checks) > 1:
            return real_holds(image, token)
        if pause == "before_the_claim_check":
            worker_b_takes_over()
            return real_holds(image, token)
        held = real_holds(image, token)
        worker_b_takes_over()
        return held

    monkeypatch.setattr(store_a, "holds_claim", stalling_holds_claim)
    with caplog.at_level(logging.WARNING, logger="worker.pipeline"):
        a_outcomes = ChunkProcessor(store_a, device="cpu").process(job_id, [image_id])

    assert [(o.ok, o.refused) for o in b_outcomes] == [(True, False)]
    assert [(o.ok, o.refused) for o in a_outcomes] == [(False, True)]
    assert any("refused" in r.getMessage() and "img0.png" in r.getMessage() for r in caplog.records)
    s3 = boto3.client("s3")
    document = json.loads(s3.get_object(Bucket=s3_bucket, Key="out-in/img0.json")["Body"].read())
    assert document["writer"] == "B"                        # DEST holds the newer result…
    record = store_a.image(image_id)
    status = store_a.job(job_id)                            # …and SQL agrees: recorded once, B's
    assert (record.state, record.attempts, record.segments) == ("succeeded", 2, len(document["segments_info"]))
    assert (status.state, status.succeeded, status.failed) == ("succeeded", 1, 0)


def test_conditional_writes_refuse_a_changed_object(s3_server, s3_bucket, tmp_path):
    """The store primitive the fencing relies on: SeaweedFS (and AWS S3) apply If-Match and
    If-None-Match on PutObject; folders compare just before the rename."""
    from storage import objects

    for base in (f"s3://{s3_bucket}", str(tmp_path)):
        uri = objects.join(base, "x/obj.json")
        objects.write_bytes(uri, b"first", expect=None)                 # absent: written
        with pytest.raises(objects.PreconditionFailed):
            objects.write_bytes(uri, b"second", expect=None)            # exists now
        seen = objects.stat(uri).etag
        with pytest.raises(objects.PreconditionFailed):
            objects.write_bytes(uri, b"third", expect=seen + "0")
        objects.write_bytes(uri, b"fourth", expect=seen)
        with pytest.raises(objects.PreconditionFailed):
            objects.write_bytes(uri, b"fifth", expect=seen)             # changed by the write before
        assert objects.read_bytes(uri) == b"fourth"
