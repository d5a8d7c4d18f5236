"""The critical path of a step: the chain of dependent work that sets how long it takes.

A dependency graph is built from one rank's trace, in the sense of HTA's critical-path analysis
(``CriticalPathAnalysis``; the same graph, our own code): every event has a start and an end node;

- a CPU thread's ops are chained in call order, a parent's start to its first child's, a child's
  end to the next sibling's start, the last child's end to the parent's end (each edge weighs the
  time between, and is the time of the op open across it); consecutive top-level ops are linked at
  no weight (the thread's idle time between them sets nothing);
- a kernel (copy, set) weighs its duration. It depends on its launch (the runtime call's start,
  weighing the launch delay) when its stream was idle at the launch, else on the previous kernel of
  its stream (weighing the gap between them); a launch always precedes its kernel;
- syncs: a stream sync, context sync or event sync waits (at no weight) for the kernels it waits
  for, and the time the CPU spends blocked in it is the GPU's (its own edge weighs nothing); a
  stream that waits on an event recorded on another stream starts its next kernel after the kernel
  before the record;
- on CPU (gloo) traces, collectives run on their own threads: a collective is launched by the op
  that issued it, and the op that was blocked waiting for it (ending just after it) waits on it.

The critical path is the graph's longest path; its edges, by what they are the time of, give the
step's breakdown (compute, communication, host, launch and gaps between kernels, input) and its top
contributors. With ``hta=True`` the graph is HTA's exactly (a thread's top-level ops linked at no
weight); tests/test_critical_path.py holds HTA 0.5.0's own figures on its test trace.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from perfkit.analyzers.breakdown import profiler_steps
from perfkit.analyzers.comms import is_collective
from perfkit.analyzers.kernels import category
from perfkit.analyzers.metrics import FusionCandidate, PathSummary
from perfkit.analyzers.trace import GPU_CATS, Trace, by_name

CPU_CATS = ("cpu_op", "cuda_runtime", "cuda_driver")
BLOCKING = frozenset(
    (
        "cudaDeviceSynchronize",
        "cudaStreamSynchronize",
        "cudaEventQuery",
        "cudaEventSynchronize",
        "cudaMemcpy",
        "cudaMemcpyAsync",  # to pageable memory it blocks too; its sync edge says when
        "hipDeviceSynchronize",
        "hipStreamSynchronize",
        "hipEventSynchronize",
        "hipMemcpy",
    )
)
"""Runtime calls whose time, when they block, is the GPU's: the edge into their end weighs nothing."""
_ASYNC_COLLECTIVE = re.compile(r"^(gloo|nccl):")
_INPUT = re.compile(r"DataLoader|dataloader|__next__")
_OPTIMIZER = re.compile(r"^Optimizer\.(step|zero_grad)")
WAIT_AFTER_NS = 200_000
"""An op that ends within this long after an async collective ends was waiting for it."""
KINDS = ("compute", "communication", "memory", "host", "launch", "gpu_gap", "input")


@dataclass
class Segment:
    """One stretch of the path: an edge with weight, on a lane (a CPU thread or a GPU stream)."""

    start_ns: int
    end_ns: int
    kind: str
    name: str
    lane: str


@dataclass
class CriticalPath:
    """The critical path of one window (a step, an annotation's instance)."""

    start_ns: int
    end_ns: int
    length_ns: int
    by_kind: dict[str, int]
    """ns of the path by kind (``KINDS``)."""
    contributors: list[tuple[str, str, int]]
    """(name, kind, ns) of the path, largest first."""
    segments: list[Segment] = field(default_factory=list)
    events: int = 0
    """How many distinct events the path crosses (HTA's ``critical_path_events_set``)."""
    nodes: int = 0
    sequence: list[tuple[str, str, int, int, tuple[str, ...]]] = field(default_factory=list)
    """The path's kernels (a CPU trace's innermost ops) in order: (name, kind, own ns on the path,
    ns on the path after it before the next one: launch delays, gaps, host time; the CPU ops it ran
    inside, outermost first)."""


def _kind_of_gpu(name: str, cat: str) -> str:
    if cat in ("gpu_memcpy", "gpu_memset"):
        return "memory"
    c = category(name)
    return c if c in ("communication", "memory") else "compute"


class _Graph:
    """Nodes 2i (start of event i) and 2i+1 (its end); weighted edges, each the time of one event
    (``attr``) or of none (a launch delay, a gap between kernels: -1)."""

    def __init__(self, n_events: int) -> None:
        self.n = 2 * n_events
        self.src: list[int] = []
        self.dst: list[int] = []
        self.w: list[int] = []
        self.attr: list[int] = []
        self.kind: list[str] = []  # op, dep, launch, gap, sync

    def add(self, u: int, v: int, w: int, attr: int, kind: str) -> None:
        if u < 0 or u == v:
            return
        self.src.append(u)
        self.dst.append(v)
        self.w.append(max(0, int(w)))
        self.attr.append(attr)
        self.kind.append(kind)

    def longest(self) -> tuple[list[int], int]:
        """Edge indices of the longest path, and its length (Kahn's order: a node on a cycle, which
        clock skew between the CPU and GPU can make, is never reached)."""
        n = self.n
        if not n:
            return [], 0
        out: list[list[int]] = [[] for _ in range(n)]
        indeg = [0] * n
        src, dst, weight = self.src, self.dst, self.w
        for e, v in enumerate(dst):
            out[src[e]].append(e)
            indeg[v] += 1
        dist = [0] * n
        via = [-1] * n
        ready = [v for v in range(n) if indeg[v] == 0]
        while ready:
            u = ready.pop()
            du = dist[u]
            for e in out[u]:
                v = dst[e]
                d = du + weight[e]
                if d > dist[v] or (via[v] < 0 and d >= dist[v]):
                    dist[v], via[v] = d, e
                indeg[v] -= 1
                if indeg[v] == 0:
                    ready.append(v)
        end = max(range(n), key=dist.__getitem__)
        path: list[int] = []
        v = end
        while via[v] >= 0 and len(path) <= len(self.src):
            path.append(via[v])
            v = self.src[via[v]]
        path.reverse()
        return path, dist[end]


