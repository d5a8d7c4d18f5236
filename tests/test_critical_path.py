"""The critical path (``perfkit.analyzers.critical_path``): HTA's own figures on its test trace, and
small traces whose path is known by construction (GPU-bound, host-bound, a stream waiting on another,
a thread waiting on another), fusion candidates."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

import pytest
from helpers import run_perfkit
from perfkit.analyzers.critical_path import critical_path, fusion_candidates, trace_path
from perfkit.analyzers.trace import load_trace

DATA = Path(__file__).parent / "data" / "hta"
ALEXNET = DATA / "critical_path" / "benchmark_result_2869224_1695835535_trace.json.gz"
ANNOTATION = "[param|pytorch.model.alex_net|0|0|0|measure|forward]"

# Printed by holistictraceanalysis 0.5.0 (pandas 2.2) on this very file, as its own test calls it:
# TraceAnalysis(trace_dir=...).critical_path_analysis(rank=0, annotation=ANNOTATION, instance_id=1)
# with CRITICAL_PATH_ADD_ZERO_WEIGHT_LAUNCH_EDGE=1 (and the same without): the summed weights of
# the path's edges, len(critical_path_nodes), get_critical_path_breakdown() summed by bound_by (us),
# and its three largest events by duration.
HTA_LENGTH_US = 35834
HTA_NODES = 149
HTA_BOUND_BY_US = {
    "cpu_bound": 32042,
    "gpu_compute_bound": 3712,
    "gpu_kernel_kernel_overhead": 50,
    "gpu_kernel_launch_overhead": 30,
}
HTA_TOP = ["cudaMalloc", "ampere_sgemm_32x32_sliced1x4_tn", "sm80_xmma_fprop_implicit_gemm_indexed_tf32f32"]


def test_hta_parity_on_its_critical_path_trace() -> None:
    trace = load_trace(ALEXNET)
    ev = trace.events
    instance = ev[ev["name"].astype(str) == ANNOTATION].sort_values("ts").iloc[1]
    p = critical_path(trace, int(instance["ts"]), int(instance["end"]), hta=True)
    assert p is not None
    assert p.length_ns / 1e3 == pytest.approx(HTA_LENGTH_US, rel=0.01)
    assert p.nodes == HTA_NODES
    us = {k: v / 1e3 for k, v in p.by_kind.items()}
    assert us["host"] == pytest.approx(HTA_BOUND_BY_US["cpu_bound"], rel=0.01)
    gpu = us.get("compute", 0) + us.get("memory", 0) + us.get("communication", 0)
    assert gpu == pytest.approx(HTA_BOUND_BY_US["gpu_compute_bound"], rel=0.01)
    assert us["gpu_gap"] == pytest.approx(HTA_BOUND_BY_US["gpu_kernel_kernel_overhead"], abs=1)
    assert us["launch"] == pytest.approx(HTA_BOUND_BY_US["gpu_kernel_launch_overhead"], abs=1)
    top = [name for name, _, _ in p.contributors[:3]]
    assert all(t.startswith(h) for t, h in zip(top, HTA_TOP, strict=True)), top


class Kineto:
    """A Kineto trace as plain data, built event by event (times in us)."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.corr = 0

    def x(self, cat: str, name: str, ts: float, dur: float, tid: int = 1, **args: Any) -> None:
        gpu = cat in ("kernel", "gpu_memcpy", "gpu_memset", "cuda_sync")
        self.events.append(
            {
                "ph": "X",
                "cat": cat,
                "name": name,
                "pid": 0 if gpu else 1,
                "tid": args.get("stream", tid),
                "ts": ts,
                "dur": dur,
                "args": args,
            }  # fmt: skip
        )

    def launch(self, op: str, ts: float, kernel_ts: float, kernel_us: float, stream: int = 7) -> int:
        """An op at ``ts`` that launches one kernel; returns the launch's correlation."""
        self.corr += 1
        self.x("cpu_op", op, ts, 10)
        self.x("cuda_runtime", "cudaLaunchKernel", ts + 2, 6, correlation=self.corr)
        self.x("kernel", f"{op.removeprefix('aten::')}_kernel", kernel_ts, kernel_us, correlation=self.corr,
               stream=stream)  # fmt: skip
        return self.corr

    def save(self, path: Path) -> Path:
        path.write_text(json.dumps({"traceEvents": self.events}))
        return path


