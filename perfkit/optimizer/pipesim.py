"""A pipeline step simulated as torch.distributed.pipelining runs it: each stage's program of
forward and backward chunks, sends and receives, in the order ``Schedule1F1B`` and ``ScheduleGPipe``
(torch 2.13) issue them, and the point where each waits; ``ScheduleInterleaved1F1B`` as its runtime
lowers it (each rank's looped stages, their receives posted ahead and their sends waited at the
end, so the link's latency costs it its fill and drain only). A transfer completes ``latency`` after
both its ends have posted it (gloo's and NCCL's point-to-point calls meet: a send waits for its
receive), so a stage that waits on a batch holding its send to a busy neighbour waits for that
neighbour too. The closed form (the busiest stage's microbatches and one of each other stage) has
no such waits.

A receive posted after its send, while the sender computes, costs more: on gloo the post itself
blocks until the sender's side answers (on 2 CPU cores 0.1 ms most times, 2-6 ms one time in three;
under 0.1 where the sender waits). GPipe meets it on each forward but the first (its first stage
runs ahead, its sends unwaited), 1F1B hardly ever (each stage waits on its neighbour's batch
first). Each adds ``late_receive`` to GPipe's step, fitted to the pipelined copy's step under GPipe
over its step under 1F1B (``perfkit.trainer.costs.pipeline_costs``, ``fit_late_receive``). Counted
so, not simulated: simulated, a costly receive moves the stages so that fewer of the next are late
(the count then hung on how the stages balance), and a fit through that had turned a copy's 9.5 ms
of GPipe excess at 12 microbatches into 28 ms at 8 (bench 2026-12-06h: 67.5 ms predicted, 43.3
measured). The trainer's tiny-cpu pp2 with 8 microbatches took 42.4 ms under GPipe against 37.7
under 1F1B in one sweep; a stand-alone pp2 (``bench/pipeline_schedule.py``) measured the excess at
-1.2 to +7.2 ms over nine runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

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


def _interleaved_order(r: int, p: int, v: int, m: int) -> list[tuple[str, int, int]]:
    """Rank ``r``'s compute actions under ``ScheduleInterleaved1F1B`` (torch 2.13's
    ``_calculate_single_rank_operations`` and ``_get_1f1b_rank_ops``, its idle slots dropped as its
    lowering drops them): ("f" or "b", the stage, the microbatch). Stage ``s`` is on rank ``s % p``."""
    rounds = max(1, m // p)
    per_round = m // rounds
    warmup = min((v - 1) * per_round + 2 * (p - 1 - r), m * v)
    steady = m * v - warmup
    fwd: dict[int, int] = {}
    bwd: dict[int, int] = {}
    out: list[tuple[str, int, int]] = []

    def act(kind: str, stage: int, counts: dict[int, int]) -> None:
        counts[stage] = counts.get(stage, 0) + 1
        out.append((kind, stage, counts[stage] - 1))

    for op in range(warmup + steady + warmup):
        if op < warmup + steady:
            act("f", (op // per_round) % v * p + r, fwd)
        if op >= warmup:
            act("b", (v - 1 - (op - warmup) // per_round % v) * p + r, bwd)
    return out


def interleaved(p: int, v: int, m: int, f: Sequence[float], b: Sequence[float]) -> list[list[Action]]:
    """Every rank's program under ``ScheduleInterleaved1F1B`` with ``v`` stages a rank (stage ``s``
    on rank ``s % p``, its forward chunk taking ``f[s]`` and its backward ``b[s]``), lowered as
    torch's runtime runs it (``_add_send_recv``): the ranks' compute actions taken in turn, each
    once its input's sender has been taken; an action with a neighbour appends its send to its own
    program and the matching receive to the neighbour's, each posted alone; a chunk waits for its
    receive, and the sends are waited at the end."""
    n = p * v
    todo = [_interleaved_order(r, p, v, m) for r in range(p)]
    programs: list[list[Action]] = [[] for _ in range(p)]
    sends: list[list[Op]] = [[] for _ in range(p)]
    taken: set[tuple[str, int, int]] = set()
    while any(todo):
        moved = False
        for r in range(p):
            if not todo[r]:
                continue
            kind, s, mb = todo[r][0]
            src, dst = (s - 1, s + 1) if kind == "f" else (s + 1, s - 1)
            if 0 <= src < n and (kind, src, mb) not in taken:
                continue
            todo[r].pop(0)
            taken.add((kind, s, mb))
            moved = True
            if 0 <= src < n:
                programs[r].append(Wait(((f"{kind}{src}", src % p, r, mb),)))
            programs[r].append(Compute(f[s] if kind == "f" else b[s]))
            if 0 <= dst < n:
                op = (f"{kind}{s}", r, dst % p, mb)
                programs[r].append(Post((op,)))
                programs[dst % p].append(Post((op,)))
                sends[r].append(op)
        if not moved:
            raise RuntimeError("the interleaved schedule cannot be lowered: its stages do not pair")
    for prog, sent in zip(programs, sends, strict=True):
        if sent:
            prog.append(Wait(tuple(sent)))
    return programs


def split(work: Sequence[float]) -> tuple[list[float], list[float]]:
    """Each stage's microbatch of ``work`` as its forward chunk and its backward (a third, two
    thirds: backward computes two matmuls for each of forward's)."""
    return [t / 3 for t in work], [2 * t / 3 for t in work]


