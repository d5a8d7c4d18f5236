"""Diagnosis rules: metrics in, findings out, ranked by the time they would save per step.

A finding carries id, title, severity, evidence (numbers, ranks, steps, kernel names), the ranks
it concerns, the estimated saving in ms per step, and a remedy: a config change of the reference
trainer that the optimizer can apply (``change``), or advice where no switch exists.
Severity follows the saving as a share of the step: high >= 10%, medium >= 3%, else low.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import pandas as pd
from perfkit.analyzers.breakdown import (
    exposed_communication,
    idle_attribution,
    profiler_steps,
    temporal_breakdown,
)
from perfkit.analyzers.trace import Trace, by_name


@dataclass(kw_only=True)
class Remedy:
    id: str
    description: str
    change: dict[str, Any] = field(default_factory=dict)


@dataclass(kw_only=True)
class Finding:
    id: str
    title: str
    severity: str
    evidence: dict[str, Any]
    ranks: list[int]
    saving_ms_per_step: float
    remedy: Remedy

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def severity(saving_ms: float, step_ms: float | None) -> str:
    share = saving_ms / step_ms if step_ms else 0.0
    return "high" if share >= 0.10 else "medium" if share >= 0.03 else "low"


@dataclass
class TraceFacts:
    """What the rules need from one rank's trace, computed once."""

    rank: int
    steps: int
    step_ms: float
    breakdown: dict[str, float]
    idle: dict[str, float]
    exposed: dict[str, float]
    gemm_fp32_ns: int
    gemm_ns: int
    fp32_kernels: list[str]
    cpu_ops: pd.Series  # name -> count
    pageable_h2d_ns: int
    pageable_h2d: int
    attention_kernel_ns: int
    item_calls: int
    """aten::item calls outside the optimizer step (AdamW reads its step counters with .item())."""


def _items_outside_optimizer(ev: pd.DataFrame) -> int:
    items = ev[(ev["name"] == "aten::item").to_numpy()]
    opt = ev[by_name(ev["name"], lambda n: n.startswith("Optimizer.step#"), bool)]
    if items.empty or opt.empty:
        return len(items)
    starts, ends = opt["ts"].to_numpy(), opt["end"].to_numpy()
    order = starts.argsort()
    starts, ends = starts[order], ends[order]
    k = starts.searchsorted(items["ts"].to_numpy(), side="right") - 1
    inside = (k >= 0) & (items["ts"].to_numpy() <= ends[k.clip(0)])
    return int((~inside).sum())


def trace_facts(trace: Trace) -> TraceFacts:
    ps = profiler_steps(trace)
    gpu = trace.gpu
    breakdown = temporal_breakdown(trace)
    n_steps = max(1, len(ps))
    if len(ps):
        step_ms = float(ps["dur"].median() / 1e6)
    elif breakdown:
        step_ms = breakdown["span_ns"] / 1e6
    else:
        ev = trace.events
        step_ms = float((ev["end"].max() - ev["ts"].min()) / 1e6)
    gemm = gpu[gpu["category"] == "gemm"]
    fp32 = gemm[gemm["precision"] == "fp32"]
    ev = trace.events
    cpu_ops = ev[ev["cat"].isin(("cpu_op", "user_annotation")).to_numpy()]["name"].value_counts()
    cpu_ops = cpu_ops[cpu_ops > 0]
    cpu_ops.index = cpu_ops.index.astype(str)
    memcpy = gpu[by_name(gpu["name"], lambda n: "Pageable -> Device" in n, bool)]
    return TraceFacts(
        rank=trace.rank,
        steps=n_steps,
        step_ms=step_ms,
        breakdown=breakdown,
        idle=idle_attribution(trace),
        exposed=exposed_communication(trace),
        gemm_fp32_ns=int(fp32["dur"].sum()),
        gemm_ns=int(gemm["dur"].sum()),
        fp32_kernels=fp32.groupby(fp32["name"].astype(str))["dur"].sum().nlargest(3).index.tolist(),
        cpu_ops=cpu_ops,
        pageable_h2d_ns=int(memcpy["dur"].sum()),
        pageable_h2d=len(memcpy),
        attention_kernel_ns=int(gpu[gpu["category"] == "attention"]["dur"].sum()),
        item_calls=_items_outside_optimizer(ev),
    )


