"""Object access over URIs: the only code in panoptic-batch that talks to object stores.

Why one file: each operation (read_bytes, write_bytes, stat, exists, list_objects) is one function
over all the back ends below, sharing their URI parsing, error mapping and the masking of secrets
in messages; split by back end or by operation, the parts would import each other's private helpers.

URIs:
    ``s3://bucket/key``     S3 or any S3-compatible store, through boto3. boto3 resolves the
                            endpoint (``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3``), credentials
                            (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``, ...)
                            and region itself. Keys are taken verbatim (not percent-decoded).
    ``file:///abs/path``    a local file; the path is percent-decoded (``join`` percent-encodes).
    ``/any/path``, ``rel``  a plain local path.
    ``http(s)://...``       read-only: ``read_bytes`` only.

``list_objects(prefix)`` treats the prefix as a folder: ``s3://b/photos`` lists the keys under
``photos/`` (not ``photos2/...``), and each entry's ``key`` is relative to that folder with ``/``
separators, so ``join(prefix, info.key) == info.uri`` (S3 keys with ``//`` or ``..`` aside:
``info.uri`` always names the object exactly). Order: local listings are sorted by key
(lexicographic, as AWS S3 lists); S3 listings come in the server's order, which AWS makes
lexicographic by UTF-8 bytes but SeaweedFS makes folder by folder ("a/b" before "a-b/c").

Errors: everything raises :class:`ObjectStoreError` (or its subclass :class:`ObjectNotFound`);
messages name the URI and the cause and never contain credentials. A malformed URI raises
:class:`InvalidURI`, which is both an ``ObjectStoreError`` and a ``ValueError``.
"""

from __future__ import annotations

import base64
import errno
import mimetypes
import os
import re
import stat as _stat
import tempfile
import threading
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Iterator, NamedTuple

from .retry import retry_transient

__all__ = [
    "ObjectStoreError",
    "ObjectNotFound",
    "InvalidURI",
    "PreconditionFailed",
    "ObjectInfo",
    "read_bytes",
    "write_bytes",
    "exists",
    "stat",
    "list_objects",
    "join",
    "is_s3",
    "is_local",
    "local_path",
    "mask_url",
    "mask_urls",
    "url_carries_secret",
    "without_secrets",
    "redact_urls",
    "s3_client",
    "reset_client",
]


class ObjectStoreError(RuntimeError):
    """An object store operation failed. The message names the URI; it never holds credentials.

    ``transient`` says whether the same call may well succeed later (S3 5xx, SlowDown, timeouts,
    connection errors; see storage.retry); it is False for everything else (not found, access
    denied, bad URIs, local file errors).
    """

    transient: bool = False


class ObjectNotFound(ObjectStoreError):
    """The object (or its bucket / folder) does not exist."""


class PreconditionFailed(ObjectStoreError):
    """A conditional write found the object not as expected (S3: 412 Precondition Failed, or 409
    ConditionalRequestConflict): someone else wrote it since it was looked at."""


class InvalidURI(ObjectStoreError, ValueError):
    """A malformed or unsupported URI, or a relative path ``join`` refuses (also a ValueError)."""


@dataclass(frozen=True)
class ObjectInfo:
    uri: str  # full URI of the object
    key: str  # path relative to the listed prefix (posix separators); for stat(): the file name
    size: int  # bytes
    etag: str  # S3: the ETag without quotes; local: f"{mtime_ns}-{size}"


# --------------------------------------------------------------------------------------------
# URIs


class _Parsed(NamedTuple):
    kind: str  # "s3" | "local" | "http"
    bucket: str  # s3 only
    key: str  # s3: object key (may be ""); local: filesystem path; http: the URL


