"""The whole pipeline on real services: SeaweedFS S3, Redis, PostgreSQL, real worker processes.

`submit` walks a bucket, a `panoptic-batch worker` (or two) processes the job through Celery on
Redis, results land in the bucket; `run` does the same in one process on SQLite and folders.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections import defaultdict
from pathlib import Path

import boto3
import numpy as np
import pytest
from PIL import Image

from storage.jobs import JobStore
from tests.paths import SAMPLES

REDIS_URL = "redis://127.0.0.1:6379/0"
# Small, fast settings: R50 with seeded random weights at 64 px; threshold 0 keeps queries, so
# segments, uploads and statistics are all exercised.
MODEL_ARGS = ["--model", "detr-r50", "--weights", "random", "--min-size", "64", "--max-size", "128",
              "--threshold", "0", "--batch-size", "2"]


def exe() -> str:
    path = shutil.which("panoptic-batch", path=os.path.dirname(sys.executable)) or shutil.which("panoptic-batch")
    assert path, "the panoptic-batch console script is not installed"
    return path


def cli(*args, env, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([exe(), *args], capture_output=True, text=True, env=env, timeout=timeout)


def generated_images() -> dict[str, bytes]:
    """Images of several sizes and formats, keyed by their path relative to SOURCE."""
    rng = np.random.default_rng(7)
    specs = {"a/wide.jpg": (120, 70, "JPEG"), "a/tall.PNG": (50, 90, "PNG"), "b/square.webp": (64, 64, "WEBP"),
             "b/c/grey.bmp": (40, 30, "BMP"), "deep/x/y/z.tiff": (33, 47, "TIFF"), "e.jpeg": (200, 100, "JPEG")}
    files = {}
    for key, (w, h, fmt) in specs.items():
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buffer, fmt)
        files[key] = buffer.getvalue()
    return files


def source_files() -> dict[str, bytes]:
    files = generated_images()
    for path in sorted(SAMPLES.glob("*.jpg")):
        files[f"coco/{path.name}"] = path.read_bytes()
    files["notes/readme.txt"] = b"not an image: never listed"
    return files


def expected_outputs(keys) -> set[str]:
    stems = {k.rsplit(".", 1)[0] for k in keys if not k.endswith(".txt")}
    return {f"{s}.png" for s in stems} | {f"{s}.json" for s in stems}


def wait_finished(job_id: str, env: dict, timeout: float = 600) -> dict:
    """`status JOB --json` once the job has finished. Polled in this process every 0.2 s: a
    `status` call every second (an interpreter start-up each) took CPU from the workers."""
    store = JobStore(env["PANOPTIC_DATABASE_URL"])
    deadline = time.monotonic() + timeout
    while not store.job(job_id).finished:
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} did not finish in {timeout} s: {store.job(job_id)}")
        time.sleep(0.2)
    result = cli("status", job_id, "--json", env=env)
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    assert status["state"] in ("succeeded", "partial", "failed", "cancelled"), status
    return status


def stats_from_documents(documents: list[dict]) -> dict[int, dict]:
    totals: dict[int, dict] = defaultdict(lambda: {"segments": 0, "images": 0, "pixels": 0})
    for document in documents:
        seen = set()
        for segment in document["segments_info"]:
            row = totals[segment["category_id"]]
            row["segments"] += 1
            row["pixels"] += segment["area"]
            seen.add(segment["category_id"])
        for category in seen:
            totals[category]["images"] += 1
    return dict(totals)


def check_stats(job_id, env, documents):
    result = cli("stats", job_id, "--json", env=env)
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert {r["category_id"]: {"segments": r["segments"], "images": r["images"], "pixels": r["pixels"]}
            for r in rows} == stats_from_documents(documents)
    assert all(r["category_name"] and isinstance(r["isthing"], bool) for r in rows)
    assert sum(r["segments"] for r in rows) > 0


def decode_ids(png: bytes) -> np.ndarray:
    rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.uint32)
    return rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]


def check_result_pair(png: bytes, document: dict, source_bytes: bytes, key: str):
    ids = decode_ids(png)
    with Image.open(io.BytesIO(source_bytes)) as original:
        assert ids.shape == (original.height, original.width), key
    assert (document["height"], document["width"]) == ids.shape
    assert sorted(s["id"] for s in document["segments_info"]) == sorted(set(np.unique(ids).tolist()) - {0})
    for segment in document["segments_info"]:
        assert segment["area"] == int((ids == segment["id"]).sum())


@pytest.fixture
def services_env(s3_server, pg_database_url):
    queue = f"test-{uuid.uuid4().hex[:8]}"
    env = dict(os.environ, PANOPTIC_DATABASE_URL=pg_database_url, PANOPTIC_BROKER_URL=REDIS_URL,
               PYTHONUNBUFFERED="1")
    return env, queue


def start_worker(env, queue, log_path: Path) -> subprocess.Popen:
    log = open(log_path, "wb")
    return subprocess.Popen([exe(), "worker", "--device", "cpu", "--queues", queue, "--loglevel", "INFO"],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def stop_worker(process: subprocess.Popen):
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def test_submit_and_workers_on_s3_redis_postgres(services_env, s3_bucket, tmp_path):
    # Two workers share the queue (a one-worker variant repeated the same path: every other
    # worker test here runs one).
    workers = 2
    env, queue = services_env
    s3 = boto3.client("s3")
    files = source_files()
    for key, data in files.items():
        s3.put_object(Bucket=s3_bucket, Key=f"in/{key}", Body=data)
    s3.put_object(Bucket=s3_bucket, Key="in/empty-folder/", Body=b"")     # a folder marker

    submitted = cli("submit", f"s3://{s3_bucket}/in", "--dest", f"s3://{s3_bucket}/out", "--queue", queue,
                    "--chunk-size", "3", "--name", "e2e", *MODEL_ARGS, env=env)
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip().splitlines()[-1]

    processes = [start_worker(env, queue, tmp_path / f"worker{i}.log") for i in range(workers)]
    try:
        status = wait_finished(job_id, env)
    finally:
        for process in processes:
            stop_worker(process)
    logs = "\n".join((tmp_path / f"worker{i}.log").read_text(errors="replace") for i in range(workers))
    image_keys = [k for k in files if not k.endswith(".txt")]
    assert status["state"] == "succeeded", logs[-3000:]
    assert (status["total"], status["succeeded"], status["failed"], status["pending"]) == (len(image_keys), len(image_keys), 0, 0)
    assert status["name"] == "e2e"

    listed = {o["Key"][len("out/"):] for page in s3.get_paginator("list_objects_v2").paginate(
        Bucket=s3_bucket, Prefix="out/") for o in page.get("Contents", [])}
    assert listed == expected_outputs(files)

    documents = []
    store = JobStore(env["PANOPTIC_DATABASE_URL"])
    rows = {row.key: row for row in store.images(job_id)}
    assert set(rows) == set(image_keys)
    for key in image_keys:
        stem = key.rsplit(".", 1)[0]
        png = s3.get_object(Bucket=s3_bucket, Key=f"out/{stem}.png")["Body"].read()
        document = json.loads(s3.get_object(Bucket=s3_bucket, Key=f"out/{stem}.json")["Body"].read())
        check_result_pair(png, document, files[key], key)
        assert document["image"] == f"s3://{s3_bucket}/in/{key}"
        assert document["file_name"] == stem.rsplit("/", 1)[-1] + ".png"
        row = rows[key]
        assert row.state == "succeeded" and row.attempts == 1     # processed once, by one worker
        assert row.output_png == f"s3://{s3_bucket}/out/{stem}.png"
        assert (row.height, row.width) == (document["height"], document["width"])
        assert row.segments == len(document["segments_info"])
        assert row.etag and row.size == len(files[key])
        assert min(row.decode_ms, row.model_ms, row.postprocess_ms, row.upload_ms) >= 0 and row.model_ms > 0
        documents.append(document)
    check_stats(job_id, env, documents)


def test_run_embedded_on_sqlite_and_folders(tmp_path):
    source, dest = tmp_path / "in", tmp_path / "out"
    files = source_files()
    files["broken.jpg"] = b"\xff\xd8\xff this is no JPEG"
    for key, data in files.items():
        (source / key).parent.mkdir(parents=True, exist_ok=True)
        (source / key).write_bytes(data)
    env = {k: v for k, v in os.environ.items() if k not in ("PANOPTIC_DATABASE_URL", "PANOPTIC_BROKER_URL")}
    env["PANOPTIC_BROKER_URL"] = "redis://127.0.0.1:1/0"     # proves that run needs no broker
    result = subprocess.run([exe(), "run", str(source), "--dest", str(dest), *MODEL_ARGS], capture_output=True,
                            text=True, env=env, cwd=tmp_path, timeout=600)
    assert result.returncode == 1, result.stderr                 # broken.jpg failed…
    assert "broken.jpg" in result.stderr and "cannot decode image" in result.stderr
    assert (tmp_path / "panoptic-batch.db").exists()             # the default SQLite database

    good = {k: v for k, v in files.items() if k != "broken.jpg"}
    written = {str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file()}
    assert written == expected_outputs(good)                     # …and everything else succeeded
    status = json.loads(subprocess.run([exe(), "status", "--json"], capture_output=True, text=True, env=env,
                                       cwd=tmp_path, timeout=120).stdout)
    assert len(status) == 1
    assert status[0]["state"] == "partial"
    n = len([k for k in good if not k.endswith(".txt")])
    assert (status[0]["succeeded"], status[0]["failed"], status[0]["total"]) == (n, 1, n + 1)
    documents = []
    for key in good:
        if key.endswith(".txt"):
            continue
        stem = key.rsplit(".", 1)[0]
        document = json.loads((dest / f"{stem}.json").read_text())
        check_result_pair((dest / f"{stem}.png").read_bytes(), document, files[key], key)
        documents.append(document)
    stats = subprocess.run([exe(), "stats", status[0]["id"], "--json"], capture_output=True, text=True, env=env,
                           cwd=tmp_path, timeout=120)
    rows = json.loads(stats.stdout)
    assert {r["category_id"]: {"segments": r["segments"], "images": r["images"], "pixels": r["pixels"]}
            for r in rows} == stats_from_documents(documents)


def test_submit_refuses_dest_inside_source(tmp_path):
    (tmp_path / "in").mkdir()
    env = dict(os.environ, PANOPTIC_DATABASE_URL=f"sqlite:///{tmp_path / 'db.sqlite'}")
    result = cli("run", str(tmp_path / "in"), "--dest", str(tmp_path / "in" / "out"), *MODEL_ARGS, env=env)
    assert result.returncode != 0 and "overlaps SOURCE" in result.stderr


def test_batches_group_images_by_aspect_ratio():
    from types import SimpleNamespace

    from worker.batching import AspectBatcher

    def item(name, width, height):
        return SimpleNamespace(name=name, image=Image.new("RGB", (width, height)))

    batcher = AspectBatcher(batch_size=2, min_size=800, max_size=1333)
    # 4:3 and 3:2 landscapes share a bucket; a portrait does not join them.
    assert batcher.add(item("land-4:3", 640, 480)) is None
    assert batcher.add(item("portrait", 480, 640)) is None
    batch = batcher.add(item("land-3:2", 640, 427))
    assert [i.name for i in batch] == ["land-4:3", "land-3:2"]
    assert batcher.held == 1
    # Left-overs: sorted by aspect ratio, cut into as few batches as possible.
    batcher.add(item("square", 500, 500))
    batcher.add(item("tall", 300, 900))
    rest = batcher.flush()
    assert [[i.name for i in b] for b in rest] == [["square", "portrait"], ["tall"]]
    assert batcher.held == 0


def test_a_batch_of_results_is_recorded_in_one_transaction(tmp_path, monkeypatch):
    # A GPU worker finishes ~100 images/s: one commit per image would make the database's commit
    # rate the limit of a fleet. Images of one batch are recorded together.
    from scheduler.submit import JobSpec, submit
    from worker.pipeline import ChunkProcessor

    source = tmp_path / "in"
    source.mkdir()
    rng = np.random.default_rng(3)
    for i in range(5):
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(source / f"img{i}.jpg")
    store = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}")
    spec = JobSpec(source=str(source), dest=str(tmp_path / "out"), model="detr-r50", weights="random",
                   threshold=0.0, min_size=64, max_size=96, chunk_size=32, config={"batch_size": 4, "chunk_size": 32})
    chunks = []
    job_id = submit(store, spec, lambda job, ids: chunks.append((job, ids)))
    transactions = []
    record_successes = store.record_successes
    monkeypatch.setattr(store, "record_successes",
                        lambda token, successes: transactions.append(len(successes)) or record_successes(token, successes))
    processor = ChunkProcessor(store, device="cpu")
    outcomes = [o for job, ids in chunks for o in processor.process(job, ids)]
    assert len(outcomes) == 5 and all(o.ok for o in outcomes)
    status = store.job(job_id)
    assert (status.state, status.succeeded) == ("succeeded", 5)
    assert all(r.output_png and r.segments is not None for r in store.images(job_id))
    # Two batches (4 + 1): at most one transaction each (one in all if the first batch's uploads
    # were still under way when the second's began).
    assert sum(transactions) == 5 and len(transactions) <= 2


def _chunk_job(tmp_path, sizes, batch_size, weights="random", chunk_size=32):
    """A local job of synthetic JPEGs of the given (width, height) and its image ids, in a SQLite store."""
    from scheduler.submit import JobSpec, submit

    source = tmp_path / "in"
    source.mkdir()
    rng = np.random.default_rng(3)
    for i, (w, h) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(source / f"img{i}.jpg")
    store = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}")
    spec = JobSpec(source=str(source), dest=str(tmp_path / "out"), model="detr-r50", weights=weights,
                   threshold=0.0, min_size=64, max_size=96, chunk_size=chunk_size,
                   config={"batch_size": batch_size, "chunk_size": chunk_size})
    chunks = []
    job_id = submit(store, spec, lambda job, ids: chunks.append((job, ids)))
    return store, job_id, chunks


def test_weights_that_cannot_load_fail_the_images_and_are_not_read_again_for_every_chunk(tmp_path, monkeypatch):
    from worker import pipeline

    corrupt = tmp_path / "detr.pth"
    corrupt.write_bytes(b"not a checkpoint" * 1000)
    store, job_id, chunks = _chunk_job(tmp_path, [(64, 48)] * 6, batch_size=2, weights=str(corrupt), chunk_size=2)
    loads = []
    monkeypatch.setattr(pipeline, "Predictor",
                        lambda config, *rest, real=pipeline.Predictor: loads.append(config) or real(config, *rest))
    processor = pipeline.ChunkProcessor(store, device="cpu")
    outcomes = [o for job, ids in chunks for o in processor.process(job, ids)]
    assert len(chunks) == 3 and len(outcomes) == 6 and not any(o.ok for o in outcomes)
    assert len(loads) == 1                                  # not once per chunk
    errors = {image.error for image in store.images(job_id)}
    assert len(errors) == 1 and next(iter(errors)).startswith("model could not be loaded: ")
    assert store.job(job_id).state == "failed"


def test_a_batch_the_model_cannot_run_is_retried_image_by_image(tmp_path, monkeypatch):
    """E.g. out of GPU memory on a batch: the images are run one at a time, and only an image that
    fails alone fails."""
    from worker.pipeline import ChunkProcessor
    from worker.predictor import Predictor

    store, job_id, chunks = _chunk_job(tmp_path, [(64, 48)] * 5 + [(48, 64)], batch_size=4)
    start_batch = Predictor.start_batch
    calls = []

    def fragile(self, images):
        calls.append(len(images))
        if len(images) > 1:
            raise RuntimeError("CUDA out of memory (simulated)")
        if images[0].size == (48, 64):
            raise RuntimeError("this one image is too much (simulated)")
        return start_batch(self, images)

    monkeypatch.setattr(Predictor, "start_batch", fragile)
    processor = ChunkProcessor(store, device="cpu")
    outcomes = [o for job, ids in chunks for o in processor.process(job, ids)]
    assert sorted(o.ok for o in outcomes) == [False] + [True] * 5
    status = store.job(job_id)
    assert (status.state, status.succeeded, status.failed) == ("partial", 5, 1)
    (failed,) = store.images(job_id, state="failed")
    assert failed.key == "img5.jpg" and "this one image is too much" in failed.error
    assert max(calls) > 1 and calls.count(1) == 6          # a batch tried, then each image alone


def test_a_device_failure_gives_the_chunk_back_instead_of_failing_its_images(tmp_path, monkeypatch):
    """An illegal memory access leaves a CUDA context unusable: every later batch would fail too.
    Out of memory is no such failure (the batch is retried image by image, tested above)."""
    from worker.pipeline import ChunkProcessor, DeviceFailure, is_device_failure
    from worker.predictor import Predictor

    store, job_id, chunks = _chunk_job(tmp_path, [(64, 48)] * 6, batch_size=2)
    start_batch = Predictor.start_batch
    calls = []

    def failing_later(self, images):
        calls.append(len(images))
        if len(calls) > 1:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return start_batch(self, images)

    monkeypatch.setattr(Predictor, "start_batch", failing_later)
    ((job, ids),) = chunks
    with pytest.raises(DeviceFailure, match="illegal memory access"):
        ChunkProcessor(store, device="cpu").process(job, ids)
    assert calls == [2, 2]                                  # no image-by-image retry on the broken device
    status = store.job(job_id)
    assert (status.succeeded, status.failed, status.pending) == (2, 0, 4)   # the first batch is kept
    assert all(row.attempts == 1 for row in store.images(job_id, state="pending"))   # counted: see below
    assert not is_device_failure(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))
