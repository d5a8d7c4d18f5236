"""Kineto traces (torch.profiler's Chrome-trace JSON) to one compact DataFrame per rank.

Only complete events ("ph": "X") are kept: CPU ops, runtime/driver calls, annotations, and GPU
kernels, copies and sets. Times become int64 nanoseconds on one absolute clock: Kineto writes
``ts`` in microseconds, either as epoch time or relative to ``baseTimeNanoseconds``; adding the
base in integer nanoseconds (never float microseconds) keeps 2026 epoch times exact and within
int64 (1.8e18 < 9.2e18). Names and categories are pandas categoricals, so a 200k-event trace
holds each distinct kernel name once.

Reading: msgspec decodes the events into typed structs with only the fields used, about 2 MiB of
text at a time, cut between events (Kineto writes "ph" first in each event). Any other layout, a
field of an unexpected type or a damaged file goes to a strict whole-file parse (orjson, a dict
per event), which reads every layout and words the error when there is one.
"""

from __future__ import annotations

import gzip
import math
import re
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from operator import attrgetter
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import orjson
import pandas as pd

from perfkit.errors import RunDirError


class TraceError(RunDirError):
    """A trace that cannot be used; the message names the file and the problem."""


GPU_CATS = ("kernel", "gpu_memcpy", "gpu_memset")
# Events on a GPU stream: the GPU work, and the waits Kineto draws there (cuda_sync: "Stream Wait
# Event", "Stream Sync"); only these keep their ``stream`` (ROCm runtime calls carry one too).
STREAM_CATS = (*GPU_CATS, "cuda_sync")
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
    ext_id, and for a stream's waits (cuda_sync) wait_stream and wait_corr: the stream and the
    cudaEventRecord call it waits on (-1 where absent)."""
    comm_args: pd.DataFrame = field(default_factory=pd.DataFrame)
    """Collective metadata by event row (index = row of ``events``)."""
    world_size: int | None = None
    backend: str | None = None
    device: dict[str, Any] = field(default_factory=dict)
    """deviceProperties[0] when present (name, totalGlobalMem, ...)."""
    repairs: list[str] = field(default_factory=list)
    """What was repaired or dropped while reading (invalid UTF-8, impossible times, ...): a result
    built on this trace says so."""
    memo: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    """What an analyzer computed once of this trace, for its other windows (by the analyzer's name)."""

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
_RANK_FOLDER = re.compile(r"^rank(0|[1-9]\d*)$")


def _read_bytes(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise TraceError(f"{path}: cannot be read or is truncated ({e})") from None
    return raw


def read_json(path: Path) -> Any:
    """Parse a (gzipped) JSON file; a damaged one raises TraceError naming the file. Invalid UTF-8
    is replaced (U+FFFD)."""
    return _parse_json(path, _read_bytes(path))[0]


def _parse_json(path: Path, raw: bytes) -> tuple[Any, list[str]]:
    """The parsed document and what had to be repaired to parse it."""
    try:
        return orjson.loads(raw), []
    except orjson.JSONDecodeError as e:
        error = e
    if "UTF-8" in str(error):  # one bad byte in a kernel name must not cost the whole trace
        text = raw.decode("utf-8", errors="replace")
        bad = text.count("\ufffd") - raw.count("\ufffd".encode())
        try:
            return orjson.loads(text), [f"{path}: {bad} invalid UTF-8 sequence(s) replaced"]
        except orjson.JSONDecodeError as e:
            error = e
    raise TraceError(f"{path}: not valid JSON ({error}); the file is truncated or not a trace") from None


_INT64 = (-(2**63), 2**63)


def _int64(values: Iterator[Any] | list[Any], n: int) -> tuple[np.ndarray, int]:
    """Integers as int64; a value outside int64 (a damaged id) becomes -1. Returns the count of those."""
    values = list(values)
    try:
        return np.fromiter(values, dtype=np.int64, count=n), 0
    except OverflowError:
        clean = [v if _INT64[0] <= v < _INT64[1] else -1 for v in values]
        return np.asarray(clean, dtype=np.int64), sum(1 for v in values if not _INT64[0] <= v < _INT64[1])


# The fields read from each event; msgspec skips the other keys without building them, and is
# ~4x faster than a dict per event from orjson (0.15 s for the 54 MB, 216k-event HTA fixture).
class _Args(msgspec.Struct, gc=False, frozen=True):
    stream: int | str = -1  # ROCm runtime calls write "0x0"
    correlation: int = -1
    ext_id: int = msgspec.field(default=-1, name="External id")
    collective: Any = msgspec.field(default=None, name="Collective name")
    in_nelems: Any = msgspec.field(default=None, name="In msg nelems")
    out_nelems: Any = msgspec.field(default=None, name="Out msg nelems")
    dtype: Any = None
    group_size: Any = msgspec.field(default=None, name="Group size")
    pg_name: Any = msgspec.field(default=None, name="Process Group Name")
    pg_ranks: Any = msgspec.field(default=None, name="Process Group Ranks")
    wait_stream: Any = msgspec.field(default=None, name="wait_on_stream")
    wait_corr: Any = msgspec.field(default=None, name="wait_on_cuda_event_record_corr_id")


_NO_ARGS = _Args()


class _Event(msgspec.Struct, gc=False):
    ph: str = ""
    cat: str = ""
    name: str = ""
    pid: int | str = ""
    tid: int | str = ""
    ts: float | None = None
    dur: float | None = None
    args: _Args = _NO_ARGS


class _Document(msgspec.Struct, gc=False):
    traceEvents: list[_Event] = []  # noqa: N815 (Kineto's key)
    distributedInfo: Any = None  # noqa: N815
    baseTimeNanoseconds: Any = None  # noqa: N815
    deviceProperties: Any = None  # noqa: N815


_DECODE_EVENTS = msgspec.json.Decoder(list[_Event]).decode
_DECODE_DOCUMENT = msgspec.json.Decoder(_Document).decode


class _Interner:
    """Factorizes values into int codes with a dict (pandas' factorizing of 100k long kernel names
    takes most of a second); categories are made once each."""

    def __init__(self) -> None:
        self.table: dict[Any, int] = {}
        self.codes: list[np.ndarray] = []

    def add(self, values: list[Any]) -> None:
        table = self.table
        for v in dict.fromkeys(values):  # distinct values, first-seen order; C-speed loops only
            if v not in table:
                table[v] = len(table)
        self.codes.append(np.fromiter(map(table.__getitem__, values), dtype=np.int32, count=len(values)))

    def categorical(self) -> pd.Categorical:
        cats = [str(k) for k in self.table]
        codes = np.concatenate(self.codes) if self.codes else np.zeros(0, dtype=np.int32)
        if len(set(cats)) != len(cats):  # "7" and 7 as tids: merge them
            return pd.Categorical(np.asarray(cats, dtype=object)[codes])
        return pd.Categorical.from_codes(codes, categories=pd.Index(cats, dtype=object))


_TS, _DUR = attrgetter("ts"), attrgetter("dur")
_WAITS = ("wait_stream", "wait_corr")
_CORRELATION, _EXT_ID = attrgetter("args.correlation"), attrgetter("args.ext_id")


def _id(value: Any) -> int:
    """An id read from an event's args: an int64, else -1."""
    return value if isinstance(value, int) and _INT64[0] <= value < _INT64[1] else -1


@dataclass
class _Columns:
    """Columns of complete events, built block by block."""

    interners: list[_Interner] = field(default_factory=lambda: [_Interner() for _ in range(4)])
    arrays: dict[str, list[np.ndarray]] = field(
        default_factory=lambda: {k: [] for k in ("ts", "dur", "stream", "correlation", "ext_id", *_WAITS)}
    )
    comm_rows: dict[int, dict[str, Any]] = field(default_factory=dict)
    n: int = 0
    bad_ints: int = 0

    def add(self, events: list[_Event]) -> None:
        xs = [
            e for e in events if e.ph == "X" and e.ts is not None and e.dur is not None and e.cat != "Trace"
        ]
        if not xs:
            return
        n = len(xs)
        cat, name, pid, tid = self.interners
        cats = [e.cat for e in xs]
        cat.add(cats)
        name.add([e.name for e in xs])
        pid.add([e.pid for e in xs])
        tid.add([e.tid for e in xs])
        a = self.arrays
        for key, get in (("ts", _TS), ("dur", _DUR)):
            a[key].append(np.fromiter(map(get, xs), dtype=np.float64, count=n))
        for key, get in (("correlation", _CORRELATION), ("ext_id", _EXT_ID)):
            ids, bad = _int64(map(get, xs), n)
            a[key].append(ids)
            self.bad_ints += bad
        stream = np.full(n, -1, dtype=np.int64)
        gpu = np.flatnonzero(np.fromiter((c in STREAM_CATS for c in cats), dtype=bool, count=n))
        stream[gpu] = [s if isinstance(s := xs[i].args.stream, int) else -1 for i in gpu.tolist()]
        a["stream"].append(stream)
        # what a stream waits on (cuda_sync events): the stream and cudaEventRecord it waits for
        sync = [i for i, c in enumerate(cats) if c == "cuda_sync"]
        for key in _WAITS:
            waits = np.full(n, -1, dtype=np.int64)
            waits[sync] = [_id(getattr(xs[i].args, key)) for i in sync]
            a[key].append(waits)
        for i, e in enumerate(xs):
            if e.args.collective is not None or e.name == "record_param_comms":
                self.comm_rows[self.n + i] = {k: getattr(e.args, k) for k in COMM_ARGS.values()}
        self.n += n

    def columns(self) -> dict[str, Any]:
        cat, name, pid, tid = (i.categorical() for i in self.interners)
        arrays = {
            k: np.concatenate(v) if v else np.zeros(0, dtype=np.float64 if k in ("ts", "dur") else np.int64)
            for k, v in self.arrays.items()
        }
        return {"cat": cat, "name": name, "pid": pid, "tid": tid, **arrays}


_CHUNK = 2 << 20


def _blocks(path: Path) -> Iterator[bytes]:
    """The file's (decompressed) bytes in blocks of about 2 MiB; a gzip file of several members
    (``cat a.gz b.gz``, pigz, bgzip) is read through all of them, as gzip itself does."""
    with open(path, "rb") as f:
        gz = f.read(2) == b"\x1f\x8b"
        f.seek(0)
        if not gz:
            while block := f.read(_CHUNK):
                yield block
            return
        inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)
        while block := f.read(1 << 16):
            while block:
                yield inflate.decompress(block)
                if not inflate.eof:
                    break
                block = inflate.unused_data  # the next member begins here
                inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)
        yield inflate.flush()