_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def _parse(uri: str | os.PathLike) -> _Parsed:
    if isinstance(uri, os.PathLike):
        uri = os.fspath(uri)
    if not isinstance(uri, str) or not uri:
        raise InvalidURI(f"expected a non-empty URI or path, got {uri!r}")
    m = _SCHEME_RE.match(uri)
    if not m:
        return _Parsed("local", "", uri)
    scheme = m.group(1).lower()
    rest = uri[m.end():]
    if scheme == "s3":
        bucket, _, key = rest.partition("/")
        if not bucket:
            raise InvalidURI(f"S3 URI without a bucket: {uri!r}")
        return _Parsed("s3", bucket, key)
    if scheme == "file":
        parts = urllib.parse.urlsplit(uri)
        if parts.netloc not in ("", "localhost"):
            raise InvalidURI(f"file URI with a remote host is not supported: {mask_url(uri)!r}")
        path = urllib.request.url2pathname(parts.path)
        if not path:
            raise InvalidURI(f"file URI without a path: {uri!r}")
        return _Parsed("local", "", path)
    if scheme in ("http", "https"):
        return _Parsed("http", "", uri)
    raise InvalidURI(
        f"unsupported URI scheme {scheme!r} in {_display(uri)!r} "
        "(use s3://bucket/key, file:///path, a local path, or http(s):// for reading)"
    )


def is_s3(uri: str | os.PathLike) -> bool:
    return _parse(uri).kind == "s3"


def is_local(uri: str | os.PathLike) -> bool:
    return _parse(uri).kind == "local"


def local_path(uri: str | os.PathLike) -> str:
    """The filesystem path of a local URI (``file://`` or plain path)."""
    p = _parse(uri)
    if p.kind != "local":
        raise InvalidURI(f"not a local path: {_display(str(uri))!r}")
    return p.key


def normalize(uri: str | os.PathLike) -> str:
    """A location in a form that means the same from any working directory: local paths become
    absolute (``file://`` included), other URIs are returned as they are."""
    parsed = _parse(uri)
    if parsed.kind == "local":
        return os.path.abspath(os.path.expanduser(parsed.key))
    return os.fspath(uri)


def _check_relative(relative: str) -> list[str]:
    if not isinstance(relative, str):
        raise TypeError(f"join: relative path must be a str, not {type(relative).__name__}")
    if relative.startswith("/"):
        raise InvalidURI(f"join: expected a relative posix path, got {relative!r}")
    parts = [p for p in relative.split("/") if p not in ("", ".")]
    if ".." in parts:
        # S3 keys may contain "..": joining one onto a local folder would escape it.
        raise InvalidURI(f"join: '..' is not allowed in a relative path: {relative!r}")
    return parts


def join(uri: str | os.PathLike, relative: str) -> str:
    """Join a base URI (a folder / prefix) with a relative posix path.

    ``join("s3://b/out", "x/y.png") == "s3://b/out/x/y.png"``; ``join("/data", "x/y.png") ==
    "/data/x/y.png"``; for ``file://`` and ``http(s)://`` bases the relative part is
    percent-encoded. Empty and ``.`` components are dropped; ``..`` or an absolute path raises
    :class:`InvalidURI` (a ``ValueError``), so a hostile S3 key cannot escape a destination.
    """
    if isinstance(uri, os.PathLike):
        uri = os.fspath(uri)
    parts = _check_relative(relative)
    parsed = _parse(uri)  # validates the scheme
    if not parts:
        return uri
    rel = "/".join(parts)
    if parsed.kind == "s3":
        return (uri if uri.endswith("/") else uri + "/") + rel
    if _SCHEME_RE.match(uri):  # file:// or http(s)://
        base = uri.split("#", 1)[0]
        if "?" in base:
            raise InvalidURI(f"join: base URI has a query string: {_display(uri)!r}")
        return (base if base.endswith("/") else base + "/") + urllib.parse.quote(rel, safe="/")
    return os.path.join(uri, *parts)


# --------------------------------------------------------------------------------------------
# Masking secrets in URLs and messages

_SECRET_PARAMS = {
    "password", "passwd", "pwd", "pass", "secret", "token", "access_token", "auth_token",
    "api_key", "apikey", "sig", "signature", "x-amz-signature", "x-amz-credential",
    "x-amz-security-token", "aws_secret_access_key", "sslpassword",
}


_LOOSE_USERINFO = re.compile(r"^(?P<user>[^:/?#@]*):(?P<pw>.*)@(?P<rest>[^@/?#]*(?:[/?#].*)?)$", re.S)


