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
    # what bounds each step: a path through the step (gloo's all-reduce on its own thread included)
    assert "Critical path: what bounds the step" in page and "on its timeline" in page
    for rank, t in analyze(out).metrics.trace.items():
        p = t.critical_path
        assert p is not None and p.steps == 2, rank
        assert 0.7 * p.step_ms <= p.length_ms <= 1.1 * p.step_ms, (rank, p)
        # compute a real share of it: on a loaded 2-core CI host the ops' Python grows, and one run's
        # path held 19.9 ms of compute in 116.7 (17%), where unloaded runs hold over 30%
        assert p.by_kind_ms["compute"] > 0.12 * p.length_ms, (rank, p.by_kind_ms)
        assert {"communication", "waiting"} & set(p.by_kind_ms), (rank, p.by_kind_ms)
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


def test_merged_trace_draws_queued_collectives_where_they_ran(tmp_path: Path) -> None:
    """Async calls issued together (ZeRO-1's broadcasts) complete one after another: each slice
    starts when the previous one of its group ended (slices of a track must nest), with the time it
    queued; two process groups get two tracks."""
    from perfkit.reports.perfetto import merged_trace

    run = Run.create(tmp_path / "run", command=["x"], world_size=1)
    d = run.layout.rank_dir(0)
    d.mkdir(parents=True, exist_ok=True)
    ms, t = 1_000_000, 1_700_000_000_000_000_123  # an epoch time in ns: float64 would round it
    rows = [(0, "0", 0, 4), (1, "0", 1, 8), (2, "0", 2, 9), (3, "1", 2, 3)]
    comms = [{"step": 1, "seq": seq, "op": "broadcast", "source": "python", "group": g, "group_ranks": "0",
              "group_size": 2, "bytes": 4, "start_ns": t + a * ms, "end_ns": t + b * ms}
             for seq, g, a, b in rows]  # fmt: skip
    (d / "comms.jsonl").write_text("".join(json.dumps(r) + "\n" for r in comms))
    run.manifest.status = "complete"
    run.save()
    trace, _ = merged_trace(Run.open(run.path))
    slices = [e for e in trace["traceEvents"] if e.get("ph") == "X" and e["name"] == "broadcast"]
    by_track: dict[int, list[tuple[float, float]]] = {}
    for e in slices:
        by_track.setdefault(e["tid"], []).append((e["ts"], e["ts"] + e["dur"]))
    assert sorted(by_track[2]) == [(0.0, 4000.0), (4000.0, 8000.0), (8000.0, 9000.0)]
    assert by_track[3] == [(2000.0, 3000.0)]
    assert [e["args"].get("queued_ms") for e in slices] == [None, 3.0, 6.0, None]


def test_the_merged_trace_leaves_out_the_events_analyze_drops(tmp_path: Path) -> None:
    """export-trace had kept events with impossible times that the analysis drops."""
    from perfkit.reports.perfetto import merged_trace

    run = Run.create(tmp_path / "run", command=["x"], world_size=1)
    d = run.layout.rank_dir(0)
    d.mkdir(parents=True, exist_ok=True)
    good = [
        {"ph": "X", "name": f"k{i}", "pid": 0, "tid": 7, "ts": 1000.0 + 10 * i, "dur": 5.0} for i in range(20)
    ]
    bad = [{"ph": "X", "name": "neg", "pid": 0, "tid": 7, "ts": 1100.0, "dur": -5.0},
           {"ph": "X", "name": "huge", "pid": 0, "tid": 7, "ts": 1100.0, "dur": 2.0**64},
           {"ph": "X", "name": "text", "pid": 0, "tid": 7, "ts": "soon", "dur": 1.0}, "not an event"]  # fmt: skip
    trace = {"traceEvents": [*good, *bad], "baseTimeNanoseconds": "damaged"}
    (d / "trace.json.gz").write_bytes(gzip.compress(json.dumps(trace).encode()))
    run.finish("complete", 0)
    merged, notes = merged_trace(Run.open(run.path))
    names = {e["name"] for e in merged["traceEvents"] if e.get("ph") == "X"}
    assert names == {f"k{i}" for i in range(20)}
    assert any("3 event(s) with impossible times left out" in n for n in notes), notes
    assert any("baseTimeNanoseconds" in n for n in notes), notes
    a = analyze(run.path)
    assert any("3 event(s) with impossible times dropped" in p for p in a.problems), a.problems


def test_an_undecided_optimize_is_not_called_a_failure() -> None:
    """'nothing measurably helped' had been said of trials whose interval straddled the bar."""
    from perfkit.reports.text import optimize_summary

    trial = {"round": 1, "kept": False, "skipped": False, "change": ["kernels.compile=true"],
             "reason": "+40% gain, undecided: the interval straddles the 3% bar (0.5-1.2)", "alternatives": [],
             "measured_ms": None}  # fmt: skip
    data = {"trials": [trial], "baseline_run": "b", "prediction_error": None, "stopped": "", "rounds": [1],
            "kept": [], "final_run": None, "findings_gone": None}  # fmt: skip
    said = optimize_summary(data)
    assert "1 of 1 change(s) undecided" in said and "nothing measurably helped" not in said
    trial["reason"] = "-2% gain: falls short of the 3% bar"
    assert "nothing measurably helped" in optimize_summary(data)


def test_a_new_section_registers_without_touching_render(tmp_path: Path) -> None:
    """Report sections register (id, title, place on the page): a new analysis adds its own."""
    from markupsafe import Markup
    from perfkit.reports import sections as S

    @S.section("planted", "A planted section", order=25)
    def _planted(a: object) -> S.Body:
        return Markup("<p>planted body</p>"), "never empty"

    try:
        page = render(analyze(DATA / "h100" / "tuned_trace.json.gz"))
        ids = [s.id for s in S.sections(analyze(DATA / "h100" / "tuned_trace.json.gz"))]
        assert "A planted section" in page and "planted body" in page
        assert ids.index("steps") < ids.index("planted") < ids.index("gpu")  # between 20 and 30
        with pytest.raises(ValueError, match="registered twice"):
            S.section("planted", "again", order=1)(_planted)
    finally:
        S.SECTIONS[:] = [s for s in S.SECTIONS if s.id != "planted"]
