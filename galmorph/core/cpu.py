"""What the CPU computes natively, read from /proc/cpuinfo: training's precision and the
serving engine's choice both ask it (one reader)."""

from __future__ import annotations

from pathlib import Path

# /proc/cpuinfo flags of the units that compute bf16 natively (AVX512-BF16 dot products, AMX).
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
CPUINFO = Path("/proc/cpuinfo")


def cpu_flags() -> frozenset[str]:
    """Every flag /proc/cpuinfo lists; none where it is unreadable."""
    try:
        text = CPUINFO.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return frozenset()
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            flags.update(value.split())
    return frozenset(flags)


def cpu_bf16_flags() -> tuple[str, ...]:
    """The CPU's bf16 flags (of CPU_BF16_FLAGS); none where /proc/cpuinfo is unreadable."""
    flags = cpu_flags()
    return tuple(flag for flag in CPU_BF16_FLAGS if flag in flags)
