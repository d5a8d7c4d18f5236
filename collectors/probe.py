"""The per-rank Probe: step boundaries, phase timing, and the collectors it drives.

One Probe per rank process. It is created by ``perfkit profile``'s injection (every rank of an
unmodified script), by ``perfkit.profile()`` in a script, or by the reference trainer. Step
boundaries come from explicit ``perfkit.step()`` calls (manual mode) or from optimizer-step hooks
(auto mode, see auto.py). Every collector call is guarded: a collector that raises is disabled and
recorded, and the training goes on.
"""

from __future__ import annotations

import atexit
import contextlib
import faulthandler
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from types import FrameType
from typing import IO, Any

import torch
from perfkit.collectors.base import Collector, load
from perfkit.collectors.options import CollectOptions

from perfkit.files import write_json_atomic
from perfkit.run import RunLayout
from perfkit.tables import RowWriter, Table

PHASES = ("data_wait", "forward", "backward", "optimizer")


@dataclass
class _Pending:
    """A finished step whose GPU-side timings may not be resolved yet."""

    step: int
    start_ns: int
    end_ns: int
    host_s: float
    data_wait_s: float
    marks: list[tuple[str, Any, Any]]
    tokens: int | None
    loss: Any
    loss_ready: Any = None
    """A CUDA event recorded after the loss's copy to the host: the value is read once it completed."""
    perfkit_s: float | None = None


