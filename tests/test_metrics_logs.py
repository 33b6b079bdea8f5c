"""Monitoring a worker: Prometheus metrics, JSON logs and Flower, on real processes and services.

A `panoptic-batch worker --concurrency 2 --metrics-port N` (JSON logs through
PANOPTIC_LOG_FORMAT) processes a small job with one corrupt image; its /metrics must add up the
two pool processes' work to exactly the job's numbers, and every line it writes must be a JSON
object carrying the job id where a chunk is known. Flower, started against the same Redis, must
list the worker and the job's tasks.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import boto3
import numpy as np
from PIL import Image

from tests.test_pipeline import MODEL_ARGS, cli, exe, services_env, stop_worker, wait_finished  # noqa: F401

REPO_ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str, timeout: float = 5) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read()


def wait_http(url: str, process: subprocess.Popen, log_path: Path, timeout: float = 60) -> bytes:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return http_get(url)
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"{url} never answered:\n{log_path.read_text(errors='replace')[-3000:]}")
            time.sleep(0.3)


def upload_images(bucket: str, good: int, corrupt: list[str]) -> None:
    s3 = boto3.client("s3")
    rng = np.random.default_rng(11)
    for i in range(good):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (40 + 4 * i, 60, 3), dtype=np.uint8)).save(buffer, "PNG")
        s3.put_object(Bucket=bucket, Key=f"in/img{i}.png", Body=buffer.getvalue())
    for key in corrupt:
        s3.put_object(Bucket=bucket, Key=f"in/{key}", Body=b"\xff\xd8\xff\xe0 this is not a JPEG")


def submit(env, bucket, queue, chunk_size) -> str:
    result = cli("submit", f"s3://{bucket}/in", "--dest", f"s3://{bucket}/out", "--queue", queue,
                 "--chunk-size", str(chunk_size), *MODEL_ARGS, env=env)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()[-1]


def scrape(port: int) -> dict[str, list]:
    """/metrics parsed by prometheus_client's own parser: {sample name: [(labels, value)]}."""
    from prometheus_client.parser import text_string_to_metric_families

    samples: dict[str, list] = {}
    for family in text_string_to_metric_families(http_get(f"http://127.0.0.1:{port}/metrics").decode()):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def value(samples, name, **labels) -> float:
    return sum(v for l, v in samples.get(name, []) if all(l.get(k) == want for k, want in labels.items()))


