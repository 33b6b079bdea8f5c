"""storage.objects against a real S3-compatible server (SeaweedFS) and local folders."""

from __future__ import annotations

import base64
import hashlib
import http.server
import multiprocessing
import os
import stat as statmod
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from storage import objects
from storage.objects import (
    InvalidURI,
    ObjectInfo,
    ObjectNotFound,
    ObjectStoreError,
    exists,
    join,
    list_objects,
    mask_url,
    read_bytes,
    stat,
    write_bytes,
)

# The same small tree on every backend. Local listings come out in sorted() order of the keys
# ("a-b/..." < "a.txt" < "a/b.txt": "-" < "." < "/"; a per-folder sort by bare names would give
# "a/b.txt" first). S3 listings come in the server's order: AWS sorts keys by their UTF-8 bytes,
# SeaweedFS walks its folders by bare name, so S3 tests compare sorted lists.
TREE = {
    "a.txt": b"A",
    "a/b.txt": b"BB",
    "a/c/d.bin": b"\x00\x01\x02",
    "a-b/e.json": b"{}",
    "z.png": b"",
    "sp ace/f#1.jpg": b"hash and space",
}


@pytest.fixture(params=["s3", "local", "file-uri"])
def base(request, tmp_path):
    """A base URI (folder/prefix) on each backend."""
    if request.param == "s3":
        bucket = request.getfixturevalue("s3_bucket")
        return f"s3://{bucket}/base"
    if request.param == "local":
        return str(tmp_path / "base")
    return (tmp_path / "base").as_uri()


# --------------------------------------------------------------------------------------------
# Round trips


def test_write_read_exists_stat(base):
    uri = join(base, "x/y/obj.bin")
    assert not exists(uri)
    data = os.urandom(1000)
    write_bytes(uri, data)
    assert exists(uri)
    assert read_bytes(uri) == data
    info = stat(uri)
    assert isinstance(info, ObjectInfo)
    assert (info.uri, info.key, info.size) == (uri, "obj.bin", 1000)
    assert info.etag
    if base.startswith("s3://"):
        assert info.etag == hashlib.md5(data).hexdigest()  # single-part upload: ETag = MD5
    else:
        st = os.stat(objects.local_path(uri))
        assert info.etag == f"{st.st_mtime_ns}-{st.st_size}"

    write_bytes(uri, b"second", content_type="application/octet-stream")  # replaces
    assert read_bytes(uri) == b"second"
    assert stat(uri).size == 6
    write_bytes(join(base, "empty"), b"")
    assert read_bytes(join(base, "empty")) == b""
    write_bytes(join(base, "mv"), memoryview(b"view"))
    assert read_bytes(join(base, "mv")) == b"view"


def test_missing_object(base):
    uri = join(base, "no/such/thing.jpg")
    assert not exists(uri)
    for op in (read_bytes, stat):
        with pytest.raises(ObjectNotFound) as exc:
            op(uri)
        assert isinstance(exc.value, ObjectStoreError) and isinstance(exc.value, RuntimeError)
        message = str(exc.value)
        assert uri in message
        assert ("no such object" in message) or ("no such file" in message)


def test_listing_matches_tree_in_key_order(base):
    for key, data in TREE.items():
        write_bytes(join(base, key), data)
    # a sibling that shares the prefix string but is not under the folder
    write_bytes(base + "2/other.txt", b"not listed")

    listed = list(list_objects(base))
    if base.startswith("s3://"):
        assert sorted(i.key for i in listed) == sorted(TREE)
    else:
        assert [i.key for i in listed] == sorted(TREE)
    for info in listed:
        assert info.size == len(TREE[info.key])
        assert info.uri == join(base, info.key)
        assert read_bytes(info.uri) == TREE[info.key]
        assert info.etag
    # a trailing slash means the same folder; a sub-folder gives keys relative to it
    assert [i.key for i in list_objects(base + "/")] == [i.key for i in listed]
    assert [i.key for i in list_objects(join(base, "a"))] == ["b.txt", "c/d.bin"]
    if base.startswith("s3://"):  # an object's key used as a prefix: nothing under it
        assert list(list_objects(join(base, "a.txt"))) == []
    else:
        with pytest.raises(ObjectStoreError, match="not a folder"):
            list(list_objects(join(base, "a.txt")))


