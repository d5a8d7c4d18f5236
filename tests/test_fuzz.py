"""Seeded damage to real traces, tables, manifests and snapshots, many ways: perfkit analyze never
shows a traceback, exits 0 or 1 with one line per problem, and the undamaged rank is still analyzed.
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
        for key in (b'"dur": ', b'"ts": ', b'"External id": ', b'"step_time_s": ', b'"world_size": '):
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
    run.finish("complete", 0)
    return run.path


def _check(result, damaged_rank_only: bool) -> None:  # type: ignore[no-untyped-def]
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    assert "Traceback" not in result.output
    assert result.exit_code in (0, 1), result.output
    if result.exit_code == 1:
        assert result.output.count("Error:") == 1 and result.output.strip().count("\n") == 0, result.output
    elif damaged_rank_only:
        assert "rank(s)" in result.output


@pytest.mark.parametrize("seed", range(24))
def test_a_damaged_trace_alone(tmp_path: Path, seed: int) -> None:
    rng = random.Random(31 + seed)
    raw = gzip.decompress(TRACES[0].read_bytes())
    damaged = _mutate(raw, rng)
    path = tmp_path / "trace.json.gz"
    path.write_bytes(gzip.compress(damaged) if seed % 3 else damaged)  # also uncompressed
    _check(CliRunner().invoke(cli, ["analyze", str(path), "--out", str(tmp_path / "out")]), False)


@pytest.mark.parametrize("seed", range(24))
def test_a_run_with_one_damaged_file(tmp_path: Path, seed: int) -> None:
    rng = random.Random(7919 + seed)
    run = _run_dir(tmp_path)
    victim = [run / "rank0" / "trace.json.gz", run / "rank0" / "steps.jsonl", run / "manifest.json",
              run / "rank0" / "memory_snapshot.pickle"][seed % 4]  # fmt: skip
    raw = victim.read_bytes()
    if victim.suffix == ".gz":
        victim.write_bytes(gzip.compress(_mutate(gzip.decompress(raw), rng)))
    else:
        victim.write_bytes(_mutate(raw, rng))
    result = CliRunner().invoke(cli, ["analyze", str(run), "--json", "--out", str(tmp_path / "out")])
    _check(result, False)
    if result.exit_code == 0 and victim.name != "manifest.json":
        data = json.loads(result.output[: result.output.rindex("}") + 1])
        assert 1 in data["ranks"]  # the undamaged rank is still analyzed
