"""Lease tokens that name their holder: which process, on which machine, claimed an image.

A token is ``<random>.<pid>:<start>@<machine>``. The random part is what fences: a late result
under a void token is refused. The rest lets a `run` started again see that the process which
held its job's images was killed outright (SIGKILL, the OOM killer) and take them back at once,
instead of waiting for their leases to expire. Tokens of another form (written by older versions)
name no holder.
"""

from __future__ import annotations

import functools
import hashlib
import os
import socket
import uuid
from dataclasses import dataclass
from pathlib import Path


def _read(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:                     # not Linux, or no such process
        return ""


def _this_machine() -> str:
    """Host name, boot and PID namespace, hashed: after a reboot, or in another container of the
    same host (even one sharing its host name), process ids mean other processes."""
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        namespace = ""
    identity = "\0".join([socket.gethostname(), _read("/proc/sys/kernel/random/boot_id"), namespace])
    return hashlib.sha256(identity.encode()).hexdigest()[:12]


def _start_time(pid: int) -> str:
    """When the process started (clock ticks since boot; "" where /proc cannot tell): with its id,
    it names one process, not whichever later reuses the id."""
    stat = _read(f"/proc/{pid}/stat")
    fields = stat.rpartition(")")[2].split()        # after the command name, which may hold spaces
    return fields[19] if len(fields) > 19 else ""


THIS_MACHINE = _this_machine()


@functools.lru_cache(maxsize=1)
def _this_process(pid: int) -> str:
    """Keyed by the id, so that a forked pool process names itself, not its parent."""
    return f"{pid}:{_start_time(pid)}@{THIS_MACHINE}"


def new_token() -> str:
    """A fresh token for one chunk's claims, naming this process (at most 64 characters)."""
    return f"{uuid.uuid4().hex[:20]}.{_this_process(os.getpid())}"


@dataclass(frozen=True)
class Holder:
    pid: int
    start: str
    machine: str

    @property
    def on_this_machine(self) -> bool:
        return self.machine == THIS_MACHINE

    def is_gone(self) -> bool:
        """Known to have exited: a process of this machine whose id no longer names it (no such
        process, or one started at another time). A process elsewhere is not known to be gone:
        its leases decide."""
        if not self.on_this_machine:
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:         # exists, another user's: whose, the start time tells
            pass
        return _start_time(self.pid) != self.start


def holder_of(token: str) -> Holder | None:
    """The process a token names, or None for a token that names none."""
    _random, dot, holder = token.partition(".")
    process, at, machine = holder.partition("@")
    pid, colon, start = process.partition(":")
    if not (dot and at and colon and pid.isdigit() and machine):
        return None
    return Holder(int(pid), start, machine)
