"""What the CLI prints: the summary of a profiled run, of an analysis, and of a comparison. Text
only; every number comes from the run's tables or the analysis."""

from __future__ import annotations

import shlex
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from perfkit.analyzers import remedies
from perfkit.analyzers.analyze import Analysis, Comparison, ranges
from perfkit.analyzers.hangs import RankState
from perfkit.analyzers.metrics import Metrics
from perfkit.analyzers.rules import Finding
from perfkit.collectors.base import tables as collector_tables

from perfkit.frames import user_frame
from perfkit.run import Run, RunLayout
from perfkit.tables import STEPS, loads, read_table


@dataclass
class Fix:
    """A finding's remedy in the run's own terms: ``--set`` overrides for the bundled trainer, the
    code or environment change for any other script."""

    description: str
    code: list[str]


def fix(f: Finding, metrics: Metrics) -> Fix:
    """The remedy in the run's dialect: the bundled trainer's ``--set``, the training framework's own
    arguments (where perfkit saw one drive the loop; at the user's line that called it), or the code
    change at the call perfkit saw the script make."""
    r = remedies.get(f.remedy)
    if metrics.is_bundled_trainer and r.trainer:
        return Fix(r.description, [f"--set {o}" for o in r.overrides()])
    framework = metrics.model.get("framework")
    name = framework.get("name") if isinstance(framework, dict) else None
    site = metrics.model.get("call_sites", {}).get(r.site) if r.site else None
    # the framework's terms, unless perfkit saw the call made in the user's own line ("") or another library
    if name in r.frameworks and (not isinstance(site, dict) or site.get("library") in (None, name)):
        at = framework.get("at") if isinstance(framework, dict) else None
        seen = f"  -- {name}, at {site['at']}" if isinstance(site, dict) and site.get("at") else ""
        return Fix(
            r.description, [r.frameworks[name] + (seen or (f"  -- {name}, called at {at}" if at else ""))]
        )
    if r.script and isinstance(site, dict) and site.get("at"):
        return Fix(r.description, [f"{r.script_for(site)}  -- at {site['at']}"])
    return Fix(r.description, [r.script] if r.script else [])


def short(v: Any) -> str:
    """Evidence values for reading: floats to 3 significant digits, lists cut to 5 items."""
    if isinstance(v, float):
        return f"{v:.3g}"
    if isinstance(v, list):
        return "[" + ", ".join(short(x) for x in v[:5]) + (", ..." if len(v) > 5 else "") + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {short(x)}" for k, x in v.items()) + "}"
    return str(v)


def evidence_text(evidence: dict[str, Any]) -> str:
    return "; ".join(f"{k}: {short(v)}" for k, v in evidence.items())


def perfkit_command() -> str:
    """How to run perfkit again from this shell: ``perfkit`` where it is on PATH, else the path of
    this installation's script (after ``make demo`` the virtual environment is not active, and a bare
    ``perfkit`` is "command not found")."""
    script = Path(sys.executable).parent / "perfkit"
    found = shutil.which("perfkit")
    if found and (not script.exists() or Path(found).resolve() == script.resolve()):
        return "perfkit"
    if script.exists():
        try:
            return str(script.relative_to(Path.cwd()))
        except ValueError:
            return str(script)
    return f"{sys.executable} -m perfkit"


def command_line(argv: list[str]) -> str:
    """argv as a line that pastes into a shell (paths with spaces quoted)."""
    return shlex.join(str(a) for a in argv)


