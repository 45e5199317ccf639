"""retain_freed_memory: freed blocks are reused instead of being faulted in again.

Each case runs in its own interpreter: mallopt changes the whole process, and the page-fault
count must not include the test runner's own allocations.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from galmorph.core.allocator import on_glibc

pytestmark = pytest.mark.skipif(not on_glibc(), reason="glibc malloc only")

# Allocate, touch and free a 64 MiB array five times; count the page faults of the last four.
# Through malloc itself: numpy and torch may ask for huge pages, which hides the count.
CHILD = """
import ctypes, json, resource, sys
from galmorph.core.allocator import retain_freed_memory
said = retain_freed_memory() if sys.argv[1] == "retain" else "untouched"
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
def cycle():
    block = libc.malloc(64 * 2**20)
    ctypes.memset(block, 1, 64 * 2**20)
    libc.free(block)
cycle()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    cycle()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"said": said, "faults": faults}))
"""


def run_child(mode: str, **env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUN"))}
    out = subprocess.run(
        [sys.executable, "-c", CHILD, mode],
        env={**clean, **env},
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    return json.loads(out.stdout)


def test_freed_memory_is_reused_not_faulted_in_again() -> None:
    default = run_child("default")
    retained = run_child("retain")
    assert retained["said"] == "freed memory kept for reuse (glibc mallopt)"
    # 4 x 64 MiB is 65,536 pages of 4 KiB: glibc's default returns each block to the kernel.
    assert default["faults"] > 30_000, default
    assert retained["faults"] < default["faults"] / 10, (retained, default)


def test_a_users_own_malloc_settings_are_left_alone() -> None:
    chosen = run_child("retain", MALLOC_TRIM_THRESHOLD_="131072")
    assert chosen["said"] == "allocator left as the environment sets it (MALLOC_TRIM_THRESHOLD_)"
