"""Scheduler throughput: walk + register + enqueue N keys (S3 server → PostgreSQL → Redis).

    /work/venv/bin/python -m bench.scheduler_bench [--sizes 10000 100000] [--tracemalloc]
        [--profile DIR] [--py-spy DIR] [--baseline TREE [--repeat K]]

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

``--profile DIR``: one more untimed child per N runs submit under cProfile and writes
``DIR/submit-N.pstats`` and a summary, ``DIR/submit-N.txt`` (own time and cumulative time of the
top functions; the profiler's overhead inflates the Python-heavy parts, so read fractions, not seconds).

``--py-spy DIR``: the same with py-spy (sampling from outside, so no overhead to correct for, and
waits included): ``DIR/submit-N.raw`` and ``DIR/submit-N.samples.txt``, the fractions of the timed
submit's samples by category (``SAMPLE_CATEGORIES``) and the commonest innermost frames.

``--baseline TREE``: an A/B on the same objects in the same run. TREE is another checkout of the
project (e.g. ``git archive HEAD | tar -x -C /tmp/old``); per N, timed children of TREE and of this
tree alternate ``--repeat`` times (default 2), each in a fresh database, since on a shared machine
only figures from one run compare.
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


def child(source: str, warm_source: str, dest: str, queue: str, trace: bool, profile: str | None = None) -> dict:
    """Runs in its own process: time submit() once, report rate and memory as JSON."""
    from dataclasses import replace

    from scheduler.dispatch import Dispatcher
    from scheduler.submit import JobSpec
    from storage.jobs import JobStore

    store = JobStore()
    dispatcher = Dispatcher()
    spec = JobSpec(source=source, dest=dest, model="detr-r50", weights="random", threshold=0.85,
                   min_size=800, max_size=1333, chunk_size=32,
                   config={"batch_size": 1, "chunk_size": 32, "queue": queue})
    # Warm-up: one whole submit of a one-object source, so that migrations, connections, the boto3
    # client and lazy imports are done before timing (its one message stays in the queue).
    run_submit(store, replace(spec, source=warm_source), dispatcher, queue)
    if trace:
        import tracemalloc
        tracemalloc.start()
    profiler = None
    if profile:
        import cProfile
        profiler = cProfile.Profile()
    reset = reset_peak_rss()
    rss_before = proc_status("VmRSS")
    t0 = time.perf_counter()
    if profiler:
        profiler.enable()
    job_id = timed_submit(store, spec, dispatcher, queue)
    if profiler:
        profiler.disable()
    seconds = time.perf_counter() - t0
    rss_after = proc_status("VmHWM")
    out = {"seconds": seconds, "peak_reset": reset, "rss_before_kib": rss_before, "rss_after_kib": rss_after,
           "chunks": dispatcher.sent - 1, "total": store.job(job_id).total}
    if trace:
        out["tracemalloc_peak_bytes"] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    if profiler:
        write_profile(profiler, profile, seconds)
    return out


def run_submit(store, spec, dispatcher, queue: str) -> str:
    from scheduler.submit import submit

    with dispatcher.app.producer_or_acquire():
        return submit(store, spec, lambda job, ids: dispatcher.enqueue(job, ids, queue))


def timed_submit(store, spec, dispatcher, queue: str) -> str:
    """The timed call, a function of its own so that a sampling profiler's stacks single it out."""
    return run_submit(store, spec, dispatcher, queue)


def write_profile(profiler, path: str, seconds: float) -> None:
    """PATH.pstats (for pstats/snakeviz) and PATH.txt: the top functions by own and by cumulative time."""
    import io
    import pstats

    profiler.dump_stats(path + ".pstats")
    text = io.StringIO()
    text.write(f"submit under cProfile: {seconds:.2f} s wall\n")
    stats = pstats.Stats(profiler, stream=text).strip_dirs()
    stats.sort_stats("tottime").print_stats(40)
    stats.sort_stats("cumulative").print_stats(60)
    with open(path + ".txt", "w") as f:
        f.write(text.getvalue())


