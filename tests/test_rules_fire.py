"""Every registered rule has a case that makes it fire (a rule that never fires passes every
negative test), built from plain data where no real capture exists; a new rule without one fails
here."""

from __future__ import annotations

import json
import pickle
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
from perfkit.analyzers.analyze import analyze
from perfkit.analyzers.hangs import HangMetrics
from perfkit.analyzers.metrics import (
    CommMetrics,
    IoMetrics,
    MemoryMetrics,
    Metrics,
    RankSteps,
    RunInfo,
    StepMetrics,
    StragglerRank,
    Stragglers,
    Throughput,
)
from perfkit.analyzers.rules import RULES, Finding, evaluate
from perfkit.analyzers.runtables import pipeline_stages
from synth import snapshot, step_loop_trace
from test_gc import gc_findings
from test_watch import health_findings, quiet_watch_findings, watch_findings

DATA = Path(__file__).parent / "data"


def _steps(step_ms: float = 100.0, **phases: float) -> StepMetrics:
    return StepMetrics(
        steps=20, step_time_ms=step_ms, step_time_p90_ms=step_ms, per_rank=[], phase_share=phases
    )


def _run_rules(metrics: Metrics) -> list[Finding]:
    return evaluate([], metrics)


def _two_ranks(**kinds: list[int]) -> Stragglers:
    """Rank 1 busy 95 ms against rank 0's 50, the last to arrive, 40 ms a step on the run queue."""
    r0 = StragglerRank(rank=0, busy_ms=50.0, score=1.0, arrival_late_ms=0.0, last_to_arrive_share=0.0)
    r1 = StragglerRank(
        rank=1, busy_ms=95.0, score=0.53, arrival_late_ms=45.0, last_to_arrive_share=1.0, runq_wait_ms=40.0
    )
    return Stragglers(ranks=[r0, r1], slow=kinds.get("slow", []), host_bound=kinds.get("host_bound", []))


def _trace(tmp: Path, doc: dict) -> list[Finding]:  # type: ignore[type-arg]
    path = tmp / "trace.json"
    path.write_text(json.dumps(doc))
    return analyze(path).findings


def _snapshot_alone(tmp: Path, **kwargs: object) -> list[Finding]:
    path = tmp / "snap.pickle"
    path.write_bytes(pickle.dumps(snapshot(**kwargs)))  # type: ignore[arg-type]
    return analyze(path).findings


def _headroom(tmp: Path) -> list[Finding]:
    from perfkit.run import Run

    run = Run.create(tmp / "r", command=["x"], world_size=1, env={"gpu_memory_bytes": 4 * 2**30})
    run.layout.rank_dir(0).mkdir()
    run.layout.memory_snapshot(0).write_bytes(pickle.dumps(snapshot(split=2**20, flushes=0)))
    run.finish("complete", 0)
    return analyze(run.path).findings


