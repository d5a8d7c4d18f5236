"""The pipeline schedule simulation (perfkit.optimizer.pipesim) against what the schedules are."""

from __future__ import annotations

import pytest

from perfkit.optimizer.pipesim import (
    Compute,
    Post,
    fit_late_receive,
    gpipe,
    interleaved,
    one_f_one_b,
    simulate,
    step_seconds,
)


@pytest.mark.parametrize("schedule", ["1f1b", "gpipe"])
@pytest.mark.parametrize(("p", "m"), [(2, 1), (2, 2), (2, 8), (3, 4), (4, 2), (4, 8)])
def test_without_latency_a_schedule_is_its_microbatches_and_the_fill(schedule: str, p: int, m: int) -> None:
    """Equal stages and free sends: m + p - 1 microbatches' work, as the closed form has it."""
    assert step_seconds(schedule, [1.0] * p, [2.0] * p, m, 0.0) == pytest.approx((m + p - 1) * 3.0)


def test_the_busiest_stage_sets_the_step_and_the_others_fill_it() -> None:
    """1F1B over 2 stages: the last stage's microbatches and one microbatch of the first."""
    assert step_seconds("1f1b", [1.0, 2.0], [2.0, 4.0], 4, 0.0) == pytest.approx(4 * 6.0 + 3.0)


def test_sends_wait_for_their_receives() -> None:
    """A send completes when both ends posted it: the stages' exchanges couple them, so 1F1B at 8
    microbatches pays far more than the two latencies on its fill and drain; GPipe, which waits
    on each receive before each chunk, more again."""
    free = step_seconds("1f1b", [1.0, 1.0], [2.0, 2.0], 8, 0.0)
    one = step_seconds("1f1b", [1.0, 1.0], [2.0, 2.0], 8, 0.5)
    assert one - free > 4 * 0.5
    assert step_seconds("gpipe", [1.0, 1.0], [2.0, 2.0], 8, 0.5) > one


def test_programs_pair_their_sends_and_receives() -> None:
    """Every send of one stage is a receive of its neighbour's, in both schedules, for any count
    of stages and microbatches (the simulation would deadlock otherwise)."""
    for build in (one_f_one_b, gpipe):
        for p in range(2, 6):
            for m in range(1, 9):
                ends = simulate([build(r, p, m, 1.0, 2.0) for r in range(p)], 0.1)
                assert len(ends) == p and min(ends) > 0


def test_a_late_receive_costs_gpipe_each_forward_but_the_first_and_1f1b_nothing() -> None:
    """GPipe's first stage runs ahead, so each later forward's receive is posted after its send
    while the sender computes; under 1F1B each stage waits on its neighbour's batch first."""
    f, b = [1.0, 1.0], [2.0, 2.0]
    for m in (4, 8):
        assert step_seconds("1f1b", f, b, m, 0.1, 0.5) == step_seconds("1f1b", f, b, m, 0.1, 0.0)
        late = step_seconds("gpipe", f, b, m, 0.1, 0.5) - step_seconds("gpipe", f, b, m, 0.1, 0.0)
        assert late == pytest.approx((m - 1) * 0.5)


@pytest.mark.parametrize("late", [0.05, 0.3, 0.8])
def test_the_late_receive_is_fitted_back_from_gpipes_excess(late: float) -> None:
    """What the layout model does with the pipelined copy's GPipe step over its 1F1B step: the
    cost a late receive that gives that excess, which is the cost planted."""
    f, b = [1.0, 1.2], [2.0, 2.4]
    excess = step_seconds("gpipe", f, b, 12, 0.1, late) - step_seconds("1f1b", f, b, 12, 0.1, late)
    assert fit_late_receive(f, b, 12, 0.1, excess) == pytest.approx(late)
    assert fit_late_receive(f, b, 12, 0.1, 0.0) == pytest.approx(0.0, abs=1e-12)


