"""CPU time of processes for benchmarks (Linux /proc): who used the cores during a timed run."""

from __future__ import annotations

import os
from pathlib import Path

_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of one live process so far (0.0 if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICKS            # utime, stime


def descendants(pid: int) -> list[int]:
    """`pid` and every live process below it."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        for task in Path(f"/proc/{current}/task").glob("*/children"):
            try:
                todo += [int(child) for child in task.read_text().split()]
            except OSError:
                pass
    return found


def processes_named(name: str) -> list[int]:
    """Live processes whose command name (/proc/PID/comm) is `name`, e.g. "postgres"."""
    pids = []
    for comm in Path("/proc").glob("[0-9]*/comm"):
        try:
            if comm.read_text().strip() == name:
                pids.append(int(comm.parent.name))
        except OSError:
            pass
    return pids


class CpuMeter:
    """CPU seconds used by groups of processes between `start()` and `stop()`.

    groups: name → a function giving the group's pids (called at both ends, so that processes
    started in between, such as new PostgreSQL backends, count from their start)."""

    def __init__(self, groups):
        self._groups = groups

    def _read(self) -> dict[str, dict[int, float]]:
        return {name: {pid: cpu_seconds(pid) for pid in pids()} for name, pids in self._groups.items()}

    def start(self) -> None:
        self._before = self._read()

    def stop(self) -> dict[str, float]:
        after = self._read()
        return {name: sum(t - self._before[name].get(pid, 0.0) for pid, t in times.items())
                for name, times in after.items()}
