"""One merged Chrome-trace JSON of all ranks, for Perfetto and chrome://tracing.

Each rank's Kineto trace keeps its events with pids remapped to rank-scoped ids (``rank R: ...``
process names, sorted by rank); perfkit's own tables add, per rank, a ``perfkit`` process with a
track of steps (and their phases laid end to end) and a track of collectives. All times are put on
one clock (Kineto's ``ts`` plus ``baseTimeNanoseconds``), shifted so the run starts at 0.
"""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from perfkit.analyzers.comms import service_ns
from perfkit.analyzers.runtables import load_tables
from perfkit.analyzers.trace import TraceError, base_ns, plausible_times, read_json

from perfkit.files import write_atomic
from perfkit.run import Run

_PHASES = ("data_wait", "forward", "backward", "forward_backward", "optimizer", "checkpoint")


def _meta(pid: int, name: str, sort: int) -> list[dict[str, Any]]:
    return [
        {"ph": "M", "pid": pid, "name": "process_name", "args": {"name": name}},
        {"ph": "M", "pid": pid, "name": "process_sort_index", "args": {"sort_index": sort}},
    ]


def merged_trace(run: Run) -> tuple[dict[str, Any], list[str]]:
    """The merged trace and notes on ranks whose trace could not be read."""
    notes: list[str] = []
    per_rank: dict[int, tuple[list[dict[str, Any]], int]] = {}
    for rank in run.ranks():
        path = run.layout.trace(rank)
        if not path.exists():
            continue
        try:
            data = read_json(path)
        except TraceError as e:
            notes.append(str(e))
            continue
        events, repairs = _possible_events(data, path)
        notes += repairs
        per_rank[rank] = (events, base_ns(data.get("baseTimeNanoseconds"), path, notes))
    tables = load_tables(run)
    # Integer nanoseconds: an epoch time in float ns has 256 ns steps, enough to reorder events.
    starts = [
        round(ev["ts"] * 1000) + base
        for evs, base in per_rank.values()
        for ev in evs
        if isinstance(ev.get("ts"), int | float)
    ]
    for table in (tables.steps, tables.comms):
        if not table.empty:
            starts.append(int(table["start_ns"].min()))
    t0 = min(starts) if starts else 0

    out: list[dict[str, Any]] = []
    for rank, (events, base) in sorted(per_rank.items()):
        pids: dict[Any, int] = {}
        for ev in events:
            if ev.get("ph") == "M" and ev.get("name") == "process_name":
                continue  # replaced below with rank-scoped names
            new = dict(ev)
            pid = ev.get("pid")
            if pid not in pids:
                pids[pid] = rank * 1000 + len(pids) + 1
            new["pid"] = pids[pid]
            if isinstance(ev.get("ts"), int | float):
                new["ts"] = (round(ev["ts"] * 1000) + base - t0) / 1000
            if ev.get("ph") in ("s", "f", "t") and isinstance(ev.get("id"), int):
                new["id"] = (
                    rank * 10**12 + ev["id"]
                )  # flow ids repeat across ranks: keep each rank's arrows apart
            out.append(new)
        for pid, new_pid in pids.items():
            kind = "GPU " + str(pid) if isinstance(pid, int) and pid < 64 else f"host {pid}"
            out.extend(_meta(new_pid, f"rank {rank}: {kind}", new_pid))

    for rank in run.ranks():
        pid = rank * 1000 + 999
        steps = tables.steps[tables.steps["rank"] == rank]
        comms = tables.comms[tables.comms["rank"] == rank] if not tables.comms.empty else tables.comms
        if steps.empty and comms.empty:
            continue
        out.extend(_meta(pid, f"rank {rank}: perfkit", pid))
        out.append({"ph": "M", "pid": pid, "tid": 1, "name": "thread_name", "args": {"name": "steps"}})
        # one track per process group: calls of a group run one after another, those of two
        # groups (TP and DP) may overlap
        tracks: dict[str, int] = {}
        for group, ranks in comms[["group", "group_ranks"]].drop_duplicates("group").itertuples(index=False):
            tracks[str(group)] = 2 + len(tracks)
            label = f"collectives, group {group}" + (f" (ranks {ranks})" if ranks == ranks and ranks else "")
            out.append(
                {
                    "ph": "M",
                    "pid": pid,
                    "tid": tracks[str(group)],
                    "name": "thread_name",
                    "args": {"name": label},
                }
            )
        for s in steps.to_dict("records"):  # iterrows would turn int64 ns into float64
            ts = (int(s["start_ns"]) - t0) / 1000
            out.append(
                {
                    "ph": "X",
                    "pid": pid,
                    "tid": 1,
                    "name": f"step {int(s['step'])}",
                    "ts": ts,
                    "dur": float(s["step_time_s"]) * 1e6,
                    "args": {"tokens": s.get("tokens"), "loss": s.get("loss")},
                }
            )
            at = ts
            for phase in _PHASES:  # measured as durations: laid end to end under the step
                d = s.get(f"{phase}_s")
                if d is not None and d == d and d > 0:
                    out.append(
                        {"ph": "X", "pid": pid, "tid": 1, "name": phase, "ts": at, "dur": float(d) * 1e6}
                    )
                    at += float(d) * 1e6
        own = service_ns(comms)
        for c, own_ns in zip(comms.to_dict("records"), own, strict=True):
            start = int(c["start_ns"])
            args = {"bytes": c.get("bytes"), "group": c.get("group_ranks"), "source": c.get("source"),
                    "step": c.get("step")}  # fmt: skip
            if own_ns == own_ns:  # NaN where the end is unknown
                # drawn where it ran: an async call queued behind the group's previous one starts
                # when that one ended (slices of a track must nest)
                begin = int(c["end_ns"]) - int(own_ns)
                if begin > start:
                    args["queued_ms"] = (begin - start) / 1e6
                start, dur = begin, own_ns / 1000
            else:
                dur = 0.0
            out.append(
                {
                    "ph": "X",
                    "pid": pid,
                    "tid": tracks.get(str(c.get("group")), 2),
                    "name": str(c["op"]),
                    "ts": (start - t0) / 1000,
                    "dur": dur,
                    "args": args,
                }
            )
    return {
        "traceEvents": out,
        "displayTimeUnit": "ms",
        "otherData": {"perfkit_run": run.manifest.name},
    }, notes


def _possible_events(data: Any, path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """The trace's events that analyze keeps: objects, and of the timed ones those whose times can
    be real (the same test as analyze's), so the merged trace shows what the analysis counted."""
    events = data.get("traceEvents") if isinstance(data, dict) else None
    events = [ev for ev in events if isinstance(ev, dict)] if isinstance(events, list) else []

    def number(x: Any) -> float:
        return float(x) if isinstance(x, int | float) and not isinstance(x, bool) else float("nan")

    timed = [i for i, ev in enumerate(events) if "ts" in ev]
    ok = plausible_times(
        np.array([number(events[i]["ts"]) for i in timed], dtype=float),
        np.array([number(events[i].get("dur", 0)) for i in timed], dtype=float),
    )
    bad = {i for i, fine in zip(timed, ok, strict=True) if not fine}
    notes = [f"{path}: {len(bad)} event(s) with impossible times left out"] if bad else []
    return [ev for i, ev in enumerate(events) if i not in bad], notes


def write_merged(run: Run, out: Path) -> tuple[Path, list[str]]:
    data, notes = merged_trace(run)
    raw = orjson.dumps(data, option=orjson.OPT_SERIALIZE_NUMPY)
    return write_atomic(out, gzip.compress(raw, compresslevel=6) if out.name.endswith(".gz") else raw), notes
