"""Hangs and failures on gloo, 2 ranks under perfkit profile: the rank the others wait for, and its
line; a desync; the rank that failed first; a slow step that is no hang; damaged records."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import fr_dump, fr_entry, fr_json_dump, run_perfkit
from perfkit.analyzers.analyze import analyze

from perfkit.cli import cli
from perfkit.run import Run

DATA = Path(__file__).parent / "data"

pytestmark = pytest.mark.slow

SCRIPT = """
import os, time, torch, torch.distributed as dist
dist.init_process_group("gloo")
rank, PLANT = dist.get_rank(), os.environ["PLANT"]
model = torch.nn.Linear(4, 4)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
t = torch.ones(4)
for step in range(8):
    model(torch.ones(2, 4)).sum().backward()
    for p in model.parameters():
        dist.all_reduce(p.grad)
    opt.step()
    opt.zero_grad()
    if step == 3 and rank == 1:
        if PLANT == "block":
            time.sleep(3600)  # PLANTED: rank 1 stuck here
        if PLANT == "raise":
            raise RuntimeError("planted failure")
        if PLANT == "segfault":
            import ctypes; ctypes.string_at(0)  # PLANTED: rank 1 killed by SIGSEGV
        if PLANT == "slow":
            time.sleep(1.5)  # shorter than the hang timeout
        if PLANT == "desync":
            dist.broadcast(t, 0)
            continue
    dist.all_reduce(t)
dist.destroy_process_group()
"""


def _profile(tmp_path: Path, plant: str, timeout: str = "4") -> tuple[object, Path, float]:
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    out = tmp_path / f"run-{plant}"
    t0 = time.monotonic()
    proc = run_perfkit(
        "profile", "--out", str(out), "--profile-steps", "none", "--hang-timeout", timeout,
        "--", "torchrun", "--nproc_per_node", "2", str(script), env={"PLANT": plant}, timeout=240,
    )  # fmt: skip
    return proc, out, time.monotonic() - t0


def _no_rank_left(out: Path) -> None:
    """Every rank's process is gone (or a zombie, dead and waiting for init to reap it)."""
    for rank in (0, 1):
        pid = json.loads((out / f"rank{rank}" / "probe.json").read_text())["pid"]
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        assert state == "Z", f"rank {rank} (pid {pid}) outlived perfkit profile"


def test_a_rank_that_never_arrives_is_named_with_its_line(tmp_path: Path) -> None:
    proc, out, wall = _profile(tmp_path, "block")
    assert proc.returncode == 124, proc.stderr[-3000:]  # perfkit profile's code for a hung job
    assert wall < 60  # the timeout (4 s) and a grace, not gloo's 30 minutes
    assert Run.open(out).manifest.status == "hung"
    a = analyze(out)
    top = a.findings[0]
    assert top.id == "hang" and top.ranks == [1] and top.severity == "critical", [
        (f.id, f.title) for f in a.findings
    ]
    assert top.evidence["op"] == "all_reduce" and top.evidence["waiting"] == [0]
    line = SCRIPT.splitlines().index("            time.sleep(3600)  # PLANTED: rank 1 stuck here") + 1
    assert f"train.py:{line} <module>" in top.evidence["stuck_at"]
    summary = CliRunner().invoke(cli, ["analyze", str(out)]).output
    assert "HUNG" in summary and "<- the others wait for it" in summary
    _no_rank_left(out)


def test_ranks_in_different_collectives_are_a_desync(tmp_path: Path) -> None:
    proc, out, wall = _profile(tmp_path, "desync")
    assert proc.returncode == 124 and wall < 90  # both ranks blocked inside gloo: killed, not left
    _no_rank_left(out)
    a = analyze(out)
    found = {f.id: f for f in a.findings}
    assert "desync" in found, [(f.id, f.title) for f in a.findings]
    sides = {s["op"] for s in found["desync"].evidence["sides"]}
    assert sides == {"all_reduce", "broadcast"}


def test_the_rank_that_failed_first_is_named(tmp_path: Path) -> None:
    proc, out, _ = _profile(tmp_path, "raise")
    assert proc.returncode != 0
    a = analyze(out)
    f = {f.id: f for f in a.findings}["first_failure"]
    assert f.ranks == [1] and "RuntimeError: planted failure" in f.title and "train.py" in f.evidence["at"]


