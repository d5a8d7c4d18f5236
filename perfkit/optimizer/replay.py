"""What-if by replay: a change applied to each traced rank's step graphs (its critical paths,
``perfkit.analyzers.critical_path``) and the graphs' longest paths taken again.

A replay first replays the basis unchanged: where the critical path of a profiled step does not
reproduce that step's span within ``REPRODUCE`` (the trace does not hold what sets the step: work
outside any profiled op, a step cut short by the profiler's window), or where the trace has fewer than
``MIN_STEPS`` profiled steps, it refuses and says why. A prediction is the measured step time less what
the change takes off the path; its uncertainty is the spread of that over the profiled steps and ranks.

``LayoutReplay`` predicts another parallel layout of the reference trainer the same way (the sweep's
predictions where its basis has a trace): the basis's steps replayed with the layout's share of the
work on a rank (its FLOPs, its optimizer's parameters) and the basis's own collectives at what they
cost in the layout (gone where it has none), the overlap as the trace has it; to that, what the trace
cannot hold, from the layout model: the layout's new collectives, its pipeline bubble, the measured
costs of its microbatches, checkpointing and DTensor parameters.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from perfkit.analyzers.breakdown import profiler_steps
from perfkit.analyzers.critical_path import Change, CriticalPath, critical_path
from perfkit.analyzers.trace import Trace, load_trace
from perfkit.errors import ConfigError, RunDirError

if TYPE_CHECKING:
    from perfkit.optimizer.layoutmodel import Basis, Prediction
    from perfkit.trainer.config import TrainConfig

REPRODUCE = 0.05
"""How closely the unchanged replay of a step must reproduce the step's span."""
MIN_STEPS = 2
"""Profiled steps a rank's trace must hold: one step is all warm-up, and has no spread."""


@dataclass
class RankReplay:
    rank: int
    spans_ms: list[float]
    """Each profiled step's span (its ProfilerStep annotation)."""
    replayed_ms: list[float]
    """Each step's critical path, unchanged."""
    changed_ms: list[float]
    by_kind_before: dict[str, float] = field(default_factory=dict)
    by_kind_after: dict[str, float] = field(default_factory=dict)

    @property
    def saved_ms(self) -> list[float]:
        return [a - b for a, b in zip(self.replayed_ms, self.changed_ms, strict=True)]


@dataclass
class Replay:
    source: str
    change: Change
    step_ms: float
    """The measured step (the analysis's median step, else the traces' profiled steps')."""
    ranks: list[RankReplay]

    @property
    def saved_ms(self) -> float:
        """What the change takes off the job's step: the least any rank saves (the ranks of a
        synchronous job wait for the slowest), median over its steps."""
        return min(statistics.median(r.saved_ms) for r in self.ranks)

    @property
    def predicted_ms(self) -> float:
        return self.step_ms - self.saved_ms

    @property
    def uncertainty_ms(self) -> float:
        """Half the range of the per-step savings, over every rank's steps."""
        every = [s for r in self.ranks for s in r.saved_ms]
        return (max(every) - min(every)) / 2 if len(every) > 1 else 0.0


def parse_change(speedups: tuple[str, ...], link: str | None) -> Change:
    """``--speedup attention=2`` (repeatable) and ``--link-bandwidth 2x`` as a ``Change``."""
    out: dict[str, float] = {}
    for s in speedups:
        key, sep, value = s.partition("=")
        try:
            k = float(value.strip().removesuffix("x"))
        except ValueError:
            k = -1.0
        if not sep or not key.strip() or not k > 0:
            raise ConfigError(
                f"--speedup {s!r}: give FAMILY=K (K times faster, K > 0), e.g. --speedup attention=2; families: "
                "gemm, attention, elementwise, normalization, softmax, optimizer, memory, communication, host, or "
                "a piece of a kernel's or op's name"
            )
        out[key.strip()] = k
    factor = 1.0
    if link is not None:
        try:
            factor = float(link.strip().lower().removesuffix("x"))
        except ValueError:
            factor = -1.0
        if not factor > 0:
            raise ConfigError(
                f"--link-bandwidth {link!r}: give how many times faster, e.g. --link-bandwidth 2x"
            )
    return Change(speedup=out, link=factor)


