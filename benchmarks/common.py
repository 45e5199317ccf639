"""Shared benchmark plumbing: timing with warm-up and interleaving, machine facts, results files.

Every figure a benchmark reports is the median of repeated runs after warm-up, with the min
and max next to it. The machine is shared, so contenders that are compared with each other
are timed in interleaved rounds (A B C, B C A, ...): a burst of load from a neighbour then
slows every contender alike instead of one of them, and ratios taken within a run hold.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from galmorph.core.files import atomic_write_text

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
# Real images carried in the repository (tests/data/README.md has their provenance).
REAL_DATA = REPO_ROOT / "tests" / "data"
THREAD_ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
VERSIONED_PACKAGES = ("numpy", "torch", "onnxruntime-gpu", "onnx", "fastapi", "uvicorn")


@dataclass(frozen=True)
class Timing:
    """Seconds per call over the timed repeats (warm-up calls excluded)."""

    samples: tuple[float, ...]
    warmup: int

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    def to_dict(self, items_per_call: int = 1) -> dict[str, Any]:
        """Milliseconds per call, and items/s from the median (plus its range from min/max)."""
        median, low, high = self.median, min(self.samples), max(self.samples)
        return {
            "median_ms": round(median * 1e3, 3),
            "min_ms": round(low * 1e3, 3),
            "max_ms": round(high * 1e3, 3),
            "items_per_s": round(items_per_call / median, 3),
            "items_per_s_min": round(items_per_call / high, 3),
            "items_per_s_max": round(items_per_call / low, 3),
            "repeats": len(self.samples),
            "warmup": self.warmup,
        }


def time_call(call: Callable[[], object], *, warmup: int, repeats: int) -> Timing:
    """Time one contender alone."""
    return time_interleaved({"only": call}, warmup=warmup, repeats=repeats)["only"]


def time_interleaved(
    contenders: Mapping[str, Callable[[], object]],
    *,
    warmup: int,
    repeats: int,
    settle_s: float = 0.0,
) -> dict[str, Timing]:
    """Warm every contender up, then time them in rounds, rotating who goes first.

    settle_s: idle pause before each timed call. Thread pools busy-wait for a while after
    their work (OpenBLAS ~2^28 cycles, OpenMP, onnxruntime), so without it a contender is
    charged for its predecessor's spinning threads, which a deployed engine never meets.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats} and {warmup}")
    names = list(contenders)
    for name in names:
        for _ in range(warmup):
            contenders[name]()
    samples: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            if settle_s:
                time.sleep(settle_s)
            start = time.perf_counter()
            contenders[name]()
            samples[name].append(time.perf_counter() - start)
    return {name: Timing(tuple(samples[name]), warmup) for name in names}


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (platform.processor() is often empty)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _physical_cores() -> int | None:
    """Distinct (physical id, core id) pairs; None where /proc/cpuinfo does not say."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    cores = set()
    for block in text.strip().split("\n\n"):
        fields = dict(
            (key.strip(), value.strip())
            for key, _, value in (line.partition(":") for line in block.splitlines())
        )
        if "core id" in fields:
            cores.add((fields.get("physical id", "0"), fields["core id"]))
    return len(cores) or None


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _avx_flags() -> list[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = line.split(":", 1)[1].split()
                wanted = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile")
                return [flag for flag in wanted if flag in flags]
    except OSError:
        pass
    return []


def machine_info() -> dict[str, Any]:
    """What a figure was measured on; read without importing torch or onnxruntime."""
    return {
        "cpu_model": cpu_model(),
        "physical_cores": _physical_cores(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)),
        "simd": _avx_flags(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "versions": {name: _version(name) for name in VERSIONED_PACKAGES},
        "thread_env": {name: os.environ.get(name) for name in THREAD_ENV_VARS},
        "load_average_1min": round(os.getloadavg()[0], 2),
    }


def thread_env(threads: int) -> dict[str, str]:
    """Environment for a child process whose BLAS/OpenMP pools must use `threads` threads
    (numpy's OpenBLAS reads these once, at import)."""
    return {**os.environ, **{name: str(threads) for name in THREAD_ENV_VARS}}


def write_results(path: Path, payload: Mapping[str, Any]) -> Path:
    """Write one benchmark's JSON with the machine and the time it ran, atomically."""
    document = {
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        **payload,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(path, json.dumps(document, indent=2) + "\n")
