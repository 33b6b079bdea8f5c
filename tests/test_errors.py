"""The common mistakes, as a user makes them through the console script: one line on stderr that
says what was wrong and what to do, no traceback, the documented exit code (README, "Exit
codes"), within seconds, and nothing recorded in the job database."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from PIL import Image
from sqlalchemy import text

from scheduler import errors
from scheduler.submit import JobSpec, SubmitStopped, submit
from storage import db as storage_db
from storage.jobs import JobStore
from tests.test_jobs_db import NEWER_REVISION, migrated_by_a_newer_version

REDIS_URL = "redis://127.0.0.1:6379/0"
# Generous: the point is seconds, not the 8-40 s of connection retries these mistakes took.
# Commands that load no model never import torch; some of these do, and the machine may be busy.
FAST_S = 20.0


def panoptic_batch(*args, env, cwd):
    exe = shutil.which("panoptic-batch", path=os.path.dirname(sys.executable)) or shutil.which("panoptic-batch")
    assert exe, "the panoptic-batch console script is not installed"
    started = time.monotonic()
    result = subprocess.run([exe, *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=300)
    return result, time.monotonic() - started


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def redis_with_password(tmp_path_factory):
    """A private redis-server that wants a password (the shared one on 6379 has none)."""
    directory = tmp_path_factory.mktemp("redis-auth")
    port = free_port()
    process = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                "--appendonly", "no", "--dir", str(directory), "--requirepass", "right-password"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                if s.recv(64):
                    break
        except OSError:
            pass
        assert process.poll() is None and time.monotonic() < deadline, "redis-server did not start"
        time.sleep(0.05)
    try:
        yield port
    finally:
        process.terminate()
        process.wait(10)


@pytest.fixture(scope="module")
def silent_port():
    """A port that accepts connections and never answers (a hung server, a wrong port behind a proxy)."""
    import threading
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    accepted = []

    def accept_forever():
        while True:
            try:
                accepted.append(server.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept_forever, daemon=True).start()
    try:
        yield server.getsockname()[1]
    finally:
        server.close()
        for connection in accepted:
            connection.close()


def write_images(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (64, 48), (200, 30, 30)).save(folder / "a.jpg")
    Image.new("RGB", (48, 64), (30, 200, 30)).save(folder / "b.png")


def r101_names_checkpoint(path: Path) -> Path:
    """A file with DETR-R101's distinctive parameter names (values do not matter to the check)."""
    torch.save({"model": {"detr.class_embed.weight": torch.zeros(1),
                          "detr.backbone.0.body.layer3.22.conv1.weight": torch.zeros(1)}}, path)
    return path


MODEL = ["--model", "detr-r50", "--min-size", "64", "--max-size", "96", "--device", "cpu"]
CLOSED_PORT = 1      # nothing listens on port 1 here


