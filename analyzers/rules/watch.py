"""A watched job's anomalies (perfkit profile --watch): what started going wrong, at which step, on
which ranks, and what the trace captured then says against the healthy baseline.

One rule per kind of anomaly (``perfkit.analyzers.watch``); each names the first anomaly of its kind
and counts the rest. The saving is the anomaly's cost a step (its value less the baseline), where it
is a time; a leak or a GPU fault is rated by what it threatens instead (a leak's steps left until the memory is full).
"""

from __future__ import annotations

from typing import Any

from perfkit.analyzers.metrics import Metrics
from perfkit.analyzers.remedies import Remedy, register
from perfkit.analyzers.rules import Diagnosis, Thresholds, rule

register(
    Remedy(
        id="memory_leak",
        description="Find what the rank keeps from step to step: record the allocator's history over a few "
        "steps (perfkit profile --memory-history A-B) and look for tensors that are never freed; the "
        "usual ones are losses or outputs appended to a list without .item() or .detach(), caches keyed "
        "by step, and hooks that hold activations.",
        script="torch.cuda.memory._record_memory_history(max_entries=100000); ...; "
        "torch.cuda.memory._dump_snapshot('leak.pickle')  # then perfkit analyze leak.pickle",
    )
)
register(
    Remedy(
        id="slow_data_source",
        description="Look at that rank's data: its shard's storage (a slow disk or network mount, a "
        "remote bucket), its files' sizes and decoding; prefetch more (DataLoader num_workers, "
        "prefetch_factor) or move the shard.",
        script="DataLoader(..., num_workers=<more>, prefetch_factor=4, persistent_workers=True)",
    )
)
REMEDY = {
    "step_time": "see_causes",
    "straggler": "straggler",
    "data_wait": "slow_data_source",
    "gc": "gc_tuning",
    "collective": "slow_link",
    "memory": "memory_leak",
}
"""GPU health anomalies are the gpu family's ``gpu_health`` finding, with what the run's NVML rows say."""


def _diagnose(m: Metrics, kind: str) -> Diagnosis | None:
    w = m.watch
    if w is None:
        return None
    found = [a for a in w.anomalies if a.get("kind") == kind]
    if not found:
        return None
    a = min(found, key=lambda x: x.get("start_step") or 0)
    evidence: dict[str, Any] = {
        "start_step": a.get("start_step"),
        "detected_step": a.get("detected_step"),
        "end_step": a.get("end_step"),
        "value": a.get("value"),
        "baseline": a.get("baseline"),
        "threshold": a.get("threshold"),
        "unit": a.get("unit"),
        "subject": a.get("subject"),
        "capture": a.get("capture"),
        "against_baseline": a.get("diagnosis") or "no capture of it",
        "phase_change_ms": (a.get("evidence") or {}).get("phase_change_ms"),
        "more_of_this_kind": len(found) - 1,
    }
    ended = f", until step {a['end_step']}" if a.get("end_step") else ", still on at the end"
    title = f"Step {a.get('start_step')}{ended}: {a.get('title')}"
    unit = a.get("unit")
    saving = max(0.0, float(a.get("value") or 0.0) - float(a.get("baseline") or 0.0)) if unit == "ms" else 0.0
    severity = None
    if kind == "memory":
        severity = "high" if (a.get("evidence") or {}).get("steps_to_capacity") is not None else "medium"
    return Diagnosis(
        title=title,
        saving_ms=saving,
        estimate="the anomaly's cost a step against the job's own healthy baseline windows"
        if unit == "ms"
        else "not a time: what it threatens (an out-of-memory stop)",
        evidence=evidence,
        ranks=sorted({int(r) for x in found for r in x.get("ranks") or []}),
        severity=severity,
    )


def _declare(kind: str) -> None:
    @rule(f"watch_{kind}", remedy=REMEDY[kind], reads="run", needs_steps=False)
    def check(m: Metrics, t: Thresholds) -> Diagnosis | None:
        return _diagnose(m, kind)

    check.__doc__ = f"A watched job's {kind.replace('_', ' ')} anomaly (perfkit.analyzers.watch)."


for _kind in REMEDY:
    _declare(_kind)
