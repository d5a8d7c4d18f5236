"""The real clients' figures for the README (tests/test_clients.py's cases): each client profiled
clean and with its planted problem on 2 CPU ranks; prints one markdown table: perfkit's median step
against the client's own clock, steps, tokens/s, the clean run's findings, and the planted problem's
finding with its fix as perfkit prints it.

    python bench/clients.py
"""

from __future__ import annotations

import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from perfkit.reports.text import fix  # noqa: E402
from test_clients import CASES, profile  # noqa: E402


def main() -> None:
    print(
        "| client | perfkit step ms | client's clock ms | steps | tokens/s | clean run's findings | planted | named | fix as printed |"
    )
    print("| --- | ---: | ---: | ---: | ---: | --- | --- | --- | --- |")
    for name, case in sorted(CASES.items()):
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "clean").mkdir()
            (Path(tmp) / "planted").mkdir()
            clean = profile(Path(tmp) / "clean", name, case.args)
            planted = profile(Path(tmp) / "planted", name, case.planted)
        m = clean.analysis.metrics
        ends = [r for r in clean.clock if "t" in r]
        theirs = statistics.median(b["t"] - a["t"] for a, b in zip(ends, ends[1:]) if a["step"] >= 2) * 1e3
        ours = next(r.step_ms for r in m.steps.per_rank if r.rank == 0) if m.steps else float("nan")
        findings = ", ".join(f"{f.id} ({f.severity})" for f in clean.analysis.findings) or "none"
        found = {f.id: f for f in planted.analysis.findings}
        f = found.get(case.finding)
        said = " ".join(fix(f, planted.analysis.metrics).code) if f else "-"
        knob = " ".join(a for a in case.planted if a not in case.args)
        tokens = f"{m.steps.tokens_per_s:,.0f}" if m.steps and m.steps.tokens_per_s else "-"
        print(
            f"| {name} | {ours:.1f} | {theirs:.1f} | {m.steps.steps if m.steps else '-'} | {tokens} | {findings} "
            f"| `{knob}` | {f'{f.id} ({f.severity})' if f else 'MISSED'} | `{said}` |",
            flush=True,
        )


if __name__ == "__main__":
    main()
