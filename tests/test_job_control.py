"""Job control and nightly runs: cancel, retry, incremental resubmission, --force, the reaper."""

from __future__ import annotations

import io
import json
import os
import subprocess
import time
from datetime import timedelta

import boto3
import numpy as np
import pytest
from PIL import Image
from sqlalchemy import update

from storage import schema
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


@pytest.fixture
def panoptic_batch_here(tmp_path, monkeypatch):
    """Runs panoptic-batch in this process (CliRunner) in tmp_path, on its default database
    (./panoptic-batch.db): ``invoke(*args, exit_code=0)`` returns the result. A `run` as a
    subprocess spends most of its time importing torch; the console script's own path is run
    by test_pipeline, test_errors and the worker tests here."""
    from click.testing import CliRunner

    from scheduler.cli import main
    from storage import db as storage_db

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PANOPTIC_DATABASE_URL", raising=False)

    def invoke(*args, exit_code: int = 0):
        result = CliRunner().invoke(main, list(args))
        assert result.exit_code == exit_code, (result.output, result.stderr)
        return result

    yield invoke
    storage_db.dispose_all()


def test_nightly_resubmission_skips_unchanged_images(tmp_path, panoptic_batch_here):
    source, dest = tmp_path / "in", tmp_path / "out"
    source.mkdir()
    for i in range(4):
        (source / f"img{i}.png").write_bytes(png_bytes(i))

    def run(*extra):
        output = panoptic_batch_here("run", str(source), "--dest", str(dest), *MODEL_ARGS, *extra).stdout
        return json.loads(panoptic_batch_here("status", output.strip().splitlines()[-1], "--json").stdout)

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

    with_overlays = run("--overlays")                       # done, but not with overlays: again
    assert (with_overlays["total"], with_overlays["skipped"]) == (5, 0)
    assert sorted(p.name for p in dest.glob("*.overlay.jpg")) == [f"img{i}.overlay.jpg" for i in range(5)]
    assert (run("--overlays")["total"], run()["total"]) == (0, 0)     # each finds its own earlier run


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
    # A lease that outlasts the worker's start however busy the machine is; it is made to run out
    # below, once the worker has met the claim.
    assert store.claim(image.id, "a-worker-that-dies", lease_seconds=3600) is not None
    # The original message is still queued; its worker finds the image claimed and skips it…
    # (Its own reaper is kept out of the way: `reap` below must be the one that finds the image.)
    log = tmp_path / "worker.log"
    worker = start_worker(dict(env, PANOPTIC_REAP_INTERVAL="3600"), queue, log)
    try:
        deadline = time.monotonic() + 300
        while "chunk finished" not in log.read_text(errors="replace"):
            assert worker.poll() is None and time.monotonic() < deadline, log.read_text(errors="replace")[-3000:]
            time.sleep(0.2)
        assert ", 1 skipped (" in log.read_text(errors="replace")
        # The claiming worker is dead and its lease runs out (as the hour would have passed).
        with store.engine.begin() as conn:
            conn.execute(update(schema.Image).where(schema.Image.id == image.id)
                         .values(lease_expires_at=schema.utcnow() - timedelta(seconds=1)))
        assert status_of(job_id, env)["state"] == "running"
        result = cli("reap", env=env)                       # …until the reaper puts it back
        assert result.returncode == 0 and "1 images re-queued" in result.stdout, result.stderr
        status = wait_finished(job_id, env)
    finally:
        stop_worker(worker)
    assert (status["state"], status["succeeded"]) == ("succeeded", 1)
    assert store.record_success(image.id, "a-worker-that-dies", output_png="x", output_json="y", height=1,
                                width=1, segments_info=[]) is False    # the lost worker's token is void


# Keys in the order SeaweedFS lists them (a folder "a.k" sorts before the file "a.k.jpg"); AWS and
# a local folder list them sorted. Same stem, so the same DEST/<stem>.png: "a.JPG" / "a.jpg" /
# "a.png" and "z/a.jpg" / "z/a.png". Different stems that merely share a beginning do not clash.
CONFLICT_KEYS = ["a/x.jpg", "a-b.jpg", "a.JPG", "a.b.jpg", "a.jpg", "a.k/b.jpg", "a.k.jpg", "a.png",
                 "a0.jpg", "z/a.jpg", "z/a.png"]
CONFLICTS = {"a.jpg": "a.JPG", "a.png": "a.JPG", "z/a.png": "z/a.jpg"}     # the later key → the one it loses to


