"""Host: the CPU stops to wait for the GPU inside the step."""

from __future__ import annotations

from perfkit.analyzers.facts import TraceFacts
from perfkit.analyzers.rules import Diagnosis, Thresholds, rule


@rule("host_device_sync", reads="trace", min_idle_share=0.05, min_items_per_step=1)
def host_device_sync(f: TraceFacts, t: Thresholds) -> Diagnosis | None:
    span, sync = f.breakdown.get("span_ns", 0), f.idle.get("sync_ns", 0)
    syncs = f.item_calls / f.steps
    if not (span and sync > t["min_idle_share"] * span) and syncs < t["min_items_per_step"]:
        return None
    evidence: dict[str, float] = {"item_calls_per_step": round(syncs, 1)}
    if span:
        evidence["sync_idle_pct_of_span"] = round(100 * sync / span, 1)
    return Diagnosis(
        title="Host-device synchronization inside the step" + ("" if span else " (.item() each step)"),
        saving_ms=sync / (f.gpu_steps * 1e6),
        estimate="GPU idle after a synchronizing call, which kept the CPU from running ahead"
        if span
        else "not estimated: the trace has no GPU time (on a CPU run .item() costs little)",
        evidence=evidence,
        remedy="avoid_sync",
    )