def _mask_one(url: str) -> str:
    m = _SCHEME_RE.match(url)
    if not m:
        return url
    head, rest = url[: m.end()], url[m.end():]
    cut = min([i for i in (rest.find(c) for c in "/?#") if i != -1] or [len(rest)])
    netloc, tail = rest[:cut], rest[cut:]
    if "@" in netloc:
        userinfo, _, hostport = netloc.rpartition("@")
        if ":" in userinfo:
            netloc = userinfo.split(":", 1)[0] + ":***@" + hostport
    else:
        # A password holding an unescaped "/", "?" or "#" ends the authority early for a
        # strict parser; mask up to the last "@" anyway (but not "host:8080/path@x").
        loose = _LOOSE_USERINFO.match(rest)
        if loose and not re.match(r"\d*(?:[/?#]|$)", loose.group("pw")):
            rest = loose.group("rest")
            cut = min([i for i in (rest.find(c) for c in "/?#") if i != -1] or [len(rest)])
            netloc = loose.group("user") + ":***@" + rest[:cut]
            tail = rest[cut:]
    q = tail.find("?")
    if q != -1:
        path, query = tail[:q], tail[q + 1:]
        frag = ""
        if "#" in query:
            query, frag = query.split("#", 1)
            frag = "#" + frag
        items = []
        for item in query.split("&"):
            name, eq, _value = item.partition("=")
            if eq and urllib.parse.unquote_plus(name).lower() in _SECRET_PARAMS:
                items.append(f"{name}=***")
            else:
                items.append(item)
        tail = path + "?" + "&".join(items) + frag
    return head + netloc + tail


def mask_url(url):
    """Replace the password of a URL (and secret query parameters) with ``***`` for logs.

    ``redis://user:secret@host:6379/0`` -> ``redis://user:***@host:6379/0``;
    ``postgresql://u:p@h/db`` -> ``postgresql://u:***@h/db``; ``redis://:pw@h/0`` ->
    ``redis://:***@h/0``; ``...?password=x`` -> ``...?password=***``. Celery's ``;``-separated
    failover lists are masked element by element. Anything that is not a URL comes back as is.
    """
    if not isinstance(url, str) or "://" not in url:
        return url
    # Split only where a new URL starts, so a password holding ";" stays in one piece.
    return ";".join(_mask_one(part) for part in _FAILOVER_SPLIT.split(url))


def _authority(rest: str) -> str:
    """The part of a URL after "scheme://" up to its path, query or fragment."""
    return re.split(r"[/?#]", rest, maxsplit=1)[0]


def url_carries_secret(url: str) -> bool:
    """Whether a URL has a query string or userinfo: where signatures, tokens, API keys and
    passwords travel, whatever their scheme calls them (a rule, not a list of parameter names)."""
    m = _SCHEME_RE.match(url) if isinstance(url, str) else None
    if not m:
        return False
    rest = url[m.end():]
    return "?" in rest or "@" in _authority(rest) or _loose_userinfo(rest) is not None


def _loose_userinfo(rest: str):
    """``user:password@host…`` where the password holds "/", "?" or "#" (not ``host:8080/a@b``)."""
    loose = _LOOSE_USERINFO.match(rest)
    return loose if loose and not re.match(r"\d*(?:[/?#]|$)", loose.group("pw")) else None


def without_secrets(url: str) -> str:
    """A URL as it may be shown or logged: userinfo and query string dropped (marked ``…``)."""
    if not url_carries_secret(url):
        return url
    m = _SCHEME_RE.match(url)
    rest = url[m.end():].split("#", 1)[0]
    loose = None if "@" in _authority(rest) else _loose_userinfo(rest)
    if loose is not None:               # a password holding "/" or "?": everything up to the last "@"
        rest = loose.group("rest")
    authority = _authority(rest)
    tail = rest[len(authority):]
    if loose is not None or "@" in authority:
        authority = "…@" + authority.rpartition("@")[2]
    return url[:m.end()] + authority + tail.split("?", 1)[0] + ("?…" if "?" in tail else "")


_FAILOVER_SPLIT = re.compile(r";(?=[A-Za-z][A-Za-z0-9+.-]*://)")


