"""Nothing silently wrong: one odd value in a trace is repaired or dropped per event, counted, and
said; the result is marked partial; never a traceback, never a percentage outside 0-100."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from perfkit.analyzers.analyze import analyze
from perfkit.analyzers.trace import load_trace

from perfkit.cli import cli

DATA = Path(__file__).parent / "data"
TRACE = DATA / "hta" / "trace_filter" / "sampled_rank-0.json.gz"


def _text() -> bytes:
    return gzip.decompress(TRACE.read_bytes())


def _write(tmp_path: Path, raw: bytes, name: str = "rank-0.json.gz") -> Path:
    path = tmp_path / name
    path.write_bytes(gzip.compress(raw))
    return path


def _first_kernel_at(raw: bytes) -> int:
    return raw.index(b'"cat": "kernel"')


def _assert_sane(a) -> None:
    for t in a.metrics.trace.values():
        b = t.temporal_breakdown
        for key in ("compute_pct", "communication_pct", "memory_pct", "idle_pct"):
            assert 0 <= b[key] <= 100, b


def test_invalid_utf8_in_one_name_is_replaced_and_said(tmp_path: Path) -> None:
    raw = _text()
    i = raw.index(b'"name": "', _first_kernel_at(raw)) + len(b'"name": "')
    path = _write(tmp_path, raw[:i] + b"\xff\xfe" + raw[i:])
    a = analyze(path)
    assert a.partial and any("invalid UTF-8" in p for p in a.problems), a.problems
    names = load_trace(path).events["name"].astype(str)
    assert names.str.startswith("\ufffd\ufffdvoid fbgemm_gpu::permute_2D").any()  # kept, the bad bytes marked
    _assert_sane(a)


def test_an_id_beyond_int64_is_ignored_not_fatal(tmp_path: Path) -> None:
    raw = _text()
    i = raw.index(b'"External id": ') + len(b'"External id": ')
    j = raw.index(b",", i)
    path = _write(tmp_path, raw[:i] + str(2**64 + 5).encode() + raw[j:])
    trace = load_trace(path)
    assert trace.repairs == [f"{path}: 1 event id(s) outside int64 ignored"]
    assert (trace.events["ext_id"] == -1).sum() > 0 and len(trace.events) == len(load_trace(TRACE).events)
    a = analyze(path)
    assert a.partial
    _assert_sane(a)


@pytest.mark.parametrize("dur", [str(2**64 + 1), "1e300", "-5.0"])
def test_an_impossible_duration_is_dropped_and_counted(tmp_path: Path, dur: str) -> None:
    raw = _text()
    i = raw.index(b'"dur": ', _first_kernel_at(raw)) + len(b'"dur": ')
    j = raw.index(b",", i)
    path = _write(tmp_path, raw[:i] + dur.encode() + raw[j:])
    good = analyze(TRACE).metrics.trace[0].temporal_breakdown
    a = analyze(path)
    assert a.partial and any("1 event(s) with impossible times dropped" in p for p in a.problems), a.problems
    _assert_sane(a)
    b = a.metrics.trace[0].temporal_breakdown
    assert abs(b["idle_pct"] - good["idle_pct"]) < 5  # one kernel fewer, not a different trace


def test_an_impossible_base_time_keeps_times_relative(tmp_path: Path) -> None:
    doc = json.loads(_text())
    doc["baseTimeNanoseconds"] = 2**70
    path = _write(tmp_path, json.dumps(doc).encode())
    a = analyze(path)
    assert any("baseTimeNanoseconds" in p for p in a.problems)
    _assert_sane(a)


def test_a_damaged_rank_in_a_folder_leaves_the_other_ranks_and_says_so(tmp_path: Path) -> None:
    raw = _text()
    i = raw.index(b'"name": "', _first_kernel_at(raw)) + len(b'"name": "')
    _write(tmp_path, raw[:i] + b"\xc3\x28" + raw[i:], "rank-0.json.gz")
    (tmp_path / "rank-1.json.gz").write_bytes(
        (DATA / "hta" / "trace_filter" / "sampled_rank-1.json.gz").read_bytes()
    )
    result = CliRunner().invoke(cli, ["analyze", str(tmp_path), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert (
        "PARTIAL" in result.output and "invalid UTF-8" in result.output and "Traceback" not in result.output
    )
    assert "rank 0:" in result.output and "rank 1:" in result.output


def _run(tmp_path: Path, world: int, ranks: dict[int, str], status: str = "complete") -> Path:
    """A run directory written by hand: ``ranks`` maps a rank to the status in its probe.json."""
    from perfkit.run import Run
    from perfkit.tables import STEPS

    run = Run.create(tmp_path / "run", command=["train.py"], world_size=world)
    for rank, rank_status in ranks.items():
        run.layout.rank_dir(rank).mkdir()
        rows = [
            {"step": s, "start_ns": s * 10**8, "end_ns": s * 10**8 + 5 * 10**7, "step_time_s": 0.05}
            for s in range(1, 6)
        ]
        run.layout.table(rank, STEPS).write_text("".join(json.dumps(r) + "\n" for r in rows))
        run.layout.probe(rank).write_text(
            json.dumps(
                {"rank": rank, "status": rank_status, "collectors": {"steps": {"status": "ok", "reason": ""}}}
            )
        )
    run.merge_rank_reports()
    run.finish(status, 0 if status == "complete" else 1)  # type: ignore[arg-type]
    return run.path


def test_a_missing_rank_folder_is_named(tmp_path: Path) -> None:
    a = analyze(_run(tmp_path, 4, {0: "complete", 2: "complete"}))
    assert a.partial and any("rank(s) 1, 3 of 4 wrote no folder" in p for p in a.problems), a.problems


def test_a_killed_rank_and_a_failed_run_are_named(tmp_path: Path) -> None:
    a = analyze(_run(tmp_path, 2, {0: "complete", 1: "running"}, status="failed"))
    assert any("the run failed (exit code 1)" in p for p in a.problems), a.problems
    assert any("rank 1 was killed or crashed" in p for p in a.problems), a.problems


def test_a_healthy_hand_made_run_is_not_partial(tmp_path: Path) -> None:
    a = analyze(_run(tmp_path, 2, {0: "complete", 1: "complete"}))
    assert not a.partial, a.problems


def test_zero_ranks_is_an_error_not_nothing_stands_out(tmp_path: Path) -> None:
    path = _run(tmp_path, 2, {})
    result = CliRunner().invoke(cli, ["analyze", str(path)])
    assert result.exit_code == 1 and "no rank wrote any data" in result.output
    assert "nothing stands out" not in result.output


def test_a_deleted_manifest_is_said(tmp_path: Path) -> None:
    path = tmp_path / "run"
    (path / "rank0").mkdir(parents=True)
    (path / "rank0" / "trace.json.gz").write_bytes(TRACE.read_bytes())
    a = analyze(path)
    assert any("no manifest.json" in p for p in a.problems), a.problems


def test_traces_sharing_a_rank_are_named(tmp_path: Path) -> None:
    for name in ("a.json.gz", "b.json.gz"):
        (tmp_path / name).write_bytes(TRACE.read_bytes())  # both say rank 0 in distributedInfo
    a = analyze(tmp_path)
    assert a.ranks == [0] and any("also rank 0" in p and "only the first" in p for p in a.problems), (
        a.problems
    )


def test_impossible_metrics_are_left_out_and_said() -> None:
    from perfkit.analyzers.metrics import Metrics, RankTrace, StepMetrics, Throughput, check_sanity

    m = Metrics(
        trace={
            0: RankTrace(
                trace="t",
                steps_in_trace=1,
                step_ms=1.0,
                temporal_breakdown={"idle_pct": 1e13, "compute_pct": -1e13},
                idle_attribution={},
                communication_overlap={},
            )
        },
        steps=StepMetrics(steps=3, step_time_ms=-5.0, step_time_p90_ms=1.0, per_rank=[], phase_share={}),
        throughput=Throughput(flops_per_token=1.0, achieved_tflops=1.0, peak_tflops_per_gpu=1.0, mfu=3.5),
    )
    problems = check_sanity(m)
    assert len(problems) == 3 and m.trace[0].temporal_breakdown == {} and m.steps is None
    assert m.throughput is not None and m.throughput.mfu is None and "MFU 350%" in problems[2]


DEEP = "[" * 100_000 + "]" * 100_000


@pytest.mark.parametrize(
    ("record", "text"),
    [
        ("hang.json", DEEP),
        ("failure.json", DEEP),
        ("probe.json", DEEP),
        ("steps.jsonl", '{"step": 1, "start_ns": 1, "step_time_s": 0.1, "x": ' + DEEP + "}\n"),
        ("hang.json", json.dumps({"rank": 1, "collectives": {"in_flight": [{"group": "0", "seq": 3}]}})),
        (
            "failure.json",
            json.dumps({"rank": 1, "time": 1.0, "exception": 5, "frames": [1, "a", {"file": 3}]}),
        ),
    ],
)
def test_a_damaged_rank_record_is_never_a_traceback(tmp_path: Path, record: str, text: str) -> None:
    """100,000 nested brackets had been a RecursionError traceback in analyze and report; an
    in-flight entry without its op a KeyError."""
    from perfkit.run import Run

    run = Run.create(tmp_path / "run", command=["x"], world_size=2)
    for rank in (0, 1):
        run.layout.rank_dir(rank).mkdir()
        rows = (json.dumps({"step": s, "start_ns": s * 10**8, "step_time_s": 0.05}) for s in range(1, 6))
        (run.layout.rank_dir(rank) / "steps.jsonl").write_text("\n".join(rows) + "\n")
    (run.layout.rank_dir(1) / record).write_text(text)
    run.finish("failed", 1)
    for command in ("analyze", "report"):
        result = CliRunner().invoke(cli, [command, str(run.path)])
        assert result.exit_code == 0 and result.exception is None, result.output


def test_a_runs_trace_without_distributed_info_takes_its_folders_rank(tmp_path: Path) -> None:
    """rank1/trace.json.gz without distributedInfo had been read as rank 0 a second time, and dropped."""
    from perfkit.run import Run

    doc = json.loads(gzip.decompress((DATA / "h100" / "compiled_trace.json.gz").read_bytes()))
    doc.pop("distributedInfo", None)
    run = Run.create(tmp_path / "run", command=["x"], world_size=2)
    for rank in (0, 1):
        run.layout.rank_dir(rank).mkdir()
        run.layout.trace(rank).write_bytes(gzip.compress(json.dumps(doc).encode()))
    run.finish("complete", 0)
    a = analyze(run.path)
    assert sorted(a.metrics.trace) == [0, 1] and not any("rank 0" in p for p in a.problems), a.problems


def test_an_unreadable_probe_record_is_said(tmp_path: Path) -> None:
    """A rank's probe.json that cannot be read had been skipped without a word."""
    from perfkit.run import Run

    run = Run.create(tmp_path / "run", command=["x"], world_size=1)
    run.layout.rank_dir(0).mkdir()
    rows = (json.dumps({"step": s, "start_ns": s * 10**8, "step_time_s": 0.05}) for s in range(1, 6))
    (run.layout.rank_dir(0) / "steps.jsonl").write_text("\n".join(rows) + "\n")
    run.layout.probe(0).write_text("{not json")
    run.finish("complete", 0)
    a = analyze(run.path)
    assert any("probe.json: cannot be read" in p for p in a.problems), a.problems
