"""gc: Python's garbage collections on each rank: how many a step by generation, how long they held
the training thread, and which steps they hit.

A collection runs on whichever thread allocates past a threshold and stops every Python thread of
the rank while it scans; a full one (generation 2) scans every object the process holds (a large
model's modules, parameters' Python wrappers, a dataset's index), tens of ms or more. Under
synchronous training the other ranks wait for the paused one at the next collective, so a rank that
collects at its own steps slows them all. ``gc.callbacks`` time each collection (a microsecond's
bookkeeping on a collection, nothing on a step without one); a row is written for each step that had
one, so a clean step costs nothing on disk.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from perfkit.collectors.base import Chart, Collector, register

from perfkit.tables import Table

if TYPE_CHECKING:
    import pandas as pd
    from perfkit.collectors.probe import Probe

GC = Table(
    "gc",
    {
        "step": "int",
        "gen0": "int",
        "gen1": "int",
        "gen2": "int",
        "pause_s": "float",
        "max_pause_s": "float",
        "collected": "int",
    },
    required=("step", "pause_s"),
)
"""One row per step that had a collection: collections by generation, their summed and longest
pause, and the objects they freed."""


@dataclass(kw_only=True)
class GcRank:
    rank: int
    steps: int
    """Steps after the warm-up."""
    steps_hit: int
    """Of those, the steps with a collection."""
    collections_per_step: dict[str, float]
    """Mean collections a step, by generation (gen0, gen1, gen2)."""
    pause_ms_per_step: float
    """Mean time a step this rank's Python threads were stopped for collections."""
    pause_share: float
    """That time's share of the rank's step time."""
    max_pause_ms: float
    """The longest single collection."""
    worst_steps: list[int] = field(default_factory=list)
    """The steps it paused longest in (up to five)."""


@dataclass(kw_only=True)
class GcMetrics:
    ranks: list[GcRank]
    job_pause_ms_per_step: float
    """Mean over the steps of the longest pause of any rank in that step: under synchronous training
    the others wait for it, so this is the step time the pauses cost the job."""
    step_ms: float
    """Median step time over the same steps."""


@register
class GcCollector(Collector):
    name = "gc"
    tables = (GC,)
    title, order = "Python garbage collection", 105
    charts = (
        Chart("pause_s", "Time paused in Python's garbage collector, per step (steps with a collection)"),
        Chart("gen2", "Full collections (generation 2) per step", "collections", 1),
    )

    def start(self, probe: Probe) -> None:
        self._reset()
        self._t0 = 0.0
        gc.callbacks.append(self._on_gc)

    def _reset(self) -> None:
        self._gens = [0, 0, 0]
        self._pause = 0.0
        self._longest = 0.0
        self._collected = 0

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
            return
        pause = time.perf_counter() - self._t0
        self._gens[min(2, int(info.get("generation", 0)))] += 1
        self._pause += pause
        self._longest = max(self._longest, pause)
        self._collected += int(info.get("collected", 0))

    def step_end(self, probe: Probe, step: int) -> None:
        if any(self._gens):
            gen0, gen1, gen2 = self._gens
            probe.writer(GC).add(
                {
                    "step": step,
                    "gen0": gen0,
                    "gen1": gen1,
                    "gen2": gen2,
                    "pause_s": self._pause,
                    "max_pause_s": self._longest,
                    "collected": self._collected,
                }
            )
            self._reset()

    def stop(self, probe: Probe) -> None:
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)

    @classmethod
    def fold(cls, frames: Mapping[str, pd.DataFrame], steps: pd.DataFrame) -> GcMetrics | None:
        if steps.empty:
            return None
        counts = ["gen0", "gen1", "gen2", "pause_s", "max_pause_s"]
        rows = frames["gc"][["rank", "step", *counts]]
        m = steps[["rank", "step", "step_time_s"]].merge(rows, on=["rank", "step"], how="left")
        m[counts] = m[counts].astype(float).fillna(0.0)
        ranks = []
        for _, r in m.groupby("rank"):
            hit = r[r["pause_s"] > 0]
            ranks.append(
                GcRank(
                    rank=int(r["rank"].iloc[0]),
                    steps=len(r),
                    steps_hit=len(hit),
                    collections_per_step={g: round(float(r[g].mean()), 2) for g in ("gen0", "gen1", "gen2")},
                    pause_ms_per_step=1e3 * float(r["pause_s"].mean()),
                    pause_share=float(r["pause_s"].sum() / r["step_time_s"].sum()),
                    max_pause_ms=1e3 * float(r["max_pause_s"].max()),
                    worst_steps=[int(s) for s in hit.nlargest(5, "pause_s")["step"]],
                )
            )
        return GcMetrics(
            ranks=ranks,
            job_pause_ms_per_step=1e3 * float(m.groupby("step")["pause_s"].max().mean()),
            step_ms=1e3 * float(steps["step_time_s"].median()),
        )
