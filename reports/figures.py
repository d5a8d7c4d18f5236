"""Plotly figures from an analysis' tables and metrics. No metric is computed here: figures only
draw what the analyzers produced."""

from __future__ import annotations

from typing import Any

import numpy as np
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
MANY = 32
"""Above this many ranks a per-rank bar chart becomes a distribution, outlier ranks named."""
LINES = 16
"""Up to this many ranks, one line each; above, the ranks' median and p10-p90 band, and the three
ranks furthest above it."""
HEATMAP_ROWS = 64
"""A rank x step heatmap of more ranks shows bins of consecutive ranks (each bin's worst)."""


def _rank_axis(ranks: Any) -> dict[str, Any]:
    """A category axis of ranks in numeric order (never 0, 1, 10, 11, ..., 2)."""
    return dict(type="category", categoryorder="array", categoryarray=[str(r) for r in sorted(ranks)])


def _boxes(fig: go.Figure, ranks: list[int], series: dict[str, list[float]]) -> None:
    """One box per series over the ranks; the outliers drawn as points that name their rank."""
    text = [f"rank {r}" for r in ranks]
    for name, values in series.items():
        fig.add_box(
            y=values,
            name=name,
            boxpoints="outliers",
            text=text,
            hovertemplate="%{text}: %{y:.3g}<extra>" + name + "</extra>",
        )


def _lines(fig: go.Figure, table: pd.DataFrame, column: str, scale: float, label: str = "") -> None:
    """One line per rank, or for many ranks their spread and the three highest ranks."""
    ranks = table["rank"].nunique()
    if ranks <= LINES:
        for rank, s in table.groupby("rank"):
            fig.add_scatter(
                x=s["step"], y=s[column] * scale, mode="lines+markers", name=f"rank {rank}{label}"
            )
        return
    by_step = table.groupby("step")[column]
    q = by_step.quantile(np.array([0.1, 0.5, 0.9])).unstack() * scale
    fig.add_scatter(x=q.index, y=q[0.9], line=dict(width=0), showlegend=False, hoverinfo="skip")
    fig.add_scatter(
        x=q.index,
        y=q[0.1],
        fill="tonexty",
        line=dict(width=0),
        fillcolor="rgba(99,110,250,0.25)",
        name=f"{ranks} ranks, p10-p90{label}",
    )
    fig.add_scatter(x=q.index, y=q[0.5], name=f"median rank{label}", line=dict(color="#636efa"))
    for rank in table.groupby("rank")[column].median().nlargest(3).index:
        s = table[table["rank"] == rank]
        fig.add_scatter(x=s["step"], y=s[column] * scale, mode="lines", name=f"rank {rank}{label}")


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
    frame = frame.sort_values("rank")
    accounted = pd.Series(0.0, index=frame.index)
    series: dict[str, pd.Series] = {}
    for p in PHASES:
        col = f"{p}_ms"
        if col in frame and frame[col].notna().any():
            series[p.replace("_", " ")] = frame[col]
            accounted += frame[col].fillna(0)
    series["other"] = (frame["step_ms"] - accounted).clip(lower=0)
    _waits_apart(metrics, frame, series)
    fig = go.Figure()
    if len(frame) > MANY:
        _boxes(
            fig,
            frame["rank"].tolist(),
            {"step": frame["step_ms"].tolist(), **{k: v.tolist() for k, v in series.items()}},
        )
        fig.update_layout(
            title=f"Median step time by phase over {len(frame)} ranks", yaxis_title="ms", **_LAYOUT
        )
        return fig
    for name, values in series.items():
        fig.add_bar(name=name, x=frame["rank"].astype(str), y=values)
    # Up to nine parts (phases, other, the two waits): the legend goes to the right, clear of the title.
    layout = {**_LAYOUT, "legend": dict(orientation="v", x=1.02, y=1)}
    fig.update_layout(
        barmode="stack",
        title="Median step time by phase, per rank",
        xaxis_title="rank",
        xaxis=_rank_axis(frame["rank"]),
        yaxis_title="ms",
        **layout,
    )
    return fig


