"""A long, fast DDP job for bench/watch.py: an MLP on synthetic batches, a few ms a step on CPU, with
events planted at chosen steps through the environment (nothing here knows of perfkit):

- ``PLANT_SLOW=RANK:STEP:MS``: from STEP on, RANK computes MS more a step (extra matrix products);
- ``PLANT_LEAK=RANK:STEP:KB``: from STEP on, RANK keeps KB more memory each step;
- ``PLANT_DATA=RANK:STEP:MS``: from STEP on, RANK's batches take MS longer to load (a slow shard).

Run under torchrun: ``torchrun --nproc_per_node 2 bench/watch_workload.py --steps 20000``. With
``BENCH_STEP_TIMES=FILE`` rank 0 writes its own per-step times there (JSON list, seconds), so a run
with perfkit and one without are timed by the same clock.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset


def planted(name: str) -> tuple[int, int, float] | None:
    text = os.environ.get(name)
    if not text:
        return None
    rank, step, amount = text.split(":")
    return int(rank), int(step), float(amount)


class Batches(Dataset):
    """Synthetic batches; from a step on, one rank's take longer to load (a slow shard)."""

    def __init__(self, n: int, width: int, batch: int, rank: int) -> None:
        self.n, self.width, self.batch, self.rank = n, width, batch, rank
        self.slow = planted("PLANT_DATA")
        g = torch.Generator().manual_seed(rank)
        self.x = torch.randn(64, batch, width, generator=g)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        if self.slow and self.slow[0] == self.rank and i + 1 >= self.slow[1]:
            time.sleep(self.slow[2] / 1e3)
        return self.x[i % 64]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=20000)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    args = p.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = DDP(
        torch.nn.Sequential(
            torch.nn.Linear(args.width, args.width), torch.nn.ReLU(), torch.nn.Linear(args.width, args.width)
        )
    )
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    loader = DataLoader(Batches(args.steps, args.width, args.batch, rank), batch_size=None, shuffle=False)
    slow, leak = planted("PLANT_SLOW"), planted("PLANT_LEAK")
    a = torch.randn(64, 64)
    kept: list[torch.Tensor] = []
    times: list[float] = []
    last = time.perf_counter()
    for step, x in enumerate(loader, start=1):
        if slow and slow[0] == rank and step >= slow[1]:
            until = time.perf_counter() + slow[2] / 1e3
            while time.perf_counter() < until:  # matrix products for that long
                a @ a
        if leak and leak[0] == rank and step >= leak[1]:
            kept.append(torch.ones(int(leak[2] * 256)))  # KB of float32, touched
        loss = model(x).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        now = time.perf_counter()
        times.append(now - last)
        last = now
    out = os.environ.get("BENCH_STEP_TIMES")
    if out and rank == 0:
        with open(out, "w") as f:
            json.dump(times, f)
    dist.barrier()  # no rank tears gloo down while the other is still in its last all-reduce
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
