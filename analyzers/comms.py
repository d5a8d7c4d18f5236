"""Communication metrics: per collective and size bucket, count, bytes, time, algorithm and bus
bandwidth (nccl-tests' factors), from perfkit's comms tables or from NCCL kernels in a trace."""

from __future__ import annotations

import numpy as np
import pandas as pd
from perfkit.analyzers.trace import Trace, by_name

COLLECTIVE_NAMES = (
    "gloo:",
    "nccl:",
    "c10d::",
    "_c10d_functional::",
    "c10d_functional::",
    "record_param_comms",
    "kernel nccl",
    "ProcessGroup",
    "torch.distributed",
)
"""How the ops, annotations and kernels of a collective begin (the NCCL kernels' names hold "nccl")."""


def is_collective(name: str) -> bool:
    """A collective's op, annotation or kernel: its time includes waiting for the other ranks."""
    return name.startswith(COLLECTIVE_NAMES) or "nccl" in name.lower()


def bus_factor(op: str, n: int) -> float:
    """nccl-tests' PERFORMANCE.md: busbw = algbw × factor."""
    if n <= 1:
        return 0.0
    if op == "all_reduce":
        return 2 * (n - 1) / n
    if op in ("all_gather", "reduce_scatter", "all_to_all"):
        return (n - 1) / n
    return 1.0


def pipeline_fill(pp: int, microbatches: int, stages_per_rank: int) -> float:
    """A pipeline step's compute over that of its microbatches alone: (m + (pp - 1) / v) / m
    (GPipe and 1F1B: v = 1; interleaved 1F1B with v stages a rank)."""
    return (microbatches + (pp - 1) / stages_per_rank) / microbatches


def service_ns(c: pd.DataFrame) -> pd.Series:
    """Each collective's own time on the host clock: its end less the later of its start and the
    end of the rank's previous collective in the same group. Async collectives queue behind each
    other (ZeRO-1's 69 broadcasts of tiny-cpu, issued in 1.6 ms, complete over 26 ms one after
    another), so end - start counts the queue too: their sum is then many times the step. NaN where
    the end is unknown."""
    if c.empty:
        return pd.Series(dtype=float, index=c.index)
    order = c.sort_values(["start_ns"], kind="stable")
    known = order["end_ns"].notna().to_numpy()
    # int64 throughout: an epoch time in float64 ns has 256 ns steps
    floor = np.iinfo(np.int64).min
    end = pd.Series(np.where(known, order["end_ns"].fillna(0).astype(np.int64), floor), index=order.index)
    keys = [order["rank"], order["group"].fillna("")] if "rank" in order else [order["group"].fillna("")]
    previous = end.groupby(keys).cummax().groupby(keys).shift(1, fill_value=floor)
    begin = np.maximum(order["start_ns"].astype(np.int64).to_numpy(), previous.to_numpy())
    own = np.where(known, np.maximum(end.to_numpy() - begin, 0), np.nan)
    return pd.Series(own, index=order.index).reindex(c.index)


def call_index(c: pd.DataFrame) -> pd.Series:
    """Each call's position among its rank's calls of the same group in the same step (in issue
    order): every rank of a group issues its collectives in one order, so the k-th call of a group
    in a step is the same collective on every rank."""
    order = c.sort_values("seq", kind="stable")
    return (
        order.groupby([order["rank"], order["step"], order["group"].fillna("")]).cumcount().reindex(c.index)
    )


def transfer_ns(c: pd.DataFrame) -> pd.Series:
    """Each collective's transfer: its own time (``service_ns``) from when the last rank of its
    group arrived. A rank that comes early spends the difference waiting, and that wait says nothing
    of the link: a bandwidth over it reads 0.003 GB/s on a busy host. NaN where the end is unknown;
    the own time where the other ranks' calls are not in the table."""
    own = service_ns(c)
    if c.empty or "rank" not in c or c["rank"].nunique() < 2:
        return own
    base = int(c["start_ns"].min())  # float64 of epoch ns has 256 ns steps: work from the first start
    start = (c["start_ns"].astype(np.int64) - base).astype(float)
    end = (c["end_ns"].astype(float) - base) if c["end_ns"].notna().any() else start * np.nan
    begin = end - own
    latest = start.groupby([c["step"], c["group"].fillna(""), call_index(c)]).transform("max")
    return (end - np.maximum(begin, latest)).clip(lower=0)


def own_ns(c: pd.DataFrame) -> pd.Series:
    """Each collective's own time: the GPU's where it was recorded (NCCL, whose host-side end is when
    it was queued), else its own time on the host clock (``service_ns``)."""
    host = service_ns(c)
    if "gpu_ms" not in c:
        return host
    gpu = c["gpu_ms"].astype(float) * 1e6
    return gpu.where(gpu.notna(), host)


