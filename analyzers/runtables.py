"""Metrics from a run directory's per-rank tables: steps, stragglers, collectives, I/O, memory,
throughput and MFU."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from perfkit.analyzers.comms import collective_table

from perfkit.run import Run
from perfkit.tables import COMMS, IO, MEMORY, NVML, STEPS, Table, read_table

WARMUP_STEPS = 1  # the first step pays for allocation, compilation and worker start-up


@dataclass
class RunTables:
    run: Run
    steps: pd.DataFrame
    comms: pd.DataFrame
    io: pd.DataFrame
    memory: pd.DataFrame
    nvml: pd.DataFrame
    notes: list[str] = field(default_factory=list)


def load_tables(run: Run) -> RunTables:
    notes: list[str] = []

    def load(t: Table) -> pd.DataFrame:
        frames = []
        for rank in run.ranks():
            d = run.path / f"rank{rank}"
            for f in sorted([t.file(d), *d.glob(f"{t.name}.w*.jsonl")]):
                if f.exists():
                    frame, n = read_table(f, t)
                    notes.extend(n)
                    frames.append(frame.assign(rank=rank))
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=[*t.columns, "rank"])

    return RunTables(run, load(STEPS), load(COMMS), load(IO), load(MEMORY), load(NVML), notes)


def steady(steps: pd.DataFrame) -> pd.DataFrame:
    later = steps[steps["step"] > WARMUP_STEPS]
    return later if not later.empty else steps


def step_metrics(t: RunTables) -> dict[str, Any]:
    s = steady(t.steps)
    if s.empty:
        return {}
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
        if c in s.columns
    ]
    per_rank = s.groupby("rank").agg(step_ms=("step_time_s", "median"), steps=("step", "size"))
    per_rank["step_ms"] *= 1e3
    for p in phases:
        per_rank[p.removesuffix("_s") + "_ms"] = s.groupby("rank")[p].median() * 1e3
    median_step = float(s["step_time_s"].median())
    out: dict[str, Any] = {
        "steps": int(t.steps["step"].max()),
        "step_time_ms": median_step * 1e3,
        "step_time_p90_ms": float(s["step_time_s"].quantile(0.9)) * 1e3,
        "per_rank": per_rank.reset_index().to_dict("records"),
        "phase_share": {
            p.removesuffix("_s"): float(s[p].fillna(0).sum() / s["step_time_s"].sum()) for p in phases
        },
    }
    if "tokens" in s.columns and s["tokens"].notna().any():
        cfg = t.run.manifest.config.get("parallel", {})
        # Tensor- and pipeline-parallel ranks of one replica read the same tokens: count each once.
        replicas = max(1, t.run.manifest.world_size // max(1, cfg.get("tp", 1) * cfg.get("pp", 1)))
        tokens_step = float(s.groupby("rank")["tokens"].median().mean()) * replicas
        out["tokens_per_step"] = tokens_step
        out["tokens_per_s"] = tokens_step / median_step
    return out


def straggler_metrics(t: RunTables) -> dict[str, Any]:
    """Per rank: median busy time and how late it arrives at collectives.

    Under data parallelism every rank's step lasts as long as the slowest one's: the others wait
    for it inside the collectives. So a rank's busy time is its step time less the time it waited
    for the last rank to arrive at each collective (the k-th collective of a group in a step,
    matched across ranks by arrival). Completion times are not used: an async collective's end
    says when it finished, not how long anyone was blocked."""
    s = steady(t.steps)
    if s.empty or t.steps["rank"].nunique() < 2:
        return {}
    index = pd.MultiIndex.from_frame(s[["rank", "step"]])
    wait = pd.Series(0.0, index=index)
    lateness = pd.Series(dtype=float)
    last_share: pd.Series | None = None
    c = t.comms
    n_ranks = t.steps["rank"].nunique()
    if not c.empty:
        c = c.sort_values("seq")
        c = c.assign(k=c.groupby(["rank", "step", "group"]).cumcount())
        key = c.groupby(["step", "group", "k"])["start_ns"]
        complete = key.transform("size") == n_ranks
        matched = c[complete.to_numpy()]
        if not matched.empty:
            key = matched.groupby(["step", "group", "k"])["start_ns"]
            latest, earliest = key.transform("max"), key.transform("min")
            matched = matched.assign(
                wait_s=(latest - matched["start_ns"]) / 1e9, late_ms=(matched["start_ns"] - earliest) / 1e6
            )
            wait = matched.groupby(["rank", "step"])["wait_s"].sum().reindex(index).fillna(0.0)
            lateness = matched.groupby("rank")["late_ms"].median()
            # How often each rank is the last to arrive: a real straggler nearly always is; on a
            # noisy machine the last one is a different rank each time.
            last = matched[(matched["start_ns"] == latest).to_numpy()]
            n_matched = max(1, len(matched) // n_ranks)
            last_share = last.groupby("rank").size() / n_matched
    busy = s.set_index(["rank", "step"])["step_time_s"] - wait
    busy_med = busy.groupby(level="rank").median()
    score = busy_med.min() / busy_med
    ranks = [
        {
            "rank": int(r),
            "busy_ms": float(busy_med[r] * 1e3),
            "score": float(score[r]),
            "arrival_late_ms": float(lateness.get(r, np.nan)),
            "last_to_arrive_share": float(last_share.get(r, 0.0)) if last_share is not None else None,
        }
        for r in busy_med.index
    ]
    # Slow: busy for longer than 4/3 of the fastest rank and, where collectives tell, the last to
    # arrive at four in five of them.
    slow = []
    for x in ranks:
        share, rank_score = x["last_to_arrive_share"], float(x["score"] or 0.0)
        if rank_score < 0.75 and (share is None or share >= 0.8):
            slow.append(x["rank"])
    return {"ranks": ranks, "slow": slow}


def comm_metrics(t: RunTables) -> dict[str, Any]:
    c = t.comms
    if c.empty:
        return {}
    c = c.assign(duration_ns=(c["end_ns"] - c["start_ns"]).astype(float))
    table = collective_table(c)
    per_step = (
        c[c["step"] > WARMUP_STEPS].groupby(["rank", "step"]).agg(n=("op", "size"), bytes=("bytes", "sum"))
    )
    ddp = c[c["source"] == "ddp"]
    out: dict[str, Any] = {
        "table": table.to_dict("records"),
        "collectives_per_step": float(per_step["n"].median()) if not per_step.empty else 0.0,
        "bytes_per_step": float(per_step["bytes"].median()) if not per_step.empty else 0.0,
    }
    if not ddp.empty:
        b = (
            ddp[ddp["step"] > WARMUP_STEPS]
            .groupby(["rank", "step"])
            .agg(n=("op", "size"), bytes=("bytes", "median"))
        )
        if not b.empty:
            out["ddp_buckets_per_step"] = float(b["n"].median())
            out["ddp_bucket_bytes"] = float(b["bytes"].median())
    return out


def io_metrics(t: RunTables) -> dict[str, Any]:
    out: dict[str, Any] = {}
    s = steady(t.steps)
    if not s.empty and "data_wait_s" in s.columns:
        out["data_wait_share"] = float(s["data_wait_s"].sum() / s["step_time_s"].sum())
        out["data_wait_ms"] = float(s["data_wait_s"].median() * 1e3)
    io = t.io
    if not io.empty:
        reads = io[io["kind"] == "read"]
        if not reads.empty:
            out["read_latency_p50_ms"] = float(reads["latency_s"].quantile(0.5) * 1e3)
            out["read_latency_p99_ms"] = float(reads["latency_s"].quantile(0.99) * 1e3)
            out["reads"] = int(len(reads))
        saves = io[io["kind"] == "checkpoint_save"]
        if not saves.empty:
            out["checkpoint_saves"] = int(saves.groupby("step").ngroups)
            out["checkpoint_save_ms_max"] = float(saves.groupby(["step"])["latency_s"].max().max() * 1e3)
            out["checkpoint_save_bytes"] = float(saves["bytes"].fillna(0).sum())
    return out


def memory_metrics(t: RunTables) -> dict[str, Any]:
    m = t.memory
    if m.empty:
        return {}
    out: dict[str, Any] = {"rss_max_bytes": float(m["rss"].max())}
    if "allocated" in m.columns and m["allocated"].notna().any():
        out.update(
            peak_allocated_bytes=float(m["peak_allocated"].max()),
            reserved_max_bytes=float(m["reserved"].max()),
            inactive_split_max_bytes=float(m["inactive_split"].max()),
            alloc_retries=int(m["alloc_retries"].max()),
            ooms=int(m["ooms"].max()),
        )
        out["fragmentation"] = float((m["reserved"] - m["allocated"]).max() / max(1.0, m["reserved"].max()))
    return out


def throughput_metrics(t: RunTables, steps: dict[str, Any], peak_tflops: float | None) -> dict[str, Any]:
    cfg = t.run.manifest.config.get("model")
    if not cfg or "tokens_per_s" not in steps:
        return {}
    from perfkit.trainer.config import ModelConfig, flops_per_token

    fpt = flops_per_token(ModelConfig(**cfg))
    achieved = fpt * steps["tokens_per_s"] / 1e12
    out: dict[str, Any] = {"flops_per_token": fpt, "achieved_tflops": achieved}
    if peak_tflops:
        gpus = t.run.manifest.world_size
        out["peak_tflops_per_gpu"] = peak_tflops
        out["mfu"] = achieved / (peak_tflops * gpus)
    return out
