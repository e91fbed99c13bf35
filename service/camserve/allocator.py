"""Keep freed tensor memory in the process instead of handing it back to the kernel after every batch.

glibc's malloc serves large blocks (above a threshold of at most 32 MiB, and anything a thread's
64 MiB arena cannot hold) with fresh mmap()s and unmaps them on free, and trims the heap top as soon
as it is free. A CPU forward pass of EfficientNet-Lite0 at batch 8 allocates activations of ~40 MB,
so every batch faulted ~10,000 new pages per image in again (measured: 45-50 ms per image at batch 8
with the defaults, 20-24 ms with the settings below; see docs/benchmarks.md). The settings below are
glibc's own knobs (mallopt(3)): one arena, no mmap for large blocks, no trimming, so the process keeps
its high-water mark of memory and reuses it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import platform

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8
NEVER_TRIM = 2**31 - 1  # mallopt takes an int: trim only above 2 GiB of free heap top


def user_chose_allocator() -> bool:
    """True when the operator already configured malloc (MALLOC_* / GLIBC_TUNABLES) or preloaded another one."""
    names = os.environ.keys()
    return "LD_PRELOAD" in names or "GLIBC_TUNABLES" in names or any(k.startswith("MALLOC_") for k in names)


def keep_freed_memory() -> bool:
    """Apply the settings on glibc; returns whether they were applied (False on musl/macOS or when overridden)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc" or user_chose_allocator():
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    results = [libc.mallopt(p, v) for p, v in ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, NEVER_TRIM))]
    applied = all(result == 1 for result in results)  # try every knob even when an earlier one is refused
    if not applied:
        log.warning("could not tune glibc malloc; large CPU batches will page-fault their activations each time")
    return applied
