"""Kineto traces (torch.profiler's Chrome-trace JSON) to one compact DataFrame per rank.

Only complete events ("ph": "X") are kept: CPU ops, runtime/driver calls, annotations, and GPU
kernels, copies and sets. Times become int64 nanoseconds on one absolute clock: Kineto writes
``ts`` in microseconds, either as epoch time or relative to ``baseTimeNanoseconds``; adding the
base in integer nanoseconds (never float microseconds) keeps 2026 epoch times exact and within
int64 (1.8e18 < 9.2e18). Names and categories are pandas categoricals, so a 200k-event trace
holds each distinct kernel name once.
"""

from __future__ import annotations

import gzip
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pandas as pd

from perfkit.errors import RunDirError


class TraceError(RunDirError):
    """A trace that cannot be used; the message names the file and the problem."""


GPU_CATS = ("kernel", "gpu_memcpy", "gpu_memset")
# Arguments kept for the events that carry collective metadata (record_param_comms, NCCL kernels).
COMM_ARGS = {
    "Collective name": "collective",
    "In msg nelems": "in_nelems",
    "Out msg nelems": "out_nelems",
    "dtype": "dtype",
    "Group size": "group_size",
    "Process Group Name": "pg_name",
    "Process Group Ranks": "pg_ranks",
}


@dataclass
class Trace:
    path: Path
    rank: int
    events: pd.DataFrame
    """One row per complete event: name, cat, pid, tid, ts, dur, end (int64 ns), stream, correlation,
    ext_id (-1 where absent)."""
    comm_args: pd.DataFrame = field(default_factory=pd.DataFrame)
    """Collective metadata by event row (index = row of ``events``)."""
    world_size: int | None = None
    backend: str | None = None
    device: dict[str, Any] = field(default_factory=dict)
    """deviceProperties[0] when present (name, totalGlobalMem, ...)."""
    shapes: dict[int, Any] = field(default_factory=dict)
    """``Input Dims`` / ``Input type`` of CPU ops by row, when recorded (GEMM precision)."""

    @property
    def gpu(self) -> pd.DataFrame:
        """Kernels, copies and sets, ordered by start."""
        return self.events[self.events["cat"].isin(GPU_CATS)].sort_values("ts")


_RANK_IN_NAME = re.compile(r"rank[-_]?(\d+)", re.IGNORECASE)


def read_json(path: Path) -> Any:
    """Parse a (gzipped) JSON file; a damaged one raises TraceError naming the file."""
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise TraceError(f"{path}: cannot be read or is truncated ({e})") from None
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise TraceError(f"{path}: not valid JSON ({e}); the file is truncated or not a trace") from None


def load_trace(path: Path, rank: int | None = None) -> Trace:
    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("traceEvents"), list):
        raise TraceError(f"{path}: not a Kineto trace (no traceEvents list)")
    info = data.get("distributedInfo") or {}
    if rank is None:
        rank = info.get("rank")
    if rank is None:
        m = _RANK_IN_NAME.search(path.name)
        rank = int(m.group(1)) if m else 0
    base = int(data.get("baseTimeNanoseconds") or 0)
    names: list[str] = []
    cats: list[str] = []
    pids: list[str] = []
    tids: list[str] = []
    ts: list[float] = []
    durs: list[float] = []
    streams: list[int] = []
    corrs: list[int] = []
    ext: list[int] = []
    comm_rows: dict[int, dict[str, Any]] = {}
    shapes: dict[int, Any] = {}
    for e in data["traceEvents"]:
        if not isinstance(e, dict) or e.get("ph") != "X":
            continue
        t, d = e.get("ts"), e.get("dur")
        if not isinstance(t, int | float) or not isinstance(d, int | float):
            continue
        cat = e.get("cat") or ""
        name = e.get("name") or ""
        args = e.get("args") or {}
        i = len(names)
        names.append(name)
        cats.append(cat)
        pids.append(str(e.get("pid")))
        tids.append(str(e.get("tid")))
        ts.append(t)
        durs.append(d)
        s = args.get("stream", -1) if cat in GPU_CATS else -1
        streams.append(s if isinstance(s, int) else -1)
        c = args.get("correlation", -1)
        corrs.append(c if isinstance(c, int) else -1)
        x = args.get("External id", -1)
        ext.append(x if isinstance(x, int) else -1)
        if "Collective name" in args or name == "record_param_comms":
            comm_rows[i] = {v: args.get(k) for k, v in COMM_ARGS.items()}
        if cat == "cpu_op" and "Input Dims" in args:
            shapes[i] = (args.get("Input Dims"), args.get("Input type"))
    if not names:
        raise TraceError(f"{path}: holds no complete events; nothing to analyze")
    ts_ns = np.rint(np.asarray(ts, dtype=np.float64) * 1e3).astype(np.int64) + base
    dur_ns = np.rint(np.asarray(durs, dtype=np.float64) * 1e3).astype(np.int64)
    events = pd.DataFrame(
        {
            "name": pd.Categorical(names),
            "cat": pd.Categorical(cats),
            "pid": pd.Categorical(pids),
            "tid": pd.Categorical(tids),
            "ts": ts_ns,
            "dur": dur_ns,
            "end": ts_ns + dur_ns,
            "stream": np.asarray(streams, dtype=np.int64),
            "correlation": np.asarray(corrs, dtype=np.int64),
            "ext_id": np.asarray(ext, dtype=np.int64),
        }
    )
    comm = (
        pd.DataFrame.from_dict(comm_rows, orient="index")
        if comm_rows
        else pd.DataFrame(columns=list(COMM_ARGS.values()))
    )
    props = data.get("deviceProperties") or []
    return Trace(
        path=path,
        rank=int(rank),
        events=events,
        comm_args=comm,
        world_size=info.get("world_size"),
        backend=info.get("backend"),
        device=props[0] if props and isinstance(props[0], dict) else {},
        shapes=shapes,
    )
