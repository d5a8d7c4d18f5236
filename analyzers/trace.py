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
from collections.abc import Callable, Iterator
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

    _gpu: pd.DataFrame | None = None

    @property
    def gpu(self) -> pd.DataFrame:
        """Kernels, copies and sets, ordered by start, with ``category`` and (GEMMs) ``precision``
        (computed once)."""
        if self._gpu is None:
            from perfkit.analyzers.kernels import classify

            self._gpu = classify(self.events[self.events["cat"].isin(GPU_CATS).to_numpy()].sort_values("ts"))
        return self._gpu


def by_name(column: pd.Series, fn: Callable[[str], Any], dtype: Any = object) -> np.ndarray:
    """``fn`` of each row's name, computed once per distinct name: kernel names run to a kilobyte,
    and making a string per row of a 200k-event trace costs more than everything else."""
    codes = column.cat.codes.to_numpy()
    categories = column.cat.categories
    if len(codes) == 0 or len(categories) == 0:
        return np.zeros(len(codes), dtype=dtype)
    # Only the names these rows use (a subset such as the GPU events uses few of the trace's names).
    used = np.unique(codes)
    values = np.empty(len(categories), dtype=dtype)
    values[used] = [fn(str(categories[i])) for i in used]
    return values[codes]


_RANK_IN_NAME = re.compile(r"rank[-_]?(\d+)", re.IGNORECASE)