def replay(source: Path, change: Change) -> Replay:
    """Replay ``change`` on every trace of ``source`` (a run directory or one trace)."""
    from perfkit.run import Run, RunLayout

    step_ms: float | None = None
    if source.is_dir() and RunLayout(source).is_run():
        run = Run.open(source)
        traces = run.layout.traces()
        from perfkit.analyzers.runtables import load_tables, step_metrics

        measured = step_metrics(load_tables(run))
        step_ms = measured.step_time_ms if measured else None
    elif source.is_file():
        traces = [source]
    else:
        raise RunDirError(f"{source}: no such run directory or trace")
    if not traces:
        raise RunDirError(
            f"{source}: holds no kernel trace to replay; profile with --profile-steps (3 steps or more)"
        )
    ranks = []
    for path in traces:
        trace, steps = traced_steps(path)
        r = RankReplay(trace.rank, [], [], [])
        for t0, t1, before in steps:
            after = critical_path(trace, t0, t1, change=change)
            if after is None:
                continue
            r.spans_ms.append((t1 - t0) / 1e6)
            r.replayed_ms.append(before.length_ns / 1e6)
            r.changed_ms.append(after.length_ns / 1e6)
            for kinds, p in ((r.by_kind_before, before), (r.by_kind_after, after)):
                for k, v in p.by_kind.items():
                    kinds[k] = kinds.get(k, 0.0) + v / 1e6
        n = len(r.spans_ms)
        r.by_kind_before = {k: v / n for k, v in r.by_kind_before.items()}
        r.by_kind_after = {k: v / n for k, v in r.by_kind_after.items()}
        ranks.append(r)
    if step_ms is None:
        step_ms = statistics.median(s for r in ranks for s in r.spans_ms)
    return Replay(str(source), change, step_ms, ranks)


def traced_steps(path: Path) -> tuple[Trace, list[tuple[int, int, CriticalPath]]]:
    """A rank's trace and its profiled steps (start, end, critical path unchanged); a ``RunDirError``
    that says why where they cannot be replayed: too few, or a path that misses its step's span by
    more than ``REPRODUCE`` (the trace does not hold what sets the step)."""
    trace = load_trace(path)
    found = profiler_steps(trace)
    if len(found) < MIN_STEPS:
        raise RunDirError(
            f"{path}: {len(found)} profiled step(s); a replay needs {MIN_STEPS} or more (one step is "
            "warm-up and has no spread): profile with --profile-steps 3-5"
        )
    steps = []
    for t0, t1 in zip(found["ts"].tolist(), found["end"].tolist(), strict=True):
        before = critical_path(trace, int(t0), int(t1))
        if before is not None:
            steps.append((int(t0), int(t1), before))
    if len(steps) < MIN_STEPS:
        raise RunDirError(f"{path}: its profiled steps hold no events to replay")
    span = statistics.median((t1 - t0) / 1e6 for t0, t1, _ in steps)
    replayed = statistics.median(p.length_ns / 1e6 for _, _, p in steps)
    if abs(replayed - span) > REPRODUCE * span:
        raise RunDirError(
            f"{path}: replayed unchanged, its steps' critical path is {replayed:.3g} ms against the "
            f"{span:.3g} ms the steps took ({replayed / span - 1:+.0%}, more than {REPRODUCE:.0%}): the trace "
            "does not hold what sets its step, so a replay cannot predict a change; profile more steps "
            "(--profile-steps) or ask perfkit whatif --set of the layout model"
        )
    return trace, steps


LAYOUT_STEPS = 3
"""Profiled steps of each rank a layout's replay takes (its last ones: the first may still warm up);
the sweep traces its basis's last steps this many."""


