"""What a running process spent, read from /proc (Linux): peak-RSS growth and CPU seconds.

    with measured(pid) as cost:
        ...  # make the process work
    cost.rss_growth_mib, cost.cpu_s

The peak (VmHWM) is reset to the current RSS through /proc/PID/clear_refs first, so the
growth is that of the block alone, over the RSS the process had before it. CPU is
utime + stime of all its threads.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Cost:
    rss_growth_mib: float = 0.0
    cpu_s: float = 0.0


def status_kib(pid: int, key: str) -> int:
    """A memory figure of /proc/PID/status (VmRSS, VmHWM, ...) in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(f"{key} not in /proc/{pid}/status")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


@contextmanager
def measured(pid: int) -> Iterator[Cost]:
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := VmRSS
    rss, cpu = status_kib(pid, "VmRSS"), cpu_seconds(pid)
    cost = Cost()
    yield cost
    cost.rss_growth_mib = (status_kib(pid, "VmHWM") - rss) / 1024
    cost.cpu_s = cpu_seconds(pid) - cpu