def profile_summary(run: Run, rc: int, next_step: bool) -> str:
    m = run.manifest
    lines = ["", f"run directory:  {run.path}  (status {m.status}, exit code {rc}, {m.world_size} rank(s))"]
    if m.note:
        lines.append(f"  warning: {m.note}")
    shares = []
    for rank in run.ranks():
        counts = []
        for table in collector_tables().values():
            texts = [f.read_bytes() for f in run.layout.table_files(rank, table)]
            n = sum(t.count(b"\n") for t in texts)
            probe = sum(t.count(b'"source":"probe') for t in texts)  # RowWriter's compact JSON
            if n:
                counts.append(
                    f"{table.name} {n - probe}"
                    + (f" (+{probe} from probes after the steps)" if probe else "")
                )
        trace = run.layout.trace(rank)
        if trace.exists():
            counts.append(f"{trace.name} {trace.stat().st_size / 1e6:.1f} MB")
        lines.append(f"  {run.layout.rank_dir(rank).name}/  " + (", ".join(counts) or "no data"))
        failure = _failure_line(run.layout.failure_record(rank))
        if failure:
            lines.append(f"    failed: {failure}")
        for path in run.layout.table_files(rank, STEPS)[:1]:
            steps, _ = read_table(path, STEPS)
            if "perfkit_s" in steps and steps["perfkit_s"].notna().any():
                shares.append(float((steps["perfkit_s"] / steps["step_time_s"]).median()))
    if shares:
        lines.append(
            f"  perfkit's own CPU time: {max(shares):.2%} of the median step (busiest rank; trace export aside)"
        )
    for cname, state in sorted(m.collectors.items()):
        if state.status != "ok":
            lines.append(f"  collector {cname}: {state.status} ({state.reason})")
        elif state.reason:
            lines.append(f"  collector {cname}: {state.reason}")
    if next_step:
        lines.append(f"next: {command_line([perfkit_command(), 'analyze', str(run.path)])}")
    return "\n".join(lines)


def _failure_line(record: Path) -> str:
    """``FileNotFoundError: no such config at train.py:12 main`` from a rank's failure record."""
    if not record.is_file():
        return ""
    try:
        r = loads(record.read_text())
        frames = [f for f in r.get("frames", []) if isinstance(f, dict)]
    except (OSError, ValueError, AttributeError):
        return "(its failure record cannot be read)"
    where = user_frame(frames)
    return f"{r.get('exception', '?')}: {str(r.get('message', ''))[:160]}" + (f" at {where}" if where else "")


def rank_in(state: RankState) -> str:
    """What one rank was in: its collectives in flight, or none."""
    if not state.in_flight:
        return "in no collective"
    return ", ".join(
        f"in {e['op']} #{e['seq']} of group {e['group']}"
        + (f" for {e['waiting_s']:.1f} s" if "waiting_s" in e else "")
        for e in state.in_flight
    )


def hang_lines(m: Metrics) -> list[str]:
    """A hung or failed run's story, first: each rank and what it was in, the stuck ranks' stacks,
    the first failure."""
    h = m.hang
    if h is None:
        return []
    state = "HUNG" if h.hung else "FAILED" if h.first_failure else "NO HANG (every collective completed)"
    told_by = h.ranks[0].told_by if h.ranks else "records"
    told_by = told_by if told_by.startswith("its ") else f"its {told_by}"  # ("from its its stop")
    lines = [f"  {state}: what each rank was in (from {told_by})"]
    stuck = {r for w in h.waits for r in w.missing}
    for s in h.ranks:
        mark = "  <- the others wait for it" if s.rank in stuck else ""
        lines.append(f"    rank {s.rank}: {rank_in(s)}; at {s.frame or '(no user frame)'}{mark}")
    for s in h.ranks:
        if s.rank in stuck and s.stack:
            lines.append(f"    rank {s.rank}'s stack (innermost last):")
            lines += [f"      {frame}" for frame in s.stack[-6:]]
    if h.first_failure:
        f = h.first_failure
        lines.append(
            f"    first failure: rank {f['rank']}: {f['exception']}: {f['message'][:160]}"
            + (f" at {f['frame']}" if f["frame"] else "")
        )
    return lines