class Probe:
    current: Probe | None = None

    def __init__(
        self, run_dir: Path, rank: int, world_size: int, local_rank: int, options: CollectOptions
    ) -> None:
        self.run_dir = Path(run_dir)
        self.layout = RunLayout(run_dir)
        self.rank = rank
        self.world_size = world_size
        self.local_rank = local_rank
        self.options = options
        self.rank_dir = self.layout.rank_dir(rank)
        self.description: dict[str, Any] = {}
        """What the workload said of itself (``perfkit.describe``), for the manifest."""
        self.pid = os.getpid()
        self.manual = False
        self.step = 0  # steps completed
        self.collectors: list[Collector] = []
        self.status: dict[str, dict[str, str]] = {}
        self._writers: dict[str, RowWriter] = {}
        self._write_errors: list[str] = []  # tables that could not be written (a full disk), once each
        self._fault_file: IO[str] | None = None  # faulthandler's output, while armed
        self._lock = threading.Lock()
        self._stopped = False
        self._outcome = "complete"
        self._cuda = False
        self._in_step = False
        self._step_t0 = 0.0
        self._step_start_ns = 0
        self._data_wait = 0.0
        self._marks: list[tuple[str, Any, Any]] = []
        self._step_mark: Any = None
        self._tokens: int | None = None
        self._pending: list[_Pending] = []
        self._started = False
        self._self_at_step_end = 0.0
        self.self_time_s = 0.0
        """CPU time of perfkit's own per-step work (step end, collectors, writing, comms records),
        as thread CPU time: on a busy host, wall time would also count time the thread was not
        running at all."""
        self.auto: Any = None  # AutoSteps, when hooks find the steps
        self._states_at_stop: dict[str, Any] | None = None
        self._excepthook = False
        self.at_stop: list[Any] = []
        """Called (guarded) as the probe stops, before its report is written: what hooks gathered
        over the run goes into ``describe`` there."""

    # ---- life cycle -------------------------------------------------------------------------
    def start(self) -> Probe:
        if self._started:
            return self
        self._started = True
        self.rank_dir.mkdir(parents=True, exist_ok=True)
        Probe.current = self
        for name in self.options.collect:
            collector = load(name)()
            reason = (
                self._guard(collector, "available", collector.available, self) if collector.enabled else None
            )
            if reason:
                collector.enabled = False
                self.status[name] = {"status": "disabled", "reason": str(reason)}
                continue
            self.collectors.append(collector)
            self.status[name] = {"status": "ok", "reason": ""}
        for collector in self.collectors:
            self._guard(collector, "start", collector.start, self)
        self._write_probe_json("running")
        atexit.register(self.stop)
        if threading.current_thread() is threading.main_thread():
            self._install_signal_handlers()
        self.install_excepthook()
        return self

    def _states(self) -> dict[str, Any]:
        """What each running collector says of its state, for probe.json (``Collector.state``); after
        the stop, what they said as it began."""
        if self._states_at_stop is not None:
            return self._states_at_stop
        out: dict[str, Any] = {}
        for c in self.collectors:
            if c.enabled:
                with contextlib.suppress(Exception):
                    out.update(c.state())
        return out

    def install_excepthook(self) -> None:
        """An exception that ends this rank is written down (failure.json) before it is printed: the
        analysis names the rank that failed first, and where. Installed when perfkit attaches, so a
        script that fails before its first step (a bad argument, an import) leaves its record too."""
        if self._excepthook:
            return
        self._excepthook = True
        self._arm_faulthandler()
        previous = sys.excepthook

        def hook(kind: type[BaseException], value: BaseException, tb: Any) -> None:
            with contextlib.suppress(Exception):
                frames = [
                    {"file": f.filename, "line": f.lineno, "function": f.name}
                    for f in traceback.extract_tb(tb)
                ]
                write_json_atomic(
                    self.layout.failure_record(self.rank),
                    {
                        "rank": self.rank,
                        "world_size": self.world_size,
                        "time": time.time(),
                        "exception": kind.__name__,
                        "message": str(value)[:2000],
                        "frames": frames[-20:],
                        "step": self.step,
                    },
                )
            previous(kind, value, tb)

        sys.excepthook = hook

    def _arm_faulthandler(self) -> None:
        """A signal that kills the rank (a segfault in an extension, an abort) runs no Python: Python's
        faulthandler writes every thread's stack to fault.txt as it dies, and the analysis names the
        rank and its line. Left alone when the script enabled faulthandler itself."""
        if faulthandler.is_enabled():
            return
        with contextlib.suppress(OSError):
            path = self.layout.fault_record(self.rank)
            path.parent.mkdir(parents=True, exist_ok=True)
            self._fault_file = open(path, "w")  # noqa: SIM115 - faulthandler writes to it until the end
            faulthandler.enable(self._fault_file)

    def _disarm_faulthandler(self) -> None:
        f = self._fault_file
        if f is None:
            return
        self._fault_file = None
        with contextlib.suppress(OSError, ValueError):
            faulthandler.disable()
            f.close()
            if not os.path.getsize(f.name):
                os.unlink(f.name)

    def stop(self, outcome: str | None = None) -> None:
        """Flush everything and write the rank's final status. Safe to call twice."""
        if self._stopped or os.getpid() != self.pid or not self._started:
            return
        if self.auto is not None:
            self.auto.finish()
        for fn in self.at_stop:
            with contextlib.suppress(Exception):
                fn()
        self._stopped = True
        if outcome:
            self._outcome = outcome
        self._resolve(force=True)
        self._states_at_stop = self._states()
        for collector in self.collectors:
            if collector.enabled:
                self._guard(collector, "stop", collector.stop, self)
        self._flush_writers(close=True)
        self._disarm_faulthandler()
        self._write_probe_json(self._outcome)
        if Probe.current is self:
            Probe.current = None

    def _install_signal_handlers(self) -> None:
        def on_term(signum: int, frame: FrameType | None) -> None:
            self.stop("interrupted")
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

        previous_int = signal.getsignal(signal.SIGINT)

        def on_int(signum: int, frame: FrameType | None) -> None:
            self._outcome = "interrupted"
            if callable(previous_int):
                previous_int(signum, frame)
            else:
                raise KeyboardInterrupt

        signal.signal(signal.SIGTERM, on_term)
        signal.signal(signal.SIGINT, on_int)

    def _write_probe_json(self, status: str) -> None:
        info: dict[str, Any] = {
            "rank": self.rank,
            "pid": self.pid,
            "world_size": self.world_size,
            "local_rank": self.local_rank,
            "status": status,
            "steps": self.step,
            "mode": "manual" if self.manual else "auto",
            "self_time_s": self.self_time_s,
            "self_time_per_step_ms": 1e3 * self.self_time_s / self.step if self.step else None,
            "collectors": self.status,
            "options": asdict(self.options),
            "model": self.description,
        }
        if self._write_errors:
            lost = sum(w.lost for w in self._writers.values())
            info["write_errors"] = self._write_errors + ([f"{lost} row(s) lost"] if lost else [])
        info.update(self._states())  # what this rank was in when it stopped (a crash, a SIGTERM)
        if self.rank == 0:
            info["env"] = torch_environment()
        with contextlib.suppress(OSError):
            write_json_atomic(self.layout.probe(self.rank), info)

    def _flush_writers(self, close: bool = False) -> None:
        """Write out every table's rows. A table that cannot be written (a full disk) is said once,
        on stderr and in probe.json; its rows stay held and go out once the disk has room."""
        for w in list(self._writers.values()):
            try:
                w.close() if close else w.flush()
            except OSError:
                if w.error and w.error not in self._write_errors:
                    self._write_errors.append(w.error)
                    said = f"perfkit [rank {self.rank}]: {w.error}; its rows are held until there is room"
                    print(said, file=sys.stderr, flush=True)
                    self._write_probe_json("running")

    def _guard(self, collector: Collector, what: str, fn: Any, *args: Any) -> Any:
        if not collector.enabled:
            return None
        try:
            return fn(*args)
        except Exception as e:  # a collector must never stop the training
            self.disable(collector, f"{what} failed: {type(e).__name__}: {e}")
            return None

    def disable(self, collector: Collector, reason: str) -> None:
        collector.enabled = False
        self.status[collector.name] = {"status": "failed", "reason": reason.splitlines()[0][:500]}
        self._write_probe_json("running")

    def set_manual(self) -> None:
        """The script marks its own steps: the automatic step hooks come off (a global module hook
        alone sends every module call of the model down nn.Module's slow path)."""
        if not self.manual:
            self.manual = True
            if self.auto is not None:
                self.auto.remove_hooks()

    def writer(self, table: Table) -> RowWriter:
        if table.name not in self._writers:
            self._writers[table.name] = self.new_writer(self.layout.table(self.rank, table), table)
        return self._writers[table.name]

    def new_writer(self, path: Path, table: Table) -> RowWriter:
        """A writer of one of this rank's table files; under --watch bounded by its share of the disk
        budget, the oldest rows going first (the watch collector's summaries keep the whole job)."""
        return RowWriter(path, self.options.watch_bytes(self.world_size, "table"), self.layout.rotated(path))

    def describe(self, **facts: Any) -> None:
        """Record what the workload says of itself (flops_per_token, parameters, layout)."""
        self.description.update(facts)
        if self._started:
            self._write_probe_json("running")

    # ---- steps and phases -------------------------------------------------------------------
    def _mark(self) -> Any:
        if self._cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def begin_step(self) -> None:
        if self._in_step or self._stopped:
            return
        if not self._started:  # injected probes start at the first step of a real training loop
            self.start()
        self._in_step = True
        self._cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        self._step_start_ns = time.time_ns()
        self._step_t0 = time.perf_counter()
        self._step_mark = self._mark()
        self._data_wait = 0.0
        self._marks = []
        self._tokens = None
        for c in self.collectors:
            if c.enabled:
                self._guard(c, "step_begin", c.step_begin, self, self.step + 1)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time a phase of the current step (data_wait is timed on the host: it is the host waiting)."""
        self.begin_step()
        if name == "data_wait":
            t0 = time.perf_counter()
            try:
                yield
            finally:
                self._data_wait += time.perf_counter() - t0
            return
        start = self._mark()
        try:
            yield
        finally:
            self._marks.append((name, start, self._mark()))

    def mark(self) -> Any:
        """A timestamp on the step clock (a CUDA event on GPU), to pass to ``add_phase``."""
        return self._mark()

    def add_phase(self, name: str, start: Any, end: Any = None) -> None:
        self._marks.append((name, start, end if end is not None else self._mark()))

    def add_data_wait(self, seconds: float) -> None:
        self.begin_step()
        self._data_wait += seconds

    def add_tokens(self, n: int) -> None:
        self._tokens = (self._tokens or 0) + n

    def end_step(self, tokens: int | None = None, loss: Any = None, end_mark: Any = None) -> None:
        """Close the current step (at ``end_mark``, a ``mark()`` taken earlier, or now)."""
        if self._stopped:
            return
        self.begin_step()
        end_mark = end_mark if end_mark is not None else self._mark()
        t_enter = time.thread_time()
        loss_ready = None
        if isinstance(loss, torch.Tensor):
            loss = loss.detach()
            if loss.is_cuda:  # copy without a device sync; read once the copy's own event completed
                host = torch.empty(loss.shape, dtype=loss.dtype, pin_memory=True)
                host.copy_(loss, non_blocking=True)
                loss_ready = torch.cuda.Event()
                loss_ready.record()  # after the copy: the step's end event may be recorded before it
                loss = host
        self.step += 1
        self._pending.append(
            _Pending(
                step=self.step,
                start_ns=self._step_start_ns,
                end_ns=time.time_ns(),
                host_s=time.perf_counter() - self._step_t0,
                data_wait_s=self._data_wait,
                marks=[("__step__", self._step_mark, end_mark), *self._marks],
                tokens=tokens if tokens is not None else self._tokens,
                loss=loss,
                loss_ready=loss_ready,
            )
        )
        self._in_step = False
        for c in self.collectors:
            if c.enabled:
                self._guard(c, "step_end", c.step_end, self, self.step)
        # This step's own cost so far (its collectors and the collective records made during it);
        # writing it out below is counted in the next step's.
        now = self.self_time_s + time.thread_time() - t_enter
        self._pending[-1].perfkit_s = now - self._self_at_step_end
        self._self_at_step_end = now
        self._resolve(force=False)
        self._flush_writers()
        self.self_time_s += time.thread_time() - t_enter

    def _resolve(self, force: bool) -> None:
        """Write the rows of finished steps whose timings are known (all of them when forced)."""
        while self._pending:
            p = self._pending[0]
            end = p.marks[0][2]
            waits = [e for e in (end, p.loss_ready) if isinstance(e, torch.cuda.Event)]
            if force:
                for e in waits:
                    e.synchronize()
            elif not all(e.query() for e in waits):
                break
            self._pending.pop(0)
            durations: dict[str, float] = {}
            for name, a, b in p.marks:
                dt = a.elapsed_time(b) / 1e3 if isinstance(a, torch.cuda.Event) else b - a
                durations[name] = durations.get(name, 0.0) + dt
            step_time = (
                durations.pop("__step__") if p.marks and isinstance(end, torch.cuda.Event) else p.host_s
            )
            durations.pop("__step__", None)
            loss = p.loss
            if isinstance(loss, torch.Tensor):
                loss = _host_float(loss)
            row = {
                "step": p.step,
                "start_ns": p.start_ns,
                "end_ns": p.end_ns,
                "step_time_s": step_time,
                "data_wait_s": p.data_wait_s,
                **{f"{k}_s": v for k, v in durations.items()},
                "tokens": p.tokens,
                "loss": loss,
                "perfkit_s": p.perfkit_s,
            }
            for c in self.collectors:
                if c.enabled:
                    self._guard(c, "step_timed", c.step_timed, self, row)


def _host_float(t: torch.Tensor) -> float:
    """A host tensor's value through numpy: no aten op, so perfkit's own reading leaves no
    ``aten::item`` in the trace it is collecting (the analyzer counts those as syncs)."""
    if t.dtype in (torch.bfloat16, torch.float16):
        with torch.profiler.record_function("perfkit::read_loss"):
            t = t.float()
    a = t.numpy()
    return float(a.reshape(-1)[0]) if a.size == 1 else float(a.mean())  # .mean() alone: ~50 us


def torch_environment() -> dict[str, Any]:
    """Versions and device of this rank, for the manifest."""
    from perfkit.hardware import gpu_peak_tflops, nvlink_gbps

    env: dict[str, Any] = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "threads": torch.get_num_threads(),  # intra-op (OpenMP) threads of a rank
        "local_world_size": int(os.environ.get("LOCAL_WORLD_SIZE", 1)),
    }
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        env.update(
            gpu=name,
            gpu_count=torch.cuda.device_count(),
            peak_tflops=gpu_peak_tflops(name),
            nvlink_gbps=nvlink_gbps(name),
            gpu_memory_bytes=torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory,
        )
        with contextlib.suppress(Exception):
            env["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
    return env


def rank_from_env() -> tuple[int, int, int]:
    env = os.environ
    return int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0))


def probe_from_env() -> Probe | None:
    """This process's Probe when ``perfkit profile`` asked for one (PERFKIT_RUN_DIR set), not started."""
    if Probe.current is not None:
        return Probe.current
    run_dir = os.environ.get("PERFKIT_RUN_DIR")
    if not run_dir:
        return None
    rank, world, local = rank_from_env()
    Probe.current = Probe(Path(run_dir), rank, world, local, CollectOptions.from_env())
    return Probe.current
