"""Where GPU time goes: the temporal breakdown (compute / communication / memory / idle), the
attribution of idle time to its causes, and how much communication is exposed.

Intervals are merged with numpy (sort, running max of ends): a union over 100k kernels costs
milliseconds.
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
from perfkit.analyzers.trace import Trace, by_name


def merge(starts: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The union of [start, end) intervals as disjoint sorted intervals."""
    if len(starts) == 0:
        return starts, ends
    order = np.argsort(starts, kind="stable")
    s, e = starts[order], ends[order]
    running = np.maximum.accumulate(e)
    new = np.empty(len(s), dtype=bool)
    new[0] = True
    new[1:] = s[1:] > running[:-1]
    idx = np.flatnonzero(new)
    return s[idx], np.maximum.reduceat(e, idx)


def covered(starts: np.ndarray, ends: np.ndarray) -> int:
    s, e = merge(starts, ends)
    return int((e - s).sum())


def intersect_len(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> int:
    """Total length of the intersection of two disjoint sorted interval sets."""
    (as_, ae), (bs, be) = a, b
    i = j = 0
    total = 0
    while i < len(as_) and j < len(bs):
        lo, hi = max(as_[i], bs[j]), min(ae[i], be[j])
        if hi > lo:
            total += hi - lo
        if ae[i] < be[j]:
            i += 1
        else:
            j += 1
    return int(total)


def temporal_breakdown(trace: Trace, hta_definitions: bool = False) -> dict[str, float]:
    """Shares of the GPU's span (first GPU event start to last end).

    compute: time any compute kernel runs; communication and memory: time they run and no compute
    kernel does; idle: no GPU event. With ``hta_definitions`` the events and kernel types are HTA's
    (``analyzers/hta.py``) and non_compute = communication + memory."""
    gpu = trace.gpu
    if hta_definitions:
        from perfkit.analyzers import hta

        gpu = hta.window(trace)
    if gpu.empty:
        return {}
    starts, ends = gpu["ts"].to_numpy(), gpu["end"].to_numpy()
    span = int(ends.max() - starts.min())
    busy = covered(starts, ends)
    if hta_definitions:
        kinds = gpu["kind"].replace({"computation": "compute"}).to_numpy()
    else:
        kinds = gpu["category"].replace({c: "compute" for c in _COMPUTE}).to_numpy()
    compute_mask = kinds == "compute"
    compute = covered(starts[compute_mask], ends[compute_mask])
    comm_mask = kinds == "communication"
    comm_only = covered(starts[comm_mask | compute_mask], ends[comm_mask | compute_mask]) - compute
    out: dict[str, float] = {
        "kernels": len(gpu),
        "span_ns": span,
        "busy_ns": busy,
        "compute_ns": compute,
        "communication_ns": comm_only,
        "memory_ns": busy - compute - comm_only,
        "idle_ns": span - busy,
    }
    for key in ("compute", "communication", "memory", "idle"):
        out[f"{key}_pct"] = 100.0 * out[f"{key}_ns"] / span if span else 0.0
    out["non_compute_pct"] = out["communication_pct"] + out["memory_pct"]
    return out


_COMPUTE = ("gemm", "attention", "optimizer", "normalization", "softmax", "reduction", "elementwise", "other")
_SYNC = re.compile(r"Synchronize|cudaMemcpy$|hipMemcpy$|cudaStreamWaitEvent$", re.I)
_LAUNCH = re.compile(r"Launch|cudaMemcpyAsync|cudaMemsetAsync|hipExtModuleLaunchKernel|cuLaunch", re.I)
_INPUT = re.compile(r"DataLoader|dataloader|__next__")


_H2D = re.compile(r"HtoD|Host to Device|-> Device", re.I)


def idle_attribution(trace: Trace, min_gap_ns: int = 2_000) -> dict[str, float]:
    """Explain GPU idle time (gaps in the union of GPU activity, ignoring gaps under ``min_gap_ns``,
    ordinary back-to-back launch latency) as a chain of what the CPU was doing while the GPU had
    nothing queued:

    - other: the work after the gap was queued before the gap began (the GPU waited on a
      dependency or event, not on the CPU);
    - input: the CPU was late, producing the next batch: inside a DataLoader ``__next__`` for most
      of the gap, or the GPU's first work after the gap is the batch's host-to-device copy (the CPU
      ran Python outside any profiled op to build it, then copied it);
    - host_launch: the CPU was late for any other reason (Python overhead, launching kernels).

    These three split the gaps. ``sync_ns`` is a second link of the same chain, not a share of that
    split: the idle time after a host-device synchronization (cudaStreamSynchronize, a blocking
    copy, ``.item()``), which stopped the CPU from running ahead and so exposed the gap. Removing
    the sync or speeding the late work would each hide it."""
    ev = trace.events
    gpu = trace.gpu
    if gpu.empty:
        return {}
    s, e = merge(gpu["ts"].to_numpy(), gpu["end"].to_numpy())
    gap_start, gap_end = e[:-1], s[1:]
    keep = (gap_end - gap_start) >= min_gap_ns
    gap_start, gap_end = gap_start[keep], gap_end[keep]
    result: dict[str, float] = {"idle_ns": int((s[1:] - e[:-1]).sum()), "gaps": int(len(gap_start))}
    causes = dict.fromkeys(("input", "host_launch", "other"), 0)
    exposed_by_sync = 0
    if len(gap_start):
        runtime = ev[ev["cat"].isin(("cuda_runtime", "cuda_driver")).to_numpy()]
        syncs = runtime[by_name(runtime["name"], lambda n: bool(_SYNC.search(n)), bool)]
        launches = runtime[by_name(runtime["name"], lambda n: bool(_LAUNCH.search(n)), bool)]
        inputs = ev[
            by_name(ev["name"], lambda n: bool(_INPUT.search(n)), bool)
            & ev["cat"].isin(("cpu_op", "user_annotation", "python_function")).to_numpy()
        ]
        sync_end = np.sort(syncs["end"].to_numpy())
        in_s, in_e = merge(inputs["ts"].to_numpy(), inputs["end"].to_numpy())
        # the launch time of the first GPU event after each gap, through the correlation id
        launch_ts = dict(zip(launches["correlation"].to_numpy(), launches["ts"].to_numpy()))
        g = gpu.sort_values("ts")
        g_ts, g_corr = g["ts"].to_numpy(), g["correlation"].to_numpy()
        g_h2d = (
            by_name(g["name"], lambda n: bool(_H2D.search(n)), bool) & (g["cat"] == "gpu_memcpy").to_numpy()
        )
        nxt = np.searchsorted(g_ts, gap_end, side="left")
        for a, b, k in zip(gap_start, gap_end, nxt):
            length = int(b - a)
            j = np.searchsorted(sync_end, a - 5_000)
            if j < len(sync_end) and sync_end[j] <= b:
                exposed_by_sync += length
            lt = launch_ts.get(int(g_corr[k])) if k < len(g_corr) else None
            in_loader = (
                len(in_s) and intersect_len((in_s, in_e), (np.array([a]), np.array([b]))) > length // 2
            )
            if in_loader or (k < len(g_h2d) and g_h2d[k] and (lt is None or lt > a)):
                causes["input"] += length
            elif lt is not None and lt > a:
                causes["host_launch"] += length
            else:
                causes["other"] += length
    result.update({f"{k}_ns": v for k, v in causes.items()})
    result["sync_ns"] = exposed_by_sync
    result["short_gaps_ns"] = result["idle_ns"] - sum(causes.values())
    return result


def exposed_communication(trace: Trace) -> dict[str, float]:
    """Communication kernel time, and the part of it with no compute kernel running alongside
    (exposed: the step waits for it)."""
    gpu = trace.gpu
    if gpu.empty:
        return {}
    comm = gpu[gpu["category"] == "communication"]
    comp = gpu[gpu["category"].isin(_COMPUTE)]
    c = merge(comm["ts"].to_numpy(), comm["end"].to_numpy())
    total = int((c[1] - c[0]).sum())
    overlapped = intersect_len(c, merge(comp["ts"].to_numpy(), comp["end"].to_numpy()))
    return {
        "comm_ns": total,
        "overlapped_ns": overlapped,
        "exposed_ns": total - overlapped,
        "overlap_pct": 100.0 * overlapped / total if total else 100.0,
    }


def profiler_steps(trace: Trace) -> pd.DataFrame:
    """The ``ProfilerStep#N`` annotations: one row per step with its CPU span."""
    ev = trace.events
    steps = ev[
        (ev["cat"] == "user_annotation").to_numpy()
        & by_name(ev["name"], lambda n: n.startswith("ProfilerStep#"), bool)
    ]
    out = steps[["name", "ts", "end", "dur"]].copy()
    out["step"] = out["name"].astype(str).str.removeprefix("ProfilerStep#").astype(int)
    return out.sort_values("step").reset_index(drop=True)
