"""cpu: per step the rank process's own CPU time (user + system, all its threads) against the
step's wall time, and twice a second the whole host's busy share from /proc/stat.

A rank whose CPU time nears its wall time on a GPU run is host-bound (Python, launches); a busy host
whose ranks are not says that other processes (loader workers, a neighbour's job) compete for the
cores. ``os.times()`` costs about a microsecond; /proc/stat is read at most twice a second.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

from perfkit.collectors.base import Chart, Collector, register

from perfkit.tables import CPU

if TYPE_CHECKING:
    from perfkit.collectors.probe import Probe


def runq_wait_ns() -> int | None:
    """How long the calling thread has waited on a run queue (runnable, but the host gave its core to
    something else), from /proc/thread-self/schedstat (Linux; None elsewhere)."""
    try:
        with open("/proc/thread-self/schedstat", "rb") as f:
            return int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None


def host_times() -> tuple[int, int] | None:
    """(busy, total) jiffies of the whole host since boot, from /proc/stat's first line."""
    try:
        with open("/proc/stat", "rb") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


@register
class CpuCollector(Collector):
    name = "cpu"
    tables = (CPU,)
    title, order = "Host CPU", 100
    charts = (
        Chart("cpu_s", "CPU time of each rank's process per step"),
        Chart("host_busy", "Whole host busy (sampled twice a second)", "%", 100),
    )

    def start(self, probe: Probe) -> None:
        self._last = os.times()
        self._runq = runq_wait_ns()
        self._host = host_times()
        self._host_at = time.monotonic()

    def step_end(self, probe: Probe, step: int) -> None:
        now = os.times()
        row: dict[str, Any] = {
            "step": step,
            "cpu_s": (now.user - self._last.user) + (now.system - self._last.system),
            "wall_s": now.elapsed - self._last.elapsed,
        }
        self._last = now
        runq = runq_wait_ns()  # step_end runs on the training thread: its own wait
        if runq is not None and self._runq is not None:
            row["runq_wait_s"] = (runq - self._runq) / 1e9
        self._runq = runq
        if time.monotonic() - self._host_at >= 0.5:
            host = host_times()
            if host is not None and self._host is not None and host[1] > self._host[1]:
                row["host_busy"] = (host[0] - self._host[0]) / (host[1] - self._host[1])
            self._host, self._host_at = host, time.monotonic()
        probe.writer(CPU).add(row)
