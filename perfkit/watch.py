"""The watcher of a ``perfkit profile --watch`` job: it follows every rank's tables as they are
written, judges each finished window with the detectors (``perfkit.analyzers.watch``), writes the
anomalies, asks every rank for a trace of the same next steps when one starts, diagnoses that
capture against the baseline one, and keeps ``watch/state.json`` for ``perfkit top``.

It runs in ``perfkit profile``'s own process (which otherwise only waits for the job), so the ranks
pay nothing for it but their tables' rows; ``perfkit top`` runs one that only reads. Files are
followed across their rotation (``RunLayout.rotated``): the rest of the older part is read before
the new file.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from pathlib import Path
from typing import Any

import orjson

from perfkit.collectors.options import CollectOptions
from perfkit.collectors.signals.gc import GC
from perfkit.files import write_json_atomic
from perfkit.run import RunLayout
from perfkit.tables import COMMS, MEMORY, NVML, STEPS, Table, Tail, loads

LEAD_S = 1.0
"""A capture starts this long ahead (in steps at the job's pace): every rank must see the request
before the first of its steps begins (they look five times a second)."""
WINDOW_S = 0.5
"""The detectors judge windows of at least this long (a whole number of ``--watch-window``s): at a
few ms a step, 50 steps are a blip of the host, not a change."""
MAX_CAPTURES = 8


class Watcher:
    """Follows a run directory; ``act``: write anomalies and capture requests (the job's own
    watcher), else only read (``perfkit top``)."""

    def __init__(self, run_dir: Path, options: CollectOptions, act: bool = True) -> None:
        from perfkit.analyzers.watch import Detectors

        self.layout = RunLayout(run_dir)
        self.options = options
        self.window = options.watch_window
        self.act = act
        self.detectors = Detectors()
        self.tables: tuple[Table, ...] = (STEPS, COMMS, MEMORY, NVML)
        self.tails: dict[tuple[int, str], Tail] = {}
        self.pending: dict[str, list[dict[str, Any]]] = {}
        self.last_step: dict[int, int] = {}
        self.recent: dict[int, dict[str, Any]] = {}
        self.cut = 1
        """The first step of the next window to judge."""
        self.span = self.window
        """Steps in the last judged window: ``--watch-window`` for the warm-up, then a whole number of
        them lasting ``WINDOW_S`` or more."""
        self.judged = 0
        self.lowest = 0
        self.world_size: int | None = None
        self.excluded: list[tuple[int, int]] = []
        k = options.capture_steps
        first = 2 * self.window + 1
        self.excluded.append((first, first + k))  # the baseline capture, and the step after it
        self.captures: list[dict[str, Any]] = []
        self.diagnosed: set[str] = set()
        self.nvml_before: dict[tuple[int, int], dict[str, float]] = {}
        self.health_seen: set[tuple[int, int, str]] = set()
        self.failed = False

    # ---- reading ----------------------------------------------------------------------------
    def _world(self) -> int | None:
        """The job's world size, once rank 0 said it; with it, each rank's memory capacity."""
        if self.world_size is None:
            with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                probe = loads(self.layout.probe(0).read_bytes())
                self.world_size = int(probe["world_size"])
                env = probe.get("env") or {}
                host = loads(self.layout.manifest.read_bytes()).get("env", {}).get("host_memory_bytes")
                local = max(1, int(env.get("local_world_size") or 1))
                cap = env.get("gpu_memory_bytes") or (int(host) // local if host else None)
                if cap:
                    self.detectors.capacity = dict.fromkeys(range(self.world_size), int(cap))
        return self.world_size

    def _read(self) -> None:
        for rank in self.layout.ranks():
            for table in (*self.tables, GC):
                key = (rank, table.name)
                if key not in self.tails:
                    path = self.layout.table(rank, table)
                    self.tails[key] = Tail(path, self.layout.rotated(path))
                rows = self.tails[key].read()
                for r in rows:
                    r["rank"] = rank
                if table is NVML:
                    self._health(rank, rows)
                    continue
                self.pending.setdefault(table.name, []).extend(rows)
                if table is STEPS and rows:
                    self.last_step[rank] = max(self.last_step.get(rank, 0), rows[-1]["step"])
                    self.recent[rank] = rows[-1]

    def _requests(self) -> None:
        """Captures asked for from outside (``perfkit capture``): diagnosed too, and their steps left
        out of the windows like the watcher's own."""
        folder = self.layout.capture_requests
        if not folder.is_dir():
            return
        known = {c["id"] for c in self.captures}
        for path in sorted(folder.glob("*.json")):
            if path.stem in known:
                continue
            with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                req = loads(path.read_bytes())
                first, steps = int(req["first_step"]), int(req["steps"])
                self.captures.append({**req, "last_step": first + steps - 1})
                self.excluded.append((first, first + steps))

    def poll(self) -> list[Any]:
        """Read what the ranks wrote since the last poll and judge every window now complete;
        returns the anomalies that started."""
        self._read()
        self._requests()
        world = self._world()
        started = []
        if world and len(self.last_step) >= world:
            self.lowest = min(self.last_step)
            done = min(self.last_step.values())
            while (last := self._window_end(done)) is not None:
                first, self.cut = self.cut, last + 1
                started += self._judge(first, last)
        if self.act:
            self._diagnose_captures()
            self._write_state()
        return started

    def _window_end(self, done: int) -> int | None:
        """The last step of the next window, once every rank finished it: the warm-up is one
        ``--watch-window``; after it, the fewest whole ``--watch-window``s that last ``WINDOW_S`` by
        the steps' own clock (a window in steps from the warm-up's pace was 0.2 s where start-up made
        its steps slow)."""
        if self.judged == 0:
            return self.cut + self.window - 1 if self.cut + self.window - 1 <= done else None
        times = {
            r["step"]: (r["start_ns"], r["end_ns"])
            for r in self.pending.get(STEPS.name, [])
            if r["rank"] == self.lowest
        }
        if self.cut not in times:
            return (
                self.cut + self.window - 1 if self.cut + self.window - 1 <= done else None
            )  # rows lost: judge what is there
        last = self.cut + self.window - 1
        while last <= done:
            if last in times and times[last][1] - times[self.cut][0] >= WINDOW_S * 1e9:
                return last
            last += self.window
        return None

    def _judge(self, first: int, last: int) -> list[Any]:
        import pandas as pd

        frames = {}
        for name in (STEPS.name, COMMS.name, MEMORY.name, GC.name):
            rows = self.pending.get(name, [])
            now = [r for r in rows if r.get("step") is not None and r["step"] <= last]
            self.pending[name] = [r for r in rows if r.get("step") is None or r["step"] > last]
            now = [r for r in now if r["step"] >= first and not self._excluded(r["step"])]
            frames[name] = pd.DataFrame(now)
        steps = frames[STEPS.name]
        self.span = last - first + 1
        self.judged += 1
        started, ended = self.detectors.feed(
            first, last, steps, frames[COMMS.name], frames[MEMORY.name], frames[GC.name]
        )
        if self.act:
            for a in started:
                a.capture = self._request_capture(a.title, a.id)
                self._append(a.to_json())
            for a in ended:
                self._append({"id": a.id, "ended_step": a.end_step})
        return started

    def _excluded(self, step: int) -> bool:
        return any(a <= step <= b for a, b in self.excluded)

    def _health(self, rank: int, rows: list[dict[str, Any]]) -> None:
        from perfkit.analyzers.watch import Anomaly
        from perfkit.collectors.signals.nvml import gpu_health

        by_gpu: dict[int, list[dict[str, Any]]] = {}
        for r in rows:
            by_gpu.setdefault(int(r.get("gpu") or 0), []).append(r)
        for gpu, samples in by_gpu.items():
            for event in gpu_health(samples, self.nvml_before.setdefault((rank, gpu), {})):
                key = (rank, gpu, event["event"])
                if key in self.health_seen:
                    continue
                self.health_seen.add(key)
                step = self.last_step.get(rank, 0)
                a = Anomaly(
                    id=f"h{len(self.health_seen)}",
                    kind="gpu_health",
                    subject=f"rank {rank} gpu {gpu}",
                    ranks=[rank],
                    start_step=step,
                    detected_step=step,
                    value=1.0,
                    baseline=0.0,
                    threshold=0.0,
                    unit="event",
                    title=f"GPU {gpu} of rank {rank}: {event['event']} ({event['detail']})",
                    evidence=event,
                )
                self.detectors.anomalies.append(a)
                if self.act:
                    a.capture = self._request_capture(a.title, a.id)
                    self._append(a.to_json())

    # ---- acting -----------------------------------------------------------------------------
    def _append(self, record: dict[str, Any]) -> None:
        path = self.layout.anomalies
        with contextlib.suppress(OSError):
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "ab") as f:
                f.write(orjson.dumps(record) + b"\n")

    def _step_s(self) -> float:
        base = self.detectors.baseline_steps_ms
        if base:
            return max(1e-4, sorted(base)[len(base) // 2] / 1e3)
        times = [r.get("step_time_s") or 0.0 for r in self.recent.values()]
        return max(1e-4, max(times, default=0.1))

    def _request_capture(self, reason: str, anomaly: str | None) -> str | None:
        """Ask every rank to trace the same steps, starting ``LEAD_S`` ahead; None when one is still
        to come or the cap is reached."""
        if len(self.captures) >= MAX_CAPTURES or not self.last_step:
            return None
        now = max(self.last_step.values())
        if self.captures and self.captures[-1]["last_step"] >= now:
            return str(self.captures[-1]["id"])  # the one to come will show this too
        return request_capture(
            self.layout, self.options.capture_steps, now, self._step_s(), reason, anomaly, self
        )

    def _diagnose_captures(self) -> None:
        from perfkit.analyzers.trace import load_trace
        from perfkit.analyzers.watch import diagnose

        world = self.world_size or 0
        for c in self.captures:
            cid = c["id"]
            if cid in self.diagnosed or not world:
                continue
            paths = self.layout.capture_traces(cid)
            base = self.layout.capture_traces("baseline")
            if len(paths) < world or len(base) < world:
                if min(self.last_step.values(), default=0) > c["last_step"] + 50 * self.options.capture_steps:
                    self.diagnosed.add(cid)  # never coming (declined: the rank says why in captures.json)
                continue
            self.diagnosed.add(cid)
            try:
                b = {r: load_trace(self.layout.capture_trace(r, "baseline"), r) for r in range(world)}
                t = {r: load_trace(self.layout.capture_trace(r, cid), r) for r in range(world)}
                out = diagnose(b, t, self.options.capture_steps, c["steps"])
            except Exception as e:  # a damaged trace: said, the watch goes on
                out = {"error": f"{type(e).__name__}: {e}"[:300]}
            with contextlib.suppress(OSError):
                write_json_atomic(self.layout.capture_diagnosis(cid), {**c, **out})

    def state(self) -> dict[str, Any]:
        """The job as the watcher sees it now (``perfkit top``)."""
        ranks = []
        for rank in sorted(self.recent):
            r = self.recent[rank]
            ranks.append(
                {
                    "rank": rank,
                    "step": r.get("step"),
                    "step_ms": (r.get("step_time_s") or 0.0) * 1e3,
                    "phases_ms": {
                        p.removesuffix("_s"): (r.get(p) or 0.0) * 1e3
                        for p in ("data_wait_s", "forward_s", "backward_s", "optimizer_s")
                        if r.get(p) is not None
                    },
                }
            )
        memory = {}
        for row in self.pending.get(MEMORY.name, [])[-64:]:
            memory[row["rank"]] = row.get("allocated") or row.get("rss")
        for r in ranks:
            r["memory_bytes"] = memory.get(r["rank"])
        missed = sum(t.missed for t in self.tails.values())
        return {
            "time": time.time(),
            "warnings": [
                f"the tables turned over faster than the watcher reads them ({missed} time(s)): some "
                "windows went unjudged; give --watch-budget more room"
            ]
            if missed
            else [],
            "window": self.window,
            "windows_judged": self.judged,
            "judged_window_steps": self.span,
            "baseline_ready": self.detectors.ready,
            "last_step": max(self.last_step.values(), default=0),
            "baseline_step_ms": self._step_s() * 1e3 if self.detectors.baseline_steps_ms else None,
            "ranks": ranks,
            "anomalies": [
                {
                    k: a.to_json()[k]
                    for k in ("id", "kind", "subject", "title", "start_step", "end_step", "capture")
                }
                for a in self.detectors.anomalies
            ],
            "captures": self.captures,
        }

    def _write_state(self) -> None:
        with contextlib.suppress(OSError):
            write_json_atomic(self.layout.watch_state, self.state())


def request_capture(
    layout: RunLayout,
    steps: int,
    now_step: int,
    step_s: float,
    reason: str,
    anomaly: str | None = None,
    watcher: Watcher | None = None,
) -> str:
    """Write a capture request for every rank: ``steps`` steps from ``LEAD_S`` ahead of ``now_step``.
    Returns its id."""
    lead = max(5, math.ceil(LEAD_S / max(step_s, 1e-4)))
    first = now_step + lead
    existing = layout.capture_requests.glob("c*.json") if layout.capture_requests.is_dir() else []
    n = 1 + max(
        (int(p.stem[1:].split("-")[0]) for p in existing if p.stem[1:].split("-")[0].isdigit()), default=0
    )
    cid = f"c{n}"
    request = {
        "id": cid,
        "first_step": first,
        "steps": steps,
        "reason": reason,
        "anomaly": anomaly,
        "time": time.time(),
    }
    layout.capture_requests.mkdir(parents=True, exist_ok=True)
    write_json_atomic(layout.capture_request(cid), request)
    if watcher is not None:
        watcher.captures.append({**request, "last_step": first + steps - 1})
        watcher.excluded.append((first, first + steps))
    return cid


# ---- perfkit top and perfkit capture ------------------------------------------------------------
STALE_S = 5.0
"""A watcher's state older than this, while the job runs, is not trusted: ``top`` follows the files
itself."""


def _options_of(layout: RunLayout) -> CollectOptions | None:
    """The collector options a rank of the run said it ran with (None before any rank started)."""
    for rank in layout.ranks():
        with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
            raw = loads(layout.probe(rank).read_bytes())["options"]
            fields = {f for f in CollectOptions.__dataclass_fields__}
            kwargs = {k: v for k, v in raw.items() if k in fields and k != "collect"}
            for key in ("profile_steps", "memory_history"):
                if isinstance(kwargs.get(key), list):
                    kwargs[key] = tuple(kwargs[key])
            return CollectOptions(**kwargs)
    return None


class TopView:
    """What ``perfkit top`` shows, refreshed from the run directory alone: the job's own watcher's
    state while it is fresh, else a read-only watcher of its own over the ranks' files."""

    def __init__(self, run_dir: Path) -> None:
        self.layout = RunLayout(run_dir)
        self.own: Watcher | None = None

    def state(self) -> dict[str, Any]:
        path = self.layout.watch_state
        with contextlib.suppress(OSError, ValueError):
            if time.time() - path.stat().st_mtime < STALE_S or self._finished():
                state = loads(path.read_bytes())
                state["source"] = "the job's watcher"
                return state
        if self.own is None:
            self.own = Watcher(
                self.layout.root, _options_of(self.layout) or CollectOptions(watch=True), act=False
            )
        self.own.poll()
        state = self.own.state()
        state["source"] = "perfkit top (the job has no live watcher)"
        return state

    def _finished(self) -> bool:
        with contextlib.suppress(OSError, ValueError, KeyError):
            return loads(self.layout.manifest.read_bytes())["status"] != "running"
        return False

    def status(self) -> str:
        with contextlib.suppress(OSError, ValueError, KeyError):
            return str(loads(self.layout.manifest.read_bytes())["status"])
        return "unknown"

    def render(self) -> Any:
        from rich.console import Group
        from rich.table import Table as RichTable
        from rich.text import Text

        s = self.state()
        base = s.get("baseline_step_ms")
        head = Text(
            f"perfkit top  {self.layout.root}  status {self.status()}  windows judged {s.get('windows_judged', 0)}"
            + (f"  baseline {base:.2f} ms/step" if base else "  baseline: not yet")
            + f"  ({s.get('source')})",
            style="bold",
        )
        ranks = RichTable(title="ranks (latest step)", title_justify="left")
        for col in ("rank", "step", "ms/step", "data wait", "forward", "backward", "optimizer", "memory MiB"):
            ranks.add_column(col, justify="right")
        for r in s.get("ranks", []):
            ph = r.get("phases_ms", {})
            mem = r.get("memory_bytes")
            ranks.add_row(
                str(r["rank"]),
                str(r.get("step")),
                f"{r.get('step_ms', 0):.2f}",
                *(
                    f"{ph[p]:.2f}" if p in ph else "-"
                    for p in ("data_wait", "forward", "backward", "optimizer")
                ),
                f"{mem / 2**20:,.0f}" if mem else "-",
            )
        parts: list[Any] = [head, *(Text(w, style="yellow") for w in s.get("warnings", [])), ranks]
        anomalies = s.get("anomalies", [])
        lines = [
            f"step {a['start_step']}"
            + (f"-{a['end_step']}" if a.get("end_step") else " (on)")
            + f": {a['title']}"
            + (f"  [capture {a['capture']}]" if a.get("capture") else "")
            for a in anomalies
        ]
        parts.append(
            Text("anomalies:\n  " + ("\n  ".join(lines) if lines else "none"), style="red" if lines else "")
        )
        caps = s.get("captures", [])
        if caps:
            parts.append(
                Text(
                    "captures: "
                    + ", ".join(f"{c['id']} (steps {c['first_step']}-{c['last_step']})" for c in caps)
                )
            )
        return Group(*parts)


def capture_now(run_dir: Path, steps: int) -> tuple[str, int]:
    """Ask a running watched job for a capture of ``steps`` steps (``perfkit capture``): from the
    ranks' latest steps and pace, every rank starts at the same step. Returns its id and first step."""
    from perfkit.errors import ConfigError

    layout = RunLayout(run_dir)
    if not layout.is_run():
        raise ConfigError(
            f"{run_dir} is not a run directory (no manifest.json); give the one perfkit profile printed"
        )
    try:
        manifest = loads(layout.manifest.read_bytes())
    except (OSError, ValueError):
        raise ConfigError(f"{layout.manifest}: cannot be read; is the run directory damaged?") from None
    if not isinstance(manifest, dict) or manifest.get("status") != "running":
        raise ConfigError(
            f"{run_dir}: the job is not running (status {manifest.get('status')}); nothing to capture"
        )
    options = _options_of(layout)
    if options is None:
        raise ConfigError(f"{run_dir}: no rank has started yet; try again in a moment")
    if not _running(layout):
        raise ConfigError(f"{run_dir}: the job is not running; nothing to watch")
    if not options.watch:
        raise ConfigError(
            f"{run_dir}: the job is not watched; start it with perfkit profile --watch to capture on demand"
        )
    last: dict[int, dict[str, Any]] = {}
    for rank in layout.ranks():
        path = layout.table(rank, STEPS)
        rows = Tail(path, layout.rotated(path)).read()
        if rows:
            last[rank] = rows[-1]
    if not last:
        raise ConfigError(f"{run_dir}: no rank has finished a step yet; try again in a moment")
    step_s = sorted(r.get("step_time_s") or 0.1 for r in last.values())[len(last) // 2]
    now = max(r["step"] for r in last.values())
    cid = request_capture(layout, steps, now, step_s, "asked for with perfkit capture")
    return cid, loads(layout.capture_request(cid).read_bytes())["first_step"]


def follow(run_dir: Path, interval: float, stream: Any) -> int:
    """``perfkit watch``: the watcher beside a job that ``perfkit profile`` did not start (the script
    calls ``perfkit.profile(out=..., watch=True)``), until the job ends. Returns the anomalies
    found."""
    from perfkit.errors import ConfigError
    from perfkit.profile import watch_poll

    layout = RunLayout(run_dir)
    deadline = time.monotonic() + 60
    while (options := _options_of(layout)) is None:  # the job or its ranks have not started yet
        if layout.is_run() and not _running(layout):
            raise ConfigError(f"{run_dir}: the job is not running; nothing to watch")
        if time.monotonic() > deadline:
            what = "no rank started" if layout.is_run() else "no run directory appeared"
            raise ConfigError(f"{run_dir}: {what} within a minute; give the folder the job writes (its out=)")
        time.sleep(interval)
    if not _running(layout):
        raise ConfigError(f"{run_dir}: the job is not running; nothing to watch")
    if not options.watch:
        raise ConfigError(
            f"{run_dir}: the job is not watched; start it with watch=True (or perfkit profile --watch)"
        )
    with contextlib.suppress(OSError):
        if time.time() - layout.watch_state.stat().st_mtime < STALE_S:
            raise ConfigError(
                f"{run_dir}: the job's own watcher is running (perfkit profile --watch); see it with perfkit top"
            )
    watcher = Watcher(run_dir, options)
    with contextlib.suppress(OSError):
        os.nice(10)
    while _running(layout):
        watch_poll(watcher, stream)
        time.sleep(interval)
    watch_poll(watcher, stream)
    return len(watcher.detectors.anomalies)


def _running(layout: RunLayout) -> bool:
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        return loads(layout.manifest.read_bytes())["status"] == "running"
    return False
