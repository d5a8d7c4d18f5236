"""Memory: the allocator runs short (retries, OOMs)."""

from __future__ import annotations

from perfkit.analyzers.metrics import Metrics
from perfkit.analyzers.rules import Diagnosis, Thresholds, rule


@rule("memory_pressure", reads="run", assumed_cost_share=0.05)
def memory_pressure(m: Metrics, t: Thresholds) -> Diagnosis | None:
    mem = m.memory
    if mem is None or not ((mem.alloc_retries or 0) > 0 or (mem.ooms or 0) > 0):
        return None
    parallel = m.config.get("parallel", {})
    # Under tensor parallelism, sharding the norms' and residual activations costs no recompute.
    sp = parallel.get("tp", 1) > 1 and not parallel.get("sequence_parallel")
    return Diagnosis(
        title="The CUDA allocator ran out of free blocks (retries / OOM)",
        saving_ms=t["assumed_cost_share"] * (m.step_ms or 0.0),
        estimate=f"assumed {t['assumed_cost_share']:.0%} of the step (cache flushes and retries)",
        evidence={
            "alloc_retries": mem.alloc_retries,
            "ooms": mem.ooms,
            "fragmentation": mem.fragmentation,
            "peak_allocated_bytes": mem.peak_allocated_bytes,
        },
        remedy="sequence_parallel" if sp else "activation_checkpointing",
    )
