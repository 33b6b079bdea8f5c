"""Delivery and recovery under crashes and faults, on real services and real processes.

Every end-to-end test here submits a job of small images to a SeaweedFS bucket, runs real
`panoptic-batch worker` processes, breaks something in the middle — the worker (SIGKILL), the
broker (a private redis-server killed and restarted empty), the object store (a fault-injecting
proxy: 503 SlowDown, connection resets, objects failing many times in a row), the database (its
connections terminated) —
and then checks that the job finished with every image succeeded, that each image's JSON, PNG
and database row agree, and that the statistics equal the sums over the JSON files.

Progress is polled through JobStore in this process (what `status --json` prints), and only the
first test reads the statistics through `stats --json`, the others through JobStore.class_stats
(the rows that command prints): each CLI call costs seconds of CPU (it imports torch) that the
worker needs more on a small machine. Jobs are small (6-120 images, chunks of 8, batches of 2)
to keep the whole file within a few minutes; the faults still land mid-chunk.
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import boto3
import click
import numpy as np
import psycopg
import pytest
from PIL import Image
from sqlalchemy import select, text
from sqlalchemy.exc import IntegrityError

from storage import objects
from storage.jobs import JobStore
from storage.jobs.sql import _retryable
from storage.retry import backoff_delay, is_transient, retry_transient
from tests.fault_proxy import FaultProxy
from tests.test_pipeline import (MODEL_ARGS, REDIS_URL, check_result_pair, check_stats, cli, start_worker,
                                 stats_from_documents, stop_worker)

# Leases expire 6 s after a worker dies, and every worker's reaper looks every 2 s.
FAST_RECOVERY = {"PANOPTIC_LEASE_SECONDS": "6", "PANOPTIC_REAP_INTERVAL": "2"}
CHUNK = "8"


# ---------------------------------------------------------------------------------------------
# helpers


def tiny_images(n: int, seed: int) -> dict[str, bytes]:
    """n small PNGs of three sizes, keyed by their path relative to SOURCE."""
    rng = np.random.default_rng(seed)
    sizes = [(32, 32), (40, 24), (24, 36)]
    files = {}
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buffer, "PNG")
        files[f"d{i % 4}/img{i:04d}.png"] = buffer.getvalue()
    return files


def upload(bucket: str, files: dict[str, bytes]) -> None:
    s3 = boto3.client("s3")
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda item: s3.put_object(Bucket=bucket, Key=f"in/{item[0]}", Body=item[1]), files.items()))


def submit(env: dict, bucket: str, queue: str) -> str:
    result = cli("submit", f"s3://{bucket}/in", "--dest", f"s3://{bucket}/out", "--queue", queue,
                 "--chunk-size", CHUNK, *MODEL_ARGS, env=env)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()[-1]


def wait_for(store: JobStore, job_id: str, condition, timeout: float, what: str, logs=()):
    deadline = time.monotonic() + timeout
    while True:
        status = store.job(job_id)
        if condition(status):
            return status
        if time.monotonic() > deadline:
            tail = "\n".join(Path(p).read_text(errors="replace")[-3000:] for p in logs if Path(p).exists())
            raise AssertionError(f"{what}: not reached in {timeout} s: {status}\n{tail}")
        time.sleep(0.25)


def finished(status) -> bool:
    return status.finished


def kill_group(process: subprocess.Popen) -> None:
    """SIGKILL the worker and its pool child (the whole process group)."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait(30)


