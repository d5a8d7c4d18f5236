"""The HTML report's sections, registered: each is one function of the analysis returning its body
(or None) and the line that says why it is empty, declared with its id, title and place on the page.
A new analysis adds its section here (or in a module imported here) without touching ``render``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pandas as pd
from markupsafe import Markup, escape
from perfkit.analyzers.analyze import Analysis, ranges
from perfkit.analyzers.metrics import Metrics
from perfkit.collectors.base import Collector, declared
from perfkit.reports import figures
from perfkit.reports.text import rank_in


@dataclass
class Section:
    id: str
    title: str
    body: Markup | None
    missing: str


Body = tuple[Markup | None, str]
"""A section's body (None: nothing to show) and why it is empty."""


@dataclass(frozen=True)
class SectionSpec:
    id: str
    title: str
    order: float | Callable[[Analysis], float]
    """Its place on the page (lower first), or a function of the analysis that decides it."""
    build: Callable[[Analysis], Body]


SECTIONS: list[SectionSpec] = []


def section(
    id: str, title: str, order: float | Callable[[Analysis], float]
) -> Callable[[Callable[[Analysis], Body]], Callable[[Analysis], Body]]:
    """Register a report section."""

    def register(fn: Callable[[Analysis], Body]) -> Callable[[Analysis], Body]:
        if any(s.id == id for s in SECTIONS):
            raise ValueError(f"report section {id!r} is registered twice")
        SECTIONS.append(SectionSpec(id, title, order, fn))
        return fn

    return register


def sections(analysis: Analysis) -> list[Section]:
    """Every registered section of this analysis, in page order."""

    def place(s: SectionSpec) -> float:
        return s.order(analysis) if callable(s.order) else s.order

    return [Section(s.id, s.title, *s.build(analysis)) for s in sorted(SECTIONS, key=place)]


def _no_trace(m: Metrics) -> str:
    if m.trace:
        return "the traces hold no GPU kernels (a CPU run): there is no GPU time to break down"
    return "no kernel trace: profile with --profile-steps (the kernels collector) or pass a trace"


def _table(frame: pd.DataFrame, columns: dict[str, str], limit: int = 50) -> Markup:
    """A sortable HTML table of at most ``limit`` rows, every cell escaped."""
    head = "".join(f"<th>{escape(label)}</th>" for label in columns.values())
    rows = []
    for _, r in frame.head(limit).iterrows():
        cells = []
        for col in columns:
            v = r.get(col)
            if isinstance(v, float):
                cells.append(f'<td class="num" data-v="{v}">{v:,.3g}</td>' if pd.notna(v) else "<td></td>")
            elif isinstance(v, int):
                cells.append(f'<td class="num" data-v="{v}">{v:,}</td>')
            else:
                cells.append(f'<td class="name">{escape("" if v is None else str(v))}</td>')
        rows.append("<tr>" + "".join(cells) + "</tr>")
    more = (
        f"<p class='missing'>{len(frame) - limit} more rows in analysis.json</p>"
        if len(frame) > limit
        else ""
    )
    return Markup(
        f'<table class="sortable"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>{more}'
    )


def fig_html(fig: Any) -> Markup | None:
    return Markup(figures.html(fig)) if fig is not None else None


def _join(*parts: Markup | None) -> Markup | None:
    present = [p for p in parts if p is not None]
    return Markup("").join(present) if present else None


def _collector_reason(metrics: Metrics, name: str) -> str:
    state = metrics.run.collectors.get(name) if metrics.run else None
    if state is None:
        return f"not collected: the {name} collector did not run (--collect)"
    return f"no data: the {name} collector was {state}"


def _snapshot_tables(m: Metrics) -> list[Markup | None]:
    """Per allocator snapshot: its totals and its largest live blocks with the frame that made them."""
    out: list[Markup | None] = []
    for name, s in m.memory_snapshot.items():
        totals = pd.DataFrame(
            [
                {
                    "snapshot": name,
                    "reserved_gib": s["reserved_bytes"] / 2**30,
                    "allocated_gib": s["allocated_bytes"] / 2**30,
                    "split_free_gib": s["inactive_split_bytes"] / 2**30,
                    "cache_flushes": s.get("cache_flushes", 0),
                    **{f"{k} GiB": v / 2**30 for k, v in s["by_category"].items()},
                }
            ]
        )
        out.append(_table(totals, {c: c.replace("_", " ") for c in totals.columns}))
        largest = pd.DataFrame(s["largest"])
        if not largest.empty:
            out.append(_table(largest, {"size": "bytes", "category": "category", "frame": "allocated at"}))
    return out