_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")


def mask_urls(text: str) -> str:
    """Mask every URL found in a free-form message (e.g. an endpoint URL in a botocore error)."""
    return _URL_IN_TEXT.sub(lambda m: mask_url(m.group(0)), text)


def redact_urls(text: str) -> str:
    """Every URL in a free-form message with its userinfo and query string dropped."""
    return _URL_IN_TEXT.sub(lambda m: without_secrets(m.group(0)), text)


def _display(uri: str) -> str:
    """A URI as shown in error messages: password masked, query string dropped for http(s)."""
    uri = mask_url(uri)
    if uri.lower().startswith(("http://", "https://")) and "?" in uri:
        uri = uri.split("?", 1)[0] + "?…"
    return uri


# --------------------------------------------------------------------------------------------
# The S3 client: one per process, created lazily, recreated after fork or when the AWS
# environment changes (tests point it at a fresh server). boto3 clients are thread-safe;
# sessions are not, so each client gets its own Session, created under a lock.

_ENV_KEYS = (
    "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_DEFAULT_REGION", "AWS_REGION",
    "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_CA_BUNDLE",
)

_client_lock = threading.Lock()
_cached: tuple | None = None  # (key, client), replaced as one object so readers see a pair


def _after_fork_in_child() -> None:
    global _client_lock, _cached
    _client_lock = threading.Lock()  # the parent's lock may have been held at fork time
    _cached = None  # the parent's client shares its connection pool's sockets


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def s3_client():
    """The process's shared boto3 S3 client (thread-safe).

    Created lazily under a lock; created anew in a forked child (``os.getpid()`` is part of the
    cache key, and an at-fork hook drops the parent's) and whenever one of the AWS_* variables
    that configure it changes.
    """
    global _cached
    key = (os.getpid(), *(os.environ.get(k) for k in _ENV_KEYS))
    cached = _cached
    if cached is not None and cached[0] == key:
        return cached[1]
    with _client_lock:
        cached = _cached
        if cached is not None and cached[0] == key:
            return cached[1]
        import boto3
        import botocore.session
        from botocore.config import Config

        config = Config(
            retries={"mode": "standard", "max_attempts": 5},
            max_pool_connections=32,
            connect_timeout=10,
            read_timeout=60,
        )
        try:
            core = botocore.session.get_session()
            # The parser is chosen when the client is made, so set it first (see _parse_timestamp).
            core.get_component("response_parser_factory").set_parser_defaults(timestamp_parser=_parse_timestamp)
            client = boto3.session.Session(botocore_session=core).client("s3", config=config)
        except Exception as e:  # e.g. a bad AWS_PROFILE or endpoint URL
            raise ObjectStoreError(f"cannot create the S3 client: {mask_urls(str(e))}") from None
        _cached = (key, client)
        return client


def _parse_timestamp(value):
    """botocore's timestamp parser, with a fast path for ISO 8601 with a zone.

    Every object in a ListObjectsV2 page carries a LastModified in ISO 8601, and botocore's
    default (dateutil's general parser) took about half of a listing's time; the standard
    library reads that form over 30 times faster. Anything else (RFC 822 headers, epoch numbers, no
    zone) goes to botocore's parser, so the values are the same aware datetimes as before."""
    from datetime import datetime

    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            parsed = None
        if parsed is not None and parsed.tzinfo is not None:
            return parsed
    from botocore.utils import parse_timestamp
    return parse_timestamp(value)


def reset_client() -> None:
    """Forget the cached S3 client (the next call creates a new one)."""
    global _cached
    with _client_lock:
        _cached = None


_NOT_FOUND_CODES = {"NoSuchKey", "NoSuchBucket", "NotFound", "404"}
# Error codes that say "not now" rather than "never" (besides any 5xx status but 501).
_TRANSIENT_S3_CODES = {
    "SlowDown", "Throttling", "ThrottlingException", "ThrottledException", "RequestThrottled",
    "RequestLimitExceeded", "TooManyRequests", "TooManyRequestsException", "RequestTimeout",
    "RequestTimeoutException", "InternalError", "ServiceUnavailable", "PriorRequestNotComplete",
}


