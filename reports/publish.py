"""Analyze a run or trace and write what a person reads: ``analysis.json`` and, if asked, the HTML
report. The one sequence that ``perfkit analyze``, ``report``, ``demo``, ``profile --report`` and
``optimize`` run."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from perfkit.analyzers.analyze import Analysis, analyze, output_path

from perfkit.files import write_json_atomic
from perfkit.run import RunLayout


@dataclass
class Published:
    analysis: Analysis
    json_path: Path | None
    report_path: Path | None


def write_outputs(analysis: Analysis, *, json_path: Path | None, report_path: Path | None) -> Published:
    if json_path is not None:
        write_json_atomic(json_path, analysis.to_json())
    if report_path is not None:
        from perfkit.reports.html import write_report  # plotly and jinja2 only when a page is written

        write_report(analysis, report_path)
    return Published(analysis, json_path, report_path)


def publish(
    source: Path,
    *,
    out: Path | None = None,
    write_json: bool = True,
    report: bool | Path = True,
    peak_tflops: float | None = None,
    jobs: int | None = None,
    scheduler: str | None = None,
) -> Published:
    """Analyze ``source``; write analysis.json (into ``out``, else beside the input) and the report
    (``report``: True for its default place beside analysis.json, or a path)."""
    json_path = output_path(source, out) if write_json else None
    analysis = analyze(source, peak_tflops=peak_tflops, jobs=jobs, scheduler=scheduler)
    if isinstance(report, Path):
        report_path: Path | None = report
    elif report:
        base = json_path.parent if json_path is not None else analysis.layout.root
        report_path = RunLayout(base).report
    else:
        report_path = None
    return write_outputs(analysis, json_path=json_path, report_path=report_path)
