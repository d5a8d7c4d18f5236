"""Analyzers on real GPU traces (H100, HTA's A100/V100/MI250) and on hand-built inputs."""

from __future__ import annotations

import gzip
import json
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from perfkit.analyzers import remedies
from perfkit.analyzers.analyze import analyze
from perfkit.analyzers.breakdown import intersect_len, merge
from perfkit.analyzers.comms import bus_factor, service_ns
from perfkit.analyzers.kernels import category, gemm_precision
from perfkit.analyzers.memory import load_snapshot, snapshot_summary
from perfkit.analyzers.trace import TraceError, load_trace
from perfkit.reports.text import fix
from synth import snapshot, step_loop_trace

from perfkit.cli import cli

DATA = Path(__file__).parent / "data"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "fixtures"
TUNED, COMPILED = DATA / "h100" / "tuned_trace.json.gz", DATA / "h100" / "compiled_trace.json.gz"


@pytest.fixture(scope="module")
def tuned():
    return analyze(TUNED)


@pytest.fixture(scope="module")
def compiled():
    return analyze(COMPILED)


def ids(analysis) -> dict[str, object]:
    return {f.id: f for f in analysis.findings}


def test_eager_tuned_h100_trace_is_launch_bound(tuned) -> None:
    b = tuned.metrics.trace[0].temporal_breakdown
    assert 50 <= 100 - b["idle_pct"] <= 60  # the GPU is busy ~55% of the profiled steps
    f = ids(tuned)["host_launch_bound"]
    assert f.severity == "high" and f.ranks == [0] and f.saving_ms_per_step > 5
    assert f.remedy == "compile" and remedies.get(f.remedy).trainer == {"kernels.compile": True}
    assert tuned.findings[0].id == "host_launch_bound"
    # The saving holds: the same loop compiled measured its step on the H100 (capture.json)
    capture = json.loads((DATA / "h100" / "capture.json").read_text())
    measured = capture["tuned"]["step_ms_median"] - capture["compiled"]["step_ms_median"]  # 17.9 ms
    assert 0.5 <= f.saving_ms_per_step / measured <= 2


def test_compiled_h100_trace_gets_nothing_its_configuration_rules_out(compiled) -> None:
    # bf16, fused attention and optimizer, pinned prefetched input, no per-step sync
    ruled_out = {
        "fp32_gemm",
        "unfused_attention",
        "unfused_optimizer",
        "pageable_h2d",
        "input_stall",
        "host_device_sync",
    }
    assert not ruled_out & set(ids(compiled))
    # Still launch-bound after compiling (5.5 ms a step idle between launches): said, with what helps
    # a compiled loop (CUDA graphs, more work a launch), not "use torch.compile" again
    (launch,) = [f for f in compiled.findings if f.id == "host_launch_bound"]
    assert launch.remedy == "cuda_graphs" and launch.evidence["already"] == "torch.compile"
    from perfkit.reports.text import fix

    assert "reduce-overhead" in fix(launch, compiled.metrics).code[0]
    assert "although the step runs under torch.compile" in launch.title
    kernels = compiled.tables["kernels"]
    assert (kernels[kernels["category"] == "gemm"]["precision"] == "tensor-core").all()


def test_tuned_trace_kernel_categories(tuned) -> None:
    cats = tuned.metrics.kernel_categories
    assert cats["gemm"] > 0.25 and cats["attention"] > 0.05 and cats["optimizer"] > 0
    assert "communication" not in cats or cats["communication"] < 0.01  # a 1-rank NCCL group: no kernels


def test_two_rank_hta_traces(tmp_path: Path) -> None:
    a = analyze(DATA / "hta" / "trace_filter")
    assert a.ranks == [0, 1] and not a.partial
    for rank in (0, 1):
        b = a.metrics.trace[rank].temporal_breakdown
        # a real split, not a tautology: some of each
        assert 0 < b["idle_pct"] < 100 and b["compute_pct"] > 1
        assert b["communication_pct"] > 10  # NCCL SendRecv
    assert "exposed_communication" in ids(a)
    ops = {row["op"] for row in a.metrics.trace_collectives}
    assert "send_recv" in ops


@pytest.mark.parametrize(
    "path",
    sorted((SHARED / "hta" / "tests").rglob("*.json.gz")) + sorted((SHARED / "h100").glob("*.json.gz")),
    ids=lambda p: p.name,
)
def test_every_shared_fixture_loads_and_analyzes(path: Path) -> None:
    a = analyze(path)
    assert not a.partial and len(a.ranks) == 1
    trace = load_trace(path)
    assert (
        trace.events["ts"].dtype == np.int64 and (trace.events["ts"] > 1.6e18).all()
    )  # absolute ns, no overflow


