import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import run_perfkit

from perfkit import __version__
from perfkit.cli import cli
from perfkit.run import Run

COMMANDS = [
    "train",
    "demo",
    "profile",
    "analyze",
    "report",
    "compare",
    "export-trace",
    "sweep",
    "whatif",
    "optimize",
]


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def test_help_lists_every_command(runner: CliRunner) -> None:
    result = runner.invoke(cli, ["--help"])
    assert result.exit_code == 0
    for name in COMMANDS:
        assert f"  {name} " in result.output


@pytest.mark.parametrize("name", COMMANDS)
def test_each_command_has_help(runner: CliRunner, name: str) -> None:
    result = runner.invoke(cli, [name, "--help"])
    assert result.exit_code == 0
    assert f"Usage: cli {name}" in result.output or f"Usage: perfkit {name}" in result.output


def test_version(runner: CliRunner) -> None:
    result = runner.invoke(cli, ["--version"])
    assert result.exit_code == 0 and __version__ in result.output


def test_help_does_not_import_torch() -> None:
    code = "import sys; from perfkit.cli import cli; cli(['--help'], standalone_mode=False); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().endswith("False")


def test_train_invalid_config_is_one_line_exit_2(runner: CliRunner) -> None:
    result = runner.invoke(cli, ["train", "--nproc", "2", "--set", "parallel.tp=3"])
    assert result.exit_code == 2
    assert result.output.strip() == "Error: parallel.tp=3 does not divide model.n_heads=4; choose 1, 2 or 4"


def test_demo_writes_a_complete_run(tmp_path) -> None:
    from perfkit.run import Run

    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "perfkit", "demo", "--out", str(out)], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"run directory:  {out}" in proc.stdout
    assert f"report: {(out / 'report' / 'index.html').resolve()}" in proc.stdout
    assert (out / "analysis.json").exists()
    run = Run.open(out)
    assert run.manifest.status == "complete" and run.manifest.exit_code == 0 and run.manifest.world_size == 2
    assert run.manifest.config["model"]["d_model"] == 48
    assert len((out / "train_log.jsonl").read_text().splitlines()) == 20
    for rank in (0, 1):
        assert len((out / f"rank{rank}" / "steps.jsonl").read_text().splitlines()) == 20
        assert (out / f"rank{rank}" / "trace.json.gz").exists()


def test_profile_bad_arguments_are_one_line(tmp_path) -> None:
    runner = CliRunner()
    for args, message in [
        (["--profile-steps", "7-5"], "--profile-steps '7-5' must be FIRST-LAST"),
        (["--collect", "gpu"], "unknown collector 'gpu'"),
        (["--", "no-such-command-xyz"], "command 'no-such-command-xyz' not found"),
        (["--", "reference", "--set", "parallel.tp=3"], "parallel.tp=3 does not divide"),
    ]:
        result = runner.invoke(cli, ["profile", "--out", str(tmp_path / "r"), *args])
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output and result.output.count("\n") == 1
        assert not (tmp_path / "r").exists()


def test_sizes_parse_and_bad_ones_say_how(runner: CliRunner) -> None:
    from perfkit.cli import ByteSize

    size = ByteSize()
    assert size.convert("40GiB", None, None) == 40 * 2**30 and size.convert("2.5GB", None, None) == 2.5e9
    assert size.convert("512 mib", None, None) == 512 * 2**20 and size.convert("1000", None, None) == 1000
    result = runner.invoke(cli, ["sweep", "--memory-limit", "lots"])
    assert result.exit_code == 2 and "write e.g. 40GiB" in result.output
    result = runner.invoke(cli, ["sweep", "--nnodes", "2"])
    assert result.exit_code == 2 and "--rdzv-endpoint" in result.output


def test_numeric_collector_options_say_so_in_help() -> None:
    """--nvml-hz, --hang-timeout and --memory-history-entries had been typed TEXT."""
    from click.testing import CliRunner

    from perfkit.cli import cli

    out = CliRunner().invoke(cli, ["profile", "--help"]).output
    assert "--nvml-hz NUMBER" in out and "--hang-timeout NUMBER" in out
    assert "--memory-history-entries INTEGER" in out and "--trace-ranks TEXT" in out


@pytest.mark.parametrize(
    "args",
    [
        ["analyze", "{trace}", "--out", "{blocked}/a"],
        ["report", "{trace}", "--out", "{blocked}/r.html"],
        ["compare", "{trace}", "{trace}", "--out", "{blocked}/c.html"],
        ["export-trace", "{run}", "--out", "{blocked}/m.json"],
        ["sweep", "--out", "{blocked}/s"],
        ["optimize", "--out", "{blocked}/o"],
    ],
)
def test_an_output_that_cannot_be_written_is_one_line(tmp_path: Path, args: list[str]) -> None:
    """A file where the output folder should be (root ignores permissions, not this): each command
    had ended in a mkdir traceback."""
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    trace = Path(__file__).parent / "data" / "h100" / "tuned_trace.json.gz"
    run = Run.create(tmp_path / "run", command=["x"], world_size=1)
    (run.path / "rank0").mkdir()
    (run.path / "rank0" / "steps.jsonl").write_text(
        '{"step": 1, "start_ns": 1, "end_ns": 9, "step_time_s": 0.1}\n'
    )
    run.finish("complete", 0)
    r = run_perfkit(*[a.format(trace=trace, blocked=blocked, run=run.path) for a in args])
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr[-1500:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "in the way" in errors[0], r.stderr[-1500:]
