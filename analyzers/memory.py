"""CUDA allocator snapshots (``torch.cuda.memory._dump_snapshot``): what holds the memory.

Snapshots are pickles, and unpickling can run code: they are loaded with an unpickler that
refuses every global (class or function reference), so only plain data (dicts, lists, tuples,
strings, numbers) can come out of one.
"""

from __future__ import annotations

import gzip
import io
import pickle
from pathlib import Path
from typing import Any

import pandas as pd
from perfkit.analyzers.trace import TraceError


class _PlainData(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"refused {module}.{name}: a snapshot holds only plain data")


def load_snapshot(path: Path) -> dict[str, Any]:
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
        data = _PlainData(io.BytesIO(raw)).load()
    except pickle.UnpicklingError as e:
        raise TraceError(f"{path}: not loaded, {e}") from None
    except Exception as e:  # any malformed byte stream: a damaged file, never a traceback
        raise TraceError(f"{path}: not a readable allocator snapshot ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict) or "segments" not in data:
        raise TraceError(f"{path}: not an allocator snapshot (no segments)")
    return data


def _category(frames: list[dict[str, Any]]) -> str:
    if not frames:
        return "no stack (allocated before the history began)"
    text = " ".join(f"{f.get('name', '')} {f.get('filename', '')}" for f in frames).lower()
    for key, cat in (
        ("optim", "optimizer state"),
        ("adam", "optimizer state"),
        ("backward", "gradient"),
        ("grad", "gradient"),
        ("forward", "activation"),
        ("checkpoint", "checkpoint"),
        ("parameter", "parameter"),
        ("load", "parameter"),
        ("data", "input"),
    ):
        if key in text:
            return cat
    return "other"


def summarize(path: Path, top: int = 10) -> dict[str, Any]:
    """Load and summarize one snapshot; plain data of the wrong shape is a damaged file (TraceError)."""
    data = load_snapshot(path)
    try:
        return snapshot_summary(data, top)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        raise TraceError(
            f"{path}: not an allocator snapshot of the known layout ({type(e).__name__}: {e})"
        ) from None


def snapshot_summary(data: dict[str, Any], top: int = 10) -> dict[str, Any]:
    reserved = allocated = inactive_split = 0
    blocks = []
    # Live blocks carry no stack of their own; the history's last alloc at that address does.
    stacks: dict[int, list[dict[str, Any]]] = {}
    for trace in data.get("device_traces") or []:
        for entry in trace:
            if entry.get("action") == "alloc":
                stacks[entry.get("addr", -1)] = entry.get("frames") or []
    for seg in data["segments"]:
        reserved += seg.get("total_size", 0)
        seg_blocks = seg.get("blocks", [])
        active = any(b.get("state") == "active_allocated" for b in seg_blocks)
        for b in seg_blocks:
            if b.get("state") == "active_allocated":
                allocated += b.get("size", 0)
                frames = b.get("frames") or stacks.get(b.get("address", -1), [])
                blocks.append(
                    {
                        "size": b.get("size", 0),
                        "requested": b.get("requested_size", 0),
                        "category": _category(frames),
                        "frame": next(
                            (f"{f.get('filename')}:{f.get('line')} {f.get('name')}" for f in frames), ""
                        ),
                    }
                )
            elif b.get("state") == "inactive" and active:
                inactive_split += b.get("size", 0)
    live = pd.DataFrame(blocks, columns=["size", "requested", "category", "frame"])
    by_cat = (
        live.groupby("category")["size"].sum().sort_values(ascending=False)
        if not live.empty
        else pd.Series(dtype=float)
    )
    traces = data.get("device_traces") or []
    settings = data.get("allocator_settings") or {}
    return {
        "reserved_bytes": reserved,
        "allocated_bytes": allocated,
        "inactive_split_bytes": inactive_split,
        "segments": len(data["segments"]),
        "history_entries": sum(len(t) for t in traces),
        "by_category": {k: int(v) for k, v in by_cat.items()},
        "largest": live.nlargest(top, "size").to_dict("records") if not live.empty else [],
        "expandable_segments": bool(settings.get("expandable_segments"))
        or any(seg.get("is_expandable") for seg in data["segments"]),
        **_history(traces),
    }


def _history(traces: list[list[dict[str, Any]]]) -> dict[str, Any]:
    """What the allocator's history says: segments it gave back to the driver outside an explicit
    ``torch.cuda.empty_cache()`` (the cache flushed to satisfy an allocation, with a device sync),
    OOMs, and the peak of reserved memory over the history (segment allocs minus frees)."""
    flushes = ooms = 0
    reserved = peak = 0
    for trace in traces:
        for e in trace:
            action = e.get("action")
            if action in ("segment_alloc", "segment_map"):
                reserved += e.get("size", 0)
                peak = max(peak, reserved)
            elif action in ("segment_free", "segment_unmap"):
                reserved -= e.get("size", 0)
                frames = e.get("frames") or []
                if not any("empty_cache" in str(f.get("name", "")) for f in frames):
                    flushes += 1
            elif action == "oom":
                ooms += 1
    return {"cache_flushes": flushes, "history_ooms": ooms, "history_peak_reserved_bytes": peak}