def test_same_listing_on_s3_and_local(s3_bucket, tmp_path):
    s3_base, local_base = f"s3://{s3_bucket}/tree", str(tmp_path / "tree")
    for key, data in TREE.items():
        write_bytes(join(s3_base, key), data)
        write_bytes(join(local_base, key), data)
    s3_list = sorted((i.key, i.size, i.uri) for i in list_objects(s3_base))
    local_list = [(i.key, i.size, i.uri) for i in list_objects(local_base)]
    expected = sorted((k, len(v)) for k, v in TREE.items())
    assert [(k, s) for k, s, _ in s3_list] == [(k, s) for k, s, _ in local_list] == expected
    assert [u for _, _, u in s3_list] == [join(s3_base, k) for k, _ in expected]
    assert [u for _, _, u in local_list] == [join(local_base, k) for k, _ in expected]


# --------------------------------------------------------------------------------------------
# S3 specifics


def test_s3_listing_pages_streams_and_lists_every_key_once(s3_bucket):
    n = 1100  # ListObjectsV2 returns at most 1000 keys per page
    keys = [f"d{i % 7}/img-{i:05d}.jpg" for i in range(n)]
    base = f"s3://{s3_bucket}/many"
    # Many threads on the one shared client also checks that it is thread-safe.
    with ThreadPoolExecutor(max_workers=32) as pool:
        list(pool.map(lambda k: write_bytes(join(base, k), k.encode()), keys))

    client = objects.s3_client()
    calls = []

    def count(**_kw):
        calls.append(1)

    client.meta.events.register("before-call.s3.ListObjectsV2", count)
    try:
        it = list_objects(base)
        first = next(it)
        assert len(calls) == 1, "the first entry must come after the first page only"
        listed = [first.key, *(i.key for i in it)]
    finally:
        client.meta.events.unregister("before-call.s3.ListObjectsV2", count)
    assert len(calls) >= 2, "expected more than one page"
    assert len(listed) == n
    assert len(set(listed)) == n
    assert sorted(listed) == sorted(keys)


def test_s3_folder_markers_skipped(s3_server, s3_bucket):
    raw = s3_server.client()
    for key in ("m/", "m/sub/", "m/sub/deeper/"):
        raw.put_object(Bucket=s3_bucket, Key=key, Body=b"")
    raw.put_object(Bucket=s3_bucket, Key="m/sub/real.jpg", Body=b"jpg")
    raw.put_object(Bucket=s3_bucket, Key="m/zero", Body=b"")  # empty but not a marker
    assert [(i.key, i.size) for i in list_objects(f"s3://{s3_bucket}/m")] == [
        ("sub/real.jpg", 3),
        ("zero", 0),
    ]
    assert [i.key for i in list_objects(f"s3://{s3_bucket}")] == ["m/sub/real.jpg", "m/zero"]


def test_s3_content_type(s3_server, s3_bucket):
    write_bytes(f"s3://{s3_bucket}/o/x.png", b"png")
    write_bytes(f"s3://{s3_bucket}/o/x.json", b"{}")
    write_bytes(f"s3://{s3_bucket}/o/x.json2", b"{}", content_type="text/plain")
    raw = s3_server.client()
    assert raw.head_object(Bucket=s3_bucket, Key="o/x.png")["ContentType"] == "image/png"
    assert raw.head_object(Bucket=s3_bucket, Key="o/x.json")["ContentType"] == "application/json"
    assert raw.head_object(Bucket=s3_bucket, Key="o/x.json2")["ContentType"] == "text/plain"


def test_s3_missing_bucket_and_bad_keys(s3_server):
    with pytest.raises(ObjectNotFound, match="bucket does not exist"):
        read_bytes("s3://no-such-bucket-panoptic/x")
    with pytest.raises(ObjectNotFound):
        list(list_objects("s3://no-such-bucket-panoptic/prefix"))
    assert not exists("s3://no-such-bucket-panoptic/x")
    with pytest.raises(ObjectStoreError, match="not an object key"):
        write_bytes("s3://somebucket/folder/", b"x")
    with pytest.raises(ObjectStoreError, match="not an object key"):
        read_bytes("s3://somebucket")