@dataclass
class _Prepared:
    """What every window of one trace reads, computed once per trace."""

    names: np.ndarray
    cats: np.ndarray
    tids: np.ndarray
    ts: np.ndarray
    end: np.ndarray
    stream: np.ndarray
    corr: np.ndarray
    cpu: np.ndarray
    """CPU ops and runtime calls with a duration."""
    coll: np.ndarray
    """gloo's (NCCL's) collectives drawn on a CPU thread."""
    gpu: np.ndarray
    """GPU work and stream waits."""
    comm: np.ndarray
    """CPU ops that are collectives (c10d::, record_param_comms, ...)."""
    has_sync: bool
    inputs: dict[str, tuple[np.ndarray, np.ndarray]]
    """Per thread, the spans of its input annotations (a DataLoader's next batch): (starts, ends)."""
    optimizer: dict[str, tuple[np.ndarray, np.ndarray]]
    """Per thread, the spans of its optimizer annotations (``Optimizer.step#AdamW.step``)."""
    waits: dict[tuple[int, int], tuple[int, int]]
    """(start, correlation) of a stream wait -> (the stream, the cudaEventRecord correlation)."""
    by_stream: dict[int, tuple[np.ndarray, np.ndarray]]
    """Each stream's launches by their call's start: (call starts, correlations)."""
    prev_end: dict[int, int]
    """Per launch (correlation): the end of the previous kernel on its stream (-1: none)."""
    call_ts: dict[int, int]
    """Per correlation: its runtime call's start."""