def _event_start(text: bytearray) -> int:
    """Offset of the last event in ``text`` that begins with ``{ "ph":`` (Kineto writes "ph"
    first), or -1."""
    cut = text.rfind(b'"ph":')  # with a space (Kineto) or without (compact JSON writers)
    if cut <= 0:
        return -1
    brace = text.rfind(b"{", 0, cut)
    return brace if brace >= 0 and not text[brace + 1 : cut].strip() else -1


def _decode_events(buf: bytearray, out: _Columns) -> bool:
    """Decode the whole events of ``buf`` (which begins with "[") and keep only the last,
    possibly incomplete one, behind a new "["; False if ``buf`` is not laid out as expected."""
    start = _event_start(buf)
    if start < 0:
        return True
    comma = start - 1
    while comma > 0 and buf[comma] in b" \t\r\n":
        comma -= 1
    if comma == 0:  # no whole event yet
        return True
    if buf[comma] != ord(","):
        return False
    buf[comma] = ord("]")
    with memoryview(buf) as view, view[: comma + 1] as events:
        out.add(_DECODE_EVENTS(events))
    del buf[: start - 1]
    buf[0] = ord("[")
    return True


def _fast_load(path: Path) -> tuple[dict[str, Any], dict[int, dict[str, Any]], dict[str, Any]] | None:
    """Columns, collective args and top-level fields of a trace whose events begin with "ph" (as
    Kineto writes them), decoded about 2 MiB at a time, cut between events, so that memory never
    holds the whole text or every event at once; None for any other layout, damage or surprise,
    which the strict parser then judges."""
    out = _Columns()
    head: _Document | None = None
    buf = bytearray()
    try:
        for block in _blocks(path):
            buf += block
            if len(buf) < _CHUNK:
                continue
            if head is None:
                key = buf.find(b'"traceEvents"')
                bracket = buf.find(b"[", key) if key >= 0 else -1
                if bracket < 0:
                    continue
                head = _DECODE_DOCUMENT(bytes(buf[: bracket + 1]) + b"]}")
                del buf[:bracket]
            if not _decode_events(buf, out):
                return None
        if head is None:
            key = buf.find(b'"traceEvents"')
            bracket = buf.find(b"[", key) if key >= 0 else -1
            if bracket < 0:
                return None
            head = _DECODE_DOCUMENT(bytes(buf[: bracket + 1]) + b"]}")
            del buf[:bracket]
        tail = _DECODE_DOCUMENT(b'{"traceEvents": ' + bytes(buf))
    except (OSError, EOFError, zlib.error, msgspec.DecodeError, UnicodeDecodeError):
        return None
    out.add(tail.traceEvents)
    meta = {
        key: getattr(head, key) if getattr(head, key) is not None else getattr(tail, key)
        for key in ("distributedInfo", "baseTimeNanoseconds", "deviceProperties")
    }
    meta["bad_ints"] = out.bad_ints
    return out.columns(), out.comm_rows, meta


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
    waits: dict[str, list[int]] = {k: [] for k in _WAITS}
    comm_rows: dict[int, dict[str, Any]] = {}
    for e in events:
        if not isinstance(e, dict) or e.get("ph") != "X":
            continue
        cat = e.get("cat") or ""
        if cat == "Trace":
            continue
        # a time that is not a number is an impossible time: counted where those are dropped
        t, d = e.get("ts"), e.get("dur")
        t = t if isinstance(t, int | float) else math.nan
        d = d if isinstance(d, int | float) else math.nan
        name = e.get("name") or ""
        args = e.get("args") or {}
        i = len(names)
        names.append(name)
        cats.append(cat)
        pids.append(str(e.get("pid")))
        tids.append(str(e.get("tid")))
        ts.append(t)
        durs.append(d)
        streams.append(_id(args.get("stream")) if cat in STREAM_CATS else -1)
        corrs.append(_id(args.get("correlation")))
        ext.append(_id(args.get("External id")))
        sync = cat == "cuda_sync"
        waits["wait_stream"].append(_id(args.get("wait_on_stream")) if sync else -1)
        waits["wait_corr"].append(_id(args.get("wait_on_cuda_event_record_corr_id")) if sync else -1)
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
        **{k: np.asarray(v, dtype=np.int64) for k, v in waits.items()},
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


