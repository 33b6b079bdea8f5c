"""A fault-injecting HTTP reverse proxy for S3 tests.

    with FaultProxy("http://127.0.0.1:8333", fault_rate=0.3, seed=1) as proxy:
        env["AWS_ENDPOINT_URL"] = proxy.endpoint_url
        proxy.stubborn(lambda path: path.endswith("/x.png"), failures=6)
        ...

Each request is read whole, then, with probability ``fault_rate``, answered with a fault instead
of being forwarded: ``"slowdown"`` (503 with S3's SlowDown XML error body, as AWS throttles) or
``"drop"`` (the connection is reset without an answer). The faults are drawn from a
``random.Random(seed)``, so a run injects the same sequence of faults (which request gets which
depends on the order requests arrive in). ``stubborn`` adds an outage of single objects: the
first ``failures`` requests for each path it selects fail, whatever ``fault_rate`` says — more
than boto3's 5 attempts, so that the caller's own retries are needed. Forwarded requests keep
their headers (the Host header included, so SigV4 signatures stay valid) and go to the upstream
on a fresh connection; ``counts`` says how many requests got each treatment, ``requests`` how
many came for each path.
"""

from __future__ import annotations

import random
import socket
import struct
import threading
import urllib.parse
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MODES = ("slowdown", "drop")
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "expect", "te", "upgrade"}


class FaultProxy:
    def __init__(self, upstream: str, fault_rate: float = 0.3, seed: int = 0, modes=MODES,
                 host: str = "127.0.0.1"):
        parts = urllib.parse.urlsplit(upstream)
        self.upstream = (parts.hostname, parts.port or 80)
        self.fault_rate = fault_rate
        self.modes = tuple(modes)
        self.counts: Counter = Counter()
        self.requests: Counter = Counter()       # per path (without the query string)
        self._stubborn: list[tuple] = []
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer((host, 0), _Handler)
        self._server.daemon_threads = True
        self._server.proxy = self
        self._thread: threading.Thread | None = None

    @property
    def endpoint_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "FaultProxy":
        self._thread = threading.Thread(target=self._server.serve_forever, name="fault-proxy", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> "FaultProxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def stubborn(self, select, failures: int) -> None:
        """Fail the first ``failures`` requests for every path that ``select(path)`` accepts."""
        with self._lock:
            self._stubborn.append((select, failures))

    def decide(self, path: str) -> str | None:
        """The fault for the next request (for ``path``), or None to forward it."""
        with self._lock:
            self.requests[path] += 1
            draw = self._rng.random()
            mode = self._rng.choice(self.modes)
            forced = any(select(path) and self.requests[path] <= failures for select, failures in self._stubborn)
            fault = mode if (forced or draw < self.fault_rate) else None
            self.counts[fault or "forwarded"] += 1
            return fault


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"     # keep-alive and "Expect: 100-continue", as boto3 uses them

    def log_message(self, format, *args):  # noqa: A002 - quiet
        pass

    def do_GET(self):
        self._handle()

    do_PUT = do_POST = do_HEAD = do_DELETE = do_GET

    def _read_body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            raw = b""
            while True:
                line = self.rfile.readline()
                raw += line
                size = int(line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while True:                      # trailers, up to the empty line
                        trailer = self.rfile.readline()
                        raw += trailer
                        if trailer in (b"\r\n", b"\n", b""):
                            return raw
                raw += self.rfile.read(size + 2)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _handle(self):
        proxy: FaultProxy = self.server.proxy
        body = self._read_body()
        fault = proxy.decide(urllib.parse.unquote(self.path.split("?", 1)[0]))
        if fault == "drop":
            # Reset the connection without an answer (SO_LINGER 0: RST instead of FIN).
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True
            return
        if fault == "slowdown":
            self._slowdown()
            return
        self._forward(proxy, body)

    def _slowdown(self):
        request_id = f"{random.getrandbits(64):016X}"
        resource = self.path.split("?", 1)[0]
        payload = ('<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
                   '<Message>Please reduce your request rate.</Message>'
                   f'<Resource>{resource}</Resource><RequestId>{request_id}</RequestId></Error>').encode()
        self.send_response(503, "Slow Down")
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("x-amz-request-id", request_id)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    def _forward(self, proxy: FaultProxy, body: bytes):
        head = [f"{self.command} {self.path} HTTP/1.1"]
        head += [f"{name}: {value}" for name, value in self.headers.items() if name.lower() not in _HOP_BY_HOP]
        head.append("Connection: close")
        request = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body
        with socket.create_connection(proxy.upstream, timeout=60) as upstream:
            upstream.sendall(request)
            chunks = []
            while data := upstream.recv(65536):
                chunks.append(data)
        response = b"".join(chunks)
        status_and_headers, sep, rest = response.partition(b"\r\n\r\n")
        lines = status_and_headers.split(b"\r\n")
        kept = [lines[0]] + [line for line in lines[1:]
                             if line.split(b":", 1)[0].strip().lower().decode("latin-1") not in _HOP_BY_HOP]
        # One request per client connection: the upstream answer ends where its connection ended.
        self.wfile.write(b"\r\n".join(kept + [b"Connection: close"]) + sep + rest)
        self.close_connection = True