def _waits_apart(metrics: Metrics, frame: pd.DataFrame, series: dict[str, pd.Series]) -> None:
    """Take waiting out of the phases it happened in, as bars of its own: the wait for other ranks at
    collectives (step time less busy time; it falls in backward, where DDP waits for its buckets, and
    in the time outside the marked phases, where blocking calls wait) and the wait for a CPU core (the
    training thread's run-queue time, spread over the phases in proportion to their length)."""
    st = metrics.stragglers
    if st is None:
        return
    by_rank = {r.rank: r for r in st.ranks}
    ranks = frame["rank"].tolist()
    rank_wait = pd.Series(
        [max(0.0, s - by_rank[r].busy_ms) if r in by_rank else 0.0 for r, s in zip(ranks, frame["step_ms"])],
        index=frame.index,
    )
    core_wait = pd.Series(
        [(by_rank[r].runq_wait_ms or 0.0) if r in by_rank else 0.0 for r in ranks], index=frame.index
    )
    left = rank_wait.copy()
    for name in ("backward", "other", "forward backward"):
        if name in series:
            taken = pd.concat([left, series[name]], axis=1).min(axis=1).clip(lower=0)
            series[name] = series[name] - taken
            left = left - taken
    total = sum(series.values(), pd.Series(0.0, index=frame.index))
    share = (core_wait / total.where(total > 0)).fillna(0.0).clip(upper=1.0)
    for name in list(series):
        series[name] = series[name] * (1 - share)
    if rank_wait.sum() > 0:
        series["waiting for other ranks"] = rank_wait - left
    if core_wait.sum() > 0:
        series["waiting for a CPU core"] = total * share


def per_step(
    table: pd.DataFrame | None, column: str, title: str, unit: str = "ms", scale: float = 1e3
) -> go.Figure | None:
    """One line per rank of a per-step column (seconds shown as ms by default); None without data."""
    if table is None or table.empty or column not in table or table[column].isna().all():
        return None
    fig = go.Figure()
    _lines(fig, table.dropna(subset=[column]), column, scale)
    fig.update_layout(title=title, xaxis_title="step", yaxis_title=unit, **_LAYOUT)
    return fig


