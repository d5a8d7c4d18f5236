"""Plotly figures from an analysis' tables and metrics. No metric is computed here: figures only
draw what the analyzers produced."""

from __future__ import annotations

from typing import Any

import pandas as pd
import plotly.graph_objects as go
import plotly.io as pio
from perfkit.analyzers.metrics import Metrics

_LAYOUT = dict(
    template="plotly_white",
    height=340,
    margin=dict(l=60, r=20, t=70, b=50),
    legend=dict(orientation="h", yanchor="bottom", y=1.02, x=0),  # above the plot, clear of the axis title
)
PHASES = ("data_wait", "forward", "backward", "forward_backward", "optimizer", "checkpoint")


def html(fig: go.Figure) -> str:
    """The figure as a div; plotly.js is inlined once by the page, and plotly escapes "</" in its data."""
    return str(pio.to_html(fig, full_html=False, include_plotlyjs=False, config={"displaylogo": False}))


def step_breakdown(metrics: Metrics) -> go.Figure | None:
    if metrics.steps is None or not metrics.steps.per_rank:
        return None
    frame = pd.DataFrame(
        [
            {"rank": r.rank, "step_ms": r.step_ms, **{f"{k}_ms": v for k, v in r.phases_ms.items()}}
            for r in metrics.steps.per_rank
        ]
    )
    fig = go.Figure()
    accounted = pd.Series(0.0, index=frame.index)
    for p in PHASES:
        col = f"{p}_ms"
        if col in frame and frame[col].notna().any():
            fig.add_bar(name=p.replace("_", " "), x=frame["rank"].astype(str), y=frame[col])
            accounted += frame[col].fillna(0)
    fig.add_bar(name="other", x=frame["rank"].astype(str), y=(frame["step_ms"] - accounted).clip(lower=0))
    fig.update_layout(
        barmode="stack",
        title="Median step time by phase, per rank",
        xaxis_title="rank",
        yaxis_title="ms",
        **_LAYOUT,
    )
    return fig


def per_step(
    table: pd.DataFrame | None, column: str, title: str, unit: str = "ms", scale: float = 1e3
) -> go.Figure | None:
    """One line per rank of a per-step column (seconds shown as ms by default); None without data."""
    if table is None or table.empty or column not in table or table[column].isna().all():
        return None
    fig = go.Figure()
    for rank, s in table.groupby("rank"):
        fig.add_scatter(x=s["step"], y=s[column] * scale, mode="lines+markers", name=f"rank {rank}")
    fig.update_layout(title=title, xaxis_title="step", yaxis_title=unit, **_LAYOUT)
    return fig


def straggler_heatmap(steps: pd.DataFrame | None) -> go.Figure | None:
    if steps is None or steps.empty or steps["rank"].nunique() < 2:
        return None
    grid = steps.pivot_table(index="rank", columns="step", values="step_time_s", aggfunc="first") * 1e3
    fig = go.Figure(
        go.Heatmap(
            z=grid.values,
            x=grid.columns,
            y=[f"rank {r}" for r in grid.index],
            colorscale="Viridis",
            colorbar=dict(title="ms"),
        )
    )
    fig.update_layout(title="Step time, rank x step", xaxis_title="step", **_LAYOUT)
    return fig


def gpu_breakdown(metrics: Metrics) -> go.Figure | None:
    rows = [(r, v.temporal_breakdown) for r, v in sorted(metrics.trace.items()) if v.temporal_breakdown]
    if not rows:
        return None
    fig = go.Figure()
    for key in ("compute", "communication", "memory", "idle"):
        fig.add_bar(name=key, x=[f"rank {r}" for r, _ in rows], y=[b[f"{key}_pct"] for _, b in rows])
    fig.update_layout(
        barmode="stack",
        title="GPU time: compute, communication, memory, idle (%)",
        yaxis_title="% of the profiled span",
        **_LAYOUT,
    )
    return fig


