"""Hangs and failures: the rank the others wait for, ranks that disagree on a collective, the rank
that failed first. They stop the job, so their severity is critical whatever the time per step."""

from __future__ import annotations

from perfkit.analyzers.metrics import Metrics
from perfkit.analyzers.rules import Diagnosis, Thresholds, rule


@rule("hang", remedy="fix_hang", reads="run", needs_steps=False)
def hang(m: Metrics, t: Thresholds) -> Diagnosis | None:
    h = m.hang
    if h is None or not h.hung:
        return None
    stuck = [w for w in h.waits if w.missing]
    if not stuck and h.desyncs:  # every rank arrived, at different collectives: the desync says it
        return None
    if not stuck:
        waiting = sorted({s.rank for s in h.ranks})
        return Diagnosis(
            title=f"The job hung: rank(s) {', '.join(map(str, waiting))} stopped moving",
            saving_ms=0.0,
            estimate="not a time per step: the job stops",
            evidence={"ranks": {s.rank: s.frame or "(no user frame)" for s in h.ranks}},
            ranks=waiting,
            severity="critical",
        )
    w = stuck[0]
    frames = {s.rank: s.frame for s in h.ranks}
    where = "; ".join(f"rank {r} at {frames.get(r) or 'an unknown place (no record)'}" for r in w.missing)
    return Diagnosis(
        title=f"Rank(s) {', '.join(map(str, w.missing))} never entered {w.op} #{w.seq} of group {w.group}; "
        f"rank(s) {', '.join(map(str, w.waiting))} wait in it",
        saving_ms=0.0,
        estimate="not a time per step: the job stops",
        evidence={
            "group": w.group,
            "seq": w.seq,
            "op": w.op,
            "waiting": w.waiting,
            "missing": w.missing,
            "stuck_at": where,
        },
        ranks=w.missing,
        severity="critical",
    )


@rule("desync", remedy="fix_desync", reads="run", needs_steps=False)
def desync(m: Metrics, t: Thresholds) -> Diagnosis | None:
    h = m.hang
    if h is None or not h.desyncs:
        return None
    d = h.desyncs[0]
    sides = " vs ".join(
        f"rank(s) {', '.join(map(str, s['ranks']))}: {s['op']} of {s['bytes']} bytes {s['dtype']}"
        for s in d["sides"]
    )
    return Diagnosis(
        title=f"Ranks disagree on collective #{d['seq']} of group {d['group']}: {sides}",
        saving_ms=0.0,
        estimate="not a time per step: the job hangs or fails",
        evidence=d,
        ranks=sorted(r for s in d["sides"] for r in s["ranks"]),
        severity="critical",
    )


@rule("first_failure", remedy="fix_failure", reads="run", needs_steps=False)
def first_failure(m: Metrics, t: Thresholds) -> Diagnosis | None:
    h = m.hang
    if h is None or h.first_failure is None:
        return None
    f = h.first_failure
    others = {
        s.rank: [f"{e['op']} #{e['seq']} of group {e['group']}" for e in s.in_flight]
        for s in h.ranks
        if s.rank != f["rank"] and s.in_flight
    }
    return Diagnosis(
        title=f"Rank {f['rank']} failed first: {f['exception']}: {f['message'][:120]}"
        + (f" at {f['frame']}" if f["frame"] else ""),
        saving_ms=0.0,
        estimate="not a time per step: the job stopped",
        evidence={"rank": f["rank"], "exception": f["exception"], "at": f["frame"], "others_were_in": others},
        ranks=[f["rank"]],
        severity="critical",
    )
