"""Input and I/O: the step waits for its batch, its copy to the device, or a checkpoint."""

from __future__ import annotations

from perfkit.analyzers.facts import TraceFacts
from perfkit.analyzers.metrics import Metrics
from perfkit.analyzers.rules import Diagnosis, Thresholds, rule


@rule("input_stall", remedy="more_workers", reads="trace", min_idle_share=0.05)
def input_stall_in_trace(f: TraceFacts, t: Thresholds) -> Diagnosis | None:
    span, idle = f.breakdown.get("span_ns", 0), f.idle.get("input_ns", 0)
    if not span or idle <= t["min_idle_share"] * span:
        return None
    return Diagnosis(
        title="GPU idle while the input pipeline produces the batch",
        saving_ms=idle / (f.gpu_steps * 1e6),
        estimate="GPU idle while the CPU waited for the next batch",
        evidence={"input_idle_pct_of_span": round(100 * idle / span, 1)},
    )


@rule("input_stall", remedy="more_workers", reads="run", min_wait_share=0.05)
def input_stall_in_steps(m: Metrics, t: Thresholds) -> Diagnosis | None:
    io = m.io
    if io is None or io.data_wait_share is None or io.data_wait_share <= t["min_wait_share"]:
        return None
    return Diagnosis(
        title="Training waits for the input pipeline",
        saving_ms=io.data_wait_ms or 0.0,
        estimate="median time per step the loop waited for its next batch",
        evidence={
            "data_wait_share": round(io.data_wait_share, 3),
            "data_wait_ms": round(io.data_wait_ms or 0.0, 2),
            "read_latency_p99_ms": io.read_latency_p99_ms,
        },
    )


@rule("pageable_h2d", remedy="pin_memory", reads="trace", medium_share=0.05)
def pageable_h2d(f: TraceFacts, t: Thresholds) -> Diagnosis | None:
    """Not estimated: pinned copies with non_blocking=True may hide behind compute entirely or not at
    all, which the trace of pageable ones cannot tell (the saving had been a fixed 50%). The copies'
    own time a step bounds it; their share of the step sets the severity."""
    if not f.pageable_h2d:
        return None
    per_step_ms = f.pageable_h2d_ns / (f.gpu_steps * 1e6)
    share = per_step_ms / f.step_ms if f.step_ms else 0.0
    return Diagnosis(
        title="Host-to-device copies from pageable memory (synchronous, slower)",
        saving_ms=0.0,
        estimate=f"not estimated: at most the copies' own {per_step_ms:.2f} ms a step, if pinned copies hide "
        "behind compute entirely",
        evidence={
            "copies": f.pageable_h2d,
            "time_ms": round(f.pageable_h2d_ns / 1e6, 3),
            "share_of_step": round(share, 3),
        },  # fmt: skip
        severity="medium" if share >= t["medium_share"] else "low",
    )


@rule("checkpoint_stall", remedy="async_checkpoint", reads="run", min_save_in_steps=2)
def checkpoint_stall(m: Metrics, t: Thresholds) -> Diagnosis | None:
    io, step_ms = m.io, m.step_ms or 0.0
    save_ms = io.checkpoint_save_ms_max if io and io.checkpoint_save_ms_max else 0.0
    if save_ms <= t["min_save_in_steps"] * step_ms:
        return None
    every = m.config.get("checkpoint", {}).get("every") or (m.steps.steps if m.steps else 1)
    return Diagnosis(
        title="Training stalls while checkpoints are written",
        saving_ms=save_ms / max(1, every),
        estimate="the longest save, spread over the steps between saves",
        evidence={
            "save_ms": round(save_ms, 1),
            "every_steps": every,
            "saves": io.checkpoint_saves if io else None,
        },
    )
