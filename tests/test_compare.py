"""perfkit compare on small hand-built run directories."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from perfkit.cli import cli
from perfkit.run import Run
from perfkit.tables import STEPS


def make_run(path: Path, step_ms: float, data_wait_ms: float, ranks: int = 2) -> Path:
    run = Run.create(path, command=["train"], world_size=ranks, name=f"<b>{path.name}</b>")
    t = 1_800_000_000_000_000_000
    for rank in range(ranks):
        lines = []
        for step in range(1, 11):
            lines.append(
                json.dumps(
                    {
                        "step": step,
                        "start_ns": t,
                        "end_ns": t + int(step_ms * 1e6),
                        "step_time_s": step_ms / 1e3,
                        "data_wait_s": data_wait_ms / 1e3,
                        "forward_s": step_ms / 4e3,
                        "tokens": 1024,
                    }
                )
            )
        run.layout.rank_dir(rank).mkdir()
        run.layout.table(rank, STEPS).write_text("\n".join(lines) + "\n")
    run.finish("complete", 0)
    return path


def test_compare_gates_on_regression(tmp_path: Path) -> None:
    a = make_run(tmp_path / "a", step_ms=100, data_wait_ms=1)
    b = make_run(tmp_path / "b", step_ms=112, data_wait_ms=30)  # 12% slower, and now input-bound
    runner = CliRunner()
    ok = runner.invoke(cli, ["compare", str(a), str(b), "--fail-above", "15"])
    assert ok.exit_code == 0, ok.output
    assert "appeared: [high] Training waits for the input pipeline" in ok.output
    assert "+12.0%" in ok.output and "worse" in ok.output
    bad = runner.invoke(cli, ["compare", str(a), str(b), "--fail-above", "10"])
    assert bad.exit_code == 1
    assert "step time regressed +12.0% (B vs A), more than --fail-above 10%" in bad.output
    page = (b / "report" / "compare.html").read_text()
    assert "Training waits for the input pipeline" in page and "<b>" not in page


def test_compare_improvement_lists_what_went_away(tmp_path: Path) -> None:
    a = make_run(tmp_path / "a", step_ms=100, data_wait_ms=30)
    b = make_run(tmp_path / "b", step_ms=80, data_wait_ms=1)
    result = CliRunner().invoke(cli, ["compare", str(a), str(b), "--fail-above", "0"])
    assert result.exit_code == 0, result.output
    assert "went away: [high] Training waits for the input pipeline" in result.output
    assert "-20.0%" in result.output


def test_the_gate_refuses_a_failed_run_or_one_short_of_ranks(tmp_path: Path) -> None:
    """--fail-above had exited 0 for a B that failed or lost a rank: its steps gate nothing."""
    a = make_run(tmp_path / "a", 100.0, 5.0)
    failed = make_run(tmp_path / "failed", 90.0, 5.0)
    Run.open(failed).finish("failed", 1)
    short = make_run(tmp_path / "short", 90.0, 5.0, ranks=1)
    m = json.loads((short / "manifest.json").read_text())
    m["world_size"] = 2
    (short / "manifest.json").write_text(json.dumps(m))
    for b, said in ((failed, "is failed, not complete"), (short, "has 1 of its 2 ranks")):
        result = CliRunner().invoke(cli, ["compare", str(a), str(b), "--fail-above", "5"])
        assert result.exit_code == 1 and said in result.output, result.output
    ok = CliRunner().invoke(
        cli, ["compare", str(a), str(make_run(tmp_path / "ok", 101.0, 5.0)), "--fail-above", "5"]
    )
    assert ok.exit_code == 0, ok.output


def test_the_comparison_reads_plainly(tmp_path: Path) -> None:
    """It had printed 'data wait share' and 'data_wait share' both, numbers as 2.06e+04 beside 8,835,
    no units or A/B header, and no word when the two runs trained different things."""
    a, b = make_run(tmp_path / "a", 100.0, 5.0), make_run(tmp_path / "b", 120.0, 5.0)
    out = CliRunner().invoke(cli, ["compare", str(a), str(b)]).output
    assert f"A: {a}" in out and f"B: {b}" in out and "B vs A" in out
    assert out.count("data wait") == 1 and "data_wait" not in out and "e+" not in out
    assert "step time (median) (ms)" in out and "(% of step)" in out
    assert "different workloads" not in out
    m = json.loads((b / "manifest.json").read_text())
    m["command"] = ["python", "other.py"]
    (b / "manifest.json").write_text(json.dumps(m))
    said = CliRunner().invoke(cli, ["compare", str(a), str(b)]).output
    assert "different workloads (script train -> other.py)" in said, said
