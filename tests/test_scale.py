"""Jobs of many ranks, made from a real NCCL trace (bench/synth_ranks.py): each planted effect named
with its rank, and no false ones."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import synth_ranks
from perfkit.analyzers.analyze import analyze

DATA = Path(__file__).parent / "data"
SOURCE = DATA / "hta" / "trace_filter" / "sampled_rank-0.json.gz"
CROSS_RANK = {"slow_gpu", "late_rank", "slow_link", "straggler"}


def _findings(tmp: Path, ranks: int = 64, **plant: int) -> dict[str, list[int]]:
    synth = synth_ranks()
    synth.synthesize(SOURCE, tmp / "job", synth.Plan(ranks=ranks, seed=ranks, **plant), jobs=2)
    analysis = analyze(tmp / "job", jobs=2)
    assert analysis.ranks == list(range(ranks))
    return {f.id: f.ranks for f in analysis.findings if f.id in CROSS_RANK}


@pytest.mark.parametrize(
    ("plant", "expected"),
    [
        ({}, {}),
        ({"straggler": 37}, {"late_rank": [37]}),
        ({"slow_gpu": 5}, {"slow_gpu": [5]}),
        ({"slow_link": 50}, {"slow_link": [50]}),
        (
            {"straggler": 3, "slow_gpu": 40, "slow_link": 21},
            {"late_rank": [3], "slow_gpu": [40], "slow_link": [21]},
        ),
    ],
    ids=["clean", "straggler", "slow-gpu", "slow-link", "all-three"],
)
def test_each_planted_effect_named_with_its_rank_at_64_ranks(
    tmp_path: Path, plant: dict[str, int], expected: dict[str, list[int]]
) -> None:
    assert _findings(tmp_path, **plant) == expected


def test_a_slow_link_with_one_kind_of_group_names_the_group_not_a_rank(tmp_path: Path) -> None:
    """16 ranks: two tp groups (too few to compare) and eight dp pairs; the slow pair is named by its
    members, since one shape cannot tell which member's link is slow."""
    assert _findings(tmp_path, ranks=16, slow_link=9) == {"slow_link": [1, 9]}


def test_three_ranks_are_too_few_to_call_one_an_outlier(tmp_path: Path) -> None:
    assert _findings(tmp_path, ranks=3, slow_gpu=1) == {}


def test_reports_read_at_many_ranks(tmp_path: Path) -> None:
    """Per-rank figures in numeric rank order, distributions above 32 ranks, the heatmap binned;
    findings on every rank read "all N"."""
    import pandas as pd
    from perfkit.analyzers.analyze import ranges
    from perfkit.reports import figures

    assert ranges(list(range(256)), list(range(256))) == "all 256"
    assert ranges([0, 1, 2, 3, 200], list(range(256))) == "0-3, 200"
    synth = synth_ranks()
    synth.synthesize(SOURCE, tmp_path / "few", synth.Plan(ranks=12), jobs=1)
    fig = figures.gpu_breakdown(analyze(tmp_path / "few", jobs=1).metrics)
    assert fig is not None and list(fig.layout.xaxis.categoryarray) == [str(r) for r in range(12)]
    steps = pd.DataFrame(
        [
            {"rank": r, "step": s, "step_time_s": 0.1 + (0.05 if r == 77 else 0)}
            for r in range(256)
            for s in range(5)
        ]
    )
    heat = figures.straggler_heatmap(steps)
    assert heat is not None and len(heat.data[0].y) == 64 and heat.data[0].y[19] == "ranks 76-79"
    assert max(heat.data[0].z[19]) == pytest.approx(150.0)  # the bin shows its slowest rank
    lines = figures.per_step(steps, "step_time_s", "step time")
    assert lines is not None
    names = [t.name for t in lines.data if t.name]
    assert len(lines.data) == 6 and names[0] == "256 ranks, p10-p90" and "rank 77" in names


