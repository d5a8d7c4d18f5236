"""watch: a long job's whole timeline in bounded disk, and the traces its watcher asks for.

On under ``--watch`` only. Each rank folds every ``--watch-window`` steps into one summary row
(median, p90 and max of the step, the median of each phase, the memory held): a week-long job's
timeline is a few MB, while the other tables keep only their latest rows (``RowWriter``'s bound). The
summary file has its own share of the disk budget; when it is full, neighbouring rows are merged in
pairs (a row then spans two windows: medians averaged, p90 and max the larger).

Captures: every rank traces the same steps with torch.profiler, written to
``rank<N>/captures/<id>.json.gz``:

- ``baseline``: early in every watched job (from the third window on), the healthy reference;
- one per request the watcher (``perfkit.watch``) or ``perfkit capture`` writes into the run's
  ``watch/requests``: each rank looks there a few times a second and traces the steps named, so no
  rank captures alone. A request for steps a rank has already begun is declined, and said.

The captures share their part of the disk budget: one that would not fit (its size estimated from
the ones before) is declined and said, and one that came out over it is removed.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

from perfkit.collectors.base import Collector, register

from perfkit.files import write_json_atomic
from perfkit.tables import RowWriter, Table, loads, read_rows

if TYPE_CHECKING:
    import pandas as pd
    from perfkit.collectors.probe import Probe

SUMMARY = Table(
    "summary",
    {
        "first_step": "int",
        "step": "int",
        "steps": "int",
        "start_ns": "int",
        "end_ns": "int",
        "step_ms_p50": "float",
        "step_ms_p90": "float",
        "step_ms_max": "float",
        "data_wait_ms_p50": "float",
        "forward_ms_p50": "float",
        "backward_ms_p50": "float",
        "optimizer_ms_p50": "float",
        "memory_bytes": "int",
    },
    required=("first_step", "step", "steps", "step_ms_p50"),
)
"""One row per window of steps (``step``: its last): the step time's median, p90 and max, each phase's
median, the most memory held (the CUDA allocator's, else the resident set)."""

POLL_S = 0.2
"""How often a rank looks for capture requests (a directory listing)."""
BASELINE_WINDOW = 2
"""The baseline capture starts with this window (0-based): after the warm-up, inside the detectors'
baseline (analyzers.watch)."""


@dataclass(kw_only=True)
class WatchRank:
    rank: int
    windows: int
    steps: int
    """Steps the summaries span."""


@dataclass(kw_only=True)
class WatchMetrics:
    window: int
    """Steps per window."""
    ranks: list[WatchRank] = field(default_factory=list)
    steps: int = 0
    """The last step any rank summarized."""


@dataclass
class _Capture:
    id: str
    first: int
    last: int
    reason: str = ""


@register
class WatchCollector(Collector):
    name = "watch"
    tables = (SUMMARY,)
    # The report draws the watched job's timeline in a section of its own (reports/sections.py), with
    # the anomalies and captures on it.

    def __init__(self) -> None:
        self._rows: list[dict[str, Any]] = []
        self._writer: RowWriter | None = None
        self._written = 0
        self._next_poll = 0.0
        self._seen: set[str] = set()
        self._queue: list[_Capture] = []
        self._prof: Any = None
        self._capturing: _Capture | None = None
        self._capture_bytes: dict[str, int] = {}
        self._said: dict[str, str] = {}
        """What became of each capture (written, declined and why), for probe.json."""

    @classmethod
    def fold(cls, frames: Mapping[str, pd.DataFrame], steps: pd.DataFrame) -> WatchMetrics | None:
        s = frames.get("summary")
        if s is None or s.empty:
            return None
        ranks = [
            WatchRank(rank=int(cast(Any, r)), windows=len(g), steps=int(g["steps"].sum()))
            for r, g in s.groupby("rank")
        ]
        window = int(s["steps"].median())
        return WatchMetrics(window=window, ranks=ranks, steps=int(s["step"].max()))

    def available(self, probe: Probe) -> str | None:
        return None if probe.options.watch else "not watching (perfkit profile --watch)"

    def start(self, probe: Probe) -> None:
        path = probe.layout.table(probe.rank, SUMMARY)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._writer = RowWriter(path)
        w, k = probe.options.watch_window, probe.options.capture_steps
        first = BASELINE_WINDOW * w + 1
        self._queue.append(_Capture("baseline", first, first + k - 1, "the healthy reference"))

    # ---- per step ---------------------------------------------------------------------------
    def step_begin(self, probe: Probe, step: int) -> None:
        if self._capturing is None and self._queue and self._queue[0].first == step:
            self._begin_capture(probe, self._queue.pop(0))

    def step_end(self, probe: Probe, step: int) -> None:
        c = self._capturing
        if c is not None and step >= c.last:
            self._end_capture(probe, c)
        now = time.monotonic()
        if now >= self._next_poll:
            self._next_poll = now + POLL_S
            self._poll(probe)

    def step_timed(self, probe: Probe, row: dict[str, Any]) -> None:
        self._rows.append(row)
        if row["step"] % probe.options.watch_window == 0:
            self._summarize(probe)

    def stop(self, probe: Probe) -> None:
        if self._capturing is not None:
            self._end_capture(probe, self._capturing)
        if self._rows:
            self._summarize(probe)
        if self._writer is not None:
            with contextlib.suppress(OSError):
                self._writer.close()

    def state(self) -> dict[str, Any]:
        return {"captures": dict(self._said)} if self._said else {}

    # ---- summaries --------------------------------------------------------------------------
    def _summarize(self, probe: Probe) -> None:
        rows, self._rows = self._rows, []
        times = sorted(r["step_time_s"] * 1e3 for r in rows)
        out: dict[str, Any] = {
            "first_step": rows[0]["step"],
            "step": rows[-1]["step"],
            "steps": len(rows),
            "start_ns": rows[0]["start_ns"],
            "end_ns": rows[-1]["end_ns"],
            "step_ms_p50": statistics.median(times),
            "step_ms_p90": times[min(len(times) - 1, int(0.9 * len(times)))],
            "step_ms_max": times[-1],
            "memory_bytes": _memory_held(),
        }
        for phase in ("data_wait", "forward", "backward", "optimizer"):
            values = [r[f"{phase}_s"] for r in rows if r.get(f"{phase}_s") is not None]
            if values:
                out[f"{phase}_ms_p50"] = statistics.median(values) * 1e3
        assert self._writer is not None
        self._writer.add(out)
        with contextlib.suppress(OSError):  # a full disk: held for the next window (RowWriter)
            self._writer.flush()
            self._written = self._writer.path.stat().st_size
        if self._written > probe.options.watch_bytes(probe.world_size, "summary"):
            self._compact()

    def _compact(self) -> None:
        """Merge neighbouring summary rows in pairs, in place (atomically)."""
        assert self._writer is not None
        path = self._writer.path
        self._writer.close()
        rows, _ = read_rows(path, SUMMARY, drop_bad_rows=True)
        merged = [_merge(rows[i : i + 2]) for i in range(0, len(rows), 2)]
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        import orjson

        tmp.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in merged))
        os.replace(tmp, path)
        self._writer = RowWriter(path)
        self._written = path.stat().st_size

    # ---- captures ---------------------------------------------------------------------------
    def _poll(self, probe: Probe) -> None:
        folder = probe.layout.capture_requests
        try:
            names = sorted(p.name for p in os.scandir(folder) if p.name.endswith(".json"))
        except OSError:
            return
        for name in names:
            cid = name.removesuffix(".json")
            if cid in self._seen:
                continue
            self._seen.add(cid)
            try:
                req = loads(probe.layout.capture_request(cid).read_bytes())
                first, steps = int(req["first_step"]), int(req.get("steps") or probe.options.capture_steps)
            except (OSError, ValueError, KeyError, TypeError):
                self._said[cid] = "declined: the request could not be read"
                continue
            if first <= probe.step:
                self._said[cid] = (
                    f"declined: step {first} had begun when the request arrived (rank at {probe.step})"
                )
                continue
            self._queue.append(_Capture(cid, first, first + steps - 1, str(req.get("reason", ""))))
            self._queue.sort(key=lambda c: c.first)
        self._said_to_probe(probe)

    def _fits(self, probe: Probe) -> bool:
        budget = probe.options.watch_bytes(probe.world_size, "captures")
        used = sum(self._capture_bytes.values())
        if not self._capture_bytes:
            return used < budget
        estimate = max(self._capture_bytes.values())
        return used + estimate <= budget

    def _begin_capture(self, probe: Probe, c: _Capture) -> None:
        if not self._fits(probe):
            self._said[c.id] = "declined: the --watch-budget has no room for another trace"
            self._said_to_probe(probe)
            return
        import torch
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(ProfilerActivity.CUDA)
        self._prof = profile(activities=activities)
        self._prof.start()
        self._capturing = c

    def _end_capture(self, probe: Probe, c: _Capture) -> None:
        prof, self._prof, self._capturing = self._prof, None, None
        final = probe.layout.capture_trace(probe.rank, c.id)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.with_name(f".{c.id}.{os.getpid()}.tmp.json.gz")
        try:
            prof.stop()
            prof.export_chrome_trace(str(tmp))
            os.replace(tmp, final)
        except Exception as e:  # a full disk: no half trace left (the job goes on)
            tmp.unlink(missing_ok=True)
            self._said[c.id] = f"failed: {type(e).__name__}: {e}"[:300]
            self._said_to_probe(probe)
            return
        size = final.stat().st_size
        budget = probe.options.watch_bytes(probe.world_size, "captures")
        if sum(self._capture_bytes.values()) + size > budget:
            final.unlink(missing_ok=True)
            self._said[c.id] = f"removed: its {size / 1e6:.1f} MB trace went over the --watch-budget"
        else:
            self._capture_bytes[c.id] = size
            self._said[c.id] = f"steps {c.first}-{c.last}, {size / 1e6:.1f} MB"
        self._said_to_probe(probe)

    def _said_to_probe(self, probe: Probe) -> None:
        with contextlib.suppress(OSError):
            write_json_atomic(
                probe.layout.capture_state(probe.rank),
                {"rank": probe.rank, "step": probe.step, "captures": self._said},
            )


def _merge(rows: list[dict[str, Any]]) -> dict[str, Any]:
    if len(rows) == 1:
        return rows[0]
    a, b = rows
    out = {
        "first_step": a["first_step"],
        "step": b["step"],
        "steps": a["steps"] + b["steps"],
        "start_ns": a.get("start_ns"),
        "end_ns": b.get("end_ns"),
        "step_ms_max": max(a.get("step_ms_max") or 0.0, b.get("step_ms_max") or 0.0),
        "step_ms_p90": max(a.get("step_ms_p90") or 0.0, b.get("step_ms_p90") or 0.0),
        "memory_bytes": max(a.get("memory_bytes") or 0, b.get("memory_bytes") or 0),
    }
    for key in ("step_ms_p50", "data_wait_ms_p50", "forward_ms_p50", "backward_ms_p50", "optimizer_ms_p50"):
        values = [r[key] for r in rows if r.get(key) is not None]
        if values:
            out[key] = sum(values) / len(values)
    return out


def _memory_held() -> int:
    """The CUDA allocator's bytes in use where CUDA runs, else the resident set."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return int(torch.cuda.memory_allocated())
    from perfkit.collectors.signals.memory import rss_bytes

    return rss_bytes()