def test_a_gpu_bound_step_puts_its_kernels_on_the_path(tmp_path: Path) -> None:
    """One 1 ms kernel and a blocking copy that waits for it: the kernel is the path, whether the
    trace draws the sync (a Stream Sync event) or not (the wait is inferred from the blocking call)."""
    for drawn in (True, False):
        k = Kineto()
        k.x("user_annotation", "ProfilerStep#1", 0, 1200)
        k.launch("aten::mm", 0, 20, 1000)
        k.x("cpu_op", "aten::item", 30, 1010)
        k.x("cuda_runtime", "cudaMemcpyAsync", 35, 1000, correlation=99)
        k.x("gpu_memcpy", "Memcpy DtoH (Device -> Pageable)", 1021, 3, correlation=99, stream=7)
        if drawn:
            k.x("cuda_sync", "Stream Sync", 1021, 13, correlation=99, stream=7)
        p = critical_path(load_trace(k.save(tmp_path / f"gpu{drawn}.json")), 0, 1200_000)
        assert p is not None
        assert p.by_kind.get("compute") == 1_000_000, (drawn, p.by_kind)
        assert p.contributors[0][0] == "mm_kernel"
        assert p.length_ns == pytest.approx(1_040_000, abs=20_000)


def test_a_host_bound_step_puts_its_ops_on_the_path(tmp_path: Path) -> None:
    """40 ops of 10 us, each launching a 2 us kernel, 5 us of Python between them: the host."""
    k = Kineto()
    k.x("user_annotation", "ProfilerStep#1", 0, 700)
    for i in range(40):
        k.launch("aten::add" if i % 2 else "aten::mul", 15 * i, 15 * i + 9, 2)
    p = critical_path(load_trace(k.save(tmp_path / "host.json")), 0, 700_000)
    assert p is not None
    assert p.by_kind["host"] >= 0.95 * p.length_ns and p.by_kind.get("compute", 0) <= 2_000
    assert p.length_ns == pytest.approx(40 * 15_000 - 5_000 + 2_000 + 1_000, rel=0.02)


def test_a_stream_waiting_on_another_waits_for_its_kernel(tmp_path: Path) -> None:
    """Kernel A (500 us) on stream 20; stream 7 waits on the event recorded after it, then runs B:
    the path goes through A, then B (not through the launch of B, 400 us earlier)."""
    k = Kineto()
    k.x("user_annotation", "ProfilerStep#1", 0, 1000)
    k.launch("aten::conv", 0, 20, 500, stream=20)
    k.x("cuda_runtime", "cudaEventRecord", 12, 3, correlation=50)
    k.x("cuda_runtime", "cudaStreamWaitEvent", 16, 3, correlation=51)
    k.x("cuda_sync", "Stream Wait Event", 17, 0.5, correlation=51, stream=7, wait_on_stream=20,
        wait_on_cuda_event_record_corr_id=50)  # fmt: skip
    k.launch("aten::relu", 30, 525, 100, stream=7)
    k.x("cuda_runtime", "cudaDeviceSynchronize", 45, 585, correlation=60)
    k.x("cuda_sync", "Context Sync", 625, 5, correlation=60, stream=-1)
    trace = load_trace(k.save(tmp_path / "wait.json"))
    assert (trace.events["wait_corr"] == 50).sum() == 1  # the loader keeps what a stream waits on
    p = critical_path(trace, 0, 1_000_000)
    assert p is not None
    names = [n for n, _, _ in p.contributors]
    assert "conv_kernel" in names and "relu_kernel" in names
    assert p.by_kind["compute"] == 600_000