FIRES: dict[str, Callable[[Path], list[Finding]]] = {
    # trace rules: the eager H100 step loop (real), a plain-data step loop, the HTA NCCL traces (real)
    "host_launch_bound": lambda tmp: analyze(DATA / "h100" / "tuned_trace.json.gz").findings,
    "fusion_candidates": lambda tmp: analyze(DATA / "h100" / "tuned_trace.json.gz").findings,
    "host_device_sync": lambda tmp: _trace(tmp, step_loop_trace(30.0)),
    "input_stall": lambda tmp: _trace(tmp, step_loop_trace(30.0)),
    "fp32_gemm": lambda tmp: _trace(tmp, step_loop_trace(0.0)),  # ampere_sgemm: FP32 on CUDA cores
    "pageable_h2d": lambda tmp: _trace(tmp, step_loop_trace(0.0)),  # Memcpy HtoD (Pageable -> Device)
    "unfused_attention": lambda tmp: _run_with_trace(tmp, {"kernels": {"attention": "eager"}}),
    "unfused_optimizer": lambda tmp: _run_with_trace(tmp, {"kernels": {"optimizer_impl": "unfused"}}),
    "exposed_communication": lambda tmp: analyze(DATA / "hta" / "trace_filter").findings,
    # run rules: metrics as the run tables give them
    "low_mfu": lambda tmp: _run_rules(
        Metrics(steps=_steps(), throughput=Throughput(flops_per_token=1.0, achieved_tflops=1.0, mfu=0.12))
    ),
    "checkpoint_stall": lambda tmp: _run_rules(
        Metrics(
            steps=_steps(),
            io=IoMetrics(checkpoint_save_ms_max=2000.0, checkpoint_saves=2),
            config={"checkpoint": {"every": 10}},
        )
    ),
    "memory_pressure": lambda tmp: _run_rules(
        Metrics(steps=_steps(), memory=MemoryMetrics(rss_max_bytes=1.0, alloc_retries=4, ooms=0))
    ),
    "recompute_without_pressure": lambda tmp: _run_rules(
        Metrics(
            run=RunInfo(
                name="r",
                status="complete",
                world_size=1,
                command=[],
                env={"host_memory_bytes": 2**34},
                collectors={},
            ),
            config={"kernels": {"activation_checkpointing": True}},
            steps=_steps(forward=0.3),
            memory=MemoryMetrics(rss_max_bytes=2**30, alloc_retries=0),
        )
    ),
    "pipeline_bubble": lambda tmp: _run_rules(
        Metrics(
            steps=_steps(forward=0.2, backward=0.5),
            config={"parallel": {"pp": 4, "microbatches": 4, "pp_schedule": "1f1b"}},
        )
    ),
    "gpipe_late_receives": lambda tmp: _run_rules(
        Metrics(
            steps=_steps(forward=0.2, backward=0.5),
            config={"parallel": {"pp": 2, "microbatches": 8, "pp_schedule": "gpipe"}},
            model={"layout_costs": {"pipeline_gpipe_extra_s": 0.005, "pipeline_gpipe_microbatches": 12.0}},
            run=_run_info(),
        )
    ),
    "small_ddp_buckets": lambda tmp: _run_rules(
        Metrics(
            steps=_steps(backward=0.5),
            comms=CommMetrics(
                table=[{"op": "all_reduce", "time_ms": 60.0, "count": 60}],
                collectives_per_step=60.0,
                bytes_per_step=60 * 5e3,
                ddp_buckets_per_step=60.0,
                ddp_bucket_bytes=5e3,
                ddp_exposed_ms=30.0,
            ),
        )
    ),
    "small_blocking_collectives": lambda tmp: _run_rules(
        Metrics(steps=_steps(), comms=_gathers(blocking=True))
    ),
    "ddp_find_unused_parameters": lambda tmp: _run_rules(Metrics(steps=_steps(), model={"ddp": _ddp()})),
    "host_oversubscribed": lambda tmp: _run_rules(
        Metrics(steps=_oversubscribed(40.0, 55.0), run=_run_info(cpu_count=2, threads=4))
    ),
    "straggler": lambda tmp: _run_rules(Metrics(steps=_steps(), stragglers=_two_ranks(slow=[1]))),
    "cpu_contention": lambda tmp: _run_rules(Metrics(steps=_steps(), stragglers=_two_ranks(host_bound=[1]))),
    # hangs and failures: what the ranks' records say, as the analysis reads them
    "hang": lambda tmp: _run_rules(Metrics(hang=_hung())),
    "desync": lambda tmp: _run_rules(Metrics(hang=_hung(rank1_op="broadcast"))),
    "first_failure": lambda tmp: _run_rules(
        Metrics(
            hang=HangMetrics(
                hung=False,
                ranks=[],
                first_failure={
                    "rank": 1,
                    "time": 1.0,
                    "exception": "RuntimeError",
                    "message": "boom",
                    "frame": "t.py:3 f",
                },
            )
        )
    ),
    # snapshot rules: allocator snapshots as plain data
    "allocator_fragmentation": lambda tmp: _snapshot_alone(tmp, split=2**30, flushes=0),
    "allocator_cache_flushes": lambda tmp: _snapshot_alone(tmp, split=2**20, flushes=3),
    "memory_headroom": _headroom,
}


