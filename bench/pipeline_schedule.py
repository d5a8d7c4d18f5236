"""Does the layout model's pipeline simulation (perfkit/optimizer/pipesim.py) give a pipeline's
step as torch runs it, where the closed form (the busiest stage's microbatches and one of each
other stage) does not? And what do the model's ends and DDP cost against a plain block?

    python bench/pipeline_schedule.py            # ~15 seconds on 2 CPU cores (2 gloo ranks)

On 2 ranks at tiny-cpu, interleaved round by round (``perfkit.trainer.costs._interleaved``): a
pipeline of 2 blocks a stage (tiny-cpu's pp2) over 16 sequences under 1F1B with 2, 4 and 8
microbatches and GPipe with 4 and 8, each stage run plainly at each microbatch's rows, a block
alone, the whole model plainly and under DDP at 8 rows (a DDP rank's microbatch), and a 16
KiB-to-96 KiB send/recv ping-pong (the link's latency). Printed: each pipeline measured beside the
simulation (its stages' measured work, the measured latency, the cost of a receive posted late
fitted as the model fits it, here to GPipe's step over 1F1B's at 4 microbatches, so GPipe with 8
is held out, and the machinery a microbatch fitted as the model fits it: 1F1B's growth from 4 to 8
microbatches less the simulation's), beside the simulation without the late receives, and beside
the closed form; the ends in blocks' work against their FLOPs; DDP's forward and backward beyond
the plain model's.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time


def main() -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe
    from torch.nn.parallel import DistributedDataParallel as DDP

    from perfkit.optimizer.pipesim import fit_late_receive, step_seconds
    from perfkit.trainer.config import load_config
    from perfkit.trainer.costs import _interleaved
    from perfkit.trainer.model import GPT, cross_entropy
    from perfkit.trainer.parallelize import stage_ends

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world, dev = dist.get_rank(), 2, torch.device("cpu")
    cfg = load_config("tiny-cpu")
    m = cfg.model

    def gpt(layers: int) -> torch.nn.Module:
        return GPT(dataclasses.replace(m, n_layers=layers), cfg.kernels.attention)

    part = stage_ends(gpt(2), first=rank == 0, last=rank == 1)
    batch = torch.randint(0, m.vocab_size, (16, m.seq_len + 1))
    names, runs = [], []
    pipes = (("1f1b", 2), ("1f1b", 4), ("1f1b", 8), ("gpipe", 4), ("gpipe", 8))
    for schedule, n in pipes:
        stage = PipelineStage(part, rank, world, dev, group=dist.group.WORLD)
        kind = Schedule1F1B if schedule == "1f1b" else ScheduleGPipe
        s = kind(stage, n_microbatches=n, loss_fn=cross_entropy)

        def step(s=s) -> None:  # type: ignore[no-untyped-def]
            if rank == 0:
                s.step(batch[:, :-1])
            else:
                s.step(target=batch[:, 1:], losses=[])

        names.append(f"{schedule} mb{n}")
        runs.append(step)
    block = stage_ends(gpt(1), False, False)
    for rows in (8, 4, 2):
        tok, hid = batch[:rows], torch.randn(rows, m.seq_len, m.d_model)

        def plain(tok=tok, hid=hid) -> None:  # type: ignore[no-untyped-def]
            out = part(tok[:, :-1] if rank == 0 else hid.clone().requires_grad_(True))
            (cross_entropy(out, tok[:, 1:]) if rank == 1 else (out * 1).sum()).backward()

        names.append(f"stage {rows} rows")
        runs.append(plain)
    hid = torch.randn(8, m.seq_len, m.d_model)

    def alone() -> None:
        block(hid.clone().requires_grad_(True)).sum().backward()

    names.append("block 8 rows")
    runs.append(alone)
    whole, ddp = GPT(m, cfg.kernels.attention), DDP(GPT(m, cfg.kernels.attention))
    for name, model in (("model 8 rows", whole), ("DDP 8 rows", ddp)):

        def fb(model=model) -> None:  # type: ignore[no-untyped-def]
            cross_entropy(model(batch[:8, :-1]), batch[:8, 1:]).backward()

        names.append(name)
        runs.append(fb)
    times = torch.tensor(_interleaved(runs, dev, 40, lambda *t: t), dtype=torch.float64)
    ranks = [torch.zeros_like(times) for _ in range(world)]
    dist.all_gather(ranks, times)
    # the link's latency: a ping-pong of one microbatch's activations at 2 rows, 5 rounds each way
    latency = []
    for rows in (2, 8):
        buf = torch.zeros(rows, m.seq_len, m.d_model)
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(20):
            if rank == 0:
                dist.send(buf, 1)
                dist.recv(buf, 1)
            else:
                dist.recv(buf, 0)
                dist.send(buf, 0)
        latency.append((time.perf_counter() - t0) / 40)
    if rank != 0:
        return
    at = {n: (float(ranks[0][i]), float(ranks[1][i])) for i, n in enumerate(names)}
    stage = {rows: at[f"stage {rows} rows"] for rows in (8, 4, 2)}
    c = sum(latency) / len(latency)

    def sim(schedule: str, n: int, o: float, late: float) -> float:
        s0, s1 = stage[16 // n]
        work = [s0 + o, s1 + o]
        return step_seconds(schedule, [w / 3 for w in work], [2 * w / 3 for w in work], n, c, late)

    # a late receive's cost as the layout model fits it (GPipe's step over 1F1B's, at 4
    # microbatches here: 8 is held out), then the machinery as it fits it (1F1B from 4 to 8)
    s0, s1 = stage[4]
    fwd, bwd = (s0 / 3, s1 / 3), (2 * s0 / 3, 2 * s1 / 3)
    late = fit_late_receive(fwd, bwd, 4, c, max(0.0, max(at["gpipe mb4"]) - max(at["1f1b mb4"])))
    grown = max(at["1f1b mb8"]) - max(at["1f1b mb4"])
    machinery = max(0.0, (grown - (sim("1f1b", 8, 0, late) - sim("1f1b", 4, 0, late))) / 4)
    print(f"tiny-cpu pp2 on 2 CPU ranks; link latency {c * 1e3:.2f} ms (ping-pong), a receive posted "
          f"late {late * 1e3:.2f} ms (fitted to GPipe's step over 1F1B's at 4 microbatches), machinery "
          f"{machinery * 1e3:.2f} ms a microbatch (1F1B's growth 4 to 8 less the simulation's)")  # fmt: skip
    print(f"{'schedule':<12}{'measured':>10}{'simulated':>11}{'error':>8}{'no late cost':>14}{'error':>8}"
          f"{'closed form':>13}{'error':>8}")  # fmt: skip
    for schedule, n in pipes:
        meas = max(at[f"{schedule} mb{n}"])
        simulated, early = sim(schedule, n, machinery, late), sim(schedule, n, machinery, 0.0)
        s0, s1 = (x + machinery for x in stage[16 // n])
        closed = n * max(s0, s1) + min(s0, s1)
        print(f"{schedule + f' mb{n}':<12}{meas * 1e3:>10.1f}{simulated * 1e3:>11.1f}{simulated / meas - 1:>+8.1%}"
              f"{early * 1e3:>14.1f}{early / meas - 1:>+8.1%}{closed * 1e3:>13.1f}{closed / meas - 1:>+8.1%}")  # fmt: skip
    b = sum(at["block 8 rows"]) / 2
    first, last = stage[8][0] - 2 * b, stage[8][1] - 2 * b
    block_flops = 6 * (12 * m.d_model**2 + 13 * m.d_model) + 12 * m.d_model * m.seq_len
    print(
        f"ends in blocks' work: the embeddings {first / b:.2f}, the head and loss {last / b:.2f} "
        f"(FLOPs: 0 and {6 * m.vocab_size * m.d_model / block_flops:.2f})"
    )
    plain, with_ddp = (max(at[k]) for k in ("model 8 rows", "DDP 8 rows"))
    print(
        f"the last stage of 2 blocks at twice the rows over the whole model: {2 * stage[8][1] / plain:.2f}x"
    )
    print(f"the whole model at 8 rows: {plain * 1e3:.1f} ms plainly, {with_ddp * 1e3:.1f} ms under DDP "
          f"(DDP {(with_ddp - plain) * 1e3:.1f} ms)")  # fmt: skip


if __name__ == "__main__":
    if "RANK" in os.environ:
        main()
    else:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", __file__]
        sys.exit(subprocess.run(cmd, env=env).returncode)
