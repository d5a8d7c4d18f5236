"""How the ranks of a job differ, from their traces: a slow GPU, a rank the others wait for, a slow
link.

Under synchronous collectives every rank's step lasts as long as the slowest one's, and the
difference shows up inside the collectives: the ranks that arrive early wait there (their
communication kernels run long), the last one does not. So, per step and rank:

- a **slow GPU** computes longer than the others (its compute kernels), and the others wait for it;
- a **late rank** (host side: data, CPU, launch) computes as fast as the others but its
  communication kernels are much shorter than theirs: the others wait for it;
- a **slow link** makes every collective of the groups that use it slow, on all their members:
  among groups of one shape (size and stride), those far above the typical per-call time are
  slow; where slow groups of two shapes meet in one rank (a tp and a dp group), that rank is named.

Ranks are compared with their peers only: those that run the same number of kernels a step (within
2%), so the stages of a pipeline, which differ by design, are never called slow for it. An outlier
is beyond its peers' median by a relative margin *and* by several median absolute deviations, so
jitter between healthy ranks names nobody. Fewer than four peers: nothing said.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from perfkit.analyzers.facts import TraceFacts
from perfkit.analyzers.metrics import GpuRank, RankSpread, SlowGroup

MIN_RANKS = 4
SLOW_GPU = 1.10
"""A rank computing 10% longer than the median rank."""
LATE = 0.02
"""A rank whose communication kernels take less than the median rank's by 2% of the step or more
(the median rank's include whatever waiting the whole job does, so a share of them would hide a
real straggler behind a collective-heavy step)."""
SLOW_GROUP = 1.25
"""A group whose collectives take 25% longer than the typical group of its shape."""
MADS = 6.0
"""And beyond this many median absolute deviations (at least 1% of the median each)."""


def _outliers(values: dict[Any, float], factor: float = 1.0, *, below: float | None = None) -> list[Any]:
    """Keys whose value is above ``factor`` times the median (or, with ``below``, under the median
    by that much or more), and beyond MADS deviations either way."""
    if len(values) < MIN_RANKS:
        return []
    med = statistics.median(values.values())
    mad = statistics.median(abs(v - med) for v in values.values()) * 1.4826
    margin = MADS * max(mad, 0.01 * abs(med))
    if below is not None:
        return [k for k, v in values.items() if v < med - max(below, margin)]
    return [k for k, v in values.items() if v > med * factor and v > med + margin]


def _shape(ranks: list[int] | None, name: str) -> tuple[Any, ...]:
    if not ranks:
        return ("name", name.rstrip("0123456789"))
    return ("ranks", len(ranks), tuple(b - a for a, b in zip(ranks, ranks[1:], strict=False)))


def rank_spread(facts: Sequence[TraceFacts]) -> RankSpread | None:
    if len(facts) < MIN_RANKS:
        return None
    per_rank = []
    for f in facts:
        steps = f.gpu_steps or 1.0
        b = f.breakdown or {}
        per_rank.append(
            GpuRank(
                rank=f.rank,
                compute_ms=b.get("compute_ns", 0) / steps / 1e6,
                comm_ms=f.comm_kernel_ns / steps / 1e6,
                idle_ms=b.get("idle_ns", 0) / steps / 1e6,
            )
        )
    step_ms = statistics.median(f.step_ms for f in facts)
    slow_gpu: list[int] = []
    late: list[int] = []
    by_rank = {r.rank: r for r in per_rank}
    for peers in _peers(facts):
        compute = {r: by_rank[r].compute_ms for r in peers}
        comm = {r: by_rank[r].comm_ms for r in peers}
        for r in peers:
            by_rank[r].peer_compute_ms = statistics.median(compute.values())
            by_rank[r].peer_comm_ms = statistics.median(comm.values())
        slow = _outliers(compute, SLOW_GPU) if statistics.median(compute.values()) > 0 else []
        if statistics.median(comm.values()) > 0:
            # The others wait for this rank. Its own compute above the median explains a third of
            # that wait or more: its GPU is slow, though the fleet's spread hid it from the outlier
            # test (15% slower among GPUs that differ by 3% had been named a late rank); else its
            # host is late (it computes as fast as the others).
            med_compute, med_comm = statistics.median(compute.values()), statistics.median(comm.values())
            for r in _outliers(comm, below=LATE * step_ms):
                if r in slow:
                    continue
                if compute[r] - med_compute >= (med_comm - comm[r]) / 3:
                    slow.append(r)
                else:
                    late.append(r)
        slow_gpu += slow
    compute_all = [r.compute_ms for r in per_rank]
    comm_all = [r.comm_ms for r in per_rank]
    groups = _slow_groups(facts)
    return RankSpread(
        ranks=sorted(per_rank, key=lambda r: r.rank),
        median_compute_ms=statistics.median(compute_all),
        median_comm_ms=statistics.median(comm_all),
        slow_gpu=sorted(slow_gpu),
        late=sorted(late),
        slow_groups=groups,
        slow_link=_common(groups),
    )


def _peers(facts: Sequence[TraceFacts]) -> list[list[int]]:
    """Ranks in sets of peers: those whose kernels a step agree within 2%."""
    kps = sorted(((f.breakdown or {}).get("kernels", 0) / max(1, f.steps), f.rank) for f in facts)
    out: list[list[int]] = []
    first = None
    for value, rank in kps:
        if first is None or value > first * 1.02 + 1e-9:
            out.append([])
            first = value
        out[-1].append(rank)
    return out


def _slow_groups(facts: Sequence[TraceFacts]) -> list[SlowGroup]:
    """Groups whose collectives take much longer than the other groups of their shape."""
    calls: dict[str, list[float]] = defaultdict(list)  # group -> per member: ms per call
    members: dict[str, list[int] | None] = {}
    per_step: dict[str, list[float]] = defaultdict(list)
    for f in facts:
        for name, g in f.comm_groups.items():
            if g["calls"]:
                calls[name].append(g["ns"] / g["calls"] / 1e6)
                per_step[name].append(g["calls"] / (f.gpu_steps or 1.0))
                members[name] = g["ranks"]
    call_ms = {name: statistics.median(v) for name, v in calls.items()}
    by_shape: dict[tuple[Any, ...], dict[str, float]] = defaultdict(dict)
    for name, ms in call_ms.items():
        by_shape[_shape(members[name], name)][name] = ms
    out = []
    for same in by_shape.values():
        typical = statistics.median(same.values()) if same else 0.0
        for name in _outliers(same, SLOW_GROUP):
            out.append(
                SlowGroup(
                    name=name,
                    ranks=members[name],
                    call_ms=same[name],
                    typical_ms=typical,
                    calls_per_step=statistics.median(per_step[name]),
                )
            )
    return sorted(out, key=lambda g: -g.call_ms / max(g.typical_ms, 1e-9))


def _common(groups: list[SlowGroup]) -> list[int]:
    """The ranks every slow group contains, when the slow groups are of two shapes or more (one
    shape alone cannot tell which member's link is slow)."""
    if len({_shape(g.ranks, g.name) for g in groups}) < 2 or any(g.ranks is None for g in groups):
        return []
    common = set(groups[0].ranks or [])
    for g in groups[1:]:
        common &= set(g.ranks or [])
    return sorted(common)