def test_s3_empty_prefix_lists_nothing(s3_bucket):
    assert list(list_objects(f"s3://{s3_bucket}/nothing/here")) == []


def test_s3_bad_credentials_message_is_clear_and_secret_free(s3_server, s3_bucket, monkeypatch):
    write_bytes(f"s3://{s3_bucket}/k", b"v")
    secret = "wrong-secret-DO-NOT-PRINT-42"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)  # the cached client follows the env
    with pytest.raises(ObjectStoreError) as exc:
        read_bytes(f"s3://{s3_bucket}/k")
    message = str(exc.value)
    assert not isinstance(exc.value, ObjectNotFound)
    assert f"s3://{s3_bucket}/k" in message and "SignatureDoesNotMatch" in message
    assert secret not in message and s3_server.secret_key not in message
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    assert read_bytes(f"s3://{s3_bucket}/k") == b"v"


def test_s3_client_cached_per_process_and_env(s3_server, monkeypatch):
    c1 = objects.s3_client()
    assert objects.s3_client() is c1
    assert c1.meta.endpoint_url == s3_server.endpoint_url  # AWS_ENDPOINT_URL honoured
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-3")
    c2 = objects.s3_client()
    assert c2 is not c1 and c2.meta.region_name == "eu-west-3"
    objects.reset_client()
    assert objects.s3_client() is not c2


@pytest.mark.parametrize("value", [
    "2026-11-26T04:03:36.123Z", "2026-11-26T04:03:36Z", "2026-11-26T04:03:36+02:00",
    "Wed, 26 Nov 2026 04:03:36 GMT", 1700000000, "1700000000", "2026-11-26T04:03:36", "20261126",
])
def test_timestamp_parser_agrees_with_botocore(value):
    from botocore.utils import parse_timestamp

    ours, theirs = objects._parse_timestamp(value), parse_timestamp(value)
    assert ours == theirs and ours.utcoffset() == theirs.utcoffset()


def test_s3_client_timestamps_are_aware_datetimes(s3_bucket):
    from datetime import datetime, timedelta, timezone

    write_bytes(f"s3://{s3_bucket}/t/x.jpg", b"x")
    client = objects.s3_client()
    listed = client.list_objects_v2(Bucket=s3_bucket, Prefix="t/")["Contents"][0]["LastModified"]  # ISO 8601
    head = client.head_object(Bucket=s3_bucket, Key="t/x.jpg")["LastModified"]                     # RFC 822 header
    for value in (listed, head):
        assert isinstance(value, datetime) and value.tzinfo is not None
        assert abs(value - datetime.now(timezone.utc)) < timedelta(minutes=10)
    assert abs(listed - head) < timedelta(seconds=2)


def _child_reads(uri, queue):
    inherited = objects._cached  # dropped by the at-fork hook
    try:
        data = read_bytes(uri)
        queue.put((inherited is None, objects._cached[0][0] == os.getpid(), data))
    except Exception as e:  # pragma: no cover - reported to the parent
        queue.put(("error", repr(e), b""))


def test_s3_client_recreated_after_fork(s3_bucket):
    uri = f"s3://{s3_bucket}/forked"
    write_bytes(uri, b"from parent")  # the parent now holds a client with open connections
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child_reads, args=(uri, queue))
    proc.start()
    result = queue.get(timeout=30)
    proc.join(timeout=30)
    assert result == (True, True, b"from parent")
    assert read_bytes(uri) == b"from parent"


# --------------------------------------------------------------------------------------------
# Local specifics


def _all_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_local_atomic_write_leaves_no_temp_files(tmp_path):
    target = tmp_path / "deep" / "er" / "out.png"
    write_bytes(str(target), b"one")  # creates the parent folders
    write_bytes(str(target), b"two")
    assert target.read_bytes() == b"two"
    assert _all_files(tmp_path) == ["deep/er/out.png"]
    umask = os.umask(0o022)
    os.umask(umask)
    assert statmod.S_IMODE(target.stat().st_mode) == 0o666 & ~umask

    # many concurrent writers of one file: readers only ever see a whole version
    payloads = [bytes([i]) * 50_000 for i in range(16)]
    with ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(lambda d: write_bytes(str(target), d), payloads))
    assert target.read_bytes() in payloads
    assert _all_files(tmp_path) == ["deep/er/out.png"]