def mistakes(tmp_path: Path, s3_bucket: str, redis_port: int, silent: int) -> list[tuple]:
    """(what, args, extra environment, exit code, words the line must hold)."""
    checkpoint = r101_names_checkpoint(tmp_path / "r101.pth")
    random = ["--weights", "random", *MODEL]
    newer = f"sqlite:///{tmp_path / 'newer.db'}"
    migrated_by_a_newer_version(newer)
    return [
        ("a database migrated by a newer panoptic-batch", ["status"], {"PANOPTIC_DATABASE_URL": newer},
         errors.EXIT_DATABASE, [f"revision {NEWER_REVISION}", "newer than this panoptic-batch", "install that version"]),
        ("a SOURCE folder that does not exist", ["run", "missing", "--dest", "out", *random], {},
         errors.EXIT_NO_IMAGES, ["SOURCE", "missing", "does not exist"]),
        ("a bucket that does not exist", ["submit", f"s3://{s3_bucket}-nope/in", "--dest", "out", *random], {},
         errors.EXIT_NO_IMAGES, ["does not exist", f"{s3_bucket}-nope"]),
        ("a mistyped prefix: no images", ["submit", f"s3://{s3_bucket}/typo", "--dest", "out", *random], {},
         errors.EXIT_NO_IMAGES, ["no images under SOURCE", "typo", "nothing was recorded"]),
        ("an --include that matches nothing", ["run", "in", "--dest", "out", "--include", "*.JPEG", *random], {},
         errors.EXIT_NO_IMAGES, ["no images under SOURCE", "--include *.JPEG"]),
        ("a SOURCE that is a file", ["run", "in/a.jpg", "--dest", "out", *random], {},
         errors.EXIT_NO_IMAGES, ["SOURCE", "a.jpg", "is a file, not a folder"]),
        ("a DEST that is a file", ["submit", "in", "--dest", "notes.txt", *random], {},
         errors.EXIT_USAGE, ["--dest", "notes.txt", "is a file, not a folder"]),
        ("s3:/bucket", ["run", "s3:/bucket/in", "--dest", "out", *random], {},
         errors.EXIT_USAGE, ["mistyped S3 URI", "s3://bucket/in"]),
        ("s3//bucket", ["submit", "s3//bucket/in", "--dest", "out", *random], {},
         errors.EXIT_USAGE, ["mistyped S3 URI", "s3://bucket/in"]),
        ("a DEST typed s3:bucket", ["run", "in", "--dest", "s3:bucket/out", *random], {},
         errors.EXIT_USAGE, ["--dest", "mistyped S3 URI", "s3://bucket/out"]),
        ("the database down", ["status"],
         {"PANOPTIC_DATABASE_URL": f"postgresql://u:db-secret@127.0.0.1:{CLOSED_PORT}/x"},
         errors.EXIT_DATABASE, ["cannot use the database", "u:***@127.0.0.1", "PANOPTIC_DATABASE_URL"]),
        ("the database down at run", ["run", "in", "--dest", "out", *random],
         {"PANOPTIC_DATABASE_URL": f"postgresql://u@127.0.0.1:{CLOSED_PORT}/x"},
         errors.EXIT_DATABASE, ["cannot use the database"]),
        ("a database that never answers", ["status"], {"PANOPTIC_DATABASE_URL": f"postgresql://u@127.0.0.1:{silent}/x"},
         errors.EXIT_DATABASE, ["cannot use the database", "timeout"]),
        ("a database URL that is not one", ["stats", "abcd"], {"PANOPTIC_DATABASE_URL": "postgres:/nohost"},
         errors.EXIT_USAGE, ["PANOPTIC_DATABASE_URL is not a database URL"]),
        ("a SQLite file in a folder that cannot exist", ["status"],
         {"PANOPTIC_DATABASE_URL": "sqlite:////proc/no-such-folder/jobs.db"},
         errors.EXIT_DATABASE, ["cannot use the database", "folder"]),
        ("the broker down at submit", ["submit", "in", "--dest", "out", *random],
         {"PANOPTIC_BROKER_URL": f"redis://127.0.0.1:{CLOSED_PORT}/0"},
         errors.EXIT_BROKER, ["cannot reach the broker", "PANOPTIC_BROKER_URL", "refused"]),
        ("a broker that never answers", ["submit", "in", "--dest", "out", *random],
         {"PANOPTIC_BROKER_URL": f"redis://127.0.0.1:{silent}/0"}, errors.EXIT_BROKER, ["cannot reach the broker"]),
        ("the broker's password wrong", ["submit", "in", "--dest", "out", *random],
         {"PANOPTIC_BROKER_URL": f"redis://:wrong-password@127.0.0.1:{redis_port}/0"},
         errors.EXIT_BROKER, ["cannot reach the broker", ":***@127.0.0.1", "password"]),
        ("no broker password", ["submit", "in", "--dest", "out", *random],
         {"PANOPTIC_BROKER_URL": f"redis://127.0.0.1:{redis_port}/0"},
         errors.EXIT_BROKER, ["cannot reach the broker", "Authentication required"]),
        ("the broker down at reap", ["reap"], {"PANOPTIC_BROKER_URL": f"redis://127.0.0.1:{CLOSED_PORT}/0"},
         errors.EXIT_BROKER, ["cannot reach the broker"]),
        ("S3 unreachable", ["submit", "s3://bucket/in", "--dest", "out", *random],
         {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{CLOSED_PORT}"},
         errors.EXIT_OBJECT_STORE, ["cannot read SOURCE", "Could not connect", "AWS_"]),
        ("official weights offline, at submit", ["submit", "in", "--dest", "out", *MODEL], {},
         errors.EXIT_WEIGHTS, ["official weights of detr-r50", "not in the cache", "copy it"]),
        ("official weights offline, at run", ["run", "in", "--dest", "out", *MODEL], {},
         errors.EXIT_WEIGHTS, ["official weights of detr-r50", "not in the cache"]),
        ("a weights path that does not exist", ["submit", "in", "--dest", "out", "--weights", "nope.pth", *MODEL], {},
         errors.EXIT_WEIGHTS, ["weights file", "nope.pth", "does not exist"]),
        ("a weights path that does not exist, at run", ["run", "in", "--dest", "out", "--weights", "nope.pth", *MODEL],
         {}, errors.EXIT_WEIGHTS, ["weights file", "nope.pth", "does not exist"]),
        ("a weights object that does not exist", ["submit", "in", "--dest", "out", "--weights",
                                                   f"s3://{s3_bucket}/nope.pth", *MODEL], {},
         errors.EXIT_WEIGHTS, ["cannot read --weights", "nope.pth"]),
        ("another variant's checkpoint", ["submit", "in", "--dest", "out", "--weights", str(checkpoint), *MODEL], {},
         errors.EXIT_WEIGHTS, ["holds a detr-r101 checkpoint, not detr-r50", "--model detr-r101"]),
        ("another variant's checkpoint, at run", ["run", "in", "--dest", "out", "--weights", str(checkpoint), *MODEL],
         {}, errors.EXIT_WEIGHTS, ["holds a detr-r101 checkpoint, not detr-r50"]),
        ("a control character in SOURCE", ["run", "in\x1b[2Jx", "--dest", "out", *random], {},
         errors.EXIT_NO_IMAGES, ["in\\x1b[2Jx", "does not exist"]),
    ]


def test_each_common_mistake_is_one_line_with_its_exit_code_and_records_nothing(tmp_path, s3_bucket,
                                                                                 redis_with_password, silent_port):
    write_images(tmp_path / "in")
    (tmp_path / "notes.txt").write_text("a file, not a folder")
    database = f"sqlite:///{tmp_path / 'jobs.db'}"
    base = dict(os.environ, PANOPTIC_DATABASE_URL=database, PANOPTIC_BROKER_URL=REDIS_URL,
                TORCH_HOME=str(tmp_path / "empty-torch-home"),
                # Offline, as on this project's machines, whatever the machine running the tests can reach.
                https_proxy=f"http://127.0.0.1:{CLOSED_PORT}", HTTPS_PROXY=f"http://127.0.0.1:{CLOSED_PORT}")
    table = mistakes(tmp_path, s3_bucket, redis_with_password, silent_port)
    # Four at a time: the table's time is mostly interpreter start-ups and the two timeouts, which
    # a second core and each other's waits overlap (each command still has to fail within FAST_S).
    with ThreadPoolExecutor(4) as pool:
        outcomes = list(pool.map(lambda row: panoptic_batch(*row[1], env={**base, **row[2]}, cwd=tmp_path), table))
    problems = []
    for (what, args, extra, code, words), (result, seconds) in zip(table, outcomes):
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        checks = {
            f"exit code {code}": result.returncode == code,
            "one line on stderr": len(lines) == 1,
            "no traceback": "Traceback" not in result.stderr,
            "says what was wrong": all(word in result.stderr for word in words),
            f"fails within {FAST_S:.0f} s": seconds < FAST_S,
            "no secret": "secret" not in result.stderr and "wrong-password" not in result.stderr,
        }
        failed = [name for name, ok in checks.items() if not ok]
        if failed:
            problems.append(f"{what}: {', '.join(failed)} (exit {result.returncode}, {seconds:.1f} s): "
                            f"{result.stderr[-1500:]!r}")
    assert not problems, "\n".join(problems)
    assert JobStore(database).jobs() == [], "a refused command recorded a job"
    assert not (tmp_path / "out").exists() and not (tmp_path / "s3:bucket").exists()


def test_run_with_unloadable_weights_refuses_before_recording(tmp_path):
    """Weights that pass the cheap checks but cannot load: `run` loads the model first."""
    write_images(tmp_path / "in")
    (tmp_path / "corrupt.pth").write_bytes(b"not a checkpoint at all" * 100)
    database = f"sqlite:///{tmp_path / 'jobs.db'}"
    env = dict(os.environ, PANOPTIC_DATABASE_URL=database)
    result, _ = panoptic_batch("run", "in", "--dest", "out", "--weights", "corrupt.pth", *MODEL, env=env, cwd=tmp_path)
    assert result.returncode == errors.EXIT_WEIGHTS, result.stderr
    assert "not a loadable PyTorch checkpoint" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert JobStore(database).jobs() == []


def test_run_loads_the_model_once_and_a_rerun_with_nothing_changed_exits_0(tmp_path, monkeypatch):
    """The model loaded before recording is the one that processes the images; a nightly re-run
    where every image is unchanged is a success (exit 0), not a SOURCE without images."""
    from click.testing import CliRunner

    from scheduler.cli import main
    from worker import pipeline

    loads = []
    real = pipeline.Predictor

    class CountedPredictor(real):
        def __init__(self, *args, **kwargs):
            loads.append(1)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(pipeline, "Predictor", CountedPredictor)
    write_images(tmp_path / "in")
    monkeypatch.setenv("PANOPTIC_DATABASE_URL", f"sqlite:///{tmp_path / 'jobs.db'}")
    args = ["run", str(tmp_path / "in"), "--dest", str(tmp_path / "out"), "--weights", "random", *MODEL]
    first = CliRunner().invoke(main, args)
    assert first.exit_code == 0, first.output
    assert len(loads) == 1
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0 and "2 unchanged images skipped" in again.output, again.output
    storage_db.dispose_all()


# --------------------------------------------------------------------------------------------
# A submission stopped after its job was recorded (issue 15 item 8): no job left pending forever



def _broker_fails_after(chunks_sent: int):
    """An enqueue that sends `chunks_sent` chunks and then fails as kombu does when the broker
    goes away for longer than its send retries."""
    from kombu.exceptions import OperationalError
    sent = []

    def enqueue(job_id, ids):
        if len(sent) >= chunks_sent:
            raise OperationalError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")
        sent.append(list(ids))
    return enqueue, sent


def _spec(tmp_path) -> JobSpec:
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(5):
        Image.new("RGB", (8, 8), (i, 0, 0)).save(folder / f"img{i}.png")
    return JobSpec(source=str(folder), dest=str(tmp_path / "out"), model="detr-r50", weights="random",
                   threshold=0.85, min_size=800, max_size=1333, chunk_size=2,
                   config={"chunk_size": 2, "queue": f"test-{uuid.uuid4().hex[:8]}"})


def test_a_submit_whose_broker_fails_before_anything_is_queued_leaves_no_job(db_url, tmp_path):
    store = JobStore(db_url)
    enqueue, _ = _broker_fails_after(0)
    with pytest.raises(SubmitStopped) as stopped:
        submit(store, _spec(tmp_path), enqueue)
    assert stopped.value.exit_code == errors.EXIT_BROKER
    assert "nothing was queued and the job was removed" in str(stopped.value)
    assert store.jobs() == []
    with store.engine.connect() as conn:
        from sqlalchemy import text
        assert conn.execute(text("SELECT count(*) FROM images")).scalar() == 0


def test_a_submit_whose_broker_fails_midway_fails_the_unqueued_images_with_the_reason(db_url, tmp_path):
    store = JobStore(db_url)
    enqueue, sent = _broker_fails_after(1)
    with pytest.raises(SubmitStopped) as stopped:
        submit(store, _spec(tmp_path), enqueue)
    assert stopped.value.exit_code == errors.EXIT_BROKER and "retry" in str(stopped.value)
    (job,) = store.jobs()
    assert len(sent) == 1 and len(sent[0]) == 2
    # Every pending image failed, saying why (a chunk already queued then finds nothing to claim),
    # so the job is finished, not pending forever; `retry` queues them again.
    assert (job.total, job.pending, job.failed, job.state) == (5, 0, 5, "failed")
    assert job.submitted_at is not None and job.finished_at is not None
    failed = list(store.images(job.id, state="failed"))
    assert all(image.error.startswith("submit stopped before every chunk was queued: cannot reach the broker")
               for image in failed), [image.error for image in failed]
    token = uuid.uuid4().hex
    assert store.claim_many(sent[0], token, 60) == []            # the queued chunk takes nothing
    assert len(store.reset_failed(job.id)) == 5


def test_nothing_is_recorded_when_submit_refuses_a_broker_through_the_console_script(tmp_path, redis_with_password):
    """The console script's path, with a private Redis that wants a password."""
    write_images(tmp_path / "in")
    database = f"sqlite:///{tmp_path / 'jobs.db'}"
    for broker in (f"redis://127.0.0.1:{CLOSED_PORT}/0", f"redis://:wrong@127.0.0.1:{redis_with_password}/0"):
        env = dict(os.environ, PANOPTIC_DATABASE_URL=database, PANOPTIC_BROKER_URL=broker)
        result, seconds = panoptic_batch("submit", "in", "--dest", "out", "--weights", "random", env=env, cwd=tmp_path)
        assert result.returncode == errors.EXIT_BROKER and seconds < FAST_S, (result.stderr, seconds)
    listed, _ = panoptic_batch("status", "--json", env=dict(os.environ, PANOPTIC_DATABASE_URL=database), cwd=tmp_path)
    assert json.loads(listed.stdout) == []
    # With the right password the same submit goes through.
    queue = f"test-{uuid.uuid4().hex[:8]}"
    env = dict(os.environ, PANOPTIC_DATABASE_URL=database,
               PANOPTIC_BROKER_URL=f"redis://:right-password@127.0.0.1:{redis_with_password}/0")
    result, _ = panoptic_batch("submit", "in", "--dest", "out", "--weights", "random", "--queue", queue,
                               env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "right-password" not in result.stdout + result.stderr


def test_retry_and_reap_refuse_a_broker_that_is_down_before_changing_anything(tmp_path, redis_with_password):
    """Else retry would put the failed images back to pending with nobody to queue them. A job of
    `run` needs no broker to be retried: its images wait for the same command to run again."""
    write_images(tmp_path / "in")
    (tmp_path / "in" / "broken.jpg").write_bytes(b"\xff\xd8 not really a JPEG")
    database = f"sqlite:///{tmp_path / 'jobs.db'}"
    down = dict(os.environ, PANOPTIC_DATABASE_URL=database, PANOPTIC_BROKER_URL=f"redis://127.0.0.1:{CLOSED_PORT}/0")
    ran, _ = panoptic_batch("run", "in", "--dest", "out", "--weights", "random", *MODEL, env=down, cwd=tmp_path)
    assert ran.returncode == errors.EXIT_IMAGES_FAILED, ran.stderr              # broken.jpg failed
    run_job = ran.stdout.strip().splitlines()[-1]
    result, seconds = panoptic_batch("reap", env=down, cwd=tmp_path)
    assert result.returncode == errors.EXIT_BROKER and seconds < FAST_S, (result.stderr, seconds)
    assert "cannot reach the broker" in result.stderr and "Traceback" not in result.stderr
    assert JobStore(database).job(run_job).state == "partial"
    result, _ = panoptic_batch("retry", run_job, env=down, cwd=tmp_path)
    assert result.returncode == 0 and "run the same" in result.stdout, result.stderr

    # A job submitted through a broker that now refuses us (wrong password): nothing changes.
    broker = f"127.0.0.1:{redis_with_password}/0"
    up = dict(down, PANOPTIC_BROKER_URL=f"redis://:right-password@{broker}")
    submitted, _ = panoptic_batch("submit", "in", "--dest", "out-submitted", "--queue", f"errors-{uuid.uuid4().hex[:8]}",
                                  "--weights", "random", *MODEL, env=up, cwd=tmp_path)
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip().splitlines()[-1]
    before = JobStore(database).job(job_id)
    wrong = dict(down, PANOPTIC_BROKER_URL=f"redis://:wrong-password@{broker}")
    result, seconds = panoptic_batch("retry", job_id, env=wrong, cwd=tmp_path)
    assert result.returncode == errors.EXIT_BROKER and seconds < FAST_S, (result.stderr, seconds)
    assert "cannot reach the broker" in result.stderr and "wrong-password" not in result.stderr
    after = JobStore(database).job(job_id)
    assert (after.state, after.pending, after.failed) == (before.state, before.pending, before.failed)
