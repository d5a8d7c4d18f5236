"""Real multi-rank runs on CPU (gloo) under torchrun: every layout gives the single-process losses,
the loss falls, and a killed run resumes on the same trajectory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
STEPS = 6


def train(tmp: Path, nproc: int, *sets: str, env: dict[str, str] | None = None, torchrun: bool = False):
    """Run the trainer; return (exit code, rank 0's log records, output)."""
    log = tmp / f"log-{len(list(tmp.glob('log-*')))}.jsonl"
    args = ["--config", "tiny-cpu", "--set", f"steps={STEPS}", "--log-json", str(log)]
    for s in sets:
        args += ["--set", s]
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        cmd += ["-m", "perfkit.trainer", *args]
    else:
        cmd = [sys.executable, "-m", "perfkit", "train", "--nproc", str(nproc), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=300)
    records = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return proc.returncode, records, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def baseline(tmp_path_factory: pytest.TempPathFactory) -> list[float]:
    rc, records, out = train(tmp_path_factory.mktemp("base"), 1)
    assert rc == 0, out
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    return [r["loss"] for r in records]


def assert_same_losses(got: list[float], want: list[float], steps: int = 5) -> None:
    assert len(got) >= steps, got
    for g, w in zip(got[:steps], want[:steps]):
        assert abs(g - w) <= 1e-4 * abs(w), (got, want)


LAYOUTS = {
    "dp2": (2, []),
    "zero1": (2, ["parallel.zero=1"]),
    "fsdp-zero2": (2, ["parallel.zero=2"]),
    "fsdp-zero3": (2, ["parallel.zero=3"]),
    "fsdp-zero3-prefetch": (2, ["parallel.zero=3", "overlap.fsdp_prefetch=2"]),
    "dp2-bucket-view": (2, ["overlap.gradient_as_bucket_view=true", "overlap.bucket_cap_mb=0.01"]),
    "tp2": (2, ["parallel.tp=2"]),
    "tp2-sequence-parallel": (2, ["parallel.tp=2", "parallel.sequence_parallel=true"]),
    "pp2-gpipe": (2, ["parallel.pp=2", "parallel.pp_schedule=gpipe"]),
    "pp2-1f1b": (2, ["parallel.pp=2", "parallel.pp_schedule=1f1b", "parallel.microbatches=4"]),
    "dp2-accum": (2, ["data.grad_accum=2"]),
    "dp2xtp2": (4, ["parallel.tp=2"]),
    "fsdp2xtp2": (4, ["parallel.tp=2", "parallel.zero=2"]),
    "dp2xpp2": (4, ["parallel.pp=2"]),
    "pp2xtp2": (4, ["parallel.pp=2", "parallel.tp=2"]),
    "pp2xfsdp2": (4, ["parallel.pp=2", "parallel.zero=3"]),
    "pp2xtp2-sequence-parallel": (4, ["parallel.pp=2", "parallel.tp=2", "parallel.sequence_parallel=true"]),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_single_process(tmp_path: Path, baseline: list[float], name: str) -> None:
    nproc, sets = LAYOUTS[name]
    rc, records, out = train(tmp_path, nproc, *sets)
    assert rc == 0, out
    assert_same_losses([r["loss"] for r in records], baseline)


def test_interleaved_pipeline_under_plain_torchrun(tmp_path: Path, baseline: list[float]) -> None:
    rc, records, out = train(
        tmp_path, 2, "parallel.pp=2", "parallel.pp_schedule=interleaved-1f1b", torchrun=True
    )
    assert rc == 0, out
    assert_same_losses([r["loss"] for r in records], baseline)


def test_loss_falls(tmp_path: Path) -> None:
    rc, records, out = train(tmp_path, 1, "steps=60", "log_every=10", "data.num_workers=0")
    assert rc == 0, out
    losses = [r["loss"] for r in records]
    assert [r["step"] for r in records] == [10, 20, 30, 40, 50, 60]
    assert losses[-1] < losses[0] - 1.0, losses  # from ~5.5 (log 256) well down
    assert {"step", "loss", "tokens", "step_time_s", "tokens_per_s"} <= set(records[0])


@pytest.mark.parametrize("sets", [[], ["parallel.zero=3"], ["parallel.zero=1"]], ids=["ddp", "fsdp", "zero1"])
def test_kill_and_resume_continues_the_trajectory(
    tmp_path: Path, baseline: list[float], sets: list[str]
) -> None:
    ckpt = [f"checkpoint.dir={tmp_path / 'ckpt'}", "checkpoint.every=3", *sets]
    rc, killed, out = train(tmp_path, 2, *ckpt, env={"PERFKIT_TEST_KILL_AT_STEP": "4"})
    assert rc != 0, "the run was meant to die by SIGKILL"
    assert [r["step"] for r in killed] == [1, 2, 3, 4]
    assert (tmp_path / "ckpt" / "step-00000003" / ".metadata").exists()
    rc, resumed, out = train(tmp_path, 2, *ckpt)
    assert rc == 0, out
    assert "resumed from" in out and "at step 3" in out
    assert [r["step"] for r in resumed] == [4, 5, 6]
    assert_same_losses([r["loss"] for r in resumed], baseline[3:], steps=3)


def test_async_checkpoint_completes(tmp_path: Path) -> None:
    rc, records, out = train(
        tmp_path, 2, f"checkpoint.dir={tmp_path / 'ck'}", "checkpoint.every=2", "checkpoint.async_save=true"
    )
    assert rc == 0, out
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == [
        "step-00000002",
        "step-00000004",
        "step-00000006",
    ]
    assert all((p / ".metadata").exists() for p in (tmp_path / "ck").iterdir())


# Kernel switches on one process: the same math gives the same losses (1e-4, float reordering);
# bf16 autocast a stated tolerance (5% of the loss: bf16 keeps 8 bits of mantissa in the matmuls).
KERNELS = {
    "eager-attention": (["kernels.attention=eager"], 1e-4),
    "unfused-adamw": (["kernels.optimizer_impl=unfused"], 1e-4),
    "fused-adamw": (["kernels.optimizer_impl=fused"], 1e-4),
    "activation-checkpointing": (["kernels.activation_checkpointing=true"], 1e-4),
    "bf16": (["kernels.precision=bf16"], 5e-2),
}


@pytest.mark.parametrize("name", list(KERNELS))
def test_kernel_switch_keeps_the_losses(tmp_path: Path, baseline: list[float], name: str) -> None:
    sets, tolerance = KERNELS[name]
    rc, records, out = train(tmp_path, 1, *sets)
    assert rc == 0, out
    got = [r["loss"] for r in records]
    assert len(got) == STEPS
    for g, w in zip(got, baseline):
        assert abs(g - w) <= tolerance * abs(w), (name, got, baseline)
    if name == "bf16":  # not the fp32 run by another name
        assert got != baseline