def _gathers(blocking: bool, ms: float = 6.0) -> CommMetrics:
    """Two small all_gathers a step from a framework's logging, ``ms`` each on the host."""
    caller = "transformers/trainer_pt_utils.py:207 distributed_concat < train.py:33 main"
    row = {"caller": caller, "op": "all_gather", "calls_per_step": 1.0, "bytes": 8.0, "blocking": blocking}
    return CommMetrics(
        table=[],
        collectives_per_step=2.0,
        bytes_per_step=16.0,
        callers=[{**row, "ms_per_step": ms, "transfer_ms_per_step": 1.0}] * 2,
    )


def _ddp(**over: object) -> dict[str, object]:
    return {"find_unused_parameters": True, "static_graph": False, "unused_parameters": 0, "parameters": 28,
            "unused_search_ms": 2.0, "unused_search_calls": 40, **over}  # fmt: skip


def _run_info(**env: object) -> RunInfo:
    return RunInfo(name="r", status="complete", world_size=2, command=[], env=dict(env), collectors={})


def _oversubscribed(*runq_ms: float) -> StepMetrics:
    steps = _steps()
    steps.per_rank = [
        RankSteps(rank=r, step_ms=100.0, steps=20, runq_wait_ms=w) for r, w in enumerate(runq_ms)
    ]
    return steps


def test_small_blocking_collectives_saving_and_absence() -> None:
    m = Metrics(steps=_steps(), comms=_gathers(blocking=True))
    (f,) = [f for f in _run_rules(m) if f.id == "small_blocking_collectives"]
    # 12 ms blocked, 2 ms of it transfer: the transfer and half the wait for the last rank
    assert f.saving_ms_per_step == pytest.approx(2 + 0.5 * 10)
    assert f.evidence["callers"][0]["caller"].startswith("transformers/")
    for comms in (_gathers(blocking=False), _gathers(blocking=True, ms=1.0)):  # async, or 2% of the step
        assert not [
            f
            for f in _run_rules(Metrics(steps=_steps(), comms=comms))
            if f.id == "small_blocking_collectives"
        ]


def test_find_unused_parameters_only_when_nothing_is_unused() -> None:
    (f,) = [
        f
        for f in _run_rules(Metrics(steps=_steps(), model={"ddp": _ddp()}))
        if f.id == "ddp_find_unused_parameters"
    ]
    assert f.saving_ms_per_step == pytest.approx(2.0 * 2)  # 40 searches over 20 steps
    for ddp in (_ddp(unused_parameters=3), _ddp(find_unused_parameters=False), _ddp(static_graph=True)):
        assert not [
            f
            for f in _run_rules(Metrics(steps=_steps(), model={"ddp": ddp}))
            if f.id == "ddp_find_unused_parameters"
        ]


def test_oversubscription_needs_every_rank_waiting() -> None:
    (f,) = [
        f
        for f in _run_rules(Metrics(steps=_oversubscribed(40.0, 55.0), run=_run_info(cpu_count=2, threads=4)))
        if f.id == "host_oversubscribed"
    ]
    assert f.saving_ms_per_step == pytest.approx(40.0)
    assert "2 ranks x 4 threads on 2 cores" in f.title
    one_slow = Metrics(steps=_oversubscribed(2.0, 55.0), run=_run_info(cpu_count=2, threads=1))
    assert not [f for f in _run_rules(one_slow) if f.id == "host_oversubscribed"]  # cpu_contention's case


def _hung(rank1_op: str | None = None) -> HangMetrics:
    """Two ranks' states: rank 0 in all_reduce #5 of group 0; rank 1 in nothing (a hang), or in
    another op at the same sequence number (a desync)."""
    from perfkit.analyzers.hangs import RankState, _match

    entry = {"group": "0", "seq": 5, "op": "all_reduce", "bytes": 16, "dtype": "float32"}
    r1 = [{**entry, "op": rank1_op}] if rank1_op else []
    h = HangMetrics(
        hung=True,
        ranks=[
            RankState(
                rank=0, told_by="hang record", in_flight=[entry], entered={"0": 5}, frame="t.py:9 main"
            ),
            RankState(
                rank=1,
                told_by="hang record",
                in_flight=r1,
                entered={"0": 5 if rank1_op else 4},
                frame="t.py:7 main",
            ),
        ],
    )
    _match(h, 2)
    return h


