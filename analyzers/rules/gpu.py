"""GPU time: kernels launched too slowly, run in the wrong precision, or not fused; and a GPU that
NVML says is slowed or failing."""

from __future__ import annotations

from typing import Any

from perfkit.analyzers.facts import TraceFacts, has_op, kernels_per_step, ops
from perfkit.analyzers.metrics import Metrics
from perfkit.analyzers.remedies import Remedy, register
from perfkit.analyzers.rules import Diagnosis, Thresholds, rule
from perfkit.collectors.signals.nvml import NvmlHealth


@rule(
    "host_launch_bound",
    remedy=("compile", "cuda_graphs", "larger_microbatch"),
    reads="trace",
    min_idle_share=0.15,
)
def host_launch_bound(f: TraceFacts, t: Thresholds) -> Diagnosis | None:
    span, launch = f.breakdown.get("span_ns", 0), f.idle.get("host_launch_ns", 0)
    if not span or launch <= t["min_idle_share"] * span:
        return None
    # The fix depends on what the step already does: compiling an eager loop fuses its kernels; a
    # compiled one still launch-bound needs CUDA graphs (one launch a graph) or more work a launch;
    # one already in CUDA graphs, only more work a launch.
    remedy = {"": "compile", "torch.compile": "cuda_graphs", "cuda graphs": "larger_microbatch"}[f.compiled]
    return Diagnosis(
        title="GPU waits for the CPU to launch kernels (launch-bound)"
        + (f" although the step runs under {f.compiled}" if f.compiled else ""),
        saving_ms=launch / (f.gpu_steps * 1e6),
        estimate="GPU idle between kernels while the CPU was launching the next ones",
        evidence={
            "gpu_busy_pct": round(100 - f.breakdown["idle_pct"], 1),
            "launch_idle_pct_of_span": round(100 * launch / span, 1),
            "kernels_per_step": int(kernels_per_step(f)),
            **(
                {"already": f.compiled, "told_by": "the trace's compiled regions or graph launches"}
                if f.compiled
                else {}
            ),
        },  # fmt: skip
        remedy=remedy,
    )


@rule("fp32_gemm", remedy="bf16", reads="trace", min_fp32_share=0.10, high_share=0.5)
def fp32_gemm(f: TraceFacts, t: Thresholds) -> Diagnosis | None:
    if not f.gemm_ns or f.gemm_fp32_ns <= t["min_fp32_share"] * f.gemm_ns:
        return None
    # The kernels say what ran; a configuration saying otherwise (bf16 with FP32 GEMMs left: layers
    # outside autocast) is named beside them.
    configured = f.config.get("kernels", {}).get("precision")
    share = f.gemm_fp32_ns / f.gemm_ns
    fp32_ms = f.gemm_fp32_ns / (f.gpu_steps * 1e6)
    evidence: dict[str, object] = {
        "fp32_gemm_share": round(share, 3),
        "kernels": f.fp32_kernels,
        "told_by": "the trace's GEMM kernels (SIMT FP32, no tensor cores)",
    }
    if configured is not None:
        evidence["configured_precision"] = configured
    return Diagnosis(
        title="Matrix multiplies run in FP32 without tensor cores"
        + (" although the run is configured for bf16" if configured == "bf16" else ""),
        # Not estimated (it had been a fixed 70%): a compute-bound GEMM gains the ratio of the GPU's
        # tensor-core and FP32 peaks, a memory-bound one little; the trace cannot tell which. Their
        # share of the GEMM time sets the severity.
        saving_ms=0.0,
        estimate=f"not estimated: at most the FP32 GEMMs' own {fp32_ms:.2f} ms a step; compute-bound ones gain "
        "most in bf16, memory-bound ones little",
        evidence=evidence,
        severity="high" if share >= t["high_share"] else "medium",
    )


@rule("unfused_attention", remedy="sdpa", reads="trace")
def unfused_attention(f: TraceFacts, t: Thresholds) -> Diagnosis | None:
    softmax = ops(f, "aten::softmax", "aten::_softmax")
    configured = f.config.get("kernels", {}).get("attention")
    if configured is not None:  # the run says what it used
        if configured != "eager":
            return None
        evidence: dict[str, object] = {"attention": "eager", "told_by": "the run's config"}
    else:
        fused = has_op(f, "scaled_dot_product") or has_op(f, "flash") or f.attention_kernel_ns > 0
        if not softmax or fused:
            return None
        evidence = {"told_by": "the trace's ops (softmax, no fused attention)"}
    evidence["softmax_calls_per_step"] = round(softmax / f.steps, 1)
    return Diagnosis(
        title="Attention computed op by op (matmul, mask, softmax) instead of a fused kernel",
        saving_ms=0.0,
        estimate="not estimated",
        evidence=evidence,
    )


@rule("fusion_candidates", remedy=("compile", "fused_optimizer"), reads="trace", min_share=0.03)
def fusion_candidates(f: TraceFacts, t: Thresholds) -> Diagnosis | None:
    """Short kernels (ops) back to back on the critical path every step: each launch, gap and
    dispatch between them is on the path, and one fused kernel would have none of them."""
    cp = f.critical_path
    if cp is None or not cp.fusion or cp.fusable_ms < t["min_share"] * cp.step_ms:
        return None
    top = cp.fusion[0]
    # in-place updates one after another, in an eager optimizer: its fused kernel is the fusion
    optimizer = f.optimizer_impl not in (None, "fused") and all(op.endswith("_") for op in top.ops)
    if f.compiled and not optimizer:
        return None  # ops left outside an already compiled step: the report lists them, no fix to name
    return Diagnosis(
        title=f"Short kernels back to back on the critical path: fusing them takes up to "
        f"{cp.fusable_ms:.3g} ms a step off it ({' → '.join(top.ops)}, {top.per_step:g} times a step)",
        saving_ms=cp.fusable_ms,
        estimate="the path's launch, gap and dispatch time between short kernels (ops) back to back on it",
        evidence={
            "candidates": [
                {
                    "ops": c.ops,
                    "per_step": c.per_step,
                    "saving_ms": c.saving_ms,
                    **({"inside": c.inside} if c.inside else {}),
                }
                for c in cp.fusion[:3]
            ],
            "critical_path_ms": cp.length_ms,
        },
        remedy="fused_optimizer" if optimizer else "compile",
    )


