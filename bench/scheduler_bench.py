"""Scheduler throughput: walk + register + enqueue N keys (S3 server → PostgreSQL → Redis).

    /work/venv/bin/python -m bench.scheduler_bench [--sizes 10000 100000] [--tracemalloc]

Starts a private SeaweedFS S3 server (storage.s3server.S3Server) and fills one bucket with
zero-byte ``.jpg`` objects, nested so that the source for each N holds exactly N keys
(``all/in/in/...`` for the smallest N, ``all/`` for the largest); objects are uploaded by 32
threads sharing one boto3 client, and only as many as the next N needs (so the small sizes are
measured even if the large upload is cut short).

Each N then runs in a fresh subprocess: the child opens a fresh
PostgreSQL database (created on postgresql://postgres@127.0.0.1:5432/test, schema migrated before
timing, dropped afterwards), a real ``scheduler.dispatch.Dispatcher`` on Redis (127.0.0.1:6379)
sending to a queue of its own (its keys deleted afterwards), and times exactly
``scheduler.submit.submit(store, spec, enqueue)``: listing, SQL inserts and one Celery message per
chunk of 32. It reports keys/s and the growth of peak RSS across submit: the peak (VmHWM) is reset
to the current RSS just before (``/proc/self/clear_refs``), and peak after − RSS before is reported.
(``ru_maxrss`` would not do: a child started by vfork/exec inherits the parent's peak, here the
uploader's.) With ``--tracemalloc`` a second, untimed child reports the Python heap's peak during submit.
Checked: the job records N images and the queue holds exactly the chunks sent.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

from bench.memory import proc_status, reset_peak_rss

PG_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/test"
REDIS_URL = "redis://127.0.0.1:6379/0"
PER_FOLDER = 1000


def level_prefixes(sizes: list[int]) -> list[str]:
    """Source prefix for each size (ascending): the largest is "all", each smaller one nests inside."""
    prefixes, prefix = [], "all"
    for _ in sizes:
        prefixes.append(prefix)
        prefix += "/in"
    return prefixes[::-1]


def upload_level(client, bucket: str, prefix: str, start: int, count: int, threads: int = 32) -> float:
    """Upload `count` zero-byte objects under prefix/dNNN/; returns objects per second."""
    def put(i):
        client.put_object(Bucket=bucket, Key=f"{prefix}/d{i // PER_FOLDER:04d}/img{i:07d}.jpg", Body=b"")

    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        for _ in pool.map(put, range(start, start + count), chunksize=64):
            pass
    return count / (time.perf_counter() - t0)


def child(source: str, warm_source: str, dest: str, queue: str, trace: bool) -> dict:
    """Runs in its own process: time submit() once, report rate and memory as JSON."""
    from dataclasses import replace

    from scheduler.dispatch import Dispatcher
    from scheduler.submit import JobSpec, submit
    from storage.jobs import JobStore

    store = JobStore()
    dispatcher = Dispatcher()
    spec = JobSpec(source=source, dest=dest, model="detr-r50", weights="random", threshold=0.85,
                   min_size=800, max_size=1333, chunk_size=32,
                   config={"batch_size": 1, "chunk_size": 32, "queue": queue})
    # Warm-up: one whole submit of a one-object source, so that migrations, connections, the boto3
    # client and lazy imports are done before timing (its one message stays in the queue).
    with dispatcher.app.producer_or_acquire():
        submit(store, replace(spec, source=warm_source), lambda job, ids: dispatcher.enqueue(job, ids, queue))
    if trace:
        import tracemalloc
        tracemalloc.start()
    reset = reset_peak_rss()
    rss_before = proc_status("VmRSS")
    t0 = time.perf_counter()
    with dispatcher.app.producer_or_acquire():
        job_id = submit(store, spec, lambda job, ids: dispatcher.enqueue(job, ids, queue))
    seconds = time.perf_counter() - t0
    rss_after = proc_status("VmHWM")
    out = {"seconds": seconds, "peak_reset": reset, "rss_before_kib": rss_before, "rss_after_kib": rss_after,
           "chunks": dispatcher.sent - 1, "total": store.job(job_id).total}
    if trace:
        out["tracemalloc_peak_bytes"] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return out


def run_child(server, source: str, warm_source: str, dest: str, trace: bool) -> dict:
    import redis

    sys.path.insert(0, os.getcwd())
    from tests.conftest import create_pg_database, drop_pg_database

    db_name, db_url = create_pg_database(PG_ADMIN_URL)
    queue = f"bench-sched-{uuid.uuid4().hex[:12]}"
    env = {**os.environ, **server.env(), "PANOPTIC_DATABASE_URL": db_url, "PANOPTIC_BROKER_URL": REDIS_URL}
    r = redis.Redis.from_url(REDIS_URL)
    try:
        proc = subprocess.run([sys.executable, "-m", "bench.scheduler_bench", "--child", source, warm_source, dest, queue]
                              + (["--tracemalloc"] if trace else []),
                              env=env, capture_output=True, text=True, check=False)
        if proc.returncode:
            raise RuntimeError(f"child failed:\n{proc.stderr[-4000:]}")
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        result["queued"] = r.llen(queue) - 1           # less the warm-up's message
        return result
    finally:
        keys = [k for k in r.scan_iter(match=f"*{queue}*")]   # the queue's list (and kombu's binding set)
        if keys:
            r.delete(*keys)
        drop_pg_database(PG_ADMIN_URL, db_name)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--tracemalloc", action="store_true", help="also a separate untimed run per N with tracemalloc")
    ap.add_argument("--child", nargs=4, metavar=("SOURCE", "WARM", "DEST", "QUEUE"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(*args.child, trace=args.tracemalloc)))
        return

    from storage.s3server import S3Server

    sizes = sorted(args.sizes)
    prefixes = level_prefixes(sizes)
    print(f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", flush=True)
    rows = []
    with S3Server() as server:
        client = server.client(config=__import__("botocore.config").config.Config(
            s3={"addressing_style": "path"}, max_pool_connections=32, retries={"mode": "standard", "max_attempts": 5}))
        bucket = server.create_bucket("bench")
        client.put_object(Bucket=bucket, Key="warm/img.jpg", Body=b"")
        warm = f"s3://{bucket}/warm"
        have = 0
        for n, prefix in zip(sizes, prefixes):
            rate = upload_level(client, bucket, prefix, have, n - have)
            print(f"uploaded {n - have} objects at {rate:.0f}/s (total {n})", flush=True)
            have = n
            source, dest = f"s3://{bucket}/{prefix}", f"s3://{bucket}/out"
            result = run_child(server, source, warm, dest, trace=False)
            assert result["total"] == n, result
            assert result["queued"] == result["chunks"], result
            result["n"] = n
            result["keys_per_s"] = n / result["seconds"]
            result["rss_growth_mib"] = (result["rss_after_kib"] - result["rss_before_kib"]) / 1024
            if args.tracemalloc:
                traced = run_child(server, source, warm, dest, trace=True)
                result["tracemalloc_peak_mib"] = traced["tracemalloc_peak_bytes"] / 2**20
            rows.append(result)
            print(json.dumps(result), flush=True)
    print("| N | seconds | keys/s | chunks queued | RSS before → peak RSS during submit (MiB) | peak RSS growth (MiB) |"
          + (" tracemalloc peak (MiB) |" if args.tracemalloc else ""))
    print("|---|---|---|---|---|---|" + ("---|" if args.tracemalloc else ""))
    for r in rows:
        print(f"| {r['n']:,} | {r['seconds']:.2f} | {r['keys_per_s']:,.0f} | {r['chunks']:,} | "
              f"{r['rss_before_kib'] / 1024:.0f} → {r['rss_after_kib'] / 1024:.0f} | {r['rss_growth_mib']:.1f} |"
              + (f" {r['tracemalloc_peak_mib']:.1f} |" if args.tracemalloc else ""))


if __name__ == "__main__":
    main()