def _run_with_trace(tmp: Path, config: dict) -> list[Finding]:  # type: ignore[type-arg]
    from perfkit.analyzers.facts import trace_facts
    from perfkit.analyzers.trace import load_trace

    path = tmp / "trace.json"
    path.write_text(json.dumps(step_loop_trace(0.0)))
    facts = trace_facts(load_trace(path))
    facts.optimizer_impl = "per-parameter"  # the plain-data loop has no optimizer step of its own
    return evaluate([facts], Metrics(config=config, steps=_steps()))


def _job(tmp: Path, **plant: int) -> list[Finding]:
    """A 16-rank job made from a real NCCL trace with one planted effect (bench/synth_ranks.py)."""
    from helpers import synth_ranks

    synth = synth_ranks()
    synth.synthesize(
        DATA / "hta" / "trace_filter" / "sampled_rank-0.json.gz",
        tmp / "job",
        synth.Plan(ranks=16, **plant),
        jobs=1,
    )
    return analyze(tmp / "job", jobs=1).findings


FIRES["slow_gpu"] = lambda tmp: _job(tmp, slow_gpu=2)
FIRES["gc_pauses"] = lambda tmp: gc_findings({0: 0.2, 1: 12.0})  # rank 1: 12% of its step
FIRES["late_rank"] = lambda tmp: _job(tmp, straggler=5)
FIRES["slow_link"] = lambda tmp: _job(tmp, slow_link=9)
FIRES["gpu_health"] = lambda tmp: health_findings(throttle_reasons=0x40)  # thermal slowdown from sample 30
for _kind in ("straggler", "data_wait", "gc", "memory", "collective"):
    FIRES[f"watch_{_kind}"] = lambda tmp, k=_kind: watch_findings([k])  # planted in made-up windows
FIRES["watch_step_time"] = lambda tmp: watch_findings(["straggler"], also=("step_time",))  # it slows the job


def test_every_rule_has_a_case_that_makes_it_fire() -> None:
    missing = {r.id for r in RULES} - set(FIRES)
    assert not missing, f"add a positive case to FIRES for: {sorted(missing)}"


@pytest.mark.parametrize("rule_id", sorted(FIRES))
def test_the_rule_fires(tmp_path: Path, rule_id: str) -> None:
    found = {f.id: f for f in FIRES[rule_id](tmp_path)}
    assert rule_id in found, f"{rule_id} did not fire; found {sorted(found)}"
    f = found[rule_id]
    assert f.remedy and f.title and f.severity in ("critical", "high", "medium", "low")
    assert f.saving_ms_per_step >= 0 and f.estimate
    if rule_id == "small_ddp_buckets":  # 30 ms exposed, 60 buckets where 1 would do: 59/60 of it
        assert f.saving_ms_per_step == pytest.approx(29.5)


@pytest.mark.parametrize("rule_id", ["fp32_gemm", "pageable_h2d", "memory_pressure"])
def test_savings_without_a_model_are_said_to_be_not_estimated(tmp_path: Path, rule_id: str) -> None:
    """These had claimed fixed shares (70% of the FP32 GEMMs, 50% of the pageable copies, 5% of the
    step) that nothing measured: no saving now, said so, with a severity from what was measured."""
    f = {f.id: f for f in FIRES[rule_id](tmp_path)}[rule_id]
    assert f.saving_ms_per_step == 0 and f.estimate.startswith("not estimated")
    assert f.severity in ("high", "medium", "low")


def test_fp32_gemm_says_what_told_it(tmp_path: Path) -> None:
    """The kernels tell the precision; a run configured for bf16 that still runs FP32 GEMMs (layers
    outside autocast) says so beside them."""
    bare = {f.id: f for f in _trace(tmp_path, step_loop_trace(0.0))}["fp32_gemm"]
    assert bare.evidence["told_by"].startswith("the trace's GEMM kernels")
    assert "configured_precision" not in bare.evidence and "bf16" not in bare.title
    in_run = {f.id: f for f in _run_with_trace(tmp_path, {"kernels": {"precision": "bf16"}})}["fp32_gemm"]
    assert in_run.evidence["configured_precision"] == "bf16"
    assert in_run.title.endswith("although the run is configured for bf16")