def test_local_failed_write_keeps_old_file_and_cleans_up(tmp_path, monkeypatch):
    target = tmp_path / "f.json"
    write_bytes(str(target), b"old")

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(objects.os, "replace", broken_replace)
    with pytest.raises(ObjectStoreError, match="No space left"):
        write_bytes(str(target), b"new")
    monkeypatch.undo()
    assert target.read_bytes() == b"old"
    assert _all_files(tmp_path) == ["f.json"]


def test_local_listing_details(tmp_path):
    root = tmp_path / "src"
    (root / "b" / "c").mkdir(parents=True)
    (root / "empty").mkdir()
    (root / "b" / "c" / "x.jpg").write_bytes(b"12345")
    (root / "a.jpg").write_bytes(b"1")
    (root / "b" / ".out.png.abc.panoptic-tmp").write_bytes(b"half written")  # in-flight write
    (root / "b" / "loop").symlink_to(root)  # a cycle must not loop forever
    (root / "linked.jpg").symlink_to(root / "a.jpg")  # file links are followed
    (root / "dangling.jpg").symlink_to(root / "missing")
    os.mkfifo(root / "fifo")  # not a regular file: skipped

    listed = list(list_objects(str(root)))
    assert [i.key for i in listed] == ["a.jpg", "b/c/x.jpg", "linked.jpg"]
    x = listed[1]
    st = os.stat(root / "b" / "c" / "x.jpg")
    assert x == ObjectInfo(str(root / "b" / "c" / "x.jpg"), "b/c/x.jpg", 5,
                           f"{st.st_mtime_ns}-{st.st_size}")
    # file:// prefix gives file:// URIs
    assert [i.uri for i in list_objects(root.as_uri())][1] == (root / "b/c/x.jpg").as_uri()
    assert list(list_objects(str(root / "empty"))) == []
    with pytest.raises(ObjectNotFound, match="no such file"):
        list(list_objects(str(tmp_path / "nope")))
    with pytest.raises(ObjectStoreError, match="not a folder"):
        list(list_objects(str(root / "a.jpg")))
    assert not exists(str(root / "b"))  # a folder is not an object
    with pytest.raises(ObjectStoreError, match="is a folder"):
        read_bytes(str(root / "b"))


def test_file_uri_with_odd_characters_round_trips(tmp_path):
    base = tmp_path.as_uri()
    uri = join(base, "dir with space/na#me%20.jpg")
    assert "#" not in uri.split("://", 1)[1] and " " not in uri
    write_bytes(uri, b"odd")
    assert (tmp_path / "dir with space" / "na#me%20.jpg").read_bytes() == b"odd"
    assert read_bytes(uri) == b"odd"
    assert [i.key for i in list_objects(base)] == ["dir with space/na#me%20.jpg"]


# --------------------------------------------------------------------------------------------
# HTTP (read only)


@pytest.fixture
def http_server(tmp_path):
    (tmp_path / "w.bin").write_bytes(b"weights")
    token = base64.b64encode(b"user:s3cr3t/pw").decode()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw):
            super().__init__(*a, directory=str(tmp_path), **kw)

        def do_GET(self):
            if self.path.startswith("/private/"):
                if self.headers.get("Authorization") != f"Basic {token}":
                    self.send_error(401)
                    return
                self.path = self.path[len("/private"):]
            super().do_GET()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_http_read_only(http_server):
    assert read_bytes(f"{http_server}/w.bin") == b"weights"
    with pytest.raises(ObjectNotFound, match="HTTP 404"):
        read_bytes(f"{http_server}/missing.bin")
    # credentials in the URL become a Basic auth header and never appear in messages
    host = http_server.split("://", 1)[1]
    assert read_bytes(f"http://user:s3cr3t%2Fpw@{host}/private/w.bin") == b"weights"
    with pytest.raises(ObjectStoreError) as exc:
        read_bytes(f"http://user:wrong-pw@{host}/private/w.bin?token=tok123")
    assert "401" in str(exc.value)
    assert "wrong-pw" not in str(exc.value) and "tok123" not in str(exc.value)
    with pytest.raises(ObjectStoreError, match="not supported"):
        write_bytes(f"{http_server}/w.bin", b"x")
    with pytest.raises(ObjectStoreError, match="not supported"):
        list(list_objects(http_server))
    with pytest.raises(ObjectStoreError):
        read_bytes("http://127.0.0.1:1/refused", timeout=5)