def watch_lines(m: Metrics) -> list[str]:
    """A watched job in a line or two: how much was judged, what was found and captured, the disk."""
    w = m.watch
    if w is None:
        return []
    budget = f" of its {w.budget_bytes / 1e6:,.0f} MB budget" if w.budget_bytes else ""
    judged = (
        f"{w.windows_judged} windows of {w.window_steps} steps judged"
        if w.baseline_ready
        else f"too short for a baseline ({w.windows_judged} windows; 9 needed): no anomaly could be named"
    )
    lines = [
        f"  watched: {judged}; {len(w.anomalies)} anomaly(ies), {len(w.captures)} capture(s); "
        f"{w.disk_bytes / 1e6:,.1f} MB on disk{budget}"
    ]
    lines += [f"  watch: {x}" for x in w.warnings]
    return lines


def _breakdown_spread(traces: list[tuple[int, Any]]) -> list[str]:
    """The GPU breakdown of many ranks: median, and the lowest and highest rank of each share."""
    rows = [(r, t.temporal_breakdown) for r, t in traces if t.temporal_breakdown]
    if not rows:
        return []
    parts = []
    for key, label in (("compute", "GPU compute"), ("communication", "communication"), ("idle", "idle")):
        values = sorted((b[f"{key}_pct"], r) for r, b in rows)
        med = values[len(values) // 2][0]
        (lo, lo_r), (hi, hi_r) = values[0], values[-1]
        parts.append(f"{label} {med:.0f}% (rank {lo_r} {lo:.0f}% .. rank {hi_r} {hi:.0f}%)")
    return [f"  {len(rows)} ranks, median: " + ", ".join(parts)]


def path_lines(m: Metrics) -> list[str]:
    """What bounds the step: the longest critical path of the traced ranks, by what it is."""
    paths = [(r, t.critical_path) for r, t in sorted(m.trace.items()) if t.critical_path]
    if not paths:
        return []
    rank, p = max(paths, key=lambda rp: rp[1].length_ms)
    parts = ", ".join(f"{k} {v:.3g}" for k, v in p.by_kind_ms.items() if v >= 0.005 * p.length_ms)
    top = ", ".join(f"{c['name']} {c['ms']:.3g}" for c in p.contributors[:3])
    of = f" (longest of {len(paths)} ranks)" if len(paths) > 1 else ""
    return [
        f"  critical path{of}: rank {rank}, {p.length_ms:.3g} ms of its {p.step_ms:.3g} ms step: {parts} ms; "
        f"most on it: {top} ms"
    ]


def analysis_summary(result: Analysis, target: Path) -> str:
    m = result.metrics
    lines = [
        f"perfkit analyze: {result.source}  ({len(result.ranks)} rank(s){', PARTIAL' if result.partial else ''})"
    ]
    for p in result.problems:
        lines.append(f"  problem: {p}")
    lines += hang_lines(m)
    if m.steps:
        line = f"  step time {m.steps.step_time_ms:.1f} ms (median)"
        if m.steps.tokens_per_s is not None:
            line += f", {m.steps.tokens_per_s:,.0f} tokens/s"
        if m.throughput and m.throughput.mfu is not None:
            line += f", MFU {m.throughput.mfu:.1%}"
        lines.append(line)
    lines += watch_lines(m)
    if m.run is not None and m.traced_ranks and len(m.traced_ranks) < len(result.ranks):
        lines.append(
            f"  kernel traces from rank(s) {ranges(m.traced_ranks)} of {len(result.ranks)}; "
            "the step, collective and memory tables from every rank"
        )
    shown = sorted(m.trace.items())
    if len(shown) > 8:  # many ranks: the spread, then none one by one
        lines += _breakdown_spread(shown)
        shown = []
    for rank, t in shown:
        b = t.temporal_breakdown
        if b:
            lines.append(
                f"  rank {rank}: GPU compute {b['compute_pct']:.0f}%, communication {b['communication_pct']:.0f}%, "
                f"memory {b['memory_pct']:.0f}%, idle {b['idle_pct']:.0f}%"
            )
    lines += path_lines(m)
    for name, s in m.memory_snapshot.items():
        holders = ", ".join(f"{k} {v / 2**30:.2f}" for k, v in list(s["by_category"].items())[:4])
        lines.append(
            f"  {name}: reserved {s['reserved_bytes'] / 2**30:.2f} GiB, allocated {s['allocated_bytes'] / 2**30:.2f}, "
            f"free in split blocks {s['inactive_split_bytes'] / 2**30:.2f}, cache flushes {s.get('cache_flushes', 0)}"
            + (f"; largest holders (GiB): {holders}" if holders else "")
        )
    if not result.findings:
        lines.append("  no findings: nothing stands out")
    for i, f in enumerate(result.findings, 1):
        saving = f" (~{f.saving_ms_per_step:.1f} ms/step)" if f.saving_ms_per_step else ""
        ranks = f" ranks {ranges(f.ranks, result.ranks)}" if f.ranks else ""
        lines.append(f"{i:>2}. [{f.severity}] {f.title}{saving}{ranks}")
        x = fix(f, m)
        lines.append(f"      fix: {x.description}" + (f"  ({'  '.join(x.code)})" if x.code else ""))
        if f.saving_ms_per_step or f.estimate:
            lines.append(f"      estimate: {f.estimate}")
        lines.append(f"      evidence: {evidence_text(f.evidence)}")
    lines.append(f"wrote {target}")
    if m.is_bundled_trainer and any(remedies.get(f.remedy).trainer for f in result.findings):
        lines.append(
            f"next: {command_line([perfkit_command(), 'optimize', str(result.source)])}"
            "  (tries these fixes, keeps what measurably helps)"
        )
    return "\n".join(lines)


def _number(v: float | None) -> str:
    """One format for a comparison's numbers: thousands separated, at most 2 decimals."""
    if v is None:
        return "-"
    return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:,.2f}" if abs(v) < 10 else f"{v:,.1f}"