def test_small_buckets_say_what_told_them(tmp_path: Path) -> None:
    recorded = {f.id: f for f in FIRES["small_ddp_buckets"](tmp_path)}["small_ddp_buckets"]
    assert (
        recorded.evidence["told_by"] == "the DDP all-reduces perfkit recorded (their count and size a step)"
    )
    assert "bucket_cap_mb" not in recorded.evidence


def test_small_buckets_on_nccl_are_estimated_from_their_gpu_time(tmp_path: Path) -> None:
    """NCCL rows have no end (a call returns once queued): the saving had always been 0 there. From
    the buckets' GPU time a step instead, as an upper bound."""
    m = FIRES["small_ddp_buckets"](tmp_path)  # the CPU case: 30 ms exposed
    comms = CommMetrics(table=[], collectives_per_step=60.0, bytes_per_step=60 * 5e3, ddp_buckets_per_step=60.0,
                        ddp_bucket_bytes=5e3, ddp_exposed_ms=None, ddp_gpu_ms=12.0)  # fmt: skip
    (f,) = [
        f for f in _run_rules(Metrics(steps=_steps(backward=0.5), comms=comms)) if f.id == "small_ddp_buckets"
    ]
    assert f.saving_ms_per_step == pytest.approx(12.0 * 59 / 60) and "at most" in f.estimate
    assert f.evidence["bucket_gpu_ms_per_step"] == 12.0 and "exposed_after_backward_ms" not in f.evidence
    assert {x.id: x for x in m}["small_ddp_buckets"].evidence["exposed_after_backward_ms"] == 30.0


def test_a_pipeline_rank_is_compared_with_its_own_stage() -> None:
    """A pipeline's stages, from its sends and receives (a rank's place in its group's ranks:
    pp2 x dp2, groups 0,2 and 1,3): the straggler's saving is its busy time beyond its own stage's
    fastest rank, not beyond a rank of a lighter stage."""
    comms = pd.DataFrame(
        {
            "rank": [0, 2, 1, 3, 0],
            "op": ["send", "recv", "send", "recv", "all_reduce"],
            "group_size": [2, 2, 2, 2, 4],
            "group_ranks": ["0,2", "0,2", "1,3", "1,3", "0,1,2,3"],
        }
    )
    stages = pipeline_stages(comms)
    assert stages == {0: 0, 2: 1, 1: 0, 3: 1} and pipeline_stages(comms[comms["op"] == "all_reduce"]) == {}
    busy = {0: 50.0, 1: 52.0, 2: 70.0, 3: 100.0}
    ranks = [
        StragglerRank(rank=r, busy_ms=b, score=1.0, arrival_late_ms=None, last_to_arrive_share=None)
        for r, b in busy.items()
    ]
    m = Metrics(steps=_steps(), stragglers=Stragglers(ranks=ranks, slow=[3], stages=stages))
    (f,) = [f for f in _run_rules(m) if f.id == "straggler"]
    assert f.saving_ms_per_step == pytest.approx(30.0) and "pipeline stage" in f.estimate
    # no pipeline: against the fastest rank of all
    m = Metrics(steps=_steps(), stragglers=Stragglers(ranks=ranks, slow=[3]))
    (g,) = [g for g in _run_rules(m) if g.id == "straggler"]
    assert g.saving_ms_per_step == pytest.approx(50.0) and "pipeline" not in g.estimate


