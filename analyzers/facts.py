"""Facts the diagnosis rules share, computed once per rank's trace (in the worker that parsed it),
apart from the rules themselves."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from perfkit.analyzers.breakdown import (
    exposed_communication,
    idle_attribution,
    profiler_steps,
    temporal_breakdown,
)
from perfkit.analyzers.critical_path import trace_path
from perfkit.analyzers.metrics import PathSummary
from perfkit.analyzers.trace import Trace, by_name


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
    comm_kernel_ns: int = 0
    """Communication kernels' summed time (overlapped or not): under synchronous collectives it
    holds the time a rank waited for the last one to arrive."""
    comm_groups: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Communication kernels by process group (where the trace names it): ``ranks`` (or None),
    ``calls``, ``ns``."""
    optimizer_impl: str | None = None
    """fused, foreach or per-parameter, from the ops inside the optimizer's steps; None: no step seen."""
    recomputed_ops: int = 0
    """Forward-only ops (layer norm, GELU, softmax, fused attention's forward, embedding) run inside
    backward: the activation-checkpointing recompute, whichever API made it."""
    compiled: str = ""
    """How the step already runs, from the trace: "cuda graphs" (graph launches), "torch.compile"
    (compiled regions), else ""."""
    critical_path: PathSummary | None = None
    """The steps' critical path (``perfkit.analyzers.critical_path``)."""
    config: dict[str, Any] = field(default_factory=dict)
    """The bundled trainer's configuration when the trace is part of its run (set by the analysis):
    what the run used, told by the run itself."""

    @property
    def gpu_steps(self) -> float:
        """How many steps the GPU's span covers: GPU time (idle, kernels) over the trace divided by
        this is per step. The profiled steps' first one usually begins before any GPU work, so
        dividing by the step count would understate a per-step cost by up to one step in N."""
        span = self.breakdown.get("span_ns", 0) if self.breakdown else 0
        if span and self.step_ms and self.steps > 1:
            return min(float(self.steps), max(1.0, span / (self.step_ms * 1e6)))
        return float(self.steps)


def _inside(events: pd.DataFrame, spans: pd.DataFrame) -> np.ndarray:
    """Which of ``events`` start inside one of ``spans`` (optimizer steps; nested or overlapping
    spans too, e.g. autograd's evaluate_function calls)."""
    if events.empty or spans.empty:
        return np.zeros(len(events), dtype=bool)
    starts, ends = spans["ts"].to_numpy(), spans["end"].to_numpy()
    order = starts.argsort()
    starts, ends = starts[order], np.maximum.accumulate(ends[order])
    ts = events["ts"].to_numpy()
    k = starts.searchsorted(ts, side="right") - 1
    return (k >= 0) & (ts <= ends[k.clip(0)])


def _optimizer_facts(ev: pd.DataFrame) -> tuple[int, str | None]:
    """aten::item calls outside the optimizer step (AdamW reads its step counters with .item()),
    and the optimizer's implementation as the ops inside its steps show it: fused, foreach or
    per-parameter (None without optimizer steps). Only ops inside the step count: gradient clipping
    runs foreach kernels of its own just before it."""
    items = ev[(ev["name"] == "aten::item").to_numpy()]
    opt = ev[by_name(ev["name"], lambda n: n.startswith("Optimizer.step#"), bool)]
    outside = int((~_inside(items, opt)).sum())
    if opt.empty:
        return outside, None
    kind = by_name(
        ev["name"], lambda n: "fused" if "_fused_" in n else "foreach" if "_foreach_" in n else "", object
    )
    candidates = ev[kind != ""]
    inside = candidates[_inside(candidates, opt)]
    kinds = set(by_name(inside["name"], lambda n: "fused" if "_fused_" in n else "foreach", object))
    return outside, "fused" if "fused" in kinds else "foreach" if "foreach" in kinds else "per-parameter"


