"""Hangs, desyncs and crashes, from what the ranks wrote when they stopped moving or died.

Each rank's watchdog writes ``hang.json`` (its threads' stacks and the collectives it is in, per
process group, with their sequence numbers); a rank that raised writes ``failure.json``; every rank
that stopped leaves the collectives it was in inside ``probe.json``. Matching the ranks by
(group, sequence number) says who the others wait for: the ranks that never entered the collective
the others are in. Ranks in the same (group, sequence) with different ops, sizes or dtypes are
desynchronized.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from perfkit.frames import user_frame
from perfkit.run import Run
from perfkit.tables import loads

_WORLD_GROUPS = ("0", "default")


@dataclass(kw_only=True)
class RankState:
    rank: int
    told_by: str
    """hang record, failure record, or the rank's stop (probe.json)."""
    step: int | None = None
    since_step_s: float | None = None
    in_flight: list[dict[str, Any]] = field(default_factory=list)
    entered: dict[str, int] = field(default_factory=dict)
    frame: str = ""
    """The innermost frame of user code in the main thread: file:line function."""
    stack: list[str] = field(default_factory=list)


@dataclass(kw_only=True)
class Wait:
    group: str
    seq: int
    op: str
    waiting: list[int]
    missing: list[int]


@dataclass(kw_only=True)
class HangMetrics:
    hung: bool
    """Some rank wrote a hang record."""
    ranks: list[RankState]
    waits: list[Wait] = field(default_factory=list)
    desyncs: list[dict[str, Any]] = field(default_factory=list)
    first_failure: dict[str, Any] | None = None


def _read(path: Path, problems: list[str]) -> dict[str, Any] | None:
    try:
        data = loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        problems.append(f"{path}: cannot be read ({type(e).__name__}); the rank's record is damaged")
        return None
    if not isinstance(data, dict):
        problems.append(f"{path}: not a JSON object; the rank's record is damaged")
        return None
    return data


def _state(rank: int, record: dict[str, Any], told_by: str) -> RankState:
    raw_coll, raw_threads = record.get("collectives"), record.get("threads")
    coll: dict[str, Any] = raw_coll if isinstance(raw_coll, dict) else {}
    threads: list[Any] = raw_threads if isinstance(raw_threads, list) else []
    main = next((t for t in threads if isinstance(t, dict) and t.get("main")), None)
    frames = main.get("frames", []) if main and isinstance(main.get("frames"), list) else []
    frames = [f for f in frames if isinstance(f, dict)]
    raw_in_flight, raw_entered = coll.get("in_flight"), coll.get("entered")
    in_flight = [
        {**e, "group": str(e["group"]), "op": str(e.get("op") or "?")}  # a damaged entry may lack its op
        for e in (raw_in_flight if isinstance(raw_in_flight, list) else [])
        if isinstance(e, dict)
        and "group" in e
        and isinstance(e.get("seq"), int)
        and not isinstance(e["seq"], bool)
    ]
    entered = {
        str(k): int(v)
        for k, v in (raw_entered if isinstance(raw_entered, dict) else {}).items()
        if isinstance(v, int)
    }
    return RankState(
        rank=rank,
        told_by=told_by,
        step=record.get("step") if isinstance(record.get("step"), int) else None,
        since_step_s=record.get("since_step_s")
        if isinstance(record.get("since_step_s"), int | float)
        else None,
        in_flight=in_flight,
        entered=entered,
        frame=user_frame(frames),
        stack=[f"{f.get('file')}:{f.get('line')} {f.get('function')}" for f in frames[-8:]],
    )