def _workload(a: Analysis) -> dict[str, Any]:
    """What a run trained, for telling two runs of different workloads apart: the bundled trainer's
    config (flattened to dotted keys), else the script it ran."""
    m = a.metrics
    if m.config:
        return _flat(m.config)
    command = m.run.command if m.run else []
    return {"script": next((x for x in command if x.endswith(".py")), " ".join(command[:1]))}


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def comparison_summary(c: Comparison) -> str:
    lines = [f"  A: {c.a.source}", f"  B: {c.b.source}"]
    wa, wb = _workload(c.a), _workload(c.b)
    if wa != wb:
        keys = sorted(k for k in {*wa, *wb} if wa.get(k) != wb.get(k))
        said = ", ".join(f"{k} {wa.get(k, '-')} -> {wb.get(k, '-')}" for k in keys[:4])
        more = f" and {len(keys) - 4} more" if len(keys) > 4 else ""
        lines.append(
            f"  note: A and B ran different workloads ({said}{more}); the deltas compare unlike runs"
        )
    lines.append(f"  {'':<34} {'A':>12}    {'B':>12} {'B vs A':>8}")
    for r in c.rows:
        if r.a is None and r.b is None:
            continue
        delta = f"{100 * r.delta:+.1f}%" if r.delta is not None else ""
        flag = "  worse" if r.worse else ""
        name = f"{r.name} ({r.unit})" if r.unit else r.name
        lines.append(f"  {name:<34} {_number(r.a):>12} -> {_number(r.b):>12} {delta:>8}{flag}")
    lines += [f"  appeared: [{f.severity}] {f.title}" for f in c.appeared]
    lines += [f"  went away: [{f.severity}] {f.title}" for f in c.resolved]
    return "\n".join(lines)