def _flagged(error: ObjectStoreError, transient: bool) -> ObjectStoreError:
    error.transient = bool(transient)
    return error


def _is_transient_s3(e: Exception) -> bool:
    from botocore.exceptions import (BotoCoreError, ClientError, ConnectionError as BotoConnectionError,
                                     HTTPClientError, IncompleteReadError, SSLError)

    if isinstance(e, ClientError):
        code = str((e.response.get("Error", {}) or {}).get("Code", "") or "")
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return (code in _TRANSIENT_S3_CODES
                or (isinstance(status, int) and (status in (408, 429) or (status >= 500 and status != 501))))
    if isinstance(e, SSLError):  # certificate problems do not heal by themselves
        return False
    if isinstance(e, (BotoConnectionError, HTTPClientError, IncompleteReadError)):
        return True               # endpoint unreachable, connection closed or reset, read timeout
    return isinstance(e, (ConnectionError, TimeoutError)) and not isinstance(e, BotoCoreError)


def _s3_error(op: str, uri: str, e: Exception) -> ObjectStoreError:
    """The ObjectStoreError for a boto3 failure, flagged transient or not."""
    return _flagged(_build_s3_error(op, uri, e), _is_transient_s3(e))


def _build_s3_error(op: str, uri: str, e: Exception) -> ObjectStoreError:
    from botocore.exceptions import ClientError, NoCredentialsError, PartialCredentialsError

    if isinstance(e, ClientError):
        err = e.response.get("Error", {}) or {}
        code = str(err.get("Code", "") or "")
        msg = str(err.get("Message", "") or "")
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in _NOT_FOUND_CODES or (status == 404 and not code):
            what = "bucket does not exist" if code == "NoSuchBucket" else "no such object"
            return ObjectNotFound(f"{op} {uri}: {what} ({code or 404})")
        detail = f"{code}: {msg}" if msg else code or f"HTTP {status}"
        if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            detail += " (check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY/AWS_PROFILE)"
        return ObjectStoreError(f"{op} {uri} failed: {mask_urls(detail)}")
    if isinstance(e, (NoCredentialsError, PartialCredentialsError)):
        return ObjectStoreError(
            f"{op} {uri} failed: no usable AWS credentials "
            "(set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE)"
        )
    return ObjectStoreError(f"{op} {uri} failed: {type(e).__name__}: {mask_urls(str(e))}")


def _s3_key_required(p: _Parsed, uri: str, op: str) -> None:
    if not p.key or p.key.endswith("/"):
        raise ObjectStoreError(f"{op} {uri}: not an object key (empty or ends with '/')")


def _guess_content_type(name: str) -> str:
    ctype, _ = mimetypes.guess_type(name, strict=False)
    return ctype or "application/octet-stream"


# --------------------------------------------------------------------------------------------
# Local files

_TMP_MARK = ".panoptic-tmp"  # suffix of in-progress atomic writes; skipped by list_objects


def _read_umask() -> int:
    try:  # Linux: read it without changing it (os.umask is process-wide and racy)
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def _local_etag(st: os.stat_result) -> str:
    return f"{st.st_mtime_ns}-{st.st_size}"


def _local_error(op: str, uri: str, e: OSError) -> ObjectStoreError:
    reason = e.strerror or type(e).__name__
    if isinstance(e, FileNotFoundError) or e.errno == errno.ENOENT:
        return ObjectNotFound(f"{op} {uri}: no such file ({reason})")
    return ObjectStoreError(f"{op} {uri} failed: {reason}")


def _precondition_failed(e: Exception) -> bool:
    from botocore.exceptions import ClientError

    if not isinstance(e, ClientError):
        return False
    code = str((e.response.get("Error", {}) or {}).get("Code", "") or "")
    status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return code in ("PreconditionFailed", "ConditionalRequestConflict") or status == 412


def _write_local(path: str, data: bytes, check_before_replace=None) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".",
                               suffix=_TMP_MARK)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the usual mode
        if check_before_replace is not None:
            check_before_replace()
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