@dataclass
class LayoutReplay:
    """A basis's traced steps, to predict the reference trainer's other layouts by replay."""

    basis: Basis
    ranks: list[tuple[Trace, list[tuple[int, int, CriticalPath]]]]
    scale: float
    """The basis's median step over its profiled steps' median span: what the profiler adds to a
    step is taken out of what a change saves."""

    @classmethod
    def of(cls, basis: Basis, traced: Path | None = None) -> LayoutReplay:
        """The traces of the basis's run (or of ``traced``, a run of the same layout), ready to
        replay; a ``RunDirError`` that says why where they cannot be (none, too few steps, a
        pipeline basis, a path that misses its steps)."""
        from perfkit.run import Run

        if basis.shape.layout.pp > 1:
            raise RunDirError(
                f"{basis.run}: a pipeline basis's traced steps hold its stages' waits for each other, not "
                "a rank's whole work: layouts are predicted by the layout model alone"
            )
        run = traced or Path(basis.run)
        traces = Run.open(run).layout.traces()
        if not traces:
            raise RunDirError(f"{run}: holds no kernel trace to replay (profile it with --profile-steps)")
        ranks = []
        for path in traces:
            trace, steps = traced_steps(path)
            ranks.append((trace, steps[-LAYOUT_STEPS:]))
        span = statistics.median((t1 - t0) / 1e9 for _, steps in ranks for t0, t1, _ in steps)
        return cls(basis, ranks, basis.median_step_s / span if span > 0 else 1.0)

    def change(self, cfg: TrainConfig, world_size: int) -> Change:
        """The layout as a change of the basis's steps: its share of the compute (``rest``) and of
        the optimizer's parameters, and its cost of the basis's own kinds of collectives (``link``)."""
        from perfkit.optimizer.layoutmodel import step_parts

        b = self.basis
        shape, base = b.shape_of(cfg, world_size), b.shape
        own = step_parts(b, base)
        now = step_parts(b, shape)
        spent = sum(own.values())
        ratio = sum(now.get(k, 0.0) for k in own) / spent if spent > 0 else 1.0
        return Change(
            speedup={"optimizer": base.optimizer_params / max(1.0, shape.optimizer_params)},
            link=1 / ratio if ratio > 0 else math.inf,
            rest=base.flops / shape.flops if shape.flops > 0 else 1.0,
        )

    def predict(self, cfg: TrainConfig, world_size: int) -> Prediction:
        """``cfg``'s step: the basis's median step, less what the change takes off each rank's
        replayed steps (the slowest rank's median; the ranks wait for each other), scaled to the
        unprofiled step; plus what the layout model says the trace cannot hold, and the basis's
        stalls."""
        from perfkit.optimizer.layoutmodel import (
            CORES_LENT,
            LATE_RECEIVES,
            dtensor_params,
            predict,
            step_parts,
            with_stalls,
        )

        b = self.basis
        shape, base = b.shape_of(cfg, world_size), b.shape
        change = self.change(cfg, world_size)
        own = step_parts(b, base)
        grown = 0.0
        if shape.cfg.device != "cuda" and change.link < 1.0:
            # gloo's collectives cost more in the layout (smaller DDP buckets): what they add as the
            # layout model has it, on the compute's cores; the trace's own, their waits and all,
            # stretched by the ratio had put 0.05 MB buckets 34% over (the model: 1.6%)
            grown = sum(own.values()) * (1 / change.link - 1)
            change = dataclasses.replace(change, link=1.0)
        saved = []
        for trace, steps in self.ranks:
            per_step = []
            for t0, t1, before in steps:
                after = critical_path(trace, t0, t1, change=change)
                per_step.append((before.length_ns - (after.length_ns if after else 0)) / 1e9)
            saved.append(per_step)
        model = predict(b, cfg, world_size)
        parts = {
            "the basis's steps, replayed": b.median_step_s
            - min(statistics.median(s) for s in saved) * self.scale
        }
        parts |= {k: v for k, v in step_parts(b, shape).items() if k not in own}  # its new collectives
        if shape.cfg.device != "cuda" and change.link != 1.0:
            # gloo runs its collectives on threads of the same cores as the compute: what the trace
            # shows them overlap still slowed it (pipelines replayed 1-2 ms high on 2 CPU cores
            # where only the path's share of DDP's all-reduce went)
            exposed = (
                statistics.median(
                    p.by_kind.get("communication", 0) / 1e9 for _, steps in self.ranks for _, _, p in steps
                )
                * self.scale
            )
            hidden = max(0.0, sum(own.values()) - exposed)
            parts["the basis's collectives beside its compute"] = hidden * (1 / change.link - 1)
        if grown:
            parts["the basis's collectives, as the layout has them"] = grown
        was = b.measured_parts(base)
        parts |= {k: v - was.get(k, 0.0) for k, v in b.measured_parts(shape).items()}
        for k in ("pipeline bubble", LATE_RECEIVES, CORES_LENT):  # as the layout model simulates the schedule
            parts[k] = model.time_parts.get(k, 0.0)
        parts["optimizer (DTensor parameters)"] = (b.dtensor_param_s or 0.0) * (
            dtensor_params(shape) - dtensor_params(base)
        )
        parts = {k: v for k, v in parts.items() if v}
        step = with_stalls(b, parts)
        every = [s * self.scale for per in saved for s in per]
        spread = max(b.spread_s * step / b.step_s if b.step_s > 0 else 0.0, (max(every) - min(every)) / 2)
        # the memory as the model predicts it (a trace holds no other layout's memory)
        return dataclasses.replace(model, step_s=step, time_parts=parts, uncertainty_s=spread)