def test_a_rank_killed_by_a_signal_is_named_with_its_line(tmp_path: Path) -> None:
    """A segfault runs no Python, so no failure.json: the rank's faulthandler output (fault.txt) names
    the signal and its line. The rank the launcher stops after it records no fault: its fault.txt is
    gone (it stopped in time to remove it) or empty (a loaded host: killed before it could)."""
    proc, out, _ = _profile(tmp_path, "segfault")
    assert proc.returncode != 0
    assert (out / "rank1" / "fault.txt").read_text().startswith("Fatal Python error: Segmentation fault")
    other = out / "rank0" / "fault.txt"
    assert not other.exists() or not other.read_text()
    f = {f.id: f for f in analyze(out).findings}["first_failure"]
    assert f.ranks == [1] and "Segmentation fault" in f.title
    line = next(i for i, ln in enumerate(SCRIPT.splitlines(), 1) if "string_at(0)" in ln)
    assert f.evidence["at"].endswith(f"train.py:{line} <module>"), f.evidence


def test_a_slow_step_shorter_than_the_timeout_is_no_hang(tmp_path: Path) -> None:
    proc, out, _ = _profile(tmp_path, "slow")
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = analyze(out)
    assert not {"hang", "desync", "first_failure"} & {f.id for f in a.findings}


def test_a_damaged_hang_record_is_one_line(tmp_path: Path) -> None:
    run = Run.create(tmp_path / "r", command=["x"], world_size=2)
    for rank in (0, 1):
        run.layout.rank_dir(rank).mkdir()
    run.layout.hang_record(0).write_text('{"rank": 0, "collectives": {"in_flight": [{"group": "0", "se')
    run.layout.hang_record(1).write_text(json.dumps({"rank": 1, "threads": "garbage", "collectives": [1, 2]}))
    run.finish("hung", 124)
    result = CliRunner().invoke(cli, ["analyze", str(run.path)])
    assert result.exit_code == 0 and "Traceback" not in result.output
    assert sum("hang.json: cannot be read" in line for line in result.output.splitlines()) == 1


@pytest.mark.parametrize(("rank1", "finding"), [("missing", "hang"), ("broadcast", "desync")])
def test_flight_recorder_dumps_give_the_same_findings(tmp_path: Path, rank1: str, finding: str) -> None:
    (tmp_path / "nccl_trace_rank_0").write_bytes(
        fr_dump(0, [fr_entry(4, "all_reduce", 20), fr_entry(5, "all_reduce", 20)], 4)
    )
    rank1_entries = [fr_entry(4, "all_reduce", 20)] + ([fr_entry(5, rank1, 31)] if rank1 != "missing" else [])
    (tmp_path / "nccl_trace_rank_1").write_bytes(fr_dump(1, rank1_entries, 4))
    a = analyze(tmp_path)
    top = a.findings[0]
    assert top.id == finding and a.ranks == [0, 1], [(f.id, f.title) for f in a.findings]
    if finding == "hang":
        assert top.ranks == [1] and top.evidence["op"] == "all_reduce" and top.evidence["seq"] == 5
    else:
        assert {s["op"] for s in top.evidence["sides"]} == {"all_reduce", "broadcast"}
        assert a.metrics.hang is not None and a.metrics.hang.ranks[1].frame == "/home/u/train.py:31 main"


