"""The HTML report: one self-contained file (plotly.js inlined once, no network), written from an
analysis. Every string from a trace or a user is escaped by jinja2's autoescape; figure data is
escaped by plotly."""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import jinja2
import pandas as pd
from markupsafe import Markup, escape
from perfkit.analyzers.analyze import Analysis, ranges
from perfkit.analyzers.metrics import Metrics
from perfkit.reports import figures
from perfkit.reports.text import evidence_text, fix, rank_in
from plotly.offline import get_plotlyjs

from perfkit.run import write_atomic


def _read_template(name: str) -> str:
    return (resources.files("perfkit.reports") / "templates" / name).read_text()


# Every page's template (they share templates/base.css); autoescape on, an undefined name an error.
_TEMPLATES = jinja2.Environment(
    loader=jinja2.FunctionLoader(_read_template), autoescape=True, undefined=jinja2.StrictUndefined
)


def page_template(name: str) -> jinja2.Template:
    return _TEMPLATES.get_template(name)


@dataclass
class Section:
    id: str
    title: str
    body: Markup | None
    missing: str


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


def _fig(fig: Any) -> Markup | None:
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


def render(analysis: Analysis) -> str:
    m, t = analysis.metrics, analysis.tables
    run = m.run
    env = run.env if run else {}
    steps = m.steps
    name = run.name if run else analysis.source.name
    identity = " · ".join(
        str(x)
        for x in (
            f"{run.world_size if run else len(analysis.ranks)} rank(s)",
            env.get("gpu") or m.device or (", ".join(env.get("gpus", [])) if env.get("gpus") else "CPU"),
            f"torch {env.get('torch')}" if env.get("torch") else None,
            f"CUDA {env.get('cuda')}" if env.get("cuda") else None,
            f"NCCL {env.get('nccl')}" if env.get("nccl") else None,
            f"status {run.status}" if run else None,
        )
        if x
    )
    cards = []
    if steps:
        cards.append({"value": f"{steps.step_time_ms:.1f} ms", "label": "median step time"})
        if steps.tokens_per_s is not None:
            cards.append({"value": f"{steps.tokens_per_s:,.0f}", "label": "tokens / s"})
    tp = m.throughput
    if tp is not None and tp.mfu is not None and tp.peak_tflops_per_gpu:
        cards.append({"value": f"{tp.mfu:.1%}", "label": f"MFU of {tp.peak_tflops_per_gpu:.0f} TFLOP/s"})
    if tp is not None:
        cards.append({"value": f"{tp.achieved_tflops:.2f}", "label": "achieved TFLOP/s"})
    cards.append({"value": str(len(analysis.findings)), "label": "findings"})

    findings = []
    for f in analysis.findings:
        d = f.to_json()
        d["evidence_text"] = evidence_text(f.evidence)
        d["fix"] = fix(f, m)
        d["ranks_text"] = ranges(f.ranks, analysis.ranks)
        findings.append(d)

    if m.trace:
        no_trace = "the traces hold no GPU kernels (a CPU run): there is no GPU time to break down"
    else:
        no_trace = "no kernel trace: profile with --profile-steps (the kernels collector) or pass a trace"
    sections = [
        Section(
            "hang",
            "Hang or failure: what each rank was in",
            _table(
                pd.DataFrame(
                    [
                        {"rank": s.rank, "in": rank_in(s), "at": s.frame, "told by": s.told_by}
                        for s in m.hang.ranks
                    ]
                ),
                {
                    "rank": "rank",
                    "in": "collectives in flight",
                    "at": "innermost user frame",
                    "told by": "told by",
                },
            )
            if m.hang is not None and m.hang.ranks
            else None,
            "no rank hung or failed",
        ),
        Section(
            "steps",
            "Per-rank step timeline",
            _join(
                _fig(figures.per_step(t.get("steps"), "step_time_s", "Step time per step")),
                *[Markup("<p class='note'>{}</p>").format(n) for n in (run.notes if run else [])],
            ),
            _collector_reason(m, "steps") if run else "a bare trace has no perfkit step table",
        ),
        Section("gpu", "Compute / communication / memory / idle", _fig(figures.gpu_breakdown(m)), no_trace),
        Section(
            "ranks",
            "Ranks compared: slow GPUs, ranks the others wait for, slow links",
            _spread_tables(m),
            "needs the traces of four ranks or more",
        ),
        Section(
            "kernels",
            "Kernels",
            _join(
                _fig(figures.kernel_categories(t.get("kernel_categories"))),
                _table(
                    t["kernels"],
                    {
                        "rank": "rank",
                        "name": "kernel",
                        "category": "category",
                        "precision": "GEMM precision",
                        "count": "count",
                        "time_ns": "time (ns)",
                        "share": "share",
                    },
                )
                if t.get("kernels") is not None and not t["kernels"].empty
                else None,
            ),
            no_trace,
        ),
        Section(
            "comms",
            "Communication",
            _join(
                _fig(figures.bus_bandwidth(t.get("collectives"))),
                _table(
                    t["collectives"],
                    {
                        "op": "op",
                        "size": "message size",
                        "count": "count",
                        "bytes": "bytes",
                        "time_ms": "time (ms)",
                        "algbw_gbps": "algbw GB/s",
                        "busbw_gbps": "busbw GB/s",
                    },
                )
                if t.get("collectives") is not None and not t["collectives"].empty
                else None,
                _table(
                    t["trace_collectives"],
                    {
                        "op": "op (trace)",
                        "size": "message size",
                        "count": "count",
                        "time_ms": "time (ms)",
                        "busbw_gbps": "busbw GB/s",
                    },
                )
                if t.get("trace_collectives") is not None and not t["trace_collectives"].empty
                else None,
                _table(
                    pd.DataFrame(m.comms.callers),
                    {
                        "caller": "called by (innermost first)",
                        "op": "op",
                        "calls_per_step": "calls a step",
                        "bytes": "bytes",
                        "blocking": "host blocked",
                        "ms_per_step": "ms a step",
                        "transfer_ms_per_step": "transfer ms a step",
                    },
                )
                if m.comms is not None and m.comms.callers
                else None,
            ),
            _collector_reason(m, "comms"),
        ),
        Section(
            "stragglers",
            "Stragglers (rank x step)",
            _fig(figures.straggler_heatmap(t.get("steps"))),
            "needs two or more ranks with a steps table",
        ),
        Section(
            "memory",
            "Memory",
            _join(_fig(figures.memory_timeline(t.get("memory"))), *_snapshot_tables(m)),
            _collector_reason(m, "memory") if run else "no memory table or allocator snapshot",
        ),
        Section(
            "io",
            "Input and I/O",
            _join(
                _fig(figures.per_step(t.get("steps"), "data_wait_s", "Data wait per step")),
                _fig(figures.read_latency(t.get("io"))),
            ),
            _collector_reason(m, "io"),
        ),
        Section(
            "cpu",
            "Host CPU",
            _join(
                _fig(figures.per_step(t.get("cpu"), "cpu_s", "CPU time of each rank's process per step")),
                _fig(
                    figures.per_step(
                        t.get("cpu"), "host_busy", "Whole host busy (sampled twice a second)", "%", 100
                    )
                ),
            ),
            _collector_reason(m, "cpu"),
        ),
        Section(
            "nvml",
            "GPU counters (NVML)",
            _fig(figures.nvml_series(t.get("nvml"))),
            _collector_reason(m, "nvml") if run else "not a run directory",
        ),
        Section(
            "env",
            "Environment and configuration",
            Markup("<pre>")
            + escape(
                json.dumps(
                    {
                        "env": env,
                        "config": m.config,
                        "model": m.model,
                        "command": run.command if run else None,
                    },
                    indent=1,
                    default=str,
                )
            )
            + Markup("</pre>")
            if run
            else None,
            "a bare trace carries no run configuration",
        ),
    ]
    if m.hang is None or not m.hang.ranks:  # nothing hung or failed: its section goes last, not second
        sections.append(sections.pop(0))
    template = page_template("report.html")
    return template.render(
        name=name,
        command=" ".join(map(str, run.command)) if run else str(analysis.source),
        identity=identity,
        cards=cards,
        findings=findings,
        problems=analysis.problems,
        sections=sections,
        figures={"step_breakdown": _fig(figures.step_breakdown(m))},
        missing=lambda what, why: Markup(
            f"<h2>{escape(what)}</h2><p class='missing'>{escape(why if run else 'a bare trace has no perfkit step table')}</p>"
        ),
        plotly_js=Markup(get_plotlyjs()),
    )


def write_report(analysis: Analysis, out: Path) -> Path:
    """Write ``out`` (an .html path) atomically and return it."""
    return write_atomic(out, render(analysis).encode())
