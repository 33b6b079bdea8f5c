"""Claims and fencing on real services (SeaweedFS S3, PostgreSQL): a chunk only ever processes its
own job's images, and a worker that lost its claim never writes over a newer claim's outputs."""

from __future__ import annotations

import json
import logging
import time

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


# ---------------------------------------------------------------------------------------------
# An interrupted `run` gives its claims back and is resumed by the same command; `retry` undoes
# `cancel`.

def _sqlite_store(folder) -> JobStore:
    return JobStore(f"sqlite:///{folder / 'panoptic-batch.db'}")


def _slow_run(folder, n: int, chunk_size: int) -> tuple:
    """A `run` of n small PNGs, one per batch, on the folder's SQLite database: (DEST, env, command)."""
    import os

    from .test_pipeline import exe

    source, dest = folder / "in", folder / "out"
    source.mkdir()
    for i in range(n):
        (source / f"img{i:02d}.png").write_bytes(png_bytes(i, size=(96, 80)))
    env = {k: v for k, v in os.environ.items() if k != "PANOPTIC_DATABASE_URL"}
    command = [exe(), "run", str(source), "--dest", str(dest), "--model", "detr-r50", "--weights", "random",
               "--min-size", "160", "--max-size", "200", "--threshold", "0", "--batch-size", "1",
               "--chunk-size", str(chunk_size)]
    return dest, env, command


