"""Shared helpers for benchmarks: the machine, other processes' CPU use, child peak RSS, medians."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def machine() -> dict[str, Any]:
    model = ""
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and not model:
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {
        "cpu": model or platform.processor(),
        "logical_cpus": os.cpu_count(),
        "memory_gib": round(mem / 2**30, 1),
        "avx2": "avx2" in flags,
        "avx512f": "avx512f" in flags,
        "python": platform.python_version(),
    }


def _busy_jiffies() -> int:
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    values = [int(v) for v in fields]
    idle = values[3] + values[4]
    return sum(values[:8]) - idle


@dataclass
class Run:
    wall_s: float
    peak_rss_gib: float
    cpu_s: float
    others_cpu_s: float
    returncode: int


def run_measured(command: Sequence[str], env: dict[str, str] | None = None) -> Run:
    """Run ``command``; its wall time, its own peak RSS and CPU time, and the CPU everything else used meanwhile."""
    hz = os.sysconf("SC_CLK_TCK")
    before_busy = _busy_jiffies()
    start = time.perf_counter()
    proc = subprocess.Popen(list(command), env={**os.environ, **(env or {})})
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage (ru_maxrss in KiB on Linux)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    busy = (_busy_jiffies() - before_busy) / hz
    cpu = usage.ru_utime + usage.ru_stime
    return Run(wall, usage.ru_maxrss / 2**20, cpu, max(busy - cpu, 0.0), proc.returncode)


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def save(name: str, data: dict[str, Any]) -> Path:
    out = Path(__file__).parent / "results" / f"{name}.json"
    out.write_text(json.dumps({"machine": machine(), **data}, indent=2) + "\n")
    return out


def python() -> str:
    return sys.executable
