"""Shared pytest fixtures.

- ``pg_admin_url`` (session) / ``pg_database_url`` (function): PostgreSQL on 127.0.0.1:5432 and a
  fresh database on it.

- ``s3_server`` (session): a private SeaweedFS ``weed mini`` S3 server on free ports, with the
  AWS_* environment pointing at it for the whole session (restored afterwards).
- ``s3_bucket`` (function): a fresh, uniquely named bucket on that server.
- ``one_torch_thread_per_subprocess`` (session, automatic): OMP_NUM_THREADS=1 for the processes
  the tests start.

Test data lives in the repository (tests/paths.py), never beside it.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # the package need not be installed to run the tests
    sys.path.insert(0, str(REPO_ROOT))

# AWS variables that would point boto3 somewhere else than the test server; removed during the
# session (and restored after it).
_AWS_ENV_TO_CLEAR = (
    "AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
    "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
)


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread_per_subprocess():
    """Workers and `run`s that the tests start use one torch (OpenMP) thread, unless
    OMP_NUM_THREADS says otherwise. On a small machine their spinning OpenMP threads fought their
    own io threads, the servers and this process: a worker test took twice the wall time and a
    third more CPU. This process keeps its thread count (torch is imported before the change)."""
    import torch  # noqa: F401

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))
        yield


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A running S3-compatible server; ``.endpoint_url``, ``.access_key``, ``.client()``, ...

    Sets AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and AWS_DEFAULT_REGION for
    the session, isolates boto3 from the developer's ~/.aws files, and stops the server
    (SIGTERM, then SIGKILL) at the end.
    """
    from storage.s3server import S3Server, WeedNotFound, find_weed

    try:
        weed = find_weed()
    except WeedNotFound as e:
        pytest.fail(f"{e} (the S3 tests need a real S3-compatible server)", pytrace=False)

    data_dir = tmp_path_factory.mktemp("seaweedfs")
    server = S3Server(data_dir, weed=weed)
    t0 = time.monotonic()
    try:
        server.start(timeout=60)
    except RuntimeError as e:
        pytest.fail(str(e), pytrace=False)
    server.startup_wall_seconds = time.monotonic() - t0

    aws_dir = tmp_path_factory.mktemp("aws-config")
    with pytest.MonkeyPatch.context() as mp:
        for name in _AWS_ENV_TO_CLEAR:
            mp.delenv(name, raising=False)
        for name, value in server.env().items():
            mp.setenv(name, value)
        # Nothing from ~/.aws (profiles, endpoint or addressing overrides) leaks into the tests.
        mp.setenv("AWS_CONFIG_FILE", str(aws_dir / "config"))
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", str(aws_dir / "credentials"))
        mp.setenv("AWS_EC2_METADATA_DISABLED", "true")
        try:
            yield server
        finally:
            server.stop()


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh bucket (name returned), removed with its contents after the test."""
    name = s3_server.create_bucket("test")
    yield name
    try:
        # SeaweedFS deletes non-empty buckets (-s3.allowDeleteBucketNotEmpty, on by default),
        # which also frees the bucket's volume.
        s3_server.client().delete_bucket(Bucket=name)
    except Exception:
        pass


# --------------------------------------------------------------------------------------------
# PostgreSQL: a fresh database per use on the server at 127.0.0.1:5432

import uuid  # noqa: E402

_PG_CANDIDATES = [
    os.environ.get("PANOPTIC_TEST_POSTGRES_URL"),
    "postgresql://postgres@127.0.0.1:5432/test",
    "postgresql://root@127.0.0.1:5432/test",
    "postgresql://postgres@127.0.0.1:5432/postgres",
]


def _pg_admin_url() -> str | None:
    import psycopg

    for url in filter(None, _PG_CANDIDATES):
        try:
            with psycopg.connect(url, connect_timeout=3, autocommit=True) as conn:
                conn.execute("SELECT 1")
                if conn.execute("SELECT rolcreatedb OR rolsuper FROM pg_roles WHERE rolname = current_user").fetchone()[0]:
                    return url
        except Exception:
            continue
    return None


@pytest.fixture(scope="session")
def pg_admin_url():
    url = _pg_admin_url()
    if url is None:
        pytest.fail("no PostgreSQL server with CREATE DATABASE rights on 127.0.0.1:5432 "
                    "(start it, or set PANOPTIC_TEST_POSTGRES_URL)")
    return url


def create_pg_database(admin_url: str) -> tuple[str, str]:
    import psycopg
    from psycopg import sql

    name = f"panoptic_test_{os.getpid()}_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    base = admin_url.rsplit("/", 1)[0]
    return name, f"{base}/{name}"


def drop_pg_database(admin_url: str, name: str) -> None:
    import psycopg
    from psycopg import sql

    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@contextlib.contextmanager
def fresh_pg_database(admin_url: str):
    """The URL of a fresh, empty PostgreSQL database, dropped on leaving."""
    from storage import db as storage_db
    name, url = create_pg_database(admin_url)
    try:
        yield url
    finally:
        storage_db.dispose_all()
        drop_pg_database(admin_url, name)


@pytest.fixture
def pg_database_url(pg_admin_url):
    """A fresh, empty PostgreSQL database, dropped afterwards."""
    with fresh_pg_database(pg_admin_url) as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    """A URL to a fresh, empty database of each kind."""
    from storage import db as storage_db
    if request.param == "postgresql":
        yield request.getfixturevalue("pg_database_url")
        return
    yield f"sqlite:///{tmp_path / 'jobs.db'}"
    storage_db.dispose_all()


@pytest.fixture(scope="session")
def twenty_classes(tmp_path_factory):
    """(checkpoint path, state dict, label map path) of a detr-r50 with 20 classes of its own
    (tests/twenty_classes.py)."""
    from tests.twenty_classes import write_checkpoint
    return write_checkpoint(tmp_path_factory.mktemp("twenty-classes"))