def simulate(programs: list[list[Action]], latency: float) -> list[float]:
    """Each stage's finishing time, every stage starting at 0."""
    posted: dict[tuple[Op, int], float] = {}  # (op, the end that posted it: 0 sender, 1 receiver)
    now = [0.0] * len(programs)
    pc = [0] * len(programs)

    def done(op: Op) -> float | None:
        a, b = posted.get((op, 0)), posted.get((op, 1))
        return None if a is None or b is None else max(a, b) + latency

    while True:
        moved = False
        for r, prog in enumerate(programs):
            while pc[r] < len(prog):
                act = prog[pc[r]]
                if isinstance(act, Compute):
                    now[r] += act.seconds
                elif isinstance(act, Post):
                    for op in act.ops:
                        posted[(op, 0 if op[1] == r else 1)] = now[r]
                else:
                    ends = [done(op) for op in act.ops]
                    if any(e is None for e in ends):
                        break
                    now[r] = max([now[r], *(e for e in ends if e is not None)])
                pc[r] += 1
                moved = True
        if all(pc[r] == len(prog) for r, prog in enumerate(programs)):
            return now
        if not moved:
            raise RuntimeError("the simulated schedule deadlocks: its sends and receives do not pair")


def step_seconds(
    schedule: str,
    forward: Sequence[float],
    backward: Sequence[float],
    microbatches: int,
    latency: float,
    late_receive: float = 0.0,
    share: float = 1.0,
    stages_per_rank: int = 1,
) -> float:
    """The pipeline's step (its slowest stage's finish) under ``schedule`` ("1f1b", "gpipe" or
    "interleaved-1f1b", whose ``stages_per_rank`` stages a rank are looped: stage ``s`` on rank
    ``s % pp``), stage ``s``'s forward chunk taking ``forward[s]`` and its backward ``backward[s]``;
    under GPipe ``late_receive`` more for each forward but the first (its receive posted after its
    send while the sender computes, ahead).

    ``share``: the part of a core each rank had while every rank computed, where the chunks were
    timed so (CPU ranks over fewer cores: 0.5 for 4 ranks of a thread on 2 cores). A stage whose
    neighbours wait computes at a whole core's pace, so the schedule runs its chunks at ``share`` of
    their time, and the step is then at least the stages' work shared over the cores (each stage's
    microbatches at the timed pace, on average): 4 CPU ranks on 2 cores took 38.5 ms a step in 4
    stages and 36.9 in DDP, where the fill and drain at the timed pace had predicted 79."""
    p = len(forward) // stages_per_rank
    if schedule == "interleaved-1f1b":
        f, b = [x * share for x in forward], [x * share for x in backward]
        programs = interleaved(p, stages_per_rank, microbatches, f, b)
    else:
        build = gpipe if schedule == "gpipe" else one_f_one_b
        programs = [build(r, p, microbatches, forward[r] * share, backward[r] * share) for r in range(p)]
    late = late_receive * (microbatches - 1) if schedule == "gpipe" else 0.0
    step = max(simulate(programs, latency))
    if share < 1:
        step = max(step, microbatches * (sum(forward) + sum(backward)) / p)
    return step + late


def fit_late_receive(
    forward: Sequence[float],
    backward: Sequence[float],
    microbatches: int,
    latency: float,
    extra: float,
    share: float = 1.0,
) -> float:
    """What each late receive costs, from GPipe's step measured ``extra`` longer than 1F1B's with
    these stages and microbatches: that excess less the simulation's own (GPipe's waits at the
    link's latency), over GPipe's late receives (each forward's but the first). 0 where the
    simulation's excess is already ``extra``."""
    own = step_seconds("gpipe", forward, backward, microbatches, latency, share=share) - step_seconds(
        "1f1b", forward, backward, microbatches, latency, share=share
    )
    return max(0.0, extra - own) / max(1, microbatches - 1)
