"""Seeded damage to real traces, tables, manifests, snapshots, the ranks' JSON records (probe, hang,
failure), flight-recorder dumps and sweep ledgers, many ways: perfkit never shows a traceback, exits
0 or 1 with one line per problem, and the undamaged rank is still analyzed.
(Seeded mutations rather than a property-testing library: the same cases on every run, under a
minute.)"""

from __future__ import annotations

import gzip
import json
import pickle
import random
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import fr_dump, fr_entry, fr_json_dump

from perfkit.cli import cli
from perfkit.run import Run
from perfkit.tables import STEPS

DATA = Path(__file__).parent / "data"
TRACES = [DATA / "hta" / "trace_filter" / f"sampled_rank-{i}.json.gz" for i in (0, 1)]


def _mutate(raw: bytes, rng: random.Random) -> bytes:
    kind = rng.randrange(7)
    if not raw:
        return b"\xff"
    at = rng.randrange(len(raw))
    if kind == 0:  # truncated
        return raw[:at]
    if kind == 1:  # flipped bytes
        b = bytearray(raw)
        for _ in range(rng.randint(1, 8)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        return bytes(b)
    if kind == 2:  # invalid UTF-8 inserted
        return raw[:at] + b"\xc3\x28\xff" + raw[at:]
    if kind == 3:  # a number made huge, negative or not a number
        for key in (
            b'"dur": ',
            b'"ts": ',
            b'"External id": ',
            b'"step_time_s": ',
            b'"world_size": ',
            b'"step_ms": ',
        ):
            i = raw.find(key, at)
            if i >= 0:
                j = i + len(key)
                k = j
                while k < len(raw) and raw[k : k + 1] not in (b",", b"}"):
                    k += 1
                value = rng.choice([b"18446744073709551617", b"-1e308", b'"x"', b"null", b"1e999", b"[]"])
                return raw[:j] + value + raw[k:]
        return raw[:at]
    if kind == 4:  # a block duplicated
        return raw[:at] + raw[at : at + 200] + raw[at:]
    if kind == 5:  # emptied
        return b""
    return raw[:at] + b"}]}" + raw[at:]  # closed early


def _run_dir(tmp: Path) -> Path:
    run = Run.create(tmp / "run", command=["train.py"], world_size=2)
    for rank in (0, 1):
        d = run.layout.rank_dir(rank)
        d.mkdir()
        shutil.copy(TRACES[rank], run.layout.trace(rank))
        rows = [
            {
                "step": s,
                "start_ns": s * 10**8,
                "end_ns": s * 10**8 + 5 * 10**7,
                "step_time_s": 0.05,
                "tokens": 64,
            }
            for s in range(1, 8)
        ]
        run.layout.table(rank, STEPS).write_text("".join(json.dumps(r) + "\n" for r in rows))
        snapshot = {
            "segments": [
                {
                    "total_size": 1 << 20,
                    "blocks": [{"size": 1 << 19, "state": "active_allocated", "frames": []}],
                }
            ]
        }
        run.layout.memory_snapshot(rank).write_bytes(pickle.dumps(snapshot))
        collectors = {"steps": {"status": "ok", "reason": ""}, "kernels": {"status": "ok", "reason": ""}}
        run.layout.probe(rank).write_text(json.dumps({"rank": rank, "world_size": 2, "status": "complete",
                                                      "steps": 7, "collectors": collectors}))  # fmt: skip
    in_flight = {"group": "default", "seq": 9, "op": "all_reduce", "bytes": 4096, "dtype": "float32",
                 "entered_ns": 10**9, "step": 7, "waiting_s": 30.0}  # fmt: skip
    run.layout.hang_record(0).write_text(json.dumps({
        "rank": 0, "world_size": 2, "time": 1.7e9, "stalled_s": 30.0, "step": 7, "since_step_s": 31.0,
        "collectives": {"entered": {"default": 9}, "completed": {"default": 8}, "in_flight": [in_flight],
                        "last_completed": {"default": {**in_flight, "seq": 8}}},
        "threads": [{"name": "MainThread", "main": True, "daemon": False,
                     "frames": [{"file": "/home/u/train.py", "line": 40, "function": "main"}]}],
    }))  # fmt: skip
    run.layout.failure_record(0).write_text(json.dumps({
        "rank": 0, "world_size": 2, "time": 1.7e9, "exception": "RuntimeError", "message": "planted", "step": 7,
        "frames": [{"file": "/home/u/train.py", "line": 41, "function": "main"}],
    }))  # fmt: skip
    run.finish("complete", 0)
    return run.path


def _check(result) -> None:  # type: ignore[no-untyped-def]
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    assert "Traceback" not in result.output
    assert result.exit_code in (0, 1), result.output
    if result.exit_code == 1:
        assert result.output.count("Error:") == 1 and result.output.strip().count("\n") == 0, result.output


@pytest.mark.parametrize("seed", range(24))
def test_a_damaged_trace_alone(tmp_path: Path, seed: int) -> None:
    rng = random.Random(31 + seed)
    raw = gzip.decompress(TRACES[0].read_bytes())
    damaged = _mutate(raw, rng)
    path = tmp_path / "trace.json.gz"
    path.write_bytes(gzip.compress(damaged) if seed % 3 else damaged)  # also uncompressed
    _check(CliRunner().invoke(cli, ["analyze", str(path), "--out", str(tmp_path / "out")]))


VICTIMS = ["rank0/trace.json.gz", "rank0/steps.jsonl", "manifest.json", "rank0/memory_snapshot.pickle",
           "rank0/probe.json", "rank0/hang.json", "rank0/failure.json"]  # fmt: skip


@pytest.mark.parametrize("seed", range(28))
def test_a_run_with_one_damaged_file(tmp_path: Path, seed: int) -> None:
    rng = random.Random(7919 + seed)
    run = _run_dir(tmp_path)
    victim = run / VICTIMS[seed % len(VICTIMS)]
    raw = victim.read_bytes()
    if victim.suffix == ".gz":
        victim.write_bytes(gzip.compress(_mutate(gzip.decompress(raw), rng)))
    else:
        victim.write_bytes(_mutate(raw, rng))
    result = CliRunner().invoke(cli, ["analyze", str(run), "--json", "--out", str(tmp_path / "out")])
    _check(result)
    if result.exit_code == 0 and victim.name != "manifest.json":
        data = json.loads(result.output[: result.output.rindex("}") + 1])
        assert 1 in data["ranks"]  # the undamaged rank is still analyzed
    for command in (["report", str(run), "--out", str(tmp_path / "r.html")], ["export-trace", str(run),
                    "--out", str(tmp_path / "m.json")]):  # fmt: skip
        _check(CliRunner().invoke(cli, command))


@pytest.mark.parametrize("seed", range(16))
def test_a_damaged_flight_recorder_dump(tmp_path: Path, seed: int) -> None:
    """Pickled (plain or gzipped) and JSON dumps, damaged: one line for the bad one, the good one read."""
    rng = random.Random(104729 + seed)
    entries = [fr_entry(4, "all_reduce", 20), fr_entry(5, "all_reduce", 20)]
    (tmp_path / "fr_rank_0").write_bytes(fr_dump(0, entries, 5))
    raw = [fr_dump(1, entries, 5), fr_json_dump(5, 5)][seed % 2]
    damaged = _mutate(raw, rng)
    name = "fr_rank_1" + (".json" if seed % 2 else "")
    (tmp_path / name).write_bytes(gzip.compress(damaged) if seed % 4 >= 2 else damaged)
    _check(CliRunner().invoke(cli, ["analyze", str(tmp_path), "--out", str(tmp_path / "out")]))


@pytest.mark.parametrize("seed", range(12))
def test_a_damaged_sweep_ledger_is_one_line(tmp_path: Path, seed: int) -> None:
    """A sweep resumed over a damaged ledger: read as far as it can be, or one line saying it is
    damaged, never a traceback."""
    from perfkit.errors import PerfkitError
    from perfkit.optimizer.sweep import Sweep, _ledger
    from perfkit.optimizer.trials import Candidate

    rng = random.Random(1299709 + seed)
    ledger = {"schema_version": 2, "config": "tiny-cpu", "nproc": 2, "nodes": 1, "overrides": [], "candidates": [
        {"overrides": ["parallel.tp=2"], "runs": [{"ok": True, "step_ms": 40.0, "samples_ms": [40.0, 41.0],
                                                    "tokens_per_s": 9000.0, "loss": 5.1, "steps": 30}]},
    ]}  # fmt: skip
    (tmp_path / "sweep.json").write_bytes(_mutate(json.dumps(ledger).encode(), rng))
    sweep = Sweep("tiny-cpu", 2, [], 1)
    sweep.candidates = [Candidate("tp", ["parallel.tp=2"])]
    try:
        measured = _ledger(tmp_path, sweep)
    except PerfkitError as e:
        assert "\n" not in str(e) and str(tmp_path) in str(e)
    else:
        for runs in measured.values():
            assert all(r.step_ms is None or r.step_ms > 0 for r in runs)