def check_job(env: dict, store: JobStore, job_id: str, bucket: str, files: dict[str, bytes],
              stats_cli: bool = False) -> dict:
    """Everything succeeded, and outputs, rows and statistics agree; returns the rows by key."""
    status = store.job(job_id)
    n = len(files)
    assert (status.state, status.total, status.succeeded, status.failed, status.pending, status.running) == \
        ("succeeded", n, n, 0, 0, 0)
    s3 = boto3.client("s3")
    rows = {row.key: row for row in store.images(job_id)}
    assert set(rows) == set(files)

    def fetch(key):
        stem = key.rsplit(".", 1)[0]
        png = s3.get_object(Bucket=bucket, Key=f"out/{stem}.png")["Body"].read()
        document = json.loads(s3.get_object(Bucket=bucket, Key=f"out/{stem}.json")["Body"].read())
        return key, stem, png, document

    documents = []
    with ThreadPoolExecutor(8) as pool:
        for key, stem, png, document in pool.map(fetch, sorted(files)):
            check_result_pair(png, document, files[key], key)       # the PNG holds the JSON's segments
            row = rows[key]
            assert row.state == "succeeded" and row.error is None and row.lease_token is None, row
            assert row.output_json == f"s3://{bucket}/out/{stem}.json"
            # The row was written by the same processing as the files it points to.
            assert (row.height, row.width, row.segments) == \
                (document["height"], document["width"], len(document["segments_info"])), key
            documents.append(document)
    # Statistics == the sums over the JSON files (no image counted twice, none missing).
    if stats_cli:
        check_stats(job_id, env, documents)
    else:
        assert {r["category_id"]: {"segments": r["segments"], "images": r["images"], "pixels": r["pixels"]}
                for r in store.class_stats(job_id)} == stats_from_documents(documents)
    return rows


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A private redis-server (the shared one on 6379 is never touched), restartable on its port."""

    def __init__(self, directory: Path, persistent: bool = False):
        self.port, self.directory, self.persistent = free_port(), directory, persistent
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        args = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "yes" if self.persistent else "no", "--dir", str(self.directory),
                "--daemonize", "no"]
        self.process = subprocess.Popen(args, stdout=open(self.directory / "redis.log", "ab"),
                                        stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(64).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            assert self.process.poll() is None and time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)


@pytest.fixture
def job_env(s3_server, pg_database_url):
    env = dict(os.environ, PANOPTIC_DATABASE_URL=pg_database_url, PANOPTIC_BROKER_URL=REDIS_URL,
               PYTHONUNBUFFERED="1")
    return env, f"test-{uuid.uuid4().hex[:8]}", JobStore(pg_database_url)


# ---------------------------------------------------------------------------------------------
# a. workers killed with SIGKILL in the middle of their chunks


def test_job_survives_workers_killed_mid_chunk(job_env, s3_bucket, tmp_path):
    env, queue, store = job_env
    files = tiny_images(120, seed=1)
    upload(s3_bucket, files)
    job_id = submit(env, s3_bucket, queue)
    # Three kills could, in theory, hit one image each time: allow more attempts than that. A kill
    # between a chunk's delivery and its claims leaves pending images whose message waits, unacked,
    # for Redis's visibility timeout (hours): the reaper queues them again once the queue is empty.
    worker_env = dict(env, **FAST_RECOVERY, PANOPTIC_MAX_ATTEMPTS="10", PANOPTIC_STALE_PENDING_SECONDS="5")
    logs = []

    def new_worker():
        logs.append(tmp_path / f"worker{len(logs)}.log")
        return start_worker(worker_env, queue, logs[-1])

    worker = new_worker()
    try:
        done, held = 0, set()
        for _ in range(3):
            target = done + 24                  # three chunks more
            status = wait_for(store, job_id, lambda s: s.succeeded >= target or s.finished, 180,
                              f"{target} images succeeded", logs)
            assert not status.finished, "the job finished before all kills: give it more images"
            kill_group(worker)                  # mid-chunk: chunks of 8 images, batches of 2
            done = store.job(job_id).succeeded
            # Claimed by the dead worker (or an earlier one), leases running out.
            held |= {row.key for row in store.images(job_id, state="running")}
            worker = new_worker()
        wait_for(store, job_id, finished, 180, "the job finished", logs)
    finally:
        stop_worker(worker)
    rows = check_job(env, store, job_id, s3_bucket, files, stats_cli=True)
    # The kills left claimed images behind, which were processed again after their leases expired.
    assert held and all(rows[key].attempts > 1 for key in held), held
    assert max(row.attempts for row in rows.values()) <= 4
    log = "\n".join(p.read_text(errors="replace") for p in logs)
    assert "whose worker was lost (lease expired)" in log


# ---------------------------------------------------------------------------------------------
# a'. a worker whose device fails for good stops itself and hands its chunk on

# Loaded by every Python process that has the folder on its path (site.py imports sitecustomize):
# the worker's main process imports it before forking its pool, so the pool's model passes fail
# as a GPU's do after an illegal memory access. The worker's own code is untouched.
BROKEN_DEVICE = """
import worker.predictor