_BUCKETS = [0, 64 << 10, 1 << 20, 16 << 20, 256 << 20, 1 << 62]
_BUCKET_NAMES = ["<64KiB", "64KiB-1MiB", "1-16MiB", "16-256MiB", ">=256MiB"]


def size_bucket(nbytes: pd.Series) -> pd.Series:
    """Message-size class; "unknown" where the trace did not record the size."""
    return pd.cut(nbytes, _BUCKETS, labels=_BUCKET_NAMES, right=False).astype(object).fillna("unknown")


def collective_table(comms: pd.DataFrame) -> pd.DataFrame:
    """``comms``: rows with op, bytes, group_size, duration_ns (NaN where unknown), rank.
    Returns one row per (op, size bucket): count, bytes, time, algbw and busbw in GB/s."""
    if comms.empty:
        return pd.DataFrame(columns=["op", "size", "count", "bytes", "time_ms", "algbw_gbps", "busbw_gbps"])
    df = comms.assign(size=size_bucket(comms["bytes"]))
    timed = df[df["duration_ns"].notna() & (df["duration_ns"] > 0)]
    agg = (
        df.groupby(["op", "size"], observed=True)
        .agg(count=("bytes", "size"), bytes=("bytes", "sum"), group_size=("group_size", "max"))
        .reset_index()
    )
    t = timed.groupby(["op", "size"], observed=True).agg(
        time_ns=("duration_ns", "sum"), timed_bytes=("bytes", "sum")
    )
    agg = agg.merge(t.reset_index(), on=["op", "size"], how="left")
    agg["time_ms"] = agg["time_ns"] / 1e6
    agg["algbw_gbps"] = agg["timed_bytes"] / agg["time_ns"]  # bytes/ns == GB/s
    agg["busbw_gbps"] = agg["algbw_gbps"] * [
        bus_factor(o, int(n)) for o, n in zip(agg["op"], agg["group_size"].fillna(1))
    ]
    return agg.drop(columns=["time_ns", "timed_bytes"]).sort_values(["op", "size"], ignore_index=True)


_NCCL_OPS = {
    "AllReduce": "all_reduce",
    "AllGather": "all_gather",
    "ReduceScatter": "reduce_scatter",
    "Broadcast": "broadcast",
    "Reduce": "reduce",
    "SendRecv": "send_recv",
    "AllToAll": "all_to_all",
}
_DTYPE_BYTES = {
    "Float": 4,
    "float": 4,
    "Half": 2,
    "BFloat16": 2,
    "Double": 8,
    "Int": 4,
    "Long": 8,
    "Byte": 1,
    "Char": 1,
}


def trace_collectives(trace: Trace) -> pd.DataFrame:
    """NCCL kernels of a trace as collective rows (op, bytes where the trace records them, duration)."""
    ev = trace.events
    kern = ev[(ev["cat"] == "kernel").to_numpy() & by_name(ev["name"], lambda n: "nccl" in n.lower(), bool)]
    if kern.empty:
        return pd.DataFrame(columns=["op", "bytes", "group_size", "duration_ns", "rank"])
    op = pd.Series(
        by_name(kern["name"], lambda n: next((v for k, v in _NCCL_OPS.items() if k in n), "other")),
        index=kern.index,
    )
    nbytes = pd.Series(np.nan, index=kern.index)
    group = pd.Series(float(trace.world_size or 1), index=kern.index)
    if not trace.comm_args.empty:
        # record_param_comms (CPU) and its kernel share the External id.
        meta = trace.comm_args.join(ev[["ext_id"]], how="left")
        meta = meta[meta["ext_id"] >= 0].drop_duplicates("ext_id").set_index("ext_id")
        ids = kern["ext_id"]
        found = ids.isin(meta.index)
        if found.any():
            m = meta.loc[ids[found]]
            elems = np.maximum(
                pd.to_numeric(m["in_nelems"], errors="coerce").to_numpy(),
                pd.to_numeric(m["out_nelems"], errors="coerce").to_numpy(),
            )
            width = m["dtype"].map(_DTYPE_BYTES).fillna(4).to_numpy()
            nbytes[found.to_numpy()] = elems * width
            gs = pd.to_numeric(m["group_size"], errors="coerce").to_numpy()
            mask = found.to_numpy()
            group[mask] = np.where(np.isnan(gs), group[mask], gs)
    return pd.DataFrame(
        {
            "op": op.values,
            "bytes": nbytes.values,
            "group_size": group.values,
            "duration_ns": kern["dur"].values.astype(float),
            "rank": trace.rank,
        }
    )
