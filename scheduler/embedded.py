"""What `run` (the embedded mode) needs beyond submit: knowing its own jobs again, and stopping
cleanly on SIGINT/SIGTERM.

A `run` that is interrupted gives its claims back and marks its job ``interrupted``; the same
command (same SOURCE, DEST and options) finds that job by its run key and resumes it instead of
making a new one.
"""

from __future__ import annotations

import hashlib
import json
import signal
import threading
from dataclasses import replace

import click

from storage import objects

from .submit import JobSpec

# The broker recorded with a job made by `run`: none. Reapers (which re-queue a broker's jobs)
# leave such jobs alone; `retry` reopens them for the next `run` instead of queueing them.
EMBEDDED_BROKER = "embedded"


def run_key(spec: JobSpec, force: bool) -> str:
    """Identifies a `run` command: its locations and every option that shapes the job."""
    identity = {"source": objects.normalize(spec.source), "dest": objects.normalize(spec.dest),
                "name": spec.name, "includes": list(spec.includes), "chunk_size": spec.chunk_size,
                "model": spec.model, "weights": spec.weights, "threshold": spec.threshold,
                "min_size": spec.min_size, "max_size": spec.max_size, "config": spec.config, "force": force}
    if spec.label_map is not None and not spec.label_map.is_coco:     # run keys from before --categories stay
        identity["label_map"] = spec.label_map.sha256
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()


def embedded_spec(spec: JobSpec, force: bool) -> JobSpec:
    """The spec with what marks it as this `run` command's job: no broker, and its run key."""
    return replace(spec, config={**spec.config, "broker": EMBEDDED_BROKER, "run_key": run_key(spec, force)})


class StopOnSignals:
    """While active, the first SIGINT or SIGTERM sets ``event`` (the work stops at its next batch
    and gives back what it has not run); a second one raises KeyboardInterrupt (stop at once; the
    claims are still given back). Restores the previous handlers on exit, unless a stop was requested
    and the state settled: then the process is exiting with 128 + the signal, and a second signal
    crossing that exit must not kill it half-way (seen in CI)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.event = threading.Event()
        self.signal_number: int | None = None
        self._previous: dict[int, object] = {}
        self._settled = False

    @property
    def requested(self) -> bool:
        return self.event.is_set()

    @property
    def exit_code(self) -> int:
        """The shell's convention for a process ended by a signal: 128 + its number."""
        return 128 + (self.signal_number or signal.SIGINT)

    def _handle(self, signum, _frame):
        if self.event.is_set():
            raise KeyboardInterrupt
        self.signal_number = signum
        self.event.set()
        click.echo(f"{signal.Signals(signum).name}: stopping after the current batch and giving the "
                   "unfinished images back (again to stop at once)", err=True)

    def settle(self) -> None:
        """From now on the signals are ignored: the job's state is being written."""
        self._settled = True
        for signum in self.SIGNALS:
            signal.signal(signum, signal.SIG_IGN)

    def __enter__(self) -> "StopOnSignals":
        for signum in self.SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._settled and self.requested:      # exiting with 128 + signal: stay deaf until then
            return
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
