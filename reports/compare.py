"""The comparison page of two analyses (``perfkit compare``). The deltas themselves are computed
by the analyzers (``perfkit.analyzers.analyze.compare``); this only draws them."""

from __future__ import annotations

from pathlib import Path

from perfkit.analyzers.analyze import Comparison
from perfkit.reports.html import page_template

from perfkit.files import write_atomic


def _fmt(v: float | None) -> str:
    return "–" if v is None else f"{v:,.4g}"


def render(c: Comparison) -> str:
    template = page_template("comparison.html")
    return template.render(c=c, a_name=str(c.a.source), b_name=str(c.b.source), fmt=_fmt)


def write(c: Comparison, out: Path) -> Path:
    return write_atomic(out, render(c).encode())
