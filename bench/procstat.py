"""What Linux's /proc says about a process or the machine, for the
benchmarks: CPU seconds and resident memory."""

from __future__ import annotations

import math
import os
from pathlib import Path

__all__ = ["machine_cpu_s", "process_cpu_s", "rss_kib"]

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def process_cpu_s(pid: int | None) -> float:
    """User + system CPU seconds of a process (all its threads), read from
    /proc; NaN where /proc is not available or the process is gone."""
    if pid is None:
        return math.nan
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return math.nan
    # The command name (field 2) may contain spaces: split after its ")".
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def machine_cpu_s() -> tuple[float, float]:
    """Busy and stolen CPU seconds of the whole machine, all cores, from
    /proc/stat; NaN where it is not available."""
    try:
        first = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    except OSError:
        return math.nan, math.nan
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in first[1:9])
    return (user + nice + system + irq + softirq) / _CLOCK_TICKS, steal / _CLOCK_TICKS


def rss_kib(pid: int) -> int:
    """A process's resident memory (VmRSS), KiB; 0 if /proc does not say."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0