def test_pipeline_bubble_saving_and_its_absence() -> None:
    """pp=4 with 4 microbatches (1F1B): 3 of 7 slots idle (43%); with 16 microbatches, 3 of 19. The
    saving scales the measured forward + backward (70 of a 100 ms step) by 1 - fill(16) / fill(4)."""
    m = Metrics(steps=_steps(forward=0.2, backward=0.5), config={"parallel": {"pp": 4, "microbatches": 4}})
    (f,) = [f for f in _run_rules(m) if f.id == "pipeline_bubble"]
    assert f.evidence["bubble_pct"] == pytest.approx(100 * 3 / 7, abs=0.1)
    assert f.saving_ms_per_step == pytest.approx(70 * (1 - (19 / 16) / (7 / 4)), rel=1e-3)
    assert f.remedy == "pipeline_microbatches" and "told_by" in f.evidence
    # where the trainer measured what a microbatch more costs, less that: 0.5 ms a stage and half of
    # 0.4 a unit (4 blocks over 4 ranks: a block and the ends), 0.9 ms for each of the 12 more
    costs = {"pipeline_microbatch_s": 0.0005, "chunk_overhead_s": 0.0004}
    m.model = {"layout_costs": costs}
    m.config["model"] = {"n_layers": 4}
    (g,) = [g for g in _run_rules(m) if g.id == "pipeline_bubble"]
    assert g.saving_ms_per_step == pytest.approx(f.saving_ms_per_step - 0.9 * 12, rel=1e-3)
    assert g.evidence["extra_ms_per_microbatch"] == pytest.approx(0.9) and "measured" in g.estimate
    # under GPipe, a receive more posted late too: the copy's 5.5 ms excess over its 11 late ones
    m.config["parallel"]["pp_schedule"] = "gpipe"
    m.model = {
        "layout_costs": {**costs, "pipeline_gpipe_extra_s": 0.0055, "pipeline_gpipe_microbatches": 12.0}
    }
    m.run = _run_info()
    (h,) = [h for h in _run_rules(m) if h.id == "pipeline_bubble"]
    assert h.evidence["extra_ms_per_microbatch"] == pytest.approx(0.9 + 0.5)
    m.config["parallel"].pop("pp_schedule")
    # and where they cost more than the bubble gives back (tiny-cpu on 2 CPU ranks: 2 microbatches
    # 28 ms a step, 8 microbatches 42), no finding: its fix would slow the run
    m.model = {"layout_costs": {**costs, "pipeline_microbatch_s": 0.005}}
    assert not [g for g in _run_rules(m) if g.id == "pipeline_bubble"]
    # enough microbatches already (3 of 35 slots: under the 10% bar), or no pipeline: nothing
    for parallel in ({"pp": 4, "microbatches": 32}, {"pp": 1}):
        m = Metrics(steps=_steps(forward=0.2, backward=0.5), config={"parallel": parallel})
        assert not [f for f in _run_rules(m) if f.id == "pipeline_bubble"]


def test_gpipe_late_receives_saving_and_its_absence() -> None:
    """GPipe's copy took 5 ms longer than 1F1B's at 12 microbatches (2 ranks): 11 late receives, so
    0.45 ms each, and a run of 8 microbatches pays 7 of them. 1F1B, no pipeline, or no measurement:
    nothing."""
    gpipe = {"pp": 2, "microbatches": 8, "pp_schedule": "gpipe"}
    m = Metrics(
        steps=_steps(forward=0.2, backward=0.5),
        config={"parallel": gpipe},
        model={"layout_costs": {"pipeline_gpipe_extra_s": 0.005, "pipeline_gpipe_microbatches": 12.0}},
        run=_run_info(),
    )
    (f,) = [f for f in _run_rules(m) if f.id == "gpipe_late_receives"]
    assert f.saving_ms_per_step == pytest.approx(5.0 * 7 / 11, rel=1e-3) and f.remedy == "pipeline_1f1b"
    assert f.evidence["copy_microbatches"] == 12 and "told_by" in f.evidence
    copy = {"pipeline_gpipe_extra_s": 0.005, "pipeline_gpipe_microbatches": 12.0}
    for parallel, costs in (({**gpipe, "pp_schedule": "1f1b"}, copy), ({"pp": 1}, copy), (gpipe, {})):
        m = Metrics(
            steps=_steps(), config={"parallel": parallel}, model={"layout_costs": costs}, run=_run_info()
        )
        assert not [f for f in _run_rules(m) if f.id == "gpipe_late_receives"]


# ---- and every rule stays quiet on input that could fool it ------------------------------------


def _quiet_headroom(tmp: Path) -> list[Finding]:
    """A snapshot whose peak is 80% of the device: high, but under the 92% bar."""
    from perfkit.run import Run

    run = Run.create(tmp / "r", command=["x"], world_size=1, env={"gpu_memory_bytes": 2**30})
    run.layout.rank_dir(0).mkdir()
    snap = snapshot(split=2**20, flushes=0)
    total = sum(seg["total_size"] for seg in snap["segments"])
    run.manifest.env["gpu_memory_bytes"] = int(total / 0.8)
    run.save()
    run.layout.memory_snapshot(0).write_bytes(pickle.dumps(snap))
    run.finish("complete", 0)
    return analyze(run.path).findings


