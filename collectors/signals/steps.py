"""steps: per step its start/end, data-wait, forward, backward and optimizer time, tokens and loss.

The Probe keeps the step boundaries and phase timers (on GPU, CUDA events resolved lazily, so no
per-step device sync); this collector only decides whether ``steps.jsonl`` is written.
"""

from perfkit.collectors.base import Collector, register

from perfkit.tables import STEPS


@register
class StepsCollector(Collector):
    name = "steps"
    tables = (STEPS,)