def test_a_thread_waiting_on_another_is_not_python_time(tmp_path: Path) -> None:
    """The training thread pauses 4.9 ms in ``backward()`` while autograd's thread runs the backward
    ops: the path goes through those, not through 4.9 ms of "Python between ops"."""
    k = Kineto()
    k.x("user_annotation", "ProfilerStep#1", 0, 5200)
    k.x("cpu_op", "aten::sum", 0, 100, tid=1)
    for i in range(8):
        k.x("cpu_op", "autograd::engine::evaluate_function: MmBackward0", 150 + 600 * i, 550, tid=2)
    k.x("cpu_op", "Optimizer.step#AdamW.step", 5000, 100, tid=1)
    p = critical_path(load_trace(k.save(tmp_path / "threads.json")), 0, 5_200_000)
    assert p is not None
    contributions = {n: ns for n, _, ns in p.contributors}
    assert contributions["autograd::engine::evaluate_function: MmBackward0"] == 8 * 550_000
    assert contributions.get("Python between ops", 0) < 600_000


def test_fusion_candidates_recur_every_step(tmp_path: Path) -> None:
    """Each of 6 steps runs mul, add, mul of 3 us kernels launched back to back (host-bound): the run
    is a candidate, once a step, saving the launches between its kernels' ops."""
    k = Kineto()
    for step in range(6):
        t0 = 1000 * step
        k.x("user_annotation", f"ProfilerStep#{step}", t0, 900)
        k.launch("aten::mm", t0, t0 + 9, 600)
        k.x("cpu_op", "aten::item", t0 + 15, 620)
        k.x("cuda_runtime", "cudaMemcpyAsync", t0 + 16, 615, correlation=1000 + step)
        for i, op in enumerate(("aten::mul", "aten::add", "aten::mul")):
            k.launch(op, t0 + 640 + 15 * i, t0 + 649 + 15 * i, 3)
    trace = load_trace(k.save(tmp_path / "fuse.json"))
    summary = trace_path(trace)
    assert summary is not None and summary.steps == 3  # the first, middle and last of the 6
    best = summary.fusion[0]
    assert best.ops == ["aten::mul", "aten::add", "aten::mul"] and best.per_step == 1
    assert 0.01 < best.saving_ms < 0.05 and summary.fusable_ms >= best.saving_ms
    assert not fusion_candidates([])[0]


H100 = Path(__file__).parent / "data" / "h100" / "tuned_trace.json.gz"


def test_whatif_replays_a_change_on_the_critical_path() -> None:
    """The H100 step loop is host-bound under the profiler (51 ms a step, 28 ms of GPU work): a host
    100x faster leaves the GPU's work, 2x faster GEMMs change nothing (they are not on the path)."""
    from perfkit.optimizer.replay import parse_change, replay

    host = replay(H100, parse_change(("host=100",), None))
    assert 25 < host.predicted_ms < 40 and host.uncertainty_ms < 2
    r = host.ranks[0]
    assert abs(statistics.median(r.replayed_ms) / statistics.median(r.spans_ms) - 1) < 0.05  # no change
    gemm = replay(H100, parse_change(("gemm=2",), None))
    assert gemm.predicted_ms == pytest.approx(gemm.step_ms, abs=0.5)
    # a layout's share of the work (LayoutReplay): everything twice as fast, kernels, the host's ops
    # and its Python, but the launches' delays and the GPU's gaps: a little over half the path;
    # the host's share alone (a layout's modules) leaves the GPU's 28 ms bound
    from perfkit.analyzers.critical_path import Change

    half = replay(H100, Change(rest=2))
    r = half.ranks[0]
    ratio = statistics.median(r.changed_ms) / statistics.median(r.replayed_ms)
    assert 0.5 <= ratio < 0.6, ratio
    assert 25 < replay(H100, Change(speedup={"host": 100})).predicted_ms < 40