def _read_bytes(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise TraceError(f"{path}: cannot be read or is truncated ({e})") from None
    return raw


def read_json(path: Path) -> Any:
    """Parse a (gzipped) JSON file; a damaged one raises TraceError naming the file."""
    return _parse_json(path, _read_bytes(path))


def _parse_json(path: Path, raw: bytes) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise TraceError(f"{path}: not valid JSON ({e}); the file is truncated or not a trace") from None


# Kineto writes every complete event with its keys in one order, args flat:
#   {"ph": "X", "cat": C, "name": N, "pid": P, "tid": T,\n "ts": TS, "dur": D,\n "args": {...}}
# Reading those straight from the bytes with literal-prefixed patterns skips building a Python
# dict per event. A name with an escaped quote, another key order, or a file that does not end
# where JSON should, sends the whole file to orjson instead.
_EVENT = re.compile(
    rb'"ph": "X", "cat": "([^"]*)", "name": "([^"]*)", "pid": ("[^"]*"|-?\d+), "tid": ("[^"]*"|-?\d+),'
    rb'\s*"ts": (-?[\d.]+(?:[eE][-+]?\d+)?), "dur": (-?[\d.]+(?:[eE][-+]?\d+)?)'
    # Kineto writes "External id" first among the args: take it in the same scan
    rb'(?:,\s*"args": \{\s*"External id": (-?\d+))?'
)
_ARG_INTS = {
    "stream": re.compile(rb'"stream": (-?\d+)'),
    "correlation": re.compile(rb'"correlation": (-?\d+)'),
    "ext_id": re.compile(rb'"External id": (-?\d+)'),
}
_COMM_ARGS = re.compile(rb'"name": "record_param_comms"|"Collective name"')


def _top_level(raw: bytes, key: bytes) -> Any:
    """The value of a top-level key found by text (a number, or an object/list matched by brackets)."""
    i = raw.rfind(b'"' + key + b'":')
    if i < 0:
        return None
    j = i + len(key) + 3
    while j < len(raw) and raw[j] in b" \n\r\t":
        j += 1
    if j >= len(raw):
        return None
    if raw[j] in b"{[":
        depth, k, in_str = 0, j, False
        while k < len(raw) and k - j < 1 << 20:
            c = raw[k]
            if in_str:
                if c == 92:  # backslash
                    k += 1
                elif c == 34:
                    in_str = False
            elif c == 34:
                in_str = True
            elif c in b"{[":
                depth += 1
            elif c in b"}]":
                depth -= 1
                if depth == 0:
                    return orjson.loads(raw[j : k + 1])
            k += 1
        return None
    m = re.match(rb"-?\d+", raw[j : j + 32])
    return int(m.group()) if m else None


class _Interner:
    """Factorizes bytes into int codes with a dict (pandas' factorizing of 100k long kernel names
    takes most of a second); the categories are decoded once each."""

    def __init__(self, strip: bool = False) -> None:
        self.table: dict[bytes, int] = {}
        self.codes: list[np.ndarray] = []
        self.strip = strip

    def add(self, values: list[bytes]) -> None:
        table = self.table
        for v in dict.fromkeys(values):  # distinct values, first-seen order; C-speed loops only
            if v not in table:
                table[v] = len(table)
        self.codes.append(np.fromiter(map(table.__getitem__, values), dtype=np.int32, count=len(values)))

    def categorical(self) -> pd.Categorical:
        cats = [k.decode().strip('"') if self.strip else k.decode() for k in self.table]
        codes = np.concatenate(self.codes) if self.codes else np.zeros(0, dtype=np.int32)
        if len(set(cats)) != len(cats):  # "7" and 7 as tids: merge them
            return pd.Categorical(np.asarray(cats, dtype=object)[codes])
        return pd.Categorical.from_codes(codes, categories=pd.Index(cats, dtype=object))


_CHUNK = 2 << 20


def _blocks(path: Path) -> Iterator[bytes]:
    """The file's (decompressed) bytes in blocks of about 8 MiB."""
    with open(path, "rb") as f:
        gz = f.read(2) == b"\x1f\x8b"
        f.seek(0)
        inflate = zlib.decompressobj(16 + zlib.MAX_WBITS) if gz else None
        while block := f.read(1 << 16 if gz else _CHUNK):
            yield inflate.decompress(block) if inflate else block
        if inflate:
            yield inflate.flush()


def _matches_at(pattern: re.Pattern[bytes], text: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Start offsets and integer values of every match of ``"key": (digits)``, from
    ``pattern.split``: the pieces' lengths give the offsets without a Python object per match."""
    parts = pattern.split(text)
    values = parts[1::2]
    if not values:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    gaps = np.fromiter(map(len, parts[0::2]), dtype=np.int64, count=len(values) + 1)
    widths = np.fromiter(map(len, values), dtype=np.int64, count=len(values))
    literal = len(pattern.pattern) - len(rb"(-?\d+)")
    before = np.concatenate(([0], np.cumsum(literal + widths[:-1])))
    starts = np.cumsum(gaps[:-1]) + before
    return starts, np.fromiter(map(int, values), dtype=np.int64, count=len(values))


@dataclass
class _Columns:
    """Columns of complete events, built block by block."""

    interners: list[_Interner] = field(
        default_factory=lambda: [_Interner(), _Interner(), _Interner(True), _Interner(True)]
    )
    ts: list[np.ndarray] = field(default_factory=list)
    dur: list[np.ndarray] = field(default_factory=list)
    ints: dict[str, list[np.ndarray]] = field(default_factory=lambda: {k: [] for k in _ARG_INTS})
    comm_rows: dict[int, dict[str, Any]] = field(default_factory=dict)
    n: int = 0
    x_events: int = 0

    def scan(self, text: bytes) -> bool:
        """Add the complete events of ``text`` (which ends at an event boundary); False if they are
        not all in Kineto's layout."""
        matches = _EVENT.findall(text)
        self.x_events += text.count(b'"ph": "X"')
        if not matches:
            return True
        prefix = b'"ph": "X", "cat": "'
        lengths = np.fromiter(map(len, text.split(prefix)), dtype=np.int64)
        starts = np.cumsum(lengths[:-1]) + np.arange(len(lengths) - 1) * len(prefix)
        # profiler "Trace" markers share the prefix but not the key order
        if b'"cat": "Trace"' in text:
            starts = np.array(
                [p for p in starts.tolist() if not text.startswith(b'Trace"', p + len(prefix))],
                dtype=np.int64,
            )
        if len(starts) != len(matches):
            starts = np.fromiter((m.start() for m in _EVENT.finditer(text)), dtype=np.int64)
            if len(starts) != len(matches):
                return False
        for i, interner in enumerate(self.interners):
            interner.add([g[i] for g in matches])
        self.ts.append(np.fromiter(map(float, [g[4] for g in matches]), dtype=np.float64, count=len(matches)))
        self.dur.append(
            np.fromiter(map(float, [g[5] for g in matches]), dtype=np.float64, count=len(matches))
        )
        ends = np.append(starts[1:], len(text))  # an event's args lie before the next event's start
        ext = np.fromiter((int(g[6]) if g[6] else -1 for g in matches), dtype=np.int64, count=len(matches))
        for col, pattern in _ARG_INTS.items():
            if col == "ext_id" and int((ext >= 0).sum()) == text.count(b'"External id": '):
                self.ints[col].append(ext)  # every External id was the first arg: no extra pass
                continue
            values = np.full(len(matches), -1, dtype=np.int64)
            pos, val = _matches_at(pattern, text)
            if len(pos):
                k = np.searchsorted(starts, pos, side="right") - 1
                inside = (k >= 0) & (pos < ends[k.clip(0)])
                values[k[inside]] = val[inside]
            self.ints[col].append(values)
        for m in _COMM_ARGS.finditer(text):
            e = int(np.searchsorted(starts, m.start(), side="right")) - 1
            if e < 0 or self.n + e in self.comm_rows:
                continue
            a = text.find(b'"args": {', int(starts[e]), int(ends[e]))
            if a >= 0:
                args = orjson.loads(text[a + 8 : text.index(b"}", a) + 1])
                self.comm_rows[self.n + e] = {v: args.get(key) for key, v in COMM_ARGS.items()}
        self.n += len(matches)
        return True


def _fast_load(path: Path) -> tuple[dict[str, Any], dict[int, dict[str, Any]], dict[str, Any]] | None:
    """Columns, collective args and top-level fields of a trace in Kineto's own layout, read block
    by block so that at most one 8 MiB block of text is alive at a time; None if the file is in
    another layout or does not end like JSON (truncated), for the strict parser to judge."""
    out = _Columns()
    head = b""
    pending = b""
    parts: list[bytes] = []
    size = 0
    try:
        for block in _blocks(path):
            parts.append(block)
            size += len(block)
            if size < _CHUNK:
                continue
            text = pending + b"".join(parts)
            parts, size = [], 0
            if not head and b'"traceEvents"' in text:
                head = text[: text.index(b'"traceEvents"')]
            cut = text.rfind(b'"ph": ')  # the last event may be incomplete: keep it for later
            if cut <= 0:
                pending = text
                continue
            if not out.scan(text[:cut]):
                return None
            pending = text[cut:]
    except (OSError, EOFError, zlib.error):
        return None
    pending += b"".join(parts)
    if not head and b'"traceEvents"' in pending:
        head = pending[: pending.index(b'"traceEvents"')]
    end = pending.rstrip()
    if not head or not end.endswith(b"}") or not out.scan(pending):
        return None
    if out.n == 0 or out.n < out.x_events - 2:  # a marker event or two in another key order
        return None
    tail = pending[-(1 << 16) :]
    meta = {
        key: _top_level(head, key.encode()) or _top_level(tail, key.encode())
        for key in ("distributedInfo", "baseTimeNanoseconds", "deviceProperties")
    }
    cat = out.interners[0].categorical()
    stream = np.concatenate(out.ints["stream"])
    cols: dict[str, Any] = {
        "cat": cat,
        "name": out.interners[1].categorical(),
        "pid": out.interners[2].categorical(),
        "tid": out.interners[3].categorical(),
        "ts": np.concatenate(out.ts),
        "dur": np.concatenate(out.dur),
        "stream": np.where(np.asarray(cat.isin(GPU_CATS)), stream, -1),
        "correlation": np.concatenate(out.ints["correlation"]),
        "ext_id": np.concatenate(out.ints["ext_id"]),
    }
    return cols, out.comm_rows, meta


def _dict_events(events: list[Any]) -> tuple[dict[str, Any], dict[int, dict[str, Any]]]:
    """Columns of every complete event from parsed JSON (any key order)."""
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
    for e in events:
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
    cols = {
        "cat": cats,
        "name": names,
        "pid": pids,
        "tid": tids,
        "ts": np.asarray(ts, dtype=np.float64),
        "dur": np.asarray(durs, dtype=np.float64),
        "stream": np.asarray(streams, dtype=np.int64),
        "correlation": np.asarray(corrs, dtype=np.int64),
        "ext_id": np.asarray(ext, dtype=np.int64),
    }
    return cols, comm_rows


_MALLOC_TUNED = False


def _release_large_buffers() -> None:
    """Make glibc serve blocks of 1 MiB and more with mmap, so a freed text block goes back to the
    OS at once. Its default threshold grows after each large free, and the blocks then fragment
    the heap: peak RSS on a 216k-event trace drops from ~175 to ~145 MiB. Elsewhere: a no-op."""
    global _MALLOC_TUNED
    if _MALLOC_TUNED:
        return
    _MALLOC_TUNED = True
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def _categorical(values: Any) -> pd.Categorical:
    return values if isinstance(values, pd.Categorical) else pd.Categorical(values)


def load_trace(path: Path, rank: int | None = None) -> Trace:
    _release_large_buffers()
    fast = _fast_load(path)
    if fast is not None:
        cols, comm_rows, meta = fast
        info = meta["distributedInfo"] or {}
        base = int(meta["baseTimeNanoseconds"] or 0)
        props = meta["deviceProperties"] or []
    else:
        raw = _read_bytes(path)
        data = _parse_json(path, raw)
        del raw
        if not isinstance(data, dict) or not isinstance(data.get("traceEvents"), list):
            raise TraceError(f"{path}: not a Kineto trace (no traceEvents list)")
        cols, comm_rows = _dict_events(data["traceEvents"])
        info = data.get("distributedInfo") or {}
        base = int(data.get("baseTimeNanoseconds") or 0)
        props = data.get("deviceProperties") or []
    if not isinstance(info, dict):
        info = {}
    if rank is None:
        rank = info.get("rank")
    if rank is None:
        m = _RANK_IN_NAME.search(path.name)
        rank = int(m.group(1)) if m else 0
    if not len(cols["name"]):
        raise TraceError(f"{path}: holds no complete events; nothing to analyze")
    ts_ns = np.rint(cols["ts"] * 1e3).astype(np.int64) + base
    dur_ns = np.rint(cols["dur"] * 1e3).astype(np.int64)
    events = pd.DataFrame(
        {
            "name": _categorical(cols["name"]),
            "cat": _categorical(cols["cat"]),
            "pid": _categorical(cols["pid"]),
            "tid": _categorical(cols["tid"]),
            "ts": ts_ns,
            "dur": dur_ns,
            "end": ts_ns + dur_ns,
            "stream": cols["stream"],
            "correlation": cols["correlation"],
            "ext_id": cols["ext_id"],
        }
    )
    comm = (
        pd.DataFrame.from_dict(comm_rows, orient="index")
        if comm_rows
        else pd.DataFrame(columns=list(COMM_ARGS.values()))
    )
    return Trace(
        path=path,
        rank=int(rank),
        events=events,
        comm_args=comm,
        world_size=info.get("world_size"),
        backend=info.get("backend"),
        device=props[0] if isinstance(props, list) and props and isinstance(props[0], dict) else {},
    )
