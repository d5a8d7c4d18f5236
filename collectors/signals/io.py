"""io: dataset reads (bytes, latency) and checkpoint saves and loads (bytes, time blocked).

Checkpoint I/O is found by wrapping ``torch.distributed.checkpoint.save / async_save / load`` and
``torch.save / torch.load`` on a path. Dataset reads are reported by the dataset itself through
``record_read`` (the reference trainer's does); DataLoader worker processes write their own file,
``io.w<pid>.jsonl``, one flushed line per read, since they are separate processes.
The per-step data wait, the host blocked on the loader, is in the steps table.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from perfkit.collectors.base import Collector, register

from perfkit.tables import IO, RowWriter

if TYPE_CHECKING:
    from perfkit.collectors.probe import Probe

_worker_writer: RowWriter | None = None


def _active() -> Probe | None:
    from perfkit.collectors.probe import Probe

    probe = Probe.current
    if probe is None or probe._stopped or "io" not in probe.status or probe.status["io"]["status"] != "ok":
        return None
    return probe


def record(
    kind: str,
    latency_s: float,
    start_ns: int,
    nbytes: int | None = None,
    path: str | None = None,
    step: int | None = None,
) -> None:
    """Add one I/O event to this rank's io table (a no-op when not profiling)."""
    global _worker_writer
    probe = _active()
    if probe is None:
        return
    row = {
        "step": step if step is not None else probe.step + 1,
        "kind": kind,
        "bytes": nbytes,
        "latency_s": latency_s,
        "start_ns": start_ns,
        "path": path,
    }
    if os.getpid() == probe.pid:
        probe.writer(IO).add(row)
        return
    worker_file = probe.layout.table(probe.rank, IO, worker_pid=os.getpid())
    if _worker_writer is None or _worker_writer.path != worker_file:
        _worker_writer = probe.new_writer(worker_file, IO)
    _worker_writer.add(row)
    with contextlib.suppress(OSError):  # a full disk: held (bounded) for the next read's flush
        _worker_writer.flush()


def record_read(nbytes: int, latency_s: float, start_ns: int, path: str, step: int | None = None) -> None:
    record("read", latency_s, start_ns, nbytes, path, step)


def _size(path: Any, rank: int | None = None) -> int | None:
    try:
        p = Path(path)
        if p.is_file():
            return p.stat().st_size
        if p.is_dir():  # a DCP checkpoint folder: count this rank's shard files
            files = p.glob(f"__{rank}_*") if rank is not None else p.iterdir()
            return sum(f.stat().st_size for f in files if f.is_file())
    except (OSError, TypeError):
        pass
    return None


def _wrap(kind: str, fn: Any, path_of: Any) -> Any:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        probe = _active()
        if probe is None or getattr(_reentry, "on", False):
            return fn(*args, **kwargs)
        _reentry.on = True
        t0, start_ns = time.perf_counter(), time.time_ns()
        try:
            return fn(*args, **kwargs)
        finally:
            _reentry.on = False
            path = path_of(args, kwargs)
            if path is not None:
                size = _size(
                    path, probe.rank if kind.startswith("checkpoint") and Path(str(path)).is_dir() else None
                )
                record(kind, time.perf_counter() - t0, start_ns, size, str(path))

    wrapper.__perfkit_wrapped__ = True  # type: ignore[attr-defined]
    return wrapper


_reentry = threading.local()  # dcp.save calls torch.save: record the outer call only


def _dcp_path(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    return kwargs.get("checkpoint_id") or (args[1] if len(args) > 1 else None)


def _torch_save_path(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    f = kwargs.get("f", args[1] if len(args) > 1 else None)
    return f if isinstance(f, str | os.PathLike) else None


def _torch_load_path(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    f = kwargs.get("f", args[0] if args else None)
    return f if isinstance(f, str | os.PathLike) else None


@register
class IOCollector(Collector):
    name = "io"
    tables = (IO,)

    def start(self, probe: Probe) -> None:
        import torch
        import torch.distributed.checkpoint as dcp

        for mod, attr, kind, path_of in (
            (dcp, "save", "checkpoint_save", _dcp_path),
            (dcp, "async_save", "checkpoint_save", _dcp_path),
            (dcp, "load", "checkpoint_load", _dcp_path),
            (torch, "save", "checkpoint_save", _torch_save_path),
            (torch, "load", "checkpoint_load", _torch_load_path),
        ):
            fn = getattr(mod, attr, None)
            if fn is not None and not getattr(fn, "__perfkit_wrapped__", False):
                setattr(mod, attr, _wrap(kind, fn, path_of))
