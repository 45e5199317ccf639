"""Keep freed memory in the process for reuse: glibc malloc settings for torch on a CPU.

By default glibc hands every freed block above its mmap threshold (at most 32 MiB) straight
back to the kernel, and trims the heap's top above 128 KiB. A training or evaluation step on
a CPU allocates and frees hundreds of MB of activations, so every step faults in fresh
zeroed pages again. With the small-data recipe's step (gm_astroformer_small, batch 32, 128 px)
that cost a third of the wall time (benchmarks/bench_cpu_allocator.py). PyTorch's CPU tuning
guide preloads jemalloc or TCMalloc for the same reason; two mallopt calls get it without a
preload. The price: the heap keeps its high-water mark, so resident memory stays at the peak.
"""

from __future__ import annotations

import ctypes
import os
import platform

# mallopt parameter numbers (glibc malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# The largest value both accept (an int): freed blocks of any size stay in the heap.
KEEP_ALL = 2**31 - 1
# Set by a user who tunes glibc malloc or preloads another allocator: theirs wins.
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")


def on_glibc() -> bool:
    """Whether this process runs on glibc, the C library whose malloc this module tunes."""
    return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def retain_freed_memory() -> str:
    """Ask glibc malloc to keep freed memory for reuse; says what was done (for the log)."""
    if not on_glibc():
        return "allocator left as is (not glibc)"
    chosen = [name for name in USER_SETTINGS if name in os.environ]
    if "malloc" in os.environ.get("LD_PRELOAD", ""):
        chosen.append("LD_PRELOAD")
    if chosen:
        return f"allocator left as the environment sets it ({', '.join(chosen)})"
    libc = ctypes.CDLL(None)  # the C library this process already runs on
    if not (libc.mallopt(M_MMAP_THRESHOLD, KEEP_ALL) and libc.mallopt(M_TRIM_THRESHOLD, KEEP_ALL)):
        return "allocator left as is (mallopt refused)"
    return "freed memory kept for reuse (glibc mallopt)"
