"""Python's garbage collector: pauses that cost the step, or make one rank late (the gc collector)."""

from __future__ import annotations

from perfkit.analyzers.metrics import Metrics
from perfkit.analyzers.remedies import Remedy, register
from perfkit.analyzers.rules import Diagnosis, Thresholds, rule
from perfkit.collectors.signals.gc import GcMetrics

register(
    Remedy(
        id="gc_tuning",
        description="Keep Python's garbage collector from pausing ranks at steps of its own choosing.",
        trainer={"gc": "freeze"},
        alternatives=({"gc": "manual"},),
        script=(
            "import gc; gc.collect(); gc.freeze()  # once the model, optimizer and DataLoader are built: "
            "never scanned again. If collections still pause: gc.disable(), then gc.collect(1) every N "
            "steps on every rank at once (or raise gc.set_threshold), and find what makes reference "
            "cycles each step"
        ),
    )
)


@rule("gc_pauses", remedy="gc_tuning", reads="run", min_share=0.03, late_factor=2.0)
def gc_pauses(m: Metrics, t: Thresholds) -> Diagnosis | None:
    """Collections cost more than ``min_share`` of the step (the longest pause of each step, which
    the other ranks wait for). One rank is named when it pauses ``late_factor`` times the others'
    median: its own garbage (its role, its data, its logging) makes it late."""
    g = m.signals.get("gc")
    if not isinstance(g, GcMetrics) or not g.ranks or not g.step_ms:
        return None
    share = g.job_pause_ms_per_step / g.step_ms
    if share < t["min_share"]:
        return None
    worst = max(g.ranks, key=lambda r: r.pause_ms_per_step)
    others = sorted(r.pause_ms_per_step for r in g.ranks if r.rank != worst.rank)
    typical = others[len(others) // 2] if others else 0.0
    late = bool(others) and worst.pause_ms_per_step >= t["late_factor"] * max(typical, 1e-3)
    gens = worst.collections_per_step
    kind = "full (generation 2)" if gens.get("gen2", 0) >= 0.5 else "young"
    if late:
        ranks = [worst.rank]
        title = (
            f"Rank {worst.rank} pauses {worst.pause_ms_per_step:.1f} ms a step in Python's garbage "
            f"collector ({worst.pause_share:.0%} of its step, mostly {kind} collections); the other ranks "
            "wait for it"
        )
    else:
        ranks = sorted(r.rank for r in g.ranks if r.pause_ms_per_step >= 0.5 * worst.pause_ms_per_step)
        title = (
            f"Python's garbage collector pauses the ranks {g.job_pause_ms_per_step:.1f} ms a step "
            f"({share:.0%} of the step, mostly {kind} collections)"
        )
    return Diagnosis(
        title=title,
        saving_ms=g.job_pause_ms_per_step,
        estimate="the longest collection pause of any rank in each step: the other ranks wait for it at "
        "the next collective (freezing set-up objects shortens full collections; collecting on every "
        "rank at once removes the waiting)",
        evidence={
            "pause_share_of_step": round(share, 3),
            "ranks": [
                {
                    "rank": r.rank,
                    "pause_ms_per_step": round(r.pause_ms_per_step, 2),
                    "collections_per_step": r.collections_per_step,
                    "max_pause_ms": round(r.max_pause_ms, 1),
                    "steps_hit": f"{r.steps_hit} of {r.steps}",
                    "worst_steps": r.worst_steps,
                }
                for r in sorted(g.ranks, key=lambda r: -r.pause_ms_per_step)[:4]
            ],
        },
        ranks=ranks,
    )