def _strict_columns(path: Path) -> dict:
    from perfkit.analyzers import trace

    return trace._dict_events(trace.read_json(path)["traceEvents"])


@pytest.mark.parametrize(
    "path",
    [
        TUNED,
        DATA / "hta" / "trace_filter" / "sampled_rank-0.json.gz",
        DATA / "hta" / "amd_trace" / "mi250_minitoy_train_ROCm6_2_kineto.json.gz",
    ],
    ids=lambda p: p.name,
)
def test_streamed_decoding_equals_the_strict_parse(path: Path) -> None:
    """The block-by-block typed decoding (cut between events, 2 MiB at a time) gives exactly the
    columns of a plain whole-file parse, collective args included."""
    from perfkit.analyzers import trace

    fast = trace._fast_load(path)
    assert fast is not None, "a Kineto trace must take the streamed path"
    cols, comm = fast[0], fast[1]
    strict_cols, strict_comm = _strict_columns(path)
    assert len(cols["ts"]) == len(strict_cols["ts"]) > 100
    for key, values in cols.items():
        assert np.array_equal(np.asarray(values, dtype=object), np.asarray(strict_cols[key], dtype=object)), (
            key
        )
    assert comm == strict_comm


def test_an_odd_field_type_falls_back_to_the_strict_parse(tmp_path: Path) -> None:
    raw = gzip.decompress(TUNED.read_bytes())
    odd = re.sub(rb'"correlation": (\d+)', rb'"correlation": "\1"', raw, count=1)
    assert odd != raw
    path = tmp_path / "odd.json"
    path.write_bytes(odd)
    from perfkit.analyzers import trace

    assert trace._fast_load(path) is None
    a, b = load_trace(path).events, load_trace(TUNED).events
    assert len(a) == len(b) and (a["ts"].to_numpy() == b["ts"].to_numpy()).all()


