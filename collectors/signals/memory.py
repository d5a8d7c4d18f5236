"""memory: per step allocator and process memory; an optional CUDA allocator history snapshot.

CPU: resident set size from /proc, read at most twice a second (torch's CPU allocator keeps no
running totals).
CUDA: allocated / reserved / peak / inactive-split bytes, allocation retries and OOMs from
``torch.cuda.memory_stats()`` (host-side counters: no device sync). With ``--memory-history A-B``
the allocator history over steps A..B is dumped to ``memory_snapshot.pickle``; on an OOM a
snapshot is dumped to ``oom_snapshot.pickle``.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

from perfkit.collectors.base import Collector, register

from perfkit.tables import MEMORY

if TYPE_CHECKING:
    from perfkit.collectors.probe import Probe

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int:
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@register
class MemoryCollector(Collector):
    name = "memory"
    tables = (MEMORY,)

    def __init__(self) -> None:
        self._recording = False
        self._rss = 0
        self._rss_at = 0.0

    def start(self, probe: Probe) -> None:
        import torch

        if torch.cuda.is_available() and hasattr(torch._C, "_cuda_attach_out_of_memory_observer"):

            def on_oom(device: int, alloc: int, device_alloc: int, device_free: int) -> None:
                torch.cuda.memory._dump_snapshot(str(probe.layout.oom_snapshot(probe.rank)))

            torch._C._cuda_attach_out_of_memory_observer(on_oom)

    def step_begin(self, probe: Probe, step: int) -> None:
        import torch

        window = probe.options.memory_history
        if window and step == window[0] and torch.cuda.is_available():
            torch.cuda.memory._record_memory_history(max_entries=probe.options.memory_history_entries)
            self._recording = True

    def step_end(self, probe: Probe, step: int) -> None:
        now = time.monotonic()
        if now - self._rss_at >= 0.5:  # /proc/self/statm costs ~100 us in a busy process: twice a second
            self._rss, self._rss_at = rss_bytes(), now
        row: dict[str, Any] = {"step": step, "rss": self._rss, "device": "cpu"}
        import torch  # (a module lookup: the rank imported it long ago)

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            s = torch.cuda.memory_stats()
            row.update(
                device="cuda",
                allocated=s.get("allocated_bytes.all.current", 0),
                reserved=s.get("reserved_bytes.all.current", 0),
                peak_allocated=s.get("allocated_bytes.all.peak", 0),
                inactive_split=s.get("inactive_split_bytes.all.current", 0),
                alloc_retries=s.get("num_alloc_retries", 0),
                ooms=s.get("num_ooms", 0),
            )
        probe.writer(MEMORY).add(row)
        window = probe.options.memory_history
        if self._recording and window and step >= window[1]:
            self._dump(probe)

    def _dump(self, probe: Probe) -> None:
        import torch

        torch.cuda.memory._dump_snapshot(str(probe.layout.memory_snapshot(probe.rank)))
        torch.cuda.memory._record_memory_history(enabled=None)
        self._recording = False

    def stop(self, probe: Probe) -> None:
        if self._recording:
            self._dump(probe)
