"""Keep freed memory in the process on a CPU: glibc malloc settings for the attack's allocation churn.

Every attack iteration allocates and frees the same few hundred tensors. With glibc's defaults, blocks
above its (dynamic) mmap threshold come from fresh mmaps and go back to the system when freed, so every
iteration pays thousands of minor page faults (the kernel zeroing fresh pages): 3,584 per iteration of the
compiled MLP program at K = 4 (benchmarks/cpu_malloc.py, docs/benchmarks.md). Serving blocks up to 32 MiB
(glibc's largest threshold) from the heap and not trimming it keeps those pages: no faults, equal results.
Larger blocks are still mmapped, so nothing can fail for want of heap. No torch here: it runs first.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
MMAP_THRESHOLD = 32 << 20  # glibc's maximum (DEFAULT_MMAP_THRESHOLD_MAX on 64-bit)
TRIM_THRESHOLD = 1 << 30


def keep_freed_memory() -> bool:
    """Set glibc's mmap and trim thresholds (once per process, before the attack allocates); False where
    there is no glibc (macOS, musl) or `DIA_KEEP_MEMORY=0` says not to."""
    if os.environ.get("DIA_KEEP_MEMORY", "1") == "0":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
