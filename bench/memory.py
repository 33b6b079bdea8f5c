"""Process memory readings for benchmarks (Linux /proc): current and peak resident set size."""

from __future__ import annotations


def proc_status(field: str) -> int:
    """A KiB figure of this process from /proc/self/status (VmRSS: now; VmHWM: peak)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux ≥ 4.0: write 5 to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
