"""steps: per step its start/end, data-wait, forward, backward and optimizer time, tokens and loss.

The Probe keeps the step boundaries and phase timers (the step API every script calls; on GPU, CUDA
events resolved lazily, so no per-step device sync); this collector writes each step's row once its
timings are known.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from perfkit.collectors.base import Collector, register

from perfkit.tables import STEPS

if TYPE_CHECKING:
    from perfkit.collectors.probe import Probe


@register
class StepsCollector(Collector):
    name = "steps"
    tables = (STEPS,)

    def step_timed(self, probe: Probe, row: dict[str, Any]) -> None:
        probe.writer(STEPS).add(row)