def kernel_categories(table: pd.DataFrame | None) -> go.Figure | None:
    if table is None or table.empty:
        return None
    total = table.groupby("category")["time_ns"].sum().sort_values(ascending=False)
    fig = go.Figure(go.Bar(x=list(total.index), y=total.to_numpy() / 1e6))
    fig.update_layout(title="GPU kernel time by category (all ranks)", yaxis_title="ms", **_LAYOUT)
    return fig


def bus_bandwidth(table: pd.DataFrame | None) -> go.Figure | None:
    if table is None or table.empty or table["busbw_gbps"].isna().all():
        return None
    t = table.dropna(subset=["busbw_gbps"])
    fig = go.Figure(go.Bar(x=t["op"] + " " + t["size"], y=t["busbw_gbps"]))
    fig.update_layout(title="Bus bandwidth by collective and message size", yaxis_title="GB/s", **_LAYOUT)
    return fig


def memory_timeline(memory: pd.DataFrame | None) -> go.Figure | None:
    if memory is None or memory.empty:
        return None
    fig = go.Figure()
    for rank, m in memory.groupby("rank"):
        if "allocated" in m and m["allocated"].notna().any():
            fig.add_scatter(x=m["step"], y=m["allocated"] / 2**20, name=f"rank {rank} allocated")
            fig.add_scatter(
                x=m["step"], y=m["reserved"] / 2**20, name=f"rank {rank} reserved", line=dict(dash="dot")
            )
        else:
            fig.add_scatter(x=m["step"], y=m["rss"] / 2**20, name=f"rank {rank} RSS")
    fig.update_layout(title="Memory per step", xaxis_title="step", yaxis_title="MiB", **_LAYOUT)
    return fig


def read_latency(io: pd.DataFrame | None) -> go.Figure | None:
    if io is None or io.empty or not (io["kind"] == "read").any():
        return None
    reads = io[io["kind"] == "read"]
    fig = go.Figure(go.Histogram(x=reads["latency_s"] * 1e3, nbinsx=40))
    fig.update_layout(title="Dataset read latency", xaxis_title="ms", yaxis_title="reads", **_LAYOUT)
    return fig


def nvml_series(nvml: pd.DataFrame | None) -> go.Figure | None:
    if nvml is None or nvml.empty:
        return None
    fig = go.Figure()
    t0 = nvml["t_ns"].min()
    for gpu, g in nvml.groupby("gpu"):
        fig.add_scatter(x=(g["t_ns"] - t0) / 1e9, y=g["gpu_util"], name=f"GPU {gpu} util %")
        fig.add_scatter(x=(g["t_ns"] - t0) / 1e9, y=g["power_w"], name=f"GPU {gpu} power W", yaxis="y2")
    fig.update_layout(
        title="NVML",
        xaxis_title="s",
        yaxis=dict(title="%"),
        yaxis2=dict(title="W", overlaying="y", side="right"),
        **_LAYOUT,
    )
    return fig


def trial_runs(rows: list[dict[str, Any]], title: str) -> go.Figure | None:
    """Median time per step of each configuration (bars) and every run of it (dots), so the noise
    between runs is in view beside the differences. ``rows``: label, step_ms, runs[].step_ms."""
    rows = [r for r in rows if r.get("step_ms")]
    if not rows:
        return None
    labels = [r["label"] for r in rows]
    fig = go.Figure()
    fig.add_bar(name="median", y=labels, x=[r["step_ms"] for r in rows], orientation="h", opacity=0.55)
    dots = [
        (run["step_ms"], r["label"])
        for r in rows
        for run in r["runs"]
        if run.get("ok") and run.get("step_ms")
    ]
    fig.add_scatter(
        name="each run", x=[d[0] for d in dots], y=[d[1] for d in dots], mode="markers", marker=dict(size=8)
    )
    fig.update_layout(
        title=title,
        xaxis_title="ms per step (lower is better)",
        yaxis=dict(autorange="reversed"),
        **{**_LAYOUT, "height": max(260, 90 + 34 * len(rows)), "margin": dict(l=200, r=20, t=70, b=50)},
    )
    return fig
