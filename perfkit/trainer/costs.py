"""What a layout costs on this hardware that its FLOPs do not say, measured after the steps for the
layout model (``perfkit.optimizer.layoutmodel``) on a one-block copy of the model: what splitting a
batch into more microbatches costs (each op's dispatch does not shrink with its data), what
activation checkpointing adds to a block (its forward again, and the machinery), what DTensor
adds to each module of the tensor-parallel plan, and what FSDP2 adds to each unit it shards (on CPU
its gloo reduce-scatters and copies cost 3x what their bytes say). Tiny-cpu on 2 CPU ranks: 0.9 ms a microbatch of the
whole model, checkpointing more than its FLOPs say, 0.27 ms a tensor-parallel linear against its
0.09 ms of work.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

from perfkit.trainer.config import TrainConfig
from perfkit.trainer.model import GPT, cross_entropy

REPEATS = 9
CHUNKS = 4


def _median_s(fn: Callable[[], None], device: torch.device, repeats: int = REPEATS) -> float:
    times = []
    for i in range(repeats + 2):
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= 2:  # the first two: allocation, caches
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def layout_costs(cfg: TrainConfig, micro_batch: int, device: torch.device) -> dict[str, float]:
    """``chunk_overhead_s``: a microbatch more of one block and the model's ends, forward and
    backward, at the same tokens; ``checkpoint_block_s``: what checkpointing adds to one block a
    microbatch; in a job of 2 ranks or more (every rank must call this): ``tp_module_overhead_s``,
    DTensor's cost per module of the tensor-parallel plan, and ``fsdp_unit_s``, what FSDP2 (ZeRO-3)
    over every rank costs a unit (a block) a microbatch: its gathers, scatters and copies."""
    out: dict[str, float] = {}
    m = cfg.model
    model = GPT(dataclasses.replace(m, n_layers=1), cfg.kernels.attention).to(device)
    batch = torch.randint(0, m.vocab_size, (micro_batch, m.seq_len + 1), device=device)
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16)
        if cfg.kernels.precision == "bf16"
        else contextlib.nullcontext()
    )

    def run(chunks: int) -> None:
        for part in batch.chunk(chunks):
            with autocast:
                loss = cross_entropy(model(part[:, :-1]), part[:, 1:])
            loss.backward()

    whole = _median_s(lambda: run(1), device)
    chunks = min(CHUNKS, micro_batch)
    if chunks > 1:
        out["chunk_overhead_s"] = max(0.0, (_median_s(lambda: run(chunks), device) - whole) / (chunks - 1))
    model.activation_checkpointing = True
    out["checkpoint_block_s"] = max(0.0, _median_s(lambda: run(1), device) - whole)
    if dist.is_initialized() and dist.get_world_size() > 1:
        out["tp_module_overhead_s"] = tensor_parallel_overhead_s(m.d_model, micro_batch * m.seq_len, device)
        model.activation_checkpointing = False
        mesh = DeviceMesh.from_group(dist.group.WORLD, device.type)
        for block in model.layers.values():
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        # two units (the block, the root): their gathers and scatters over every rank, and copies
        out["fsdp_unit_s"] = max(0.0, (_median_s(lambda: run(1), device) - whole) / 2)
    return out


def tensor_parallel_overhead_s(d_model: int, tokens: int, device: torch.device) -> float:
    """What DTensor costs one module of the tensor-parallel plan, forward and backward, beyond the
    same local matmul done plainly: a column-parallel linear over every rank of the job (its input
    needs no gradient, so no collective runs) timed against a plain linear of its local shape.
    Every rank must call it: placing the weight scatters it."""
    world = dist.get_world_size()
    mesh = DeviceMesh.from_group(dist.group.WORLD, device.type)
    width = max(world, d_model - d_model % world)
    parallel = parallelize_module(nn.Linear(d_model, width, device=device), mesh, ColwiseParallel())
    plain = nn.Linear(d_model, width // world, device=device)
    x = torch.randn(1, max(1, min(tokens, 4096)), d_model, device=device)
    return max(
        0.0,
        _median_s(lambda: parallel(x).sum().backward(), device)
        - _median_s(lambda: plain(x).sum().backward(), device),
    )