QUIET: dict[str, Callable[[Path], list[Finding]]] = {
    "gpu_health": lambda tmp: health_findings(throttle_reasons=0x3),  # idle, application clocks
    **{  # jitter, a one-window blip of everything, a memory step that stays flat
        f"watch_{k}": lambda tmp: quiet_watch_findings()
        for k in ("straggler", "data_wait", "gc", "memory", "collective", "step_time")
    },
    "gc_pauses": lambda tmp: gc_findings({0: 0.0, 1: 2.5}),  # one rank alone pauses, 2.5% of a step
    # trace rules, on real traces that hold what each rule looks at, healthy
    "host_launch_bound": lambda tmp: _trace(tmp, step_loop_trace(30.0)),  # GPU idle, but for input
    # the GPU's own 1 ms kernels back to back: nothing between them to take off the path
    "fusion_candidates": lambda tmp: _trace(tmp, step_loop_trace(30.0)),
    "host_device_sync": lambda tmp: analyze(DATA / "h100" / "compiled_trace.json.gz").findings,
    "input_stall": lambda tmp: analyze(DATA / "h100" / "compiled_trace.json.gz").findings,  # idle: launches
    "fp32_gemm": lambda tmp: (
        analyze(DATA / "h100" / "compiled_trace.json.gz").findings
    ),  # GEMMs on tensor cores
    "pageable_h2d": lambda tmp: analyze(DATA / "h100" / "tuned_trace.json.gz").findings,  # H2D, pinned
    "unfused_attention": lambda tmp: _run_with_trace(tmp, {"kernels": {"attention": "sdpa"}}),
    "unfused_optimizer": lambda tmp: _run_with_trace(tmp, {"kernels": {"optimizer_impl": "fused"}}),
    "exposed_communication": lambda tmp: analyze(DATA / "h100" / "tuned_trace.json.gz").findings,
    # run rules, just under their bars or with what they look for explained away
    "low_mfu": lambda tmp: _run_rules(
        Metrics(steps=_steps(), throughput=Throughput(flops_per_token=1.0, achieved_tflops=1.0, mfu=0.31))
    ),
    "checkpoint_stall": lambda tmp: _run_rules(  # a save of 1.5 steps
        Metrics(
            steps=_steps(),
            io=IoMetrics(checkpoint_save_ms_max=150.0, checkpoint_saves=2),
            config={"checkpoint": {"every": 10}},
        )  # fmt: skip
    ),
    "memory_pressure": lambda tmp: _run_rules(  # fragmented, but the allocator never ran short
        Metrics(
            steps=_steps(),
            memory=MemoryMetrics(rss_max_bytes=1.0, alloc_retries=0, ooms=0, fragmentation=0.6),
        )
    ),
    "recompute_without_pressure": lambda tmp: _run_rules(  # checkpointing, the peak at 70% of memory
        Metrics(
            run=_run_info(host_memory_bytes=2**34),
            config={"kernels": {"activation_checkpointing": True}},
            steps=_steps(forward=0.3),
            memory=MemoryMetrics(rss_max_bytes=0.35 * 2**34, alloc_retries=0),
        )
    ),  # fmt: skip
    "gpipe_late_receives": lambda tmp: _run_rules(  # GPipe, but its copy measured no excess over 1F1B
        Metrics(
            steps=_steps(forward=0.2, backward=0.5),
            config={"parallel": {"pp": 2, "microbatches": 8, "pp_schedule": "gpipe"}},
            model={"layout_costs": {"pipeline_gpipe_extra_s": 0.0, "pipeline_gpipe_microbatches": 12.0}},
            run=_run_info(),
        )
    ),
    "pipeline_bubble": lambda tmp: _run_rules(  # pp=4 with 32 microbatches: 3 of 35 slots idle
        Metrics(steps=_steps(forward=0.2, backward=0.5), config={"parallel": {"pp": 4, "microbatches": 32}})
    ),
    "small_ddp_buckets": lambda tmp: _run_rules(  # 60 buckets, but of 25 MB each: a 1.5 GB model
        Metrics(
            steps=_steps(backward=0.5),
            comms=CommMetrics(
                table=[],
                collectives_per_step=60.0,
                bytes_per_step=60 * 25e6,
                ddp_buckets_per_step=60.0,
                ddp_bucket_bytes=25e6,
                ddp_exposed_ms=30.0,
            ),
        )
    ),  # fmt: skip
    "small_blocking_collectives": lambda tmp: _run_rules(  # blocking gathers of 1% of the step
        Metrics(steps=_steps(), comms=_gathers(blocking=True, ms=0.5))
    ),
    "ddp_find_unused_parameters": lambda tmp: _run_rules(  # the flag is needed: parameters go unused
        Metrics(steps=_steps(), model={"ddp": _ddp(unused_parameters=4)})
    ),
    "host_oversubscribed": lambda tmp: _run_rules(  # one rank waits for a core, the other does not
        Metrics(steps=_oversubscribed(40.0, 5.0), run=_run_info(cpu_count=2, threads=4))
    ),
    "straggler": lambda tmp: _run_rules(Metrics(steps=_steps(), stragglers=_two_ranks())),
    "cpu_contention": lambda tmp: _run_rules(Metrics(steps=_steps(), stragglers=_two_ranks())),
    # a hang snapshot of a healthy job: every rank inside the same collective, for now
    "hang": lambda tmp: _run_rules(Metrics(hang=_all_in_step())),
    "desync": lambda tmp: _run_rules(Metrics(hang=_all_in_step())),
    "first_failure": lambda tmp: _run_rules(Metrics(hang=HangMetrics(hung=False, ranks=[]))),
    # snapshots: splits under the bar, a cache that never flushed, a high peak under 92%
    "allocator_fragmentation": lambda tmp: _snapshot_alone(tmp, split=2**27, flushes=0),
    "allocator_cache_flushes": lambda tmp: _snapshot_alone(tmp, split=2**30, flushes=0),
    "memory_headroom": _quiet_headroom,
    # 16 ranks of identical GPUs that differ by a few percent (sigma 3%, up to 6%): no rank singled out
    "slow_gpu": lambda tmp: _job(tmp, spread=0.03),
    "late_rank": lambda tmp: _job(tmp, spread=0.03),
    "slow_link": lambda tmp: _job(tmp, spread=0.03),
}


