"""`perfkit profile` on real 2-rank CPU runs (gloo): the bundled trainer under DP, FSDP, TP and PP,
an unmodified DDP script, a rank killed with SIGKILL, and an interrupted run."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from helpers import run_perfkit, user_env
from perfkit.analyzers.runtables import load_tables, straggler_metrics

from perfkit.run import Run, RunLayout
from perfkit.tables import COMMS, CPU, IO, MEMORY, STEPS, Table, read_table
from perfkit.trainer.config import load_config
from perfkit.trainer.model import GPT, num_params

pytestmark = pytest.mark.slow
STEPS_N = 6


def profile(
    out: Path, *args: str, env: dict[str, str] | None = None, probe: bool = False
) -> subprocess.CompletedProcess[str]:
    return run_perfkit("profile", "--out", str(out), *args, env=env, probe=probe)


def reference(
    out: Path, *sets: str, profile_steps: str = "none", flags: tuple[str, ...] = (), **kw
) -> subprocess.CompletedProcess[str]:
    args = [
        *flags,
        "--profile-steps",
        profile_steps,
        "--",
        "reference",
        "--config",
        "tiny-cpu",
        "--set",
        f"steps={STEPS_N}",
    ]
    for s in sets:
        args += ["--set", s]
    return profile(out, *args, **kw)


def table(run: Path, rank: int, t: Table) -> pd.DataFrame:
    frames = [read_table(f, t)[0] for f in RunLayout(run).table_files(rank, t)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


PARAM_BYTES = num_params(GPT(load_config("tiny-cpu").model)) * 4


def per_step(comms: pd.DataFrame, op: str, source: str | None = None) -> pd.Series:
    rows = comms[(comms["op"] == op) & ((comms["source"] == source) if source else True)]
    return rows.groupby("step").size().reindex(range(1, STEPS_N + 1), fill_value=0)


def test_dp_run_has_every_table_and_the_ddp_collectives(tmp_path: Path) -> None:
    out = tmp_path / "dp"
    proc = reference(out, profile_steps="2-3", probe=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run = Run.open(out)
    assert run.manifest.status == "complete" and run.manifest.world_size == 2
    assert run.manifest.collectors["nvml"].status == "disabled"
    assert {k for k, v in run.manifest.collectors.items() if v.status == "ok"} == {
        "steps",
        "comms",
        "memory",
        "io",
        "kernels",
        "cpu",
        "hang",
        "gc",
    }
    assert run.manifest.env["torch"].startswith("2.")
    # the trace is written after the window's last step, outside perfkit's step times: said so
    # (the trainer's own clock counts it: 141 against 843 ms in one run, with no word why)
    assert re.match(
        r"trace written after step 3 in \d+ ms, left out of", run.manifest.collectors["kernels"].reason
    )
    assert "collector kernels: trace written after step 3" in proc.stdout
    for rank in (0, 1):
        steps = table(out, rank, STEPS)
        assert list(steps["step"]) == list(range(1, STEPS_N + 1))
        assert (steps[["data_wait_s", "forward_s", "backward_s", "optimizer_s"]] >= 0).all().all()
        phases = steps[["data_wait_s", "forward_s", "backward_s", "optimizer_s"]].sum(axis=1)
        assert (phases <= steps["step_time_s"] * 1.01).all()
        assert (steps["tokens"] == 8 * 64).all() and steps["loss"].notna().all()
        comms = table(out, rank, COMMS)
        # One gradient bucket per step holding every gradient, and the trainer's loss all-reduce.
        assert (per_step(comms, "all_reduce", "ddp") == 1).all()
        ddp = comms[comms["source"] == "ddp"]
        assert (ddp["bytes"] == PARAM_BYTES).all() and (ddp["group_size"] == 2).all()
        assert (per_step(comms, "all_reduce", "python") == 1).all()
        # the trainer is a user of perfkit: its own line made the call (it had been "click/core.py")
        python = comms[comms["source"] == "python"]
        assert python["caller"].str.startswith("perfkit/trainer/train.py:").all(), python["caller"].unique()
        job = comms[~comms["source"].str.startswith("probe-costs")]  # DTensor's async calls: no end
        assert (job["end_ns"] >= job["start_ns"]).all()
        # After the last step, the link probe: 4 sizes, a warm-up and 8 timed all-reduces each,
        # outside every step; then 48 all-reduces each after a burst of compute (what a blocking
        # call waits); the analysis keeps them out of the job's collectives.
        probe = comms[comms["source"].isin(["probe", "probe-step"])]
        assert (probe["step"] == STEPS_N + 1).all()
        sizes = (
            probe[(probe["op"] == "all_reduce") & (probe["bytes"] > 8)].groupby(["source", "bytes"]).size()
        )
        assert sizes.to_dict() == {
            **{("probe", n): 9 for n in (4 << 10, 256 << 10, 4 << 20, 32 << 20)},
            ("probe-step", 192 << 10): 48,
        }
        assert len(table(out, rank, MEMORY)) == STEPS_N and (table(out, rank, MEMORY)["rss"] > 0).all()
        cpu = table(out, rank, CPU)
        assert list(cpu["step"]) == list(range(1, STEPS_N + 1)) and (cpu["cpu_s"] > 0).all()
        reads = table(out, rank, IO)
        assert sorted(reads[reads["kind"] == "read"]["step"]) == list(range(1, STEPS_N + 1))
        assert (reads["bytes"] == 8 * 65 * 2).all()
        assert (out / f"rank{rank}" / "trace.json.gz").stat().st_size > 10_000
    tables = load_tables(run)
    # the trainer's own probe after those (perfkit.probing(): the costs below) is kept out the same way
    probes = tables.link_probe["source"].value_counts()
    assert (probes["probe"], probes["probe-step"]) == (2 * 70, 2 * 48) and probes["probe-costs"] > 0
    assert not tables.comms["source"].str.startswith("probe").any() and len(tables.link_probe) == probes.sum()
    assert re.search(
        rf"rank1/  steps \d+, comms \d+ \(\+{probes.sum() // 2} from probes after the steps\)",
        proc.stdout + proc.stderr,
    )
    # and what other layouts would cost here beyond their FLOPs (perfkit.trainer.costs), for the
    # layout model: DTensor's 0.27 ms a module against its 0.09 of work, checkpointing's forward again
    costs = run.manifest.model["layout_costs"]
    assert set(costs) == {"chunk_overhead_s", "checkpoint_block_s", "tp_module_overhead_s", "fsdp_block_s", "fsdp_ends_s", "fsdp_keep_block_s", "fsdp_keep_ends_s",
                          "dtensor_param_s", "zero1_block_s", "zero1_ends_s", "tp_block_s", "tp_ends_s", "sp_block_s", "sp_ends_s", "pipeline_microbatch_s",
                          "pipeline_first_s", "pipeline_last_s", "pipeline_middle_s", "pipeline_block_s", "model_plain_s",
                          "pipeline_gpipe_extra_s", "pipeline_gpipe_microbatches", "pipeline_looped_extra_s"}  # fmt: skip
    assert costs["tp_module_overhead_s"] > 0 and costs["checkpoint_block_s"] > 0 and costs["fsdp_block_s"] > 0
    assert costs["fsdp_keep_block_s"] > 0  # ZeRO-2's block: its gathers once, its copies and scatters
    assert costs["zero1_block_s"] > 0  # a block's 12 broadcasts
    assert (
        costs["sp_block_s"] > 0 and costs["tp_block_s"] > costs["tp_module_overhead_s"]
    )  # its collectives too
    assert costs["chunk_overhead_s"] >= 0 and costs["pipeline_microbatch_s"] > 0  # its schedule, a microbatch
    # each stage's own work (2 ranks: no middle), and a block alone less than either
    assert costs["pipeline_middle_s"] == 0 and 0 < costs["pipeline_block_s"] < costs["pipeline_last_s"]
    assert costs["model_plain_s"] > 4 * costs["pipeline_block_s"] / 2  # the whole model, twice the rows
    assert costs["pipeline_gpipe_extra_s"] >= 0  # GPipe's step over 1F1B's: 0 where it measured none
    assert costs["pipeline_gpipe_microbatches"] == 12  # 6 a stage, 2 stages
    # a second block a rank as a looped stage: its work at least, over the one-block copy's step
    assert costs["pipeline_looped_extra_s"] > 12 * costs["pipeline_block_s"] / 2


@pytest.mark.parametrize(
    ("name", "sets"),
    [
        ("fsdp", ["parallel.zero=3"]),
        ("tp", ["parallel.tp=2"]),
        ("tp-sp", ["parallel.tp=2", "parallel.sequence_parallel=true"]),
        ("pp", ["parallel.pp=2", "parallel.microbatches=2"]),
    ],
)
def test_layout_collective_counts(tmp_path: Path, name: str, sets: list[str]) -> None:
    out = tmp_path / name
    proc = reference(out, *sets, "checkpoint.every=3", f"checkpoint.dir={tmp_path / 'ck'}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # profiled with --no-probe (the suite's default): nothing measured after the steps
    assert "layout_costs" not in Run.open(out).manifest.model
    counts = {}
    for rank in (0, 1):
        comms = table(out, rank, COMMS)
        assert not comms["source"].str.startswith("probe").any()
        steady = comms[comms["step"].between(2, STEPS_N)]
        counts[rank] = steady.groupby(["step", "op"]).size().unstack(fill_value=0)
        # The same collectives every step (checkpoint steps aside), on both ranks.
        plain = counts[rank].drop(index=[3, 6], errors="ignore")
        assert (plain.nunique() == 1).all(), plain
        saves = table(out, rank, IO)
        assert sorted(saves[saves["kind"] == "checkpoint_save"]["step"]) == [3, 6]
    assert counts[0].drop(index=[3, 6]).equals(counts[1].drop(index=[3, 6]))
    c, comms0 = counts[0].loc[2], table(out, 0, COMMS)
    if name == "fsdp":
        # 5 FSDP units (4 blocks + root): one reduce-scatter each, of all the gradients.
        assert c["reduce_scatter"] == 5
        rs = comms0[(comms0["op"] == "reduce_scatter") & (comms0["step"] == 2)]
        assert rs["bytes"].sum() >= PARAM_BYTES
        assert c["all_gather"] >= 5
    elif name == "tp":
        # Row-wise o and fc2 all-reduce in forward: 2 per block, 4 blocks, at least.
        funcol = comms0[(comms0["source"] == "funcol") & (comms0["step"] == 2)]
        assert len(funcol) >= 8
    elif name == "tp-sp":
        # Sequence parallel: o and fc2 reduce-scatter (forward) and the gathers before attention
        # and MLP turn into reduce-scatters in backward: 4 per block; all-gathers likewise.
        assert c["reduce_scatter"] >= 16 and c["all_gather"] >= 16
        # The norms' and row-wise biases' pending gradient sums go in one all-reduce, not one per
        # parameter each time the clip and AdamW read them (65 a step before).
        assert c["all_reduce"] <= 4
    else:
        # 1F1B, 2 microbatches: stage 0 sends 2 activations and receives 2 gradients.
        assert c["send"] == 2 and c["recv"] == 2
        assert counts[1].loc[2]["send"] == 2 and counts[1].loc[2]["recv"] == 2
        # its stages read from the sends and receives: each rank alone in its stage, compared with
        # no other (the last stage, with the head and the loss, is busier by design)
        st = straggler_metrics(load_tables(Run.open(out)))
        assert st is not None and st.stages == {0: 0, 1: 1} and not st.slow


UNMODIFIED = """
import os, torch, torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

