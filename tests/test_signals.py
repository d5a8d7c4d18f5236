"""perfkit profile's process handling: a signal to perfkit reaches the whole job, a killed perfkit
leaves no job behind and its run reads as failed, exit codes follow the shell (128 + signal), and
a place that cannot be written is one line before anything starts."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import run_perfkit, user_env
from perfkit.analyzers.analyze import analyze

from perfkit.run import Run

pytestmark = pytest.mark.slow

# A job that writes its pid, then runs for a minute unless stopped.
LOOP = """
import os, sys, time
open(sys.argv[1], "w").write(str(os.getpid()))
for _ in range(600):
    time.sleep(0.1)
"""


def _start(tmp_path: Path) -> tuple[subprocess.Popen[bytes], Path, int]:
    script, pidfile, out = tmp_path / "loop.py", tmp_path / "job.pid", tmp_path / "run"
    script.write_text(LOOP)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "perfkit",
            "profile",
            "--out",
            str(out),
            "--",
            sys.executable,
            str(script),
            str(pidfile),
        ],
        env=user_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (pidfile.exists() and pidfile.read_text()):
        time.sleep(0.1)
    return proc, out, int(pidfile.read_text())


def _gone(pid: int, within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        # a zombie of a dead parent is reaped by init; /proc shows its state meanwhile
        try:
            if Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z":
                return True
        except OSError:
            return True
        time.sleep(0.1)
    return False


def test_sigint_to_perfkit_alone_stops_the_job(tmp_path: Path) -> None:
    proc, out, job = _start(tmp_path)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)  # perfkit's process only, not its group
    proc.communicate(timeout=30)
    assert time.monotonic() - t0 < 15 and _gone(job, 5)
    assert proc.returncode == 130
    assert Run.open(out).manifest.status == "interrupted"


def test_sigterm_to_perfkit_stops_the_job(tmp_path: Path) -> None:
    proc, out, job = _start(tmp_path)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=30)
    assert _gone(job, 5) and proc.returncode == 143
    assert Run.open(out).manifest.status == "interrupted"


def test_a_killed_perfkit_leaves_no_job_and_its_run_reads_failed(tmp_path: Path) -> None:
    proc, out, job = _start(tmp_path)
    proc.kill()
    proc.communicate(timeout=30)
    assert _gone(job, 10), "the job outlived perfkit"
    run = Run.open(out)
    assert run.manifest.status == "running" and run.abandoned()


def test_a_crash_by_signal_exits_like_the_shell(tmp_path: Path) -> None:
    r = run_perfkit("profile", "--out", str(tmp_path / "r"), "--", sys.executable, "-c",
                    "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)")  # fmt: skip
    assert r.returncode == 139, r.stderr
    assert Run.open(tmp_path / "r").manifest.status == "failed"


def test_an_unwritable_out_is_one_line_before_anything_runs(tmp_path: Path) -> None:
    r = run_perfkit("profile", "--out", "/proc/perfkit-run", "--", sys.executable, "-c", "print('ran')")
    assert r.returncode == 1 and "ran" not in r.stdout
    errors = [line for line in r.stderr.splitlines() if line.startswith("Error:")]
    assert (
        len(errors) == 1 and "choose a writable place with --out" in errors[0] and "Traceback" not in r.stderr
    )


def test_nan_cannot_switch_a_gate_off() -> None:
    r = run_perfkit("compare", "a", "b", "--fail-above", "nan")
    assert r.returncode == 2 and "not a finite number" in r.stderr


def test_an_abandoned_run_is_analyzed_as_failed(tmp_path: Path) -> None:
    run = Run.create(tmp_path / "r", command=["x"], world_size=1)
    run.manifest.pid = 2**22 + 12345  # no such process
    run.save()
    (run.path / "rank0").mkdir()
    (run.path / "rank0" / "steps.jsonl").write_text(
        '{"step": 1, "start_ns": 1, "end_ns": 2, "step_time_s": 0.1}\n{"step": 2, "start_ns": 3, "end_ns": 4, "step_time_s": 0.1}\n'
    )
    a = analyze(run.path)
    assert a.metrics.run is not None and a.metrics.run.status == "failed"
    assert any("was killed before it finished" in p for p in a.problems), a.problems


def _with(marker: str) -> list[int]:
    """Processes whose command line holds ``marker``."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if marker.encode() in cmdline.read_bytes():
                found.append(int(cmdline.parent.name))
        except OSError:
            continue
    return found


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL])
def test_a_signal_to_a_trial_leaves_no_trainer_behind(tmp_path: Path, signum: int) -> None:
    """sweep and optimize measure trials with the bundled trainer under torchrun: a signal to perfkit
    alone had left torchrun and both ranks training on, reparented to init. A trainer that prints
    nothing for a long time never learns of its closed output pipe: the parent-death signal ends it."""
    code = (
        "import sys\nfrom pathlib import Path\nfrom perfkit.optimizer.trials import measure\n"
        "measure('tiny-cpu', 2, ['steps=100000', 'log_every=100000'], Path(sys.argv[1]))\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], env=user_env())
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(set(_with(str(tmp_path))) - {proc.pid}) < 3:
        time.sleep(0.2)  # torchrun and its two ranks
    assert len(set(_with(str(tmp_path))) - {proc.pid}) >= 3, "the trial did not start"
    time.sleep(3)  # the ranks in their steps
    proc.send_signal(signum)
    proc.wait(timeout=60)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _with(str(tmp_path)):
        time.sleep(0.2)
    left = _with(str(tmp_path))
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, f"left behind: {left}"


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_to_perfkit_over_torchrun_exits_like_the_shell(
    tmp_path: Path, signum: int, code: int
) -> None:
    """torchrun exits 1 once its ranks stopped: perfkit's exit had read as the job's failure."""
    script, pidfile, out = tmp_path / "loop.py", tmp_path / "job.pid", tmp_path / "run"
    script.write_text(LOOP)
    argv = [sys.executable, "-m", "perfkit", "profile", "--out", str(out), "--"]
    argv += ["torchrun", "--nproc_per_node", "1", str(script), str(pidfile)]
    proc = subprocess.Popen(argv, env=user_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (pidfile.exists() and pidfile.read_text()):
        time.sleep(0.1)
    proc.send_signal(signum)
    proc.communicate(timeout=60)
    assert proc.returncode == code and _gone(int(pidfile.read_text()), 10)
    assert Run.open(out).manifest.status == "interrupted"


def test_a_full_disk_loses_no_training_and_says_so(tmp_path: Path) -> None:
    """A run folder on a disk that fills up: the job trains on, each table says once that it cannot
    be written, no temporary file is left, and the manifest is finished with a note (it had stayed
    'running', which the analysis then read as a killed perfkit)."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root to mount a small tmpfs")
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24k", "tmpfs", str(mnt)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        r = run_perfkit("profile", "--out", str(mnt / "r"), "--set", "steps=12", "--nproc", "2")
        assert r.returncode == 0, r.stderr[-2000:]
        assert "Traceback" not in r.stderr and "No space left on device" in r.stderr
        assert "done: 12 steps" in r.stdout
        m = Run.open(mnt / "r").manifest
        assert m.status == "complete" and "disk" in m.note
        assert "warning: the disk filled up" in r.stdout
        assert not list((mnt / "r").rglob(".*.tmp*"))
        a = analyze(mnt / "r")
        assert any("disk filled up" in p for p in a.problems), a.problems
        assert not any("was killed" in p for p in a.problems)
    finally:
        subprocess.run(["umount", str(mnt)])


def test_a_table_that_cannot_be_written_keeps_its_rows_for_later(tmp_path: Path) -> None:
    from perfkit.tables import RowWriter

    w = RowWriter(tmp_path / "missing" / "steps.jsonl")  # its folder appears later, as space would
    w.add({"step": 1})
    with pytest.raises(OSError):
        w.flush()
    assert w.error.startswith("cannot write steps.jsonl")
    (tmp_path / "missing").mkdir()
    w.add({"step": 2})
    w.close()
    assert (tmp_path / "missing" / "steps.jsonl").read_text() == '{"step":1}\n{"step":2}\n'
