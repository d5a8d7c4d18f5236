"""Two analyses side by side: metric deltas, findings that appeared or went away, and whether the
step time regressed past a threshold (so a CI job can fail on it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from perfkit.analyzers.analyze import Analysis
from perfkit.reports.html import page_template

from perfkit.run import write_atomic


@dataclass
class Comparison:
    a: Analysis
    b: Analysis
    rows: list[dict[str, Any]] = field(default_factory=list)
    appeared: list[Any] = field(default_factory=list)
    resolved: list[Any] = field(default_factory=list)
    persisting: list[tuple[Any, Any]] = field(default_factory=list)

    @property
    def step_change(self) -> float | None:
        """Relative change of the median step time, B against A (0.05 = 5% slower)."""
        a, b = (x.metrics.get("steps", {}).get("step_time_ms") for x in (self.a, self.b))
        return b / a - 1 if a and b else None


def _metrics(x: Analysis) -> dict[str, tuple[float | None, str, bool]]:
    """name -> (value, unit, lower is better)"""
    m = x.metrics
    s, t, io = m.get("steps", {}), m.get("throughput", {}), m.get("io", {})
    out: dict[str, tuple[float | None, str, bool]] = {
        "step time (median)": (s.get("step_time_ms"), "ms", True),
        "step time (p90)": (s.get("step_time_p90_ms"), "ms", True),
        "tokens/s": (s.get("tokens_per_s"), "", False),
        "MFU": (t.get("mfu"), "", False),
        "data wait share": (io.get("data_wait_share"), "", True),
        "collectives per step": (m.get("comms", {}).get("collectives_per_step"), "", True),
    }
    for phase, share in s.get("phase_share", {}).items():
        out[f"{phase} share"] = (share, "", True)
    for rank, r in sorted(m.get("trace", {}).items()):
        b = r.get("temporal_breakdown") or {}
        if b:
            out[f"rank {rank} GPU idle"] = (b["idle_pct"], "%", True)
    return out


def compare(a: Analysis, b: Analysis) -> Comparison:
    c = Comparison(a, b)
    ma, mb = _metrics(a), _metrics(b)
    for name in dict.fromkeys([*ma, *mb]):
        va, unit, lower = ma.get(name, (None, "", True))
        vb = mb.get(name, (None, unit, lower))[0]
        delta = (vb / va - 1) if (va and vb is not None) else None
        worse = delta is not None and ((delta > 0) if lower else (delta < 0))
        c.rows.append({"name": name, "a": va, "b": vb, "unit": unit, "delta": delta, "worse": worse})
    ids_a, ids_b = {f.id: f for f in a.findings}, {f.id: f for f in b.findings}
    c.appeared = [f for i, f in ids_b.items() if i not in ids_a]
    c.resolved = [f for i, f in ids_a.items() if i not in ids_b]
    c.persisting = [(ids_a[i], ids_b[i]) for i in ids_b if i in ids_a]
    return c


def render(c: Comparison) -> str:
    template = page_template("compare.html")
    return template.render(c=c, a_name=str(c.a.source), b_name=str(c.b.source), fmt=_fmt)


def _fmt(v: float | None) -> str:
    if v is None:
        return "–"
    return f"{v:,.4g}"


def write(c: Comparison, out: Path) -> Path:
    return write_atomic(out, render(c).encode())
