"""The HTML report: rendered from a CPU run and from GPU traces, self-contained and escaped."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import run_perfkit
from perfkit.analyzers.analyze import analyze
from perfkit.reports.html import render, write_report

from perfkit.cli import cli
from perfkit.run import Run

DATA = Path(__file__).parent / "data"
EVIL = "</script><img src=x onerror=alert(1)>"


def assert_self_contained(page: str) -> None:
    from plotly.offline import get_plotlyjs

    assert page.count(get_plotlyjs()) == 1  # plotly.js inlined, once
    ours = page.replace(get_plotlyjs(), "")
    # no external resource in what perfkit writes: no src/href to a network address, no CDN
    assert not re.search(r'(src|href)\s*=\s*["\']?(https?:)?//', ours)
    assert "cdn.plot.ly" not in ours and "<link" not in ours


def test_report_from_a_gpu_trace(tmp_path: Path) -> None:
    page = render(analyze(DATA / "h100" / "tuned_trace.json.gz"))
    assert_self_contained(page)
    assert "launch-bound" in page and "torch.compile(model)" in page  # a bare trace: the fix for any script
    assert "--set" not in page
    assert "nvjet_sm90" in page  # the kernel table
    assert "a bare trace carries no run configuration" in page  # sections without data say why
    assert len(page.encode()) < 5_000_000


@pytest.mark.slow
def test_report_from_a_cpu_run_with_a_hostile_name(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = run_perfkit(
        "profile",
        "--out",
        str(out),
        "--name",
        EVIL,
        "--profile-steps",
        "2-3",
        "--",
        "reference",
        "--set",
        "steps=6",
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert Run.open(out).manifest.name == EVIL
    result = CliRunner().invoke(cli, ["report", str(out)])
    assert result.exit_code == 0, result.output
    page_path = out / "report" / "index.html"
    assert result.output.strip() == str(page_path)
    page = page_path.read_text()
    assert EVIL not in page and "&lt;/script&gt;&lt;img src=x onerror=alert(1)&gt;" in page
    assert_self_contained(page)
    for section in ("Per-rank step timeline", "Communication", "Stragglers", "Memory", "Input and I/O"):
        assert section in page
    assert "no data: the nvml collector was disabled" in page  # a missing collector says why
    assert len(page.encode()) < 5_000_000

    # the merged trace of both ranks
    result = CliRunner().invoke(cli, ["export-trace", str(out)])
    assert result.exit_code == 0, result.output
    merged = json.loads(gzip.decompress((out / "trace" / "merged.json.gz").read_bytes()))
    events = merged["traceEvents"]
    names = {e["args"]["name"] for e in events if e.get("ph") == "M" and e["name"] == "process_name"}
    assert {"rank 0: perfkit", "rank 1: perfkit"} <= names
    assert any(n.startswith("rank 0: host") for n in names) and any(
        n.startswith("rank 1: host") for n in names
    )
    pids = {r: {e["pid"] for e in events if e.get("ph") == "X" and e["pid"] // 1000 == r} for r in (0, 1)}
    assert pids[0] and pids[1] and not pids[0] & pids[1]
    steps = [e for e in events if e.get("ph") == "X" and e["name"].startswith("step ")]
    assert len(steps) == 12 and min(e["ts"] for e in events if "ts" in e) >= 0
    assert any(e.get("ph") == "X" and e["name"] == "all_reduce" for e in events)


def test_kernel_names_are_escaped(tmp_path: Path) -> None:
    a = analyze(DATA / "h100" / "compiled_trace.json.gz")
    a.tables["kernels"].loc[0, "name"] = EVIL
    page = write_report(a, tmp_path / "r.html").read_text()
    assert EVIL not in page
    # and it is there, escaped: the row was drawn, not dropped
    from markupsafe import escape

    assert str(escape(EVIL)) in page