def sweep_summary(data: dict[str, Any], steps: int) -> str:
    """The ranked table of a sweep.json document, predicted beside measured."""
    head = f"perfkit sweep: {data['config']} on {data['nproc']} rank(s)"
    if data.get("nodes", 1) > 1:
        head += f" a node x {data['nodes']} nodes"
    rungs = data.get("rungs") or []
    if len(rungs) > 1:
        head += ", successive halving " + " -> ".join(f"{n} layouts x {s} steps" for n, s, _ in rungs)
    head += f"; {data['repeats']} run(s) of {steps} steps for the full runs"
    lines = [
        head,
        f"{'#':>3}  {'layout':<28} {'ms/step':>9} {'predicted':>10}{'±':<5} {'vs best':>8} {'peak MiB':>9} {'predicted':>10}  runs",
    ]
    for i, c in enumerate(data["candidates"], 1):
        p = c.get("predicted") or {}
        pms = (
            f"{p['step_ms']:>10.1f}"
            + (f"±{p['uncertainty_ms']:<4.1f}" if p.get("uncertainty_ms") else " " * 5)
            if p.get("step_ms")
            else f"{'–':>10}     "
        )
        pmem = f"{p['peak_memory_bytes'] / 2**20:>10,.0f}" if p.get("peak_memory_bytes") else f"{'–':>10}"
        if c["step_ms"]:
            runs = ", ".join(
                f"{r['step_ms']:.1f}" if r["ok"] and r.get("step_ms") else "failed" for r in c["runs"]
            )
            mem = f"{c['peak_memory_bytes'] / 2**20:>9,.0f}" if c["peak_memory_bytes"] else f"{'–':>9}"
            mfu = f"  MFU {c['mfu']:.1%}" if c["mfu"] is not None else ""
            vs = f"{c['vs_best']:>7.2f}x" if c.get("vs_best") else f"{c.get('measured_steps')} st."
            lines.append(
                f"{i:>3}  {c['label']:<28} {c['step_ms']:>9.2f} {pms} {vs:>8} {mem} {pmem}  {runs}{mfu}"
            )
        else:
            why = f"skipped: {c['skipped']}" if c["skipped"] else (
                f"failed: {c['runs'][-1]['error']}" if c["runs"] else "not measured")  # fmt: skip
            lines.append(f"{i:>3}  {c['label']:<28} {'':>9} {pms} {'':>8} {'':>9} {pmem}  {why}")
    a = data.get("agreement") or {}
    if a.get("spearman") is not None:
        lines.append(
            f"predicted vs measured: step-time ranking Spearman {a['spearman']:.2f} over {a['layouts_ranked']} layouts"
            + (
                f"; peak memory off by {a['memory_error_median']:.0%} (median), {a['memory_error_max']:.0%} at most"
                if a.get("memory_error_median") is not None
                else ""
            )
            + (
                f"; {a['memory_lower_bounds_held']} of {a['memory_lower_bounds']} peaks predicted as a lower bound"
                " were at or above it"
                if a.get("memory_lower_bounds")
                else ""
            )
        )
    if a.get("basis_drift") is not None:
        lines.append(
            f"  the basis's profiled run took {a['basis_drift']:+.0%} against its layout's plain runs here"
            f" (the host's drift between them, in every prediction); each layout's ratio to that layout"
            f" was predicted within {a['ratio_error_max']:.0%}"
        )
    if a.get("runs_resolve") is not None:
        rounds = a["runs_resolve_rounds"]
        lines.append(
            f"  the runs themselves resolve about {a['runs_resolve']:.0%}: one round's run of each layout came"
            f" within that of the median of its other runs (the median over {len(rounds)} rounds;"
            f" {max(rounds):.0%} at worst); layouts closer than that are not told apart, and no prediction"
            " from one run can be held closer"
        )
    if data.get("no_predictions"):
        lines.append(f"no predictions: {data['no_predictions']}")
    elif data.get("basis"):
        lines.append(f"predictions from {data['basis']['run']}")
        engines = a.get("engines") or {}
        if "replay" in engines:
            names = {"replay": "replayed", "model": "the layout model alone"}
            lines.append(
                "  by replaying its traced steps changed to each layout, pipelines by the layout model (ranking Spearman: "
                + ", ".join(
                    f"{names[k]} {e['spearman']:.2f}"
                    for k, e in engines.items()
                    if e.get("spearman") is not None
                )
                + ")"
            )
        elif data.get("no_replay"):
            lines.append(f"  by the layout model alone: {data['no_replay']}")
        for c in data["candidates"]:  # a kernel change's speed: not modelled, and said so
            for note in (c.get("predicted") or {}).get("notes", []):
                if note.startswith("kernels."):
                    lines.append(f"  {c['label']}: {note}")
    return "\n".join(lines)


