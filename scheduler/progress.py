"""Live progress of a job for people watching it: a bar on a terminal, plain lines elsewhere.

`JobProgress` is fed (done, failed) counts as they change, by `status --watch` polling the
database or by `run` after each chunk. The rate is measured over the last RATE_WINDOW_S seconds
(a nightly job's early minutes say little about its pace now); the ETA is what is left at that
rate. When stdout is not a terminal (cron mail, CI logs, `| tee`), it prints one line at most
every PLAIN_EVERY_S seconds instead of redrawing.
"""

from __future__ import annotations

import sys
import time
from collections import deque

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

RATE_WINDOW_S = 30.0
PLAIN_EVERY_S = 10.0


def format_duration(seconds: float | None) -> str:
    """A duration for people, the ETA here and a job's duration in `report`: "42s", "1m01s", "5h02m";
    "–" when unknown (no rate yet). Negative durations (clocks of two machines) read as 0s."""
    if seconds is None:
        return "–"
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class RateMeter:
    """Images per second over a sliding window of (time, done) samples."""

    def __init__(self, window_s: float = RATE_WINDOW_S, clock=time.monotonic):
        self.window_s, self.clock = window_s, clock
        self._samples: deque[tuple[float, int]] = deque()

    def add(self, done: int) -> None:
        now = self.clock()
        self._samples.append((now, done))
        while len(self._samples) > 2 and now - self._samples[1][0] >= self.window_s:
            self._samples.popleft()

    @property
    def rate(self) -> float | None:
        if len(self._samples) < 2:
            return None
        (t0, d0), (t1, d1) = self._samples[0], self._samples[-1]
        return (d1 - d0) / (t1 - t0) if t1 > t0 else None

    def eta(self, remaining: int) -> float | None:
        rate = self.rate
        if remaining <= 0:
            return 0.0
        return remaining / rate if rate else None


class JobProgress:
    """Progress of one job: `update(done, failed)`, then `close()`; a context manager."""

    def __init__(self, job_id: str, total: int, console: Console | None = None,
                 plain_every_s: float = PLAIN_EVERY_S, clock=time.monotonic):
        self.job_id, self.total = job_id, total
        self.console = console or Console()
        self.meter = RateMeter(clock=clock)
        self.clock, self.plain_every_s = clock, plain_every_s
        self._last_plain: float | None = None
        self._done = self._failed = 0
        self._bar: Progress | None = None
        if self.console.is_terminal:
            self._bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[failed]} failed"), TextColumn("{task.fields[rate]}"),
                                 TextColumn("ETA {task.fields[eta]}"), TimeElapsedColumn(),
                                 console=self.console, transient=False)
            self._task = self._bar.add_task(f"job {job_id[:8]}", total=total, failed=0, rate="– img/s", eta="–")
            self._bar.start()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def update(self, done: int, failed: int = 0, total: int | None = None) -> None:
        """done counts every finished image (succeeded + failed)."""
        if total is not None:
            self.total = total
        self._done, self._failed = done, failed
        self.meter.add(done)
        rate, eta = self.meter.rate, format_duration(self.meter.eta(self.total - done))
        rate_text = f"{rate:.2f} img/s" if rate is not None else "– img/s"
        if self._bar is not None:
            self._bar.update(self._task, completed=done, total=self.total, failed=failed, rate=rate_text, eta=eta)
            return
        now = self.clock()
        if self._last_plain is None or now - self._last_plain >= self.plain_every_s or done >= self.total:
            self._last_plain = now
            print(f"job {self.job_id}: {done}/{self.total} done, {failed} failed, {rate_text}, ETA {eta}",
                  file=self.console.file, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


def stdout_console() -> Console:
    """The console for progress: a terminal gets a live bar; a pipe or file gets plain lines."""
    return Console(file=sys.stdout)