def _all_in_step() -> HangMetrics:
    from perfkit.analyzers.hangs import RankState, _match

    entry = {"group": "0", "seq": 5, "op": "all_reduce", "bytes": 16, "dtype": "float32"}
    h = HangMetrics(
        hung=False,
        ranks=[RankState(rank=r, told_by="hang record", in_flight=[entry], entered={"0": 5}, frame="t.py:9 main")
               for r in (0, 1)],
    )  # fmt: skip
    _match(h, 2)
    return h


def test_every_rule_has_a_case_that_could_fool_it() -> None:
    missing = {r.id for r in RULES} - set(QUIET)
    assert not missing, f"add a quiet case to QUIET for: {sorted(missing)}"


@pytest.mark.parametrize("rule_id", sorted(QUIET))
def test_the_rule_stays_quiet(tmp_path: Path, rule_id: str) -> None:
    found = {f.id: f for f in QUIET[rule_id](tmp_path)}
    assert rule_id not in found, f"{rule_id} fired: {found.get(rule_id)}"


@pytest.mark.parametrize("seed", [0, 1])
def test_among_gpus_that_differ_a_slow_one_is_a_slow_gpu_not_a_late_rank(tmp_path: Path, seed: int) -> None:
    """16 GPUs differing by 3%, one 15% slower: the fleet's spread hid it from the outlier test and
    the others' wait named it a late rank (host side). Its own extra compute says GPU; a late host
    (20 ms a step, computing as fast) stays a late rank."""
    slow = {f.id: f for f in _job(tmp_path / "gpu", spread=0.03, slow_gpu=2, slow_gpu_factor=1.15, seed=seed)}
    assert "slow_gpu" in slow and slow["slow_gpu"].ranks == [2] and "late_rank" not in slow
    late = {f.id: f for f in _job(tmp_path / "host", spread=0.03, straggler=5, seed=seed)}
    assert "late_rank" in late and late["late_rank"].ranks == [5] and "slow_gpu" not in late
