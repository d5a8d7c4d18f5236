"""Holistic Trace Analysis's definitions, for agreement with HTA's own figures.

perfkit's own metrics (``breakdown.py``, ``kernels.py``) classify kernels by what they do and explain
idle time as a chain across the whole GPU. HTA (holistictraceanalysis 0.5) splits kernels by name
only (``^nccl.*Kernel`` is communication; ``^Memcpy``, ``^Memset``, ``^dma`` memory; names holding
Memcpy, Memset or Sync "other"; the rest computation), reads only the GPU events launched before
the last ``ProfilerStep`` begins (when there are two or more), rounds times of sub-microsecond traces
to whole microseconds (starts up, ends down), and splits idle time per stream.
These functions compute HTA's figures with those definitions so that a user with an HTA dashboard
can check one against the other (``tests/test_hta_parity.py``, ``bench/analyze_vs_hta.py``).
All times are int64 nanoseconds (HTA reports microseconds, the trace's unit).
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
from perfkit.analyzers.breakdown import merge, profiler_steps
from perfkit.analyzers.trace import GPU_CATS, Trace, by_name

_COMM = re.compile(r"^nccl.*Kernel")
_MEMORY = re.compile(r"(^Memcpy)|(^Memset)|(^dma)")
_OTHER = re.compile(r"(.*(Memcpy))|(Memset)|(.*Sync)")
KINDS = ("computation", "communication", "memory")


def kernel_type(name: str) -> str:
    """HTA's ``get_kernel_type``: communication, memory, other or computation, by name alone."""
    if _COMM.match(name):
        return "communication"
    if _MEMORY.match(name):
        return "memory"
    if _OTHER.match(name):
        return "other"
    return "computation"


def window(trace: Trace) -> pd.DataFrame:
    """The GPU events HTA reads (every event on a stream: kernels, copies, sets and ``cuda_sync``
    waits, "Stream Wait Event" counting as computation), with their ``kind``: with two or more
    ProfilerStep annotations, only those launched (by correlation id) from CPU events that start
    before the last step does; starts rounded up and ends down to whole microseconds, as HTA's
    parser does."""
    gpu = trace.events[trace.events["stream"].to_numpy() != -1]
    steps = profiler_steps(trace)
    if len(steps) >= 2:
        ev = trace.events
        corr = ev["correlation"].to_numpy()
        keep = (ev["stream"].to_numpy() == -1) & (ev["ts"].to_numpy() < steps["ts"].max()) & (corr >= 0)
        gpu = gpu[np.isin(gpu["correlation"].to_numpy(), np.unique(corr[keep]))]
    gpu = gpu.assign(kind=by_name(gpu["name"], kernel_type))
    if _fractional(trace):
        gpu = gpu.assign(ts=_ceil_us(gpu["ts"].to_numpy()), end=gpu["end"].to_numpy() // 1000 * 1000)
    return gpu


def _fractional(trace: Trace) -> bool:
    """Whether any start has a fraction of a microsecond: only then does HTA's parser round."""
    return bool((trace.events["ts"].to_numpy() % 1000).any())


def _ceil_us(ns: np.ndarray) -> np.ndarray:
    return -(-ns // 1000) * 1000


def _sweep(gpu: pd.DataFrame, kinds: tuple[str, ...]) -> dict[frozenset[str], int]:
    """Time during which exactly each set of ``kinds`` runs (each kind's intervals merged first)."""
    times, deltas = [], []
    for bit, kind in enumerate(kinds):
        sub = gpu[gpu["kind"].to_numpy() == kind]
        s, e = merge(sub["ts"].to_numpy(), sub["end"].to_numpy())
        times += [s, e]
        deltas += [np.full(len(s), 1 << bit), np.full(len(e), -(1 << bit))]
    if not times:
        return {}
    t = np.concatenate(times)
    d = np.concatenate(deltas)
    order = np.argsort(t, kind="stable")
    t, running = t[order], np.cumsum(d[order])
    lengths = np.diff(t)
    out: dict[frozenset[str], int] = {}
    for state in np.unique(running[:-1]):
        if state > 0:
            key = frozenset(k for bit, k in enumerate(kinds) if state & (1 << bit))
            out[key] = int(lengths[running[:-1] == state].sum())
    return out


def kernel_breakdown(trace: Trace) -> dict[str, int]:
    """HTA's ``get_gpu_kernel_breakdown`` kernel-type table: the time each combination of
    computation, communication and memory kernels runs alone or together, keyed as HTA writes it
    ("COMPUTATION overlapping COMMUNICATION")."""
    return {
        " overlapping ".join(k.upper() for k in KINDS if k in key): ns
        for key, ns in _sweep(window(trace), KINDS).items()
    }


def comm_comp_overlap_pct(trace: Trace) -> float | None:
    """HTA's ``get_comm_comp_overlap``: the share of (merged) communication kernel time during which a
    computation kernel runs; None without communication kernels."""
    times = _sweep(window(trace), ("computation", "communication"))
    comm = sum(ns for key, ns in times.items() if "communication" in key)
    if not comm:
        return None
    return 100.0 * times.get(frozenset(("computation", "communication")), 0) / comm


def idle_breakdown(trace: Trace, consecutive_kernel_delay_ns: int = 30_000) -> pd.DataFrame:
    """HTA's ``get_idle_time_breakdown``, per stream: each gap between consecutive GPU events of a
    stream is host_wait when the next event was launched after the previous one ended (the CPU was
    late), kernel_wait when shorter than ``consecutive_kernel_delay_ns`` (launch latency), else
    other. Columns: stream, idle_category, idle_ns, idle_ratio."""
    gpu = window(trace)
    gpu = gpu[gpu["cat"].isin(GPU_CATS).to_numpy()]
    runtime = trace.events[trace.events["stream"].to_numpy() == -1]
    runtime = runtime[runtime["correlation"].to_numpy() >= 0]
    starts = runtime["ts"].to_numpy()
    launched = dict(
        zip(runtime["correlation"].to_numpy(), _ceil_us(starts) if _fractional(trace) else starts)
    )
    rows = []
    gpu = gpu.sort_values("ts", kind="stable")
    for stream in pd.unique(gpu["stream"]):
        g = gpu[gpu["stream"].to_numpy() == stream]
        ts, end = g["ts"].to_numpy(), g["end"].to_numpy()
        gaps = ts[1:] - end[:-1]
        launch = np.array(
            [launched.get(int(c), np.iinfo(np.int64).min) for c in g["correlation"].to_numpy()[1:]]
        )
        host = launch > end[:-1]
        kernel = ~host & (gaps < consecutive_kernel_delay_ns)
        total = int(gaps.sum())
        for category, mask in (("host_wait", host), ("kernel_wait", kernel), ("other", ~host & ~kernel)):
            ns = int(gaps[mask].sum())
            rows.append((int(stream), category, ns, ns / total if total else float("nan")))
    return pd.DataFrame(rows, columns=["stream", "idle_category", "idle_ns", "idle_ratio"])
