"""The pipeline schedule simulation (perfkit.optimizer.pipesim) against what the schedules are."""

from __future__ import annotations

import pytest

from perfkit.optimizer.pipesim import fit_late_receive, gpipe, one_f_one_b, simulate, step_seconds


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