def _spread_tables(m: Metrics) -> Markup | None:
    """Ranked lists: the slowest GPUs, the ranks the others wait for, the slowest process groups."""
    sp = m.rank_spread
    if sp is None:
        return None
    frame = pd.DataFrame([vars(r) for r in sp.ranks])
    frame["compute_x"] = frame["compute_ms"] / frame["peer_compute_ms"].where(frame["peer_compute_ms"] > 0)
    frame["waited_ms"] = frame["peer_comm_ms"] - frame["comm_ms"]
    flag = {r: "slow GPU" for r in sp.slow_gpu} | {r: "late" for r in sp.late}
    frame["verdict"] = frame["rank"].map(lambda r: flag.get(r, ""))
    columns = {
        "rank": "rank",
        "verdict": "named",
        "compute_ms": "compute ms/step",
        "compute_x": "x its peers",
    }
    parts = [
        Markup(
            f"<p>{len(frame)} ranks; median compute {sp.median_compute_ms:.3g} ms and communication "
            f"{sp.median_comm_ms:.3g} ms a step. Named: slow GPU {ranges(sp.slow_gpu) or 'none'}; "
            f"late {ranges(sp.late) or 'none'}; slow link {ranges(sp.slow_link) or 'none'}.</p>"
        ),
        Markup("<h3>Slowest GPUs (compute a step)</h3>"),
        _table(frame.sort_values("compute_ms", ascending=False), columns, limit=10),
        Markup("<h3>Ranks the others wait for (shortest communication kernels)</h3>"),
        _table(
            frame.sort_values("comm_ms"),
            {
                "rank": "rank",
                "verdict": "named",
                "comm_ms": "communication ms/step",
                "waited_ms": "others wait ms",
                "idle_ms": "GPU idle ms/step",
            },
            limit=10,
        ),
    ]
    if sp.slow_groups:
        groups = pd.DataFrame(
            [
                {
                    "group": g.name,
                    "ranks": ranges(g.ranks or []),
                    "call_ms": g.call_ms,
                    "typical_ms": g.typical_ms,
                    "slowdown": g.call_ms / g.typical_ms if g.typical_ms else None,
                }
                for g in sp.slow_groups
            ]
        )
        parts += [
            Markup("<h3>Slow process groups</h3>"),
            _table(
                groups,
                {
                    "group": "group",
                    "ranks": "ranks",
                    "call_ms": "ms a call",
                    "typical_ms": "typical",
                    "slowdown": "x typical",
                },
                limit=20,
            ),
        ]
    return Markup("").join(parts)


def _hung(a: Analysis) -> bool:
    return a.metrics.hang is not None and bool(a.metrics.hang.ranks)


@section("hang", "Hang or failure: what each rank was in", order=lambda a: 10 if _hung(a) else 1000)
def _hang(a: Analysis) -> Body:
    """Second on the page when a rank hung or failed; last when nothing did."""
    m = a.metrics
    if not _hung(a):
        return None, "no rank hung or failed"
    assert m.hang is not None
    rows = [{"rank": s.rank, "in": rank_in(s), "at": s.frame, "told by": s.told_by} for s in m.hang.ranks]
    columns = {
        "rank": "rank",
        "in": "collectives in flight",
        "at": "innermost user frame",
        "told by": "told by",
    }
    return _table(pd.DataFrame(rows), columns), ""


@section("steps", "Per-rank step timeline", order=20)
def _steps(a: Analysis) -> Body:
    m, run = a.metrics, a.metrics.run
    body = _join(
        fig_html(figures.per_step(a.tables.get("steps"), "step_time_s", "Step time per step")),
        *[Markup("<p class='note'>{}</p>").format(n) for n in (run.notes if run else [])],
    )
    return body, _collector_reason(m, "steps") if run else "a bare trace has no perfkit step table"


@section("gpu", "Compute / communication / memory / idle", order=30)
def _gpu(a: Analysis) -> Body:
    return fig_html(figures.gpu_breakdown(a.metrics)), _no_trace(a.metrics)


@section("ranks", "Ranks compared: slow GPUs, ranks the others wait for, slow links", order=40)
def _ranks(a: Analysis) -> Body:
    return _spread_tables(a.metrics), "needs the traces of four ranks or more"


