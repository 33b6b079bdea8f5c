"""Pipeline efficiency: end-to-end images/s through the real services ÷ the model-only images/s.

    /work/venv/bin/python -m bench.pipeline_bench [--images 40] [--batch-size 2] [--model detr-r50]
        [--min-size 320] [--max-size 512] [--threshold 0]

Same images, weights and settings on both sides:

- model only: ``Predictor.predict_batches`` (the worker's own code: preprocess → pruned DETR →
  postprocess, PNG encoding included) on the images already downloaded and decoded, in this
  process (with freed memory kept in the heap, as in the worker's pool process: worker.heap),
  batches of ``--batch-size``; measured before and after the end-to-end run.
- end to end: ``scheduler.submit.submit`` with the real ``Dispatcher`` (Redis 127.0.0.1:6379, a
  queue of its own) → one ``panoptic-batch worker --device cpu`` process (Celery, prefork,
  concurrency 1) → downloads from a private SeaweedFS S3 server, PNG + JSON uploads to it, claims
  and results in a fresh PostgreSQL database (created on postgresql://postgres@127.0.0.1:5432/test,
  dropped afterwards). Timed from the submit call until the job's finished_at in SQL. The worker
  is first warmed up by a 2-image job with the same settings, so its model is loaded (a long job
  pays that once).
- CPU: the model-only pass's CPU time per image, and during the end-to-end run that of the
  worker's processes, the S3 server, PostgreSQL, Redis and this script (bench.cpu): on a machine
  whose cores the model fills, everything else the pipeline runs is taken from the model.

Images: synthetic 640×480 JPEGs of smooth colour gradients (sums of low-frequency sinusoids, mild
noise). ``--threshold 0`` keeps every query whose best class is not "no object", so that
postprocessing and uploads carry real segments (the mean count per image is printed). Seeded
random weights collapse (all queries alike: about one segment per image at these sizes), so
``--weights informative`` (bench.informative: the model tests' informative weights, saved to a
temporary file and loaded by path on both sides) gives tens of distinct segments per image.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from PIL import Image

from bench.cpu import CpuMeter, cpu_seconds, descendants, processes_named

PG_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/test"
REDIS_URL = "redis://127.0.0.1:6379/0"


def gradient_jpeg(seed: int, width: int = 640, height: int = 480, objects: int = 0) -> bytes:
    """Smooth colour fields and noise (JPEG, quality 90), with `objects` flat rectangles with hard
    edges on top: decodes like a photo."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    channels = []
    for _ in range(3):
        value = np.zeros((height, width), np.float32)
        for _ in range(3):
            fx, fy = rng.uniform(0.5, 3.0, 2) * 2 * np.pi
            value += np.sin(fx * x / width + fy * y / height + rng.uniform(0, 2 * np.pi))
        channels.append(value)
    rgb = np.stack(channels, -1)
    rgb = (rgb - rgb.min()) / (rgb.max() - rgb.min()) * 255
    for _ in range(objects):
        x0, y0 = rng.integers(0, width * 3 // 4), rng.integers(0, height * 3 // 4)
        rgb[y0:y0 + rng.integers(20, height // 3), x0:x0 + rng.integers(20, width // 3)] = rng.uniform(0, 255, 3)
    rgb = rgb + rng.normal(0, 3, rgb.shape)
    buf = io.BytesIO()
    Image.fromarray(rgb.clip(0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def model_only(predictor, images, batch_size: int) -> tuple[float, float]:
    """images/s, and CPU ms per image (this process, all its threads)."""
    predictor.predict_batch(images[:batch_size])                      # warm-up
    results = []
    cpu0, t0 = cpu_seconds(os.getpid()), time.perf_counter()
    for batch_results in predictor.predict_batches(images[i:i + batch_size] for i in range(0, len(images), batch_size)):
        results += batch_results
    rate = len(images) / (time.perf_counter() - t0)
    cpu_ms = (cpu_seconds(os.getpid()) - cpu0) * 1e3 / len(images)
    print(f"  model only: mean per-image model_ms {np.mean([r['model_ms'] for r in results]):.0f}, "
          f"postprocess_ms {np.mean([r['postprocess_ms'] for r in results]):.0f}, CPU {cpu_ms:.0f} ms", flush=True)
    return rate, cpu_ms


def wait_finished(store, job_id: str, timeout: float = 1800.0):
    """The finished job's status. Polls once a second: the job's own finished_at times the run, and
    faster polling cost this script ~20 CPU ms per image, taken from the worker on a small machine."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = store.job(job_id)
        if status.finished:
            return status
        time.sleep(1.0)
    raise TimeoutError(f"job {job_id} not finished after {timeout:.0f} s")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--model", default="detr-r50")
    ap.add_argument("--min-size", type=int, default=320)
    ap.add_argument("--max-size", type=int, default=512)
    ap.add_argument("--threshold", type=float, default=0.0)
    ap.add_argument("--weights", choices=("random", "informative"), default="random",
                    help="seeded random weights (collapsed: few segments), or bench.informative's")
    args = ap.parse_args(argv)

    sys.path.insert(0, os.getcwd())
    from storage.s3server import S3Server
    from tests.conftest import create_pg_database, drop_pg_database

    print(f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", flush=True)
    jpegs = [gradient_jpeg(i) for i in range(args.images)]
    db_name, db_url = create_pg_database(PG_ADMIN_URL)
    queue = f"bench-pipe-{uuid.uuid4().hex[:12]}"
    worker = None
    with S3Server() as server:
        env = {**server.env(), "PANOPTIC_DATABASE_URL": db_url, "PANOPTIC_BROKER_URL": REDIS_URL}
        os.environ.update(env)                      # before the storage / Celery modules read them
        import redis
        import torch

        from scheduler.dispatch import Dispatcher
        from scheduler.submit import JobSpec, submit
        from storage.jobs import JobStore
        from storage import objects
        from worker.heap import keep_freed_memory
        from worker.predictor import ModelConfig, Predictor
        from worker.preprocess import decode_image

        r = redis.Redis.from_url(REDIS_URL)
        try:
            client = server.client()
            bucket = server.create_bucket("bench")
            for i, data in enumerate(jpegs):
                client.put_object(Bucket=bucket, Key=f"in/img{i:03d}.jpg", Body=data)
            for i in range(2):
                client.put_object(Bucket=bucket, Key=f"warm/img{i:03d}.jpg", Body=jpegs[i])

            weights = "random"
            if args.weights == "informative":
                from bench.informative import save_informative_weights
                weights = str(save_informative_weights(args.model, f"/tmp/{queue}-weights.pt"))
            config = ModelConfig(model=args.model, weights=weights, threshold=args.threshold,
                                 min_size=args.min_size, max_size=args.max_size, device="cpu",
                                 batch_size=args.batch_size)
            decoded = [decode_image(objects.read_bytes(f"s3://{bucket}/in/img{i:03d}.jpg"))
                       for i in range(args.images)]
            keep_freed_memory()          # the worker's pool process does the same (worker.heap)
            predictor = Predictor(config)
            model_before, model_cpu_ms = model_only(predictor, decoded, args.batch_size)
            print(f"model only (before): {model_before:.3f} images/s", flush=True)

            # One worker, as `panoptic-batch worker` starts it.
            cli = Path(sys.executable).with_name("panoptic-batch")
            command = [str(cli)] if cli.exists() else [shutil.which("panoptic-batch")]
            worker = subprocess.Popen(command + ["worker", "--device", "cpu", "--concurrency", "1",
                                                 "--queues", queue, "--loglevel", "WARNING"],
                                      env={**os.environ, **env}, stdout=subprocess.DEVNULL,
                                      stderr=open(f"/tmp/{queue}.log", "w"))
            store, dispatcher = JobStore(db_url), Dispatcher()
            spec = JobSpec(source=f"s3://{bucket}/warm", dest=f"s3://{bucket}/out-warm", model=args.model,
                           weights=weights, threshold=args.threshold, min_size=args.min_size,
                           max_size=args.max_size, chunk_size=32,
                           config={"batch_size": args.batch_size, "chunk_size": 32, "queue": queue})
            enqueue = lambda job, ids: dispatcher.enqueue(job, ids, queue)  # noqa: E731
            warm = wait_finished(store, submit(store, spec, enqueue))
            assert warm.succeeded == 2, warm

            from dataclasses import replace
            meter = CpuMeter({"worker (model, downloads, uploads, SQL)": lambda: descendants(worker.pid),
                              "S3 server": lambda: descendants(server.proc.pid),
                              "PostgreSQL": lambda: processes_named("postgres"),
                              "Redis": lambda: processes_named("redis-server"),
                              "this script (submit, polling)": lambda: [os.getpid()]})
            meter.start()
            started = datetime.now(timezone.utc)
            with dispatcher.app.producer_or_acquire():
                job_id = submit(store, replace(spec, source=f"s3://{bucket}/in", dest=f"s3://{bucket}/out"), enqueue)
            status = wait_finished(store, job_id)
            cpu = meter.stop()
            e2e_s = (status.finished_at - started).total_seconds()     # the worker's clock is this one
            e2e = args.images / e2e_s
            assert status.succeeded == args.images, status
            segments = [len(json.loads(objects.read_bytes(f"s3://{bucket}/out/img{i:03d}.json"))["segments_info"])
                        for i in range(args.images)]
            records = list(store.images(job_id))
            parts = {name: float(np.mean([getattr(rec, name) for rec in records]))
                     for name in ("decode_ms", "model_ms", "postprocess_ms", "upload_ms")}
            print(f"end to end: {e2e:.3f} images/s; mean segments per image {np.mean(segments):.1f}; "
                  f"worker's mean per-image timings (ms): {json.dumps({k: round(v) for k, v in parts.items()})}",
                  flush=True)
            worker.send_signal(signal.SIGTERM)
            worker.wait(60)
            worker = None

            model_after, _ = model_only(predictor, decoded, args.batch_size)
            print(f"model only (after): {model_after:.3f} images/s", flush=True)
        finally:
            if worker is not None:
                worker.send_signal(signal.SIGTERM)
                try:
                    worker.wait(60)
                except subprocess.TimeoutExpired:
                    worker.kill()
            Path(f"/tmp/{queue}-weights.pt").unlink(missing_ok=True)
            keys = list(r.scan_iter(match=f"*{queue}*"))
            if keys:
                r.delete(*keys)
            from storage import db as storage_db
            storage_db.dispose_all()
            drop_pg_database(PG_ADMIN_URL, db_name)

    model_rate = (model_before + model_after) / 2
    print(f"\n{args.model}, {args.weights} seeded weights, --min-size {args.min_size} --max-size {args.max_size}, "
          f"--threshold {args.threshold}, batch size {args.batch_size}, {args.images} images 640x480, "
          f"CPU, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| model only, before (images/s) | end to end (images/s) | model only, after (images/s) | "
          "efficiency = end to end / mean model only |")
    print("|---|---|---|---|")
    print(f"| {model_before:.3f} | {e2e:.3f} | {model_after:.3f} | **{e2e / model_rate:.2f}** |")
    # On a machine whose cores the model already fills, whatever else runs takes from it.
    cores = os.cpu_count()
    print(f"\nCPU ms per image during the end-to-end run ({cores} cores × {e2e_s * 1e3 / args.images:.0f} ms "
          f"of wall time per image = {cores * e2e_s * 1e3 / args.images:.0f} core-ms available); "
          f"model only, in this process: {model_cpu_ms:.0f}")
    print("| process | CPU ms per image |")
    print("|---|---|")
    for name, seconds in cpu.items():
        print(f"| {name} | {seconds * 1e3 / args.images:.0f} |")
    print(f"| all of these | {sum(cpu.values()) * 1e3 / args.images:.0f} |")


if __name__ == "__main__":
    main()