# Where a py-spy sample of the timed submit goes: the first pattern found in its stack decides.
SAMPLE_CATEGORIES = (
    ("S3 listing: botocore's check for an error in a 200 response (a second XML parse)", "_handle_200_error"),
    ("S3 listing: LastModified timestamps", "parse_timestamp"),
    ("S3 listing: botocore's response parsing, the rest", "botocore/parsers.py"),
    ("S3 listing: request, waiting for the server, reading", "_list_s3"),
    ("SQL: previous_successes (ETag check)", "previous_successes"),
    ("SQL insert: psycopg preparing the query (its text, then dumping the parameters)", "_convert_query"),
    ("SQL insert: the rest (SQLAlchemy, psycopg, server, commit)", "_insert_batch"),
    ("Celery: the task-sent event", "EventDispatcher.publish"),
    ("Celery: send_task, the rest (message, publish to Redis)", "send_task"),
    ("other", ""),
)


def find_py_spy() -> str:
    """py-spy beside this Python (a virtual environment's bin/) or on PATH."""
    import shutil

    found = shutil.which("py-spy", path=os.path.dirname(sys.executable)) or shutil.which("py-spy")
    if not found:
        raise SystemExit("--py-spy needs py-spy: pip install py-spy")
    return found


def summarize_samples(raw: str, out: str) -> None:
    """py-spy's raw (collapsed) stacks → fractions of the timed submit's samples by category, and
    the commonest innermost frames."""
    from collections import Counter

    by_category, leaves, total = Counter(), Counter(), 0
    with open(raw) as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if "timed_submit (" not in stack:
                continue
            total += int(count)
            for name, pattern in SAMPLE_CATEGORIES:
                if pattern in stack:
                    by_category[name] += int(count)
                    break
            leaves[" ← ".join(frame.split(" (")[0] for frame in reversed(stack.split(";")[-3:]))] += int(count)
    with open(out, "w") as f:
        f.write(f"{total} samples of the timed submit (wall clock: idle included)\n\n")
        for name, _ in SAMPLE_CATEGORIES:
            f.write(f"{by_category[name] / max(total, 1):6.1%}  {name}\n")
        f.write("\ninnermost frames:\n")
        for frames, count in leaves.most_common(30):
            f.write(f"{count / max(total, 1):6.1%}  {frames}\n")


def run_child(server, source: str, warm_source: str, dest: str, trace: bool = False,
              profile: str | None = None, sample: str | None = None, tree: str | None = None) -> dict:
    """One child in a fresh database and queue; ``tree``: run that checkout's child instead of this one's."""
    import redis

    sys.path.insert(0, os.getcwd())
    from tests.conftest import create_pg_database, drop_pg_database

    db_name, db_url = create_pg_database(PG_ADMIN_URL)
    queue = f"bench-sched-{uuid.uuid4().hex[:12]}"
    env = {**os.environ, **server.env(), "PANOPTIC_DATABASE_URL": db_url, "PANOPTIC_BROKER_URL": REDIS_URL}
    r = redis.Redis.from_url(REDIS_URL)
    try:
        if tree:                              # its own modules first, not this checkout's
            env["PYTHONPATH"] = os.path.abspath(tree)
        command = ([sys.executable, "-m", "bench.scheduler_bench", "--child", source, warm_source, dest, queue]
                   + (["--tracemalloc"] if trace else []) + (["--profile", profile] if profile else []))
        if sample:                            # py-spy: sampled from outside, wall clock (--idle)
            command = [find_py_spy(), "record", "--idle", "--rate", "250", "--format", "raw", "-o", sample, "--"] + command
        proc = subprocess.run(command, env=env, capture_output=True, text=True, check=False, cwd=tree)
        if proc.returncode:
            raise RuntimeError(f"child failed:\n{proc.stderr[-4000:]}")
        result = json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])
        result["queued"] = r.llen(queue) - 1           # less the warm-up's message
        return result
    finally:
        keys = [k for k in r.scan_iter(match=f"*{queue}*")]   # the queue's list (and kombu's binding set)
        if keys:
            r.delete(*keys)
        drop_pg_database(PG_ADMIN_URL, db_name)


