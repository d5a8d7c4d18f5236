"""Watch mode's anomaly detectors: a long job judged window by window against its own healthy start.

The job's steps are cut into windows of ``W`` steps (``--watch-window``). Once every rank finished a
window, each signal gets one value for it:

- ``step_time`` (the job): the median over ranks of each rank's median step time;
- ``straggler`` (a rank): its busy time (step time less its wait for the last rank at the collectives,
  ``runtables.blocked_ns``) beyond the median of the other ranks' in the same step, median over the
  window (about 0 on a healthy job: each rank is ahead by turns);
- ``data_wait`` (a rank): its median wait for the next batch;
- ``gc`` (a rank): its Python garbage-collection pause per step;
- ``collective`` (a process group): its collectives' median transfer time, from the last arrival
  (``comms.transfer_ns``: waiting for a late rank is not the link's fault);
- ``memory`` (a rank): the most memory it held (the CUDA allocator's, else its resident set).

The baseline of each signal is its windows after the first (the warm-up): ``BASELINE_WINDOWS`` of
them, its median and robust spread (1.4826 x the median absolute deviation) over those windows. It
does not roll: a baseline that followed the job would absorb the slow creep (a throttling GPU, a
leak) that watching is for. A window is over when its value exceeds the median by ``Z`` spreads and
by the signal's smallest effect worth a word (a share of the step, so a perfectly quiet baseline
cannot make jitter an anomaly); ``SUSTAIN`` windows over in a row, lasting ``SUSTAIN_S`` together,
start an anomaly at the first of them; twice as many under end it. Memory is judged on its growth: over the baseline's peak by the same
margin and higher in each of the last ``GROWTH_WINDOWS`` windows than in the one before (a leak),
with the steps left until the device's capacity at that rate.

GPU health (NVML) is judged on events, not spreads: a hardware slowdown, thermal or power-brake
throttle, an XID error, new uncorrectable ECC errors or NVLink/PCIe replays start an anomaly when
they appear. Pure functions of the rows: ``perfkit.watch`` feeds them while the job runs, and the
tests feed them made-up windows.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, cast

import pandas as pd
from perfkit.analyzers.comms import is_collective, transfer_ns
from perfkit.analyzers.runtables import matched_calls, waits

BASELINE_WINDOWS = 8
SUSTAIN = 2
SUSTAIN_S = 2.0
"""And the windows over must last this long together by the steps' clock: at a ms a step, a second
of the host doing something else (every rank's collectives slowed, then back) is no change of the
job's."""
Z = 6.0
GROWTH_WINDOWS = 3
PHASES = ("data_wait_s", "forward_s", "backward_s", "optimizer_s")

# The smallest effect each signal reports, as a share of the baseline step (or of its own baseline):
# under it, nothing a user would change is at stake.
FLOORS: dict[str, tuple[float, float]] = {
    # kind: (share of the baseline step, share of the signal's own baseline median)
    "step_time": (0.0, 0.05),
    "straggler": (0.03, 0.0),
    "data_wait": (0.03, 0.0),
    "gc": (0.03, 0.0),
    "collective": (0.01, 0.25),
    "memory": (0.0, 0.02),
}


@dataclass(kw_only=True)
class Anomaly:
    id: str
    kind: str
    """step_time, straggler, data_wait, gc, collective, memory or gpu_health."""
    subject: str
    """What it is about: ``job``, ``rank 3``, a process group, ``rank 0 gpu 0``."""
    ranks: list[int]
    start_step: int
    """The first step of the first window over the threshold."""
    detected_step: int
    """The last step of the window that confirmed it."""
    value: float
    baseline: float
    threshold: float
    unit: str
    title: str
    evidence: dict[str, Any] = field(default_factory=dict)
    end_step: int | None = None
    capture: str | None = None
    """The capture requested for it (``perfkit.run.RunLayout.capture_trace``), if any."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Series:
    """One signal's baseline and where it stands."""

    kind: str
    subject: str
    ranks: list[int]
    unit: str
    baseline: list[float] = field(default_factory=list)
    over: list[tuple[int, int, float, float]] = field(default_factory=list)
    """Consecutive windows over the threshold so far: (first step, last step, value, seconds)."""
    under: int = 0
    history: list[float] = field(default_factory=list)
    ends: list[int] = field(default_factory=list)
    """The last step of each window in ``history``."""
    active: Anomaly | None = None

    def growing(self, v: float, limit: float) -> bool:
        """A leak: over the baseline's peak by the margin, higher than the window before by more than
        the baseline's window-to-window noise in each of the last ``GROWTH_WINDOWS``, and grown by
        the margin within them (a one-time step up, then flat, is not a leak)."""
        recent = self.history[-(GROWTH_WINDOWS + 1) :]
        if len(recent) < GROWTH_WINDOWS + 1:
            return False
        margin = limit - self.center()
        diffs = [abs(b - a) for a, b in zip(self.baseline, self.baseline[1:], strict=False)]
        noise = max(1.4826 * statistics.median(diffs) if diffs else 0.0, 1e-3 * abs(self.center()))
        return (
            v > max(self.baseline) + margin
            and all(b - a > noise for a, b in zip(recent, recent[1:], strict=False))
            and recent[-1] - recent[0] > margin
        )

    def center(self) -> float:
        return statistics.median(self.baseline)

    def threshold(self, step_ms: float) -> float:
        med = self.center()
        mad = statistics.median(abs(v - med) for v in self.baseline) * 1.4826
        share_of_step, share_of_own = FLOORS[self.kind]
        unit_step = step_ms if self.unit == "ms" else 0.0
        return med + max(Z * mad, share_of_step * unit_step, share_of_own * abs(med))


def window_values(
    steps: pd.DataFrame, comms: pd.DataFrame, memory: pd.DataFrame, gc: pd.DataFrame
) -> dict[tuple[str, str], tuple[float, list[int], str]]:
    """Each signal's value for one window of every rank's rows: (kind, subject) -> (value, ranks,
    unit)."""
    out: dict[tuple[str, str], tuple[float, list[int], str]] = {}
    if steps.empty:
        return out
    ranks = sorted(int(r) for r in steps["rank"].unique())
    per_rank = steps.groupby("rank")["step_time_s"].median() * 1e3
    out[("step_time", "job")] = (float(per_rank.median()), ranks, "ms")
    if "data_wait_s" in steps and steps["data_wait_s"].notna().any():
        for r, v in (steps.groupby("rank")["data_wait_s"].median() * 1e3).items():
            out[("data_wait", f"rank {r}")] = (float(v), [int(r)], "ms")  # type: ignore[call-overload]
    # A step without a collection has no gc row: no rows is no pause (a job without the gc collector
    # reads 0 throughout and is never named).
    n = steps.groupby("rank")["step"].nunique()
    pause = gc.groupby("rank")["pause_s"].sum() * 1e3 if not gc.empty else pd.Series(dtype=float)
    for r in ranks:
        out[("gc", f"rank {r}")] = (float(pause.get(r, 0.0) / max(1, n.get(r, 1))), [r], "ms")
    if len(ranks) >= 2 and not comms.empty:
        matched = matched_calls(comms, len(ranks))
        if not matched.empty:
            step_s = steps.set_index(["rank", "step"])["step_time_s"]
            wait = waits(matched, step_s)
            busy = (step_s - wait).unstack("rank")
            # Each step, a rank's busy time beyond the median of the others' (with two ranks: beyond
            # the other's): about 0 either way on a healthy job, the extra work of a late one.
            for r in busy.columns:
                others = busy.drop(columns=r).median(axis=1)
                v = float((busy[r] - others).median() * 1e3)
                out[("straggler", f"rank {r}")] = (v, [int(r)], "ms")
            t = transfer_ns(matched) / 1e6
            by_group = t.groupby(matched["group"].fillna("")).median().dropna()
            for g, v in by_group.items():
                members = sorted(
                    int(r) for r in matched.loc[matched["group"].fillna("") == g, "rank"].unique()
                )
                out[("collective", str(g) or "default")] = (float(v), members, "ms")
    if not memory.empty:
        m = memory.assign(
            level=memory["allocated"].fillna(memory["rss"]) if "allocated" in memory else memory["rss"]
        )
        for r, v in m.groupby("rank")["level"].max().items():
            out[("memory", f"rank {r}")] = (float(v), [int(r)], "bytes")  # type: ignore[call-overload]
    return out


def _by_rank(frame: pd.DataFrame) -> Iterator[tuple[int, pd.DataFrame]]:
    for r, g in frame.groupby("rank"):
        yield int(cast(Any, r)), g


def phase_change(steps: pd.DataFrame, baseline: dict[int, dict[str, float]]) -> dict[str, dict[str, float]]:
    """Per rank, each phase's median in this window against the baseline's (ms), for the evidence."""
    out: dict[str, dict[str, float]] = {}
    for r, g in _by_rank(steps):
        base = baseline.get(r, {})
        row = {}
        for p in ("step_time_s", *PHASES):
            if p in g and g[p].notna().any() and p in base:
                now = float(g[p].median() * 1e3)
                row[p.removesuffix("_s")] = round(now - base[p], 3)
        out[f"rank {r}"] = row
    return out


def phase_medians(steps: pd.DataFrame) -> dict[int, dict[str, float]]:
    return {
        r: {p: float(g[p].median() * 1e3) for p in ("step_time_s", *PHASES) if p in g and g[p].notna().any()}
        for r, g in _by_rank(steps)
    }


class Detectors:
    """Every signal's baseline and state, fed one window at a time; says which anomalies start and
    end."""

    def __init__(self, capacity_bytes: dict[int, int] | None = None) -> None:
        self.capacity = capacity_bytes or {}
        """Each rank's memory capacity (its GPU's, else its share of the host's): a leak's steps left."""
        self.series: dict[tuple[str, str], _Series] = {}
        self.windows_seen = 0
        self.baseline_steps_ms: list[float] = []
        self.baseline_phases: dict[int, list[dict[str, float]]] = {}
        self.anomalies: list[Anomaly] = []
        self._ids = 0

    @property
    def ready(self) -> bool:
        """Whether the baseline is complete (the detectors judge from the next window on)."""
        return self.windows_seen > BASELINE_WINDOWS

    def baseline_phase_medians(self) -> dict[int, dict[str, float]]:
        out: dict[int, dict[str, float]] = {}
        for r, rows in self.baseline_phases.items():
            keys = set().union(*rows) if rows else set()
            out[r] = {k: statistics.median(x[k] for x in rows if k in x) for k in keys}
        return out

    def feed(
        self,
        first: int,
        last: int,
        steps: pd.DataFrame,
        comms: pd.DataFrame,
        memory: pd.DataFrame,
        gc: pd.DataFrame,
    ) -> tuple[list[Anomaly], list[Anomaly]]:
        """One window (steps ``first``..``last`` of every rank); returns the anomalies that started and
        those that ended with it."""
        if steps.empty:  # no rows of it reached the watcher (all left out for a capture): not judged
            return [], []
        self.windows_seen += 1
        values = window_values(steps, comms, memory, gc)
        seconds = _seconds(steps)
        if self.windows_seen == 1:  # the warm-up: compiled kernels, allocator growth, first batches
            return [], []
        if self.windows_seen <= BASELINE_WINDOWS + 1:
            for key, (v, ranks, unit) in values.items():
                s = self.series.setdefault(key, _Series(key[0], key[1], ranks, unit))
                s.baseline.append(v)
            if ("step_time", "job") in values:
                self.baseline_steps_ms.append(values[("step_time", "job")][0])
            for r, p in phase_medians(steps).items():
                self.baseline_phases.setdefault(r, []).append(p)
            return [], []
        step_ms = statistics.median(self.baseline_steps_ms) if self.baseline_steps_ms else 0.0
        started: list[Anomaly] = []
        ended: list[Anomaly] = []
        for key, (v, _, _) in values.items():
            found = self.series.get(key)
            if found is None or len(found.baseline) < BASELINE_WINDOWS // 2:
                continue  # a signal the baseline did not have (a group that appeared later)
            s = found
            s.history.append(v)
            s.ends.append(last)
            limit = s.threshold(step_ms)
            if s.kind == "collective" and any(
                x.active is not None for x in self.series.values() if x.kind == "straggler"
            ):
                continue  # a late rank makes its groups' calls look slow too: that one is named
            if s.kind == "memory":
                is_over = s.growing(v, limit)
            else:
                is_over = v > limit
            if is_over:
                s.under = 0
                s.over.append((first, last, v, seconds))
                if s.active is None and len(s.over) >= SUSTAIN and sum(o[3] for o in s.over) >= SUSTAIN_S:
                    a = self._start(s, v, limit, step_ms, steps)
                    started.append(a)
            else:
                s.over = []
                if s.active is not None:
                    s.under += 1
                    if s.under >= 2 * SUSTAIN:  # slower to end than to start: no flapping
                        s.active.end_step = s.ends[-s.under - 1] + 1
                        ended.append(s.active)
                        s.active = None
        return started, ended

    def _start(self, s: _Series, v: float, limit: float, step_ms: float, steps: pd.DataFrame) -> Anomaly:
        self._ids += 1
        first = s.over[0][0]
        base = s.center()
        evidence: dict[str, Any] = {
            "phase_change_ms": phase_change(steps, self.baseline_phase_medians()),
            "windows_over": len(s.over),
        }
        if s.kind == "memory":
            steps_grown = max(1, s.ends[-1] - s.ends[-(GROWTH_WINDOWS + 1)])
            per_step = (v - s.history[-(GROWTH_WINDOWS + 1)]) / steps_grown
            evidence["growth_bytes_per_step"] = per_step
            cap = self.capacity.get(s.ranks[0])
            if cap and per_step > 0:
                evidence["steps_to_capacity"] = int(max(0.0, cap - v) / per_step)
        a = Anomaly(
            id=f"a{self._ids}",
            kind=s.kind,
            subject=s.subject,
            ranks=list(s.ranks),
            start_step=first,
            detected_step=s.over[-1][1],
            value=v,
            baseline=base,
            threshold=limit,
            unit=s.unit,
            title=_title(s, v, base, evidence, step_ms),
            evidence=evidence,
        )
        s.active = a
        self.anomalies.append(a)
        return a


def _seconds(steps: pd.DataFrame) -> float:
    """How long a window lasted by the steps' own clock (the slowest rank's); without the clock (rows
    made up in a test), long enough."""
    if "start_ns" not in steps or "end_ns" not in steps or steps["start_ns"].isna().all():
        return float("inf")
    spans = steps.groupby("rank").agg(a=("start_ns", "min"), b=("end_ns", "max"))
    return float((spans["b"] - spans["a"]).max()) / 1e9


def _title(s: _Series, v: float, base: float, evidence: dict[str, Any], step_ms: float) -> str:
    grew = f"{base:.1f} -> {v:.1f} ms"
    if s.kind == "step_time":
        return f"The job's step time rose {v / max(base, 1e-9) - 1:.0%} ({grew} a step)"
    if s.kind == "straggler":
        return f"{s.subject.capitalize()} became late: busy {v - base:.1f} ms a step longer than the others ({grew} beyond their median)"
    if s.kind == "data_wait":
        return f"{s.subject.capitalize()} waits for its data {v - base:.1f} ms a step longer ({grew})"
    if s.kind == "gc":
        return f"{s.subject.capitalize()} pauses {v - base:.1f} ms a step longer in Python's garbage collector ({grew})"
    if s.kind == "collective":
        return f"Collectives of group {s.subject} slowed {v / max(base, 1e-9):.1f}x ({base:.2f} -> {v:.2f} ms a call)"
    if s.kind == "memory":
        rate = evidence.get("growth_bytes_per_step", 0.0)
        left = evidence.get("steps_to_capacity")
        tail = f"; at this rate full in {left:,} steps" if left is not None else ""
        return (
            f"{s.subject.capitalize()}'s memory keeps growing: {base / 2**20:,.0f} -> {v / 2**20:,.0f} MiB, "
            f"{rate / 2**10:,.0f} KiB a step{tail}"
        )
    return f"{s.kind} of {s.subject}: {grew}"


# ---- a capture against the baseline ---------------------------------------------------------------
TOP = 6


def op_times(trace: Any, steps: int) -> tuple[dict[str, float], float]:
    """Per step, each op's or kernel's own time (ms; a CPU op's time less its children's) in a
    captured trace, and the host time of the busiest thread outside any op (Python, sleeps, waits
    that no op records)."""
    ev = trace.events
    own: dict[str, float] = {}
    gpu = ev[ev["cat"].isin(("kernel", "gpu_memcpy", "gpu_memset")).to_numpy()]
    for name, dur in gpu.groupby("name", observed=True)["dur"].sum().items():
        own[f"kernel {name}"] = float(dur) / 1e6 / steps
    # CPU ops, and the annotations around them (a DataLoader's next batch): an annotation's own time
    # is what ran in it outside any op (Python, a sleep, a read).
    cpu = ev[ev["cat"].isin(("cpu_op", "user_annotation")).to_numpy()]
    cpu = cpu[~cpu["name"].astype(str).str.startswith("ProfilerStep#").to_numpy()].sort_values(
        ["tid", "ts", "dur"], ascending=[True, True, False]
    )
    outside = 0.0
    busiest = cpu.groupby("tid")["dur"].sum().idxmax() if not cpu.empty else None
    for tid, g in cpu.groupby("tid"):
        stack: list[list[Any]] = []  # [name, end, child time]
        covered = 0
        span_start = int(g["ts"].min())
        span_end = int(g["end"].max())
        for name, ts, dur, end in zip(g["name"], g["ts"], g["dur"], g["end"], strict=False):
            while stack and ts >= stack[-1][1]:
                done = stack.pop()
                own[done[0]] = own.get(done[0], 0.0) + done[3] - done[2]
            if stack:
                stack[-1][2] += int(dur)
            else:
                covered += int(dur)
            stack.append([str(name), int(end), 0, int(dur)])
        while stack:
            done = stack.pop()
            own[done[0]] = own.get(done[0], 0.0) + done[3] - done[2]
        if tid == busiest:
            outside = (span_end - span_start - covered) / 1e6 / steps
    return {k: (v / 1e6 / steps if not k.startswith("kernel ") else v) for k, v in own.items()}, outside


def diagnose(
    baseline: dict[int, Any], capture: dict[int, Any], base_steps: int, capture_steps: int
) -> dict[str, Any]:
    """What grew per step between each rank's baseline trace and its capture: the ops and kernels
    whose own time grew most (compute first: a collective's time grows on the ranks that wait in it,
    so communication is told apart, as one sum), and the host time outside any op. ``baseline`` and
    ``capture``: a ``Trace`` by rank."""
    per_rank: dict[str, Any] = {}
    lines = []
    for rank in sorted(set(baseline) & set(capture)):
        b, b_out = op_times(baseline[rank], base_steps)
        c, c_out = op_times(capture[rank], capture_steps)
        work = [n for n in set(b) | set(c) if not is_collective(n)]
        names = sorted(work, key=lambda n: b.get(n, 0.0) - c.get(n, 0.0))[:TOP]
        grew: list[dict[str, Any]] = [
            {
                "name": n,
                "baseline_ms": b.get(n, 0.0),
                "capture_ms": c.get(n, 0.0),
                "delta_ms": c.get(n, 0.0) - b.get(n, 0.0),
            }
            for n in names
        ]
        comm = [n for n in set(b) | set(c) if is_collective(n)]
        comm_b, comm_c = sum(b.get(n, 0.0) for n in comm), sum(c.get(n, 0.0) for n in comm)
        entry: dict[str, Any] = {
            "grew": [g for g in grew if g["delta_ms"] > 0],
            "communication_ms": {"baseline": comm_b, "capture": comm_c, "delta": comm_c - comm_b},
            "outside_ops_ms": {"baseline": b_out, "capture": c_out, "delta": c_out - b_out},
            "ops_ms": {"baseline": sum(b.values()), "capture": sum(c.values())},
        }
        per_rank[str(rank)] = entry
        parts = [f"{g['name']} +{g['delta_ms']:.2f}" for g in entry["grew"][:3] if g["delta_ms"] >= 0.01]
        if c_out - b_out >= 0.01:
            parts.append(f"outside any op +{c_out - b_out:.2f}")
        if comm_c - comm_b >= 0.01:
            parts.append(f"communication +{comm_c - comm_b:.2f} (waiting included)")
        if parts:
            lines.append(f"rank {rank}: " + ", ".join(parts) + " ms/step")
    return {"per_rank": per_rank, "summary": "; ".join(lines) or "nothing grew by 0.01 ms a step or more"}


# ---- what a watched run found, for the analysis ------------------------------------------------
@dataclass(kw_only=True)
class WatchCapture:
    id: str
    first_step: int
    last_step: int
    reason: str
    anomaly: str | None
    ranks_traced: list[int]
    said: dict[str, str]
    """What each rank said of it (``captures.json``): its steps and size, or why it declined."""
    summary: str = ""
    """What grew against the baseline capture, per rank."""
    per_rank: dict[str, Any] = field(default_factory=dict)


@dataclass(kw_only=True)
class WatchReport:
    anomalies: list[dict[str, Any]] = field(default_factory=list)
    """Each anomaly as the watcher wrote it as it started (``Anomaly``), with its ``end_step``."""
    captures: list[WatchCapture] = field(default_factory=list)
    baseline_traced: list[int] = field(default_factory=list)
    """The ranks that wrote the baseline capture."""
    disk_bytes: int = 0
    """The run directory's size."""
    budget_bytes: int | None = None
    """The --watch-budget it was held to."""
    windows_judged: int = 0
    window_steps: int | None = None
    """Steps per judged window."""
    baseline_ready: bool = False
    """Whether the job ran long enough for a baseline (the warm-up window and eight more): a shorter
    one could not have an anomaly named."""
    warnings: list[str] = field(default_factory=list)
    """What the watcher said of itself (the tables turned over faster than it read them)."""


def watch_report(run: Any, problems: list[str], budget_mb: float | None = None) -> WatchReport | None:
    """The anomalies, captures and diagnoses of a watched run (None for a run that was not). A
    capture the watcher had no time to diagnose (the job ended first) is diagnosed here."""
    from perfkit.analyzers.trace import TraceError, load_trace

    from perfkit.tables import loads

    layout = run.layout
    if not layout.watch_dir.is_dir():
        return None
    out = WatchReport()
    records: dict[str, dict[str, Any]] = {}
    try:
        lines = layout.anomalies.read_bytes().splitlines() if layout.anomalies.is_file() else []
    except OSError as e:
        problems.append(f"{layout.anomalies}: cannot be read ({e.strerror})")
        lines = []
    for line in lines:
        try:
            rec = loads(line)
        except ValueError:
            problems.append(f"{layout.anomalies}: a damaged line was skipped")
            continue
        if not isinstance(rec, dict) or "id" not in rec:
            continue
        if "ended_step" in rec:
            if rec["id"] in records:
                records[rec["id"]]["end_step"] = rec["ended_step"]
        else:
            records[rec["id"]] = rec
    out.anomalies = list(records.values())
    said: dict[int, dict[str, str]] = {}
    for rank in layout.ranks():
        with_state = layout.capture_state(rank)
        if with_state.is_file():
            try:
                said[rank] = dict(loads(with_state.read_bytes()).get("captures") or {})
            except (OSError, ValueError, AttributeError):
                problems.append(f"{with_state}: damaged; what that rank said of its captures is unknown")
    out.baseline_traced = [r for r in layout.ranks() if layout.capture_trace(r, "baseline").is_file()]
    requests = sorted(layout.capture_requests.glob("*.json")) if layout.capture_requests.is_dir() else []
    for path in requests:
        try:
            req = loads(path.read_bytes())
            cid, first, steps = str(req["id"]), int(req["first_step"]), int(req["steps"])
        except (OSError, ValueError, KeyError, TypeError):
            problems.append(f"{path}: a damaged capture request was skipped")
            continue
        cap = WatchCapture(
            id=cid,
            first_step=first,
            last_step=first + steps - 1,
            reason=str(req.get("reason") or ""),
            anomaly=req.get("anomaly"),
            ranks_traced=[r for r in layout.ranks() if layout.capture_trace(r, cid).is_file()],
            said={str(r): s[cid] for r, s in said.items() if cid in s},
        )
        diagnosis = layout.capture_diagnosis(cid)
        try:
            if diagnosis.is_file():
                d = loads(diagnosis.read_bytes())
            elif cap.ranks_traced and out.baseline_traced:
                ranks = sorted(set(cap.ranks_traced) & set(out.baseline_traced))
                d = diagnose(  # the baseline traced as many steps: one --capture-steps per run
                    {r: load_trace(layout.capture_trace(r, "baseline"), r) for r in ranks},
                    {r: load_trace(layout.capture_trace(r, cid), r) for r in ranks},
                    steps,
                    steps,
                )
            else:
                d = {}
        except (OSError, ValueError, TraceError) as e:
            problems.append(f"capture {cid}: cannot be diagnosed ({e})")
            d = {}
        cap.summary = str(d.get("summary") or d.get("error") or "")
        cap.per_rank = d.get("per_rank") or {}
        out.captures.append(cap)
    diagnosed = {c.id: c.summary for c in out.captures}
    for a in out.anomalies:
        if a.get("capture") in diagnosed:
            a["diagnosis"] = diagnosed[a["capture"]]
    if layout.watch_state.is_file():
        try:
            state = loads(layout.watch_state.read_bytes())
            out.windows_judged = int(state.get("windows_judged") or 0)
            out.window_steps = state.get("judged_window_steps")
            out.baseline_ready = bool(state.get("baseline_ready"))
            out.warnings = [str(w) for w in state.get("warnings") or []]
        except (OSError, ValueError, TypeError, AttributeError):
            problems.append(f"{layout.watch_state}: damaged; how much of the job was judged is unknown")
    out.disk_bytes = sum(p.stat().st_size for p in run.path.rglob("*") if p.is_file())
    out.budget_bytes = int(budget_mb * 1e6) if budget_mb else None
    return out
