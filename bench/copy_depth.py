"""How steady the tensor-parallel copies' figure for a whole model is, measured two ways in the same
rounds (``perfkit.trainer.costs``): through copies of one and two blocks (the line reaching the
model's depth, as the costs were measured before), and through copies of one block and of the
model's depth (as they are now). Prints five measurements of each in one process:

    torchrun --nproc_per_node 2 bench/copy_depth.py [ROUNDS] [--set-style overrides...]

Each figure is the model's tensor-parallel cost beyond its share of the plain copy's work: its
blocks and the rest, a microbatch, in ms."""

from __future__ import annotations

import dataclasses
import sys
import time

import torch
import torch.distributed as dist

from perfkit.trainer import costs
from perfkit.trainer.config import load_config, resolve_layout
from perfkit.trainer.model import GPT, cross_entropy
from perfkit.trainer.parallelize import _tensor_parallel


def main() -> None:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else costs._rounds(costs.REPEATS)
    cfg = load_config("tiny-cpu", sys.argv[2:])
    device = torch.device("cpu")
    world, m = dist.get_world_size(), cfg.model
    n = m.n_layers
    p = dataclasses.replace(cfg.parallel, tp=world, pp=1, dp=0, zero=0, microbatches=0)
    micro = resolve_layout(dataclasses.replace(cfg, parallel=p), world).micro_batch
    batch = torch.randint(0, m.vocab_size, (micro, m.seq_len + 1))
    mesh = costs._world_mesh(device)

    def copy(layers: int, plan: bool):  # type: ignore[no-untyped-def]
        model = GPT(dataclasses.replace(m, n_layers=layers), cfg.kernels.attention)
        if plan:
            _tensor_parallel(model, mesh, False)
        return lambda: cross_entropy(model(batch[:, :-1]), batch[:, 1:]).backward()

    for i in range(5):
        runs = [copy(layers, plan) for plan in (False, True) for layers in (1, 2, n)]

        def estimate(p1: float, p2: float, pn: float, t1: float, t2: float, tn: float) -> tuple[float, float]:
            block = p2 - p1
            one = t1 - (p1 - block + block / world)
            two = t2 - (p1 - block + 2 * block / world)
            through_two = (two - one) * n + (2 * one - two)  # n blocks and the rest, by the line
            block_n = (pn - p1) / (n - 1)
            deep = tn - (p1 - block_n + n * block_n / world)
            return through_two + 1, deep + 1  # +1 s: the estimator keeps figures above 0

        t0 = time.time()
        two, deep = costs._interleaved(runs, device, rounds, estimate)
        if dist.get_rank() == 0:
            print(
                f"{i}: through 1 and 2 blocks {(two - 1) * 1e3:.1f} ms, "
                f"1 and {n} blocks {(deep - 1) * 1e3:.1f} ms ({time.time() - t0:.1f} s)",
                flush=True,
            )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
