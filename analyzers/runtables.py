"""Metrics from a run directory's per-rank tables: steps, stragglers, collectives, I/O, memory,
throughput and MFU."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
from perfkit.analyzers.comms import call_index, collective_table, transfer_ns
from perfkit.analyzers.metrics import (
    CommMetrics,
    IoMetrics,
    MemoryMetrics,
    RankSteps,
    StepMetrics,
    StragglerRank,
    Stragglers,
    Throughput,
    records,
)
from perfkit.collectors.base import declared
from perfkit.collectors.base import tables as collector_tables

from perfkit.hardware import mfu
from perfkit.run import Run
from perfkit.tables import read_table

WARMUP_STEPS = 1  # the first step pays for allocation, compilation and worker start-up


@dataclass
class RunTables:
    """Every table a collector declares (``perfkit.collectors.base.tables``), all ranks in one DataFrame each,
    with a ``rank`` column; a table no rank wrote is empty, with its declared columns."""

    run: Run
    frames: dict[str, pd.DataFrame]
    notes: list[str] = field(default_factory=list)
    link_probe: pd.DataFrame = field(default_factory=pd.DataFrame)
    """The comms table's rows of ``perfkit.probe_links()``: all-reduces of a few sizes outside the
    steps, every rank arriving together (source "probe"), then all-reduces each after a burst of
    compute (source "probe-step"). They are not the job's collectives, so ``comms`` leaves them out."""

    @property
    def steps(self) -> pd.DataFrame:
        return self.frames["steps"]

    @property
    def comms(self) -> pd.DataFrame:
        return self.frames["comms"]

    @property
    def io(self) -> pd.DataFrame:
        return self.frames["io"]

    @property
    def memory(self) -> pd.DataFrame:
        return self.frames["memory"]

    @property
    def nvml(self) -> pd.DataFrame:
        return self.frames["nvml"]


def load_tables(run: Run) -> RunTables:
    notes: list[str] = []
    frames: dict[str, pd.DataFrame] = {}
    for name, table in collector_tables().items():
        parts = []
        for rank in run.ranks():
            for f in run.layout.table_files(rank, table):
                frame, n = read_table(f, table, drop_bad_rows=True)
                notes.extend(n)
                parts.append(frame.assign(rank=rank))
        frames[name] = (
            pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=[*table.columns, "rank"])
        )
    c = frames["comms"]
    probed = (
        c["source"].astype(str).str.startswith("probe")
        if "source" in c.columns
        else pd.Series(False, index=c.index)
    )
    if probed.any():
        frames["comms"] = c[~probed].reset_index(drop=True)
        return RunTables(run, frames, notes, c[probed].reset_index(drop=True))
    return RunTables(run, frames, notes)


def signal_metrics(t: RunTables) -> dict[str, Any]:
    """Each collector's own metrics (``Collector.fold``) over the steps after the warm-up, by name:
    only those whose tables hold rows."""
    s = steady(t.steps)
    out: dict[str, Any] = {}
    for c in declared():
        if c.tables and any(not t.frames[tb.name].empty for tb in c.tables):
            folded = c.fold(t.frames, s)
            if folded is not None:
                out[c.name] = folded
    return out


def steady(steps: pd.DataFrame) -> pd.DataFrame:
    later = steps[steps["step"] > WARMUP_STEPS]
    return later if not later.empty else steps


