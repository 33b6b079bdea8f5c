"""Serving the workers' Prometheus metrics (`worker.metrics` defines them) from the main process.

Celery's prefork pool does the work in child processes, so the values go through
prometheus_client's multiprocess mode: every process writes them to memory-mapped files in a
folder of this worker's own (``PROMETHEUS_MULTIPROC_DIR``: the one given, emptied at start, or a
temporary one removed at exit), and each scrape of the main process adds them up. Counters and
histograms of exited pool processes stay in the totals; the gauges (GPU memory) of a process
that exited are dropped (`prometheus_client.multiprocess.mark_process_dead`, when a pool process
shuts down and, for those killed outright, at the next scrape).

`serve` must run before `worker.metrics` is first imported in the worker's main process and
before the pool forks: metrics without labels get their storage when they are defined.
"""

from __future__ import annotations

import atexit
import glob
import logging
import os
import re
import shutil
import sys
import tempfile

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
PORT_ENV = "PANOPTIC_METRICS_PORT"
ADDR_ENV = "PANOPTIC_METRICS_ADDR"
DEFAULT_ADDR = "0.0.0.0"


def prepare_multiprocess_dir() -> str:
    """Point PROMETHEUS_MULTIPROC_DIR (inherited by the pool processes) at an empty folder."""
    path = os.environ.get(MULTIPROC_ENV)
    if path:
        os.makedirs(path, exist_ok=True)
        for old in glob.glob(os.path.join(path, "*.db")):     # values of an earlier run
            os.remove(old)
    else:
        path = tempfile.mkdtemp(prefix="panoptic-metrics-")
        owner = os.getpid()
        atexit.register(lambda: os.getpid() == owner and shutil.rmtree(path, ignore_errors=True))
        os.environ[MULTIPROC_ENV] = path
    return path           # importing worker.metrics now makes its values multiprocess ones


class _LiveCollector:
    """prometheus_client's MultiProcessCollector, after dropping the gauges of processes that
    exited without saying so (killed by a signal or the OOM killer)."""

    def __init__(self, path: str):
        from prometheus_client.multiprocess import MultiProcessCollector
        self.path = path
        self._inner = MultiProcessCollector(None, path)

    def collect(self):
        from prometheus_client.multiprocess import mark_process_dead
        for name in glob.glob(os.path.join(self.path, "gauge_live*_*.db")):
            match = re.search(r"_(\d+)\.db$", name)
            if match and not _alive(int(match.group(1))):
                mark_process_dead(int(match.group(1)), self.path)
        return self._inner.collect()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _pool_process_exited(pid=None, **_):
    from prometheus_client.multiprocess import mark_process_dead
    try:
        mark_process_dead(pid or os.getpid())
    except Exception:              # bookkeeping only; never in the way of a shutdown
        pass


def serve(port: int, addr: str | None = None) -> str:
    """Serve /metrics on ``addr:port`` (default $PANOPTIC_METRICS_ADDR, else all interfaces) from
    this process, in multiprocess mode; returns the folder. OSError when the port cannot be bound."""
    if "worker.metrics" in sys.modules and not os.environ.get(MULTIPROC_ENV):
        raise RuntimeError("worker.metrics was imported before the metrics server was set up: "
                           "its values would stay in each process's memory")
    from celery.signals import worker_process_shutdown
    from prometheus_client import CollectorRegistry, start_http_server

    path = prepare_multiprocess_dir()
    from . import metrics  # noqa: F401  (defined now: every series is exported, at 0, from the start)
    addr = addr or os.environ.get(ADDR_ENV) or DEFAULT_ADDR
    registry = CollectorRegistry()
    registry.register(_LiveCollector(path))
    start_http_server(port, addr=addr, registry=registry)
    worker_process_shutdown.connect(_pool_process_exited, weak=False)
    log.info("serving Prometheus metrics on http://%s:%d/metrics", addr, port)
    return path