def test_time_bases_agree(tmp_path: Path) -> None:
    kernel = {"ph": "X", "cat": "kernel", "name": "k", "pid": 0, "tid": 7, "dur": 5.0, "args": {"stream": 7}}
    relative = {
        "baseTimeNanoseconds": 1_790_000_000_000_000_000,
        "traceEvents": [{**kernel, "ts": 4_988_707_477_240.984}],
    }
    absolute = {"traceEvents": [{**kernel, "ts": 1_790_000_000_000_000 + 4_988_707_477_240.984}]}
    for name, data in (("rel.json", relative), ("abs.json", absolute)):
        (tmp_path / name).write_text(json.dumps(data))
    a, b = load_trace(tmp_path / "rel.json").events, load_trace(tmp_path / "abs.json").events
    assert a["ts"].iloc[0] == 1_794_988_707_477_240_984
    assert abs(int(a["ts"].iloc[0]) - int(b["ts"].iloc[0])) < 1_000  # float µs of an epoch time: sub-µs
    assert a["dur"].iloc[0] == 5_000


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"\x1f\x8b\x08\x00" + b"\x00" * 10, "cannot be read or is truncated"),
        (b'{"traceEvents": [{"ph": "X", ', "not valid JSON"),
        (b"hello", "not valid JSON"),
        (b'{"events": []}', "not a Kineto trace (no traceEvents list)"),
        (b'{"traceEvents": []}', "holds no complete events"),
    ],
)
def test_bad_trace_is_one_line_naming_the_file(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "rank0.json.gz"
    path.write_bytes(content)
    with pytest.raises(TraceError, match=re.escape(message)) as info:
        load_trace(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_a_bad_rank_leaves_the_others_analyzed(tmp_path: Path) -> None:
    folder = tmp_path / "traces"
    folder.mkdir()
    for i in (0, 1):
        (folder / f"rank-{i}.json.gz").write_bytes(
            (DATA / "hta" / "trace_filter" / f"sampled_rank-{i}.json.gz").read_bytes()
        )
    good = (DATA / "hta" / "trace_filter" / "sampled_rank-1.json.gz").read_bytes()
    (folder / "rank-2.json.gz").write_bytes(good[: len(good) // 2])  # truncated
    a = analyze(folder)
    assert a.partial and a.ranks == [0, 1]
    assert len(a.problems) == 1 and "rank-2.json.gz" in a.problems[0]
    result = CliRunner().invoke(cli, ["analyze", str(folder), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0 and "PARTIAL" in result.output and "problem:" in result.output
    written = json.loads((tmp_path / "out" / "analysis.json").read_text())
    assert written["partial"] is True and written["schema_version"] == 2


def test_cli_json_has_the_promised_keys(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["analyze", str(TUNED), "--json", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert {"schema_version", "metrics", "findings", "ranks", "partial"} <= set(data)
    for f in data["findings"]:
        assert {"id", "title", "severity", "evidence", "ranks", "saving_ms_per_step", "remedy"} <= set(f)
        assert f["severity"] in ("high", "medium", "low")


def test_cli_errors_are_one_line(tmp_path: Path) -> None:
    r = CliRunner().invoke(cli, ["analyze", str(tmp_path / "nope")])
    assert r.exit_code == 1 and r.output.count("\n") == 1 and "no such run directory or trace" in r.output
    (tmp_path / "empty").mkdir()
    r = CliRunner().invoke(cli, ["analyze", str(tmp_path / "empty")])
    assert r.exit_code == 1 and "nothing to analyze" in r.output


def test_snapshot_is_summarized() -> None:
    s = snapshot_summary(load_snapshot(DATA / "h100" / "tuned_memory_snapshot.pickle.gz"))
    assert s["reserved_bytes"] > s["allocated_bytes"] > 0
    assert s["history_entries"] > 1000 and len(s["largest"]) == 10
    assert s["largest"][0]["size"] >= s["largest"][-1]["size"]


def test_crafted_snapshot_pickle_is_refused(tmp_path: Path) -> None:
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pickle"
    path.write_bytes(pickle.dumps({"segments": [Evil()]}))
    with pytest.raises(TraceError, match="refused builtins.print"):
        load_snapshot(path)
    gz = tmp_path / "evil.pickle.gz"
    gz.write_bytes(gzip.compress(pickle.dumps({"segments": [], "x": Evil()})))
    with pytest.raises(TraceError, match="refused"):
        load_snapshot(gz)


def test_interval_helpers() -> None:
    s, e = merge(np.array([0, 5, 2, 20]), np.array([3, 10, 6, 25]))
    assert list(s) == [0, 20] and list(e) == [10, 25]
    assert intersect_len((s, e), (np.array([8, 22]), np.array([21, 30]))) == 2 + 1 + 3


@pytest.mark.parametrize(
    ("op", "n", "factor"),
    [
        ("all_reduce", 8, 1.75),
        ("all_gather", 4, 0.75),
        ("reduce_scatter", 2, 0.5),
        ("broadcast", 8, 1.0),
        ("all_reduce", 1, 0.0),
    ],
)
def test_bus_factors(op: str, n: int, factor: float) -> None:
    assert bus_factor(op, n) == pytest.approx(factor)


@pytest.mark.parametrize(
    ("name", "cat", "precision"),
    [
        ("ncclDevKernel_AllReduce_Sum_f32_RING_LL(ncclDevKernelArgsStorage<4096ul>)", "communication", None),
        ("ncclKernel_SendRecv_RING_SIMPLE_Sum_int8_t(ncclWorkElem)", "communication", None),
        ("nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NNT", "gemm", "tensor-core"),
        ("volta_sgemm_128x64_nn", "gemm", "fp32"),
        ("ampere_fp16_s16816gemm_fp16_128x128_ldg8_f2f_stages_32x5_nn", "gemm", "tensor-core"),
        ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7", "attention", None),
        (
            "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor<float>>",
            "optimizer",
            None,
        ),
        ("void at::native::unrolled_elementwise_kernel<{lambda()#1}>", "elementwise", None),
        ("triton_per_fused__to_copy_add_native_layer_norm_backward_view_10", "normalization", None),
        ("void fbgemm_gpu::permute_2D_data_kernel<false, int>", "other", None),
        ("Memcpy HtoD (Pinned -> Device)", "memory", None),
    ],
)
def test_kernel_categories(name: str, cat: str, precision: str | None) -> None:
    assert category(name) == cat
    if precision:
        assert gemm_precision(name) == precision


def test_analysis_does_not_import_torch() -> None:
    import subprocess
    import sys

    code = (
        "import sys; from perfkit.analyzers.analyze import analyze; "
        f"analyze({str(TUNED)!r}); print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


@pytest.mark.parametrize(
    ("parallel", "remedy", "change"),
    [
        ({"tp": 2, "sequence_parallel": False}, "sequence_parallel", {"parallel.sequence_parallel": True}),
        (
            {"tp": 2, "sequence_parallel": True},
            "activation_checkpointing",
            {"kernels.activation_checkpointing": True},
        ),
        ({"tp": 1}, "activation_checkpointing", {"kernels.activation_checkpointing": True}),
    ],
)
def test_memory_pressure_remedy_fits_the_layout(parallel: dict, remedy: str, change: dict) -> None:
    """With tensor parallelism and no sequence parallelism, sharding activations comes before
    recomputing them; and no finding's saving passes the step time."""
    from perfkit.analyzers.metrics import MemoryMetrics, Metrics, StepMetrics
    from perfkit.analyzers.rules import evaluate

    metrics = Metrics(
        steps=StepMetrics(steps=10, step_time_ms=100.0, step_time_p90_ms=100.0, per_rank=[], phase_share={}),
        memory=MemoryMetrics(rss_max_bytes=1.0, alloc_retries=3, ooms=0),
        config={"parallel": parallel},
    )
    found = evaluate([], metrics)
    (f,) = [f for f in found if f.id == "memory_pressure"]
    assert f.remedy == remedy and remedies.get(f.remedy).trainer == change
    assert all(f.saving_ms_per_step <= 100.0 for f in found)


def _checkpointing_run(*, checkpointing: bool, rss: float, retries: int = 0) -> object:
    from perfkit.analyzers.metrics import MemoryMetrics, Metrics, RunInfo, StepMetrics

    return Metrics(
        run=RunInfo(
            name="r",
            status="complete",
            world_size=2,
            command=[],
            env={"host_memory_bytes": 16 << 30},
            collectors={},
        ),
        config={"kernels": {"activation_checkpointing": checkpointing}},
        steps=StepMetrics(
            steps=20, step_time_ms=100.0, step_time_p90_ms=110.0, per_rank=[], phase_share={"forward": 0.3}
        ),
        memory=MemoryMetrics(rss_max_bytes=rss, alloc_retries=retries),
    )


@pytest.mark.parametrize(
    ("checkpointing", "rss", "retries", "fires"),
    [
        (True, 1 << 30, 0, True),  # 2 ranks x 1 GiB of 16 GiB: recompute for nothing
        (False, 1 << 30, 0, False),  # no checkpointing: nothing recomputed
        (True, 5 << 30, 0, False),  # 2 x 5 GiB > half of 16 GiB: the memory may be needed
        (True, 1 << 30, 2, False),  # the allocator ran short: checkpointing earns its keep
    ],
)
def test_recompute_without_pressure(checkpointing: bool, rss: float, retries: int, fires: bool) -> None:
    from perfkit.analyzers.rules import evaluate

    found = {
        f.id: f
        for f in evaluate([], _checkpointing_run(checkpointing=checkpointing, rss=rss, retries=retries))
    }  # type: ignore[arg-type]
    assert ("recompute_without_pressure" in found) is fires
    if fires:
        f = found["recompute_without_pressure"]
        assert f.saving_ms_per_step == pytest.approx(30.0) and f.remedy == "no_activation_checkpointing"
        assert f.evidence["peak_share_of_capacity"] == 0.125 and "forward" in f.estimate


@pytest.mark.parametrize(
    ("config", "title"),
    [
        ({"kernels": {"optimizer_impl": "unfused"}}, "Optimizer updates each parameter with its own kernels"),
        ({"kernels": {"optimizer_impl": "foreach"}}, "Optimizer uses foreach kernels, not the fused one"),
        ({"kernels": {"optimizer_impl": "fused"}}, None),
        ({}, None),  # no config: the trace's ops say fused (the tuned H100 step uses AdamW(fused=True))
    ],
)
def test_the_optimizer_finding_says_what_the_run_used(config: dict, title: str | None) -> None:
    from perfkit.analyzers.facts import trace_facts
    from perfkit.analyzers.metrics import Metrics, StepMetrics
    from perfkit.analyzers.rules import evaluate

    facts = trace_facts(load_trace(TUNED))
    metrics = Metrics(
        config=config,
        steps=StepMetrics(steps=5, step_time_ms=40.0, step_time_p90_ms=41.0, per_rank=[], phase_share={}),
    )
    found = {f.id: f for f in evaluate([facts], metrics if config else None)}
    if title is None:
        assert "unfused_optimizer" not in found
    else:
        f = found["unfused_optimizer"]
        assert f.title == title and f.evidence["told_by"] == "the run's config"


@pytest.mark.parametrize(("attention", "fires"), [("eager", True), ("sdpa", False)])
def test_the_attention_finding_follows_the_runs_config(attention: str, fires: bool) -> None:
    from perfkit.analyzers.facts import trace_facts
    from perfkit.analyzers.metrics import Metrics, StepMetrics
    from perfkit.analyzers.rules import evaluate

    facts = trace_facts(load_trace(TUNED))
    metrics = Metrics(
        config={"kernels": {"attention": attention}},
        steps=StepMetrics(steps=5, step_time_ms=40.0, step_time_p90_ms=41.0, per_rank=[], phase_share={}),
    )
    assert ("unfused_attention" in {f.id for f in evaluate([facts], metrics)}) is fires


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"split": 2**30, "flushes": 3}, {"allocator_fragmentation", "allocator_cache_flushes"}),
        ({"split": 2**20, "flushes": 0}, set()),  # 1 MiB split of 4 GiB: healthy
        ({"split": 2**30, "flushes": 0, "expandable": True}, set()),  # already the remedy
        ({"split": 2**20, "flushes": 2, "empty_cache": True}, set()),  # flushes the script asked for
    ],
)
def test_a_snapshot_alone_gets_memory_findings(tmp_path: Path, kwargs: dict, expected: set) -> None:
    path = tmp_path / "snap.pickle"
    path.write_bytes(pickle.dumps(snapshot(**kwargs)))
    a = analyze(path)
    assert a.ranks == [0]  # a snapshot alone is one rank, never "0 ranks"
    found = {f.id: f for f in a.findings}
    assert set(found) == expected
    for f in found.values():
        assert f.remedy == "expandable_segments"
        assert fix(f, a.metrics).code == [
            "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True in the job's environment"
        ]
    result = CliRunner().invoke(cli, ["analyze", str(path), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0 and "snap.pickle: reserved 4.00 GiB" in result.output
    assert ("nothing stands out" in result.output) is not expected


def test_the_tuned_h100_snapshot_has_no_memory_alarm() -> None:
    a = analyze(DATA / "h100" / "tuned_memory_snapshot.pickle.gz")
    assert a.ranks == [0] and not a.findings


def test_a_snapshot_in_a_run_is_read_against_the_device(tmp_path: Path) -> None:
    from perfkit.run import Run

    run = Run.create(tmp_path / "r", command=["x"], world_size=1, env={"gpu_memory_bytes": 4 * 2**30})
    run.layout.rank_dir(0).mkdir()
    run.layout.memory_snapshot(0).write_bytes(pickle.dumps(snapshot(split=2**20, flushes=0)))
    run.finish("complete", 0)
    f = {f.id: f for f in analyze(run.path).findings}["memory_headroom"]
    assert f.ranks == [0] and f.evidence["capacity_gib"] == 4.0


def test_idle_before_a_batch_built_by_user_code_is_an_input_stall_and_a_sync(tmp_path: Path) -> None:
    """The GPU waits 30 ms a step while the CPU, stopped by .item(), runs Python and then makes and
    copies the batch: both links of the chain are named, the input one with most of the idle time."""
    path = tmp_path / "loop.json"
    path.write_text(json.dumps(step_loop_trace(30.0)))
    a = analyze(path)
    found = {f.id: f for f in a.findings}
    assert {"input_stall", "host_device_sync"} <= set(found), list(found)
    # 30 ms of sleep, 0.3 ms of batch making and copying a step: within 10% (the span holds 4.2 steps)
    assert found["input_stall"].saving_ms_per_step == pytest.approx(30.3, rel=0.1)
    assert "host_launch_bound" not in found  # the CPU was not slow to launch: it was making the batch
    assert found["input_stall"].remedy == "more_workers"


def test_a_loop_without_the_sleep_has_no_input_alarm(tmp_path: Path) -> None:
    path = tmp_path / "loop.json"
    path.write_text(json.dumps(step_loop_trace(0.0, sync=False)))
    assert "input_stall" not in {f.id for f in analyze(path).findings}


def test_compact_json_in_several_gzip_members_reads_like_kineto_text(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A trace written by a compact JSON writer ("ph":"X", no spaces) and gzipped in several members
    (cat a.gz b.gz, pigz) is read by the streaming decoder, with the same events as Kineto's text."""
    import gzip

    import orjson
    from perfkit.analyzers import trace as module

    source = DATA / "hta" / "trace_filter" / "sampled_rank-0.json.gz"
    doc = orjson.loads(gzip.decompress(source.read_bytes()))
    text = orjson.dumps(doc)
    assert b'"ph": ' not in text
    cut = text.index(b"},{", len(text) // 2) + 2
    (tmp_path / "t.json.gz").write_bytes(gzip.compress(text[:cut]) + gzip.compress(text[cut:]))
    expected = module.load_trace(source)
    monkeypatch.setattr(module, "_read_bytes", lambda path: pytest.fail("fell back to the strict parse"))
    got = module.load_trace(tmp_path / "t.json.gz")
    assert len(got.events) == len(expected.events) > 1000
    assert (got.events["dur"].to_numpy() == expected.events["dur"].to_numpy()).all()


def test_service_time_leaves_out_the_queue() -> None:
    """Async collectives issued together (ZeRO-1's broadcasts) complete one after another: each one's
    own time is from the later of its start and the previous one's end, per rank and group."""
    import pandas as pd

    ms = 1_000_000
    c = pd.DataFrame(
        {
            "rank": [0, 0, 0, 0, 1],
            "group": ["0", "0", "0", "1", "0"],
            "start_ns": [0, 1 * ms, 2 * ms, 2 * ms, 0],
            "end_ns": [4 * ms, 8 * ms, 9 * ms, 3 * ms, None],
        }
    )
    own = service_ns(c) / ms
    assert list(own[:4]) == [4.0, 4.0, 1.0, 1.0] and np.isnan(own[4])  # the end unknown: no time


def test_a_rank_waits_once_for_calls_in_flight_together() -> None:
    """A rank 20 ms ahead at two overlapping async buckets waits 20 ms, not 40 (summing them made a
    clean run's fast rank look twice as fast, and a straggler of the other); two blocking calls,
    each 10 ms late, cost 20 ms."""
    import pandas as pd
    from perfkit.analyzers.runtables import blocked_ns

    ms = 1_000_000
    c = pd.DataFrame(
        {
            "rank": [0, 0, 0, 0, 0],
            "step": [1, 1, 2, 2, 2],
            "start_ns": [0, 5 * ms, 100 * ms, 120 * ms, 130 * ms],
            "end_ns": [30 * ms, 35 * ms, 111 * ms, 125 * ms, None],
            "lag_ns": [20 * ms, 20 * ms, 10 * ms, 10 * ms, 3 * ms],
            "gpu_ms": [None] * 5,
        }
    )
    assert (blocked_ns(c) / ms).to_dict() == {(0, 1): 20.0, (0, 2): 23.0}
    # NCCL: the host queues each call and goes on; its lag at each is one wait, at the step's sync.
    nccl = c.assign(end_ns=None, gpu_ms=1.0)
    assert (blocked_ns(nccl) / ms).to_dict() == {(0, 1): 20.0, (0, 2): 10.0}


@pytest.mark.parametrize("path", [TUNED, COMPILED])
def test_attention_backward_is_not_a_recomputed_forward(path: Path) -> None:
    # The H100 loop runs cuDNN SDPA (aten::_scaled_dot_product_cudnn_attention_backward inside
    # backward) and no activation checkpointing: 24 "recomputed" ops a trace before the fix.
    from perfkit.analyzers.facts import recomputed_ops

    assert recomputed_ops(load_trace(path).events) == 0


@pytest.mark.parametrize(
    "name, forward",
    [
        ("aten::_scaled_dot_product_flash_attention_for_cpu", True),
        ("aten::_scaled_dot_product_flash_attention_for_cpu_backward", False),
        ("aten::_scaled_dot_product_cudnn_attention", True),
        ("aten::_scaled_dot_product_cudnn_attention_backward", False),
        ("aten::_scaled_dot_product_efficient_attention_backward", False),
        ("aten::_flash_attention_forward", True),
        ("aten::_flash_attention_backward", False),
        ("aten::_cudnn_attention_forward", True),
        ("aten::_cudnn_attention_backward", False),
        ("aten::native_layer_norm", True),
        ("aten::native_layer_norm_backward", False),
        ("aten::gelu_backward", False),
        ("aten::embedding_dense_backward", False),
    ],
)
def test_forward_and_backward_ops_told_apart(name: str, forward: bool) -> None:
    from perfkit.analyzers.facts import is_forward_op

    assert is_forward_op(name) is forward
