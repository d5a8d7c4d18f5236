"""PyTorch flight-recorder dumps: the per-rank records torch keeps of its last collectives and dumps
on a NCCL timeout (``TORCH_FR_BUFFER_SIZE``/``TORCH_NCCL_TRACE_BUFFER_SIZE``, files
``<TORCH_FR_DUMP_TEMP_FILE><rank>``; or ``torch._C._distributed_c10d._dump_fr_trace()``), as pickles
(loaded with the plain-data unpickler) or JSON. Read into the same per-rank states as perfkit's own
hang records, so the hang, desync and first-failure rules apply to them unchanged.

Layout, as torch 2.13 writes it: ``version``, ``pg_config``, ``pg_status`` (per process group id:
``last_enqueued_collective``, ``last_completed_collective``), ``entries`` (``collective_seq_id``,
``process_group`` (name, description), ``profiling_name`` ("nccl:all_reduce"), ``input_sizes``,
``input_dtypes``, ``state``, ``frames`` innermost first). On gloo the entries stay "scheduled":
``pg_status`` says what completed. Its JSON dumps (``_dump_fr_trace_json``) sort the keys and write
the sequence numbers of ``pg_status`` as strings (``"3"``); pickles of any protocol and gzipped
files are read alike.
"""

from __future__ import annotations

import gzip
import io
import math
import re
import zlib
from pathlib import Path
from typing import Any

from perfkit.analyzers.hangs import HangMetrics, RankState, _match
from perfkit.analyzers.memory import _PlainData
from perfkit.analyzers.trace import TraceError

from perfkit.frames import user_frame
from perfkit.tables import loads

_ELEMENT = {"Float": 4, "Half": 2, "BFloat16": 2, "Double": 8, "Long": 8, "Int": 4, "Short": 2, "Byte": 1,
            "Char": 1, "Bool": 1, "Float8_e4m3fn": 1, "Float8_e5m2": 1}  # fmt: skip
_TRAILING_DIGITS = re.compile(r"(\d+)(?:\.\w+)?$")


# Words a dump's first 4 KB hold, whatever the order of its keys (torch's JSON sorts them, so
# pg_status comes after a long entries list; its pickles keep version, pg_config, pg_status, entries).
_DUMP_WORDS = (b"entries", b"pg_status", b"pg_config", b"collective_seq_id", b"profiling_name")
_SNAPSHOT_WORDS = (b"segments", b"device_traces")  # a CUDA allocator snapshot, not a dump


def _head(path: Path, n: int = 4096) -> bytes:
    with open(path, "rb") as f:
        head = f.read(n)
    if head[:2] == b"\x1f\x8b":  # gzipped
        with gzip.open(path, "rb") as g:
            head = g.read(n)
    return head


def looks_like_dump(path: Path) -> bool:
    """A pickle (any protocol) or a JSON object, gzipped or not, that holds flight-recorder entries."""
    try:
        head = _head(path)
    except (OSError, EOFError, zlib.error):
        return False
    words = sum(w in head for w in _DUMP_WORDS)
    if head[:1] == b"{":
        return b'"entries"' in head and words >= 2
    pickled = head[:1] == b"\x80" or head[:1] in (b"(", b"}")  # protocol 2+, or 0/1 (a dict: "(dp0", "}q")
    return pickled and words >= 1 and not any(w in head for w in _SNAPSHOT_WORDS)