def trace_facts(trace: Trace) -> TraceFacts:
    ps = profiler_steps(trace)
    items, optimizer_impl = _optimizer_facts(trace.events)
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
    comm = gpu[(gpu["category"] == "communication").to_numpy()]
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
        item_calls=items,
        optimizer_impl=optimizer_impl,
        comm_kernel_ns=int(comm["dur"].sum()),
        comm_groups=_comm_groups(trace, comm),
        recomputed_ops=recomputed_ops(ev),
        compiled=_compiled(ev),
        critical_path=trace_path(trace),
    )


def _compiled(ev: pd.DataFrame) -> str:
    """What the trace says of compilation: CUDA graph launches, else torch.compile's regions."""
    names = [str(n) for n in ev["name"].unique()]
    if any(n.startswith("cudaGraphLaunch") for n in names):
        return "cuda graphs"
    if any(n.startswith(("Torch-Compiled Region", "CompiledFunction")) for n in names):
        return "torch.compile"
    return ""


# Ops a forward pass runs and a backward pass never does. Backward has its own ops, and their names
# share the forward's stem (aten::_scaled_dot_product_flash_attention_for_cpu_backward,
# _scaled_dot_product_cudnn_attention_backward, native_layer_norm_backward): anything named for a
# backward is never a forward op, whatever the pattern would match.
_FORWARD_ONLY = re.compile(
    r"^aten::(native_layer_norm|layer_norm|rms_norm|_fused_rms_norm|relu|gelu|silu|_softmax|embedding"
    r"|scaled_dot_product_attention|_scaled_dot_product_(flash|efficient|cudnn|fused)_attention(_for_cpu)?"
    r"|_scaled_dot_product_attention_math|_(flash|efficient|cudnn)_attention(_forward)?)$"
)


def is_forward_op(name: str) -> bool:
    """An op that only a forward pass runs (never one named for a backward)."""
    return "backward" not in name and bool(_FORWARD_ONLY.match(name))


def recomputed_ops(ev: pd.DataFrame) -> int:
    """How many forward-only ops ran inside backward (``autograd::engine::evaluate_function``
    spans of the same thread): activation checkpointing's recompute. Non-reentrant checkpointing
    leaves no op of its own in a trace; this is what it leaves."""
    cpu = ev[(ev["cat"] == "cpu_op").to_numpy()]
    if cpu.empty:
        return 0
    names = cpu["name"]
    backward = cpu[by_name(names, lambda n: n.startswith("autograd::engine::evaluate_function"), bool)]
    forward = cpu[by_name(names, is_forward_op, bool)]
    return sum(
        int(_inside(forward[(forward["tid"] == tid).to_numpy()], spans).sum())
        for tid, spans in backward.groupby("tid", observed=True)
    )


def _comm_groups(trace: Trace, comm: pd.DataFrame) -> dict[str, dict[str, Any]]:
    """Communication kernels by the process group their arguments name (torch >= 2.2 writes
    "Process Group Name" and "Process Group Ranks" on NCCL kernels)."""
    args = trace.comm_args
    if comm.empty or args.empty or "pg_name" not in args:
        return {}
    named = args.reindex(comm.index)
    out: dict[str, dict[str, Any]] = {}
    for (name, ranks), dur in comm["dur"].groupby(
        [named["pg_name"].astype(str).to_numpy(), named["pg_ranks"].astype(str).to_numpy()]
    ):
        if name in ("None", "nan"):
            continue
        out[str(name)] = {"ranks": _rank_list(str(ranks)), "calls": int(len(dur)), "ns": int(dur.sum())}
    return out


def _rank_list(text: str) -> list[int] | None:
    """``"[0, 1, 2]"`` as a list; None when it does not read as one."""
    try:
        ranks = [int(x) for x in text.strip("[] ").split(",") if x.strip()]
    except ValueError:
        return None
    return ranks or None


def ops(f: TraceFacts, *names: str) -> int:
    """How many times the trace ran these CPU ops."""
    return int(sum(f.cpu_ops.get(n, 0) for n in names))


def has_op(f: TraceFacts, fragment: str) -> bool:
    """Whether any CPU op's name contains ``fragment``."""
    return bool(f.cpu_ops.index.str.contains(fragment, regex=False).any())


def kernels_per_step(f: TraceFacts) -> float:
    return f.breakdown.get("kernels", 0) / f.steps if f.breakdown else 0.0
