"""Metrics from a run directory's per-rank tables: steps, stragglers, collectives, I/O, memory,
throughput and MFU."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from perfkit.analyzers.comms import collective_table

from perfkit.run import Run
from perfkit.tables import COMMS, IO, MEMORY, STEPS, Table, read_table

WARMUP_STEPS = 1  # the first step pays for allocation, compilation and worker start-up


@dataclass
class RunTables:
    run: Run
    steps: pd.DataFrame
    comms: pd.DataFrame
    io: pd.DataFrame
    memory: pd.DataFrame
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

    return RunTables(run, load(STEPS), load(COMMS), load(IO), load(MEMORY), notes)


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
    """Per rank: median busy time (step time less time blocked in collectives) and how late it
    arrives at collectives. Under data parallelism every rank's step takes as long as the slowest,
    so step time alone cannot name the straggler; the others wait for it inside the collectives."""
    s = steady(t.steps)
    if s.empty or t.steps["rank"].nunique() < 2:
        return {}
    c = t.comms
    wait = pd.Series(0.0, index=pd.MultiIndex.from_frame(s[["rank", "step"]]))
    lateness = pd.Series(dtype=float)
    if not c.empty and c["end_ns"].notna().any():
        timed = c[c["end_ns"].notna()].assign(dur=lambda d: (d["end_ns"] - d["start_ns"]) / 1e9)
        wait = timed.groupby(["rank", "step"])["dur"].sum()
        # Match the k-th collective of a group in a step across ranks; lateness = start - earliest.
        timed = timed.sort_values("seq")
        timed["k"] = timed.groupby(["rank", "step", "group"]).cumcount()
        first = timed.groupby(["step", "group", "k"])["start_ns"].transform("min")
        timed["late_ms"] = (timed["start_ns"] - first) / 1e6
        lateness = timed.groupby("rank")["late_ms"].median()
    busy = s.set_index(["rank", "step"])["step_time_s"] - wait.reindex(
        s.set_index(["rank", "step"]).index
    ).fillna(0)
    busy_med = busy.groupby(level="rank").median()
    score = busy_med.min() / busy_med
    ranks = [
        {
            "rank": int(r),
            "busy_ms": float(busy_med[r] * 1e3),
            "score": float(score[r]),
            "arrival_late_ms": float(lateness.get(r, np.nan)),
        }
        for r in busy_med.index
    ]
    return {"ranks": ranks, "slow": [x["rank"] for x in ranks if x["score"] < 0.75]}


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
    from perfkit.trainer.config import ModelConfig
    from perfkit.trainer.model import flops_per_token

    fpt = flops_per_token(ModelConfig(**cfg))
    achieved = fpt * steps["tokens_per_s"] / 1e12
    out: dict[str, Any] = {"flops_per_token": fpt, "achieved_tflops": achieved}
    if peak_tflops:
        gpus = t.run.manifest.world_size
        out["peak_tflops_per_gpu"] = peak_tflops
        out["mfu"] = achieved / (peak_tflops * gpus)
    return out