def test_a_change_scales_the_rest_the_optimizers_span_and_slows_too(tmp_path: Path) -> None:
    """A forward op (1000 us), Python (200), another op (200), Python (100), the optimizer's span
    (an op of 500, Python 100, an op of 400), Python (100), the input (an op of 200): ``rest`` scales
    all but the optimizer's span and the input; the optimizer's span goes by the optimizer family,
    its Python too; a factor under 1 slows."""
    from perfkit.analyzers.critical_path import Change

    k = Kineto()
    k.x("user_annotation", "ProfilerStep#1", 0, 2800)
    k.x("cpu_op", "aten::mm", 0, 1000)
    k.x("cpu_op", "aten::add", 1200, 200)
    k.x("user_annotation", "Optimizer.step#AdamW.step", 1500, 1000)
    k.x("cpu_op", "aten::mul_", 1500, 500)
    k.x("cpu_op", "aten::sqrt", 2100, 400)
    k.x("user_annotation", "enumerate(DataLoader)#_SingleProcessDataLoaderIter.__next__", 2600, 200)
    k.x("cpu_op", "aten::copy_", 2600, 200)
    trace = load_trace(k.save(tmp_path / "layout.json"))

    def length(change: Change | None = None) -> float:
        p = critical_path(trace, 0, 2_800_000, change=change)
        assert p is not None
        return p.length_ns / 1e3

    assert length() == pytest.approx(2800)
    assert length(Change(speedup={"optimizer": 4}, rest=2)) == pytest.approx(
        (1000 + 200 + 200 + 100 + 100) / 2 + 1000 / 4 + 200
    )
    assert length(Change(speedup={"gemm": 0.5})) == pytest.approx(2800 + 1000)  # twice as slow
    # more work: the optimizer too (no key names it), the input as it was
    assert length(Change(rest=0.5)) == pytest.approx(2800 + 1600 + 1000)


def test_whatif_replay_refuses_what_it_cannot_reproduce(tmp_path: Path) -> None:
    """One profiled step (all warm-up, no spread), or steps whose events do not fill them: no
    prediction, one line that says why."""
    one = Kineto()
    one.x("user_annotation", "ProfilerStep#1", 0, 1000)
    one.launch("aten::mm", 0, 20, 900)
    empty = Kineto()  # each 10 ms step holds 1 ms of ops, 5 ms in
    for step in range(3):
        empty.x("user_annotation", f"ProfilerStep#{step}", 10_000 * step, 10_000)
        empty.x("cpu_op", "aten::mm", 10_000 * step + 5_000, 1_000)
    for k, says in (
        (one, "1 profiled step(s); a replay needs 2"),
        (empty, "does not hold what sets its step"),
    ):
        path = k.save(tmp_path / f"{len(k.events)}.json")
        r = run_perfkit("whatif", str(path), "--speedup", "gemm=2")
        assert r.returncode != 0 and says in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    for bad, says in (
        (("--speedup", "gemm"), "give FAMILY=K"),
        (("--link-bandwidth", "fast"), "how many times"),
    ):
        r = run_perfkit("whatif", str(H100), *bad)
        assert r.returncode == 2 and says in r.stderr, r.stderr
    r = run_perfkit("whatif", str(H100), "--speedup", "gemm=2", "--set", "parallel.tp=2")
    assert r.returncode == 2 and "separate perfkit whatif" in r.stderr


def test_the_h100_eager_step_is_host_bound_and_its_fusion_candidates_add_up() -> None:
    """The README's figures of the H100 eager capture: the path is nearly the whole step and nearly
    all host, and short ops back to back on it add up to about a third of the step."""
    s = trace_path(load_trace(H100))
    assert (
        s is not None
        and s.length_ms == pytest.approx(50.1, abs=0.5)
        and s.step_ms == pytest.approx(51.2, abs=0.5)
    )
    assert s.by_kind_ms["host"] > 0.9 * s.length_ms and s.by_kind_ms["compute"] < 0.05 * s.length_ms
    assert s.fusable_ms == pytest.approx(17.1, abs=0.5)
    top = s.fusion[0]
    assert top.ops == ["aten::view", "aten::t", "aten::reshape", "aten::to"] and top.per_step == 29
