"""Keeping benchmark timings honest on a small shared machine.

Other people's jobs share these 2 cores, and two heavy processes slow each other several-fold. So a
benchmark waits until the CPUs are nearly idle before each run, and afterwards measures how much CPU
other processes used while it ran (``background_cores``); a disturbed run can then be redone.
"""

from __future__ import annotations

import resource
import subprocess
import time
from dataclasses import dataclass

import psutil


def wait_for_quiet(max_busy_percent: float = 15.0, timeout_s: float = 900.0) -> float:
    """Wait until total CPU use stays below ``max_busy_percent`` for 3 s in a row.

    Returns the seconds waited; gives up after ``timeout_s`` and lets the caller go ahead.
    """
    started, quiet = time.monotonic(), 0
    while quiet < 3 and time.monotonic() - started < timeout_s:
        quiet = quiet + 1 if psutil.cpu_percent(interval=1.0) < max_busy_percent else 0
    return time.monotonic() - started


def busy_cpu_seconds() -> float:
    """CPU-seconds every process on the machine has spent busy since boot."""
    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0)


def children_cpu_seconds() -> float:
    """CPU-seconds of this process's finished (waited-for) children."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


class BackgroundMeter:
    """Cores' worth of CPU that other processes used between ``start()`` and ``stop()``.

    Own CPU time (all threads of this process) is subtracted from the machine's busy time.
    """

    def start(self) -> BackgroundMeter:
        self._busy, self._own, self._t0 = busy_cpu_seconds(), own_cpu_seconds(), time.perf_counter()
        return self

    def stop(self) -> float:
        others = (busy_cpu_seconds() - self._busy) - (own_cpu_seconds() - self._own)
        return max(0.0, others) / (time.perf_counter() - self._t0)


def own_cpu_seconds() -> float:
    t = psutil.Process().cpu_times()
    return t.user + t.system


@dataclass
class TimedProcess:
    """A finished subprocess, its wall time and the CPU other processes used meanwhile."""

    proc: subprocess.CompletedProcess
    started_at: float  # epoch seconds, comparable with MLflow's millisecond timestamps / 1000
    wall_s: float
    background_cores: float  # CPU-seconds of processes other than this one and its child / wall_s


def run_timed(cmd: list[str], **kwargs) -> TimedProcess:
    """Run ``cmd`` to completion (output captured) and measure it; ``kwargs`` go to ``subprocess.run``."""
    busy0, child0 = busy_cpu_seconds(), children_cpu_seconds()
    started_at, t0 = time.time(), time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    wall = time.perf_counter() - t0
    others = (busy_cpu_seconds() - busy0) - (children_cpu_seconds() - child0)
    return TimedProcess(proc, started_at, wall, max(0.0, others) / wall)