def test_metrics_and_json_logs_of_a_two_process_worker(services_env, s3_bucket, tmp_path):
    env, queue = services_env
    good, corrupt = 5, ["bad.jpg"]
    chunk_size = 2
    upload_images(s3_bucket, good, corrupt)
    job_id = submit(env, s3_bucket, queue, chunk_size)
    chunks = math.ceil((good + len(corrupt)) / chunk_size)

    port = free_port()
    log_path, out_path = tmp_path / "worker.log", tmp_path / "worker.out"
    with open(log_path, "wb") as log, open(out_path, "wb") as out:
        worker = subprocess.Popen(
            [exe(), "worker", "--device", "cpu", "--queues", queue, "--concurrency", "2", "--metrics-port", str(port)],
            # One torch thread per pool process: two processes share the test machine's cores.
            env=dict(env, PANOPTIC_LOG_FORMAT="json", OMP_NUM_THREADS="1"), stdout=out, stderr=log,
            start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/metrics", worker, log_path)
        status = wait_finished(job_id, env, timeout=300)
        assert (status["succeeded"], status["failed"]) == (good, len(corrupt)), log_path.read_text()[-3000:]
        # The job is finished once the last result is in SQL; its counters move microseconds later.
        deadline = time.monotonic() + 15
        while True:
            samples = scrape(port)
            if value(samples, "panoptic_chunks_total") >= chunks or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    finally:
        stop_worker(worker)
    text = log_path.read_text(errors="replace")

    # Counters: exactly the job's numbers, summed over both pool processes.
    assert value(samples, "panoptic_images_total", outcome="succeeded") == good, text[-3000:]
    assert value(samples, "panoptic_images_total", outcome="failed") == len(corrupt)
    assert value(samples, "panoptic_images_total", outcome="refused") == 0
    assert value(samples, "panoptic_chunks_total", outcome="completed") == chunks
    assert value(samples, "panoptic_chunks_total", outcome="error") == 0
    assert value(samples, "panoptic_chunk_seconds_count") == chunks
    # Histograms: one observation per succeeded image and stage; every good image went through
    # exactly one forward pass, the corrupt one through none.
    for stage in ("download_decode", "model", "postprocess", "upload"):
        assert value(samples, "panoptic_image_stage_seconds_count", stage=stage) == good, stage
        assert value(samples, "panoptic_image_stage_seconds_bucket", stage=stage, le="+Inf") == good, stage
        assert value(samples, "panoptic_image_stage_seconds_sum", stage=stage) > 0, stage
    assert value(samples, "panoptic_batch_size_sum") == good
    assert 1 <= value(samples, "panoptic_batch_size_count") <= good
    loads = value(samples, "panoptic_model_load_seconds_count", model="detr-r50")
    assert value(samples, "panoptic_model_load_seconds_sum", model="detr-r50") > 0
    assert not any(name.startswith("panoptic_gpu_") for name in samples)          # CPU only
    # No job or image ids in labels.
    assert all(set(labels) <= {"outcome", "stage", "model", "le", "device"}
               for name, rows in samples.items() if name.startswith("panoptic_") for labels, _ in rows)

    # Logs (stderr): every line is one JSON object with the basic fields. Celery's banner is off;
    # only the notices its signal handlers print directly (not through logging) go to stdout.
    assert all(line.startswith("worker: ") for line in out_path.read_text().splitlines() if line.strip())
    lines = [line for line in text.splitlines() if line.strip()]
    entries = []
    for line in lines:
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            raise AssertionError(f"not a JSON line: {line!r}") from None
    assert all({"timestamp", "level", "logger", "message"} <= set(e) for e in entries)
    assert any(e["logger"].startswith("celery") for e in entries)       # Celery's own lines, in JSON too
    assert any("metrics" in e["message"] and str(port) in e["message"] for e in entries)

    finished = [e for e in entries if e["message"].startswith("chunk finished")]
    assert len(finished) == chunks
    assert all(e["job_id"] == job_id and e["chunk"] and len(e["image_ids"]) == e["images"] for e in finished)
    assert sum(e["succeeded"] for e in finished) == good and sum(e["failed"] for e in finished) == len(corrupt)
    assert all(set(e["mean_ms"]) == {"decode_ms", "model_ms", "postprocess_ms", "upload_ms"}
               for e in finished if e["succeeded"])
    # Both pool processes worked, each loading its model once: the totals above are theirs summed.
    pids = {e["pid"] for e in finished}
    assert loads == len(pids) == 2, (loads, pids)

    failures = [e for e in entries if e.get("key") in corrupt]
    assert len(failures) == 1, failures
    failure = failures[0]
    assert failure["level"] == "WARNING" and failure["job_id"] == job_id and failure["chunk"]
    assert failure["image_id"] in failure["image_ids"] and "bad.jpg" in failure["message"]
    assert failure["error"] and failure["error"] in failure["message"]


def test_log_context_reaches_pool_threads():
    """Lines logged by a chunk's IO threads carry its job id (threads do not inherit contextvars)."""
    from worker.logs import inherit_context, log_context, make_handler

    stream = io.StringIO()
    logger = logging.getLogger("test.panoptic.context")
    logger.addHandler(make_handler("json", stream))
    logger.propagate = False
    logger.setLevel(logging.INFO)
    try:
        with log_context(job_id="job-1", chunk="task-1", image_ids=[4, 5]):
            with ThreadPoolExecutor(2, initializer=inherit_context()) as pool:
                pool.submit(logger.info, "from a thread", extra={"image_id": 5}).result()
        logger.warning("outside %s", "any chunk")
        try:
            raise ValueError("boom")
        except ValueError:
            logger.exception("with a traceback")
    finally:
        logger.handlers.clear()
    inside, outside, failed = (json.loads(line) for line in stream.getvalue().splitlines())
    assert inside["job_id"] == "job-1" and inside["chunk"] == "task-1" and inside["image_ids"] == [4, 5]
    assert inside["image_id"] == 5 and inside["message"] == "from a thread" and inside["level"] == "INFO"
    assert inside["timestamp"].endswith("Z") and inside["logger"] == "test.panoptic.context"
    assert "job_id" not in outside and outside["message"] == "outside any chunk"
    assert "ValueError: boom" in failed["exception"]


def test_metrics_port_in_use_is_refused(tmp_path):
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = dict(os.environ, PANOPTIC_DATABASE_URL=f"sqlite:///{tmp_path / 'db.sqlite'}",
                   PANOPTIC_BROKER_URL="redis://127.0.0.1:6379/0")
        result = cli("worker", "--metrics-port", str(port), env=env, timeout=60)
    assert result.returncode != 0 and f"--metrics-port {port}" in result.stderr, result.stderr


def test_flower_lists_the_worker_and_its_tasks(services_env, s3_bucket, tmp_path):
    import flower  # noqa: F401  (in the test and monitor extras: a missing install fails here)
    env, queue = services_env
    upload_images(s3_bucket, 2, [])
    port = free_port()
    flower_log = tmp_path / "flower.log"
    worker_log = tmp_path / "worker.log"
    with open(flower_log, "wb") as log:
        flower = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "worker.queue", "flower", f"--port={port}", "--address=127.0.0.1"],
            env=dict(env, FLOWER_UNAUTHENTICATED_API="true"), cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)
    with open(worker_log, "wb") as log:
        worker = subprocess.Popen([exe(), "worker", "--device", "cpu", "--queues", queue], env=env, stdout=log,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    api = f"http://127.0.0.1:{port}/api"
    try:
        wait_http(f"{api}/workers", flower, flower_log)
        # The worker, recognised by the queue it alone consumes (other workers may share the broker).
        deadline = time.monotonic() + 60
        while True:
            workers = json.loads(http_get(f"{api}/workers?refresh=1", timeout=15))
            ours = [name for name, info in workers.items()
                    if queue in {q.get("name") for q in info.get("active_queues") or []}]
            if ours or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert len(ours) == 1, (workers.keys(), worker_log.read_text(errors="replace")[-2000:])
        job_id = submit(env, s3_bucket, queue, chunk_size=2)
        assert wait_finished(job_id, env, timeout=300)["state"] == "succeeded"
        deadline = time.monotonic() + 30
        while True:           # task events reach Flower asynchronously
            tasks = json.loads(http_get(f"{api}/tasks?limit=1000", timeout=15))
            mine = [t for t in tasks.values() if job_id in str(t.get("args"))]
            if (mine and all(t["state"] == "SUCCESS" for t in mine)) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    finally:
        stop_worker(worker)
        stop_worker(flower)
    assert len(mine) == 1, (mine, flower_log.read_text(errors="replace")[-2000:])       # one chunk of 2
    assert all(t["name"] == "panoptic_batch.process_chunk" and t["state"] == "SUCCESS" for t in mine), mine
    assert {t["worker"] for t in mine} == set(ours)
