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
# A model-like loop: each pass allocates and frees 48 MiB activations (a DETR backbone's are ~55 MB).
# Above 32 MiB on purpose: glibc's default serves smaller blocks from a dynamic threshold that rises
# after the first free, so whether its contrast case faults would depend on allocation order (one
# CI run's default case counted 0 faults with 16 MiB blocks); 32 MiB is the ceiling of that
# threshold, so larger blocks are always fresh mappings by default. Prints whether the setting was
# made, then the page faults of each pass after the first.
PASSES = """
import resource, torch
from worker.heap import keep_freed_memory
print(keep_freed_memory())
conv = torch.nn.Conv2d(4, 4, 3, padding=1)
x = torch.randn(1, 4, 1536, 2048)
with torch.inference_mode():
    conv(conv(x).relu()).relu().sum()
    for _ in range(5):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        conv(conv(x).relu()).relu().sum()
        print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
PAGES_PER_ACTIVATION = 48 * 2**20 // 4096


def passes(keep_heap: str) -> tuple[str, int]:
    """Whether the setting was made, and the median page faults of a pass after the first.

    The median, not the sum: 6 of ~45 runs of the summed version (then with 16 MiB blocks) counted
    ~8,190 faults over four passes, in bursts, where the others count 0. The cause is outside the
    process and not pinned down; one or two disturbed passes no longer decide the test, while
    without the setting every pass faults."""
    env = {**os.environ, "PANOPTIC_KEEP_HEAP": keep_heap, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", PASSES], env=env, capture_output=True, text=True, check=True)
    made, *faults = out.stdout.split()
    return made, statistics.median(int(f) for f in faults)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the setting is glibc's (elsewhere it is not made)")
def test_kept_heap_serves_repeated_passes_without_fresh_pages():
    made, faults = passes("1")
    assert made == "True"
    assert faults < PAGES_PER_ACTIVATION // 16
    # glibc's default, for contrast: blocks above 32 MiB are fresh mappings, faulted in on every pass.
    made, faults = passes("0")
    assert made == "False"
    assert faults > PAGES_PER_ACTIVATION