def test_a_dask_cluster_gives_the_same_analysis_as_local_processes(tmp_path: Path) -> None:
    """perfkit analyze --scheduler: the per-rank work on a Dask LocalCluster's worker processes."""
    distributed = pytest.importorskip("distributed")
    from perfkit.files import write_json_atomic

    synth = synth_ranks()
    synth.synthesize(SOURCE, tmp_path / "job", synth.Plan(ranks=8, slow_gpu=3), jobs=1)
    local = analyze(tmp_path / "job", jobs=2)
    with distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
    ) as c:
        remote = analyze(tmp_path / "job", scheduler=c.scheduler_address)
    write_json_atomic(tmp_path / "a.json", local.to_json())
    write_json_atomic(tmp_path / "b.json", remote.to_json())
    assert (tmp_path / "a.json").read_text() == (tmp_path / "b.json").read_text()
    assert [f.id for f in remote.findings if f.id == "slow_gpu"] == ["slow_gpu"]


def test_an_unreachable_scheduler_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("distributed")
    from perfkit.analyzers import analyze as module

    from perfkit.errors import RunDirError

    monkeypatch.setattr(module, "DASK_CONNECT_S", 1.0)
    synth = synth_ranks()
    synth.synthesize(SOURCE, tmp_path / "job", synth.Plan(ranks=2), jobs=1)
    with pytest.raises(
        RunDirError, match=r"cannot reach the Dask scheduler at tcp://127.0.0.1:9 .*leave out"
    ):
        analyze(tmp_path / "job", scheduler="tcp://127.0.0.1:9")


def test_pipeline_stages_are_compared_with_their_peers_only() -> None:
    """Ranks that run different kernels a step (a pipeline's stages) are not each other's yardstick:
    a last stage computing 40% more is no slow GPU; a slow rank among its peers still is."""
    from types import SimpleNamespace

    from perfkit.analyzers.spread import rank_spread

    def rank(r: int, kernels: int, compute_ms: float) -> SimpleNamespace:
        breakdown = {"kernels": kernels * 10, "compute_ns": compute_ms * 1e6 * 10, "idle_ns": 0}
        return SimpleNamespace(
            rank=r,
            steps=10,
            gpu_steps=10.0,
            step_ms=200.0,
            breakdown=breakdown,
            comm_kernel_ns=50e6 * 10,
            comm_groups={},
        )

    stages = [rank(r, 1000, 100.0 + r % 3) for r in range(8)] + [
        rank(r, 1400, 140.0 + r % 3) for r in range(8, 16)
    ]
    assert rank_spread(stages).slow_gpu == []  # type: ignore[arg-type, union-attr]
    stages[12] = rank(12, 1400, 185.0)
    spread = rank_spread(stages)  # type: ignore[arg-type]
    assert spread is not None and spread.slow_gpu == [12]
    assert spread.ranks[12].peer_compute_ms == pytest.approx(141.5)  # ranks 8-15, 12 among them


@pytest.mark.parametrize(
    ("address", "said"),
    [
        ("tls://127.0.0.1:8786", "over tcp:// only"),
        ("ucx://127.0.0.1:8786", "over tcp:// only"),
        ("tcp://bad:::x", "not an address"),
        ("tcp://host:99999", "not an address"),
    ],
)
def test_a_scheduler_address_perfkit_cannot_use_is_one_line_at_once(
    tmp_path: Path, address: str, said: str
) -> None:
    """Such addresses had given a full traceback, or the one line and then a Client.__del__ traceback
    20 s later."""
    pytest.importorskip("distributed")
    from perfkit.errors import RunDirError

    with pytest.raises(RunDirError, match=said):
        analyze(DATA / "h100" / "compiled_trace.json.gz", scheduler=address)


def test_a_port_that_never_answers_is_a_bounded_wait(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Something listening that is not a Dask scheduler (it accepts, never answers) had held analyze
    for 10 minutes and more, printing nothing."""
    import socket
    import time

    pytest.importorskip("distributed")
    from perfkit.analyzers import analyze as module

    from perfkit.errors import RunDirError

    monkeypatch.setattr(module, "DASK_CONNECT_S", 1.0)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        port = server.getsockname()[1]
        t0 = time.monotonic()
        with pytest.raises(RunDirError, match="cannot reach the Dask scheduler"):
            analyze(DATA / "h100" / "compiled_trace.json.gz", scheduler=f"tcp://127.0.0.1:{port}")
        assert time.monotonic() - t0 < 30
