"""Keep freed memory in the process's heap, so that the next image's tensors reuse its pages.

glibc serves every allocation above its mmap threshold (at most 32 MiB) with a fresh mapping and
unmaps it on free. On the CPU a DETR-R101 pass at 800×1066 allocates hundreds of MB in such
blocks (one backbone activation alone is ~55 MB), and the kernel zeroes and maps each fresh page
on first touch: about 0.1 million page faults per image on the worker's pruned path. With mappings off and
the heap never trimmed, freed blocks are reused: the CPU worker ran 5–14% faster per image
(BENCHMARKS.md), holding about 15% more resident memory (the heap stays at its peak, as PyTorch's
CUDA allocator keeps GPU memory).

A process setting, made where a worker process starts (`run`, `predict`, each Celery pool process),
not by the Predictor, which may live in someone else's process. PANOPTIC_KEEP_HEAP=0 turns it off.
"""

from __future__ import annotations

import ctypes
import os
import platform

KEEP_HEAP_ENV = "PANOPTIC_KEEP_HEAP"
# mallopt(3) parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
# Free memory at the top of the heap above this is returned to the kernel: in effect never.
_TRIM_THRESHOLD_BYTES = 2**31 - 1


def keep_freed_memory() -> bool:
    """Serve large allocations from the heap and keep freed memory there (glibc only).

    Returns whether the setting was made: not with PANOPTIC_KEEP_HEAP=0, not on other C libraries
    (musl, macOS), whose allocators behave otherwise."""
    if os.environ.get(KEEP_HEAP_ENV, "1") == "0" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL("libc.so.6")
    return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD_BYTES))