def test_ranks_sharing_cores_compute_faster_while_their_neighbours_wait() -> None:
    """Chunks timed while every rank computed on half a core (4 ranks of a thread on 2 cores): the
    schedule runs them at twice the pace while the others wait, and the step is at least the
    stages' work shared over the cores. At a whole core (share 1) nothing changes."""
    f, b = [1.0] * 4, [2.0] * 4
    assert step_seconds("1f1b", f, b, 4, 0.0, share=1.0) == step_seconds("1f1b", f, b, 4, 0.0)
    shared = step_seconds("1f1b", f, b, 4, 0.0, share=0.5)
    # the fill and drain at half the time: 7 microbatches of 1.5, over the work bound's 4 of 3
    assert shared == pytest.approx(max(7 * 1.5, 4 * 3.0))
    assert shared < step_seconds("1f1b", f, b, 4, 0.0) == pytest.approx(7 * 3.0)
    # many microbatches: the cores' work bounds it, each stage's microbatches at the timed pace
    assert step_seconds("gpipe", f, b, 16, 0.0, share=0.5) == pytest.approx(16 * 3.0)
    # the late receive's fit sees the same schedule
    late = step_seconds("gpipe", f, b, 12, 0.1, 0.2, 0.5) - step_seconds("1f1b", f, b, 12, 0.1, 0.0, 0.5)
    assert fit_late_receive(f, b, 12, 0.1, late, share=0.5) == pytest.approx(0.2)


@pytest.mark.parametrize(("p", "m"), [(2, 2), (2, 4), (2, 8), (3, 6), (4, 4), (4, 8), (4, 12)])
def test_interleaved_is_lowered_as_torch_lowers_it(p: int, m: int) -> None:
    """Each rank's chunks, sends and receives in the order torch's own lowering of
    ScheduleInterleaved1F1B puts them (its compute order and ``_add_send_recv``): where torch changes
    it, this says so."""
    from torch.distributed.pipelining import schedules

    order = schedules.ScheduleInterleaved1F1B.__new__(schedules.ScheduleInterleaved1F1B)
    order.pp_group_size, order.n_local_stages, order._n_microbatches = p, 2, m
    order.number_of_rounds = max(1, m // p)
    order.microbatches_per_round = m // order.number_of_rounds
    compute = {r: [a for a in order._calculate_single_rank_operations(r) if a is not None] for r in range(p)}
    lowered = schedules._add_send_recv(compute, stage_to_rank=lambda s: s % p, num_stages=2 * p)
    names = {"FORWARD": "F", "FULL_BACKWARD": "B"}
    n = 2 * p
    programs = interleaved(p, 2, m, [float(s) for s in range(n)], [100.0 + s for s in range(n)])
    for r in range(p):
        theirs = []
        for a in lowered[r]:
            kind = names.get(a.computation_type.name, a.computation_type.name)
            if kind in ("F", "B"):
                theirs.append((kind, a.stage_index))
            elif kind in ("SEND_F", "SEND_B", "RECV_F", "RECV_B"):
                theirs.append((kind, a.stage_index, a.microbatch_index))
        ours = []
        for act in programs[r]:
            if isinstance(act, Compute):
                ours.append(("F", int(act.seconds)) if act.seconds < 100 else ("B", int(act.seconds) - 100))
            elif isinstance(act, Post):
                ((kind, src, _, mb),) = act.ops
                stage = int(kind[1:])
                if src == r:
                    ours.append(("SEND_" + kind[0].upper(), stage, mb))
                else:
                    ours.append(("RECV_" + kind[0].upper(), stage + 1 if kind[0] == "f" else stage - 1, mb))
        assert ours == theirs


@pytest.mark.parametrize(("p", "m"), [(2, 2), (2, 4), (2, 8), (4, 8), (4, 12)])
def test_without_latency_interleaved_is_the_closed_form(p: int, m: int) -> None:
    """Equal stages, free sends: m + (p - 1) / 2 microbatches of a rank's work, the fill and drain
    halved by the second stage a rank (Narayanan et al. 2021)."""
    n = 2 * p
    step = step_seconds("interleaved-1f1b", [0.5] * n, [1.0] * n, m, 0.0, stages_per_rank=2)
    assert step == pytest.approx((m + (p - 1) / 2) * 3.0)
    # its receives posted early and its sends waited at the end: the link's latency costs it once
    # a hop of the first microbatch's way through every stage and back, whatever the microbatches
    cost = step_seconds("interleaved-1f1b", [0.5] * n, [1.0] * n, m, 0.2, stages_per_rank=2) - step
    assert cost == pytest.approx((2 * n - 2) * 0.2)
