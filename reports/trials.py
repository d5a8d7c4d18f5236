"""The pages of ``perfkit sweep`` and ``perfkit optimize``: configurations measured side by side.
Drawn from the JSON those commands write (``sweep.json``, ``optimize.json``), so a page can be made
again from the file alone. Self-contained like the run report (plotly.js inlined, no network)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from markupsafe import Markup
from perfkit.reports import figures
from perfkit.reports.html import page_template
from plotly.offline import get_plotlyjs

from perfkit.files import write_atomic
from perfkit.run import RunLayout


def _fmt(v: float | None, spec: str = ",.1f") -> str:
    return "–" if v is None else format(v, spec)


def render(data: dict[str, Any], page: Path | None = None) -> str:
    """The page for a sweep.json or optimize.json document (``page``: where it will be written, to
    link the runs' reports relative to it)."""
    if data.get("kind") == "sweep":
        data = {"basis": None, "agreement": {}, "rungs": [], "steps": None, **data}
        rows = data["candidates"]
        title = f"perfkit sweep: {data['config']} on {data['nproc']} rank(s)"
        chart = figures.trial_runs(rows, "Time per step of each layout (each dot one run)")
    else:
        rows = []
        for t in data["trials"]:
            if t.get("base"):
                rows.append({**t["base"], "label": f"{t['remedy']}: without"})
            for a in t.get("alternatives", []):
                if a.get("variant"):
                    rows.append({**a["variant"], "label": f"{t['remedy']}: {' '.join(a['change'])}"})
        rows += [{**c, "label": f"all kept: {c['label']}"} for c in data.get("final", [])]
        title = f"perfkit optimize: {Path(data['config']).name} on {data['nproc']} rank(s)"
        chart = figures.trial_runs(rows, "Each trial: without and with the change (each dot one run)")
    links: dict[str, str] = {}
    if page is not None:
        here = page.resolve().parent
        for key, run in (("baseline", data.get("baseline_run")), ("final", data.get("final_run"))):
            if run:
                links[key] = os.path.relpath(RunLayout(run).report, here)
                links[f"{key}_compare"] = os.path.relpath(RunLayout(run).compare_page, here)
    template = page_template("trials.html")
    return template.render(
        d=data,
        links=links,
        title=title,
        chart=Markup(figures.html(chart)) if chart is not None else None,
        fmt=_fmt,
        plotly_js=Markup(get_plotlyjs()),
    )


def write(data: dict[str, Any], out: Path) -> Path:
    return write_atomic(out, render(data, out).encode())
