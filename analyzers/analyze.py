"""The front door: a run directory, one Kineto trace or a folder of traces in; metrics, ranked
findings and tables out.

Traces are parsed in a process pool, one file per task; each worker returns only the small
per-rank facts and tables, so memory holds one parsed trace per worker at a time, however many
ranks there are. A trace that cannot be read is named in ``problems`` and the analysis goes on
with the others (``partial``).
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from perfkit.analyzers import rules
from perfkit.analyzers.comms import collective_table, trace_collectives
from perfkit.analyzers.facts import TraceFacts, trace_facts
from perfkit.analyzers.flight import dumps_hang_metrics, load_dump, looks_like_dump
from perfkit.analyzers.hangs import hang_metrics
from perfkit.analyzers.kernels import kernel_table
from perfkit.analyzers.memory import summarize
from perfkit.analyzers.metrics import (
    SCHEMA_VERSION,
    Delta,
    Metrics,
    RankTrace,
    RunInfo,
    check_sanity,
    deltas,
    records,
    step_change,
    to_json,
)
from perfkit.analyzers.runtables import (
    comm_metrics,
    io_metrics,
    load_tables,
    memory_metrics,
    signal_metrics,
    step_metrics,
    straggler_metrics,
    throughput_metrics,
)
from perfkit.analyzers.spread import rank_spread
from perfkit.analyzers.trace import TraceError, load_trace
from perfkit.analyzers.watch import watch_report

from perfkit.errors import RunDirError
from perfkit.hardware import gpu_peak_tflops
from perfkit.run import ANALYSIS_NAME, MANIFEST_NAME, PROBE_NAME, Run, RunLayout

_TRACE_SUFFIXES = (".json", ".json.gz")


@dataclass
class Analysis:
    source: Path
    metrics: Metrics
    findings: list[rules.Finding]
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    """kernels, kernel_categories, collectives, breakdown: DataFrames with a rank column."""
    problems: list[str] = field(default_factory=list)
    ranks: list[int] = field(default_factory=list)

    @property
    def partial(self) -> bool:
        return bool(self.problems)

    @property
    def layout(self) -> RunLayout:
        """Where this analysis' outputs go by default: the run directory, or the trace's folder."""
        return RunLayout(self.source if self.source.is_dir() else self.source.parent)

    def to_json(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "source": str(self.source),
            "ranks": self.ranks,
            "partial": self.partial,
            "problems": self.problems,
            "metrics": to_json(self.metrics),
            "findings": [to_json(f) for f in self.findings],
        }


@dataclass
class Comparison:
    """Run B against run A: metric deltas and the findings that appeared or went away."""

    a: Analysis
    b: Analysis
    rows: list[Delta]
    appeared: list[rules.Finding]
    resolved: list[rules.Finding]
    persisting: list[tuple[rules.Finding, rules.Finding]]

    @property
    def step_change(self) -> float | None:
        """Relative change of the median step time, B against A (0.05 = 5% slower)."""
        return step_change(self.a.metrics, self.b.metrics)


def compare(a: Analysis, b: Analysis) -> Comparison:
    ids_a, ids_b = {f.id: f for f in a.findings}, {f.id: f for f in b.findings}
    return Comparison(
        a,
        b,
        rows=deltas(a.metrics, b.metrics),
        appeared=[f for i, f in ids_b.items() if i not in ids_a],
        resolved=[f for i, f in ids_a.items() if i not in ids_b],
        persisting=[(ids_a[i], ids_b[i]) for i in ids_b if i in ids_a],
    )


def find_traces(folder: Path) -> list[Path]:
    found = [
        p
        for p in sorted(folder.rglob("*"))
        if p.is_file()
        and p.name.endswith(_TRACE_SUFFIXES)
        and p.name not in (MANIFEST_NAME, ANALYSIS_NAME, PROBE_NAME)
    ]
    return found


def _trace_job(path: Path) -> dict[str, Any]:
    """Parse one trace and reduce it to what the analysis keeps (runs in a worker process)."""
    try:
        trace = load_trace(path)
    except TraceError as e:
        return {"error": str(e)}
    facts = trace_facts(trace)
    categories, top = kernel_table(trace)
    collectives = trace_collectives(trace)
    return {
        "rank": trace.rank,
        "path": str(path),
        "facts": facts,
        "device": trace.device.get("name"),
        "device_memory": trace.device.get("totalGlobalMem"),
        "world_size": trace.world_size,
        "categories": categories.assign(rank=trace.rank),
        "top": top.assign(rank=trace.rank),
        "collectives": collectives,
        "repairs": trace.repairs,
    }


def _parse_all(paths: list[Path], jobs: int | None, scheduler: str | None = None) -> list[dict[str, Any]]:
    if scheduler is not None:
        return _parse_on_dask(paths, scheduler)
    if len(paths) <= 1 or jobs == 1:
        return [_trace_job(p) for p in paths]
    workers = min(len(paths), jobs or os.cpu_count() or 1)
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(_trace_job, paths))


DASK_CONNECT_S = 10.0
"""How long to try reaching a Dask scheduler before saying so."""


def _check_scheduler_address(address: str) -> None:
    """``tcp://HOST:PORT`` (or ``HOST:PORT``), before any Client exists: a Client made for a malformed,
    TLS or UCX address (which need a security or transport set-up perfkit does not make) fails, and
    then prints a traceback of its own as it is collected, 20 s later."""
    scheme, _, rest = address.rpartition("://")
    host, _, port = rest.rpartition(":")
    if scheme not in ("", "tcp"):
        raise RunDirError(
            f"--scheduler {address}: perfkit connects to Dask over tcp:// only (a {scheme}:// scheduler needs "
            "a security or transport configuration); give tcp://HOST:PORT"
        )
    bracketed = host.startswith("[") and host.endswith("]")  # an IPv6 address
    if not host or (":" in host and not bracketed) or not port.isdigit() or not 0 < int(port) < 65536:
        raise RunDirError(
            f"--scheduler {address}: not an address; give tcp://HOST:PORT (e.g. tcp://10.0.0.5:8786)"
        )


def _parse_on_dask(paths: list[Path], scheduler: str) -> list[dict[str, Any]]:
    """The per-rank work on a Dask distributed cluster (its workers read the traces from a shared
    filesystem and need perfkit installed); the results come back in path order."""
    try:
        from distributed import Client
    except ImportError:
        raise RunDirError(
            "--scheduler needs dask's distributed package: pip install 'perfkit[dask]' (or leave out "
            "--scheduler to use this machine's cores)"
        ) from None
    _check_scheduler_address(scheduler)
    # Client's own timeout does not bound everything: a port that accepts and never answers held it
    # for 10 minutes and more. It connects in a thread of its own, waited for a bounded time.
    made: list[Any] = []
    failed: list[BaseException] = []

    def connect() -> None:
        try:
            made.append(Client(scheduler, timeout=DASK_CONNECT_S, set_as_default=False))
        except BaseException as e:  # reported below, in this thread
            failed.append(e)

    thread = threading.Thread(target=connect, daemon=True, name="perfkit-dask-connect")
    thread.start()
    thread.join(DASK_CONNECT_S + 5)
    if not made:
        why = (
            f"{type(failed[0]).__name__}: {failed[0]}"
            if failed
            else f"no answer in {DASK_CONNECT_S + 5:.0f} s: something listens there, but not a Dask scheduler"
        )
        raise RunDirError(
            f"cannot reach the Dask scheduler at {scheduler} ({why}); start one (dask scheduler) or leave "
            "out --scheduler"
        )
    client = made[0]
    with client:
        futures = client.map(_trace_job, [p.resolve() for p in paths], pure=False)
        return list(client.gather(futures))


def analyze(
    path: Path | str,
    *,
    peak_tflops: float | None = None,
    jobs: int | None = None,
    scheduler: str | None = None,
) -> Analysis:
    """Analyze a run directory, one trace or a folder of traces; the traces are parsed by ``jobs``
    local processes, or by the workers of the Dask cluster at ``scheduler`` (``tcp://HOST:PORT``)."""
    path = Path(path)
    if not path.exists():
        raise RunDirError(f"{path}: no such run directory or trace")
    run: Run | None = None
    early_problems: list[str] = []
    if path.is_dir() and RunLayout(path).is_run():
        run = Run.open(path)
        traces = run.layout.traces()
    elif path.is_dir() and (
        dumps := [p for p in sorted(path.iterdir()) if p.is_file() and looks_like_dump(p)]
    ):
        return _flight_recorder(path, dumps)
    elif path.is_dir():
        traces = find_traces(path)
        if not traces:
            raise RunDirError(f"{path}: holds no manifest.json and no *.json[.gz] traces; nothing to analyze")
        if RunLayout(path).ranks():
            early_problems.append(
                f"{path}: has rank folders but no manifest.json; analyzed as a folder of traces (the step, "
                "collective and memory tables need the manifest: restore it or re-run perfkit profile)"
            )
    elif path.name.endswith((".pickle", ".pickle.gz")):  # an allocator snapshot alone: one rank
        summary = summarize(path)
        metrics = Metrics(memory_snapshot={path.name: summary})
        snapshot = rules.Snapshot(path.name, 0, summary)
        return Analysis(
            source=path, metrics=metrics, findings=rules.evaluate([], None, [snapshot]), ranks=[0]
        )
    else:
        traces = [path]

    results = _parse_all(traces, jobs, scheduler)
    problems = early_problems + [r["error"] for r in results if "error" in r]
    good = _one_trace_per_rank([r for r in results if "error" not in r], problems)
    problems += [note for r in good for note in r["repairs"]]
    if not good and run is None:
        raise RunDirError(
            problems[0]
            if len(problems) == 1
            else f"{path}: none of {len(traces)} traces could be read; first: {problems[0]}"
        )

    metrics = Metrics(device=next((r["device"] for r in good if r["device"]), None))
    snapshots: list[rules.Snapshot] = []
    tables: dict[str, pd.DataFrame] = {}
    facts: list[TraceFacts] = [r["facts"] for r in good]
    metrics.traced_ranks = sorted(r["rank"] for r in good)
    ranks: set[int] = {r["rank"] for r in good}
    if good:
        for r in good:
            f: TraceFacts = r["facts"]
            metrics.trace[r["rank"]] = RankTrace(
                trace=r["path"],
                steps_in_trace=f.steps,
                step_ms=f.step_ms,
                temporal_breakdown=f.breakdown,
                idle_attribution=f.idle,
                communication_overlap=f.exposed,
                gemm_fp32_share=f.gemm_fp32_ns / f.gemm_ns if f.gemm_ns else None,
                recomputed_ops_per_step=round(f.recomputed_ops / f.steps, 1),
                critical_path=f.critical_path,
            )
        tables["kernel_categories"] = pd.concat([r["categories"] for r in good], ignore_index=True)
        tables["kernels"] = pd.concat([r["top"] for r in good], ignore_index=True)
        coll = pd.concat([r["collectives"] for r in good], ignore_index=True)
        tables["trace_collectives"] = collective_table(coll) if not coll.empty else coll
        cats = tables["kernel_categories"]
        shares = cats.groupby("category")["time_ns"].sum().div(max(1, cats["time_ns"].sum())).round(4)
        metrics.kernel_categories = {str(k): float(v) for k, v in shares.items()}
        metrics.trace_collectives = records(tables["trace_collectives"])
        metrics.rank_spread = rank_spread(facts)

    if run is not None:
        t = load_tables(run)
        reports = run.rank_reports()  # every rank's probe.json, read once for both uses below
        problems += t.notes + completeness(run, t, reports)
        ranks |= set(run.ranks())
        if not ranks:
            raise RunDirError(
                f"{path}: no rank wrote any data (no rank folder, no trace); the run stopped before its "
                "first step, or its files were removed"
            )
        m = run.manifest
        peak = (
            peak_tflops
            or m.config.get("peak_tflops")
            or m.env.get("peak_tflops")
            or (gpu_peak_tflops(metrics.device) if metrics.device else None)
        )
        metrics.run = RunInfo(
            name=m.name,
            status="failed" if run.abandoned() else m.status,
            world_size=m.world_size,
            command=m.command,
            env=m.env,
            collectors={k: v.status for k, v in m.collectors.items()},
            notes=[f"{k}: {v.reason}" for k, v in m.collectors.items() if v.status == "ok" and v.reason],
        )
        metrics.config = m.config
        metrics.model = m.model
        metrics.steps = step_metrics(t)
        metrics.stragglers = straggler_metrics(t)
        waiting_on_path(metrics)
        metrics.comms = comm_metrics(t)
        metrics.io = io_metrics(t)
        metrics.memory = memory_metrics(t)
        metrics.signals = signal_metrics(t)
        metrics.throughput = throughput_metrics(t, metrics.steps, peak)
        capacity = m.env.get("gpu_memory_bytes") or next(
            (int(r["device_memory"]) for r in good if r.get("device_memory")), None
        )
        metrics.hang = hang_metrics(run, problems, reports)
        options: dict[str, Any] = next(
            (o for r in reports.values() if isinstance(o := r.get("options"), dict)), {}
        )
        budget = options.get("watch_budget_mb") if options.get("watch") else None
        metrics.watch = watch_report(run, problems, budget if isinstance(budget, int | float) else None)
        for snap in run.layout.snapshots():
            name = f"{snap.parent.name}/{snap.name}"
            try:  # a damaged snapshot is a problem of that file, not of the run
                metrics.memory_snapshot[name] = summarize(snap)
            except TraceError as e:
                problems.append(str(e))
                continue
            rank = int(snap.parent.name.removeprefix("rank"))
            snapshots.append(rules.Snapshot(name, rank, metrics.memory_snapshot[name], capacity))
        if metrics.comms is not None and metrics.comms.table:
            tables["collectives"] = pd.DataFrame(metrics.comms.table)
        tables.update(t.frames)
        if m.status == "running" and not run.abandoned():
            problems.append(
                f"{run.path}: the run has not finished (status running); its last steps may be missing"
            )
    else:
        metrics.peak_tflops = peak_tflops
    problems += check_sanity(metrics)
    return Analysis(
        source=path,
        metrics=metrics,
        findings=rules.evaluate(facts, metrics, snapshots),
        tables=tables,
        problems=problems,
        ranks=sorted(ranks),
    )


def waiting_on_path(m: Metrics) -> None:
    """The part of each traced rank's critical path at collectives that was waiting for the last
    rank to arrive (its median wait a step, from the run's collective table), taken out of its
    communication and called so: a trace alone cannot tell a slow link from a late peer."""
    if m.stragglers is None:
        return
    waited = {r.rank: r.wait_ms for r in m.stragglers.ranks}
    for rank, t in m.trace.items():
        p = t.critical_path
        comm = p.by_kind_ms.get("communication", 0.0) if p else 0.0
        if p is None or comm <= 0 or not waited.get(rank):
            continue
        w = round(min(comm, waited[rank]), 4)
        p.by_kind_ms["communication"] = round(comm - w, 4)
        p.by_kind_ms["waiting"] = w


def _first_byte(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(1)
    except OSError:
        return b""


def _flight_recorder(path: Path, dumps: list[Path]) -> Analysis:
    """A folder of PyTorch flight-recorder dumps: who waits for whom, as from perfkit's own records."""
    problems: list[str] = []
    for other in sorted(
        set(path.iterdir()) - set(dumps)
    ):  # a pickle beside the dumps: say why it is left out
        if other.is_file() and other.suffix not in (".json", ".gz") and _first_byte(other) == b"\x80":
            try:
                load_dump(other)
            except TraceError as e:
                problems.append(f"{e}; left out")
    metrics = Metrics(hang=dumps_hang_metrics(dumps, problems))
    return Analysis(
        source=path,
        metrics=metrics,
        findings=rules.evaluate([], metrics),
        problems=problems,
        ranks=[s.rank for s in metrics.hang.ranks] if metrics.hang else [],
    )


def ranges(ranks: list[int] | set[int], of: list[int] | None = None) -> str:
    """``[0, 1, 2, 5]`` as ``0-2, 5``; every one of ``of`` (the job's ranks, when more than two) as
    ``all 256``."""
    if of is not None and len(of) > 2 and set(ranks) == set(of):
        return f"all {len(of)}"
    spans: list[list[int]] = []
    for r in sorted(set(ranks)):
        if spans and r == spans[-1][1] + 1:
            spans[-1][1] = r
        else:
            spans.append([r, r])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def _one_trace_per_rank(good: list[dict[str, Any]], problems: list[str]) -> list[dict[str, Any]]:
    """Several traces that claim the same rank: the first (in path order) is analyzed, the others
    are named, never silently merged or dropped."""
    seen: dict[int, dict[str, Any]] = {}
    for r in good:
        if r["rank"] in seen:
            problems.append(
                f"{r['path']}: also rank {r['rank']} (as {seen[r['rank']]['path']}); only the first is analyzed"
            )
        else:
            seen[r["rank"]] = r
    return list(seen.values())


def completeness(run: Run, t: Any, reports: dict[int, dict[str, Any]]) -> list[str]:
    """What a run directory lacks against its manifest: ranks that wrote no folder, ranks that
    ended badly or recorded no steps, a run that failed or was interrupted."""
    m, out = run.manifest, []
    present = set(run.ranks())
    missing = set(range(m.world_size)) - present
    if missing:
        out.append(f"{run.path}: rank(s) {ranges(missing)} of {m.world_size} wrote no folder")
    if m.note:
        out.append(f"{run.path}: {m.note}")
    if run.abandoned():
        out.append(
            f"{run.path}: the run failed: its owner (pid {m.pid}) was killed before it finished; "
            "the last steps may be missing"
        )
    if m.status in ("failed", "interrupted", "hung"):
        code = f" (exit code {m.exit_code})" if m.exit_code is not None else ""
        out.append(f"{run.path}: the run {m.status}{code}; its last steps may be missing")
    for rank in sorted(present - set(reports)):
        path = run.layout.probe(rank)
        if path.exists():  # there, but unreadable or not a JSON object: said, not skipped in silence
            out.append(
                f"{path}: cannot be read (damaged); rank {rank}'s collector states and status are unknown"
            )
    for rank, report in sorted(reports.items()):
        status = report.get("status")
        if status not in ("complete", None) and not (status == "running" and m.status == "running"):
            what = status
            if status == "running":
                what = (
                    "could not record its end (the run's note above)"
                    if m.note
                    else "was killed or crashed (its collectors never stopped)"
                )
            out.append(f"rank {rank} {what}")
    collected = m.collectors.get("steps")
    if collected is not None and collected.status == "ok":
        with_steps = set(t.steps["rank"].unique()) if not t.steps.empty else set()
        empty = present - with_steps
        if empty:
            out.append(f"rank(s) {ranges(empty)} recorded no steps")
    return out


def output_path(source: Path, out: Path | None) -> Path:
    """Where analysis.json goes: --out, else beside the input; a read-only input needs --out."""
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        return RunLayout(out).analysis
    folder = source if source.is_dir() else source.parent
    if not os.access(folder, os.W_OK):
        raise RunDirError(f"{folder} is read-only; pass --out DIR to write analysis.json elsewhere")
    return RunLayout(folder).analysis
