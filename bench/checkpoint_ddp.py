"""What activation checkpointing costs a DDP model beyond the same model without DDP, by depth.

    torchrun --standalone --nproc_per_node 2 bench/checkpoint_ddp.py

The layout model charges checkpointing by a one-block copy without DDP (``costs.layout_costs``:
``checkpoint_block_s``) times the blocks. An exploratory sweep at 8 blocks, d_model 64 and 128
tokens (``bench/results/sweep-explore-2026-12-06i-cpu.json``, ``...-06j``) measured checkpointing
42 ms over DDP where 30 were predicted. Here, on every rank, copies of 1, 4 and 8 blocks, with and
without DDP, plain and checkpointed, interleaved round by round (after a barrier), 20 rounds;
rank 0 prints each median and what checkpointing adds, a block, and, for 8 blocks, what one block
times 8 says against the line through 1 and 4 blocks (as the tensor-parallel copies are read).
"""

import dataclasses
import statistics as st
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from perfkit.trainer.config import load_config
from perfkit.trainer.model import GPT, cross_entropy

dist.init_process_group("gloo")
torch.manual_seed(dist.get_rank())
cfg = load_config("tiny-cpu", ["model.n_layers=8", "model.d_model=64", "model.seq_len=128"])
m = cfg.model
batch = torch.randint(0, m.vocab_size, (8, m.seq_len + 1))


def mk(layers, ddp):
    model = GPT(dataclasses.replace(m, n_layers=layers), cfg.kernels.attention)
    return (DDP(model) if ddp else model), model


def fn(layers, ddp, ck):
    wrapped, model = mk(layers, ddp)

    def run():
        model.activation_checkpointing = ck
        cross_entropy(wrapped(batch[:, :-1]), batch[:, 1:]).backward()

    return run


cases = {(n, d, c): fn(n, d, c) for n in (1, 4, 8) for d in (False, True) for c in (False, True)}
for f in cases.values():
    f()
    f()
times = {k: [] for k in cases}
for _ in range(20):
    for k, f in cases.items():
        dist.barrier()
        t0 = time.perf_counter()
        f()
        times[k].append(time.perf_counter() - t0)
if dist.get_rank() == 0:
    med = {k: st.median(v) * 1e3 for k, v in times.items()}
    for n in (1, 4, 8):
        for d in (False, True):
            a, b = med[(n, d, False)], med[(n, d, True)]
            print(
                f"layers {n} ddp {d}: plain {a:.1f} ckpt {b:.1f} extra {b - a:.1f} per block {(b - a) / n:.2f}"
            )
    for d in (False, True):  # what 8 blocks cost: one block times 8, and the line through 1 and 4
        one, four, eight = (med[(n, d, True)] - med[(n, d, False)] for n in (1, 4, 8))
        line = one + (four - one) / 3 * 7
        print(
            f"ddp {d}: 8 blocks took {eight:.1f}; one block x 8 says {8 * one:.1f}, the line through 1 and 4 {line:.1f}"
        )
dist.destroy_process_group()