def _ops(f: TraceFacts, *names: str) -> int:
    return int(sum(f.cpu_ops.get(n, 0) for n in names))


def _has_op(f: TraceFacts, fragment: str) -> bool:
    return bool(f.cpu_ops.index.str.contains(fragment, regex=False).any())


def trace_rules(facts: list[TraceFacts]) -> list[Finding]:
    """Rules over each rank's trace; a finding names every rank where it holds, with the worst
    rank's numbers as evidence."""
    found: dict[str, list[tuple[TraceFacts, Finding]]] = {}
    for f in facts:
        for finding in _trace_findings(f):
            found.setdefault(finding.id, []).append((f, finding))
    out = []
    for pairs in found.values():
        worst = max(pairs, key=lambda p: p[1].saving_ms_per_step)[1]
        worst.ranks = sorted(p[0].rank for p in pairs)
        out.append(worst)
    return out


def _trace_findings(f: TraceFacts) -> list[Finding]:
    out: list[Finding] = []
    per_step = 1 / (f.steps * 1e6)  # ns over the trace -> ms per step
    b, idle = f.breakdown, f.idle
    span = b.get("span_ns", 0)

    def add(id: str, title: str, saving_ms: float, evidence: dict[str, Any], remedy: Remedy) -> None:
        out.append(
            Finding(
                id=id,
                title=title,
                severity=severity(saving_ms, f.step_ms),
                evidence=evidence,
                ranks=[f.rank],
                saving_ms_per_step=round(min(saving_ms, f.step_ms), 3),
                remedy=remedy,
            )
        )

    if span and idle.get("host_launch_ns", 0) > 0.15 * span:
        add(
            "host_launch_bound",
            "GPU waits for the CPU to launch kernels (launch-bound)",
            idle["host_launch_ns"] * per_step,
            {
                "gpu_busy_pct": round(100 - b["idle_pct"], 1),
                "launch_idle_pct_of_span": round(100 * idle["host_launch_ns"] / span, 1),
                "kernels_per_step": int(len_gpu_per_step(f)),
            },
            Remedy(
                id="compile",
                description="Fuse kernels with torch.compile (or CUDA graphs); a larger "
                "micro-batch also gives each launch more work.",
                change={"kernels.compile": True},
            ),
        )
    syncs = f.item_calls / f.steps
    if span and (idle.get("sync_ns", 0) > 0.05 * span or syncs >= 1):
        add(
            "host_device_sync",
            "Host-device synchronization inside the step",
            idle.get("sync_ns", 0) * per_step,
            {
                "sync_idle_pct_of_span": round(100 * idle.get("sync_ns", 0) / span, 1) if span else 0,
                "item_calls_per_step": round(syncs, 1),
            },
            Remedy(
                id="avoid_sync",
                description="Avoid .item()/.cpu()/print of tensors every step; log "
                "every N steps (log_every).",
                change={"log_every": 10},
            ),
        )
    elif not span and syncs >= 1:
        add(
            "host_device_sync",
            "Host-device synchronization inside the step (.item() each step)",
            0.0,
            {"item_calls_per_step": round(syncs, 1)},
            Remedy(
                id="avoid_sync",
                description="Avoid .item() every step; log every N steps.",
                change={"log_every": 10},
            ),
        )
    if span and idle.get("input_ns", 0) > 0.05 * span:
        add(
            "input_stall",
            "GPU idle while the input pipeline produces the batch",
            idle["input_ns"] * per_step,
            {"input_idle_pct_of_span": round(100 * idle["input_ns"] / span, 1)},
            Remedy(
                id="more_workers",
                description="More DataLoader workers and prefetch.",
                change={"data.num_workers": 4, "data.prefetch_factor": 4},
            ),
        )
    if f.gemm_ns and f.gemm_fp32_ns > 0.10 * f.gemm_ns:
        add(
            "fp32_gemm",
            "Matrix multiplies run in FP32 without tensor cores",
            0.7 * f.gemm_fp32_ns * per_step,
            {"fp32_gemm_share": round(f.gemm_fp32_ns / f.gemm_ns, 3), "kernels": f.fp32_kernels},
            Remedy(
                id="bf16",
                description="bf16 autocast (or TF32: torch.backends.cuda.matmul.allow_tf32).",
                change={"kernels.precision": "bf16"},
            ),
        )
    softmax = _ops(f, "aten::softmax", "aten::_softmax")
    fused_attention = _has_op(f, "scaled_dot_product") or _has_op(f, "flash") or f.attention_kernel_ns > 0
    if softmax and not fused_attention:
        add(
            "unfused_attention",
            "Attention computed op by op (matmul, mask, softmax) instead of a fused kernel",
            0.0,
            {"softmax_calls_per_step": round(softmax / f.steps, 1)},
            Remedy(
                id="sdpa",
                description="Use scaled_dot_product_attention (flash / memory-efficient kernels).",
                change={"kernels.attention": "sdpa"},
            ),
        )
    opt_steps = int(f.cpu_ops[f.cpu_ops.index.str.startswith("Optimizer.step#")].sum())
    if opt_steps and not (_has_op(f, "_fused_adam") or _has_op(f, "_fused_sgd")):
        foreach = _has_op(f, "aten::_foreach_")
        add(
            "unfused_optimizer",
            "Optimizer "
            + (
                "uses foreach kernels, not the fused one"
                if foreach
                else "updates each parameter with its own kernels"
            ),
            0.0,
            {"implementation": "foreach" if foreach else "per-parameter loop"},
            Remedy(
                id="fused_optimizer",
                description="AdamW(fused=True).",
                change={"kernels.optimizer_impl": "fused"},
            ),
        )
    ex = f.exposed
    if span and ex.get("exposed_ns", 0) > 0.10 * span:
        add(
            "exposed_communication",
            "Communication not overlapped with compute",
            ex["exposed_ns"] * per_step,
            {
                "overlap_pct": round(ex["overlap_pct"], 1),
                "exposed_pct_of_span": round(100 * ex["exposed_ns"] / span, 1),
            },
            Remedy(
                id="overlap",
                description="Overlap gradient communication with backward: larger DDP buckets "
                "issued earlier, FSDP prefetch, or fewer collectives.",
                change={"overlap.bucket_cap_mb": 25},
            ),
        )
    if f.pageable_h2d:
        add(
            "pageable_h2d",
            "Host-to-device copies from pageable memory (synchronous, slower)",
            0.5 * f.pageable_h2d_ns * per_step,
            {"copies": f.pageable_h2d, "time_ms": round(f.pageable_h2d_ns / 1e6, 3)},
            Remedy(
                id="pin_memory",
                description="pin_memory=True in the DataLoader and .to(non_blocking=True).",
                change={"data.pin_memory": True},
            ),
        )
    return out