# --------------------------------------------------------------------------------------------
# HTTP (read only)


def _read_http(url: str, timeout: float) -> bytes:
    parts = urllib.parse.urlsplit(url)
    headers = {"User-Agent": "panoptic-batch"}
    if parts.username is not None or parts.password is not None:
        # urllib cannot take user:password@ in the URL: move it to a Basic auth header.
        user = urllib.parse.unquote(parts.username or "")
        password = urllib.parse.unquote(parts.password or "")
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        headers["Authorization"] = f"Basic {token}"
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        netloc = host + (f":{parts.port}" if parts.port else "")
        url = urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, parts.query, ""))
    request = urllib.request.Request(url, headers=headers)
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return response.read()


# --------------------------------------------------------------------------------------------
# Public API


def read_bytes(uri: str | os.PathLike, *, timeout: float = 60.0) -> bytes:
    """The whole content of an object. ``timeout`` applies to http(s) only."""
    p = _parse(uri)
    uri = os.fspath(uri)
    if p.kind == "s3":
        _s3_key_required(p, uri, "read")
        from botocore.exceptions import BotoCoreError, ClientError

        last: Exception | None = None
        for _attempt in range(3):  # botocore retries the request, not a broken body stream
            try:
                response = s3_client().get_object(Bucket=p.bucket, Key=p.key)
            except (ClientError, BotoCoreError) as e:
                raise _s3_error("read", uri, e) from None
            try:
                return response["Body"].read()
            except (BotoCoreError, OSError) as e:
                last = e
        raise _s3_error("read", uri, last)  # type: ignore[arg-type]
    if p.kind == "local":
        try:
            with open(p.key, "rb") as f:
                return f.read()
        except IsADirectoryError:
            raise ObjectStoreError(f"read {uri}: is a folder, not a file") from None
        except OSError as e:
            raise _local_error("read", uri, e) from None
    shown = _display(uri)
    try:
        return _read_http(p.key, timeout)
    except urllib.error.HTTPError as e:
        if e.code in (404, 410):
            raise ObjectNotFound(f"read {shown}: HTTP {e.code} {e.reason}") from None
        raise _flagged(ObjectStoreError(f"read {shown} failed: HTTP {e.code} {e.reason}"),
                       e.code in (408, 429) or (e.code >= 500 and e.code != 501)) from None
    except urllib.error.URLError as e:
        raise _flagged(ObjectStoreError(f"read {shown} failed: {mask_urls(str(e.reason))}"),
                       isinstance(e.reason, (ConnectionError, TimeoutError))) from None
    except (OSError, ValueError) as e:  # timeouts, resets, malformed URLs
        raise _flagged(ObjectStoreError(f"read {shown} failed: {type(e).__name__}: {mask_urls(str(e))}"),
                       isinstance(e, (ConnectionError, TimeoutError))) from None


# Sentinel for write_bytes(expect=...): no condition.
ANY = object()