def straggler_heatmap(steps: pd.DataFrame | None) -> go.Figure | None:
    if steps is None or steps.empty or steps["rank"].nunique() < 2:
        return None
    grid = steps.pivot_table(index="rank", columns="step", values="step_time_s", aggfunc="first") * 1e3
    grid = grid.sort_index()
    title = "Step time, rank x step"
    labels = [f"rank {r}" for r in grid.index]
    if len(grid) > HEATMAP_ROWS:  # bins of consecutive ranks, each showing its slowest
        size = -(-len(grid) // HEATMAP_ROWS)
        bins = [grid.index[i : i + size] for i in range(0, len(grid), size)]
        labels = [f"ranks {b[0]}-{b[-1]}" if len(b) > 1 else f"rank {b[0]}" for b in bins]
        grid = pd.DataFrame([grid.loc[b].max() for b in bins], columns=grid.columns)
        title = f"Step time, rank x step ({size} ranks a row, the slowest of each)"
    fig = go.Figure(
        go.Heatmap(z=grid.values, x=grid.columns, y=labels, colorscale="Viridis", colorbar=dict(title="ms"))
    )
    layout = {**_LAYOUT, "height": max(340, min(900, 14 * len(labels) + 120))}
    fig.update_layout(title=title, xaxis_title="step", yaxis=dict(autorange="reversed"), **layout)
    return fig


def _parts_by_rank(
    ranks: list[int],
    parts: dict[str, list[float]],
    title: str,
    yaxis: str,
    colors: dict[str, str] | None = None,
) -> go.Figure:
    """Each rank's parts stacked, a bar a rank; over ``MANY`` ranks each part's distribution, the
    outlier ranks named."""
    fig = go.Figure()
    if len(ranks) > MANY:
        _boxes(fig, ranks, parts)
        fig.update_layout(title=f"{title}, over {len(ranks)} ranks", yaxis_title=yaxis, **_LAYOUT)
        return fig
    for key, values in parts.items():
        fig.add_bar(name=key, x=[str(r) for r in ranks], y=values, marker_color=(colors or {}).get(key))
    fig.update_layout(
        barmode="stack",
        title=title,
        xaxis_title="rank",
        xaxis=_rank_axis(ranks),
        yaxis_title=yaxis,
        **_LAYOUT,
    )
    return fig


def gpu_breakdown(metrics: Metrics) -> go.Figure | None:
    rows = [(r, v.temporal_breakdown) for r, v in sorted(metrics.trace.items()) if v.temporal_breakdown]
    if not rows:
        return None
    keys = ("compute", "communication", "memory", "idle")
    return _parts_by_rank(
        [r for r, _ in rows],
        {k: [b[f"{k}_pct"] for _, b in rows] for k in keys},
        "GPU time: compute, communication, memory, idle (%)",
        "% of the profiled span",
    )


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
    # log scale: small messages' bandwidth is thousands of times below the large ones' (a linear axis
    # showed no bar at all for <64KiB)
    fig.update_layout(
        title="Bus bandwidth by collective and message size", yaxis_title="GB/s", yaxis_type="log", **_LAYOUT
    )
    return fig


def memory_timeline(memory: pd.DataFrame | None) -> go.Figure | None:
    if memory is None or memory.empty:
        return None
    fig = go.Figure()
    if memory["rank"].nunique() > LINES:
        column = "allocated" if "allocated" in memory and memory["allocated"].notna().any() else "rss"
        _lines(fig, memory.dropna(subset=[column]), column, 1 / 2**20, f" {column}")
        fig.update_layout(title="Memory per step", xaxis_title="step", yaxis_title="MiB", **_LAYOUT)
        return fig
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
    predicted = [
        (r["predicted"]["step_ms"], r["label"]) for r in rows if (r.get("predicted") or {}).get("step_ms")
    ]
    if predicted:
        fig.add_scatter(
            name="predicted",
            x=[p[0] for p in predicted],
            y=[p[1] for p in predicted],
            mode="markers",
            marker=dict(size=11, symbol="diamond-open", line=dict(width=2)),
        )
    fig.update_layout(
        title=title,
        xaxis_title="ms per step (lower is better)",
        yaxis=dict(autorange="reversed"),
        **{**_LAYOUT, "height": max(260, 90 + 34 * len(rows)), "margin": dict(l=200, r=20, t=70, b=50)},
    )
    return fig


def watch_timeline(summary: pd.DataFrame | None, anomalies: list[dict[str, Any]]) -> go.Figure | None:
    """A watched job's whole timeline from its per-window summaries: each rank's median step time
    per window (its p90 dotted), with each anomaly drawn from its start (to its end, if it ended)."""
    if summary is None or summary.empty:
        return None
    fig = go.Figure()
    _lines(fig, summary, "step_ms_p50", 1.0)
    if summary["rank"].nunique() <= LINES:
        for rank, s in summary.groupby("rank"):
            fig.add_scatter(
                x=s["step"],
                y=s["step_ms_p90"],
                mode="lines",
                line=dict(dash="dot", width=1),
                name=f"rank {rank} p90",
            )
    last = int(summary["step"].max())
    for i, a in enumerate(anomalies):
        start = a.get("start_step")
        if start is None:
            continue
        fig.add_vrect(
            x0=start,
            x1=a.get("end_step") or last,
            fillcolor="rgba(239,85,59,0.12)",
            line_width=0,
            annotation_text=f"{a.get('id')}: {a.get('kind')} ({a.get('subject')})",
            annotation_position=("top left", "bottom left", "top right", "bottom right")[i % 4],
        )
    fig.update_layout(
        title="The whole job: median step time per window, anomalies shaded",
        xaxis_title="step (window's last)",
        yaxis_title="ms",
        height=360,
    )
    return fig


PATH_COLORS = {
    "compute": "#636efa",
    "communication": "#ef553b",
    "waiting": "#ff9f1c",
    "memory": "#00cc96",
    "host": "#ab63fa",
    "launch": "#ffa15a",
    "gpu_gap": "#b6b6b6",
    "input": "#19d3f3",
}


def critical_path_kinds(metrics: Metrics) -> go.Figure | None:
    """Each traced rank's critical path a step, by what it is (stacked, ms)."""
    rows = [(r, t.critical_path) for r, t in sorted(metrics.trace.items()) if t.critical_path]
    if not rows:
        return None
    kinds = [k for k in PATH_COLORS if any(p.by_kind_ms.get(k) for _, p in rows)]
    ranks = [r for r, _ in rows]
    fig = _parts_by_rank(
        ranks,
        {k: [p.by_kind_ms.get(k, 0.0) for _, p in rows] for k in kinds},
        "Critical path a step, by what it is (ms; the step's span marked)",
        "ms a step",
        PATH_COLORS,
    )
    if len(ranks) <= MANY:
        fig.add_scatter(
            x=[str(r) for r in ranks],
            y=[p.step_ms for _, p in rows],
            mode="markers",
            marker=dict(symbol="line-ew-open", size=28, color="black"),
            name="step span",
        )
    return fig


def critical_path_timeline(rank: int, segments: list[dict[str, Any]]) -> go.Figure | None:
    """One step's critical path drawn on its timeline: each stretch on its lane (a CPU thread, a GPU
    stream), coloured by what it is, named on hover."""
    if not segments:
        return None
    fig = go.Figure()
    for kind, color in PATH_COLORS.items():
        part = [s for s in segments if s["kind"] == kind]
        if not part:
            continue
        fig.add_bar(
            orientation="h",
            base=[s["start_ms"] for s in part],
            x=[max(s["end_ms"] - s["start_ms"], 1e-4) for s in part],
            y=[s["lane"] for s in part],
            text=[s["name"] for s in part],
            hovertemplate="%{text}<br>%{base:.3f} ms, %{x:.3f} ms long<extra>" + kind + "</extra>",
            marker_color=color,
            name=kind,
        )
    fig.update_layout(
        barmode="overlay",
        title=f"Rank {rank}: the median step's critical path on its timeline",
        xaxis_title="ms from the step's start",
        **{**_LAYOUT, "height": 260},
    )
    return fig
