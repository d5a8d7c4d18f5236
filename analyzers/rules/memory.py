"""Memory: the allocator runs short (retries, OOMs), fragments, flushes its cache, or nears the
device's capacity; and activation recompute that memory does not need."""

from __future__ import annotations

from perfkit.analyzers.metrics import Metrics
from perfkit.analyzers.rules import Diagnosis, Snapshot, Thresholds, rule


@rule("memory_pressure", remedy=("sequence_parallel", "activation_checkpointing"), reads="run")
def memory_pressure(m: Metrics, t: Thresholds) -> Diagnosis | None:
    mem = m.memory
    if mem is None or not ((mem.alloc_retries or 0) > 0 or (mem.ooms or 0) > 0):
        return None
    parallel = m.config.get("parallel", {})
    # Under tensor parallelism, sharding the norms' and residual activations costs no recompute.
    sp = parallel.get("tp", 1) > 1 and not parallel.get("sequence_parallel")
    return Diagnosis(
        title="The CUDA allocator ran out of free blocks (retries / OOM)",
        # Not estimated (it had been an assumed 5% of the step): what a retry costs (freeing the cache,
        # a device sync, the malloc again) is not recorded. An OOM is high, retries medium.
        saving_ms=0.0,
        estimate="not estimated: the cost of a retry (the cache freed, a device sync) is not recorded",
        evidence={
            "alloc_retries": mem.alloc_retries,
            "ooms": mem.ooms,
            "fragmentation": mem.fragmentation,
            "peak_allocated_bytes": mem.peak_allocated_bytes,
        },
        remedy="sequence_parallel" if sp else "activation_checkpointing",
        severity="high" if mem.ooms else "medium",
    )


@rule("recompute_without_pressure", remedy="no_activation_checkpointing", reads="run", max_peak_share=0.5)
def recompute_without_pressure(m: Metrics, t: Thresholds) -> Diagnosis | None:
    """Activation checkpointing recomputes the forward pass in backward to save memory; when the
    peak leaves more than half the device free and the allocator never ran short, that recompute
    buys nothing. Whether the run checkpoints: its configuration when it has one, else its traces
    (forward-only ops run inside backward)."""
    configured = m.config.get("kernels", {}).get("activation_checkpointing")
    recomputed = max((r.recomputed_ops_per_step for r in m.trace.values()), default=0.0)
    if configured is not None:
        told_by = "the run's config (kernels.activation_checkpointing)"
    else:
        configured, told_by = recomputed > 0, "the trace's ops (forward ops run inside backward)"
    if not configured or m.steps is None:
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
            "recomputed_ops_per_step": recomputed,
            "told_by": told_by,
        },
    )


@rule(
    "allocator_fragmentation",
    remedy="expandable_segments",
    reads="snapshot",
    min_split_share=0.2,
    min_split_bytes=256 << 20,
)
def allocator_fragmentation(s: Snapshot, t: Thresholds) -> Diagnosis | None:
    """Free blocks stranded inside segments that also hold live tensors: reserved memory no large
    allocation can use."""
    split, reserved = s.summary["inactive_split_bytes"], s.summary["reserved_bytes"]
    if (
        s.summary.get("expandable_segments")
        or split < t["min_split_bytes"]
        or split < t["min_split_share"] * reserved
    ):
        return None
    return Diagnosis(
        title=f"The CUDA allocator's cache is fragmented: {split / 2**30:.1f} GiB free in split blocks",
        saving_ms=0.0,
        estimate="not estimated: it costs memory (and allocation retries), not time by itself",
        evidence={
            "inactive_split_share": round(split / max(1, reserved), 3),
            "reserved_gib": round(reserved / 2**30, 2),
            "snapshot": s.name,
        },
    )


@rule("allocator_cache_flushes", remedy=("expandable_segments", "activation_checkpointing"), reads="snapshot")
def allocator_cache_flushes(s: Snapshot, t: Thresholds) -> Diagnosis | None:
    """Segments given back to the driver outside an explicit empty_cache(): the allocator ran out,
    synchronized the device, freed its cache and retried."""
    flushes, ooms = s.summary.get("cache_flushes", 0), s.summary.get("history_ooms", 0)
    if not flushes and not ooms:
        return None
    return Diagnosis(
        title=f"The allocator flushed its cache {flushes} time(s)"
        + (f" and hit {ooms} OOM(s)" if ooms else "")
        + " to find memory",
        saving_ms=0.0,
        estimate="not estimated: each flush synchronizes the device",
        evidence={
            "cache_flushes": flushes,
            "ooms": ooms,
            "largest_holders": s.summary.get("by_category", {}),
            "snapshot": s.name,
        },
        remedy="expandable_segments"
        if not s.summary.get("expandable_segments")
        else "activation_checkpointing",
    )


@rule("memory_headroom", remedy="activation_checkpointing", reads="snapshot", max_peak_share=0.92)
def memory_headroom(s: Snapshot, t: Thresholds) -> Diagnosis | None:
    """The history's peak of reserved memory against the device's capacity (when known)."""
    peak = max(s.summary.get("history_peak_reserved_bytes", 0), s.summary["reserved_bytes"])
    if not s.capacity_bytes or peak <= t["max_peak_share"] * s.capacity_bytes:
        return None
    return Diagnosis(
        title=f"Reserved memory peaked at {peak / s.capacity_bytes:.0%} of the device: one step from an OOM",
        saving_ms=0.0,
        estimate="not estimated",
        evidence={
            "peak_reserved_gib": round(peak / 2**30, 2),
            "capacity_gib": round(s.capacity_bytes / 2**30, 2),
            "largest_holders": s.summary.get("by_category", {}),
        },
    )