def write_bytes(uri: str | os.PathLike, data: bytes, content_type: str | None = None, *,
                expect: object = ANY) -> None:
    """Store ``data`` at ``uri``, replacing what was there.

    Local writes are atomic (temporary file in the same folder, then ``os.replace``) and create
    the parent folders. On S3, ``content_type`` defaults to a guess from the key's extension.

    ``expect``: write only if the object is still as last seen — ``None``: absent, a string: its
    etag (as :func:`stat` gives it); otherwise :class:`PreconditionFailed`. On S3 this is the
    store's own conditional write (``If-None-Match: *`` / ``If-Match``), atomic with the write;
    on folders the file is compared just before the rename, which narrows the window but cannot
    close it.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"write_bytes: data must be bytes-like, not {type(data).__name__}")
    p = _parse(uri)
    uri = os.fspath(uri)
    if p.kind == "s3":
        _s3_key_required(p, uri, "write")
        from botocore.exceptions import BotoCoreError, ClientError

        condition = {} if expect is ANY else {"IfNoneMatch": "*"} if expect is None else {"IfMatch": f'"{expect}"'}
        try:
            s3_client().put_object(
                Bucket=p.bucket, Key=p.key, Body=bytes(data),
                ContentType=content_type or _guess_content_type(p.key), **condition,
            )
        except (ClientError, BotoCoreError) as e:
            if condition and _precondition_failed(e):
                raise PreconditionFailed(f"write {uri}: the object changed since it was looked at") from None
            raise _s3_error("write", uri, e) from None
        return
    if p.kind == "local":
        if p.key.endswith(("/", os.sep)):
            raise ObjectStoreError(f"write {uri}: not a file path (ends with a separator)")

        def check() -> None:
            try:
                current = _local_etag(os.stat(p.key))
            except FileNotFoundError:
                current = None
            if current != expect:
                raise PreconditionFailed(f"write {uri}: the file changed since it was looked at")

        try:
            _write_local(p.key, data, None if expect is ANY else check)
        except OSError as e:
            raise _local_error("write", uri, e) from None
        return
    raise ObjectStoreError(f"write {_display(uri)}: writing over http(s) is not supported")


def read_bytes_retrying(uri: str | os.PathLike, *, timeout: float = 60.0) -> bytes:
    """:func:`read_bytes`, called again after a backoff while it fails transiently (throttling,
    5xx, resets, an endpoint that does not answer) for the retry budget ($PANOPTIC_RETRY_SECONDS,
    storage/retry.py). For work that reads many objects (a job's images, an export), where one
    transient error must not end it; a command's first look at a store uses read_bytes, so as to
    say at once that the store is unreachable."""
    return retry_transient(lambda: read_bytes(uri, timeout=timeout), what=f"read {_display(os.fspath(uri))}")


def write_bytes_retrying(uri: str | os.PathLike, data: bytes, content_type: str | None = None) -> None:
    """:func:`write_bytes` (unconditional), called again while it fails transiently, as
    :func:`read_bytes_retrying` reads."""
    retry_transient(lambda: write_bytes(uri, data, content_type), what=f"write {_display(os.fspath(uri))}")


def stat(uri: str | os.PathLike) -> ObjectInfo:
    """Size and etag of one object; ``key`` is its last path component."""
    p = _parse(uri)
    uri = os.fspath(uri)
    if p.kind == "s3":
        _s3_key_required(p, uri, "stat")
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            head = s3_client().head_object(Bucket=p.bucket, Key=p.key)
        except (ClientError, BotoCoreError) as e:
            raise _s3_error("stat", uri, e) from None
        return ObjectInfo(uri, p.key.rsplit("/", 1)[-1], int(head.get("ContentLength", 0)),
                          str(head.get("ETag", "")).strip('"'))
    if p.kind == "local":
        try:
            st = os.stat(p.key)
        except OSError as e:
            raise _local_error("stat", uri, e) from None
        if not _stat.S_ISREG(st.st_mode):
            raise ObjectStoreError(f"stat {uri}: not a regular file")
        return ObjectInfo(uri, os.path.basename(os.path.normpath(p.key)), st.st_size,
                          _local_etag(st))
    raise ObjectStoreError(f"stat {_display(uri)}: not supported for http(s)")


def exists(uri: str | os.PathLike) -> bool:
    """Whether an object (locally: a regular file) exists at ``uri``."""
    p = _parse(uri)
    if p.kind == "local":
        try:
            st = os.stat(p.key)
        except (FileNotFoundError, NotADirectoryError):
            return False
        except OSError as e:  # permission denied, I/O error: do not pretend it is absent
            raise _local_error("exists", os.fspath(uri), e) from None
        return _stat.S_ISREG(st.st_mode)
    try:
        stat(uri)
    except ObjectNotFound:
        return False
    return True


def list_objects(prefix_uri: str | os.PathLike) -> Iterator[ObjectInfo]:
    """Stream every object under a folder / prefix.

    S3: ListObjectsV2 page by page (nothing beyond one page is held); keys ending in ``/``
    (folder markers) are skipped. A missing bucket raises :class:`ObjectNotFound`; a prefix with
    nothing under it yields nothing. Local: a recursive ``os.scandir`` walk that follows
    symbolic links (skipping cycles) and yields regular files only; a missing folder raises
    :class:`ObjectNotFound`, a file instead of a folder :class:`ObjectStoreError`.

    Order: local entries sorted by key (lexicographic, like AWS); S3 entries in the server's
    order (AWS: lexicographic by UTF-8 bytes; SeaweedFS: folder by folder).
    """
    p = _parse(prefix_uri)
    prefix_uri = os.fspath(prefix_uri)
    if p.kind == "s3":
        return _list_s3(prefix_uri, p)
    if p.kind == "local":
        return _list_local(prefix_uri, p.key)
    raise ObjectStoreError(f"list {_display(prefix_uri)}: not supported for http(s)")


def _list_s3(prefix_uri: str, p: _Parsed) -> Iterator[ObjectInfo]:
    from botocore.exceptions import BotoCoreError, ClientError

    prefix = p.key
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    base = f"s3://{p.bucket}/{prefix}"
    kwargs = {"Bucket": p.bucket, "Prefix": prefix}

    def list_page() -> dict:
        try:
            return s3_client().list_objects_v2(**kwargs)
        except (ClientError, BotoCoreError) as e:
            raise _s3_error("list", prefix_uri, e) from None

    first = True
    while True:
        # The first page fails fast (a wrong endpoint, a store down when the command starts: said
        # at once); a page after it is retried within storage.retry's time budget, so that an
        # outage in the middle of a long listing costs time, not the listing.
        page = list_page() if first else retry_transient(list_page, what=f"list {prefix_uri}")
        first = False
        for obj in page.get("Contents", ()):
            full = obj["Key"]
            if full.endswith("/") or not full.startswith(prefix):
                continue
            yield ObjectInfo(base + full[len(prefix):], full[len(prefix):], int(obj.get("Size", 0)),
                             str(obj.get("ETag", "")).strip('"'))
        if not page.get("IsTruncated"):
            return
        token = page.get("NextContinuationToken")
        if not token or token == kwargs.get("ContinuationToken"):
            raise ObjectStoreError(
                f"list {prefix_uri} failed: the server said the listing is truncated but gave "
                "no new continuation token"
            )
        kwargs["ContinuationToken"] = token


def _list_local(prefix_uri: str, root: str) -> Iterator[ObjectInfo]:
    try:
        st = os.stat(root)
    except OSError as e:
        raise _local_error("list", prefix_uri, e) from None
    if not _stat.S_ISDIR(st.st_mode):
        raise ObjectStoreError(f"list {prefix_uri}: not a folder")
    return _walk_local(prefix_uri, root, st)


def _walk_local(prefix_uri: str, root: str, root_st: os.stat_result) -> Iterator[ObjectInfo]:
    # Depth-first; entries of a folder sorted by name, a sub-folder counted as "name/", which
    # makes the whole walk come out in plain lexicographic order of the relative keys (the order
    # S3 lists in): "a.txt" < "a/b" because "." < "/".
    def walk(path: str, rel: str, ancestors: frozenset) -> Iterator[ObjectInfo]:
        try:
            with os.scandir(path) as it:
                entries = list(it)
        except OSError as e:
            raise _local_error("list", join(prefix_uri, rel) if rel else prefix_uri, e) from None
        items = []
        for entry in entries:
            if entry.name.endswith(_TMP_MARK):
                continue
            try:
                st = entry.stat()  # follows symbolic links
            except OSError:
                continue  # broken link, vanished meanwhile
            if _stat.S_ISDIR(st.st_mode):
                items.append((entry.name + "/", entry, st))
            elif _stat.S_ISREG(st.st_mode):
                items.append((entry.name, entry, st))
        items.sort(key=lambda item: item[0])
        for sort_name, entry, st in items:
            key = f"{rel}{entry.name}"
            if sort_name.endswith("/"):
                ident = (st.st_dev, st.st_ino)
                if ident in ancestors:
                    continue  # a symbolic link back up the tree
                yield from walk(entry.path, key + "/", ancestors | {ident})
            else:
                yield ObjectInfo(join(prefix_uri, key), key, st.st_size, _local_etag(st))

    yield from walk(root, "", frozenset({(root_st.st_dev, root_st.st_ino)}))