def hang_metrics(run: Run, problems: list[str], reports: dict[int, dict[str, Any]]) -> HangMetrics | None:
    """What the ranks' records say; None when no rank hung or failed."""
    layout = run.layout
    states: dict[int, RankState] = {}
    hung = False
    for rank in run.ranks():
        if layout.hang_record(rank).is_file():
            record = _read(layout.hang_record(rank), problems)
            if record is not None:
                states[rank] = _state(rank, record, "hang record")
                hung = True
    failures = []
    for rank in run.ranks():
        if layout.failure_record(rank).is_file():
            record = _read(layout.failure_record(rank), problems)
            if record is not None and isinstance(record.get("time"), int | float):
                frames = [f for f in record.get("frames", []) if isinstance(f, dict)]
                failures.append(
                    {
                        "rank": rank,
                        "time": record["time"],
                        "exception": str(record.get("exception", "")),
                        "message": str(record.get("message", ""))[:300],
                        "frame": user_frame(frames),
                    }
                )
    for rank in run.ranks():
        fault = layout.fault_record(rank)
        if rank not in {f["rank"] for f in failures} and fault.is_file():
            failure = _fault(rank, fault)
            if failure is not None:
                failures.append(failure)
    if not hung and not failures:
        return None
    for rank, report in reports.items():  # the others: what they were in when they stopped
        if rank not in states and isinstance(report.get("collectives"), dict):
            states[rank] = _state(rank, report, "its stop")
    out = HangMetrics(hung=hung, ranks=[states[r] for r in sorted(states)])
    if failures:
        out.first_failure = min(failures, key=lambda f: f["time"])
    _match(out, run.manifest.world_size)
    return out


_FAULT_FRAME = re.compile(r'^\s*File "(.+)", line (\d+) in (.+)$')


def _fault(rank: int, path: Path) -> dict[str, Any] | None:
    """A rank killed by a signal, from Python's faulthandler output: the signal, and the innermost
    user frame of the thread that received it (most recent call first)."""
    try:
        text = path.read_text(errors="replace")[:200_000]
        when = path.stat().st_mtime
    except OSError:
        return None
    lines = text.splitlines()
    head = next((ln for ln in lines if ln.startswith("Fatal Python error:")), "")
    if not head:
        return None
    # the thread that got the signal is "Current thread" (with one thread: "Stack"), among the others
    blocks = text.split("\n\n")
    thread = next((b for b in blocks if b.lstrip().startswith(("Current thread", "Stack"))), text)
    frames = [
        {"file": m.group(1), "line": int(m.group(2)), "function": m.group(3)}
        for ln in thread.splitlines()
        if (m := _FAULT_FRAME.match(ln))
    ]
    signal_name = head.removeprefix("Fatal Python error:").strip()
    return {
        "rank": rank,
        "time": when,
        "exception": signal_name,
        "message": f"the rank was killed by a signal ({signal_name}); every thread's stack is in {path}",
        "frame": user_frame(list(reversed(frames))),
    }


def _match(h: HangMetrics, world_size: int) -> None:
    """Who waits for whom, per group: the latest sequence number any rank is in, the ranks in it,
    and the members that never entered it; and ranks in the same (group, seq) that disagree."""
    groups = {e["group"] for s in h.ranks for e in s.in_flight}
    for group in sorted(groups):
        entries = [(s.rank, e) for s in h.ranks for e in s.in_flight if e["group"] == group]
        seq = max(int(e["seq"]) for _, e in entries)
        at = [(rank, e) for rank, e in entries if int(e["seq"]) == seq]
        members = {s.rank for s in h.ranks if group in s.entered}
        if group in _WORLD_GROUPS:
            members |= set(range(world_size)) if world_size else {s.rank for s in h.ranks}
        missing = sorted(r for r in members if r not in {rank for rank, _ in at} and next(
            (s.entered.get(group, 0) for s in h.ranks if s.rank == r), 0) < seq)  # fmt: skip
        h.waits.append(
            Wait(group=group, seq=seq, op=at[0][1]["op"], waiting=sorted(r for r, _ in at), missing=missing)
        )
        kinds: dict[tuple[Any, ...], list[int]] = {}
        for rank, e in at:
            kinds.setdefault((e.get("op"), e.get("bytes"), e.get("dtype")), []).append(rank)
        if len(kinds) > 1:
            h.desyncs.append(
                {
                    "group": group,
                    "seq": seq,
                    "sides": [
                        {"ranks": ranks, "op": op, "bytes": nbytes, "dtype": dtype}
                        for (op, nbytes, dtype), ranks in kinds.items()
                    ],
                }
            )
