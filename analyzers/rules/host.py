"""Host: the CPU stops to wait for the GPU inside the step, or waits for a core of its own."""

from __future__ import annotations

from typing import Any

from perfkit.analyzers.facts import TraceFacts
from perfkit.analyzers.metrics import Metrics
from perfkit.analyzers.rules import Diagnosis, Thresholds, rule


@rule("host_device_sync", remedy="avoid_sync", reads="trace", min_idle_share=0.05, min_items_per_step=1)
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
    )


@rule("cpu_contention", remedy="cpu_contention", reads="run")
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
        ranks=list(st.host_bound),
    )


@rule("host_oversubscribed", remedy="host_oversubscribed", reads="run", min_share=0.15)
def host_oversubscribed(m: Metrics, t: Thresholds) -> Diagnosis | None:
    """Every rank's training thread spends a good part of its step ready to run with no core to run
    on: the host runs more threads than it has cores (OpenMP threads x ranks, DataLoader workers, a
    neighbour). No rank stands out, so no straggler is named; the whole job is slowed."""
    if m.steps is None:
        return None
    waits = [(r.rank, r.runq_wait_ms, r.step_ms) for r in m.steps.per_rank if r.runq_wait_ms is not None]
    if not waits or len(waits) < len(m.steps.per_rank):
        return None
    shares = {rank: w / s for rank, w, s in waits if s > 0}
    if not shares or min(shares.values()) < t["min_share"]:
        return None
    env = m.run.env if m.run is not None else {}
    cores, threads = env.get("cpu_count"), env.get("threads")
    ranks_here = env.get("local_world_size") or (m.run.world_size if m.run is not None else len(waits))
    evidence: dict[str, Any] = {
        "runq_wait_ms": {rank: round(w, 1) for rank, w, _ in waits},
        "share_of_step": {rank: round(x, 2) for rank, x in shares.items()},
    }
    if cores:
        evidence["cores"] = cores
    if threads:
        evidence["threads_per_rank"] = threads
    evidence["ranks_on_host"] = ranks_here
    fit = f"; {ranks_here} ranks x {threads} threads on {cores} cores" if cores and threads else ""
    return Diagnosis(
        title=f"Every rank waits for a CPU core {100 * min(shares.values()):.0f}% of its step or more: the "
        f"host is oversubscribed{fit}",
        # Each rank waits at least this long for a core every step; with threads within the cores most of
        # it goes (an upper bound: the ranks still share the host).
        saving_ms=min(w for _, w, _ in waits),
        estimate="the least run-queue wait of any rank a step (its training thread ready, no core free)",
        evidence=evidence,
    )
