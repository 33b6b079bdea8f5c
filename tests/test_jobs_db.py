"""storage.jobs / storage.db on SQLite and PostgreSQL: migrations, leases, fencing, counters, stats.

Each test gets a fresh database: a SQLite file in tmp_path, or a uniquely named PostgreSQL
database created on the server at 127.0.0.1:5432 (``PANOPTIC_TEST_POSTGRES_URL`` overrides; the
PostgreSQL cases fail when no server answers: .ci/run starts one) and dropped afterwards.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections import Counter, defaultdict
from datetime import timezone
from pathlib import Path

import pytest
from sqlalchemy import event, inspect, text

from storage import db as storage_db
from storage.jobs import AmbiguousJobId, ImageSuccess, JobNotFound, JobStore
from storage.schema import Base


REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def store(db_url) -> JobStore:
    return JobStore(db_url)


def new_job(store: JobStore, n: int = 0, **overrides) -> tuple[str, list[int]]:
    """A job with n images (keys img0000.jpg…), submission finalised; returns (job id, image ids)."""
    kwargs = dict(name="test", source="s3://in/photos", dest="s3://out/seg", model="detr-r50",
                  weights="random", threshold=0.85, min_size=800, max_size=1333, config={"batch_size": 2})
    kwargs.update(overrides)
    job_id = store.create_job(**kwargs)
    ids = [i for batch in store.add_images(job_id, entries(n)) for i in batch]
    store.finalize_submission(job_id)
    return job_id, ids


def entries(n: int, start: int = 0):
    for i in range(start, start + n):
        yield (f"img{i:04d}.jpg", f"s3://in/photos/img{i:04d}.jpg", f"etag{i}", 1000 + i)


def success(store: JobStore, image_id: int, token: str, segments_info, **extra) -> bool:
    return store.record_success(
        image_id, token, output_png=f"s3://out/seg/{image_id}.png", output_json=f"s3://out/seg/{image_id}.json",
        height=480, width=640, segments_info=segments_info,
        timings=extra.pop("timings", {"decode_ms": 1.5, "model_ms": 20.0, "postprocess_ms": 3.0, "upload_ms": 2.0}),
        **extra)


def process(store: JobStore, image_id: int, segments_info=(), *, fail: bool = False) -> None:
    token = uuid.uuid4().hex
    assert store.claim(image_id, token, 60) is not None
    if fail:
        assert store.record_failure(image_id, token, "boom")
    else:
        assert success(store, image_id, token, list(segments_info))


def expected_stats(segments_by_image: dict[int, list[dict]]) -> list[dict]:
    """Per-class statistics computed directly from the segments_info of the succeeded images."""
    agg: dict[int, dict] = defaultdict(lambda: {"segments": 0, "images": set(), "pixels": 0})
    for image_id, segments in segments_by_image.items():
        for s in segments:
            a = agg[s["category_id"]]
            a["segments"] += 1
            a["images"].add(image_id)
            a["pixels"] += s["area"]
    return [{"category_id": c, "segments": a["segments"], "images": len(a["images"]), "pixels": a["pixels"]}
            for c, a in sorted(agg.items())]


# ---------------------------------------------------------------------------------------------
# URLs, engines, migrations


def test_database_url_normalisation(monkeypatch, tmp_path):
    assert storage_db.database_url("postgresql://u:p@h:5432/db") == "postgresql+psycopg://u:p@h:5432/db"
    assert storage_db.database_url("postgres://u@h/db") == "postgresql+psycopg://u@h/db"
    assert storage_db.database_url("postgresql+psycopg://u@h/db") == "postgresql+psycopg://u@h/db"
    monkeypatch.delenv("PANOPTIC_DATABASE_URL", raising=False)
    monkeypatch.chdir(tmp_path)
    assert storage_db.database_url() == f"sqlite:///{tmp_path}/panoptic-batch.db"
    monkeypatch.setenv("PANOPTIC_DATABASE_URL", "postgresql://x@y/z")
    assert storage_db.database_url() == "postgresql+psycopg://x@y/z"
    assert storage_db.database_url("sqlite:////abs/other.db") == "sqlite:////abs/other.db"
    assert storage_db.database_url("sqlite://") == "sqlite://"


def test_default_database_is_a_file_in_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.delenv("PANOPTIC_DATABASE_URL", raising=False)
    monkeypatch.chdir(tmp_path)
    try:
        JobStore().create_job("x", "/in", "/out", "detr-r50", "random", 0.85, 800, 1333, {})
        assert (tmp_path / "panoptic-batch.db").is_file()
    finally:
        storage_db.dispose_all()


def test_sqlite_connection_settings(tmp_path):
    url = f"sqlite:///{tmp_path / 'p.db'}"
    try:
        with storage_db.get_engine(url).connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    finally:
        storage_db.dispose_all()


def test_migration_on_first_use_creates_the_schema(db_url):
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    store = JobStore(db_url)
    assert store.jobs() == []  # first use: creates the schema
    engine = storage_db.get_engine(db_url)
    insp = inspect(engine)
    assert {"jobs", "images", "image_classes", "alembic_version"} <= set(insp.get_table_names())
    assert "ix_images_job_id_state" in {ix["name"] for ix in insp.get_indexes("images")}
    assert "ix_image_classes_job_id_category_id" in {ix["name"] for ix in insp.get_indexes("image_classes")}
    assert set(insp.get_pk_constraint("image_classes")["constrained_columns"]) == {"image_id", "category_id"}
    with engine.connect() as conn:
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all() == ["0003"]
        # The migration creates exactly what the ORM models describe.
        diffs = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
    assert diffs == []


NEWER_REVISION = "0099_future"


def migrated_by_a_newer_version(url: str) -> None:
    """Leave the database at `url` as a newer panoptic-batch would: its schema at a revision this
    one does not know (NEWER_REVISION), and no engine of this process open on it."""
    with storage_db.get_engine(url).begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = :revision"), {"revision": NEWER_REVISION})
    storage_db.dispose_all()                            # as a new process would start


def test_a_database_migrated_by_a_newer_version_is_refused_and_left_as_it_is(db_url):
    """A rolling upgrade's old worker (or a machine left behind) meets a schema it does not know:
    it says so (SchemaTooNew, which the CLI shows as one line, exit 5) and changes nothing."""
    JobStore(db_url).create_job("x", "/in", "/out", "detr-r50", "random", 0.85, 800, 1333, {})
    migrated_by_a_newer_version(db_url)
    with pytest.raises(storage_db.SchemaTooNew, match=rf"revision {NEWER_REVISION}, newer than this panoptic-batch's \(0003\)"):
        storage_db.get_engine(db_url)
    engine = storage_db.get_engine(db_url, migrate=False)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all() == [NEWER_REVISION]
        assert conn.execute(text("SELECT count(*) FROM jobs")).scalar() == 1


def test_upgrade_is_idempotent(db_url):
    JobStore(db_url).create_job("x", "/in", "/out", "detr-r50", "random", 0.85, 800, 1333, {})
    engine = storage_db.get_engine(db_url)
    storage_db.upgrade(engine)
    storage_db.upgrade(engine)
    # A new process-level start (forgotten cache) upgrades again, harmlessly.
    storage_db.dispose_all()
    store = JobStore(db_url)
    assert len(store.jobs()) == 1
    with storage_db.get_engine(db_url).connect() as conn:
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all() == ["0003"]


_FIRST_USE_SCRIPT = textwrap.dedent("""
    import sys, time
    url, start_at = sys.argv[1], float(sys.argv[2])
    from storage.jobs import JobStore
    time.sleep(max(0.0, start_at - time.time()))  # all processes reach first use together
    store = JobStore(url)
    job_id = store.create_job("p", "/in", "/out", "detr-r50", "random", 0.85, 800, 1333, {})
    for batch in store.add_images(job_id, [(f"k{i}", f"/in/k{i}", None, 1) for i in range(20)]):
        pass
    print(job_id)
