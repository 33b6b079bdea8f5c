"""What `run` (the embedded mode) needs beyond submit: knowing its own jobs again, and stopping
cleanly on SIGINT/SIGTERM.

A `run` that is interrupted gives its claims back and marks its job ``interrupted``; the same
command (same SOURCE, DEST and options) finds that job by its run key and resumes it instead of
making a new one. A `run` killed outright (SIGKILL, the OOM killer) has no chance to: the same
command finds its job still running, sees that the process holding its images is gone, and
resumes it too.
"""

from __future__ import annotations

import hashlib
import json
import signal
import threading
from dataclasses import replace

import click

from storage import objects
from worker.lease import holder_of
from worker.text import printable

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


def take_back_a_killed_run(store, run_key: str) -> str | None:
    """The job of this same `run` command left pending or running by a process killed outright,
    now marked interrupted so that it resumes as an interrupted job does (the images the killed
    process held go back to pending, their attempt counted: an image that kills every `run` fails
    after PANOPTIC_MAX_ATTEMPTS). None when there is no such job.

    Refused (ClickException, exit 1) while its images are held by a process that may be alive:
    one on this machine that still exists, or one elsewhere until its leases expire."""
    found = store.find_unfinished(run_key)
    if found is None:
        return None
    job_id, leases = found
    holders = {token: holder_of(token) for token in leases}
    alive = {token: expires for token, expires in leases.items()
             if holders[token] is None or not holders[token].is_gone()}
    if alive:
        here = sorted({holders[token].pid for token in alive if holders[token] and holders[token].on_this_machine})
        if here:
            raise click.ClickException(
                f"job {printable(job_id)} of this same command is being processed by process {here[0]} on this "
                f"machine: wait for it, or stop it (kill -INT {here[0]}: it gives its images back) and run again")
        until = max(alive.values())
        raise click.ClickException(
            f"job {printable(job_id)} of this same command is being processed on another machine (its images "
            f"are claimed until {until:%Y-%m-%d %H:%M:%S} UTC): wait for it, or, if that process was killed, "
            "run again after then")
    store.interrupt(job_id)
    return job_id


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
