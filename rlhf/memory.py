"""How the C allocator hands large blocks back to the operating system (Linux, glibc).

glibc serves every block above its mmap threshold (at most 32 MiB) with a fresh `mmap` and
unmaps it when freed. A PPO step allocates and frees hundreds of such tensors (activations,
logits, gradients, prepacked weights), so each of them page-faults on first touch, on every
step. Keeping freed memory in the process heap lets the next tensor reuse pages that are
already mapped, for a little more peak resident memory (benchmarks/RESULTS.md has the
measurements).
"""

from __future__ import annotations

import ctypes
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4


def keep_freed_memory() -> bool:
    """Serve large blocks from the heap and never trim it (glibc's `mallopt`): freed memory
    stays mapped in the process for the next tensors. Returns False where this does not
    apply (not Linux, not glibc); the process then allocates as before."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # -1: never trim (mallopt(3)).
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, -1))