""")


def test_concurrent_first_use_from_several_processes(db_url):
    n = 3
    start_at = time.time() + 2.0
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    procs = [subprocess.Popen([sys.executable, "-c", _FIRST_USE_SCRIPT, db_url, str(start_at)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(n)]
    outs = [p.communicate(timeout=60) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
    job_ids = {out.strip().splitlines()[-1] for out, _ in outs}
    assert len(job_ids) == n
    store = JobStore(db_url)
    assert {j.id for j in store.jobs()} == job_ids
    assert all(j.total == 20 for j in store.jobs())


def test_forked_child_gets_its_own_engine(db_url):
    store = JobStore(db_url)
    job_id, ids = new_job(store, 2)
    parent_engine = storage_db.get_engine(db_url)
    postgres = parent_engine.dialect.name == "postgresql"
    held = parent_engine.connect()  # checked out across the fork
    if postgres:
        with parent_engine.connect() as idle:  # back in the pool during the fork
            idle_pid = idle.execute(text("SELECT pg_backend_pid()")).scalar()
        held_pid = held.execute(text("SELECT pg_backend_pid()")).scalar()
        held.commit()
    pid = os.fork()
    if pid == 0:  # child: must not reuse (or close) the parent's pooled connections
        code = 1
        try:
            ok = storage_db.get_engine(db_url) is not parent_engine
            ok = ok and store.claim(ids[0], "child", 60) is not None
            code = 0 if ok else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    # The parent's connections survived the child (which dropped its copies without closing them).
    assert storage_db.get_engine(db_url) is parent_engine
    if postgres:
        alive = held.execute(text("SELECT count(*) FROM pg_stat_activity WHERE pid IN (:a, :b)"),
                             {"a": idle_pid, "b": held_pid}).scalar()
        assert alive == 2
    held.close()
    assert store.job(job_id).running == 1
    assert store.claim(ids[1], "parent", 60) is not None


# ---------------------------------------------------------------------------------------------
# Jobs and images


def test_add_images_streams_batches_and_ignores_duplicates(store):
    job_id = store.create_job("t", "/in", "/out", "detr-r50", "random", 0.85, 800, 1333, {})
    consumed = []

    def source():
        for i in range(25):
            consumed.append(i)
            yield (f"k{i % 20:02d}", f"/in/k{i % 20:02d}", None, i)  # keys k00..k19, then k00..k04 again

    batches = store.add_images(job_id, source(), batch_size=10)
    assert consumed == []  # lazy
    first = next(batches)
    assert len(first) == 10 and len(consumed) == 10
    assert store.job(job_id).total == 10  # committed before it was yielded
    rest = list(batches)
    assert [len(b) for b in rest] == [10, 0]  # the last batch holds only duplicates
    ids = first + rest[0]
    assert len(set(ids)) == 20
    # Submitting the same keys again (a rerun of submit) adds nothing; duplicates within a batch too.
    again = [("k00", "/in/k00", None, 1), ("new", "/in/new", "e", 5), ("new", "/in/new", "e", 5)]
    added = [i for b in store.add_images(job_id, again) for i in b]
    assert len(added) == 1 and added[0] not in ids
    assert store.job(job_id).total == 21
    images = list(store.images(job_id))
    assert len(images) == 21 and [im.key for im in images][:2] == ["k00", "k01"]
    assert images[0].size == 0 and images[0].state == "pending" and images[0].attempts == 0
    assert images[-1].key == "new" and images[-1].etag == "e"
    assert images[0].updated_at.tzinfo is not None


def test_add_images_odd_keys_and_missing_values_round_trip(store):
    # PostgreSQL binds a batch as arrays: quotes, commas, braces, backslashes, NULL-like text and
    # non-ASCII must come back as given, None as NULL.
    job_id = store.create_job("t", "/in", "/out", "detr-r50", "random", 0.85, 800, 1333, {})
    odd = ['a"b.jpg', "c,d.jpg", "{e}.jpg", "f\\g.jpg", "NULL", "ünï çødé/日本.jpg", "sp ace.jpg", "x'y.jpg"]
    rows = [(key, f"s3://in/{key}", None if i % 2 else f'"etag{i}"', None if i % 3 == 0 else 2**40 + i)
            for i, key in enumerate(odd)]
    ids = [i for batch in store.add_images(job_id, rows, batch_size=5) for i in batch]
    assert len(ids) == len(odd) == store.job(job_id).total
    got = {im.key: (im.uri, im.etag, im.size) for im in store.images(job_id)}
    assert got == {key: (uri, etag, size) for key, uri, etag, size in rows}


def test_previous_successes_over_many_keys(store):
    # More keys than one IN list holds (SQLite) and one array parameter (PostgreSQL) give the same.
    job_id, ids = new_job(store, 1200)
    for image_id in ids[::10]:
        process(store, image_id)
    fingerprint = "f"
    store.update_config(job_id, fingerprint=fingerprint)
    keys = [f"img{i:04d}.jpg" for i in range(1300)]
    done = store.previous_successes("s3://in/photos", "s3://out/seg", fingerprint, keys)
    assert done == {f"img{i:04d}.jpg": f"etag{i}" for i in range(0, 1200, 10)}
    assert store.previous_successes("s3://in/photos", "s3://out/seg", "other", keys) == {}


def test_claim_lease_expiry_and_fencing(store):
    job_id, (image_id, other_id) = new_job(store, 2)
    assert store.job(job_id).state == "pending"

    first = store.claim(image_id, "token-1", lease_seconds=-1)  # a lease that has already expired
    assert first is not None and first.attempts == 1 and first.key == "img0000.jpg"
    assert first.uri == "s3://in/photos/img0000.jpg" and first.etag == "etag0" and first.job_id == job_id
    status = store.job(job_id)
    assert status.state == "running" and status.started_at is not None and status.running == 1

    second = store.claim(image_id, "token-2", lease_seconds=60)  # expired: taken over
    assert second is not None and second.attempts == 2
    assert store.claim(image_id, "token-3", lease_seconds=60) is None  # valid lease: refused
    assert store.heartbeat("token-1", [image_id], 60) == 0
    assert store.heartbeat("token-2", [image_id, other_id], 60) == 1

    # The first holder finishes late: every write is refused and changes nothing.
    before = store.image(image_id)
    assert not success(store, image_id, "token-1", [{"category_id": 1, "area": 10}])
    assert not store.record_failure(image_id, "token-1", "late")
    assert not store.release(image_id, "token-1")
    assert store.image(image_id) == before
    assert before.state == "running" and before.lease_token == "token-2"
    assert store.class_stats(job_id) == []
    assert (store.job(job_id).succeeded, store.job(job_id).failed) == (0, 0)

    assert success(store, image_id, "token-2", [{"category_id": 7, "area": 100}])
    done = store.image(image_id)
    assert done.state == "succeeded" and done.lease_token is None and done.lease_expires_at is None
    assert (done.height, done.width, done.segments) == (480, 640, 1)
    assert (done.decode_ms, done.model_ms, done.postprocess_ms, done.upload_ms) == (1.5, 20.0, 3.0, 2.0)
    assert done.output_png.endswith(".png") and done.output_json.endswith(".json")
    # Done images are never claimed again, and a repeated write is refused.
    assert store.claim(image_id, "token-4", lease_seconds=-1) is None
    assert not success(store, image_id, "token-2", [{"category_id": 7, "area": 100}])
    assert store.job(job_id).succeeded == 1

    # release: back to pending, the attempt not counted.
    claimed = store.claim(other_id, "token-5", 60)
    assert claimed.attempts == 1
    assert store.release(other_id, "token-5")
    assert store.image(other_id).state == "pending" and store.image(other_id).attempts == 0
    assert store.claim(other_id, "token-6", 60).attempts == 1

    with pytest.raises(ValueError):
        store.claim(other_id, None, 60)
    with pytest.raises(ValueError):
        store.record_success(other_id, "", output_png="", output_json="", height=1, width=1, segments_info=[])


def test_expired_leases_are_listed(store):
    job_id, ids = new_job(store, 3)
    store.claim(ids[0], "a", -1)
    store.claim(ids[1], "b", 60)
    assert store.expired(job_id) == [ids[0]]
    assert store.expired() == [ids[0]]


def test_class_stats_are_replaced_not_added(store):
    job_id, ids = new_job(store, 4)
    seg = {
        ids[0]: [{"category_id": 1, "area": 100}, {"category_id": 1, "area": 50}, {"category_id": 184, "area": 7}],
        ids[1]: [{"category_id": 184, "area": 1000}],
        ids[2]: [],
    }
    # Image 0 is delivered twice: the first lease expires, a second worker claims and records it,
    # then the first worker tries to record it too.
    assert store.claim(ids[0], "w1", -1)
    assert store.claim(ids[0], "w2", 60)
    assert success(store, ids[0], "w2", seg[ids[0]])
    assert not success(store, ids[0], "w1", seg[ids[0]] + [{"category_id": 5, "area": 1}])
    process(store, ids[1], seg[ids[1]])
    process(store, ids[2], seg[ids[2]])
    process(store, ids[3], [{"category_id": 3, "area": 9}], fail=True)  # failed: not counted
    assert store.class_stats(job_id) == expected_stats(seg)
    assert store.class_stats(job_id)[0] == {"category_id": 1, "segments": 2, "images": 1, "pixels": 150}
    assert store.job(job_id).state == "partial"

    # Reprocessing image 0 with different segments replaces its rows.
    assert store.reset_images(job_id, [ids[0]], states=("succeeded",)) == [ids[0]]
    status = store.job(job_id)
    assert (status.state, status.succeeded, status.failed, status.pending) == ("running", 2, 1, 1)
    assert status.finished_at is None
    assert store.class_stats(job_id) == expected_stats({ids[1]: seg[ids[1]], ids[2]: []})
    seg[ids[0]] = [{"category_id": 2, "area": 11}, {"category_id": 184, "area": 3}]
    process(store, ids[0], seg[ids[0]])
    assert store.class_stats(job_id) == expected_stats(seg)
    assert store.job(job_id).state == "partial"

    # Retrying the failed image: it succeeds now and its segments count.
    assert store.reset_failed(job_id) == [ids[3]]
    seg[ids[3]] = [{"category_id": 3, "area": 9}]
    process(store, ids[3], seg[ids[3]])
    assert store.class_stats(job_id) == expected_stats(seg)
    status = store.job(job_id)
    assert (status.state, status.succeeded, status.failed) == ("succeeded", 4, 0)


def test_a_chunk_is_claimed_in_one_transaction(store):
    job_id, ids = new_job(store, 5)
    process(store, ids[1])                                   # done already
    assert store.claim(ids[2], "other", 60)                  # held by another worker
    assert store.claim(ids[3], "lost", -1)                   # its worker's lease expired
    commits = []
    event.listen(store.engine, "commit", lambda conn: commits.append(1))
    order = [ids[4], ids[3], ids[2], ids[1], ids[0]]
    claimed = store.claim_many(order, "w1", 60)
    assert len(commits) == 1
    assert [c.id for c in claimed] == [ids[4], ids[3], ids[0]]            # in the order asked
    assert [c.attempts for c in claimed] == [1, 2, 1]
    assert {c.key for c in claimed} == {"img0004.jpg", "img0003.jpg", "img0000.jpg"}
    assert store.claim_many(order, "w2", 60) == []                        # all taken or done
    assert store.claim_many([], "w2", 60) == []
    assert store.heartbeat("w1", [c.id for c in claimed], 60) == 3
    job2, more = new_job(store, 2)
    store.cancel(job2)
    assert store.claim_many(more, "w3", 60) == []                         # cancelled job


def test_a_batch_of_results_is_recorded_in_one_transaction_fenced_per_image(store):
    job_id, ids = new_job(store, 5)
    seg = {ids[0]: [{"category_id": 1, "area": 10}, {"category_id": 1, "area": 5}],
           ids[1]: [{"category_id": 184, "area": 70}],
           ids[2]: [],
           ids[3]: [{"category_id": 7, "area": 3}]}
    for image_id in ids[:3]:
        assert store.claim(image_id, "w1", 60)
    assert store.claim(ids[3], "w1", -1) and store.claim(ids[3], "w2", 60)   # w1's claim expired
    assert success(store, ids[3], "w2", seg[ids[3]])

    def result(image_id):
        return ImageSuccess(image_id, output_png=f"s3://out/seg/{image_id}.png",
                            output_json=f"s3://out/seg/{image_id}.json", height=480, width=640,
                            segments_info=seg[image_id] + ([{"category_id": 9, "area": 1}] if image_id == ids[3] else []),
                            timings={"model_ms": 20.0})

    commits = []
    event.listen(store.engine, "commit", lambda conn: commits.append(1))
    recorded = store.record_successes("w1", [result(i) for i in ids[:4]])
    assert recorded == [True, True, True, False]        # ids[3] is w2's: left as w2 recorded it
    assert len(commits) == 1
    status = store.job(job_id)
    assert (status.state, status.succeeded, status.pending) == ("running", 4, 1)
    assert store.class_stats(job_id) == expected_stats(seg)
    assert {r.id: r.segments for r in store.images(job_id, state="succeeded")} == {
        ids[0]: 2, ids[1]: 1, ids[2]: 0, ids[3]: 1}
    assert store.record_successes("w1", []) == []
    process(store, ids[4])
    assert store.job(job_id).state == "succeeded"


def test_counters_and_job_states(store):
    job_ok, ids = new_job(store, 3)
    for i in ids:
        process(store, i, [{"category_id": 1, "area": 1}])
    status = store.job(job_ok)
    assert (status.state, status.total, status.succeeded, status.failed, status.pending, status.running) == \
        ("succeeded", 3, 3, 0, 0, 0)
    assert status.finished_at is not None and status.finished_at >= status.started_at
    assert status.finished_at.tzinfo is not None and status.finished_at.utcoffset().total_seconds() == 0
    assert status.rate > 0

    job_partial, ids = new_job(store, 3)
    process(store, ids[0])
    process(store, ids[1], fail=True)
    status = store.job(job_partial)
    assert (status.state, status.succeeded, status.failed, status.pending) == ("running", 1, 1, 1)
    assert status.finished_at is None
    process(store, ids[2])
    assert store.job(job_partial).state == "partial"
    failed = store.image(ids[1])
    assert failed.state == "failed" and failed.error == "boom" and failed.lease_token is None

    job_failed, ids = new_job(store, 2)
    for i in ids:
        process(store, i, fail=True)
    assert (store.job(job_failed).state, store.job(job_failed).failed) == ("failed", 2)

    # No images: succeeded as soon as the submission is complete.
    job_empty, _ = new_job(store, 0)
    status = store.job(job_empty)
    assert (status.state, status.total) == ("succeeded", 0) and status.finished_at is not None

    # Every image done before the submission finished: the job waits for finalize_submission.
    job_id = store.create_job("t", "/in", "/out", "detr-r50", "random", 0.85, 800, 1333, {})
    batches = store.add_images(job_id, entries(4), batch_size=2)
    for i in next(batches):
        process(store, i)
    assert store.job(job_id).state == "running"  # 2 of 2 known images done, but more are coming
    for i in next(batches):
        process(store, i)
    assert list(batches) == []
    assert store.job(job_id).state == "running"
    status = store.finalize_submission(job_id)
    assert (status.state, status.succeeded, status.total) == ("succeeded", 4, 4)

    # reset_failed: counters back, job running, then finishing again.
    assert store.reset_failed(job_failed) == sorted(im.id for im in store.images(job_failed))
    status = store.job(job_failed)
    assert (status.state, status.failed, status.pending, status.finished_at) == ("running", 0, 2, None)
    assert all(im.state == "pending" and im.error is None for im in store.images(job_failed))
    assert store.reset_failed(job_failed) == []
    for im in store.images(job_failed, state="pending"):
        process(store, im.id)
    assert store.job(job_failed).state == "succeeded"

    assert [j.id for j in store.jobs()][:2] == [job_id, job_empty]  # newest first
    assert len(store.jobs()) == 5
    assert store.job(job_partial).to_dict()["state"] == "partial"


def test_cancel(store):
    job_id, ids = new_job(store, 3)
    assert store.claim(ids[0], "t", 60)
    assert store.cancel(job_id)
    assert not store.cancel(job_id)
    status = store.job(job_id)
    assert status.state == "cancelled" and status.finished_at is not None
    assert store.claim(ids[1], "u", 60) is None  # no new claims
    # The image in flight still records its result, and the job stays cancelled.
    assert success(store, ids[0], "t", [{"category_id": 1, "area": 1}])
    status = store.job(job_id)
    assert (status.state, status.succeeded, status.pending) == ("cancelled", 1, 2)
    # retry undoes cancel: the images that waited are given back to be queued again.
    assert store.reset_failed(job_id) == ids[1:]
    status = store.job(job_id)
    assert (status.state, status.finished_at, status.pending) == ("running", None, 2)
    assert store.claim(ids[1], "u", 60) is not None
    done, _ = new_job(store, 0)
    assert not store.cancel(done)
    assert store.job(done).state == "succeeded"


def test_job_id_prefixes_and_unknown_jobs(store, monkeypatch):
    job_id, _ = new_job(store, 1)
    assert len(job_id) == 12 and int(job_id, 16) >= 0
    assert store.job(job_id[:4]).id == job_id
    assert store.job(job_id[:7].upper()).id == job_id
    assert store.class_stats(job_id[:6]) == []
    with pytest.raises(JobNotFound) as info:
        store.job("ffff" if not job_id.startswith("ffff") else "eeee")
    assert isinstance(info.value, KeyError)
    assert "no job with id" in str(info.value)
    with pytest.raises(JobNotFound):
        store.job(job_id[:3])  # too short for a prefix
    with pytest.raises(JobNotFound):
        store.job("%")
    with pytest.raises(JobNotFound):
        list(store.images("0123456789ab"))

    import storage.jobs.submission as jobs_module

    forced = iter(["abcd00000001", "abcd00000002"])
    monkeypatch.setattr(jobs_module.secrets, "token_hex", lambda n: next(forced))
    a, _ = new_job(store, 0)
    b, _ = new_job(store, 0)
    with pytest.raises(AmbiguousJobId) as info:
        store.job("abcd")
    assert a in str(info.value) and b in str(info.value)
    assert store.job("abcd00000002").id == b


def test_weights_credentials_are_masked_and_sha_set_once(store):
    job_id, _ = new_job(store, 0, weights="https://alice:s3cret-pass@example.com/ckpt/detr.pth")
    status = store.job(job_id)
    assert "s3cret-pass" not in status.weights
    assert status.weights.startswith("https://alice:") and status.weights.endswith("@example.com/ckpt/detr.pth")
    signed = "https://bucket.s3.amazonaws.com/w.pth?X-Amz-Credential=AKIAXXX&X-Amz-Signature=deadbeef"
    job2, _ = new_job(store, 0, weights=signed)
    assert "deadbeef" not in store.job(job2).weights
    job3, _ = new_job(store, 0, weights="official")
    assert store.job(job3).weights == "official"

    assert store.job(job_id).weights_sha256 is None
    assert store.set_weights_sha256(job_id, "a" * 64) == "a" * 64
    assert store.set_weights_sha256(job_id, "b" * 64) == "a" * 64  # the first one stays
    assert store.job(job_id).weights_sha256 == "a" * 64
    status = store.job(job_id)
    assert (status.model, status.threshold, status.min_size, status.max_size, status.config) == \
        ("detr-r50", 0.85, 800, 1333, {"batch_size": 2})


def test_concurrent_claims_claim_each_image_once(store):
    job_id, ids = new_job(store, 50)
    barrier = threading.Barrier(4)
    claimed: dict[str, list[int]] = {}
    errors = []

    def worker(name: str):
        try:
            mine = []
            barrier.wait()
            for image_id in ids:
                if store.claim(image_id, f"{name}-{uuid.uuid4().hex}", 60) is not None:
                    mine.append(image_id)
            claimed[name] = mine
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    counts = Counter(i for mine in claimed.values() for i in mine)
    assert sorted(counts) == sorted(ids)
    assert set(counts.values()) == {1}
    status = store.job(job_id)
    assert (status.running, status.pending) == (50, 0)
    assert all(im.attempts == 1 for im in store.images(job_id))


def test_concurrent_results_keep_counters_exact(store):
    job_id, ids = new_job(store, 40)
    errors = []

    def worker(part: list[int]):
        try:
            for i in part:
                process(store, i, [{"category_id": i % 3 + 1, "area": 2}], fail=(i % 4 == 0))
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(ids[k::4],)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    status = store.job(job_id)
    n_failed = sum(1 for i in ids if i % 4 == 0)
    assert (status.succeeded, status.failed, status.pending, status.running) == (40 - n_failed, n_failed, 0, 0)
    assert status.state == ("partial" if 0 < n_failed < 40 else "succeeded")
    assert sum(s["images"] for s in store.class_stats(job_id)) == 40 - n_failed


def test_timestamps_are_utc(store):
    job_id, ids = new_job(store, 1)
    claimed = store.claim(ids[0], "t", 30)
    assert claimed is not None
    image = store.image(ids[0])
    assert image.lease_expires_at.tzinfo is not None
    assert image.lease_expires_at.astimezone(timezone.utc) > image.updated_at
    assert 29 <= (image.lease_expires_at - image.updated_at).total_seconds() <= 31
    status = store.job(job_id)
    assert status.created_at <= status.started_at


def test_a_password_in_a_weights_url_is_never_stored(store):
    """submit refuses such URLs; the store masks them anyway for any other caller."""
    job_id, _ = new_job(store, weights="https://reader:s3cret@host/detr.pth")
    assert store.job(job_id).weights == "https://reader:***@host/detr.pth"


def test_images_failed_at_submission_count_and_can_be_kept_failed_by_retry(store):
    job_id = store.create_job(name="t", source="s3://in/p", dest="s3://out/s", model="detr-r50", weights="random",
                              threshold=0.85, min_size=800, max_size=1333)
    ids = [i for batch in store.add_images(job_id, entries(3)) for i in batch]
    failed = store.add_failed_images(job_id, [("a.png", "s3://in/p/a.png", "e1", 5, "output conflict: a.jpg"),
                                              ("b.png", "s3://in/p/b.png", None, None, "x" * 30_000)])
    assert len(failed) == 2 and not set(failed) & set(ids)
    assert store.add_failed_images(job_id, [("a.png", "s3://in/p/a.png", "e1", 5, "again")]) == []   # known key
    store.finalize_submission(job_id)
    status = store.job(job_id)
    assert (status.total, status.failed, status.pending, status.state) == (5, 2, 3, "pending")
    errors = {r.key: r.error for r in store.images(job_id, state="failed")}
    assert errors["a.png"] == "output conflict: a.jpg" and errors["b.png"].endswith("… (truncated)")
    for image_id in ids:
        process(store, image_id)
    assert store.job(job_id).state == "partial"
    assert store.reset_failed(job_id, unless_error_starts="output conflict:") == [failed[1]]
    status = store.job(job_id)
    assert (status.failed, status.pending, status.state) == (1, 1, "running")
