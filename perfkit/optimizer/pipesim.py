"""A pipeline step simulated as torch.distributed.pipelining runs it: each stage's program of
forward and backward chunks, sends and receives, in the order ``Schedule1F1B`` and ``ScheduleGPipe``
(torch 2.13) issue them, and the point where each waits. A transfer completes ``latency`` after
both its ends have posted it (gloo's and NCCL's point-to-point calls meet: a send waits for its
receive), so a stage that waits on a batch holding its send to a busy neighbour waits for that
neighbour too. The closed form (the busiest stage's microbatches and one of each other stage) has
no such waits.

A receive posted after its send, while the sender computes, costs the receiver ``late_receive``
more: on gloo the post itself blocks until the sender's side answers (on 2 CPU cores 0.1 ms most
times, 2-6 ms one time in three; under 0.1 where the sender waits). GPipe meets it on its
forwards (its first stage runs ahead, its sends unwaited), 1F1B hardly ever (each stage waits on
its neighbour's batch first). Its cost is fitted to the pipelined copy's step under GPipe over
its step under 1F1B (``perfkit.trainer.costs.pipeline_costs``, ``fit_late_receive``): the
trainer's tiny-cpu pp2 with 8 microbatches took 42.4 ms under GPipe against 37.7 under 1F1B, and
was predicted 41.6 and 37.8 (one sweep). The excess moves with the host: a stand-alone pp2
(``bench/pipeline_schedule.py``) measured -1.2 to +7.2 ms over nine runs.
"""

from __future__ import annotations

import bisect
import functools
import math
from dataclasses import dataclass

PIPE_MICROBATCHES = (2, 6)
"""The pipelined copy's microbatches (``perfkit.trainer.costs.pipeline_costs``), in multiples of its
stages (1F1B takes one a stage at least): the few and the many; GPipe runs the many."""

Op = tuple[str, int, int, int]
"""A transfer: its kind ("f" activations forward, "b" gradients back), its sender, its receiver
and its microbatch."""


@dataclass(frozen=True)
class Compute:
    seconds: float


@dataclass(frozen=True)
class Post:
    ops: tuple[Op, ...]


@dataclass(frozen=True)
class Wait:
    ops: tuple[Op, ...]


Action = Compute | Post | Wait


def _fwd_recv(r: int, mb: int) -> list[Op]:
    return [("f", r - 1, r, mb)] if r > 0 else []


def _fwd_send(r: int, p: int, mb: int) -> list[Op]:
    return [("f", r, r + 1, mb)] if r < p - 1 else []


def _bwd_recv(r: int, p: int, mb: int) -> list[Op]:
    return [("b", r + 1, r, mb)] if r < p - 1 else []


def _bwd_send(r: int, mb: int) -> list[Op]:
    return [("b", r, r - 1, mb)] if r > 0 else []


def _batch(ops: list[Op]) -> list[Action]:
    return [Post(tuple(ops)), Wait(tuple(ops))] if ops else []


def one_f_one_b(r: int, p: int, m: int, f: float, b: float) -> list[Action]:
    """Stage ``r`` of ``p`` under ``Schedule1F1B`` with ``m`` microbatches, a forward chunk taking
    ``f`` and a backward ``b``."""
    prog: list[Action] = []
    warmup = min(m, p - r)
    fwd = bwd = 0
    send_work: list[Op] = []
    fwd_sends: list[Op] = []
    for _ in range(warmup):
        prog += _batch(_fwd_recv(r, fwd))
        prog.append(Compute(f))
        if send_work:
            prog.append(Wait(tuple(send_work)))
            send_work = []
        fwd_sends = _fwd_send(r, p, fwd)
        if fwd != warmup - 1 and fwd_sends:
            prog.append(Post(tuple(fwd_sends)))
            send_work, fwd_sends = fwd_sends, []
        fwd += 1
    bwd_sends: list[Op] = []
    while True:
        prog += _batch(fwd_sends + _bwd_recv(r, p, bwd))
        prog.append(Compute(b))
        bwd_sends = _bwd_send(r, bwd)
        bwd += 1
        if fwd == m:
            break
        prog += _batch(bwd_sends + _fwd_recv(r, fwd))
        prog.append(Compute(f))
        fwd_sends = _fwd_send(r, p, fwd)
        fwd += 1
    send_work = bwd_sends
    if send_work:
        prog.append(Post(tuple(send_work)))
    while bwd < m:
        prog += _batch(_bwd_recv(r, p, bwd))
        prog.append(Compute(b))
        if send_work:
            prog.append(Wait(tuple(send_work)))
        send_work = _bwd_send(r, bwd)
        if send_work:
            prog.append(Post(tuple(send_work)))
        bwd += 1
    if send_work:
        prog.append(Wait(tuple(send_work)))
    return prog


