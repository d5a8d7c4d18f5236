"""The layout costs' arithmetic (perfkit.trainer.costs): what copies of one block and of more say a
block and the rest cost."""

from __future__ import annotations

import pytest

from perfkit.trainer.config import load_config
from perfkit.trainer.costs import DEEP, _block_and_ends, _deep_rounds, depth


def test_a_block_and_the_rest_are_the_line_through_the_two_copies() -> None:
    """One block's copy costs 10 beyond plain, two blocks' 16: 6 a block and 4 the rest."""
    assert _block_and_ends(10.0, 16.0, 2, 4) == pytest.approx((6.0, 4.0))


def test_noise_under_zero_keeps_the_line_at_the_models_depth() -> None:
    """One block's copy 10, two blocks' 25: the line says 15 a block and -5 the rest. The rest
    clamped at 0 alone would charge a model of 4 blocks 60 where the line says 55; kept at 4 blocks,
    a block is 13.75 and the rest 0."""
    block, ends = _block_and_ends(10.0, 25.0, 2, 4)
    assert ends == 0.0 and 4 * block + ends == pytest.approx(4 * 15.0 - 5.0)
    # two blocks' copy costing less than one block's: no block cost, the two copies' mean the rest
    assert _block_and_ends(10.0, 8.0, 2, 4) == pytest.approx((0.0, 9.0))
    # at any depth the line's own value: a model of one block costs what the one-block copy did
    assert _block_and_ends(10.0, 30.0, 2, 100) == (pytest.approx(19.9), 0.0)
    assert _block_and_ends(1.0, 30.0, 2, 1) == (pytest.approx(1.0), 0.0)


def test_the_deeper_copy_is_the_models_depth_up_to_four_blocks() -> None:
    """A copy of 4 blocks costing 28 beyond plain and one of one block 10: 6 a block, 4 the rest;
    the copy as deep as the model (2 to 4 blocks), so the line is not stretched to reach it; and the
    rounds shared out so its calls take the time two blocks' did."""
    assert _block_and_ends(10.0, 28.0, 4, 4) == pytest.approx((6.0, 4.0))
    assert [depth(load_config("tiny-cpu", [f"model.n_layers={n}"])) for n in (1, 2, 3, 4, 6, 12)] == [
        2,
        2,
        3,
        4,
        4,
        4,
    ]
    assert DEEP == 4 and _deep_rounds(30, 2) == 30 and _deep_rounds(30, 4) == 18
