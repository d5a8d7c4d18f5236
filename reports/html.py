"""The HTML report: one self-contained file (plotly.js inlined once, no network), written from an
analysis. Every string from a trace or a user is escaped by jinja2's autoescape; figure data is
escaped by plotly."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import jinja2
from markupsafe import Markup, escape
from perfkit.analyzers.analyze import Analysis, ranges
from perfkit.reports import figures
from perfkit.reports.sections import fig_html, sections
from perfkit.reports.text import evidence_text, fix
from plotly.offline import get_plotlyjs

from perfkit.files import write_atomic


def _read_template(name: str) -> str:
    return (resources.files("perfkit.reports") / "templates" / name).read_text()


# Every page's template (they share templates/base.css); autoescape on, an undefined name an error.
_TEMPLATES = jinja2.Environment(
    loader=jinja2.FunctionLoader(_read_template), autoescape=True, undefined=jinja2.StrictUndefined
)


def page_template(name: str) -> jinja2.Template:
    return _TEMPLATES.get_template(name)


def render(analysis: Analysis) -> str:
    m = analysis.metrics
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

    template = page_template("report.html")
    return template.render(
        name=name,
        command=" ".join(map(str, run.command)) if run else str(analysis.source),
        identity=identity,
        cards=cards,
        findings=findings,
        problems=analysis.problems,
        sections=sections(analysis),
        figures={"step_breakdown": fig_html(figures.step_breakdown(m))},
        missing=lambda what, why: Markup(
            f"<h2>{escape(what)}</h2><p class='missing'>{escape(why if run else 'a bare trace has no perfkit step table')}</p>"
        ),
        plotly_js=Markup(get_plotlyjs()),
    )


def write_report(analysis: Analysis, out: Path) -> Path:
    """Write ``out`` (an .html path) atomically and return it."""
    return write_atomic(out, render(analysis).encode())