def step_metrics(t: RunTables) -> StepMetrics | None:
    s = steady(t.steps)
    if s.empty:
        return None
    phases = [
        c
        for c in (
            "data_wait_s",
            "forward_s",
            "backward_s",
            "forward_backward_s",
            "optimizer_s",
            "checkpoint_s",
        )
        if c in s.columns and s[c].notna().any()
    ]
    by_rank = s.groupby("rank")
    cpu = t.frames["cpu"]
    cpu = cpu[cpu["step"].isin(s["step"]).to_numpy()].dropna(subset=["runq_wait_s"])
    runq = cpu.groupby("rank")["runq_wait_s"].median() * 1e3
    per_rank = [
        RankSteps(
            rank=int(rank),  # type: ignore[arg-type]
            step_ms=float(g["step_time_s"].median() * 1e3),
            steps=len(g),
            phases_ms={
                p.removesuffix("_s"): float(g[p].median() * 1e3) for p in phases if g[p].notna().any()
            },
            runq_wait_ms=float(runq[rank]) if rank in runq.index else None,
        )
        for rank, g in by_rank
    ]
    median_step = float(s["step_time_s"].median())
    out = StepMetrics(
        steps=int(t.steps["step"].max()),
        step_time_ms=median_step * 1e3,
        step_time_p90_ms=float(s["step_time_s"].quantile(0.9)) * 1e3,
        per_rank=per_rank,
        phase_share={
            p.removesuffix("_s"): float(s[p].fillna(0).sum() / s["step_time_s"].sum()) for p in phases
        },
    )
    if "tokens" in s.columns and s["tokens"].notna().any():
        layout = t.run.manifest.model.get("layout", {})
        # Tensor- and pipeline-parallel ranks of one replica read the same tokens: count each once.
        replicas = max(1, t.run.manifest.world_size // max(1, layout.get("tp", 1) * layout.get("pp", 1)))
        tokens_step = float(by_rank["tokens"].median().mean()) * replicas
        out.tokens_per_step = tokens_step
        out.tokens_per_s = tokens_step / median_step
    return out


def matched_calls(c: pd.DataFrame, n_ranks: int) -> pd.DataFrame:
    """The collectives every one of ``n_ranks`` ranks made (the k-th call of a group in a step, ``k``),
    each with ``lag_ns``: how much later than this rank the last one arrived."""
    c = c.assign(k=call_index(c).to_numpy()).sort_values("seq")
    key = c.groupby(["step", "group", "k"])["start_ns"]
    matched = c[(key.transform("size") == n_ranks).to_numpy()]
    latest = matched.groupby(["step", "group", "k"])["start_ns"].transform("max")
    return matched.assign(lag_ns=latest - matched["start_ns"])


def waits(matched: pd.DataFrame, step_s: pd.Series) -> pd.Series:
    """Per (rank, step) of ``step_s``: seconds waited for the last rank at the collectives
    (``blocked_ns``), never more than the step (a rank is at most waiting all of it)."""
    return (blocked_ns(matched) / 1e9).reindex(step_s.index).fillna(0.0).clip(upper=step_s)


def blocked_ns(c: pd.DataFrame) -> pd.Series:
    """Per (rank, step): how long the rank waited for the last rank to arrive, from each collective's
    ``lag_ns`` (the latest arrival less its own).

    The lags of calls in flight together are one wait, not several: DDP issues its buckets
    asynchronously, so a rank 20 ms ahead of the others is 20 ms ahead at every bucket but waits
    those 20 ms once, at the end of backward. A chain is a run of calls each issued while an
    earlier one of the chain was still running; it costs its largest lag. A call issued after the
    previous ones ended starts a new chain (a blocking call realigns the ranks). Where the end is
    unknown: a CUDA (NCCL) call is queued and the host goes on, so it stays in flight to the step's
    end; a functional collective on gloo is waited for at once, so it is not in flight."""
    c = c.sort_values(["rank", "step", "start_ns"])
    start, end = c["start_ns"].astype(float), c["end_ns"].astype(float)
    if "gpu_ms" in c:
        end = end.mask(end.isna() & c["gpu_ms"].notna(), float("inf"))
    by = [c["rank"], c["step"]]
    in_flight = end.fillna(start).groupby(by, sort=False).cummax().groupby(by, sort=False).shift()
    new_chain = ~(start < in_flight)
    chain = new_chain.cumsum()
    lags = c.assign(chain=chain.to_numpy()).groupby(["rank", "step", "chain"], sort=False)["lag_ns"].max()
    return lags.groupby(level=["rank", "step"]).sum()


CLEAN_BUSIEST_SHARE = 0.74
"""The largest share of the steps in which one rank of a clean run was the busiest (beside a CPU hog,
bench/straggler_under_load.py)."""


def share_at_least(share: float, n: int, z: float = 1.96) -> float:
    """The lower bound of a share seen in ``n`` trials (Wilson's interval, 95% by default): what the
    share surely is at least, which a few trials put well below the share seen."""
    if n <= 0:
        return 0.0
    centre = share + z * z / (2 * n)
    spread = z * math.sqrt(share * (1 - share) / n + z * z / (4 * n * n))
    return (centre - spread) / (1 + z * z / n)


def pipeline_stages(comms: pd.DataFrame) -> dict[int, int]:
    """Each rank that sends and receives (a pipeline's point-to-point calls), by its place in that
    group's ranks, ascending: the stage order of Megatron's, torchtitan's and the bundled trainer's
    pipeline groups. Empty where no rank does."""
    if comms.empty or "group_ranks" not in comms.columns:
        return {}
    p2p = comms[comms["op"].isin(["send", "recv"]) & (comms["group_size"] > 1)]
    out: dict[int, int] = {}
    for rank, members in p2p[["rank", "group_ranks"]].drop_duplicates().itertuples(index=False):
        ranks = sorted(int(x) for x in str(members).split(",") if x.strip().isdigit())
        if int(rank) in ranks:
            out[int(rank)] = ranks.index(int(rank))
    return out


def straggler_metrics(t: RunTables) -> Stragglers | None:
    """Per rank: median busy time and how late it arrives at collectives.

    Under data parallelism every rank's step lasts as long as the slowest one's: the others wait
    for it inside the collectives. So a rank's busy time is its step time less the time it waited
    for the last rank to arrive at each collective (the k-th collective of a group in a step,
    matched across ranks by arrival). Completion times are not used: an async collective's end
    says when it finished, not how long anyone was blocked."""
    s = steady(t.steps)
    if s.empty or t.steps["rank"].nunique() < 2:
        return None
    step_s = s.set_index(["rank", "step"])["step_time_s"]
    wait = pd.Series(0.0, index=step_s.index)
    lateness = pd.Series(dtype=float)
    last_share: pd.Series | None = None
    c = t.comms
    n_ranks = t.steps["rank"].nunique()
    if not c.empty:
        matched = matched_calls(c, n_ranks)
        if not matched.empty:
            key = matched.groupby(["step", "group", "k"])["start_ns"]
            latest, earliest = key.transform("max"), key.transform("min")
            matched = matched.assign(late_ms=(matched["start_ns"] - earliest) / 1e6)
            wait = waits(matched, step_s)
            lateness = matched.groupby("rank")["late_ms"].median()
            # How often each rank is the last to arrive: a real straggler nearly always is; on a
            # noisy machine the last one is a different rank each time.
            last = matched[(matched["start_ns"] == latest).to_numpy()]
            n_matched = max(1, len(matched) // n_ranks)
            last_share = last.groupby("rank").size() / n_matched
    busy = step_s - wait
    busy_med = busy.groupby(level="rank").median()
    # a pipeline's stages differ in work by design: each rank against its own stage's ranks only
    stages = pipeline_stages(c)
    stage = pd.Series([stages.get(int(r), -1) for r in busy.index.get_level_values("rank")], index=busy.index)
    # Step by step: who was busiest, and by how much beyond that step's fastest rank. A rank that
    # sleeps 50 ms a step is the busiest in nearly every step, by ~50 ms, however slow a busy host makes
    # every rank; host noise makes each rank the busiest by turns.
    by_step = busy.groupby([busy.index.get_level_values("step"), stage])
    extra = (busy - by_step.transform("min")).groupby(level="rank").median()
    busiest = by_step.idxmax().map(lambda k: k[0]).value_counts()
    n_steps = busy.index.get_level_values("step").nunique()
    slowest_share = busiest / max(1, n_steps)
    # The training thread's run-queue wait (ready to run, but the host ran something else; the cpu
    # collector): where it explains most of a rank's extra busy time, the host is oversubscribed and
    # the rank is not a straggler to fix in the job. A rank that sleeps or computes longer is.
    cpu = t.frames["cpu"].dropna(subset=["runq_wait_s"])
    runq_med = cpu.groupby("rank")["runq_wait_s"].median() if not cpu.empty else None
    rank_stage = pd.Series({r: stages.get(int(r), -1) for r in busy_med.index})
    score = busy_med.groupby(rank_stage).transform("min") / busy_med
    wait_med = wait.groupby(level="rank").median()
    ranks = [
        StragglerRank(
            rank=int(r),
            busy_ms=float(busy_med[r] * 1e3),
            score=float(score[r]),
            arrival_late_ms=float(lateness[r]) if r in lateness.index else None,
            last_to_arrive_share=float(last_share.get(r, 0.0)) if last_share is not None else None,
            runq_wait_ms=float(runq_med[r] * 1e3) if runq_med is not None and r in runq_med.index else None,
            slowest_share=float(slowest_share.get(r, 0.0)),
            extra_ms=float(extra[r] * 1e3),
            wait_ms=float(wait_med.get(r, 0.0) * 1e3),
        )
        for r in busy_med.index
    ]
    step_ms = float(s["step_time_s"].median() * 1e3)
    host = t.frames["cpu"].dropna(subset=["host_busy"]) if "host_busy" in t.frames["cpu"] else pd.DataFrame()
    # Slow: busy for longer than 4/3 of the fastest rank and, where collectives tell, the last to
    # arrive at four in five of them; or, on a busy host where every rank is slowed alike and the
    # ratio no longer tells, the busiest rank by 15% of the step or more, in a share of the steps
    # surely above any clean run's (bench/straggler_under_load.py, 20 runs each beside a CPU hog: a
    # planted 50 ms sleep was the busiest in 97-100% of the steps by 49-66 ms; clean runs' busiest
    # rank 74% at most, by 11 ms). "Surely": the share's 95% lower bound, so a short run must be
    # all but unanimous (14 of 14 steps; a clean 16-step client run had one rank the busiest in 13
    # of 15 by 17% of the step on a shared 2-core host, and 85% of the steps had named it).
    slow, host_bound = [], []
    for x in ranks:
        share = x.last_to_arrive_share
        by_ratio = (x.score or 0.0) < 0.75 and (share is None or share >= 0.8)
        by_steps = share_at_least(x.slowest_share or 0.0, n_steps) >= CLEAN_BUSIEST_SHARE and (
            x.extra_ms or 0.0
        ) >= max(5.0, 0.15 * step_ms)
        if (by_ratio or by_steps) and (rank_stage == rank_stage[x.rank]).sum() > 1:  # peers to wait
            fastest = int(busy_med[rank_stage == rank_stage[x.rank]].idxmin())
            extra = busy_med[x.rank] - busy_med[fastest]
            if runq_med is not None and {x.rank, fastest} <= set(runq_med.index):
                if runq_med[x.rank] - runq_med[fastest] >= 0.5 * extra:
                    host_bound.append(x.rank)  # the host kept it waiting
                    continue
            slow.append(x.rank)
    return Stragglers(
        ranks=ranks,
        slow=slow,
        host_bound=host_bound,
        stages=stages,
        host_busy=float(host["host_busy"].median()) if not host.empty else None,
    )


def comm_metrics(t: RunTables) -> CommMetrics | None:
    c = t.comms
    if c.empty:
        return None
    # Host-side durations where the end is known (gloo, synchronous calls), from the later of the
    # last rank's arrival and the end of the group's previous collective (the queue and the wait for
    # other ranks are not the link's time); the GPU's own duration for NCCL collectives, whose
    # host-side end is only when they were queued.
    host_ns = transfer_ns(c)
    gpu_ns = c["gpu_ms"].astype(float) * 1e6 if "gpu_ms" in c else host_ns * float("nan")
    c = c.assign(duration_ns=gpu_ns.where(gpu_ns.notna(), host_ns))
    per_step = (
        c[c["step"] > WARMUP_STEPS].groupby(["rank", "step"]).agg(n=("op", "size"), bytes=("bytes", "sum"))
    )
    out = CommMetrics(
        table=records(collective_table(c)),
        collectives_per_step=float(per_step["n"].median()) if not per_step.empty else 0.0,
        bytes_per_step=float(per_step["bytes"].median()) if not per_step.empty else 0.0,
    )
    out.callers = caller_table(c, steady(t.steps))
    ddp = c[c["source"] == "ddp"]
    if not ddp.empty:
        b = (
            ddp[ddp["step"] > WARMUP_STEPS]
            .groupby(["rank", "step"])
            .agg(n=("op", "size"), bytes=("bytes", "median"))
        )
        if not b.empty:
            out.ddp_buckets_per_step = float(b["n"].median())
            out.ddp_bucket_bytes = float(b["bytes"].median())
        # DDP hands over the last bucket when backward ends; what still runs after that is the
        # communication the step waits for, exposed.
        by_step = ddp[ddp["step"] > WARMUP_STEPS].groupby(["rank", "step"])
        tail = (by_step["end_ns"].max() - by_step["start_ns"].max()).dropna()
        if not tail.empty:
            out.ddp_exposed_ms = float(tail.median() / 1e6)
        if "gpu_ms" in ddp and ddp["gpu_ms"].notna().any():
            out.ddp_gpu_ms = float(by_step["gpu_ms"].sum(min_count=1).dropna().median())
    return out


def caller_table(c: pd.DataFrame, steps: pd.DataFrame) -> list[dict[str, Any]]:
    """The collectives a script or its framework calls itself (the Python API, not DDP's buckets,
    DTensor or FSDP's own), by caller and op: calls, time and transfer a step (averaged over every
    rank's steady steps, so a call made every 10 steps costs a tenth), message size, and whether the
    host blocked in them. ``c`` carries ``duration_ns`` (the transfer)."""
    if "caller" not in c or c["caller"].isna().all() or steps.empty:
        return []
    rank_steps = max(1, len(steps))
    mine = c[c["caller"].notna().to_numpy() & c["step"].isin(steps["step"]).to_numpy()]
    if mine.empty:
        return []
    mine = mine.assign(
        host_ns=(mine["end_ns"].astype(float) - mine["start_ns"].astype(float)),
        blocking=mine["blocking"].fillna(False).astype(bool) if "blocking" in mine else False,
    )
    rows = []
    for (caller, op), g in mine.groupby(["caller", "op"], sort=False):
        rows.append(
            {
                "caller": str(caller),
                "op": str(op),
                "calls_per_step": len(g) / rank_steps,
                "bytes": float(g["bytes"].median()),
                "blocking": bool(g["blocking"].all()),
                "ms_per_step": float(g["host_ns"].sum() / rank_steps / 1e6),
                "transfer_ms_per_step": float(g["duration_ns"].sum() / rank_steps / 1e6),
            }
        )
    return sorted(rows, key=lambda r: -r["ms_per_step"])


def io_metrics(t: RunTables) -> IoMetrics:
    out = IoMetrics()
    s = steady(t.steps)
    if not s.empty and "data_wait_s" in s.columns:
        out.data_wait_share = float(s["data_wait_s"].sum() / s["step_time_s"].sum())
        out.data_wait_ms = float(s["data_wait_s"].median() * 1e3)
    io = t.io
    if not io.empty:
        reads = io[io["kind"] == "read"]
        if not reads.empty:
            out.read_latency_p50_ms = float(reads["latency_s"].quantile(0.5) * 1e3)
            out.read_latency_p99_ms = float(reads["latency_s"].quantile(0.99) * 1e3)
            out.reads = len(reads)
        saves = io[io["kind"] == "checkpoint_save"]
        if not saves.empty:
            out.checkpoint_saves = int(saves.groupby("step").ngroups)
            out.checkpoint_save_ms_max = float(saves.groupby(["step"])["latency_s"].max().max() * 1e3)
            out.checkpoint_save_bytes = float(saves["bytes"].fillna(0).sum())
    return out


def memory_metrics(t: RunTables) -> MemoryMetrics | None:
    m = t.memory
    if m.empty:
        return None
    out = MemoryMetrics(rss_max_bytes=float(m["rss"].max()))
    if "allocated" in m.columns and m["allocated"].notna().any():
        out.peak_allocated_bytes = float(m["peak_allocated"].max())
        out.reserved_max_bytes = float(m["reserved"].max())
        out.inactive_split_max_bytes = float(m["inactive_split"].max())
        out.alloc_retries = int(m["alloc_retries"].max())
        out.ooms = int(m["ooms"].max())
        out.fragmentation = float((m["reserved"] - m["allocated"]).max() / max(1.0, m["reserved"].max()))
    return out


def throughput_metrics(
    t: RunTables, steps: StepMetrics | None, peak_tflops: float | None
) -> Throughput | None:
    """Achieved FLOP/s from the FLOPs per token the workload declared in the manifest (the bundled
    trainer does; a script can with ``perfkit.describe(flops_per_token=...)``), and MFU against the
    GPU's peak."""
    fpt = t.run.manifest.model.get("flops_per_token")
    if not fpt or steps is None or steps.tokens_per_s is None:
        return None
    achieved = fpt * steps.tokens_per_s / 1e12
    out = Throughput(flops_per_token=float(fpt), achieved_tflops=achieved)
    if peak_tflops:
        out.peak_tflops_per_gpu = peak_tflops
        out.mfu = mfu(fpt, steps.tokens_per_s, peak_tflops, t.run.manifest.world_size)
    return out