dist.init_process_group("gloo")
torch.manual_seed(0)
model = DDP(nn.Sequential(nn.Embedding(64, 32), nn.Flatten(), nn.Linear(32 * 8, 64)))
data = TensorDataset(torch.randint(0, 64, (256, 8)), torch.randint(0, 64, (256,)))
loader = DataLoader(data, batch_size=16, sampler=DistributedSampler(data), num_workers=1)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
for x, y in loader:
    loss = nn.functional.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
if dist.get_rank() == 0:
    torch.save(model.state_dict(), os.environ["CKPT"])
print("perfkit" in __import__("sys").modules and "imported" or "not imported")
dist.destroy_process_group()
"""


def test_unmodified_ddp_script(tmp_path: Path) -> None:
    script = tmp_path / "train.py"
    script.write_text(UNMODIFIED)
    out = tmp_path / "run"
    proc = profile(
        out, "--", "torchrun", "--nproc_per_node", "2", str(script), env={"CKPT": str(tmp_path / "ck.pt")}
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run = Run.open(out)
    assert run.manifest.world_size == 2 and run.manifest.status == "complete"
    params = (64 * 32 + 32 * 8 * 64 + 64) * 4
    for rank in (0, 1):
        steps = table(out, rank, STEPS)
        assert list(steps["step"]) == list(range(1, 9))  # 256 samples / 2 ranks / 16
        assert (steps["tokens"] == 16 * 8).all() and steps["loss"].notna().all()
        assert (
            (steps["forward_s"] > 0).all()
            and (steps["backward_s"] > 0).all()
            and (steps["optimizer_s"] > 0).all()
        )
        comms = table(out, rank, COMMS)
        assert list(comms[comms["source"] == "ddp"].groupby("step").size()) == [1] * 8
        assert (comms[comms["source"] == "ddp"]["bytes"] == params).all()
        assert len(table(out, rank, MEMORY)) == 8
    saves = table(out, 0, IO)
    assert list(saves["kind"]) == ["checkpoint_save"] and saves["bytes"].iloc[0] > params


def test_sigkill_leaves_completed_steps_readable(tmp_path: Path) -> None:
    out = tmp_path / "killed"
    proc = reference(out, "steps=8", env={"PERFKIT_TEST_KILL_AT_STEP": "5", "PERFKIT_TEST_KILL_RANK": "1"})
    assert proc.returncode != 0
    run = Run.open(out)
    assert run.manifest.status == "failed" and run.manifest.exit_code == proc.returncode
    killed = table(out, 1, STEPS)
    assert list(killed["step"]) == [1, 2, 3, 4, 5]  # killed at the start of the 6th
    for t in (COMMS, MEMORY, IO):
        assert set(table(out, 1, t)["step"]) >= {1, 2, 3, 4, 5}


def test_sigint_marks_the_run_interrupted(tmp_path: Path) -> None:
    out = tmp_path / "int"
    cmd = [
        sys.executable,
        "-m",
        "perfkit",
        "profile",
        "--out",
        str(out),
        "--profile-steps",
        "none",
        "--",
        "reference",
        "--set",
        "steps=100000",
        "--set",
        "log_every=1000",
    ]
    proc = subprocess.Popen(
        cmd, env=user_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
    )
    steps_file = out / "rank0" / "steps.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not steps_file.exists() or steps_file.read_text().count("\n") < 3):
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C reaches the whole foreground group
    proc.communicate(timeout=120)
    run = Run.open(out)
    assert run.manifest.status == "interrupted"
    for rank in (0, 1):
        assert len(table(out, rank, STEPS)) >= 3


def test_trace_ranks_traces_only_those_ranks(tmp_path: Path) -> None:
    """At hundreds of ranks a few traces tell the story: --trace-ranks 1 traces rank 1 alone, the
    cheap tables stay on both, and the analysis says which ranks have traces."""
    out = tmp_path / "some"
    proc = reference(out, profile_steps="2-3", flags=("--trace-ranks", "1"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not (out / "rank0" / "trace.json.gz").exists() and (out / "rank1" / "trace.json.gz").exists()
    assert len(table(out, 0, STEPS)) == len(table(out, 1, STEPS)) == STEPS_N
    assert Run.open(out).manifest.collectors["kernels"].status == "ok"
    summary = run_perfkit("analyze", str(out))
    assert summary.returncode == 0, summary.stderr
    assert "kernel traces from rank(s) 1 of 2" in summary.stdout


def test_set_right_after_profile_changes_the_bundled_trainer(tmp_path: Path) -> None:
    """perfkit profile --set parallel.tp=2 had failed: "command '--set' not found"."""
    out = tmp_path / "tp"
    proc = profile(
        out, "--profile-steps", "none", "--set", "steps=3", "--set", "parallel.tp=2", "--nproc", "2"
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert Run.open(out).manifest.config["parallel"]["tp"] == 2
    mixed = profile(tmp_path / "mixed", "--set", "steps=3", "--", "python", "train.py")
    assert mixed.returncode == 2 and "pass your own script's options after --" in mixed.stderr
    bad = profile(tmp_path / "bad", "--bogus")
    assert bad.returncode == 2 and "the command to profile goes after --" in bad.stderr


def test_one_mfu_in_the_trainers_log_and_the_analysis(tmp_path: Path) -> None:
    """The trainer had divided the whole job's FLOPs by one GPU's peak, the analysis by every GPU's:
    on N ranks they differed N-fold. Both per GPU now (a peak given for this CPU run)."""
    import json
    import statistics

    from perfkit.analyzers.analyze import analyze

    out = tmp_path / "mfu"
    proc = profile(
        out, "--profile-steps", "none", "--set", "steps=10", "--set", "peak_tflops=1", "--nproc", "2"
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    logged = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    trainer = statistics.median(r["mfu"] for r in logged[3:])
    a = analyze(out)
    assert a.metrics.throughput is not None and a.metrics.throughput.mfu is not None
    assert a.metrics.throughput.mfu == pytest.approx(trainer, rel=0.25)  # medians of different windows