def load_dump(path: Path) -> dict[str, Any]:
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
        data = loads(raw) if raw[:1] == b"{" else _PlainData(io.BytesIO(raw)).load()
    except Exception as e:  # a damaged dump is that file's problem, in one line
        raise TraceError(f"{path}: not a readable flight-recorder dump ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("entries"), list):
        raise TraceError(f"{path}: not a flight-recorder dump (no entries list)")
    return data


def _int(value: Any) -> int | None:
    """An int, or the decimal string torch's JSON dumps write for one (``"3"``)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    return None


def _bytes(entry: dict[str, Any]) -> int:
    sizes, dtypes = entry.get("input_sizes") or [], entry.get("input_dtypes") or []
    total = 0
    for shape, dtype in zip(sizes, dtypes, strict=False):
        if isinstance(shape, list) and all(isinstance(n, int) for n in shape):
            total += math.prod(shape) * _ELEMENT.get(str(dtype), 4)
    return total


def _state(rank: int, data: dict[str, Any]) -> RankState:
    status = data.get("pg_status") if isinstance(data.get("pg_status"), dict) else {}
    entered: dict[str, int] = {}
    in_flight = []
    stuck_frames: list[dict[str, Any]] = []
    for e in data["entries"][-MAX_ENTRIES:]:
        if not isinstance(e, dict) or e.get("is_p2p") or not isinstance(e.get("collective_seq_id"), int):
            continue
        pg = e.get("process_group")
        group = str(pg[0]) if isinstance(pg, list | tuple) and pg else str(e.get("pg_id", ""))
        seq = e["collective_seq_id"]
        entered[group] = max(entered.get(group, 0), seq)
        pg_state = status.get(str(e.get("pg_id")), {}) if isinstance(status, dict) else {}
        done = _int(pg_state.get("last_completed_collective")) if isinstance(pg_state, dict) else None
        completed = seq <= done if done is not None else e.get("state") == "completed"
        if completed:
            continue
        in_flight.append(
            {
                "group": group,
                "seq": seq,
                "op": str(e.get("profiling_name", "")).split(":", 1)[-1],
                "bytes": _bytes(e),
                "dtype": str((e.get("input_dtypes") or [""])[0]).lower(),
                "state": e.get("state"),
            }
        )
        raw_frames = e.get("frames")
        frames: list[Any] = raw_frames if isinstance(raw_frames, list) else []
        stuck_frames = [
            {"file": f.get("filename"), "line": f.get("line"), "function": f.get("name")}
            for f in reversed(frames)  # the recorder writes the innermost frame first
            if isinstance(f, dict)
        ]
    return RankState(
        rank=rank,
        told_by="flight recorder",
        in_flight=in_flight,
        entered=entered,
        frame=user_frame(stuck_frames),
        stack=[f"{f['file']}:{f['line']} {f['function']}" for f in stuck_frames[-8:]],
    )


MAX_ENTRIES = 100_000
"""A flight recorder keeps its last N collectives (TORCH_FR_BUFFER_SIZE, 2000 by default); more in a
dump is damage or a crafted file (one entry repeated 2 million times had taken 3.5 GB): the last
ones are read, and the cut is said."""

MAX_RANK = 1 << 20
"""No job has more ranks: digits past this in a file name are something else (a date, a pid)."""


def _rank(data: dict[str, Any], path: Path, index: int, count: int) -> int:
    """The dump's rank: its own ``rank`` field, else the file name's trailing digits (torch names
    dumps ``<prefix><rank>``), else its place among the files. Digits that cannot be a rank (a date
    in ``fr_trace_20240601.pickle``) are not taken for one."""
    own = _int(data.get("rank"))
    if own is not None and 0 <= own < MAX_RANK:
        return own
    m = _TRAILING_DIGITS.search(path.name)
    if m and int(m.group(1)) < max(MAX_RANK // 16, count):
        return int(m.group(1))
    return index


def dumps_hang_metrics(paths: list[Path], problems: list[str]) -> HangMetrics:
    """The ranks' states from their dumps (rank from the file name's trailing digits, else its
    order), matched by (group, sequence number)."""
    states: list[RankState] = []
    claimed: dict[int, Path] = {}
    for i, path in enumerate(sorted(paths)):
        try:
            data = load_dump(path)
        except TraceError as e:
            problems.append(str(e))
            continue
        rank = _rank(data, path, i, len(paths))
        if rank in claimed:
            problems.append(
                f"{path}: claims rank {rank}, as {claimed[rank].name} does; left out (one dump a rank: name "
                "them by rank, as torch does, <prefix><rank>)"
            )
            continue
        claimed[rank] = path
        if len(data["entries"]) > MAX_ENTRIES:
            problems.append(
                f"{path}: {len(data['entries']):,} entries, more than a flight recorder keeps; the last "
                f"{MAX_ENTRIES:,} read"
            )
        states.append(_state(rank, data))
    if not states:
        raise TraceError(problems[0] if problems else "no flight-recorder dump could be read")
    h = HangMetrics(hung=any(s.in_flight for s in states), ranks=sorted(states, key=lambda s: s.rank))
    world = max(len(states), max(s.rank for s in states) + 1)
    _match(h, world)
    return h
