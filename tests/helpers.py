"""Shared by the tests that run perfkit as a user would, in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

BIN = Path(sys.executable).parent


def user_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a user whose virtual environment is active (torchrun on PATH)."""
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", **(extra or {})}


def run_perfkit(
    *args: str, env: dict[str, str] | None = None, timeout: int = 300, probe: bool = False
) -> subprocess.CompletedProcess[str]:
    """``perfkit ARGS`` as a user runs it. A ``profile`` skips the bundled trainer's measurements
    after its last step (``--no-probe``: ~5 s a run at tiny-cpu) unless the test reads them
    (``probe=True``: the link probe, the layout costs, the predictions made from them)."""
    if args[:1] == ("profile",) and not probe:
        args = ("profile", "--no-probe", *args[1:])
    return subprocess.run(
        [sys.executable, "-m", "perfkit", *args],
        capture_output=True,
        text=True,
        env=user_env(env),
        timeout=timeout,
    )


def bench_module(name: str):  # type: ignore[no-untyped-def]
    """A script of bench/ as a module (its simulation or synthesis, shared with a test)."""
    import importlib.util

    if name not in sys.modules:
        path = Path(__file__).resolve().parent.parent / "bench" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec and spec.loader
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def synth_ranks():  # type: ignore[no-untyped-def]
    """bench/synth_ranks.py as a module: N-rank jobs made from a real trace, with planted effects."""
    return bench_module("synth_ranks")


def fr_dump(rank: int, entries: list[dict], last_completed: int) -> bytes:
    """A flight-recorder dump as torch 2.13 pickles it (the layout _dump_fr_trace returns)."""
    import pickle

    return pickle.dumps(
        {
            "version": "2.10",
            "pg_config": {"0": {"name": "0", "desc": "default_pg", "ranks": "[0, 1]"}},
            "pg_status": {"0": {"last_enqueued_collective": max([e["collective_seq_id"] for e in entries] or [last_completed]),
                                "last_started_collective": -1, "last_completed_collective": last_completed}},
            "entries": entries,
        }
    )  # fmt: skip


def fr_entry(seq: int, op: str, line: int) -> dict:
    return {
        "record_id": seq, "pg_id": 0, "process_group": ("0", "default_pg"), "collective_seq_id": seq, "p2p_seq_id": 0,
        "op_id": seq, "profiling_name": f"nccl:{op}", "time_created_ns": seq, "input_sizes": [[4]],
        "input_dtypes": ["Float"], "output_sizes": [[4]], "output_dtypes": ["Float"], "state": "scheduled",
        "is_p2p": False, "retired": False, "timeout_ms": 600000,
        "frames": [{"name": op, "filename": "/x/site-packages/torch/distributed/distributed_c10d.py", "line": 1},
                   {"name": "main", "filename": "/home/u/train.py", "line": line}],
    }  # fmt: skip


def fr_json_dump(n: int, last_completed: int) -> bytes:
    """A JSON dump as torch 2.13's _dump_fr_trace_json writes it: keys sorted, pg_status's sequence
    numbers as strings, no rank field (checked against a real one on gloo)."""
    entries = [
        {"collective_seq_id": k, "input_dtypes": ["Float"], "input_sizes": [[4]], "is_p2p": False, "op_id": k,
         "output_dtypes": ["Float"], "output_sizes": [[4]], "p2p_seq_id": 0, "pg_id": 0,
         "process_group": ["0", "default_pg"], "profiling_name": "gloo:all_reduce", "record_id": k - 1,
         "retired": True, "state": "scheduled", "thread_id": "1", "thread_name": "python",
         "time_created_ns": k, "time_discovered_completed_ns": 0, "time_discovered_started_ns": 0,
         "timeout_ms": 1800000}
        for k in range(1, n + 1)
    ]  # fmt: skip
    doc = {
        "comm_lib_version": "",
        "entries": entries,
        "nccl_comm_state": {},
        "pg_config": {"0": {"desc": "default_pg", "name": "0", "ranks": "[0, 1]"}},
        "pg_status": {"0": {"last_completed_collective": str(last_completed), "last_enqueued_collective": str(n),
                            "last_started_collective": "-1"}},
        "version": "2.10",
    }  # fmt: skip
    return json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()