def gpipe(r: int, p: int, m: int, f: float, b: float) -> list[Action]:
    """Stage ``r`` of ``p`` under ``ScheduleGPipe``: every forward, its sends waited after the
    last, then every backward the same."""
    prog: list[Action] = []
    for phase, seconds in (("f", f), ("b", b)):
        sent: list[Op] = []
        for mb in range(m):
            prog += _batch(_fwd_recv(r, mb) if phase == "f" else _bwd_recv(r, p, mb))
            prog.append(Compute(seconds))
            ops = _fwd_send(r, p, mb) if phase == "f" else _bwd_send(r, mb)
            if ops:
                prog.append(Post(tuple(ops)))
                sent += ops
        if sent:
            prog.append(Wait(tuple(sent)))
    return prog


def simulate(programs: list[list[Action]], latency: float, late_receive: float = 0.0) -> list[float]:
    """Each stage's finishing time, every stage starting at 0. Stages move in time order (the
    earliest that can), so when a stage posts, every other stage's chunks up to then are known:
    a receive posted after its send while the sender computes costs ``late_receive``."""
    posted: dict[tuple[Op, int], float] = {}  # (op, the end that posted it: 0 sender, 1 receiver)
    now = [0.0] * len(programs)
    pc = [0] * len(programs)
    computing: list[list[tuple[float, float]]] = [[] for _ in programs]

    def done(op: Op) -> float | None:
        a, b = posted.get((op, 0)), posted.get((op, 1))
        return None if a is None or b is None else max(a, b) + latency

    def busy(r: int, t: float) -> bool:  # stage r computing at t (its chunks, in order)
        k = bisect.bisect_right(computing[r], (t, math.inf)) - 1
        return k >= 0 and t < computing[r][k][1]

    def ready(r: int) -> bool:
        act = programs[r][pc[r]]
        return not isinstance(act, Wait) or all(done(op) is not None for op in act.ops)

    while True:
        live = [r for r, prog in enumerate(programs) if pc[r] < len(prog)]
        if not live:
            return now
        movable = [r for r in live if ready(r)]
        if not movable:
            raise RuntimeError("the simulated schedule deadlocks: its sends and receives do not pair")
        r = min(movable, key=lambda k: now[k])
        act = programs[r][pc[r]]
        if isinstance(act, Compute):
            computing[r].append((now[r], now[r] + act.seconds))
            now[r] += act.seconds
        elif isinstance(act, Post):
            late = any(op[2] == r and (op, 0) in posted and busy(op[1], now[r]) for op in act.ops)
            now[r] += late_receive if late else 0.0
            for op in act.ops:
                posted[(op, 0 if op[1] == r else 1)] = now[r]
        else:
            now[r] = max([now[r], *(e for op in act.ops if (e := done(op)) is not None)])
        pc[r] += 1


def step_seconds(
    schedule: str,
    forward: list[float],
    backward: list[float],
    microbatches: int,
    latency: float,
    late_receive: float = 0.0,
) -> float:
    """The pipeline's step (its slowest stage's finish) under ``schedule`` ("1f1b" or "gpipe"),
    stage ``r``'s forward chunk taking ``forward[r]`` and its backward ``backward[r]``."""
    p = len(forward)
    build = gpipe if schedule == "gpipe" else one_f_one_b
    programs = [build(r, p, microbatches, forward[r], backward[r]) for r in range(p)]
    return max(simulate(programs, latency, late_receive))


@functools.lru_cache(maxsize=64)
def fit_late_receive(
    forward: tuple[float, ...], backward: tuple[float, ...], microbatches: int, latency: float, extra: float
) -> float:
    """The late receive's cost that makes GPipe's simulated step ``extra`` longer than 1F1B's
    with these stages and microbatches: bisected, as that excess only grows with it (in steps: a
    costlier receive can leave the sender waiting by the next one). 0 where GPipe's excess without
    it is already ``extra``; ``extra`` where not even that much reaches it."""

    def over(late: float) -> float:
        return step_seconds(
            "gpipe", list(forward), list(backward), microbatches, latency, late
        ) - step_seconds("1f1b", list(forward), list(backward), microbatches, latency, late)

    low, high = 0.0, extra
    if over(low) >= extra:
        return low
    if over(high) < extra:
        return high
    for _ in range(24):  # to a millionth of the extra
        mid = (low + high) / 2
        low, high = (mid, high) if over(mid) < extra else (low, mid)
    return (low + high) / 2