def timed(result: dict, n: int) -> dict:
    """Check a timed child's result and add its rates."""
    assert result["total"] == n, result
    assert result["queued"] == result["chunks"], result
    result["n"] = n
    result["keys_per_s"] = n / result["seconds"]
    result["rss_growth_mib"] = (result["rss_after_kib"] - result["rss_before_kib"]) / 1024
    return result


def ab_test(server, source: str, warm: str, dest: str, n: int, baseline: str, repeat: int) -> list[tuple]:
    """Alternate timed children of the baseline tree and of this one (which goes first alternates too)."""
    rows = []
    for i in range(repeat):
        rates = {}
        for tree in ((baseline, None) if i % 2 == 0 else (None, baseline)):
            rates[tree] = timed(run_child(server, source, warm, dest, tree=tree), n)["keys_per_s"]
        print(f"A/B N={n} round {i + 1}: baseline {rates[baseline]:,.0f} keys/s, "
              f"this tree {rates[None]:,.0f} keys/s", flush=True)
        rows.append((n, i + 1, rates[baseline], rates[None]))
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--tracemalloc", action="store_true", help="also a separate untimed run per N with tracemalloc")
    ap.add_argument("--profile", metavar="DIR", help="also a separate child per N under cProfile; "
                    "writes DIR/submit-N.pstats and DIR/submit-N.txt")
    ap.add_argument("--py-spy", metavar="DIR", dest="py_spy", help="also a separate child per N sampled by "
                    "py-spy (pip install py-spy); writes DIR/submit-N.raw and the fractions, DIR/submit-N.samples.txt")
    ap.add_argument("--baseline", metavar="TREE", help="another checkout: alternate its timed children "
                    "with this tree's on the same objects (A/B)")
    ap.add_argument("--repeat", type=int, default=2, help="A/B rounds per N with --baseline (default 2)")
    ap.add_argument("--child", nargs=4, metavar=("SOURCE", "WARM", "DEST", "QUEUE"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(*args.child, trace=args.tracemalloc, profile=args.profile)))
        return
    for folder in (args.profile, args.py_spy):
        if folder:
            os.makedirs(folder, exist_ok=True)

    from storage.s3server import S3Server

    sizes = sorted(args.sizes)
    prefixes = level_prefixes(sizes)
    print(f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", flush=True)
    rows, ab_rows = [], []
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
            if args.baseline:
                ab_rows.extend(ab_test(server, source, warm, dest, n, args.baseline, args.repeat))
            result = timed(run_child(server, source, warm, dest), n)
            if args.tracemalloc:
                traced = run_child(server, source, warm, dest, trace=True)
                result["tracemalloc_peak_mib"] = traced["tracemalloc_peak_bytes"] / 2**20
            if args.profile:
                path = os.path.join(os.path.abspath(args.profile), f"submit-{n}")
                run_child(server, source, warm, dest, profile=path)
                print(f"profile: {path}.txt", flush=True)
            if args.py_spy:
                path = os.path.join(os.path.abspath(args.py_spy), f"submit-{n}")
                run_child(server, source, warm, dest, sample=path + ".raw")
                summarize_samples(path + ".raw", path + ".samples.txt")
                print(f"samples: {path}.samples.txt", flush=True)
            rows.append(result)
            print(json.dumps(result), flush=True)
    print("| N | seconds | keys/s | chunks queued | RSS before → peak RSS during submit (MiB) | peak RSS growth (MiB) |"
          + (" tracemalloc peak (MiB) |" if args.tracemalloc else ""))
    print("|---|---|---|---|---|---|" + ("---|" if args.tracemalloc else ""))
    for r in rows:
        print(f"| {r['n']:,} | {r['seconds']:.2f} | {r['keys_per_s']:,.0f} | {r['chunks']:,} | "
              f"{r['rss_before_kib'] / 1024:.0f} → {r['rss_after_kib'] / 1024:.0f} | {r['rss_growth_mib']:.1f} |"
              + (f" {r['tracemalloc_peak_mib']:.1f} |" if args.tracemalloc else ""))
    if ab_rows:
        print("\n| N | round | baseline keys/s | this tree keys/s |\n|---|---|---|---|")
        for n, i, old, new in ab_rows:
            print(f"| {n:,} | {i} | {old:,.0f} | {new:,.0f} |")


if __name__ == "__main__":
    main()