def optimize_summary(data: dict[str, Any]) -> str:
    """``perfkit optimize``'s summary from its JSON (optimize.json), as sweep_summary reads sweep.json."""
    trials = data["trials"]
    lines = [f"perfkit optimize: {len(trials)} remedy(ies) from {data['baseline_run']}"]
    if not trials:
        lines.append("  no finding of the baseline has a config change to try")
    for step in data.get("plan") or []:
        lines.append(f"  plan, {step}")
    for t in trials:
        verdict = "KEPT   " if t["kept"] else ("skipped" if t["skipped"] else "dropped")
        lines.append(f"  round {t['round']} {verdict} {' '.join(t['change']):<44} {t['reason']}")
        if len(t["alternatives"]) > 1 and not t["skipped"]:
            for a in t["alternatives"]:
                if a["reason"]:
                    lines.append(f"      {' '.join(a['change']):<44} {a['reason']}")
        if t["measured_ms"] is not None:
            predicted = f"{t['predicted_ms']:.1f}" if t["predicted_ms"] else "not estimated"
            expected = t.get("expected_ms")
            if t["predicted_ms"] and expected is not None and abs(expected - t["predicted_ms"]) > 0.05:
                predicted += f" (learned from earlier trials: {expected:.1f})"
            lines.append(f"      saving per step: predicted {predicted}, measured {t['measured_ms']:.1f} ms")
    for c in data.get("combinations") or []:
        lines.append(
            f"  together: {' '.join(c['changes'])}: {'kept' if c.get('kept') else 'not kept'} ({c.get('reason', '')})"
        )
    if data.get("prediction_error") is not None:
        lines.append(f"  predictions: median error {data['prediction_error']:.0%} of the measured saving")
    if data.get("stopped"):
        lines.append(f"  stopped after {len(data['rounds'])} round(s): {data['stopped']}")
    if data.get("kept"):
        speedup = data.get("speedup")
        speed = f"{speedup:.2f}x the throughput of the original" if speedup else "not measured"
        lines.append(f"kept: {' '.join('--set ' + k for k in data['kept'])}  ({speed}, side by side)")
        final = {
            o.split("=", 1)[0]: o for o in [*data["overrides"], *data["kept"]]
        }  # a key's last value wins
        argv = [perfkit_command(), "train", "--config", data["config"], "--nproc", str(data["nproc"])]
        for o in final.values():
            argv += ["--set", o]
        lines.append(f"train with: {command_line(argv)}")
    else:
        tried = [t for t in trials if not t["skipped"]]
        undecided = [
            t for t in tried if any("undecided" in str(a.get("reason", "")) for a in t["alternatives"] or [t])
        ]
        if undecided:  # not "nothing helped": the runs could not tell
            lines.append(
                f"nothing kept, but {len(undecided)} of {len(tried)} change(s) undecided: their interval straddled "
                "the bar; more --repeats (or --steps) may tell; the configuration stays as it was"
            )
        else:
            lines.append("nothing measurably helped; the configuration stays as it was")
    if data.get("findings_gone") is not None and data.get("final_run"):
        gone = data["findings_gone"]
        lines.append(f"findings gone after: {'; '.join(gone) if gone else 'none'}")
        lines.append(f"comparison: {RunLayout(Path(data['final_run'])).compare_page.resolve()}")
    return "\n".join(lines)
