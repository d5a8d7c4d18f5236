"""The comms collector's hooks into torch.distributed: every collective and point-to-point op a rank
issues, on every step (``signals/comms.py`` starts and stops them; this module needs torch).

On gloo the profiler trace carries no collective metadata and DDP issues its all-reduces from C++
(shared/design/torch-distributed-facts.md), so these hooks record them at three doors:

- the Python API ``torch.distributed.*`` (user calls, FSDP2, ZeRO, pipeline send/recv, DCP);
- DDP's gradient buckets: a comm hook (torch's own default all-reduce hook, which calls the Python
  API) is registered before DDP's first forward, unless the user registers one, which is wrapped;
- functional collectives (``torch.distributed._functional_collectives``, used by DTensor / TP).

Per op: op, source, group name and ranks, bytes (the message: all-gather's output, reduce-scatter's
input), dtype, start and end (wall-clock ns); for calls through the Python API, who made the call
(the innermost frame of each package on the stack up to the user's code: a framework's logging
gather is told from the user's own) and whether the host blocked in it (no ``async_op``). An async op's end is when its Work completed; a
functional collective's end is unknown (null): it completes at a later wait.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d
from perfkit.collectors.base import Collector
from perfkit.collectors.probe import Probe

from perfkit.frames import caller_chain, live_frames
from perfkit.tables import COMMS

# function -> index of the tensor that is "the message" (all-gather's output, reduce-scatter's
# input, a list's total), and of the group argument. Names vary across torch releases (2.13 has
# all_gather_single / reduce_scatter_single, which FSDP2 calls); those absent are skipped.
_PY_OPS: dict[str, tuple[int, int]] = {
    "all_reduce": (0, 2),
    "all_reduce_coalesced": (0, 2),
    "broadcast": (0, 2),
    "reduce": (0, 3),
    "all_gather": (0, 2),
    "all_gather_into_tensor": (0, 2),
    "all_gather_single": (0, 2),
    "all_gather_coalesced": (0, 2),
    "reduce_scatter": (1, 3),
    "reduce_scatter_tensor": (1, 3),
    "reduce_scatter_single": (1, 3),
    "all_to_all": (1, 2),
    "all_to_all_single": (1, 4),
    "gather": (0, 3),
    "scatter": (0, 3),
    "send": (0, 2),
    "recv": (0, 2),
    "isend": (0, 2),
    "irecv": (0, 2),
    "barrier": (-1, 0),
}
_FUNCOL_OPS: dict[str, tuple[int, int]] = {
    "all_reduce": (0, 2),
    "all_gather_tensor": (0, 2),
    "all_gather_single": (0, 2),
    "reduce_scatter_tensor": (0, 3),
    "reduce_scatter_single": (0, 3),
    "all_to_all_single": (0, 3),
    "broadcast": (0, 2),
}

_state = threading.local()


def canonical(name: str) -> str:
    """One op name per collective, whatever the API: all_gather_single -> all_gather, isend -> send."""
    for base in ("all_reduce", "all_gather", "reduce_scatter", "all_to_all"):
        if name.startswith(base):
            return base
    return {"isend": "send", "irecv": "recv"}.get(name, name)


class _Recorder:
    def __init__(self, probe: Probe, collector: Collector) -> None:
        self.probe = probe
        self.collector = collector
        self.seq = 0
        self.lock = threading.Lock()
        self.groups: dict[int, tuple[str, str, int]] = {}
        self.on_gpu: list[tuple[Any, tuple[Any, ...]]] = []
        """CUDA collectives whose GPU time is not known yet: (work, add's arguments)."""
        self.entered: dict[str, int] = {}
        """Per process group: how many collectives this rank entered (their sequence numbers)."""
        self.completed: dict[str, int] = {}
        self.in_flight: dict[int, dict[str, Any]] = {}
        """Entered and not completed, by key: group, its sequence number, op, bytes, dtype, when."""
        self.last_completed: dict[str, dict[str, Any]] = {}
        self._keys = 0

    def enter(self, op: str, group: Any, tensor: Any, start_ns: int, step: int) -> int | None:
        """Note a collective as entered (before the call, which may block): what a hang record
        says this rank waits in. Returns the key that ``add`` is given when it completes."""
        try:
            name = self.group_info(group)[0]
            nbytes, dtype = _message(tensor)
        except Exception:
            return None
        with self.lock:
            self._keys += 1
            gseq = self.entered.get(name, 0) + 1
            self.entered[name] = gseq
            self.in_flight[self._keys] = {
                "group": name,
                "seq": gseq,
                "op": canonical(op),
                "bytes": nbytes,
                "dtype": dtype,
                "entered_ns": start_ns,
                "step": step,
            }
            return self._keys

    def leave(self, key: int | None) -> None:
        if key is None:
            return
        with self.lock:
            entry = self.in_flight.pop(key, None)
            if entry is not None:
                self.completed[entry["group"]] = self.completed.get(entry["group"], 0) + 1
                self.last_completed[entry["group"]] = entry

    def progress(self) -> tuple[int, int]:
        """Collectives entered and completed so far, all groups: the watchdog's sign of life."""
        with self.lock:
            return sum(self.entered.values()), sum(self.completed.values())

    def state(self) -> dict[str, Any]:
        """What this rank is in, for a hang record: per group the last entered and completed
        sequence numbers, the collectives in flight, the last completed one."""
        now = time.time_ns()
        with self.lock:
            return {
                "entered": dict(self.entered),
                "completed": dict(self.completed),
                "in_flight": [
                    {**e, "waiting_s": round((now - e["entered_ns"]) / 1e9, 3)}
                    for e in sorted(self.in_flight.values(), key=lambda e: e["entered_ns"])
                ],
                "last_completed": dict(self.last_completed),
            }

    def group_info(self, group: Any) -> tuple[str, str, int]:
        key = id(group)
        info = self.groups.get(key)
        if info is None:
            try:
                pg = group if isinstance(group, dist.ProcessGroup) else c10d._get_default_group()
                ranks = dist.get_process_group_ranks(pg)
                name = getattr(pg, "group_name", "") or ("default" if group is None else str(key))
                info = (name, ",".join(map(str, ranks)), len(ranks))
            except Exception:
                info = (type(group).__name__, "", 0)
            self.groups[key] = info
        return info

    def finish(
        self,
        work: Any,
        op: str,
        source: str,
        group: Any,
        tensor: Any,
        start: int,
        step: int,
        end_known: bool = True,
        key: int | None = None,
        caller: str | None = None,
    ) -> None:
        """Record an op now (synchronous) or when its Work completes; never raise into the caller.

        A collective on CUDA tensors (NCCL) returns, and its future completes, when the kernel is
        queued, not when it ran: its host-side end would say nothing. Its GPU duration is read from
        the Work (``TORCH_NCCL_ENABLE_TIMING``, which perfkit profile sets) once the work completed,
        polled at step ends without a device sync; the end stays unknown. A synchronous call returns
        no Work: ``work`` is then the StreamTimer of CUDA events recorded around it."""
        try:
            fut = None
            if isinstance(work, dist.Work | StreamTimer) and _on_cuda(tensor):
                self.leave(key)  # queued on the GPU; its GPU time comes later
                with self.lock:
                    self.on_gpu.append((work, (op, source, group, tensor, start, None, step, caller, False)))
                return
            if isinstance(work, dist.Work):
                try:
                    fut = work.get_future()
                except RuntimeError:  # gloo's point-to-point Work has no future: end unknown
                    end_known = False
            if fut is not None:
                fut.then(
                    lambda _f: self.safe_add(
                        op, source, group, tensor, start, time.time_ns(), step, caller, False, None, key
                    )
                )
            else:
                blocking = work is None and end_known  # the call returned when the op was done
                self.add(
                    op, source, group, tensor, start, time.time_ns() if end_known else None, step,
                    caller, blocking, None, key,
                )  # fmt: skip
        except Exception as e:
            self.probe.disable(self.collector, f"recording {op} failed: {type(e).__name__}: {e}")

    def resolve_gpu(self, force: bool = False) -> None:
        """Write the CUDA collectives whose work completed, with their GPU duration (all when forced,
        the duration then where known)."""
        with self.lock:
            pending, self.on_gpu = self.on_gpu, []
        waiting = []
        for work, args in pending:
            try:
                done = work.is_completed()
            except Exception:
                done = True
            if not done and not force:
                waiting.append((work, args))
                continue
            gpu_ms = None
            if done:
                try:
                    gpu_ms = float(work._get_duration())
                except Exception:  # timing off, or a backend without it
                    gpu_ms = None
            self.safe_add(*args, gpu_ms)
        with self.lock:
            self.on_gpu = waiting + self.on_gpu

    def safe_add(self, *args: Any) -> None:
        try:
            self.add(*args)
        except Exception as e:
            self.probe.disable(self.collector, f"recording failed: {type(e).__name__}: {e}")

    def add(
        self,
        op: str,
        source: str,
        group: Any,
        tensor: Any,
        start_ns: int,
        end_ns: int | None,
        step: int,
        caller: str | None = None,
        blocking: bool | None = None,
        gpu_ms: float | None = None,
        key: int | None = None,
    ) -> None:
        t0 = time.thread_time()
        self.leave(key)
        op = canonical(op)
        nbytes, dtype = _message(tensor)
        name, ranks, size = self.group_info(group)
        with self.lock:
            self.seq += 1
            self.probe.writer(COMMS).add(
                {
                    "step": step,
                    "seq": self.seq,
                    "op": op,
                    "source": source,
                    "group": name,
                    "group_ranks": ranks,
                    "group_size": size,
                    "bytes": nbytes,
                    "dtype": dtype,
                    "start_ns": start_ns,
                    "end_ns": end_ns,
                    "gpu_ms": gpu_ms,
                    "caller": caller,
                    "blocking": blocking,
                }
            )
            self.probe.self_time_s += time.thread_time() - t0


class StreamTimer:
    """A synchronous CUDA collective's GPU time: CUDA events on the current stream before and after
    the call. NCCL returns once its kernel is queued and makes the current stream wait for it, so the
    events span the collective as the training stream sees it. Polled like an async Work
    (``is_completed``, ``_get_duration``): read at a step end, never synchronized."""

    def __init__(self) -> None:
        self.start = torch.cuda.Event(enable_timing=True)
        self.end = torch.cuda.Event(enable_timing=True)
        self.start.record()

    def stop(self) -> StreamTimer:
        self.end.record()
        return self

    def is_completed(self) -> bool:
        return bool(self.end.query())

    def _get_duration(self) -> float:
        return float(self.start.elapsed_time(self.end))


def _on_cuda(t: Any) -> bool:
    if isinstance(t, list | tuple):
        t = t[0] if t else None
    return isinstance(t, torch.Tensor) and t.is_cuda


def _message(t: Any) -> tuple[int, str]:
    if isinstance(t, torch.Tensor):
        return t.numel() * t.element_size(), str(t.dtype).removeprefix("torch.")
    if isinstance(t, list | tuple) and t and isinstance(t[0], torch.Tensor):
        return sum(x.numel() * x.element_size() for x in t), str(t[0].dtype).removeprefix("torch.")
    return 0, ""


_compiling = torch.compiler.is_compiling


def _caller() -> str:
    """Who called the collective (see ``perfkit.frames.caller_chain``), from the live frames: no
    traceback objects, a few microseconds a call."""
    return caller_chain(reversed(live_frames(sys._getframe(2))))


def _arg(args: tuple[Any, ...], kwargs: dict[str, Any], index: int, name: str | None) -> Any:
    """The argument at position ``index`` or given by keyword ``name``."""
    if name is not None and name in kwargs:
        return kwargs[name]
    return args[index] if 0 <= index < len(args) else None


def _param_name(fn: Any, index: int) -> str | None:
    try:
        names = list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return None
    return names[index] if 0 <= index < len(names) else None


def _wrap_op(
    name: str,
    fn: Any,
    recorder_ref: list[_Recorder | None],
    tensor_idx: int,
    group_idx: int,
    functional: bool = False,
) -> Any:
    """Record each call of a collective. A functional collective returns before it completes and
    names its group by mesh or name: its end is left unknown and its group resolved."""
    tensor_name = _param_name(fn, tensor_idx)

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        rec = recorder_ref[0]
        if rec is None or not rec.collector.enabled or getattr(_state, "inside", False):
            return fn(*args, **kwargs)
        _state.inside = True
        step = rec.probe.step + 1
        start = time.time_ns()
        group = _arg(args, kwargs, group_idx, "group")
        tensor = _arg(args, kwargs, tensor_idx, tensor_name) if tensor_idx >= 0 else None
        key = None if functional else rec.enter(name, group, tensor, start, step)
        source = getattr(_state, "source", None) or "python"
        caller = _caller() if source == "python" and not functional and not _compiling() else None
        synchronous = not functional and not kwargs.get("async_op")
        timer = StreamTimer() if synchronous and _on_cuda(tensor) and not _compiling() else None
        try:
            result = fn(*args, **kwargs)
        except BaseException:
            rec.leave(key)
            raise
        finally:
            _state.inside = False
        if timer is not None and result is None:  # synchronous: no Work to read the GPU time from
            result = timer.stop()
        if functional:
            tensor = result if name.startswith("all_gather") else tensor
            if not isinstance(group, dist.ProcessGroup):
                try:
                    group = c10d._resolve_process_group(funcol._resolve_group_name(group))
                except Exception:
                    pass
            kind = source if source.startswith("probe") else "funcol"  # a probe's stays a probe's
            rec.finish(None, name, kind, group, tensor, start, step, end_known=False)
        else:
            rec.finish(result, name, source, group, tensor, start, step, key=key, caller=caller)
            if isinstance(result, StreamTimer):
                return None
        return result

    wrapper.__perfkit_wrapped__ = True  # type: ignore[attr-defined]
    return wrapper


def _wrap_batch(fn: Any, recorder_ref: list[_Recorder | None]) -> Any:
    @functools.wraps(fn)
    def wrapper(p2p_op_list: list[Any], *args: Any, **kwargs: Any) -> Any:
        rec = recorder_ref[0]
        if rec is None or not rec.collector.enabled or getattr(_state, "inside", False):
            return fn(p2p_op_list, *args, **kwargs)
        step, start = rec.probe.step + 1, time.time_ns()
        ops = [
            "send" if getattr(p2p.op, "__name__", "") in ("isend", "send") else "recv" for p2p in p2p_op_list
        ]
        keys = [rec.enter(op, p2p.group, p2p.tensor, start, step) for op, p2p in zip(ops, p2p_op_list)]
        source = getattr(_state, "source", None) or "python"  # a probe's sends stay a probe's
        caller = _caller() if source == "python" else None
        _state.inside = True
        try:
            works = fn(p2p_op_list, *args, **kwargs)
        except BaseException:
            for key in keys:
                rec.leave(key)
            raise
        finally:
            _state.inside = False
        for p2p, work, op, key in zip(p2p_op_list, works or [], ops, keys):
            rec.finish(work, op, source, p2p.group, p2p.tensor, start, step, key=key, caller=caller)
        return works

    wrapper.__perfkit_wrapped__ = True  # type: ignore[attr-defined]
    return wrapper


import torch.distributed._functional_collectives as funcol  # noqa: E402

_recorder: list[_Recorder | None] = [None]
_patched = False


def patch_all() -> None:
    global _patched
    if _patched:
        return
    _patched = True
    for name, (ti, gi) in _PY_OPS.items():
        fn = getattr(c10d, name, None)
        if fn is None or getattr(fn, "__perfkit_wrapped__", False):
            continue
        wrapped = _wrap_op(name, fn, _recorder, ti, gi)
        setattr(c10d, name, wrapped)
        if getattr(dist, name, None) is fn:
            setattr(dist, name, wrapped)
    batch = _wrap_batch(c10d.batch_isend_irecv, _recorder)
    c10d.batch_isend_irecv = batch
    dist.batch_isend_irecv = batch
    for name, (ti, gi) in _FUNCOL_OPS.items():
        fn = getattr(funcol, name, None)
        if fn is not None and not getattr(fn, "__perfkit_wrapped__", False):
            setattr(funcol, name, _wrap_op(name, fn, _recorder, ti, gi, functional=True))
    _patch_ddp()


def _patch_ddp() -> None:
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from torch.nn.parallel import DistributedDataParallel as DDP

    def tagged(hook: Any) -> Any:
        @functools.wraps(hook)
        def run(state: Any, bucket: Any) -> Any:
            _state.source = "ddp"
            try:
                return hook(state, bucket)
            finally:
                _state.source = None

        return run

    original_register = DDP.register_comm_hook
    original_builtin = DDP._register_builtin_comm_hook
    original_forward = DDP.forward
    original_post_forward = DDP._post_forward

    def register_comm_hook(self: DDP, state: object, hook: Any) -> None:
        setattr(self, "_perfkit_hooked", True)  # noqa: B010 - nn.Module typing refuses a new attribute
        original_register(self, state, tagged(hook))

    def register_builtin(self: DDP, comm_hook_type: Any) -> None:
        setattr(self, "_perfkit_hooked", True)  # noqa: B010 - nn.Module typing refuses a new attribute
        original_builtin(self, comm_hook_type)

    def forward(self: DDP, *args: Any, **kwargs: Any) -> Any:
        rec = _recorder[0]
        if not getattr(self, "_perfkit_hooked", False) and rec is not None and rec.collector.enabled:
            # torch's default all-reduce hook: the same math as DDP's C++ default, through the
            # Python API that this collector records.
            register_comm_hook(self, self.process_group, default_hooks.allreduce_hook)
            _ddp_seen(rec, self)
        return original_forward(self, *args, **kwargs)

    def post_forward(self: DDP, output: Any) -> Any:
        """With find_unused_parameters, DDP walks the autograd graph after every forward: timed here
        (its cost), and in the first graded forwards perfkit walks it too, to count what is unused."""
        if not self.find_unused_parameters or self.static_graph or not torch.is_grad_enabled():
            return original_post_forward(self, output)
        t0 = time.perf_counter()
        try:
            return original_post_forward(self, output)
        finally:
            _ddp_stats["search_s"].append(time.perf_counter() - t0)
            if len(_ddp_stats["search_s"]) in (2, 3):  # the first may differ (static graph, warm-up)
                with contextlib.suppress(Exception):
                    _ddp_stats["unused"] = max(_ddp_stats.get("unused", 0), _unused_parameters(self, output))

    DDP.register_comm_hook = register_comm_hook  # type: ignore[method-assign]
    DDP._register_builtin_comm_hook = register_builtin  # type: ignore[method-assign]
    DDP.forward = forward  # type: ignore[method-assign]
    DDP._post_forward = post_forward  # type: ignore[method-assign]


_ddp_stats: dict[str, Any] = {"search_s": []}
"""find_unused_parameters' graph search: each forward's time in DDP._post_forward, and the most
parameters found unused in an early forward."""


def _ddp_seen(rec: _Recorder, ddp: Any) -> None:
    """Record the first DDP module's constructor flags (what a fix would change)."""
    if rec.probe.description.get("ddp"):
        return
    with contextlib.suppress(Exception):
        rec.probe.describe(
            ddp={
                "find_unused_parameters": bool(ddp.find_unused_parameters),
                "static_graph": bool(ddp.static_graph),
                "gradient_as_bucket_view": bool(ddp.gradient_as_bucket_view),
                "bucket_cap_mb": round(ddp.bucket_bytes_cap / 2**20, 2),
                "parameters": sum(1 for p in ddp.module.parameters() if p.requires_grad),
            }
        )


def _unused_parameters(ddp: Any, output: Any) -> int:
    """Parameters of ``ddp``'s module that the autograd graph of ``output`` does not reach."""
    from torch.nn.parallel.distributed import _find_tensors

    stack = [t.grad_fn for t in _find_tensors(output) if t.grad_fn is not None]
    seen: set[Any] = set()
    used: set[int] = set()
    while stack:
        fn = stack.pop()
        if fn in seen:
            continue
        seen.add(fn)
        variable = getattr(fn, "variable", None)
        if variable is not None:
            used.add(id(variable))
        stack.extend(nxt for nxt, _ in fn.next_functions if nxt is not None)
    return sum(1 for p in ddp.module.parameters() if p.requires_grad and id(p) not in used)


def ddp_summary() -> dict[str, Any]:
    """What the find_unused_parameters search cost (median ms a forward) and found."""
    times = sorted(_ddp_stats["search_s"])
    if not times:
        return {}
    return {
        "unused_search_ms": 1e3 * times[len(times) // 2],
        "unused_search_calls": len(times),
        "unused_parameters": _ddp_stats.get("unused"),
    }


PROBE_SIZES = (4 << 10, 256 << 10, 4 << 20, 32 << 20)


def probe_links(group: Any = None, sizes: tuple[int, ...] = PROBE_SIZES, repeats: int = 8) -> bool:
    """All-reduce a few message sizes outside the steps, every rank arriving together (a barrier
    before each call), recorded with source "probe": the link's latency and bandwidth with nothing
    else running. A collective inside a step also waits for the slowest rank and, when it overlaps
    compute (DDP's buckets), shares the machine with it, so a fit to those alone under-rates the
    link. Every rank of ``group`` must call it. Does nothing (returns False) unless this collector
    is recording and the group has two ranks or more."""
    rec = _recorder[0]
    if rec is None or not rec.collector.enabled or not dist.is_initialized():
        return False
    if dist.get_world_size(group) < 2:
        return False
    device = (
        torch.device("cuda", torch.cuda.current_device())
        if dist.get_backend(group) == "nccl"
        else torch.device("cpu")
    )
    with probe_source("probe"):
        for size in sizes:
            t = torch.ones(max(1, size // 4), dtype=torch.float32, device=device)
            dist.all_reduce(t, group=group)  # warm-up: buffers, connections
            for _ in range(repeats):
                dist.barrier(group)
                dist.all_reduce(t, group=group)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        _probe_between_compute(group, device)
    return True


@contextlib.contextmanager
def probe_source(source: str) -> Iterator[None]:
    """Record this thread's collectives inside with ``source`` (a probe's: the analysis keeps every
    source that begins with "probe" out of the job's collectives)."""
    previous = getattr(_state, "source", None)
    _state.source = source
    try:
        yield
    finally:
        _state.source = previous


STEP_PROBE_ROUNDS = 48
STEP_PROBE_COMPUTE_S = 2e-3
STEP_PROBE_BYTES = 192 << 10


def _probe_between_compute(group: Any, device: torch.device) -> None:
    """All-reduces each issued after the same burst of compute on every rank, no barrier, recorded
    with source "probe-step": what a blocking collective inside a step costs (tensor parallel's
    activations, FSDP2's gathers), its transfer and its wait for the other ranks together. On 2 CPU
    ranks sharing 2 cores such a call costs 1-1.4 ms against the 0.3 ms of the same call after a
    barrier: the rank that arrives first sleeps, and wakes late."""
    a = torch.randn(128, 128, device=device) / 16

    def burst(n: int) -> None:
        x = a
        for _ in range(n):
            x = torch.tanh(a @ x)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    burst(2)
    t0 = time.perf_counter()
    burst(16)
    per = max((time.perf_counter() - t0) / 16, 1e-7)
    n = torch.tensor([max(1, int(STEP_PROBE_COMPUTE_S / per))], device=device)
    dist.all_reduce(n, op=dist.ReduceOp.MAX, group=group)  # every rank the same work
    iters = int(n.item())
    t = torch.ones(STEP_PROBE_BYTES // 4, dtype=torch.float32, device=device)
    dist.barrier(group)
    with probe_source("probe-step"):
        for _ in range(STEP_PROBE_ROUNDS):
            burst(iters)
            dist.all_reduce(t, group=group)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