_IMPL_TITLE = {
    "foreach": "uses foreach kernels, not the fused one",
    "per-parameter": "updates each parameter with its own kernels",
    "unfused": "updates each parameter with its own kernels",
}


@rule("unfused_optimizer", remedy="fused_optimizer", reads="trace")
def unfused_optimizer(f: TraceFacts, t: Thresholds) -> Diagnosis | None:
    configured = f.config.get("kernels", {}).get("optimizer_impl")
    impl, told_by = (configured, "the run's config") if configured else (f.optimizer_impl, "the trace's ops")
    if impl is None or impl == "fused" or f.optimizer_impl is None:  # no optimizer step in the trace
        return None
    return Diagnosis(
        title=f"Optimizer {_IMPL_TITLE.get(impl, impl)}",
        saving_ms=0.0,
        estimate="not estimated",
        evidence={"implementation": impl, "told_by": told_by},
    )


@rule("low_mfu", remedy="see_causes", reads="run", max_mfu=0.30)
def low_mfu(m: Metrics, t: Thresholds) -> Diagnosis | None:
    mfu = m.throughput.mfu if m.throughput else None
    if mfu is None or mfu >= t["max_mfu"]:
        return None
    return Diagnosis(
        title=f"Model FLOPs utilization is {mfu:.0%}",
        saving_ms=0.0,
        estimate="not estimated: the other findings name its causes",
        evidence={"mfu": round(mfu, 3)},
    )


@rule("slow_gpu", remedy="slow_gpu", reads="run", needs_steps=False)
def slow_gpu(m: Metrics, t: Thresholds) -> Diagnosis | None:
    sp = m.rank_spread
    if sp is None or not sp.slow_gpu:
        return None
    ranks = {r.rank: r for r in sp.ranks}
    worst = max(sp.slow_gpu, key=lambda k: ranks[k].compute_ms / ranks[k].peer_compute_ms)
    ratio = ranks[worst].compute_ms / ranks[worst].peer_compute_ms
    return Diagnosis(
        title=f"Rank {worst}'s GPU computes {100 * (ratio - 1):.0f}% slower than the others' "
        "(the others wait for it)",
        saving_ms=ranks[worst].compute_ms - ranks[worst].peer_compute_ms,
        estimate="its compute kernels' time beyond its peers' median: the others wait that long",
        evidence={
            "ranks": [
                {
                    "rank": k,
                    "compute_ms": round(ranks[k].compute_ms, 2),
                    "peers_median_ms": round(ranks[k].peer_compute_ms, 2),
                }
                for k in sp.slow_gpu
            ],
        },
        ranks=list(sp.slow_gpu),
    )


register(
    Remedy(
        id="gpu_health",
        description="Check the GPU named: nvidia-smi -q -d PERFORMANCE,TEMPERATURE,POWER,ECC for its "
        "throttle reasons, cooling and errors, dmesg for the XID; drain the node from the job's pool "
        "until it is fixed (an XID or uncorrectable ECC error needs a GPU reset or replacement).",
    )
)


@rule("gpu_health", remedy="gpu_health", reads="run", needs_steps=False)
def gpu_health(m: Metrics, t: Thresholds) -> Diagnosis | None:
    """A GPU that NVML says was slowed against the work's wish (a hardware slowdown, thermal or
    power-brake throttle, a software power cap) or broke (an XID error, new uncorrectable ECC errors,
    NVLink or PCIe replays): from the run's NVML rows and, in a watched job, the watcher's anomalies
    (the rows of a week-long job are not all kept)."""
    events: list[dict[str, Any]] = []
    health = m.signals.get("nvml")
    if isinstance(health, NvmlHealth):
        events += health.events
    if m.watch is not None:
        for a in m.watch.anomalies:
            if a.get("kind") == "gpu_health":
                ev = a.get("evidence") or {}
                events.append({**ev, "rank": (a.get("ranks") or [None])[0], "step": a.get("start_step")})
    if not events:
        return None
    seen: dict[tuple[Any, Any, Any], dict[str, Any]] = {}
    for e in events:
        seen.setdefault((e.get("rank"), e.get("gpu"), e.get("event")), e)
    listed = list(seen.values())
    first = listed[0]
    where = f"rank {first.get('rank')}" + (f" GPU {first['gpu']}" if first.get("gpu") is not None else "")
    more = f" (and {len(listed) - 1} more)" if len(listed) > 1 else ""
    return Diagnosis(
        title=f"GPU health: {first.get('event')} on {where}{more}",
        saving_ms=0.0,
        estimate="not a time: a slowed or failing GPU (its clocks, its errors) makes every step of the job wait",
        evidence={"events": listed[:20]},
        ranks=sorted({int(e["rank"]) for e in listed if e.get("rank") is not None}),
        severity="high",
    )
