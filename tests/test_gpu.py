"""The GPU paths, on a real CUDA device: skipped (and said so) without one. bench/gpu_check.sh runs
them on a lent GPU with everything else it measures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def _probe(tmp_path: Path, collect: list[str], **kw: object):  # type: ignore[no-untyped-def]
    from perfkit.collectors.options import CollectOptions
    from perfkit.collectors.probe import Probe

    return Probe(tmp_path, 0, 1, 0, CollectOptions(collect=collect, **kw))  # type: ignore[arg-type]


def test_cuda_event_step_and_phase_times_match_the_device(tmp_path: Path) -> None:
    """Steps and phases are timed with CUDA events, resolved later, with no device sync: a step of
    known GPU work (sleep kernels) is recorded at its GPU length."""
    from perfkit.tables import STEPS, read_table

    torch.zeros(1, device="cuda")  # initialize CUDA: the probe times with events once it is
    probe = _probe(tmp_path, ["steps"]).start()
    for _ in range(4):
        with probe.phase("forward"):
            torch.cuda._sleep(20_000_000)  # ~10-20 ms of GPU time, by clock rate
        loss = torch.ones((), device="cuda") * 3
        probe.end_step(tokens=1, loss=loss)
    probe.stop()
    steps, _ = read_table(tmp_path / "rank0" / "steps.jsonl", STEPS)
    assert len(steps) == 4 and (steps["loss"] == 3.0).all()  # the loss copy landed before it was read
    assert (steps["forward_s"] > 0.002).all() and (steps["forward_s"] <= steps["step_time_s"] * 1.01).all()


def test_cuda_memory_stats_and_allocator_history(tmp_path: Path) -> None:
    from perfkit.analyzers.analyze import analyze

    from perfkit.tables import MEMORY, read_table

    probe = _probe(tmp_path, ["steps", "memory"], memory_history=(2, 3)).start()
    keep = []
    for _ in range(4):
        keep.append(torch.empty(64 << 20, dtype=torch.uint8, device="cuda"))
        probe.end_step()
    probe.stop()
    mem, _ = read_table(tmp_path / "rank0" / "memory.jsonl", MEMORY)
    assert (mem["device"] == "cuda").all() and mem["allocated"].iloc[-1] >= 4 * (64 << 20)
    snap = tmp_path / "rank0" / "memory_snapshot.pickle"
    assert snap.exists()
    a = analyze(snap)
    assert a.ranks == [0] and a.metrics.memory_snapshot[snap.name]["history_entries"] > 0


def test_nvml_samples_this_gpu(tmp_path: Path) -> None:
    pytest.importorskip("pynvml")
    import time

    from perfkit.tables import NVML, read_table

    probe = _probe(tmp_path, ["steps", "nvml"], nvml_hz=50.0).start()
    time.sleep(0.3)
    probe.end_step()
    probe.stop()
    assert probe.status["nvml"]["status"] == "ok", probe.status["nvml"]
    rows, _ = read_table(tmp_path / "rank0" / "nvml.jsonl", NVML)
    assert len(rows) >= 5 and rows["power_w"].notna().all()


def test_one_rank_nccl_trainer_run_reports_mfu(tmp_path: Path) -> None:
    """The bundled trainer on one GPU under NCCL, profiled: a complete run whose analysis has MFU."""
    from perfkit.analyzers.analyze import analyze

    out = tmp_path / "gpu"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(
        [sys.executable, "-m", "perfkit", "profile", "--nproc", "1", "--out", str(out), "--profile-steps", "5-6",
         "--", "reference", "--config", "gpt2-small-gpu", "--set", "steps=12"],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = analyze(out)
    assert a.metrics.throughput is not None and a.metrics.throughput.mfu is not None
    assert 0 < a.metrics.throughput.mfu < 1
    data = json.loads((out / "manifest.json").read_text())
    assert data["env"].get("gpu_memory_bytes", 0) > 0


SYNC_NCCL = """
import torch, torch.distributed as dist, perfkit
dist.init_process_group("nccl")
torch.cuda.set_device(0)
t = torch.ones(16 << 20, device="cuda")  # 64 MiB
with perfkit.attach():
    for _ in range(6):
        torch.cuda._sleep(1_000_000)
        dist.all_reduce(t)  # synchronous: returns no Work, once the kernel is queued
        perfkit.step()
torch.cuda.synchronize()
dist.destroy_process_group()
"""


def test_a_synchronous_nccl_call_is_timed_on_the_gpu(tmp_path: Path) -> None:
    """Its GPU time from CUDA events around the call, not the host's return (the enqueue)."""
    from perfkit.tables import COMMS, read_table

    script = tmp_path / "sync.py"
    script.write_text(SYNC_NCCL)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(
        [sys.executable, "-m", "perfkit", "profile", "--out", str(tmp_path / "r"), "--profile-steps", "none",
         "--", "torchrun", "--nproc_per_node", "1", str(script)],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    comms, _ = read_table(tmp_path / "r" / "rank0" / "comms.jsonl", COMMS)
    calls = comms[(comms["op"] == "all_reduce") & (comms["bytes"] == 64 << 20)]
    assert len(calls) == 6 and calls["end_ns"].isna().all() and (calls["gpu_ms"] > 0).all(), calls


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compile_modes_keep_the_losses(tmp_path: Path, mode: str) -> None:
    """kernels.compile_mode (CUDA graphs with reduce-overhead) trains the same losses as eager, to
    the tolerance of a fused kernel's different summation order."""

    def losses(*sets: str) -> list[float]:
        log = tmp_path / f"log-{len(list(tmp_path.glob('log-*')))}.jsonl"
        args = ["--config", "tiny-cpu", "--set", "device=cuda", "--set", "steps=8", "--log-json", str(log)]
        for s in sets:
            args += ["--set", s]
        proc = subprocess.run([sys.executable, "-m", "perfkit", "train", *args], capture_output=True, text=True,
                              timeout=600)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        return [json.loads(line)["loss"] for line in log.read_text().splitlines()]

    eager = losses()
    compiled = losses("kernels.compile=true", f"kernels.compile_mode={mode}")
    assert len(compiled) == len(eager) == 8
    assert all(abs(c - e) <= 2e-3 * abs(e) for c, e in zip(compiled, eager, strict=True)), (compiled, eager)