def replay_lines(r: Replay) -> list[str]:
    """``perfkit whatif --speedup/--link-bandwidth``: the basis replayed, the change, by kind."""
    parts = [f"--speedup {k}={v:g}" for k, v in r.change.speedup.items()]
    if r.change.link != 1.0:
        parts.append(f"--link-bandwidth {r.change.link:g}x")
    n = sum(len(x.spans_ms) for x in r.ranks)
    lines = [
        f"perfkit whatif: {r.source} with {' '.join(parts) or 'no change'} (replayed on the critical paths of "
        f"{n} profiled step(s) of {len(r.ranks)} rank(s))",
        "",
        f"{'':<30}{'measured':>10}{'replayed':>10}{'changed':>10}   ratio  ±ms",
    ]
    replayed = statistics.median(s for x in r.ranks for s in x.replayed_ms)
    spans = statistics.median(s for x in r.ranks for s in x.spans_ms)
    lines.append(
        f"{'time per step (ms)':<30}{r.step_ms:>10.1f}{r.step_ms - spans + replayed:>10.1f}"
        f"{r.predicted_ms:>10.1f}   {r.predicted_ms / r.step_ms:.2f}x  ±{r.uncertainty_ms:.2g}"
    )
    lines += ["", "critical path a step by kind (ms), rank by rank"]
    for x in r.ranks:
        keys = dict.fromkeys([*x.by_kind_before, *x.by_kind_after])
        row = ", ".join(
            f"{k} {x.by_kind_before.get(k, 0):.3g} -> {x.by_kind_after.get(k, 0):.3g}" for k in keys
        )
        lines.append(f"  rank {x.rank}: {row}")
    lines += [
        "",
        f"measured: the run's median step; replayed: each profiled step's critical path unchanged (within "
        f"{REPRODUCE:.0%} of the step it replays, or the replay refuses); changed: the measured step less what "
        "the change takes off the path (the least any rank saves), ± half the range over the steps",
    ]
    if r.change.link != 1.0:
        lines.append(
            "note: a faster link shortens the collectives' whole time on the path, the wait for the last rank "
            "included (see the report's waiting share)"
        )
    return lines
