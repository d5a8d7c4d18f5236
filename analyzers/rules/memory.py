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


@rule("recompute_without_pressure", reads="run", max_peak_share=0.5)
def recompute_without_pressure(m: Metrics, t: Thresholds) -> Diagnosis | None:
    """Activation checkpointing recomputes the forward pass in backward to save memory; when the
    peak leaves more than half the device free and the allocator never ran short, that recompute
    buys nothing."""
    if not m.config.get("kernels", {}).get("activation_checkpointing") or m.steps is None:
        return None
    mem, env = m.memory, (m.run.env if m.run else {})
    if mem is None or (mem.alloc_retries or 0) > 0 or (mem.ooms or 0) > 0:
        return None
    if mem.peak_allocated_bytes is not None:  # GPU: the allocator's peak against the device
        peak, capacity, what = mem.peak_allocated_bytes, env.get("gpu_memory_bytes"), "GPU memory"
    else:  # CPU: every rank's peak RSS on one host, at most
        world = m.run.world_size if m.run else 1
        peak, capacity, what = mem.rss_max_bytes * world, env.get("host_memory_bytes"), "host memory"
    if not capacity or peak > t["max_peak_share"] * capacity:
        return None
    forward_ms = m.steps.phase_share.get("forward", 0.0) * m.steps.step_time_ms
    return Diagnosis(
        title="Activation checkpointing recomputes the forward pass with memory to spare",
        saving_ms=forward_ms,
        estimate="backward recomputes one forward pass: the forward phase's time",
        evidence={
            "peak_share_of_capacity": round(peak / capacity, 3),
            "capacity": what,
            "forward_ms": round(forward_ms, 2),
        },
        remedy="no_activation_checkpointing",
    )
