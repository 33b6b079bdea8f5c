"""Shared pytest fixtures.

- ``s3_server`` (session): a private SeaweedFS ``weed mini`` S3 server on free ports, with the
  AWS_* environment pointing at it for the whole session (restored afterwards).
- ``s3_bucket`` (function): a fresh, uniquely named bucket on that server.
- ``shared_dir`` (session): the ``shared/`` folder beside the repository (reference data).
"""

from __future__ import annotations

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


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """``shared/`` beside the repository (reference vectors, sample data, design notes)."""
    path = Path(__file__).resolve().parents[2] / "shared"
    if not path.is_dir():
        pytest.fail(
            f"shared folder not found at {path}: it must sit beside the repository "
            "(../shared relative to the repository root)",
            pytrace=False,
        )
    return path