def _wait_until_succeeded(store: JobStore, process, folder, count: int) -> None:
    """Until the `run` process's job (in folder's SQLite database) has ``count`` images done."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if (folder / "panoptic-batch.db").exists():
            try:
                jobs = store.jobs()
            except Exception:                                # the schema is being created
                jobs = []
            if jobs and jobs[0].succeeded >= count:
                return
        assert process.poll() is None, process.communicate()
        time.sleep(0.1)
    raise AssertionError(f"{count} images were not done in 300 s")


def test_a_second_signal_crossing_the_exit_of_an_interrupted_run_does_not_kill_it():
    """The user's second SIGTERM can arrive after the job's state is written, while `run` exits
    with 143: the exit code must stay 143 (a process killed half-way by the signal was seen in CI)."""
    import subprocess
    import sys

    program = ("import os, signal, sys\n"
               "from scheduler.embedded import StopOnSignals\n"
               "with StopOnSignals() as stopping:\n"
               "    os.kill(os.getpid(), signal.SIGTERM)\n"
               "    stopping.settle()\n"
               "os.kill(os.getpid(), signal.SIGTERM)\n"
               "sys.exit(stopping.exit_code)\n")
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=60)
    assert done.returncode == 143, done.stderr
    assert "SIGTERM: stopping after the current batch" in done.stderr


@pytest.mark.parametrize("signals", [("SIGINT",), ("SIGTERM", "SIGTERM")], ids=["sigint", "sigterm-twice"])
def test_an_interrupted_run_gives_its_images_back_and_the_same_command_resumes_it(tmp_path, signals):
    import signal
    import subprocess

    from .test_pipeline import exe

    n = 10
    dest, env, command = _slow_run(tmp_path, n, chunk_size=4)
    process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    store = _sqlite_store(tmp_path)
    _wait_until_succeeded(store, process, tmp_path, 2)
    for name in signals:
        process.send_signal(getattr(signal, name))
        time.sleep(0.05)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 128 + getattr(signal, signals[0]), err
    job_id = out.strip().splitlines()[-1]
    assert "interrupted" in err and "run the same command again to resume it" in err
    status = store.job(job_id)
    assert status.state == "interrupted" and status.running == 0     # every claim given back
    assert 2 <= status.succeeded < n and status.failed == 0 and status.pending == n - status.succeeded
    assert all(r.lease_token is None for r in store.images(job_id))
    assert len(list(dest.glob("*.json"))) == status.succeeded
    if signals != ("SIGINT",):
        return          # the job is left as SIGINT leaves it: what follows is the same path, run once

    # `status` shows the state; cancel, then retry, reopen it for the same command to resume.
    shown = subprocess.run([exe(), "status", job_id], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert "interrupted" in shown.stdout
    assert subprocess.run([exe(), "cancel", job_id], cwd=tmp_path, env=env, capture_output=True).returncode == 0
    assert store.job(job_id).state == "cancelled"
    retried = subprocess.run([exe(), "retry", job_id], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert retried.returncode == 0 and "run the same `panoptic-batch run` command" in retried.stdout, retried.stderr
    assert store.job(job_id).state == "interrupted"

    again = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    assert f"resuming interrupted job {job_id}" in again.stdout
    assert again.stdout.strip().splitlines()[-1] == job_id           # the same job, not a new one
    assert len(store.jobs()) == 1
    status = store.job(job_id)
    assert (status.state, status.total, status.succeeded, status.failed) == ("succeeded", n, n, 0)
    documents = [json.loads(p.read_text()) for p in sorted(dest.glob("*.json"))]
    assert len(documents) == n
    stats = json.loads(subprocess.run([exe(), "stats", job_id, "--json"], cwd=tmp_path, env=env,
                                      capture_output=True, text=True).stdout)
    expected: dict[int, list[int]] = {}
    for document in documents:
        for segment in document["segments_info"]:
            counts = expected.setdefault(segment["category_id"], [0, 0])
            counts[0] += 1
            counts[1] += segment["area"]
    assert {row["category_id"]: [row["segments"], row["pixels"]] for row in stats} == expected


def test_a_killed_run_is_resumed_by_the_same_command_and_a_live_one_is_not_taken_over(tmp_path):
    """SIGKILL (the OOM killer's signal) gives `run` no chance to give its images back: the same
    command finds its job still running, refuses while the process holding its images exists
    (stopped here, so that it holds them for sure), and resumes the job once that process is gone."""
    import signal
    import subprocess

    from worker.lease import holder_of

    n = 8
    dest, env, command = _slow_run(tmp_path, n, chunk_size=n)     # one chunk: all claimed at its start
    first = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    store = _sqlite_store(tmp_path)
    try:
        _wait_until_succeeded(store, first, tmp_path, 2)
        first.send_signal(signal.SIGSTOP)
        [job] = store.jobs()
        held = {row.id for row in store.images(job.id, state="running")}
        assert held and all(holder_of(row.lease_token).pid == first.pid
                            for row in store.images(job.id, state="running"))

        second = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        assert second.returncode == 1, second.stderr
        assert (f"job {job.id} of this same command is being processed by process {first.pid} on this machine"
                in second.stderr), second.stderr
        assert [j.id for j in store.jobs()] == [job.id] and store.job(job.id).state == "running"
    finally:
        first.kill()
        first.communicate(timeout=60)

    again = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    assert f"job {job.id}: the `run` processing it stopped without giving its images back" in again.stdout
    assert f"resuming interrupted job {job.id}: {len(held)} images left" in again.stdout
    assert again.stdout.strip().splitlines()[-1] == job.id           # the same job, not a new one
    assert len(store.jobs()) == 1
    status = store.job(job.id)
    assert (status.state, status.succeeded, status.failed) == ("succeeded", n, 0)
    # The killed process's claims counted as attempts (an image that kills every run is given up).
    assert {row.id: row.attempts for row in store.images(job.id)} == {
        row.id: 2 if row.id in held else 1 for row in store.images(job.id)}
    assert len(list(dest.glob("*.json"))) == n


def test_a_run_left_running_elsewhere_is_taken_back_only_when_its_leases_expire(db_url):
    """Held by a process on another machine, or under a token that names no process (older
    versions), a `run`'s job may still be at work: refused until its leases expire."""
    import click

    from scheduler.embedded import take_back_a_killed_run

    from .test_jobs_db import new_job

    store = JobStore(db_url)
    job_id, ids = new_job(store, 3, config={"run_key": "this-command", "broker": "embedded"})
    new_job(store, 1, config={"run_key": "another-command", "broker": "embedded"})
    assert take_back_a_killed_run(store, "a-command-never-run") is None
    for token in (f"{'a' * 20}.4242:1234@{'0' * 12}", "b" * 32):          # another machine; no holder named
        assert store.claim(ids[0], token, lease_seconds=60) is not None
        with pytest.raises(click.ClickException, match=f"job {job_id} of this same command is being processed "
                           r"on another machine \(its images are claimed until 20"):
            take_back_a_killed_run(store, "this-command")
        assert store.job(job_id).state == "running"
        with store.engine.begin() as conn:                            # the lease runs out
            conn.execute(update(Image.__table__).where(Image.__table__.c.id == ids[0])
                         .values(lease_expires_at=utcnow()))
    assert take_back_a_killed_run(store, "this-command") == job_id
    assert store.job(job_id).state == "interrupted"
    assert store.resume(job_id) == ids                                # all pending again, for the same `run`
    assert store.job(job_id).state == "running"


def test_retry_undoes_cancel_and_queues_the_pending_images_again(s3_server, s3_bucket, pg_database_url, tmp_path):
    import os
    import time
    import uuid

    import redis

    from .test_pipeline import MODEL_ARGS, REDIS_URL, cli, start_worker, stop_worker, wait_finished

    env = dict(os.environ, PANOPTIC_DATABASE_URL=pg_database_url, PANOPTIC_BROKER_URL=REDIS_URL)
    s3 = boto3.client("s3")
    for i in range(4):
        s3.put_object(Bucket=s3_bucket, Key=f"in/img{i}.png", Body=png_bytes(i))
    queue = f"uncancel-{uuid.uuid4().hex[:8]}"
    submitted = cli("submit", f"s3://{s3_bucket}/in", "--dest", f"s3://{s3_bucket}/out", "--queue", queue,
                    "--chunk-size", "2", *MODEL_ARGS, env=env)
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip().splitlines()[-1]
    assert cli("cancel", job_id, env=env).returncode == 0
    log = tmp_path / "worker.log"
    worker = start_worker(env, queue, log)
    try:
        deadline = time.monotonic() + 120
        while log.read_text(errors="replace").count("chunk finished") < 2:    # the worker drops both chunks
            assert time.monotonic() < deadline, log.read_text(errors="replace")[-3000:]
            time.sleep(0.2)
        assert redis.Redis.from_url(REDIS_URL).llen(queue) == 0
        assert log.read_text(errors="replace").count(", 2 skipped (") == 2
        store = JobStore(pg_database_url)
        status = store.job(job_id)
        assert (status.state, status.pending, status.succeeded) == ("cancelled", 4, 0)
        retried = cli("retry", job_id, env=env)
        assert retried.returncode == 0 and "4 failed and pending images queued again" in retried.stdout, retried.stderr
        status = wait_finished(job_id, env)
        assert (status["state"], status["succeeded"], status["failed"]) == ("succeeded", 4, 0)
    finally:
        stop_worker(worker)
    assert len(dest_keys(s3_bucket, "out/")) == 8


# ---------------------------------------------------------------------------------------------
# Deployments that share a broker or a database.

@pytest.fixture
def second_pg_database_url(pg_admin_url):
    from .conftest import fresh_pg_database
    with fresh_pg_database(pg_admin_url) as url:
        yield url


def test_deployments_sharing_a_broker_queue_leave_each_others_chunks_on_it(
        s3_server, s3_bucket, pg_database_url, second_pg_database_url, tmp_path):
    """Two deployments (two databases) on one Redis database and one queue name: a worker takes
    only its own database's chunks and puts the other's back, so each job finishes, nothing lost."""
    import os
    import uuid

    from .test_pipeline import MODEL_ARGS, REDIS_URL, cli, start_worker, stop_worker, wait_finished

    queue = f"shared-{uuid.uuid4().hex[:8]}"
    s3 = boto3.client("s3")
    envs, jobs = [], []
    for name, database in (("one", pg_database_url), ("two", second_pg_database_url)):
        for i in range(2):
            s3.put_object(Bucket=s3_bucket, Key=f"{name}/img{i}.png", Body=png_bytes(i))
        env = dict(os.environ, PANOPTIC_DATABASE_URL=database, PANOPTIC_BROKER_URL=REDIS_URL)
        submitted = cli("submit", f"s3://{s3_bucket}/{name}", "--dest", f"s3://{s3_bucket}/out-{name}",
                        "--queue", queue, "--chunk-size", "1", *MODEL_ARGS, env=env)
        assert submitted.returncode == 0, submitted.stderr
        envs.append(env)
        jobs.append(submitted.stdout.strip().splitlines()[-1])

    second = start_worker(envs[1], queue, tmp_path / "worker-two.log")       # only deployment two's worker
    try:
        status = wait_finished(jobs[1], envs[1], timeout=300)
        assert (status["state"], status["succeeded"]) == ("succeeded", 2)
        # Deployment one's chunks were seen (several times) and left on the broker, untouched.
        log = (tmp_path / "worker-two.log").read_text()
        assert "belongs to another deployment's database" in log
        one = JobStore(pg_database_url).job(jobs[0])
        assert (one.state, one.pending, one.failed) == ("pending", 2, 0)
        first = start_worker(envs[0], queue, tmp_path / "worker-one.log")
        try:
            status = wait_finished(jobs[0], envs[0], timeout=300)
            assert (status["state"], status["succeeded"], status["failed"]) == ("succeeded", 2, 0)
        finally:
            stop_worker(first)
    finally:
        stop_worker(second)
    assert dest_keys(s3_bucket, "out-one/") == ["out-one/img0.json", "out-one/img0.png",
                                                "out-one/img1.json", "out-one/img1.png"]
    assert "JobNotFound" not in log


def test_a_reaper_requeues_only_the_jobs_of_its_own_broker(s3_server, s3_bucket, pg_database_url):
    """Two brokers (Redis databases 0 and 1) sharing one job database: a reaper on broker 1 must
    not pull broker 0's lost images onto its own queue, nor a `run`'s."""
    import os
    import uuid

    import redis

    from .test_pipeline import MODEL_ARGS, cli

    queue = f"reap-{uuid.uuid4().hex[:8]}"
    brokers = ["redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/1"]
    s3 = boto3.client("s3")
    s3.put_object(Bucket=s3_bucket, Key="in/img0.png", Body=png_bytes(0))
    env = dict(os.environ, PANOPTIC_DATABASE_URL=pg_database_url, PANOPTIC_BROKER_URL=brokers[0],
               PANOPTIC_STALE_PENDING_SECONDS="0")
    submitted = cli("submit", f"s3://{s3_bucket}/in", "--dest", f"s3://{s3_bucket}/out", "--queue", queue,
                    *MODEL_ARGS, env=env)
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip().splitlines()[-1]
    store = JobStore(pg_database_url)
    assert store.job(job_id).config["broker"] == brokers[0]
    redis_of = [redis.Redis.from_url(url) for url in brokers]
    try:
        redis_of[0].delete(queue)                                   # the worker that took it was lost:
        (image,) = store.images(job_id)
        assert store.claim(image.id, "lost-worker", lease_seconds=0.01, job_id=job_id) is not None
        embedded = store.create_job(name="run", source="/in", dest="/out", model="detr-r50", weights="random",
                                    threshold=0.5, min_size=64, max_size=128,
                                    config={"broker": "embedded", "queue": queue})     # a `run`'s job
        (embedded_ids,) = store.add_images(embedded, [("a.png", "/in/a.png", None, 1)])
        store.finalize_submission(embedded)
        assert store.claim(embedded_ids[0], "a-run", lease_seconds=0.01) is not None
        time.sleep(0.05)                                           # the leases have expired

        other = cli("reap", env=dict(env, PANOPTIC_BROKER_URL=brokers[1]))
        assert other.returncode == 0 and other.stdout.startswith("0 images re-queued"), other.stderr
        assert store.image(image.id).state == "running" and redis_of[1].llen(queue) == 0

        own = cli("reap", env=env)
        assert own.returncode == 0 and own.stdout.startswith("1 images re-queued"), own.stderr
        assert store.image(image.id).state == "pending" and redis_of[0].llen(queue) == 1
        assert store.image(embedded_ids[0]).state == "running"   # the same `run` resumes it, not a reaper
    finally:
        for client in redis_of:
            client.delete(queue)
