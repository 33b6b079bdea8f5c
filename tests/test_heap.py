"""The worker process keeps freed memory in its heap: repeated passes fault in no fresh pages."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# A model-like loop: each pass allocates and frees 16 MiB activations. Prints whether the setting
# was made, then the page faults of each pass after the first.
PASSES = """
import resource, torch
from worker.heap import keep_freed_memory
print(keep_freed_memory())
conv = torch.nn.Conv2d(16, 16, 3, padding=1)
x = torch.randn(1, 16, 512, 512)
with torch.inference_mode():
    conv(conv(x).relu()).relu().sum()
    for _ in range(5):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        conv(conv(x).relu()).relu().sum()
        print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
PAGES_PER_ACTIVATION = 16 * 2**20 // 4096


def passes(keep_heap: str) -> tuple[str, int]:
    """Whether the setting was made, and the median page faults of a pass after the first.

    The median, not the sum: 6 of ~45 runs of the summed version counted ~8,190 faults over four
    passes (two activations' worth, in bursts) where the others count 0. The cause is outside
    the process (not pinned down; this kind of machine runs DAMON with a pageout scheme); one or
    two disturbed passes no longer decide the test, while without the setting every pass faults."""
    env = {**os.environ, "PANOPTIC_KEEP_HEAP": keep_heap, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", PASSES], env=env, capture_output=True, text=True, check=True)
    made, *faults = out.stdout.split()
    return made, statistics.median(int(f) for f in faults)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the setting is glibc's (elsewhere it is not made)")
def test_kept_heap_serves_repeated_passes_without_fresh_pages():
    made, faults = passes("1")
    assert made == "True"
    assert faults < PAGES_PER_ACTIVATION // 16
    # glibc's default, for contrast: large blocks are fresh mappings, faulted in on every pass.
    made, faults = passes("0")
    assert made == "False"
    assert faults > PAGES_PER_ACTIVATION
