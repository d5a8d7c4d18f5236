"""Host: the CPU stops to wait for the GPU inside the step, or waits for a core of its own."""

from __future__ import annotations

from perfkit.analyzers.facts import TraceFacts
from perfkit.analyzers.metrics import Metrics
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


@rule("cpu_contention", reads="run")
def cpu_contention(m: Metrics, t: Thresholds) -> Diagnosis | None:
    """A rank the others wait for, whose extra time its host explains: its training thread was
    ready to run but had no core (another process, DataLoader workers or OpenMP threads beyond the
    cores). Not a straggler to rebalance: the fix is on the host."""
    st = m.stragglers
    if st is None or not st.host_bound:
        return None
    ranks = {r.rank: r for r in st.ranks}
    fastest = min(st.ranks, key=lambda r: r.busy_ms)
    worst = ranks[max(st.host_bound, key=lambda k: ranks[k].busy_ms)]
    return Diagnosis(
        title=f"Rank {worst.rank} waits for a CPU core ({worst.runq_wait_ms or 0:.0f} ms a step ready to run "
        "but not running); the other ranks wait for it",
        saving_ms=worst.busy_ms - fastest.busy_ms,
        estimate="its busy time beyond the fastest rank's, most of it waiting for a core",
        evidence={
            "ranks": [
                {
                    "rank": k,
                    "busy_ms": round(ranks[k].busy_ms, 2),
                    "runq_wait_ms": round(ranks[k].runq_wait_ms or 0.0, 2),
                }
                for k in st.host_bound
            ],
            "fastest": {
                "rank": fastest.rank,
                "busy_ms": round(fastest.busy_ms, 2),
                "runq_wait_ms": round(fastest.runq_wait_ms or 0.0, 2),
            },
        },
        remedy="cpu_contention",
        ranks=list(st.host_bound),
    )
