"""Declared schemas of the per-rank tables and their on-disk form.

While a rank runs, each table is a JSON-lines file, one object per row, appended and flushed to
the OS at every step end: a rank killed with SIGKILL leaves every completed step readable, and at
most the last line half-written, which the reader drops (and says so). Loading checks each row
against the table's declared columns.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import orjson

from perfkit.errors import RunDirError

if TYPE_CHECKING:
    import pandas as pd


def loads(text: str | bytes) -> Any:
    """``json.loads`` that reads nesting too deep for the parser as the damage it is: a
    ``json.JSONDecodeError`` (so every reader's handler for a damaged file applies), never a
    RecursionError traceback (100,000 nested brackets in a record or a table row)."""
    try:
        return json.loads(text)
    except RecursionError:
        raise json.JSONDecodeError("nested too deeply", "", 0) from None


_LONGEST_S = 30 * 86400.0
"""No duration in a table is longer than a month, nor negative."""

_KINDS: dict[str, tuple[type, ...]] = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,)}


@dataclass(frozen=True)
class Table:
    name: str
    """File stem inside rank<N>/: ``<name>.jsonl``."""
    columns: dict[str, str]
    """Column name to kind (int, float, str, bool). Columns after ``required`` may be null."""
    required: tuple[str, ...]
    nan_ok: tuple[str, ...] = ()
    """Float columns where NaN or infinity is a real value (a diverged loss), not damage."""


STEPS = Table(
    "steps",
    {
        "step": "int",
        "start_ns": "int",
        "end_ns": "int",
        "data_wait_s": "float",
        "forward_s": "float",
        "backward_s": "float",
        "optimizer_s": "float",
        "step_time_s": "float",
        "tokens": "int",
        "loss": "float",
        "perfkit_s": "float",
    },
    required=("step", "start_ns", "end_ns", "step_time_s"),
)
COMMS = Table(
    "comms",
    {
        "step": "int",
        "seq": "int",
        "op": "str",
        "source": "str",
        "group": "str",
        "group_ranks": "str",
        "group_size": "int",
        "bytes": "int",
        "dtype": "str",
        "start_ns": "int",
        "end_ns": "int",
        "gpu_ms": "float",
        "caller": "str",
        "blocking": "bool",
    },
    required=("step", "seq", "op", "bytes", "start_ns"),
)
IO = Table(
    "io",
    {"step": "int", "kind": "str", "bytes": "int", "latency_s": "float", "start_ns": "int", "path": "str"},
    required=("kind", "latency_s", "start_ns"),
)
MEMORY = Table(
    "memory",
    {
        "step": "int",
        "device": "str",
        "allocated": "int",
        "reserved": "int",
        "peak_allocated": "int",
        "inactive_split": "int",
        "alloc_retries": "int",
        "ooms": "int",
        "rss": "int",
    },
    required=("step", "device", "rss"),
)
NVML = Table(
    "nvml",
    {
        "t_ns": "int",
        "gpu": "int",
        "gpu_util": "float",
        "mem_util": "float",
        "mem_used_mb": "float",
        "sm_clock_mhz": "float",
        "mem_clock_mhz": "float",
        "power_w": "float",
        "temp_c": "float",
        "pcie_tx_kbs": "float",
        "pcie_rx_kbs": "float",
        "throttle_reasons": "int",
        "xid": "int",
        "ecc_uncorrected": "int",
        "pcie_replay": "int",
        "nvlink_replay": "int",
    },
    required=("t_ns", "gpu"),
)
"""GPU health beside the counters: ``throttle_reasons`` NVML's clocks-event reasons bitmask, ``xid``
an XID error reported since the sample before (else 0), and running totals of uncorrectable ECC
errors and PCIe and NVLink replays (a growing one is the fault)."""
CPU = Table(
    "cpu",
    {"step": "int", "cpu_s": "float", "wall_s": "float", "host_busy": "float", "runq_wait_s": "float"},
    required=("step", "cpu_s", "wall_s"),
)
TRAIN_LOG = Table(
    "train_log",
    {
        "step": "int",
        "loss": "float",
        "tokens": "int",
        "step_time_s": "float",
        "tokens_per_s": "float",
        "lr": "float",
        "grad_norm": "float",
        "mfu": "float",
        "peak_memory_bytes": "int",
    },
    required=("step", "tokens", "step_time_s"),
    nan_ok=("loss", "grad_norm", "tokens_per_s"),
)
"""The bundled trainer's own log (``--log-json``; the run's train_log.jsonl): a record every
``log_every`` steps, ``step_time_s`` the mean since the previous one; ``mfu`` per GPU where a peak is
known; ``peak_memory_bytes`` (the busiest rank's) with the last. The optimizer decides from it."""


class RowWriter:
    """Buffers rows in memory and appends them to a JSON-lines file at each ``flush()``.

    A write that fails (a full disk) keeps the rows for the next flush, up to ``MAX_HELD`` of them
    (the oldest beyond that are counted in ``lost``); ``error`` says what failed first. A flush that
    succeeds after the disk was freed writes what was held: nothing already collected is lost early."""

    MAX_HELD = 100_000

    def __init__(self, path: Path, max_bytes: int = 0, older: Path | None = None) -> None:
        self.path = path
        self.max_bytes = max_bytes
        """With a bound (``--watch``): once the file holds half of it, it is renamed to ``older``
        (``RunLayout.rotated``, replacing the part before) and a new file started, so the table never
        holds more than ``max_bytes`` on disk, and always the latest rows."""
        self.older = older
        self.rotations = 0
        self._rows: list[bytes] = []
        self._file: BinaryIO | None = None
        self._lock = threading.Lock()  # rows also arrive from completion callbacks and samplers
        self._size = 0  # bytes in the file that end at a line boundary
        self.error = ""
        self.lost = 0

    def add(self, row: dict[str, Any]) -> None:
        line = orjson.dumps(row, option=orjson.OPT_SERIALIZE_NUMPY)
        with self._lock:
            self._rows.append(line)

    def flush(self) -> None:
        """Raises the OSError of a failed write (after keeping its rows)."""
        with self._lock:
            rows, self._rows = self._rows, []
        if not rows:
            return
        data = b"\n".join(rows) + b"\n"
        try:
            if self._file is None:
                self._file = open(self.path, "ab")  # noqa: SIM115 - kept open for the run's length
                self._size = os.fstat(self._file.fileno()).st_size
            self._file.write(data)
            self._file.flush()
            self._size += len(data)
            if self.max_bytes and self.older and self._size >= self.max_bytes // 2:
                self._rotate()
        except OSError as e:
            self._hold(rows, e)
            raise

    def _rotate(self) -> None:
        assert self._file is not None
        self._file.close()
        self._file = None
        assert self.older is not None
        os.replace(self.path, self.older)  # a reader sees either file whole; rows end at line boundaries
        self._size = 0
        self.rotations += 1

    def _hold(self, rows: list[bytes], e: OSError) -> None:
        self.error = self.error or f"cannot write {self.path.name}: {e.strerror or e}"
        if self._file is not None:  # part of the rows may be in: start again at a line boundary
            with contextlib.suppress(OSError):
                self._file.close()  # its buffer is lost with it: those rows are held below
            self._file = None
            with contextlib.suppress(OSError):
                os.truncate(self.path, self._size)
        with self._lock:
            self._rows[:0] = rows
            over = len(self._rows) - self.MAX_HELD
            if over > 0:
                del self._rows[:over]
                self.lost += over

    def close(self) -> None:
        try:
            self.flush()
        finally:
            if self._file is not None:
                with contextlib.suppress(OSError):
                    self._file.close()
                self._file = None


class Tail:
    """The complete rows appended to one table file since the last read, across its rotation by
    ``RowWriter`` (the rest of the part that turned over is read before the new file)."""

    def __init__(self, path: Path, older: Path) -> None:
        self.path = path
        self.older = older
        """Where the file goes when it turns over (``RunLayout.rotated``)."""
        self.inode: int | None = None
        self.offset = 0
        self.missed = 0
        """Rotations this reader missed whole (the file turned over twice between two reads)."""

    def read(self) -> list[dict[str, Any]]:
        try:
            st = os.stat(self.path)
        except OSError:
            return []
        chunks = []
        if self.inode is not None and st.st_ino != self.inode:
            with contextlib.suppress(OSError), open(self.older, "rb") as f:
                if os.fstat(f.fileno()).st_ino == self.inode:  # the rest of the part just rotated
                    f.seek(self.offset)
                    chunks.append(f.read())
                else:
                    self.missed += 1
            self.offset = 0
        self.inode = st.st_ino
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except OSError:
            data = b""
        complete = data[: data.rfind(b"\n") + 1]
        self.offset += len(complete)
        chunks.append(complete)
        rows = []
        for line in b"".join(chunks).split(b"\n"):
            if line.strip():
                with contextlib.suppress(ValueError):
                    rows.append(orjson.loads(line))
        return rows


def read_table(path: Path, table: Table, drop_bad_rows: bool = False) -> tuple[pd.DataFrame, list[str]]:
    """Load one table file. Returns the rows and notes on what was dropped (a half-written last line).

    A row that is not a JSON object, lacks a required column or has a value of the wrong kind makes
    the file unusable: a RunDirError names the file and the line. With ``drop_bad_rows`` (analysis
    of a possibly damaged run) such rows are dropped instead, counted in one note, and the rest kept."""
    rows, notes = read_rows(path, table, drop_bad_rows)
    import pandas as pd  # only readers need it: the CLI's start-up and the ranks' collectors do not

    frame = pd.DataFrame(rows, columns=list(dict.fromkeys([*table.columns, *(k for r in rows for k in r)])))
    return frame, notes


def read_rows(
    path: Path, table: Table, drop_bad_rows: bool = False
) -> tuple[list[dict[str, Any]], list[str]]:
    """``read_table``'s rows as checked dicts, without pandas."""
    notes: list[str] = []
    rows: list[dict[str, Any]] = []
    bad: list[str] = []
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise RunDirError(f"{path}: cannot be read ({e.strerror})") from None
    lines = raw.decode("utf-8", errors="replace" if drop_bad_rows else "strict").split("\n") if raw else []
    last = len(lines) - 1
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = _check_row(line, table, f"{path}:{i + 1}", half_written=i == last)
        except RunDirError as e:
            if not drop_bad_rows:
                raise
            bad.append(str(e))
            continue
        if row is None:
            notes.append(f"{path}: dropped a half-written last line (the rank was killed)")
            continue
        rows.append(row)
    if bad:
        notes.append(f"{len(bad)} damaged row(s) dropped; first: {bad[0]}")
    return rows, notes


def _check_row(line: str, table: Table, where: str, half_written: bool) -> dict[str, Any] | None:
    """One row, checked against the table's schema; None for a half-written last line."""
    try:
        row = loads(line)
    except json.JSONDecodeError:
        if half_written:  # no newline after it: the writer was killed mid-line
            return None
        raise RunDirError(f"{where}: not valid JSON; the file is damaged") from None
    if not isinstance(row, dict):
        raise RunDirError(f"{where}: a row must be a JSON object")
    for col in table.required:
        if row.get(col) is None:
            raise RunDirError(f"{where}: missing required column {col!r} of table {table.name}")
    for col, value in row.items():
        if value is None:
            continue
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if (
            number
            and col.endswith(("_s", "_ms"))
            and not 0 <= value <= _LONGEST_S * (1000 if col.endswith("_ms") else 1)
        ):
            # a step of -5 s or 1e308 s had given phase shares of -16.7% and a whatif of -70 ms
            raise RunDirError(f"{where}: column {col!r} is {value!r}, not a possible duration")
        kind = table.columns.get(col)
        if kind is None:
            continue
        if not isinstance(value, _KINDS[kind]) or (kind != "bool" and isinstance(value, bool)):
            raise RunDirError(f"{where}: column {col!r} should be {kind}, got {value!r}")
        if isinstance(value, float) and not math.isfinite(value) and col not in table.nan_ok:
            raise RunDirError(f"{where}: column {col!r} is {value!r}, not a finite number")
        if isinstance(value, int) and not -(2**63) <= value < 2**63:
            raise RunDirError(f"{where}: column {col!r} is {value!r}, outside int64")
    return row