@section("kernels", "Kernels", order=50)
def _kernels(a: Analysis) -> Body:
    t = a.tables
    kernels = t.get("kernels")
    columns = {"rank": "rank", "name": "kernel", "category": "category", "precision": "GEMM precision",
               "count": "count", "time_ns": "time (ns)", "share": "share"}  # fmt: skip
    body = _join(
        fig_html(figures.kernel_categories(t.get("kernel_categories"))),
        _table(kernels, columns) if kernels is not None and not kernels.empty else None,
    )
    return body, _no_trace(a.metrics)


@section("comms", "Communication", order=60)
def _comms(a: Analysis) -> Body:
    m, t = a.metrics, a.tables
    collectives, traced = t.get("collectives"), t.get("trace_collectives")
    body = _join(
        fig_html(figures.bus_bandwidth(collectives)),
        _table(collectives, {"op": "op", "size": "message size", "count": "count", "bytes": "bytes",
                             "time_ms": "time (ms)", "algbw_gbps": "algbw GB/s", "busbw_gbps": "busbw GB/s"})
        if collectives is not None and not collectives.empty else None,
        _table(traced, {"op": "op (trace)", "size": "message size", "count": "count", "time_ms": "time (ms)",
                        "busbw_gbps": "busbw GB/s"})
        if traced is not None and not traced.empty else None,
        _table(pd.DataFrame(m.comms.callers), {"caller": "called by (innermost first)", "op": "op",
               "calls_per_step": "calls a step", "bytes": "bytes", "blocking": "host blocked",
               "ms_per_step": "ms a step", "transfer_ms_per_step": "transfer ms a step"})
        if m.comms is not None and m.comms.callers else None,
    )  # fmt: skip
    return body, _collector_reason(m, "comms")


@section("stragglers", "Stragglers (rank x step)", order=70)
def _stragglers(a: Analysis) -> Body:
    return fig_html(
        figures.straggler_heatmap(a.tables.get("steps"))
    ), "needs two or more ranks with a steps table"


@section("memory", "Memory", order=80)
def _memory(a: Analysis) -> Body:
    m = a.metrics
    body = _join(fig_html(figures.memory_timeline(a.tables.get("memory"))), *_snapshot_tables(m))
    return body, _collector_reason(m, "memory") if m.run else "no memory table or allocator snapshot"


@section("io", "Input and I/O", order=90)
def _io(a: Analysis) -> Body:
    t = a.tables
    body = _join(
        fig_html(figures.per_step(t.get("steps"), "data_wait_s", "Data wait per step")),
        fig_html(figures.read_latency(t.get("io"))),
    )
    return body, _collector_reason(a.metrics, "io")


@section("nvml", "GPU counters (NVML)", order=110)
def _nvml(a: Analysis) -> Body:
    m = a.metrics
    return fig_html(figures.nvml_series(a.tables.get("nvml"))), _collector_reason(
        m, "nvml"
    ) if m.run else "not a run directory"


@section("env", "Environment and configuration", order=120)
def _env(a: Analysis) -> Body:
    m, run = a.metrics, a.metrics.run
    if run is None:
        return None, "a bare trace carries no run configuration"
    facts = {"env": run.env, "config": m.config, "model": m.model, "command": run.command}
    return Markup("<pre>") + escape(json.dumps(facts, indent=1, default=str)) + Markup("</pre>"), ""


def _collector_section(c: type[Collector]) -> Callable[[Analysis], Body]:
    """A collector's own section: the charts it declares, over its tables' rows."""

    def build(a: Analysis) -> Body:
        default = c.tables[0].name if c.tables else ""
        charts = [
            fig_html(
                figures.per_step(a.tables.get(ch.table or default), ch.column, ch.title, ch.unit, ch.scale)
            )
            for ch in c.charts
        ]
        return _join(*charts), _collector_reason(a.metrics, c.name)

    return build


# Each collector that declares a section of its own gets it, in its declared place.
for _c in declared():
    if _c.title:
        section(_c.name, _c.title, order=_c.order)(_collector_section(_c))