def test_a_real_flight_recorder_dump_is_read(tmp_path: Path) -> None:
    """torch 2.13 records on gloo too: dump one from a 1-rank group and read it back."""
    import subprocess
    import sys

    code = (
        "import os, torch, torch.distributed as dist\n"
        "os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT='29541', TORCH_FR_BUFFER_SIZE='20')\n"
        "dist.init_process_group('gloo', rank=0, world_size=1)\n"
        "t = torch.ones(4); dist.all_reduce(t); dist.broadcast(t, 0)\n"
        "import pickle, time\n"
        "for _ in range(200):  # the recorder marks a completion on its own thread: dump once it has\n"
        "    d = torch._C._distributed_c10d._dump_fr_trace(None, None, None)\n"
        "    if int(next(iter(pickle.loads(d)['pg_status'].values()))['last_completed_collective']) >= 2: break\n"
        "    time.sleep(0.01)\n"
        f"open({str(tmp_path / 'fr_rank_0')!r}, 'wb').write(d)\n"
        "dist.destroy_process_group()\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120, capture_output=True)
    a = analyze(tmp_path)
    assert a.ranks == [0] and a.metrics.hang is not None
    (state,) = a.metrics.hang.ranks
    assert state.entered == {"0": 2} and not state.in_flight and not a.findings  # both completed


def test_a_damaged_dump_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "nccl_trace_rank_0").write_bytes(fr_dump(0, [fr_entry(5, "all_reduce", 20)], 4))
    (tmp_path / "nccl_trace_rank_1").write_bytes(b"\x80\x04garbage")
    result = CliRunner().invoke(cli, ["analyze", str(tmp_path), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0 and "Traceback" not in result.output
    assert sum("not a readable flight-recorder dump" in line for line in result.output.splitlines()) == 1


@pytest.mark.parametrize("n", [3, 40])
def test_a_json_dump_as_torch_writes_it_is_healthy(tmp_path: Path, n: int) -> None:
    """Completed counts written as strings ("3") had read as never completed: [critical] The job
    hung; 40 entries put pg_status past the 4 KB the sniffer read: "not a Kineto trace"."""
    for rank in (0, 1):
        (tmp_path / f"fr_rank_{rank}.json").write_bytes(fr_json_dump(n, n))
    a = analyze(tmp_path)
    assert a.ranks == [0, 1] and not a.findings, [(f.id, f.title) for f in a.findings]
    result = CliRunner().invoke(cli, ["analyze", str(tmp_path), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0 and "FAILED" not in result.output and "NO HANG" in result.output


def test_dumps_pickled_otherwise_and_named_oddly(tmp_path: Path) -> None:
    """Protocol 0 and gzipped pickles are read; a date in a file name is no rank; two dumps claiming
    one rank are one problem, not a rank that 'never entered'."""
    import gzip
    import pickle

    entries = [fr_entry(4, "all_reduce", 20)]
    (tmp_path / "fr_trace_20240601_0").write_bytes(
        pickle.dumps(pickle.loads(fr_dump(0, entries, 4)), protocol=0)
    )
    (tmp_path / "fr_trace_20240601_1.gz").write_bytes(gzip.compress(fr_dump(1, entries, 4)))
    a = analyze(tmp_path)
    assert a.ranks == [0, 1] and not a.findings, (a.ranks, a.problems)
    (tmp_path / "fr_trace_20240601.pickle").write_bytes(fr_dump(1, entries, 4))  # rank by order: 0 again
    (tmp_path / "fr_trace_20240601_1.gz").unlink()
    a = analyze(tmp_path)
    assert a.ranks == [0] and not a.findings
    assert any("claims rank 0" in p for p in a.problems), a.problems


def test_an_allocator_snapshot_is_not_a_dump() -> None:
    from perfkit.analyzers.flight import looks_like_dump

    assert not looks_like_dump(DATA / "h100" / "tuned_memory_snapshot.pickle.gz")


def test_a_dump_of_millions_of_entries_is_cut_and_said(tmp_path: Path) -> None:
    """One entry repeated 2 million times in a small pickle (memo references) had taken 3.5 GB."""
    import pickle

    from perfkit.analyzers.flight import MAX_ENTRIES

    entry = fr_entry(4, "all_reduce", 20)
    doc = pickle.loads(fr_dump(0, [entry], 4))
    doc["entries"] = [entry] * (MAX_ENTRIES * 3)
    (tmp_path / "fr_rank_0").write_bytes(pickle.dumps(doc))
    a = analyze(tmp_path)
    assert a.ranks == [0] and any("more than a flight recorder keeps" in p for p in a.problems)


def test_the_summary_says_where_a_state_came_from_once() -> None:
    from perfkit.analyzers.hangs import HangMetrics, RankState
    from perfkit.analyzers.metrics import Metrics
    from perfkit.reports.text import hang_lines

    h = HangMetrics(hung=True, ranks=[RankState(rank=0, told_by="its stop", in_flight=[], entered={})])
    (head, *_) = hang_lines(Metrics(hang=h))
    assert "(from its stop)" in head and "its its" not in head
    h.ranks[0].told_by = "hang record"
    assert "(from its hang record)" in hang_lines(Metrics(hang=h))[0]
