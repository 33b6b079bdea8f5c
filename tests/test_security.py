"""Security: outputs stay inside DEST, DEST never overlaps SOURCE, credentials never land in the
database, logs, outputs or `status`, the broker refuses pickle, and SQL is never built as text.

End-to-end parts run the real CLI on SeaweedFS, Redis and PostgreSQL like tests/test_pipeline.py.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import secrets
import subprocess
import time
import unicodedata
import uuid
from pathlib import Path

import boto3
import numpy as np
import pytest
from PIL import Image
from sqlalchemy import MetaData, create_engine, select
from sqlalchemy.engine import make_url

from scheduler.submit import SubmitError, check_locations, check_weights_source
from storage import objects
from storage.jobs import JobStore
from tests.test_pipeline import MODEL_ARGS, REDIS_URL, cli, exe, start_worker, stop_worker, wait_finished
from worker.output import output_stem

REPO_ROOT = Path(__file__).resolve().parents[1]


def jpeg(width=40, height=30, seed=0) -> bytes:
    buffer = io.BytesIO()
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


# --------------------------------------------------------------------------------------------
# Output keys cannot escape DEST

@pytest.mark.parametrize("key, stem", [
    ("a/b.jpg", "a/b"),
    ("a//b.jpg", "a/b"),                      # empty components collapse
    ("/abs.jpg", "abs"),                      # a leading "/" is one more empty component
    ("./x/./y.png", "x/y"),
    ("e\u0301t\u00e9.jpg", "\u00e9t\u00e9"),  # NFC: decomposed é → composed é
    ("x.tar.jpg", "x.tar"),
    (".hidden.jpg", ".hidden"),
    ("sp ace/ünï cödé.webp", "sp ace/ünï cödé"),
])
def test_output_stem_normalises(key, stem):
    assert output_stem(key) == stem
    assert unicodedata.is_normalized("NFC", output_stem(key))


@pytest.mark.parametrize("key, message", [
    ("a/../../x.jpg", "'..' would put its outputs outside DEST"),
    ("../x.jpg", "'..' would put its outputs outside DEST"),
    ("a/..", "'..' would put its outputs outside DEST"),
    ("ctl\x01.jpg", "U+0001"),
    ("nul\x00.jpg", "U+0000"),
    ("new\nline.jpg", "U+000A"),
    ("tab\t.jpg", "U+0009"),
    ("del\x7f.jpg", "U+007F"),
    ("c1\x85.jpg", "U+0085"),
    ("x\u202egnp.jpg", "U+202E"),             # right-to-left override: shows as "xgpj.png"
    ("back\\slash.jpg", "backslash"),
    ("..\\..\\x.jpg", "backslash"),
    ("", "no file name"),
    ("/", "no file name"),
    ("a/..jpg", "no file name"),
])
def test_output_stem_refuses_unsafe_keys(key, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        output_stem(key)


def test_join_refuses_escapes_and_outputs_stay_inside_a_local_dest(tmp_path):
    dest = tmp_path / "out"
    for relative in ("../x.png", "a/../../x.png", "/etc/x.png", ".."):
        with pytest.raises(ValueError):
            objects.join(str(dest), relative)
    keys = ["a/b.jpg", "a//b.jpg", "/abs.jpg", "a/../../x.jpg", "..\\x.jpg", "e\u0301.jpg", "a/...jpg",
            "x/./../y.jpg", "\u2024\u2024/x.jpg", "\uff0e\uff0e/x.jpg", "%2e%2e/x.jpg"]
    for key in keys:
        try:
            stem = output_stem(key)
        except ValueError:
            continue
        path = Path(objects.join(str(dest), stem + ".png"))
        assert os.path.commonpath([os.path.realpath(path), os.path.realpath(dest)]) == os.path.realpath(dest), key
        objects.write_bytes(str(path), b"x")
    written = {p for p in tmp_path.rglob("*") if p.is_file()}
    assert written and all(dest in p.parents for p in written)


# --------------------------------------------------------------------------------------------
# DEST may not overlap SOURCE

@pytest.mark.parametrize("source, dest", [
    ("s3://b/in", "s3://b/in"),               # equal
    ("s3://b/in/", "s3://b/in"),
    ("s3://b/in", "s3://b/in/out"),           # inside
    ("s3://b/in", "s3://b"),                  # parent (the whole bucket)
    ("s3://b", "s3://b/out"),
    ("S3://b/in", "s3://b/in/out"),           # the scheme's case does not matter
    ("s3://b/in", "s3://b//in/out"),          # nor do doubled slashes
])
def test_s3_overlaps_are_refused(source, dest):
    with pytest.raises(SubmitError, match="overlaps SOURCE"):
        check_locations(source, dest)


@pytest.mark.parametrize("source, dest", [
    ("s3://b/in", "s3://b/in2"), ("s3://b/in", "s3://b/out"), ("s3://b/in", "s3://c/in"), ("s3://b/in", "/b/in"),
])
def test_s3_neighbours_are_allowed(source, dest):
    check_locations(source, dest)


def test_local_overlaps_are_refused(tmp_path):
    source = tmp_path / "in"
    (source / "sub").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "link-into-source").symlink_to(source / "sub")
    (tmp_path / "link-to-source").symlink_to(source)
    for dest in (source, source / "out", tmp_path, tmp_path / "link-into-source", f"file://{source}/x"):
        with pytest.raises(SubmitError, match="overlaps SOURCE"):
            check_locations(objects.normalize(str(source)), objects.normalize(str(dest)))
    with pytest.raises(SubmitError, match="overlaps SOURCE"):
        check_locations(objects.normalize(str(tmp_path / "link-to-source")), objects.normalize(str(source / "o")))
    check_locations(str(source), str(tmp_path / "in2"))
    check_locations(str(source), str(tmp_path / "elsewhere"))


GCS_V4_SIGNED = ("https://storage.googleapis.com/models/detr.pth?X-Goog-Algorithm=GOOG4-RSA-SHA256"
                 "&X-Goog-Credential=svc%40proj.iam.gserviceaccount.com%2F20260101%2Fauto%2Fstorage%2Fgoog4_request"
                 "&X-Goog-Date=20260101T000000Z&X-Goog-Expires=900&X-Goog-SignedHeaders=host"
                 "&X-Goog-Signature=5ecre7a11ce5ecre7")
# Secrets in every place a URL can carry one, under names no list would know.
SECRET_WEIGHTS_URLS = [GCS_V4_SIGNED, "https://host/detr.pth?key=AIza5ecre7", "https://user:5ecre7@host/detr.pth",
                       "https://5ecre7@host/detr.pth", "https://host/detr.pth?X-Amz-Signature=5ecre7",
                       "https://host/detr.pth?v=2&whatever=5ecre7", "https://u:pa/5ecre7@host/detr.pth",
                       "file:///models/detr.pth?token=5ecre7", "s3://bucket/detr.pth?sig=5ecre7"]


@pytest.mark.parametrize("weights", SECRET_WEIGHTS_URLS)
def test_weights_urls_with_a_query_or_userinfo_are_refused_for_jobs(weights):
    with pytest.raises(SubmitError, match="cannot be given to a job") as raised:
        check_weights_source(weights)
    message = str(raised.value)
    assert "5ecre7" not in message and "svc%40proj" not in message
    assert all(word in message for word in ("local path", "s3://", "https://", "official"))   # the alternatives
    for fine in ("official", "random", "s3://bucket/detr.pth", "/models/detr.pth", "https://host/detr.pth",
                 "https://host:8443/models/a@2x.pth"):
        check_weights_source(fine)


def test_jobs_refuse_secret_weights_urls_and_predict_keeps_them_out_of_its_output(tmp_path):
    """submit and run refuse a signed weights URL before recording anything, and print nothing of
    the secret; predict downloads through one (the server ignores the query) and prints nothing
    of it either, nor when the download fails."""
    import functools
    import http.server
    import threading

    import torch

    from worker.model import create_model

    (tmp_path / "served").mkdir()
    torch.save({"model": create_model("detr-r50", seed=1).state_dict()}, tmp_path / "served" / "detr.pth")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / "served"))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jpg").write_bytes(jpeg())
    database = tmp_path / "jobs.db"
    env = dict(os.environ, PANOPTIC_DATABASE_URL=f"sqlite:///{database}", PANOPTIC_BROKER_URL=REDIS_URL,
               TORCH_HOME=str(tmp_path / "torch-home"))
    signed = GCS_V4_SIGNED.replace("https://storage.googleapis.com/models", base)
    model_args = [a if a != "random" else signed for a in MODEL_ARGS]
    try:
        outputs = []
        for command in ("submit", "run"):
            result = cli(command, str(tmp_path / "in"), "--dest", str(tmp_path / "out"), *model_args, env=env)
            assert result.returncode != 0 and "cannot be given to a job" in result.stderr, result.stderr
            outputs += [result.stdout, result.stderr]
        assert JobStore(env["PANOPTIC_DATABASE_URL"]).jobs() == []          # nothing recorded
        predicted = cli("predict", str(tmp_path / "in" / "a.jpg"), "--out", str(tmp_path / "pred"), *model_args,
                        env=env)
        assert predicted.returncode == 0, predicted.stderr
        assert json.loads((tmp_path / "pred" / "a.json").read_text())["segments_info"] is not None
        missing = cli("predict", str(tmp_path / "in" / "a.jpg"), "--out", str(tmp_path / "pred"),
                      *[a.replace("/detr.pth", "/missing.pth") for a in model_args], env=env)
        assert missing.returncode != 0 and "cannot download weights from" in missing.stderr, missing.stderr
        assert "missing.pth?…" in missing.stderr
        outputs += [predicted.stdout, predicted.stderr, missing.stdout, missing.stderr]
    finally:
        server.shutdown()
    stored = database.read_bytes() if database.exists() else b""
    for text in outputs + [stored.decode("latin-1")] + [p.name for p in tmp_path.rglob("*")]:
        assert "5ecre7" not in text and "svc%40proj" not in text


def test_submit_refuses_overlapping_s3_dest(s3_server, s3_bucket, tmp_path):
    boto3.client("s3").put_object(Bucket=s3_bucket, Key="in/a.jpg", Body=jpeg())
    env = dict(os.environ, PANOPTIC_DATABASE_URL=f"sqlite:///{tmp_path / 'db.sqlite'}", PANOPTIC_BROKER_URL=REDIS_URL)
    result = cli("submit", f"s3://{s3_bucket}/in", "--dest", f"s3://{s3_bucket}/in/out", "--queue",
                 f"never-{uuid.uuid4().hex[:8]}", *MODEL_ARGS, env=env)
    assert result.returncode != 0 and "overlaps SOURCE" in result.stderr, result.stderr
    assert JobStore(env["PANOPTIC_DATABASE_URL"]).jobs() == []          # no job was recorded


# --------------------------------------------------------------------------------------------
# Hostile file names on a local DEST: the image fails, nothing is written outside DEST

def test_run_with_hostile_file_names_stays_inside_dest(tmp_path):
    source, dest = tmp_path / "in", tmp_path / "out"
    names = {"ok.jpg": None, "back\\slash.jpg": "backslash", "tab\t.jpg": "U+0009",
             "sub/e\u0301.jpg": None, "x\u202egnp.jpg": "U+202E"}
    for name in names:
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        (source / name).write_bytes(jpeg())
    before = {p for p in tmp_path.rglob("*")}
    env = {k: v for k, v in os.environ.items() if k not in ("PANOPTIC_DATABASE_URL", "PANOPTIC_BROKER_URL")}
    result = subprocess.run([exe(), "run", str(source), "--dest", str(dest), *MODEL_ARGS], capture_output=True,
                            text=True, env=env, cwd=tmp_path, timeout=300)
    assert result.returncode == 1, result.stderr
    new = {p for p in tmp_path.rglob("*")} - before
    outside = {p for p in new if dest not in p.parents and p != dest and not p.name.startswith("panoptic-batch.db")}
    assert not outside
    assert {str(p.relative_to(dest)) for p in new if p.is_file() and dest in p.parents} == \
        {"ok.png", "ok.json", "sub/\u00e9.png", "sub/\u00e9.json"}
    for name, message in names.items():
        if message:
            assert message in result.stderr and "unsafe image key" in result.stderr


# --------------------------------------------------------------------------------------------
# The broker accepts JSON only

def test_broker_accepts_json_only():
    from worker.queue import app
    assert list(app.conf.accept_content) == ["json"]
    assert app.conf.task_serializer == "json" and app.conf.result_serializer == "json"


class _MakeDirectoryWhenUnpickled:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def send_pickle_task(queue: str, marker: str) -> None:
    """A raw Celery protocol-2 message for our task whose body is a pickle that creates `marker`."""
    from kombu import Connection, Exchange, Queue

    from worker.queue import TASK_NAME
    task_id = str(uuid.uuid4())
    body = pickle.dumps(((_MakeDirectoryWhenUnpickled(marker),), {}, {"callbacks": None, "errbacks": None,
                                                                      "chain": None, "chord": None}))
    headers = {"lang": "py", "task": TASK_NAME, "id": task_id, "root_id": task_id, "parent_id": None,
               "group": None, "argsrepr": "(pickle)", "kwargsrepr": "{}", "retries": 0, "eta": None,
               "expires": None, "timelimit": [None, None]}
    with Connection(REDIS_URL) as connection:
        connection.Producer().publish(body, exchange="", routing_key=queue, serializer=None, headers=headers,
                                      content_type="application/x-python-serialize", content_encoding="binary",
                                      declare=[Queue(queue, Exchange(queue), routing_key=queue)])


def delete_queue(queue: str) -> None:
    import redis
    client = redis.Redis.from_url(REDIS_URL)
    for key in list(client.scan_iter(match=f"{queue}*")) + list(client.scan_iter(match=f"_kombu.binding.{queue}")):
        client.delete(key)


# --------------------------------------------------------------------------------------------
# End to end: credentials never leak, hostile keys fail alone, pickle is refused

def test_secrets_keys_and_pickle_end_to_end(s3_server, s3_bucket, pg_database_url, tmp_path):
    db_url = make_url(pg_database_url)
    if db_url.password:                        # a server that needs one: use it as the secret
        db_secret = db_url.password
    else:                                      # trust authentication ignores a password we add
        db_secret = "dbpw-" + secrets.token_hex(6)
        db_url = db_url.set(password=db_secret, username=db_url.username or "postgres")
    broker_secret = "brokerpw-" + secrets.token_hex(6)
    weights_secret = "weightspw-" + secrets.token_hex(6)
    # Redis's default user has no password ("nopass"): AUTH default <anything> succeeds.
    broker_url = REDIS_URL.replace("redis://", f"redis://default:{broker_secret}@")
    queue, idle_queue = f"test-{uuid.uuid4().hex[:8]}", f"test-idle-{uuid.uuid4().hex[:8]}"
    env = dict(os.environ, PANOPTIC_DATABASE_URL=db_url.render_as_string(hide_password=False),
               PANOPTIC_BROKER_URL=broker_url, PYTHONUNBUFFERED="1")
    all_secrets = [db_secret, broker_secret, weights_secret, s3_server.secret_key]

    s3 = boto3.client("s3")
    good = {"ok.jpg": "ok", "sub/dir/ok2.jpg": "sub/dir/ok2", "e\u0301t\u00e9.jpg": "\u00e9t\u00e9"}
    hostile = {"ctl\x01.jpg": "U+0001", "new\nline.jpg": "U+000A", "x\u202egnp.jpg": "U+202E", "del\x7f.jpg": "U+007F"}
    for i, key in enumerate([*good, *hostile]):
        s3.put_object(Bucket=s3_bucket, Key=f"in/{key}", Body=jpeg(seed=i))

    submitted = cli("submit", f"s3://{s3_bucket}/in", "--dest", f"s3://{s3_bucket}/out", "--queue", queue,
                    "--chunk-size", "4", *MODEL_ARGS, env=env)
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip().splitlines()[-1]
    weights_url = f"https://reader:{weights_secret}@127.0.0.1:9/detr.pth?token={weights_secret}"
    try:
        idle = cli("submit", f"s3://{s3_bucket}/in", "--dest", f"s3://{s3_bucket}/elsewhere", "--queue", idle_queue,
                   *MODEL_ARGS, "--weights", weights_url, env=env)
    finally:
        delete_queue(idle_queue)              # its chunks are never processed
    # refused (a job's weights are read back by workers, and secrets are never stored), saying so
    assert idle.returncode != 0 and "cannot be given to a job" in idle.stderr, idle.stderr
    assert "https://…@127.0.0.1:9/detr.pth?…" in idle.stderr     # named without its userinfo and query
    assert "default:***@" in submitted.stdout  # the broker is named, its password masked

    marker = tmp_path / "unpickled"
    worker = start_worker(env, queue, tmp_path / "worker.log")
    try:
        send_pickle_task(queue, str(marker))
        status = wait_finished(job_id, env, timeout=300)
        deadline = time.monotonic() + 30
        while "Refusing to deserialize" not in (tmp_path / "worker.log").read_text(errors="replace"):
            assert time.monotonic() < deadline, "the worker never refused the pickle message"
            time.sleep(0.5)
        alive = worker.poll() is None
    finally:
        stop_worker(worker)
        delete_queue(queue)
    log = (tmp_path / "worker.log").read_text(errors="replace")
    assert alive, log[-3000:]
    assert "untrusted content of type pickle" in log
    assert not marker.exists()                 # refused, never unpickled…
    pickle.loads(pickle.dumps(_MakeDirectoryWhenUnpickled(str(marker))))
    assert marker.is_dir()                     # …though unpickling it would have run its code

    # hostile keys fail alone, with a clear reason; the rest succeed, NFC-named
    assert (status["state"], status["succeeded"], status["failed"]) == ("partial", len(good), len(hostile))
    rows = {row.key: row for row in JobStore(pg_database_url).images(job_id)}
    for key, code in hostile.items():
        assert rows[key].state == "failed" and "unsafe image key" in rows[key].error and code in rows[key].error
    listed = {o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=s3_bucket)
              for o in page.get("Contents", [])}
    outputs = {k for k in listed if not k.startswith("in/")}
    assert outputs == {f"out/{stem}{ext}" for stem in good.values() for ext in (".png", ".json")}

    # credentials: nowhere in the database, the CLI's output, the worker's log or the outputs
    status_all = cli("status", "--json", env=env)
    assert status_all.returncode == 0, status_all.stderr
    weights = {s["id"]: s["weights"] for s in json.loads(status_all.stdout)}
    assert weights == {job_id: "random"}                # no job for the refused submission
    texts = {"submit": submitted.stdout + submitted.stderr, "submit idle": idle.stdout + idle.stderr,
             "status --json": status_all.stdout + status_all.stderr, "worker log": log}
    engine = create_engine(make_url(pg_database_url).set(drivername="postgresql+psycopg"))
    try:
        metadata = MetaData()
        metadata.reflect(engine)
        with engine.connect() as connection:
            for table in metadata.sorted_tables:
                texts[f"table {table.name}"] = "\n".join(repr(tuple(row)) for row in connection.execute(select(table)))
    finally:
        engine.dispose()
    for key in outputs:
        texts[key] = s3.get_object(Bucket=s3_bucket, Key=key)["Body"].read().decode("latin-1")
    for where, text in texts.items():
        for secret in all_secrets:
            assert secret not in text, f"a secret appears in {where}"


# --------------------------------------------------------------------------------------------
# SQL is never built as text

# The only raw SQL in the code base: SQLite connection setup with constant statements.
RAW_SQL_ALLOWED = {
    ("storage/db.py", 'cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_S * 1000}")'),
    ("storage/db.py", 'cursor.execute("PRAGMA journal_mode = WAL")'),
    ("storage/db.py", 'cursor.execute("PRAGMA foreign_keys = ON")'),
    ("storage/db.py", 'conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get(WRITE_OPTION) '
                      'else "BEGIN")'),
    # Constant DDL: SQLite adds a foreign key only with its column, which alembic cannot express.
    ("storage/migrations/versions/0003_label_maps.py",
     'op.execute("ALTER TABLE jobs ADD COLUMN label_map_sha256 VARCHAR(64) REFERENCES label_maps (sha256)")'),
}
# text( as a bare name or sqlalchemy's (sa.text, sqlalchemy.text), not a method such as Pillow's draw.text(.
RAW_SQL = re.compile(r"""(?:(?<![\w.])|\bsa\.|\bsqlalchemy\.)text\s*\(|exec_driver_sql\s*\(|\.execute\s*\(\s*[rbfu]*["']|\bop\.execute\s*\(|"""
                     r"""\.executescript\s*\(|sql\.SQL\s*\(""")


def test_no_sql_is_built_from_strings():
    found = set()
    for folder in ("storage", "scheduler", "worker", "bench"):
        for path in sorted((REPO_ROOT / folder).rglob("*.py")):
            for line in path.read_text(encoding="utf-8").splitlines():
                if RAW_SQL.search(line):
                    found.add((str(path.relative_to(REPO_ROOT)), line.strip()))
    assert found <= RAW_SQL_ALLOWED, "raw SQL outside the ORM (use bound parameters):\n" + \
        "\n".join(f"{p}: {l}" for p, l in sorted(found - RAW_SQL_ALLOWED))