def _us_to_ns(us: np.ndarray) -> np.ndarray:
    """Microseconds to int64 nanoseconds without losing whole microseconds: Kineto's epoch
    timestamps (~1.7e15 us) times 1e3 exceed float64's exact integers (spacing 256 ns there), so the
    whole and fractional parts are converted apart."""
    whole = np.floor(us)
    return whole.astype(np.int64) * 1000 + np.rint((us - whole) * 1e3).astype(np.int64)


def base_ns(value: Any, path: Path, repairs: list[str]) -> int:
    """baseTimeNanoseconds as an int; a damaged one is left out (times stay relative)."""
    try:
        base = int(value or 0)
    except (TypeError, ValueError):
        base = -1
    if not 0 <= base < 2**62:
        repairs.append(f"{path}: baseTimeNanoseconds {value!r} is impossible; times kept relative")
        return 0
    return base


def plausible_times(ts_us: np.ndarray, dur_us: np.ndarray) -> np.ndarray:
    """Events whose times can be real: finite, non-negative durations, and within the trace's span
    (a damaged duration of 2^64 would otherwise put every percentage off by orders of magnitude)."""
    ok = np.isfinite(ts_us) & np.isfinite(dur_us) & (dur_us >= 0) & (np.abs(ts_us) < 4e15) & (dur_us < 4e15)
    if ok.sum() >= 10:
        start, end = ts_us[ok], ts_us[ok] + dur_us[ok]
        lo, hi = np.quantile(start, 0.01), np.quantile(end, 0.99)
        margin = max(hi - lo, 1e6)  # the bulk of the events' span, at least a second
        ok &= (ts_us >= lo - margin) & (ts_us + dur_us <= hi + margin)
    return ok