def start_batch(self, images):
    raise RuntimeError("CUDA error: an illegal memory access was encountered (injected by the test)")

worker.predictor.Predictor.start_batch = start_batch
"""


def test_a_worker_whose_device_fails_stops_and_loses_nothing(job_env, s3_bucket, tmp_path):
    env, queue, store = job_env
    files = tiny_images(6, seed=4)
    upload(s3_bucket, files)
    job_id = submit(env, s3_bucket, queue)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "sitecustomize.py").write_text(BROKEN_DEVICE)
    # Before the checkout under test (PYTHONPATH when it is not the installed one), not instead of it.
    path = os.pathsep.join(filter(None, [str(tmp_path / "broken"), os.environ.get("PYTHONPATH")]))
    broken = start_worker(dict(env, PYTHONPATH=path), queue, tmp_path / "broken.log")
    try:
        broken.wait(120)                        # it stops by itself
    finally:
        kill_group(broken)
    log = (tmp_path / "broken.log").read_text(errors="replace")
    assert "device failure, stopping this worker: CUDA error: an illegal memory access" in log, log[-3000:]
    status = store.job(job_id)
    assert (status.failed, status.succeeded, status.pending) == (0, 0, len(files)), status
    # Given back with the attempt counted (an image that breaks every device it meets is given up
    # after PANOPTIC_MAX_ATTEMPTS instead of stopping worker after worker).
    assert all(row.attempts == 1 for row in store.images(job_id))

    healthy = start_worker(env, queue, tmp_path / "healthy.log")     # the chunk's message is back in the queue
    try:
        wait_for(store, job_id, finished, 120, "the job finished", [tmp_path / "healthy.log"])
    finally:
        stop_worker(healthy)
    check_job(env, store, job_id, s3_bucket, files)


# ---------------------------------------------------------------------------------------------
# b. the broker restarts mid-job and forgets its queues


def test_job_survives_broker_restart_without_persistence(job_env, s3_bucket, tmp_path):
    """Redis killed and restarted empty (no RDB, no AOF): the queued messages are gone.

    The chunk in progress finishes (its claims are in SQL); the worker reconnects by itself; the
    reaper sees pending images of a running job while the job's queue is empty and queues them
    again. (With `appendonly yes` the messages would survive; this is the worst case.)"""
    env, queue, store = job_env
    redis = RedisServer(tmp_path)
    redis.start()
    env = dict(env, PANOPTIC_BROKER_URL=redis.url)
    files = tiny_images(72, seed=2)
    upload(s3_bucket, files)
    worker_env = dict(env, **FAST_RECOVERY, PANOPTIC_STALE_PENDING_SECONDS="3")
    log = tmp_path / "worker.log"
    worker = None
    try:
        job_id = submit(env, s3_bucket, queue)
        worker = start_worker(worker_env, queue, log)
        wait_for(store, job_id, lambda s: s.succeeded >= 16, 180, "16 images succeeded", [log])
        redis.kill()
        time.sleep(1.5)
        redis.start()                                           # same port, empty
        wait_for(store, job_id, finished, 180, "the job finished", [log])
    finally:
        if worker is not None:
            stop_worker(worker)
        redis.stop()
    check_job(env, store, job_id, s3_bucket, files)
    text_log = log.read_text(errors="replace")
    assert "pending images of job" in text_log and "queue " + queue + " is empty" in text_log, text_log[-3000:]


# ---------------------------------------------------------------------------------------------
# c. the object store throttles, resets connections and fails some objects for a while


def test_job_survives_s3_faults(job_env, s3_server, s3_bucket, tmp_path):
    """30 % of the worker's S3 requests answered 503 SlowDown or reset, and three objects (one
    download, two uploads) failing 6 times in a row: more than boto3's own 5 attempts, so only
    our backoff (storage.retry) gets them through."""
    env, queue, store = job_env
    files = tiny_images(32, seed=3)
    upload(s3_bucket, files)
    job_id = submit(env, s3_bucket, queue)                      # the submit talks to S3 directly
    log = tmp_path / "worker.log"
    # All three in one chunk (d1/, listed second), so that their backoffs overlap.
    stubborn = {f"/{s3_bucket}/in/d1/img0005.png", f"/{s3_bucket}/out/d1/img0009.png",
                f"/{s3_bucket}/out/d1/img0013.json"}
    with FaultProxy(s3_server.endpoint_url, fault_rate=0.3, seed=5) as proxy:
        proxy.stubborn(stubborn.__contains__, failures=6)
        worker = start_worker(dict(env, **FAST_RECOVERY, AWS_ENDPOINT_URL=proxy.endpoint_url), queue, log)
        try:
            wait_for(store, job_id, finished, 300, "the job finished", [log])
        finally:
            stop_worker(worker)
    check_job(env, store, job_id, s3_bucket, files)
    assert proxy.counts["slowdown"] > 10 and proxy.counts["drop"] > 10, proxy.counts
    assert all(proxy.requests[path] >= 7 for path in stubborn), {p: proxy.requests[p] for p in stubborn}
    text_log = log.read_text(errors="replace")
    assert "failed with a transient error" in text_log, text_log[-3000:]   # our backoff took over


# ---------------------------------------------------------------------------------------------
# d. the database drops the workers' connections


def test_job_survives_database_connections_terminated(job_env, s3_bucket, pg_admin_url, tmp_path):
    env, queue, store = job_env
    files = tiny_images(72, seed=4)
    upload(s3_bucket, files)
    job_id = submit(env, s3_bucket, queue)
    database = env["PANOPTIC_DATABASE_URL"].rsplit("/", 1)[-1]
    log = tmp_path / "worker.log"
    worker = start_worker(dict(env, **FAST_RECOVERY), queue, log)
    terminated = 0
    try:
        for target in (12, 28, 44):
            wait_for(store, job_id, lambda s: s.succeeded >= target, 180, f"{target} images succeeded", [log])
            with psycopg.connect(pg_admin_url, autocommit=True) as admin:
                rows = admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                     "WHERE datname = %s AND pid <> pg_backend_pid()", (database,)).fetchall()
                terminated += sum(1 for (ok,) in rows if ok)
            time.sleep(0.5)
        wait_for(store, job_id, finished, 180, "the job finished", [log])
    finally:
        stop_worker(worker)
    assert terminated >= 3                  # the worker's connections (and this test's) were cut
    check_job(env, store, job_id, s3_bucket, files)


# ---------------------------------------------------------------------------------------------
# retry_transient and the classification of errors


class Flaky:
    """Raises the given errors in turn, then returns "ok"; counts calls."""

    def __init__(self, *errors):
        self.errors, self.calls = list(errors), 0

    def __call__(self):
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "ok"


def transient_error():
    error = objects.ObjectStoreError("read s3://b/k failed: SlowDown: Please reduce your request rate.")
    error.transient = True
    return error


def test_retry_transient_retries_transient_errors_then_succeeds():
    sleeps = []
    fn = Flaky(transient_error(), ConnectionResetError("reset"), TimeoutError("timed out"))
    assert retry_transient(fn, sleep=sleeps.append, base_delay=1.0, max_delay=3.0) == "ok"
    assert fn.calls == 4 and len(sleeps) == 3
    assert [s <= cap for s, cap in zip(sleeps, (1.0, 2.0, 3.0))] == [True] * 3     # full jitter under the caps


def test_retry_transient_does_not_retry_permanent_errors():
    for error in (objects.ObjectNotFound("read s3://b/k: no such object (NoSuchKey)"),
                  objects.ObjectStoreError("read s3://b/k failed: AccessDenied: Access Denied"),
                  ValueError("cannot decode image")):
        sleeps = []
        fn = Flaky(error)
        with pytest.raises(type(error)):
            retry_transient(fn, sleep=sleeps.append)
        assert fn.calls == 1 and sleeps == []


class FakeClock:
    """A monotonic clock that only sleeping moves; records the sleeps."""

    def __init__(self):
        self.now, self.sleeps = 1000.0, []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def test_retry_transient_retries_for_a_time_budget_not_a_count(monkeypatch):
    # The default budget: at least 90 s of retrying, whatever the number of tries it takes.
    monkeypatch.delenv("PANOPTIC_RETRY_SECONDS", raising=False)
    clock = FakeClock()
    fn = Flaky(*[transient_error() for _ in range(1000)])
    with pytest.raises(objects.ObjectStoreError) as raised:
        retry_transient(fn, sleep=clock.sleep, clock=clock)
    assert raised.value.transient
    assert 90 <= sum(clock.sleeps) == pytest.approx(120.0) and fn.calls == len(clock.sleeps) + 1 > 8
    assert max(clock.sleeps) <= 10.0                    # each sleep capped, so recovery is noticed soon
    # An outage shorter than the budget is ridden out: the call succeeds once the store is back.
    clock = FakeClock()
    fn = Flaky(*[transient_error() for _ in range(1000)])
    back_at = clock.now + 75.0

    def store(fn=fn):
        if clock.now < back_at:
            return fn()
        return "ok"
    assert retry_transient(store, sleep=clock.sleep, clock=clock) == "ok" and 75 <= sum(clock.sleeps) < 86
    # Configurable (the tests' own outages are short), and a bad value is refused with its name.
    monkeypatch.setenv("PANOPTIC_RETRY_SECONDS", "3")
    clock = FakeClock()
    with pytest.raises(objects.ObjectStoreError):
        retry_transient(Flaky(*[transient_error() for _ in range(1000)]), sleep=clock.sleep, clock=clock)
    assert sum(clock.sleeps) == pytest.approx(3.0)
    monkeypatch.setenv("PANOPTIC_RETRY_SECONDS", "soon")
    with pytest.raises(ValueError, match="PANOPTIC_RETRY_SECONDS"):
        retry_transient(Flaky(transient_error()), sleep=clock.sleep, clock=clock)
    from scheduler.cli import check_worker_settings        # run and worker refuse it before any work
    with pytest.raises(click.ClickException, match="PANOPTIC_RETRY_SECONDS='soon'"):
        check_worker_settings("cpu", "fp32")
    # A bound on calls still works (the database's retries use one).
    sleeps = []
    fn = Flaky(*[transient_error() for _ in range(10)])
    with pytest.raises(objects.ObjectStoreError):
        retry_transient(fn, attempts=4, sleep=sleeps.append)
    assert fn.calls == 4 and len(sleeps) == 3
    assert all(0 <= backoff_delay(n) <= min(10.0, 0.5 * 2 ** n) for n in range(40))


# The default budget (120 s) rides out the README's "about a minute" of outage: shown on a fake
# clock above. End to end, on a shorter scale: the server is away for longer than boto3's own
# retries could bridge (5 attempts, at most 1 + 2 + 4 + 8 s of backoff), so only our budget gets
# the calls through; the budget, half the default, also covers the server's restart on a busy
# machine (that took 10 s here under load).
OUTAGE_S = 16.0
OUTAGE_RETRY_BUDGET_S = 60.0


def test_run_rides_out_an_s3_outage_shorter_than_its_retry_budget(tmp_path, monkeypatch):
    """A real S3 server (SeaweedFS) stopped for OUTAGE_S in the middle of a `run` job, then
    started again on the same port and data: every image still succeeds, nothing is counted twice."""
    from storage.s3server import S3Server, free_ports
    from tests.test_pipeline import exe

    # A fixed S3 port and data folder: started again, the server finds its objects.
    server = S3Server(tmp_path / "weed", s3_port=free_ports(1, "127.0.0.1")[0]).start()
    try:
        for name, value in server.env().items():
            monkeypatch.setenv(name, value)
        monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "aws-config"))
        monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "aws-credentials"))
        monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
        monkeypatch.setenv("PANOPTIC_RETRY_SECONDS", str(OUTAGE_RETRY_BUDGET_S))
        bucket = server.create_bucket("outage")
        files = tiny_images(40, seed=6)
        upload(bucket, files)
        env = dict(os.environ, PANOPTIC_DATABASE_URL=f"sqlite:///{tmp_path / 'jobs.db'}", PYTHONUNBUFFERED="1")
        store = JobStore(env["PANOPTIC_DATABASE_URL"])
        log = tmp_path / "run.log"
        with open(log, "wb") as out:
            run = subprocess.Popen([exe(), "run", f"s3://{bucket}/in", "--dest", f"s3://{bucket}/out",
                                    "--chunk-size", CHUNK, *MODEL_ARGS], env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 240
            while not (store.jobs() and store.jobs()[0].succeeded >= 6):
                assert run.poll() is None and time.monotonic() < deadline, log.read_text(errors="replace")[-3000:]
                time.sleep(0.2)
            job_id = store.jobs()[0].id
            # Killed after 1 s: weed's graceful stop waits 15 s for the clients' open connections.
            halted = time.monotonic()
            server.stop(timeout=1)
            during = store.job(job_id)
            assert during.succeeded < len(files), "the outage must fall in the middle of the job"
            time.sleep(max(0.0, OUTAGE_S - (time.monotonic() - halted)))
            server.start()
            assert run.wait(300) == 0, log.read_text(errors="replace")[-3000:]
        finally:
            if run.poll() is None:
                run.kill()
                run.wait(30)
        text_log = log.read_text(errors="replace")
        assert "failed with a transient error" in text_log, text_log[-3000:]       # it did wait the outage out
        assert store.job(job_id).succeeded > during.succeeded
        check_job(env, store, job_id, bucket, files)
    finally:
        server.stop(timeout=1)


def test_object_store_errors_say_whether_they_are_transient(s3_server, s3_bucket, tmp_path, monkeypatch):
    """Classified on real answers: SlowDown from the proxy, 404 from SeaweedFS, a refused
    connection, a missing local file. (Resets are classified and retried in the S3 faults test.)"""
    # boto3 sleeps a random 0-1, 0-2, 0-4, 0-8 and 0-16 s between its tries of a throttled request
    # (15 s on average): its answers are what this test needs, not its waiting.
    monkeypatch.setattr("botocore.retries.standard.ExponentialBackoff.delay_amount", lambda self, context: 0.0)
    s3_server.client().put_object(Bucket=s3_bucket, Key="k", Body=b"data")
    with FaultProxy(s3_server.endpoint_url, fault_rate=1.0, modes=("slowdown",)) as slow:
        monkeypatch.setenv("AWS_ENDPOINT_URL", slow.endpoint_url)
        with pytest.raises(objects.ObjectStoreError, match="SlowDown") as raised:
            objects.read_bytes(f"s3://{s3_bucket}/k")
        assert raised.value.transient and is_transient(raised.value)
        assert slow.counts["slowdown"] >= 5                  # after boto3's own 5 attempts
        # Once the store answers again, the same call goes through.
        slow.fault_rate = 0.0
        assert retry_transient(lambda: objects.read_bytes(f"s3://{s3_bucket}/k"), sleep=lambda s: None) == b"data"
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint_url)
    with pytest.raises(objects.ObjectNotFound) as raised:
        objects.read_bytes(f"s3://{s3_bucket}/missing")
    assert not raised.value.transient and not is_transient(raised.value)
    with pytest.raises(objects.ObjectStoreError) as raised:
        objects.read_bytes(f"http://127.0.0.1:{free_port()}/nothing-listens-here")
    assert raised.value.transient                             # connection refused
    with pytest.raises(objects.ObjectNotFound) as raised:
        objects.read_bytes(tmp_path / "missing.png")
    assert not raised.value.transient                         # local errors are permanent


def test_job_store_survives_dropped_connections(pg_database_url, pg_admin_url):
    """Pooled connections killed by the server are replaced; a transaction cut off is run again."""
    store = JobStore(pg_database_url)
    job_id = store.create_job(name="x", source="s3://b/in", dest="s3://b/out", model="detr-r50",
                              weights="random", threshold=0.5, min_size=64, max_size=128)
    database = pg_database_url.rsplit("/", 1)[-1]

    def terminate_all(exclude_pid=None):
        with psycopg.connect(pg_admin_url, autocommit=True) as admin:
            return admin.execute("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                                 "WHERE datname = %s AND pid <> pg_backend_pid() AND pid <> %s",
                                 (database, exclude_pid or 0)).fetchone()[0]

    assert terminate_all() >= 1
    assert store.job(job_id).id == job_id                       # the dead pooled connection was replaced

    calls = []

    def transaction(conn):
        calls.append(conn.execute(text("SELECT pg_backend_pid()")).scalar())
        if len(calls) == 1:
            with psycopg.connect(pg_admin_url, autocommit=True) as admin:
                admin.execute("SELECT pg_terminate_backend(%s)", (calls[0],))
        return conn.execute(select(text("1"))).scalar()

    assert store._write(transaction) == 1
    assert len(calls) == 2 and calls[0] != calls[1]             # run again on a new connection

    tries = []

    def duplicate(conn):                                        # a permanent error: not retried
        tries.append(1)
        conn.execute(text("CREATE TEMPORARY TABLE t (x integer PRIMARY KEY)"))
        conn.execute(text("INSERT INTO t VALUES (1), (1)"))

    with pytest.raises(IntegrityError) as raised:
        store._write(duplicate)
    assert len(tries) == 1 and not _retryable(raised.value)
    store.finalize_submission(job_id)
    assert store.job(job_id).state == "succeeded"                # an empty job finishes at once


def test_reaper_requeues_pending_images_only_when_their_queue_is_empty(pg_database_url):
    """The stale-pending pass: messages waiting in the job's queue mean nothing was lost."""
    from scheduler.dispatch import Dispatcher, requeue_lost

    queue = f"stale-{uuid.uuid4().hex[:8]}"
    store = JobStore(pg_database_url)
    job_id = store.create_job(name="x", source="s3://b/in", dest="s3://b/out", model="detr-r50", weights="random",
                              threshold=0.5, min_size=64, max_size=128, config={"queue": queue, "chunk_size": 2})
    ids = [i for batch in store.add_images(job_id, [(f"k{i}.png", f"s3://b/in/k{i}.png", None, 1) for i in range(5)])
           for i in batch]
    store.finalize_submission(job_id)
    assert store.claim(ids[0], "a-worker", lease_seconds=600) is not None     # running: the lease covers it
    with store.engine.begin() as conn:                                       # inserted an hour ago
        conn.execute(text("UPDATE images SET updated_at = updated_at - interval '1 hour' WHERE state = 'pending'"))
    dispatcher = Dispatcher()

    def purge():
        with dispatcher.app.connection_for_write() as connection:
            connection.default_channel.queue_purge(queue)

    try:
        dispatcher.enqueue(job_id, ids[1:3], queue)
        assert dispatcher.queued(queue) == 1
        assert requeue_lost(store, dispatcher, stale_after=60) == 0           # a message is waiting
        purge()                                                              # the broker lost it
        assert dispatcher.queued(queue) == 0
        assert requeue_lost(store, dispatcher, stale_after=60) == 4           # the 4 pending ones
        assert dispatcher.queued(queue) == 2                                 # in chunks of 2
        purge()
        assert requeue_lost(store, dispatcher, stale_after=60) == 0           # touched: not again so soon
    finally:
        purge()
