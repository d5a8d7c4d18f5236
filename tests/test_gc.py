"""The gc collector: Python's collections timed per step on each rank, folded into per-rank pauses,
the gc_pauses rule, and the bundled trainer's switch for its remedy."""

from __future__ import annotations

import gc
from pathlib import Path

import pandas as pd
import pytest
from perfkit.analyzers import remedies
from perfkit.analyzers.metrics import Metrics, StepMetrics
from perfkit.analyzers.rules import Finding, evaluate
from perfkit.collectors.options import CollectOptions
from perfkit.collectors.probe import Probe
from perfkit.collectors.signals.gc import GC, GcCollector, GcMetrics

from perfkit.tables import read_table
from perfkit.trainer.config import load_config


def test_collections_are_timed_and_counted_per_step(tmp_path: Path) -> None:
    probe = Probe(tmp_path, 0, 1, 0, CollectOptions(collect=["steps", "gc"])).start()
    try:
        for step in range(4):
            probe.begin_step()
            if step % 2 == 0:
                gc.collect()  # a full collection, on steps 1 and 3
            probe.end_step()
    finally:
        probe.stop()
    assert not [cb for cb in gc.callbacks if getattr(cb, "__self__", None).__class__ is GcCollector]
    rows, _ = read_table(probe.layout.table(0, GC), GC)
    full = rows[rows["gen2"] > 0]
    assert list(full["step"]) == [1, 3], rows
    assert (full["pause_s"] > 0).all() and (full["max_pause_s"] <= full["pause_s"]).all()


def _frames(pause_ms: dict[int, float], steps: int = 20, step_ms: float = 100.0, gen: str = "gen0"):
    """Steps of ``step_ms`` on each rank, and a collection row of ``pause_ms`` each step."""
    st = pd.DataFrame(
        [{"rank": r, "step": s, "step_time_s": step_ms / 1e3} for r in pause_ms for s in range(2, steps + 2)]
    )
    rows = pd.DataFrame(
        [
            {
                "rank": r,
                "step": s,
                "gen0": 0,
                "gen1": 0,
                "gen2": 0,
                gen: 3,
                "pause_s": p / 1e3,
                "max_pause_s": p / 3e3,
            }
            for r, p in pause_ms.items()
            if p
            for s in range(2, steps + 2)
        ],
        columns=["rank", *GC.columns],
    )
    return {"gc": rows}, st


def gc_findings(pause_ms: dict[int, float], gen: str = "gen0") -> list[Finding]:
    frames, st = _frames(pause_ms, gen=gen)
    folded = GcCollector.fold(frames, st)
    assert isinstance(folded, GcMetrics)
    steps = StepMetrics(steps=21, step_time_ms=100.0, step_time_p90_ms=100.0, per_rank=[], phase_share={})
    return [f for f in evaluate([], Metrics(steps=steps, signals={"gc": folded})) if f.id == "gc_pauses"]


def test_one_rank_that_pauses_is_named_with_its_cost() -> None:
    (f,) = gc_findings({0: 0.2, 1: 12.0})
    assert f.ranks == [1] and f.remedy == "gc_tuning"
    assert f.saving_ms_per_step == pytest.approx(12.0)  # the others wait for its pause each step
    assert "Rank 1 pauses 12.0 ms a step" in f.title and "young" in f.title
    assert f.evidence["ranks"][0]["collections_per_step"]["gen0"] == 3


def test_every_rank_pausing_is_a_job_finding() -> None:
    (f,) = gc_findings({0: 6.0, 1: 5.0}, gen="gen2")
    assert f.ranks == [0, 1] and "pauses the ranks 6.0 ms a step" in f.title and "full" in f.title


@pytest.mark.parametrize("pauses", [{0: 1.0, 1: 1.0}, {0: 0.0, 1: 2.5}])
def test_pauses_under_a_few_percent_say_nothing(pauses: dict[int, float]) -> None:
    assert not gc_findings(pauses)


def test_the_trainer_applies_the_remedy_and_its_alternative() -> None:
    from perfkit.trainer.train import _gc_control

    remedy = remedies.get("gc_tuning")
    for change in remedy.all_overrides():
        cfg = load_config("tiny-cpu", change)
        assert cfg.gc in ("freeze", "manual")
        was = gc.isenabled()
        with _gc_control(cfg.gc):
            assert gc.get_freeze_count() > 0
            assert gc.isenabled() == (cfg.gc == "freeze")
        assert gc.isenabled() == was and gc.get_freeze_count() == 0