def load_trace(path: Path, rank: int | None = None) -> Trace:
    _release_large_buffers()
    repairs: list[str] = []
    fast = _fast_load(path)
    if fast is not None:
        cols, comm_rows, meta = fast
        info = meta["distributedInfo"] or {}
        base = base_ns(meta["baseTimeNanoseconds"], path, repairs)
        props = meta["deviceProperties"] or []
        if meta["bad_ints"]:
            repairs.append(f"{path}: {meta['bad_ints']} event id(s) outside int64 ignored")
    else:
        raw = _read_bytes(path)
        data, notes = _parse_json(path, raw)
        repairs += notes
        del raw
        if not isinstance(data, dict) or not isinstance(data.get("traceEvents"), list):
            raise TraceError(f"{path}: not a Kineto trace (no traceEvents list)")
        cols, comm_rows = _dict_events(data["traceEvents"])
        info = data.get("distributedInfo") or {}
        base = base_ns(data.get("baseTimeNanoseconds"), path, repairs)
        props = data.get("deviceProperties") or []
    if not isinstance(info, dict):
        info = {}
    if rank is None:
        rank = info.get("rank") if isinstance(info.get("rank"), int) else None
    if rank is None:
        # the file's name (rank3.json), else its folder's as a run directory lays it out
        # (rank1/trace.json.gz: taken for rank 0 it had been "also rank 0" and dropped)
        m = _RANK_IN_NAME.search(path.name) or _RANK_FOLDER.match(path.parent.name)
        rank = int(m.group(1)) if m else 0
    if not len(cols["name"]):
        raise TraceError(f"{path}: holds no complete events; nothing to analyze")
    ok = plausible_times(cols["ts"], cols["dur"])
    dropped = int((~ok).sum())
    if dropped:
        repairs.append(f"{path}: {dropped} event(s) with impossible times dropped")
        if not ok.any():
            raise TraceError(f"{path}: no event has a possible time; the trace is damaged")
    keep: Any = ok if dropped else slice(None)  # a view when nothing was dropped
    ts_ns = _us_to_ns(cols["ts"][keep]) + base
    dur_ns = np.rint(cols["dur"][keep] * 1e3).astype(np.int64)
    events = pd.DataFrame(
        {
            "name": _categorical(cols["name"])[keep],
            "cat": _categorical(cols["cat"])[keep],
            "pid": _categorical(cols["pid"])[keep],
            "tid": _categorical(cols["tid"])[keep],
            "ts": ts_ns,
            "dur": dur_ns,
            "end": ts_ns + dur_ns,
            "stream": cols["stream"][keep],
            "correlation": cols["correlation"][keep],
            "ext_id": cols["ext_id"][keep],
            "wait_stream": cols["wait_stream"][keep],
            "wait_corr": cols["wait_corr"][keep],
        }
    )
    if dropped:  # collective args are keyed by event row: renumber them
        new_row = {int(r): i for i, r in enumerate(np.flatnonzero(ok))}
        comm_rows = {new_row[r]: v for r, v in comm_rows.items() if r in new_row}
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
        repairs=repairs,
    )