def _prepare(trace: Trace) -> _Prepared:
    if "critical_path" in trace.memo:
        return trace.memo["critical_path"]
    ev = trace.events
    cats = np.asarray(ev["cat"].astype(str), dtype=object)
    names = np.asarray(ev["name"].astype(str), dtype=object)
    stream, corr = ev["stream"].to_numpy(), ev["correlation"].to_numpy()
    cat = ev["cat"]
    annotation = (cat == "user_annotation").to_numpy()
    cpu = cat.isin(CPU_CATS).to_numpy() & (stream < 0) & (ev["dur"] > 0).to_numpy()
    coll = annotation & by_name(ev["name"], lambda nm: bool(_ASYNC_COLLECTIVE.match(nm)), bool)
    sync = (cat == "cuda_sync").to_numpy()
    gpu = cat.isin(GPU_CATS).to_numpy() | sync

    def spans(pattern: re.Pattern[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        found = ev[annotation & by_name(ev["name"], lambda nm: bool(pattern.search(nm)), bool)]
        out = {}
        for tid, d in found.groupby(found["tid"].astype(str), observed=True):
            d = d.sort_values("ts")
            out[str(tid)] = (d["ts"].to_numpy(), np.maximum.accumulate(d["end"].to_numpy()))
        return out

    waiting = ev[(ev["wait_corr"] >= 0).to_numpy()]
    waits = {
        (int(t), int(c)): (int(s), int(r))
        for t, c, s, r in zip(
            waiting["ts"], waiting["correlation"], waiting["wait_stream"], waiting["wait_corr"], strict=True
        )
    }
    # Every launch of the trace: its runtime call's start, the kernel's stream, start and end; to
    # tell whether a stream was idle at a launch, and which kernel an event record or a stream wait
    # refers to.
    calls = ev[cat.isin(CPU_CATS[1:]).to_numpy() & (corr >= 0)].drop_duplicates("correlation")
    call_ts = dict(zip(calls["correlation"].astype(np.int64).tolist(), calls["ts"].tolist(), strict=True))
    work = ev[cat.isin(GPU_CATS).to_numpy() & (corr >= 0)]
    launches = pd.DataFrame(
        {
            "corr": work["correlation"].to_numpy(),
            "stream": work["stream"].to_numpy(),
            "ts": work["ts"].to_numpy(),
            "end": work["end"].to_numpy(),
            "call_ts": [call_ts.get(int(c), np.nan) for c in work["correlation"].tolist()],
        }
    ).dropna(subset=["call_ts"])
    by_stream: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    prev_end: dict[int, int] = {}
    for s_, d in launches.groupby("stream"):
        by_call = d.sort_values("call_ts")
        by_stream[int(str(s_))] = (
            by_call["call_ts"].to_numpy(np.float64),
            by_call["corr"].to_numpy(np.int64),
        )
        d = d.sort_values("ts")
        ends = np.concatenate([[-1], np.maximum.accumulate(d["end"].to_numpy())[:-1]])
        prev_end.update(dict(zip(d["corr"].astype(int).tolist(), ends.tolist(), strict=True)))
    out = _Prepared(
        names=names,
        cats=cats,
        tids=np.asarray(ev["tid"].astype(str), dtype=object),
        ts=ev["ts"].to_numpy(np.int64),
        end=ev["end"].to_numpy(np.int64),
        stream=stream,
        corr=corr,
        cpu=cpu,
        coll=coll,
        gpu=gpu,
        comm=by_name(ev["name"], is_collective, bool),
        has_sync=bool(sync.any()),
        inputs=spans(_INPUT),
        optimizer=spans(_OPTIMIZER),
        waits=waits,
        by_stream=by_stream,
        prev_end=prev_end,
        call_ts=call_ts,
    )
    trace.memo["critical_path"] = out
    return out


def _select(pre: _Prepared, start_ns: int, end_ns: int) -> tuple[np.ndarray, np.ndarray]:
    """The window's events (rows of the trace) and their lanes: CPU ops and runtime calls that
    start in it (with a duration), async collectives on the CPU, and the GPU work and stream waits
    those runtime calls launched."""
    within = (pre.ts >= start_ns) & (pre.ts <= end_ns)
    cpu = pre.cpu & within
    coll = pre.coll & within & (pre.end > pre.ts)
    launched = pre.corr[cpu & (pre.corr >= 0)]
    gpu = pre.gpu & np.isin(pre.corr, launched) if len(launched) else np.zeros_like(cpu)
    rows = np.flatnonzero(cpu | coll | gpu)
    lanes = np.where(coll[rows], "collective", np.where(gpu[rows], "gpu", "cpu"))
    return rows, lanes


@dataclass
class _Events:
    ts: np.ndarray
    te: np.ndarray
    names: list[str]
    cats: list[str]
    lanes: list[str]
    tids: list[str]
    streams: np.ndarray
    corrs: np.ndarray
    parent: list[int]

    def t(self, node: int) -> int:
        return int(self.te[node // 2] if node % 2 else self.ts[node // 2])


def _cpu_edges(g: _Graph, x: _Events, by_tid: dict[str, list[int]], hta: bool) -> None:
    """Each thread's ops in call order (a depth-first walk of their nesting). Between top-level ops
    the thread runs Python (the training loop, the framework): that time is on the path, but for
    ``hta``, as HTA has it, where consecutive top-level ops are linked at no weight."""
    blocking = [nm in BLOCKING for nm in x.names]
    tops: dict[str, list[tuple[int, int]]] = {}  # per thread: (top-level op, the edge that leads to it)
    for tid, idx in by_tid.items():
        idx.sort(key=lambda i: (x.ts[i], -x.te[i], i))
        stack: list[int] = []
        last = -1  # the last node walked inside the current top-level op
        top_end = -1  # the end of the last top-level op
        tops[tid] = []

        for i in idx:
            while stack and x.ts[i] >= x.te[stack[-1]]:
                last, top_end = _close(g, x, stack, blocking, last, top_end)
            if stack:
                x.te[i] = min(x.te[i], x.te[stack[-1]])  # overlapping its parent: cut at its end
                x.parent[i] = stack[-1]
                g.add(last, 2 * i, x.ts[i] - x.t(last), stack[-1], "op")
            else:
                tops[tid].append((i, len(g.src) if top_end >= 0 else -1))
                g.add(top_end, 2 * i, 0 if hta else x.ts[i] - x.t(top_end), -1, "dep")
            last = 2 * i
            stack.append(i)
        while stack:
            last, top_end = _close(g, x, stack, blocking, last, top_end)
    if not hta and len(tops) > 1:
        _handoffs(g, x, tops)


HANDOFF_MIN_NS = 50_000
"""A thread's pause shorter than this is never taken for a wait on another thread."""


def _handoffs(g: _Graph, x: _Events, tops: dict[str, list[tuple[int, int]]]) -> None:
    """A thread that pauses while another runs ops, and resumes just after that one's last op ends,
    was waiting for it (the training thread in ``loss.backward()`` while autograd's device thread runs
    the backward ops; a main thread joining a worker): its pause weighs nothing, and the path may go
    through the other thread's ops instead, from the pause's start to its end."""
    spans = {
        tid: (
            np.array([x.ts[i] for i, _ in ops], dtype=np.int64),
            np.array([x.te[i] for i, _ in ops], dtype=np.int64),
            [i for i, _ in ops],
        )
        for tid, ops in tops.items()
    }
    for tid, ops in tops.items():
        for k in range(1, len(ops)):
            prev, (nxt, edge) = ops[k - 1][0], ops[k]
            t0, t1 = int(x.te[prev]), int(x.ts[nxt])
            if edge < 0 or t1 - t0 < HANDOFF_MIN_NS:
                continue
            for other, (starts, ends, idx) in spans.items():
                if other == tid:
                    continue
                lo = int(starts.searchsorted(t0, side="left"))
                hi = int(starts.searchsorted(t1, side="left"))
                if hi <= lo:
                    continue
                busy = int((np.minimum(ends[lo:hi], t1) - starts[lo:hi]).clip(min=0).sum())
                last = max(range(lo, hi), key=lambda j: ends[j])
                slack = max(WAIT_AFTER_NS, (t1 - t0) // 20)  # its return to the waiting thread
                if busy < 0.5 * (t1 - t0) or not t1 - slack <= ends[last] <= t1 + WAIT_AFTER_NS:
                    continue
                g.w[edge] = 0  # waiting, not running Python
                g.add(2 * prev + 1, 2 * idx[lo], starts[lo] - t0, -1, "dep")
                g.add(2 * idx[last] + 1, 2 * nxt, t1 - ends[last], -1, "dep")
                break


def _close(
    g: _Graph, x: _Events, stack: list[int], blocking: list[bool], last: int, top_end: int
) -> tuple[int, int]:
    """The end of the op on top of ``stack``: its last stretch, from ``last``; (last, top_end) after."""
    j = stack.pop()
    g.add(last, 2 * j + 1, 0 if blocking[j] else x.te[j] - x.t(last), j, "op")
    last = 2 * j + 1
    return (-1, last) if not stack else (last, top_end)


def _gpu_edges(g: _Graph, pre: _Prepared, x: _Events, runtime_of: dict[int, int], hta: bool) -> None:
    n = len(x.names)
    gpu = [i for i in range(n) if x.lanes[i] == "gpu"]
    if not gpu:
        return
    by_stream, prev_end = pre.by_stream, pre.prev_end
    kernel_of = {int(c): i for i in gpu if (c := int(x.corrs[i])) >= 0 and x.cats[i] in GPU_CATS}

    def before(stream: int, t: float) -> int | None:
        """The correlation of the last launch onto ``stream`` whose call started before ``t``."""
        if stream not in by_stream:
            return None
        starts, corrs = by_stream[stream]
        k = int(starts.searchsorted(t, side="left")) - 1
        return int(corrs[k]) if k >= 0 else None

    def after(stream: int, t: float) -> int | None:
        if stream not in by_stream:
            return None
        starts, corrs = by_stream[stream]
        k = int(starts.searchsorted(t, side="right"))
        return int(corrs[k]) if k < len(corrs) else None

    record_ts = pre.call_ts
    if not pre.has_sync:
        _inferred_syncs(g, x, gpu, runtime_of)
    # kernels by start, waits by end (a stream sync drawn over a copy comes after it)
    order = sorted(gpu, key=lambda i: (x.te[i] if x.cats[i] == "cuda_sync" else x.ts[i], i))
    last: dict[int, int] = {}  # stream -> the last kernel walked on it
    waits_for: dict[int, int] = {}  # kernel -> the kernel it waits for on another stream
    waits = {
        i: pre.waits[key]
        for i in range(n)
        if x.cats[i] == "cuda_sync" and (key := (int(x.ts[i]), int(x.corrs[i]))) in pre.waits
    }
    for i in order:
        corr = int(x.corrs[i])
        if x.cats[i] == "cuda_sync":
            call = runtime_of.get(corr)
            name = x.names[i]
            if name in ("Stream Wait Event", "Event Sync"):
                on_stream, on_record = waits.get(i, (-1, -1))
                at = record_ts.get(on_record)
                src_corr = before(on_stream, at) if at is not None else None
                on = kernel_of.get(src_corr, -1) if src_corr is not None else -1
                if on < 0:
                    continue
                if name == "Event Sync":
                    if call is not None:
                        g.add(2 * on + 1, 2 * call + 1, 0, -1, "sync")
                elif call is not None:
                    dest_corr = after(int(x.streams[i]), float(x.ts[call]))
                    if dest_corr is not None and dest_corr in kernel_of:
                        waits_for[kernel_of[dest_corr]] = on
            elif call is not None:
                targets = last.values() if name == "Context Sync" else [last.get(int(x.streams[i]), -1)]
                for k in targets:
                    if k >= 0:
                        g.add(2 * k + 1, 2 * call + 1, 0, -1, "sync")
            continue
        stream = int(x.streams[i])
        g.add(2 * i, 2 * i + 1, x.te[i] - x.ts[i], i, "op")
        call = runtime_of.get(corr)
        src = waits_for.pop(i, -1)
        if src >= 0:
            g.add(2 * src + 1, 2 * i, 0, -1, "sync")
        prev = last.get(stream, -1)
        launched = False
        if call is not None:
            idle = prev_end.get(corr, -1) < x.ts[call]
            if idle and (src < 0 or x.te[src] < x.ts[call]):
                g.add(2 * call, 2 * i, x.ts[i] - x.ts[call], -1, "launch")
                launched = True
        if not launched and prev >= 0 and (src < 0 or x.te[src] < x.te[prev]):
            g.add(2 * prev + 1, 2 * i, x.ts[i] - x.te[prev], -1, "gap")
        elif launched and prev >= 0 and not hta:
            g.add(2 * prev + 1, 2 * i, 0, -1, "gap")  # a stream runs in order: said for replays
        if not launched and call is not None:
            g.add(2 * call, 2 * i, 0, -1, "launch")  # a kernel never starts before its launch
        last[stream] = i


def _inferred_syncs(g: _Graph, x: _Events, gpu: list[int], runtime_of: dict[int, int]) -> None:
    """Where the trace draws no sync events (Kineto records them only when asked): a blocking call
    waits for the GPU work that ended last while it blocked, if any did."""
    work = sorted((i for i in gpu if x.cats[i] in GPU_CATS), key=lambda i: x.te[i])
    ends = np.array([x.te[i] for i in work], dtype=np.int64)
    for c in set(runtime_of.values()) | {i for i in range(len(x.names)) if x.names[i] in BLOCKING}:
        if x.names[c] not in BLOCKING or x.lanes[c] != "cpu":
            continue
        k = int(ends.searchsorted(x.te[c], side="right")) - 1
        if k >= 0 and ends[k] >= x.ts[c]:
            g.add(2 * work[k] + 1, 2 * c + 1, 0, -1, "sync")


def _collective_edges(g: _Graph, x: _Events, by_tid: dict[str, list[int]], comm_ops: set[int]) -> None:
    """gloo's collectives run on their own threads: each starts after the op that issued it (the
    latest collective op on a CPU thread to start before it), and the op blocked waiting for it (the
    innermost op open at its end that ends within ``WAIT_AFTER_NS``) ends after it."""
    coll = [i for i in range(len(x.names)) if x.lanes[i] == "collective"]
    if not coll:
        return
    issuers = sorted(comm_ops, key=lambda i: x.ts[i])
    issue_ts = np.array([x.ts[i] for i in issuers], dtype=np.int64)
    ops = sorted((i for idx in by_tid.values() for i in idx), key=lambda i: x.te[i])
    op_end = np.array([x.te[i] for i in ops], dtype=np.int64)
    for c in coll:
        g.add(2 * c, 2 * c + 1, x.te[c] - x.ts[c], c, "op")
        k = int(issue_ts.searchsorted(x.ts[c], side="right")) - 1
        if k >= 0:
            g.add(2 * issuers[k], 2 * c, 0, -1, "launch")
        lo, hi = op_end.searchsorted(x.te[c]), op_end.searchsorted(x.te[c] + WAIT_AFTER_NS, side="right")
        waiting = [ops[j] for j in range(lo, hi) if x.ts[ops[j]] <= x.te[c]]
        if waiting:
            w = max(waiting, key=lambda i: x.ts[i])  # the innermost
            g.add(2 * c + 1, 2 * w + 1, 0, -1, "sync")


def _apply(g: _Graph, x: _Events, change: Change, pre: _Prepared) -> None:
    """Scale each event's own stretches by its change (an op inherits its parents': aten::mm inside
    a faster aten::linear is faster too; a collective keeps its own), and the Python between ops by
    ``change.rest``. A CPU op within an optimizer annotation is of the optimizer family; within an
    input annotation, ``rest`` leaves it (and the Python there) as it is."""
    n = len(x.names)
    factor = [1.0] * n
    on_gpu = "gpu" in x.lanes  # a GPU trace's CPU ops are the host's work, whatever they launch

    def region(tid: str, t: int) -> str | None:
        if _inside(pre.optimizer, tid, t):
            return "optimizer"
        return "input" if _inside(pre.inputs, tid, t) else None

    for i in sorted(range(n), key=lambda i: (x.ts[i], -x.te[i])):  # parents first
        fam = "host" if on_gpu and x.lanes[i] == "cpu" else family(x.names[i], x.lanes[i])
        where = region(x.tids[i], int(x.ts[i])) if x.lanes[i] == "cpu" else None
        if fam == "communication":
            factor[i] = change.factor(x.names[i], fam)
            continue
        if where == "optimizer":
            fam = "optimizer"
        own = change.factor(x.names[i], fam, scaled=where != "input")
        inherits = x.lanes[i] == "cpu" and x.parent[i] >= 0
        factor[i] = max(own, factor[x.parent[i]]) if inherits else own
    for e, a in enumerate(g.attr):
        if a >= 0 and g.kind[e] == "op" and factor[a] != 1.0:
            g.w[e] = int(round(g.w[e] / factor[a]))
        elif a < 0 and g.kind[e] == "dep" and g.w[e] > 0:  # Python between a thread's ops
            where = region(x.tids[g.src[e] // 2], x.t(g.src[e]))
            # a GPU trace's Python is the host's, as its CPU ops are
            fam = "optimizer" if where == "optimizer" else "host" if on_gpu else ""
            k = 1.0 if where == "input" else change.factor("", fam)
            if k != 1.0:
                g.w[e] = int(round(g.w[e] / k))


def _inside(spans: dict[str, tuple[np.ndarray, np.ndarray]], tid: str, t: int) -> bool:
    s = spans.get(tid)
    if s is None:
        return False
    k = int(s[0].searchsorted(t, side="right")) - 1
    return k >= 0 and t < s[1][k]


@dataclass(frozen=True)
class Change:
    """A what-if replayed on the graph: kernel (op) families made faster, a faster link."""

    speedup: dict[str, float] = field(default_factory=dict)
    """Family (``family``: gemm, attention, elementwise, normalization, softmax, optimizer, memory,
    communication, ...; on a GPU trace "host" for every CPU op) or a piece of a kernel's or op's
    name, to how many times faster it runs."""
    link: float = 1.0
    """How many times faster every collective transfers (their time on the path, waits included;
    ``inf``: the collectives are gone)."""
    rest: float = 1.0
    """How many times faster everything no key of ``speedup`` names runs, collectives and input
    aside: the other ops (kernels) and the Python between ops (a layout's share of the work on one
    rank, ``perfkit.optimizer.replay``; below 1: more work)."""

    def factor(self, name: str, fam: str, scaled: bool = True) -> float:
        """How many times faster an event of this name and family runs: the largest factor of the
        keys that name it; else, for a collective the link's, for the rest ``rest`` (1 where not
        ``scaled``: the input)."""
        low = name.lower()
        named = [k for key, k in self.speedup.items() if key == fam or (len(key) > 2 and key.lower() in low)]
        if fam == "communication":
            return max([*named, self.link])
        return max(named) if named else self.rest if scaled else 1.0


_OP_FAMILIES: list[tuple[str, re.Pattern[str]]] = [
    ("attention", re.compile(r"attention|flash|sdpa", re.I)),
    ("gemm", re.compile(r"^aten::(mm|bmm|addmm|baddbmm|matmul|linear|_?addmm_activation)$|conv", re.I)),
    ("normalization", re.compile(r"norm", re.I)),
    ("softmax", re.compile(r"softmax", re.I)),
    ("optimizer", re.compile(r"adam|_foreach_|lerp_|addcdiv_|addcmul_|Optimizer\.step", re.I)),
    ("memory", re.compile(r"copy_|_to_copy|^aten::to$|contiguous|clone", re.I)),
]


def family(name: str, lane: str = "gpu") -> str:
    """What an event is, for ``--speedup``: a kernel's category (``kernels.category``); a CPU op's
    by its ATen name (aten::mm is a gemm, aten::layer_norm normalization, ...), else elementwise."""
    if lane == "collective" or (lane == "cpu" and is_collective(name)):
        return "communication"
    if lane == "gpu":
        return category(name)
    for fam, pattern in _OP_FAMILIES:
        if pattern.search(name):
            return fam
    return "elementwise" if name.startswith("aten::") else "other"


def critical_path(
    trace: Trace,
    start_ns: int,
    end_ns: int,
    segments: bool = False,
    hta: bool = False,
    change: Change | None = None,
) -> CriticalPath | None:
    """The critical path of the window [start_ns, end_ns] of ``trace``; None where it holds no event.
    ``hta``: HTA's graph exactly (no weight for the time between a thread's top-level ops).
    ``change``: the path replayed with the change applied to the events' own time."""
    pre = _prepare(trace)
    rows, lane = _select(pre, start_ns, end_ns)
    if not len(rows):
        return None
    n = len(rows)
    x = _Events(
        ts=pre.ts[rows].copy(),
        te=pre.end[rows].copy(),
        names=pre.names[rows].tolist(),
        cats=pre.cats[rows].tolist(),
        lanes=lane.tolist(),
        tids=pre.tids[rows].tolist(),
        streams=pre.stream[rows],
        corrs=pre.corr[rows],
        parent=[-1] * n,
    )
    g = _Graph(n)
    by_tid: dict[str, list[int]] = defaultdict(list)
    for i in range(n):
        if x.lanes[i] == "cpu":
            by_tid[x.tids[i]].append(i)
    _cpu_edges(g, x, by_tid, hta)
    runtime_of = {
        int(x.corrs[i]): i
        for i in range(n)
        if x.lanes[i] == "cpu" and x.corrs[i] >= 0 and x.cats[i] in ("cuda_runtime", "cuda_driver")
    }
    _gpu_edges(g, pre, x, runtime_of, hta)
    comm_ops = {i for i in np.flatnonzero(pre.comm[rows]).tolist() if x.lanes[i] == "cpu"}
    _collective_edges(g, x, by_tid, comm_ops)
    has_gpu = "gpu" in x.lanes
    inputs = pre.inputs

    def cpu_kind(i: int) -> str:
        j = i
        while j >= 0:
            if j in comm_ops:
                return "communication"
            j = x.parent[j]
        if _inside(inputs, x.tids[i], int(x.ts[i])):
            return "input"
        return "host" if has_gpu else "compute"

    if change is not None:
        _apply(g, x, change, pre)
    path, length = g.longest()
    by_kind: Counter[str] = Counter()
    by_name: Counter[tuple[str, str]] = Counter()
    segs: list[Segment] = []
    sequence: list[list[Any]] = []  # [name, kind, own ns, ns after it, event]

    def item_of(a: int) -> int:
        """The unit a fusion would merge that ``a``'s time is part of: a kernel, or the outermost
        ATen op around a CPU op (the op eager mode dispatches one by one); -1: none."""
        if x.lanes[a] == "gpu":
            return a if x.cats[a] in GPU_CATS else -1
        if x.lanes[a] != "cpu":
            return -1
        found, j = -1, a
        while j >= 0:
            if x.names[j].startswith("aten::"):
                found = j
            j = x.parent[j]
        return found

    syncing: set[int] = set()  # ops that block on the GPU (a blocking call inside): never fused
    for i in range(n):
        j = i if x.names[i] in BLOCKING else -1
        while j >= 0 and j not in syncing:
            syncing.add(j)
            j = x.parent[j]

    def item_kind(a: int) -> str:
        if x.lanes[a] == "gpu":
            return _kind_of_gpu(x.names[a], x.cats[a])
        return "sync" if a in syncing else "host" if has_gpu else "compute"

    def inside(a: int) -> tuple[str, ...]:
        j = runtime_of.get(int(x.corrs[a]), -1) if x.lanes[a] == "gpu" else x.parent[a]
        chain = []
        while j >= 0:
            if x.cats[j] == "cpu_op":
                chain.append(x.names[j])
            j = x.parent[j]
        return tuple(reversed(chain))

    labels: dict[int, tuple[str, str, int]] = {}  # event -> (kind, name, its fusion unit), once each

    def label(a: int) -> tuple[str, str, int]:
        if a not in labels:
            if x.lanes[a] == "gpu":
                kind = _kind_of_gpu(x.names[a], x.cats[a])
            elif x.lanes[a] == "collective":
                kind = "communication"
            else:
                kind = cpu_kind(a)
            labels[a] = (kind, x.names[a], item_of(a))
        return labels[a]

    lanes: dict[int, str] = {}
    for e in path:
        u, v, w, a, k = g.src[e], g.dst[e], g.w[e], g.attr[e], g.kind[e]
        it = -1
        if k == "launch":
            kind, name = "launch", "kernel launch delay"
        elif k == "gap":
            kind, name = "gpu_gap", "GPU idle between kernels"
        elif a < 0:
            kind, name = "host", "Python between ops"
        else:
            kind, name, it = label(a)
        if it >= 0:
            if sequence and sequence[-1][4] == it:
                sequence[-1][2] += w
            else:
                sequence.append([x.names[it], item_kind(it), w, 0, it])
        elif sequence:
            sequence[-1][3] += w
        if w <= 0:
            continue
        by_kind[kind] += w
        by_name[(name, kind)] += w
        if segments:
            t0 = x.t(u)
            at = a if a >= 0 else v // 2
            if at not in lanes:
                lanes[at] = f"stream {x.streams[at]}" if x.lanes[at] == "gpu" else f"thread {x.tids[at]}"
            segs.append(Segment(t0, t0 + w, kind, name, lanes[at]))
    return CriticalPath(
        start_ns=int(start_ns),
        end_ns=int(end_ns),
        length_ns=int(length),
        by_kind={k: int(by_kind[k]) for k in KINDS if by_kind.get(k)},
        contributors=[(nm, kd, int(ns)) for (nm, kd), ns in by_name.most_common()],
        segments=segs,
        events=len({g.attr[e] for e in path if g.attr[e] >= 0}),
        nodes=len(path) + 1 if path else 0,  # a path's nodes: one more than its edges
        sequence=[(s[0], s[1], int(s[2]), int(s[3]), inside(s[4])) for s in sequence],
    )


SHORT_NS = 50_000
"""A kernel (CPU op) this short is dominated by what surrounds it (launch, dispatch): worth fusing."""
MAX_STEPS = 3
"""Steps whose path the analysis computes (the first, middle and last profiled ones): a path is a
Python walk over every event of its step (0.05-0.3 s a step of 5k-40k events), and the steps of one
trace differ little; ``perfkit whatif`` replays every step."""
MANY_RANKS = 4
"""In a job of more ranks, each rank's path is its middle step's alone: the job's ranks together
give the spread, and a 1024-rank analysis stays within its time."""
NOT_FUSED = frozenset(("gemm", "attention", "communication"))
"""Families a fusion leaves alone: library GEMMs and attention kernels, and collectives."""


def short_name(name: str) -> str:
    """A kernel's name without its template and argument lists and namespaces; an op's as it is."""
    if name.startswith(("aten::", "c10d::")) or "::" not in name and "<" not in name:
        return name
    head = name.removeprefix("void ").split("<", 1)[0].split("(", 1)[0]
    return head.rsplit("::", 1)[-1] or name[:60]


def _fusable(it: tuple[str, str, int, int, tuple[str, ...]]) -> bool:
    lane = "cpu" if it[0].startswith("aten::") else "gpu"  # an item is a kernel or an outermost ATen op
    return (
        it[1] in ("compute", "memory", "host") and it[2] <= SHORT_NS and family(it[0], lane) not in NOT_FUSED
    )


def _link_ns(
    a: tuple[str, str, int, int, tuple[str, ...]], b: tuple[str, str, int, int, tuple[str, ...]]
) -> int:
    """What fusing ``b`` into ``a`` (next to it on the path) takes off the path: the time between them
    (a launch, a gap, the dispatch), and where they are ops on a GPU trace's host ``b``'s own time
    too (its dispatch and launch, which the fused op pays once); -1 where they do not fuse."""
    if not (_fusable(a) and _fusable(b)) or (a[1] == "host") != (b[1] == "host") or a[3] > SHORT_NS:
        return -1
    return a[3] + (b[2] if b[1] == "host" else 0)


def fusion_candidates(paths: list[CriticalPath], top: int = 5) -> tuple[list[FusionCandidate], float]:
    """Runs of 2 to 4 short kernels (ops) back to back on the critical path, recurring every step,
    ranked by what fusing each run takes off the path (``_link_ns``); and the ms a step that fusing
    every such neighbour would (each pair counted once)."""
    if not paths:
        return [], 0.0
    found: dict[tuple[str, ...], list[Any]] = {}
    total = 0
    for p in paths:
        seq = p.sequence
        links = [_link_ns(seq[k], seq[k + 1]) for k in range(len(seq) - 1)]
        total += sum(w for w in links if w > 0)
        for n in (2, 3, 4):
            free: dict[tuple[str, ...], int] = {}  # per run: where its next match may start (no overlap)
            for k in range(len(seq) - n + 1):
                inner = links[k : k + n - 1]
                if min(inner) < 0 or sum(inner) <= 0:
                    continue
                run = seq[k : k + n]
                key = tuple(short_name(it[0]) for it in run)
                if k < free.get(key, 0):
                    continue
                free[key] = k + n
                acc = found.setdefault(key, [0, 0, 0, _common(run)])
                acc[0] += 1
                acc[1] += sum(it[2] for it in run)
                acc[2] += sum(inner)
    n_steps = len(paths)
    out: list[FusionCandidate] = []
    for ops, (count, own, saved, inside) in sorted(found.items(), key=lambda kv: -kv[1][2]):
        if count < n_steps or any(_contains(c.ops, list(ops)) or _contains(list(ops), c.ops) for c in out):
            continue  # not once a step (no pattern), or part of one already listed
        out.append(
            FusionCandidate(
                ops=list(ops),
                per_step=round(count / n_steps, 2),
                own_us=round(own / count / 1e3, 2),
                between_us=round(saved / count / 1e3, 2),
                saving_ms=round(saved / n_steps / 1e6, 4),
                inside=inside,
            )
        )
        if len(out) >= top:
            break
    return out, round(total / n_steps / 1e6, 4)


def _contains(big: list[str], small: list[str]) -> bool:
    return len(small) <= len(big) and any(
        big[k : k + len(small)] == small for k in range(len(big) - len(small) + 1)
    )


def _common(run: list[tuple[str, str, int, int, tuple[str, ...]]]) -> str:
    """The innermost op every item of ``run`` ran inside."""
    chains = [it[4] for it in run]
    common = ""
    for level in zip(*chains, strict=False):
        if len(set(level)) != 1:
            break
        common = level[0]
    return common


def summarize(
    paths: list[CriticalPath], top: int = 10, segments: CriticalPath | None = None
) -> PathSummary | None:
    """One rank's paths as its ``PathSummary`` (the median step's segments when given it)."""
    if not paths:
        return None
    n = len(paths)
    by_kind: Counter[str] = Counter()
    by_name: Counter[tuple[str, str]] = Counter()
    for p in paths:
        by_kind.update(p.by_kind)
        for name, kind, ns in p.contributors:
            by_name[(name, kind)] += ns
    fusion, fusable = fusion_candidates(paths)
    lengths = sorted(p.length_ns for p in paths)
    spans = sorted(p.end_ns - p.start_ns for p in paths)
    segs = []
    if segments is not None:
        merged: list[Segment] = []
        for sg in segments.segments:
            if (
                merged
                and merged[-1].name == sg.name
                and merged[-1].lane == sg.lane
                and sg.start_ns - merged[-1].end_ns <= 1_000
            ):
                merged[-1] = Segment(merged[-1].start_ns, sg.end_ns, sg.kind, sg.name, sg.lane)
            else:
                merged.append(sg)
        longest = sorted(merged, key=lambda sg: sg.end_ns - sg.start_ns, reverse=True)[:MAX_SEGMENTS]
        keep = set(map(id, longest))
        segs = [
            {
                "start_ms": round((sg.start_ns - segments.start_ns) / 1e6, 4),
                "end_ms": round((sg.end_ns - segments.start_ns) / 1e6, 4),
                "kind": sg.kind,
                "name": short_name(sg.name),
                "lane": sg.lane,
            }
            for sg in merged
            if id(sg) in keep
        ]
    return PathSummary(
        steps=n,
        step_ms=round(spans[n // 2] / 1e6, 3),
        length_ms=round(lengths[n // 2] / 1e6, 3),
        by_kind_ms={k: round(v / n / 1e6, 4) for k, v in by_kind.most_common()},
        contributors=[
            {"name": short_name(name), "kind": kind, "ms": round(ns / n / 1e6, 4)}
            for (name, kind), ns in by_name.most_common(top)
        ],
        segments=segs,
        fusion=fusion,
        fusable_ms=fusable,
    )


MAX_SEGMENTS = 150
"""The most stretches of one step's path the report draws (the longest; merged where one op runs on)."""


def trace_path(trace: Trace) -> PathSummary | None:
    """A rank's critical path summary: its steps' paths (at most ``MAX_STEPS``), with the median
    step's drawn."""
    steps = profiler_steps(trace)
    if steps.empty:
        ev = trace.events
        windows = [(int(ev["ts"].min()), int(ev["end"].max()))]
    else:
        windows = list(zip(steps["ts"].astype("int64"), steps["end"].astype("int64"), strict=True))
        if (trace.world_size or 1) > MANY_RANKS:
            windows = [windows[len(windows) // 2]]
        elif len(windows) > MAX_STEPS:
            pick = np.linspace(0, len(windows) - 1, MAX_STEPS).round().astype(int)
            windows = [windows[i] for i in sorted(set(pick.tolist()))]
    paths = [
        p for t0, t1 in windows if (p := critical_path(trace, int(t0), int(t1), segments=True)) is not None
    ]
    if not paths:
        return None
    median = sorted(paths, key=lambda p: p.length_ns)[len(paths) // 2]
    return summarize(paths, segments=median)