# --------------------------------------------------------------------------------------------
# Pure functions


@pytest.mark.parametrize(
    "base, rel, expected",
    [
        ("s3://b", "x/y.png", "s3://b/x/y.png"),
        ("s3://b/", "x", "s3://b/x"),
        ("s3://b/out", "x/y.png", "s3://b/out/x/y.png"),
        ("s3://b/out/", "./x//y.png", "s3://b/out/x/y.png"),
        ("s3://b/out", "", "s3://b/out"),
        ("/data/out", "x/y.png", "/data/out/x/y.png"),
        ("/data/out/", "x", "/data/out/x"),
        ("rel/dir", "x", "rel/dir/x"),
        ("file:///data/out", "a b/c#d.png", "file:///data/out/a%20b/c%23d.png"),
        ("file:///", "x", "file:///x"),
        ("https://h/models", "w.pth", "https://h/models/w.pth"),
    ],
)
def test_join(base, rel, expected):
    assert join(base, rel) == expected


@pytest.mark.parametrize("rel", ["../x", "a/../../x", "/abs/x", "a/.."])
def test_join_rejects_escapes(rel):
    with pytest.raises(InvalidURI) as exc:
        join("/data/out", rel)
    assert isinstance(exc.value, ValueError) and isinstance(exc.value, ObjectStoreError)


def test_invalid_uris():
    with pytest.raises(InvalidURI, match="unsupported URI scheme 'gs'"):
        read_bytes("gs://bucket/x")
    with pytest.raises(InvalidURI, match="bucket"):
        read_bytes("s3:///key")
    with pytest.raises(InvalidURI):
        read_bytes("")
    with pytest.raises(InvalidURI, match="remote host"):
        read_bytes("file://otherhost/x")


@pytest.mark.parametrize(
    "url, expected",
    [
        ("redis://user:secret@host:6379/0", "redis://user:***@host:6379/0"),
        ("redis://:secret@host/0", "redis://:***@host/0"),
        ("postgresql://u:p@h/db", "postgresql://u:***@h/db"),
        ("postgresql+psycopg://u:p%40ss@h:5432/db?sslmode=require",
         "postgresql+psycopg://u:***@h:5432/db?sslmode=require"),
        ("redis://u:p@ss@host/0", "redis://u:***@host/0"),  # unescaped @ in the password
        ("redis://:ab/cd@host/0", "redis://:***@host/0"),  # unescaped / in the password
        ("postgresql://u:pa;ss@h/db", "postgresql://u:***@h/db"),
        ("amqp://g:pw1@h1//;amqp://g:pw2@h2//", "amqp://g:***@h1//;amqp://g:***@h2//"),
        ("rediss://h:6380/0?password=pw&ssl_cert_reqs=none",
         "rediss://h:6380/0?password=***&ssl_cert_reqs=none"),
        ("https://b.s3.amazonaws.com/k?X-Amz-Credential=AKIA/x&X-Amz-Signature=abc",
         "https://b.s3.amazonaws.com/k?X-Amz-Credential=***&X-Amz-Signature=***"),
        ("redis://localhost:6379/0", "redis://localhost:6379/0"),
        ("redis://user@host/0", "redis://user@host/0"),
        ("http://host:8080/path@x", "http://host:8080/path@x"),
        ("sqlite:///panoptic.db", "sqlite:///panoptic.db"),
        ("not a url", "not a url"),
        ("", ""),
    ],
)
def test_mask_url(url, expected):
    assert mask_url(url) == expected


def test_mask_url_non_string():
    assert mask_url(None) is None