def test_output_conflicts_are_found_in_every_listing_order(tmp_path):
    from scheduler.submit import _output_conflicts
    from storage.objects import ObjectInfo

    store = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}")
    for keys in (CONFLICT_KEYS, sorted(CONFLICT_KEYS), sorted(CONFLICT_KEYS, reverse=True)):
        job_id = store.create_job("c", "/in", "/out", "detr-r50", "random", 0.85, 800, 1333, {})
        lost = {}
        kept = [i.key for i in _output_conflicts(store, job_id, iter([ObjectInfo("x/" + k, k, 1, "e") for k in keys]),
                                                 lambda info, name, earlier: lost.__setitem__(info.key, earlier))]
        # The first listed of each name wins: whichever order the store lists in.
        winners = {}
        for key in keys:
            winners.setdefault(key.rsplit(".", 1)[0], key)
        assert lost == {k: winners[k.rsplit(".", 1)[0]] for k in keys if winners[k.rsplit(".", 1)[0]] != k}
        assert len(lost) == len(CONFLICTS) and kept == [k for k in keys if k not in lost]
        if keys == CONFLICT_KEYS:
            assert lost == CONFLICTS


def test_submit_fails_images_whose_outputs_another_image_claims(s3_server, s3_bucket, pg_database_url, tmp_path):
    """Through a real listing: SeaweedFS with PostgreSQL, a local folder with SQLite."""
    from scheduler.submit import OUTPUT_CONFLICT, JobSpec, submit

    s3 = boto3.client("s3")
    folder = tmp_path / "in"
    for key in CONFLICT_KEYS:
        s3.put_object(Bucket=s3_bucket, Key=f"src/{key}", Body=b"image")
        (folder / key).parent.mkdir(parents=True, exist_ok=True)
        (folder / key).write_bytes(b"image")
    for source, store in ((f"s3://{s3_bucket}/src", JobStore(pg_database_url)),
                          (str(folder), JobStore(f"sqlite:///{tmp_path / 'jobs.db'}"))):
        spec = JobSpec(source=source, dest=str(tmp_path / "out"), model="detr-r50", weights="random",
                       threshold=0.85, min_size=64, max_size=96)
        queued = []
        job_id = submit(store, spec, lambda job, ids: queued.extend(ids))
        rows = {r.key: r for r in store.images(job_id)}
        assert sorted(rows) == sorted(CONFLICT_KEYS), source
        assert sorted(rows[k].key for k in rows if rows[k].id in queued) == sorted(set(CONFLICT_KEYS) - set(CONFLICTS))
        for key, earlier in CONFLICTS.items():
            assert rows[key].state == "failed" and rows[key].error.startswith(OUTPUT_CONFLICT), source
            assert earlier in rows[key].error and f"{key.rsplit('.', 1)[0]}.png" in rows[key].error
        status = store.job(job_id)
        assert (status.total, status.failed, status.pending) == (len(CONFLICT_KEYS), len(CONFLICTS),
                                                                 len(CONFLICT_KEYS) - len(CONFLICTS))


def test_output_conflicts_overwrite_nothing_and_retry_leaves_them_failed(tmp_path, panoptic_batch_here):
    source, dest = tmp_path / "in", tmp_path / "out"
    source.mkdir()
    (source / "a.jpg").write_bytes(png_bytes(1))            # decoded by content: PNG bytes are fine
    (source / "a.png").write_bytes(png_bytes(2))
    (source / "b.png").write_bytes(png_bytes(3))

    def status(job_id, *args):
        return panoptic_batch_here("status", job_id, *args).stdout

    def run():
        result = panoptic_batch_here("run", str(source), "--dest", str(dest), *MODEL_ARGS,
                                     exit_code=1)             # not every image succeeded
        assert "a.png" in result.stderr
        return json.loads(status(result.stdout.strip().splitlines()[-1], "--json"))

    first = run()
    assert (first["state"], first["total"], first["succeeded"], first["failed"]) == ("partial", 3, 2, 1)
    assert json.loads((dest / "a.json").read_text())["image"].endswith("a.jpg")
    written = (dest / "a.png").read_bytes()
    assert status(first["id"], "--failed").startswith("a.png: output conflict:")
    (failure,) = json.loads(status(first["id"], "--failed", "--json"))
    assert failure["key"] == "a.png" and failure["uri"].endswith("a.png") and "a.jpg" in failure["error"]

    result = panoptic_batch_here("retry", first["id"])
    assert "0 failed images queued again; 1 left failed" in result.stdout
    assert json.loads(status(first["id"], "--json"))["failed"] == 1

    second = run()                                           # nightly: a.jpg is unchanged, a.png still clashes
    assert (second["total"], second["skipped"], second["failed"]) == (1, 2, 1)
    assert (dest / "a.png").read_bytes() == written
    assert json.loads((dest / "a.json").read_text())["image"].endswith("a.jpg")