@section("watch", "Watch: the whole job, its anomalies and captures", order=15)
def _watch(a: Analysis) -> Body:
    """Near the top for a watched job: the timeline from the summaries, then each anomaly with what
    its capture says against the baseline capture."""
    w = a.metrics.watch
    if w is None:
        return None, "the job was not watched (perfkit profile --watch)"
    rows = [
        {
            "id": x.get("id"),
            "steps": f"{x.get('start_step')}-{x.get('end_step') or 'end'}",
            "what": x.get("title"),
            "ranks": ranges(x.get("ranks") or []),
            "against the baseline capture": x.get("diagnosis") or "no capture of it",
        }
        for x in w.anomalies
    ]
    caps = [
        {
            "capture": c.id,
            "steps": f"{c.first_step}-{c.last_step}",
            "why": c.reason,
            "ranks traced": ranges(c.ranks_traced),
            "what grew against the baseline": c.summary
            or "; ".join(f"rank {r}: {s}" for r, s in c.said.items()),
        }
        for c in w.captures
    ]
    budget = f" of its {w.budget_bytes / 1e6:,.0f} MB budget" if w.budget_bytes else ""
    disk = Markup("<p class='note'>{}</p>").format(
        f"The run directory holds {w.disk_bytes / 1e6:,.1f} MB{budget}; a baseline capture from rank(s) "
        f"{ranges(w.baseline_traced) or 'none'}."
    )
    anomalies = (
        _table(
            pd.DataFrame(rows),
            {k: k for k in ("id", "steps", "what", "ranks", "against the baseline capture")},
        )
        if rows
        else Markup("<p>No anomaly: every window stayed within the job's own baseline spread.</p>")
    )
    captures = _table(pd.DataFrame(caps), {k: k for k in caps[0]}) if caps else None
    return _join(
        fig_html(figures.watch_timeline(a.tables.get("summary"), w.anomalies)), anomalies, captures, disk
    ), ""


@section("critical_path", "Critical path: what bounds the step", order=35)
def _critical_path(a: Analysis) -> Body:
    m = a.metrics
    rows = [(r, t.critical_path) for r, t in sorted(m.trace.items()) if t.critical_path]
    if not rows:
        return None, _no_trace(m) if not m.trace else "the traces mark no step with events in it"
    lines = []
    for r, p in rows[:8]:
        parts = ", ".join(f"{k} {v:.3g}" for k, v in p.by_kind_ms.items() if v > 0)
        lines.append(
            Markup("<li>rank {}: {} ms of its {} ms step ({} steps): {} ms</li>").format(
                r, f"{p.length_ms:.3g}", f"{p.step_ms:.3g}", p.steps, parts
            )
        )
    if len(rows) > 8:
        lines.append(Markup("<li>{} more ranks in analysis.json</li>").format(len(rows) - 8))
    worst = max(rows, key=lambda rp: rp[1].length_ms)
    contributors = pd.DataFrame([{"rank": r, **c} for r, p in rows for c in p.contributors]).sort_values(
        "ms", ascending=False
    )
    fusion = pd.DataFrame(
        [
            {
                "rank": r,
                "ops": " → ".join(c.ops),
                "per_step": c.per_step,
                "own_us": c.own_us,
                "between_us": c.between_us,
                "saving_ms": c.saving_ms,
                "inside": c.inside,
            }
            for r, p in rows
            for c in p.fusion
        ]
    )
    body = _join(
        Markup(
            "<p>The chain of dependent work (CPU ops, launches, kernels, syncs, collectives) that "
            "sets each step's time: the work on it is what a speed-up must shorten.</p><ul>{}</ul>"
        ).format(Markup("").join(lines)),
        fig_html(figures.critical_path_kinds(m)),
        fig_html(figures.critical_path_timeline(worst[0], worst[1].segments)),
        Markup("<h3>Top contributors (ms a step)</h3>"),
        _table(contributors, {"rank": "rank", "name": "on the path", "kind": "kind", "ms": "ms a step"}, 20),
        Markup(
            "<h3>Fusion candidates</h3><p>Short kernels (ops) back to back on the path, every step: "
            "fusing each run takes its launches, gaps and dispatch off the path.</p>"
        )
        if not fusion.empty
        else None,
        _table(
            fusion.sort_values("saving_ms", ascending=False),
            {
                "rank": "rank",
                "ops": "run",
                "per_step": "a step",
                "own_us": "own µs",
                "between_us": "saved µs each",
                "saving_ms": "ms a step",
                "inside": "inside",
            },
            20,
        )
        if not fusion.empty
        else None,
    )
    return body, ""