def len_gpu_per_step(f: TraceFacts) -> float:
    return f.breakdown.get("kernels", 0) / f.steps if f.breakdown else 0.0


def run_rules(metrics: dict[str, Any]) -> list[Finding]:
    """Rules over the run tables' metrics."""
    out: list[Finding] = []
    steps = metrics.get("steps", {})
    step_ms = steps.get("step_time_ms")
    if not step_ms:
        return out

    def add(
        id: str, title: str, saving_ms: float, evidence: dict[str, Any], ranks: list[int], remedy: Remedy
    ) -> None:
        out.append(
            Finding(
                id=id,
                title=title,
                severity=severity(saving_ms, step_ms),
                evidence=evidence,
                ranks=ranks,
                saving_ms_per_step=round(min(saving_ms, step_ms), 3),  # never more than the step
                remedy=remedy,
            )
        )

    io = metrics.get("io", {})
    if io.get("data_wait_share", 0) > 0.05:
        add(
            "input_stall",
            "Training waits for the input pipeline",
            io["data_wait_ms"],
            {
                "data_wait_share": round(io["data_wait_share"], 3),
                "data_wait_ms": round(io["data_wait_ms"], 2),
                "read_latency_p99_ms": io.get("read_latency_p99_ms"),
            },
            [],
            Remedy(
                id="more_workers",
                description="More DataLoader workers and prefetch.",
                change={"data.num_workers": 4, "data.prefetch_factor": 4},
            ),
        )
    st = metrics.get("stragglers", {})
    if st.get("slow"):
        ranks = {r["rank"]: r for r in st["ranks"]}
        fastest = min(r["busy_ms"] for r in st["ranks"])
        worst = max(st["slow"], key=lambda k: ranks[k]["busy_ms"])
        add(
            "straggler",
            f"Rank {worst} is a straggler: the others wait for it in every collective",
            ranks[worst]["busy_ms"] - fastest,
            {"ranks": [ranks[k] for k in st["slow"]], "fastest_busy_ms": round(fastest, 2)},
            st["slow"],
            Remedy(
                id="straggler",
                description="Find what is slow on that rank (its host, data shard, thermal "
                "throttling in NVML); rebalance or exclude the node.",
            ),
        )
    comm = metrics.get("comms", {})
    n, size = comm.get("ddp_buckets_per_step", 0), comm.get("ddp_bucket_bytes", 0)
    if n > 8 and size < 4 << 20:
        table = pd.DataFrame(comm.get("table", []))
        ar = table[table["op"] == "all_reduce"] if not table.empty else table
        per_op_ms = float(ar["time_ms"].sum() / max(1, ar["count"].sum())) if not ar.empty else 0.0
        ideal = max(1, int(n * size / (25 << 20)) + 1)
        # The buckets' all-reduces overlap one another: their summed time can pass the step time.
        # Their cost lands in the backward phase, where DDP launches them and waits for the last.
        backward_ms = steps.get("phase_share", {}).get("backward", 1.0) * step_ms
        add(
            "small_ddp_buckets",
            "Gradients all-reduced in many tiny buckets",
            min(per_op_ms * (n - ideal), backward_ms),
            {"buckets_per_step": n, "bucket_kib": round(size / 1024, 1)},
            [],
            Remedy(
                id="bucket_size",
                description="Larger DDP buckets (bucket_cap_mb, default 25).",
                change={"overlap.bucket_cap_mb": 25},
            ),
        )
    io_ck = io.get("checkpoint_save_ms_max", 0)
    every = metrics.get("config", {}).get("checkpoint", {}).get("every") or steps.get("steps", 1)
    if io_ck > 2 * step_ms:
        add(
            "checkpoint_stall",
            "Training stalls while checkpoints are written",
            io_ck / max(1, every),
            {"save_ms": round(io_ck, 1), "every_steps": every, "saves": io.get("checkpoint_saves")},
            [],
            Remedy(
                id="async_checkpoint",
                description="Save asynchronously (DCP async_save).",
                change={"checkpoint.async_save": True},
            ),
        )
    mem = metrics.get("memory", {})
    if mem.get("alloc_retries", 0) > 0 or mem.get("ooms", 0) > 0:
        parallel = metrics.get("config", {}).get("parallel", {})
        if parallel.get("tp", 1) > 1 and not parallel.get("sequence_parallel"):
            # Sharding the norms' and residual activations over the TP ranks costs no recompute.
            remedy = Remedy(
                id="sequence_parallel",
                description="Sequence parallelism: shard the activations outside attention and MLP "
                "over the tensor-parallel ranks (then activation checkpointing if still short).",
                change={"parallel.sequence_parallel": True},
            )
        else:
            remedy = Remedy(
                id="memory",
                description="Activation checkpointing, smaller micro-batch, or "
                "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True.",
                change={"kernels.activation_checkpointing": True},
            )
        add(
            "memory_pressure",
            "The CUDA allocator ran out of free blocks (retries / OOM)",
            0.05 * step_ms,
            {k: mem.get(k) for k in ("alloc_retries", "ooms", "fragmentation", "peak_allocated_bytes")},
            [],
            remedy,
        )
    tp = metrics.get("throughput", {})
    if tp.get("mfu") is not None and tp["mfu"] < 0.30:
        add(
            "low_mfu",
            f"Model FLOPs utilization is {tp['mfu']:.0%}",
            0.0,
            {"mfu": round(tp["mfu"], 3)},
            [],
            Remedy(id="see_causes", description="See the findings above for its causes."),
        )
    return out


def rank(findings: list[Finding]) -> list[Finding]:
    """Merge duplicates (the same id from tables and traces: keep the larger saving), then rank."""
    best: dict[str, Finding] = {}
    for f in findings:
        if f.id not in best or f.saving_ms_per_step > best[f.id].saving_ms_per_step:
            if f.id in best:
                f.ranks = sorted(set(f.ranks) | set(best[f.id].ranks))
            best[f.id] = f
    order = {"high": 0, "medium": 1, "low": 2}
    return sorted(best.values(), key=lambda f: (order[f.severity], -f.saving_ms_per_step))
