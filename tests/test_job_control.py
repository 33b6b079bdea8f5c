"""Job control and nightly runs: cancel, retry, incremental resubmission, --force, the reaper."""

from __future__ import annotations

import io
import json
import os
import subprocess
import time

import boto3
import numpy as np
from PIL import Image

from storage.jobs import JobStore

from .test_pipeline import MODEL_ARGS, cli, exe, start_worker, stop_worker, wait_finished


def png_bytes(seed: int, size=(40, 32)) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def run_json(*args, env, cwd):
    return subprocess.run([exe(), *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=600)


def status_of(job_id, env, cwd=None) -> dict:
    result = run_json("status", job_id, "--json", env=env, cwd=cwd)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_nightly_resubmission_skips_unchanged_images(tmp_path):
    source, dest = tmp_path / "in", tmp_path / "out"
    source.mkdir()
    for i in range(4):
        (source / f"img{i}.png").write_bytes(png_bytes(i))
    env = {k: v for k, v in os.environ.items() if k != "PANOPTIC_DATABASE_URL"}

    def run(*extra):
        result = run_json("run", str(source), "--dest", str(dest), *MODEL_ARGS, *extra, env=env, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        job_id = result.stdout.strip().splitlines()[-1]
        return status_of(job_id, env, tmp_path)

    first = run()
    assert (first["total"], first["succeeded"], first["skipped"]) == (4, 4, 0)
    mtimes = {p.name: p.stat().st_mtime_ns for p in dest.iterdir()}

    second = run()                                          # nothing changed: nothing to do
    assert (second["total"], second["skipped"], second["state"]) == (0, 4, "succeeded")
    assert {p.name: p.stat().st_mtime_ns for p in dest.iterdir()} == mtimes

    (source / "img1.png").write_bytes(png_bytes(99))        # one image changed, one added
    (source / "img4.png").write_bytes(png_bytes(4))
    third = run()
    assert (third["total"], third["succeeded"], third["skipped"]) == (2, 2, 3)
    store = JobStore(f"sqlite:///{tmp_path / 'panoptic-batch.db'}")
    assert sorted(r.key for r in store.images(third["id"])) == ["img1.png", "img4.png"]

    other_model = run("--threshold", "0.5")                 # another fingerprint: everything again
    assert (other_model["total"], other_model["skipped"]) == (5, 0)

    forced = run("--force")
    assert (forced["total"], forced["skipped"]) == (5, 0)


def test_cancel_drops_queued_work_and_retry_requeues_failed_images(s3_server, s3_bucket, pg_database_url, tmp_path):
    env = dict(os.environ, PANOPTIC_DATABASE_URL=pg_database_url, PANOPTIC_BROKER_URL="redis://127.0.0.1:6379/0")
    s3 = boto3.client("s3")
    for i in range(6):
        s3.put_object(Bucket=s3_bucket, Key=f"cancel/img{i}.png", Body=png_bytes(i))
    s3.put_object(Bucket=s3_bucket, Key="retry/good.png", Body=png_bytes(10))
    s3.put_object(Bucket=s3_bucket, Key="retry/bad.png", Body=b"truncated upload")
    queue = f"control-{os.getpid()}-{time.monotonic_ns()}"

    def submit(prefix):
        result = cli("submit", f"s3://{s3_bucket}/{prefix}", "--dest", f"s3://{s3_bucket}/out-{prefix}",
                     "--queue", queue, "--chunk-size", "2", *MODEL_ARGS, env=env)
        assert result.returncode == 0, result.stderr
        return result.stdout.strip().splitlines()[-1]

    cancelled = submit("cancel")
    result = cli("cancel", cancelled[:6], env=env)          # a unique prefix is enough
    assert result.returncode == 0 and "cancelled" in result.stdout
    to_retry = submit("retry")

    worker = start_worker(env, queue, tmp_path / "worker.log")
    try:
        status = wait_finished(to_retry, env)
        errors = [(r.key, r.error) for r in JobStore(pg_database_url).images(to_retry)]
        assert (status["state"], status["succeeded"], status["failed"]) == ("partial", 1, 1), errors
        s3.put_object(Bucket=s3_bucket, Key="retry/bad.png", Body=png_bytes(11))   # the upload is fixed
        result = cli("retry", to_retry, env=env)
        assert result.returncode == 0 and "1 failed images queued again" in result.stdout, result.stderr
        status = wait_finished(to_retry, env)
        assert (status["state"], status["succeeded"], status["failed"]) == ("succeeded", 2, 0)
    finally:
        stop_worker(worker)

    status = status_of(cancelled, env)
    assert (status["state"], status["succeeded"], status["pending"]) == ("cancelled", 0, 6)
    listed = s3.list_objects_v2(Bucket=s3_bucket, Prefix="out-cancel/").get("KeyCount", 0)
    assert listed == 0                                      # queued chunks of a cancelled job did nothing


def test_reaper_requeues_images_of_a_lost_worker(tmp_path, pg_database_url, s3_server, s3_bucket):
    """An image claimed by a worker that died (lease expired) is queued again and finished."""
    env = dict(os.environ, PANOPTIC_DATABASE_URL=pg_database_url, PANOPTIC_BROKER_URL="redis://127.0.0.1:6379/0")
    s3 = boto3.client("s3")
    s3.put_object(Bucket=s3_bucket, Key="in/a.png", Body=png_bytes(1))
    queue = f"reap-{os.getpid()}-{time.monotonic_ns()}"
    result = cli("submit", f"s3://{s3_bucket}/in", "--dest", f"s3://{s3_bucket}/out", "--queue", queue,
                 *MODEL_ARGS, env=env)
    job_id = result.stdout.strip().splitlines()[-1]
    store = JobStore(pg_database_url)
    (image,) = list(store.images(job_id))
    lease = 20.0
    claimed_at = time.monotonic()
    assert store.claim(image.id, "a-worker-that-dies", lease_seconds=lease) is not None
    # The original message is still queued; its worker finds the image claimed and skips it…
    worker = start_worker(env, queue, tmp_path / "worker.log")
    try:
        time.sleep(max(0.0, lease + 1 - (time.monotonic() - claimed_at)))
        assert status_of(job_id, env)["state"] == "running"
        result = cli("reap", env=env)                       # …until the reaper puts it back
        assert result.returncode == 0 and "1 images re-queued" in result.stdout, result.stderr
        status = wait_finished(job_id, env)
    finally:
        stop_worker(worker)
    assert (status["state"], status["succeeded"]) == ("succeeded", 1)
    assert store.record_success(image.id, "a-worker-that-dies", output_png="x", output_json="y", height=1,
                                width=1, segments_info=[]) is False    # the lost worker's token is void
