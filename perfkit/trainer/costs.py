"""What a layout costs on this hardware that its FLOPs do not say, measured after the steps for the
layout model (``perfkit.optimizer.layoutmodel``) on a one-block copy of the model: what splitting a
batch into more microbatches costs (each op's dispatch does not shrink with its data), what
activation checkpointing adds to a block (its forward again, and the machinery), what DTensor adds
to each module of the tensor-parallel plan, what FSDP2 adds to each unit it shards (on CPU its
gloo reduce-scatters and copies cost 3x what their bytes say), and what a pipeline's schedule adds
to each stage's microbatch. Tiny-cpu on 2 CPU ranks: 0.36 ms a microbatch of a block and the ends,
1.1 ms a checkpointed block where its FLOPs say 0.6, 0.32 ms a tensor-parallel module against its
0.09 ms of work, 2.5-4.4 ms an FSDP2 block, 1.1-1.7 ms a pipeline stage's microbatch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

from perfkit.trainer.config import TrainConfig
from perfkit.trainer.model import GPT, cross_entropy
from perfkit.trainer.parallelize import build_optimizer, clip_grad_norm_

REPEATS = 15
CHUNKS = 4
TP_PAIRS = 60
FP32 = 4


def _seconds(fn: Callable[[], None], device: torch.device, repeats: int = REPEATS, warm: int = 2) -> float:
    """``fn``'s time: the mean of ``repeats`` calls after ``warm`` (allocation, caches), the slowest
    tenth left out. The mean, not the median: a step pays every call's wait for the other ranks,
    and on a shared host one call in four of them waits 3-4 ms while the rest wait none."""
    times = []
    for i in range(repeats + warm):
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warm:
            times.append(time.perf_counter() - t0)
    return _trimmed_mean(times)


def _interleaved(
    fns: list[Callable[[], None]],
    device: torch.device,
    rounds: int,
    estimate: Callable[..., tuple[float, ...]],
) -> tuple[float, ...]:
    """``estimate`` of ``fns``'s times (differences of them: costs), taken round by round: ``rounds``
    rounds of one call of each in turn, after one warm call each; each figure averaged over the
    rounds, the fifth largest and the fifth smallest left out, and under 0 (noise) taken as 0. A round's calls run close together,
    so the host's drift cancels in its differences: at 12.8M parameters, differences of each copy's
    mean over the rounds put a tensor-parallel block at 0 to 39 ms from run to run. In a job of
    several ranks each call starts with the ranks together (a barrier, untimed), as a step's
    collectives keep them; else a call's first collective waits out how far the ranks drifted
    apart in the call before."""
    together = dist.is_initialized() and dist.get_world_size() > 1

    def timed(fn: Callable[[], None], warm: int) -> float:
        if together:
            dist.barrier()
        return _seconds(fn, device, repeats=1, warm=warm)

    for fn in fns:
        timed(fn, 1)
    rows = [estimate(*[timed(fn, 0) for fn in fns]) for _ in range(rounds)]
    out = []
    for column in zip(*rows, strict=True):
        ordered = sorted(column)
        cut = len(ordered) // 5
        kept = ordered[cut : len(ordered) - cut]
        out.append(max(0.0, sum(kept) / len(kept)))
    return tuple(out)


def _trimmed_mean(times: list[float]) -> float:
    kept = sorted(times)[: max(1, len(times) - len(times) // 10)]
    return sum(kept) / len(kept)


DEEP = 4
"""Blocks of the deeper copy at most (``depth``): a copy of one block and one of the model's depth
(up to this) put a model's cost on its own depth, where the line through one and two blocks
reaches 4 blocks by stretching their difference threefold. Side by side (``bench/copy_depth.py``:
tiny-cpu's tensor-parallel cost of its 4 blocks, 5 measurements a run) the 4-block copy was the
steadier in one run of four (63.2-66.7 ms against 55.4-65.1) and not in the others (70.5-93.4
against 80.5-94.1 in one): the host's drift outweighs the stretch."""


def depth(cfg: TrainConfig) -> int:
    """The deeper copy's blocks: the model's, from 2 to ``DEEP``."""
    return max(2, min(cfg.model.n_layers, DEEP))


def _deep_rounds(rounds: int, blocks: int) -> int:
    """Rounds for copies of one block and of ``blocks``: as many blocks' calls as the copies of one
    and two took in ``rounds`` (a deeper copy's calls are longer, and its line steadier)."""
    return max(REPEATS // 3, rounds * 3 // (1 + blocks))


def _block_and_ends(one: float, deep: float, blocks: int, model_blocks: int) -> tuple[float, float]:
    """A block's cost and the rest's from what copies of one block and of ``blocks`` cost beyond
    plain (each averaged over the rounds): the line through them, ``(deep - one) / (blocks - 1)`` a
    block and ``one`` less that the rest. Where noise puts the rest under 0, the line is kept where
    the model is (its ``model_blocks``), as a block's share of it with no rest: clamping the rest at
    0 alone had charged every block the line's slope (at 12.8M parameters FSDP2's block came out 38,
    73 and 83 ms in three runs, its root 2.5, 0 and 0, and FSDP2 was predicted +17%)."""
    block = (deep - one) / (blocks - 1)
    ends = one - block
    if ends < 0:
        return max(0.0, (model_blocks * block + ends) / model_blocks), 0.0
    if block < 0:
        return 0.0, (one + deep) / 2
    return block, ends


def layout_costs(cfg: TrainConfig, micro_batch: int, device: torch.device) -> dict[str, float]:
    """``chunk_overhead_s``: a microbatch more of one block and the model's ends, forward and
    backward, at the same tokens; ``checkpoint_block_s``: what checkpointing adds to one block a
    microbatch; in a job of 2 ranks or more (every rank must call this): ``tp_module_overhead_s``,
    DTensor's cost per module of the tensor-parallel plan, ``fsdp_block_s`` and ``fsdp_ends_s``, what
    FSDP2 (ZeRO-3) over every rank costs a block and the root a microbatch: their gathers, scatters
    and copies (``fsdp_costs``; ``fsdp_keep_`` the same for ZeRO-2), and
    ``dtensor_param_s``, what the optimizer phase (gradient norm, AdamW) pays a parameter tensor
    that is a DTensor (FSDP2, tensor parallel) beyond a plain one, and ``zero1_block_s`` and
    ``zero1_ends_s``, what ZeRO-1's optimizer step over every rank costs beyond AdamW on a rank's
    share: a block's parameters, and the model's ends' (their broadcasts, one a tensor), and
    ``tp_block_s``, ``tp_ends_s`` (and ``sp_``, with sequence parallelism): what the tensor-parallel
    plan over every rank costs beyond its share of the FLOPs, a block and the rest a microbatch, and
    ``pipeline_microbatch_s``, what a pipeline stage over every rank pays a microbatch beyond its
    compute (``pipeline_costs``)."""
    out: dict[str, float] = {}
    m = cfg.model
    one = dataclasses.replace(m, n_layers=1)
    if device.type == "cuda":
        # the copy, its gradients, AdamW's two states and its activations beside the job's own
        free, _ = torch.cuda.mem_get_info(device)
        need = (
            6 * FP32 * (12 * m.d_model**2 + 2 * m.vocab_size * m.d_model)
            + 64 * micro_batch * m.seq_len * m.d_model
        )
        if free < (1 + depth(cfg)) * need:  # and a copy of the deeper one's blocks beside it
            return {}
    model = GPT(one, cfg.kernels.attention).to(device)
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

    whole = _seconds(lambda: run(1), device)
    repeats = REPEATS if whole < 0.05 else 5  # a large model's step: a few are enough
    if dist.is_initialized() and dist.get_world_size() > 1:  # every rank the same count of collectives
        agreed = torch.tensor([repeats], device=device)
        dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
        repeats = int(agreed.item())
    chunks = min(CHUNKS, micro_batch)

    def checkpointed() -> None:
        model.activation_checkpointing = True
        try:
            run(1)
        finally:
            model.activation_checkpointing = False

    # round by round against the plain copy, as the other copies: timed apart, minutes later, the
    # checkpointed block came out -9% to +25% of tiny-cpu's checkpointed step from run to run
    fns = [lambda: run(1), checkpointed] + ([lambda: run(chunks)] if chunks > 1 else [])
    figures = _interleaved(
        fns,
        device,
        _rounds(repeats),
        lambda plain, ckpt, *split: (ckpt - plain, *[(s - plain) / (chunks - 1) for s in split]),
    )
    out["checkpoint_block_s"] = figures[0]
    if chunks > 1:
        out["chunk_overhead_s"] = figures[1]
    if dist.is_initialized() and dist.get_world_size() > 1:
        if device.type == "cpu":  # the whole model plainly: a DDP basis's compute without DDP
            out["model_plain_s"] = model_plain_s(cfg, batch, device, repeats)
        dist.barrier()
        out["tp_module_overhead_s"] = tensor_parallel_overhead_s(m.d_model, micro_batch * m.seq_len, device)
        out["zero1_block_s"], out["zero1_ends_s"] = zero1_costs(cfg, device, repeats)
        out |= tensor_parallel_costs(cfg, device, repeats)
        out |= fsdp_costs(cfg, batch, device, repeats)
        if m.n_layers >= 2 and not m.tie_embeddings:  # else no layout of this model is a pipeline
            out |= pipeline_costs(cfg, micro_batch, device, repeats)
    return out


def model_plain_s(cfg: TrainConfig, batch: torch.Tensor, device: torch.device, repeats: int) -> float:
    """The whole model's forward and backward of ``batch``, plainly, every rank at once: what a
    step of a DDP basis computes, without DDP. On gloo DDP's hooks, bucket copies and all-reduces
    run on threads of the compute's cores: at tiny-cpu DDP's forward and backward took 17-19 ms a
    step where the same model plainly took 13-14 and the fitted all-reduce said 0.9, so a layout
    without DDP (a pipeline, tensor parallelism over every rank) was predicted with the rest as
    compute. The model's own copy (CPU only: a GPU's memory holds one model, and NCCL's
    all-reduces run on their own streams)."""
    model = GPT(cfg.model, cfg.kernels.attention).to(device)

    def step() -> None:
        cross_entropy(model(batch[:, :-1]), batch[:, 1:]).backward()

    (seconds,) = _interleaved([step], device, _rounds(repeats), lambda t: (t,))
    return seconds


PIPE_MICROBATCHES = (2, 6)
"""The pipelined copy's microbatches, in multiples of its stages (1F1B takes one a stage at least):
the few and the many; GPipe runs the many."""


def pipeline_costs(
    cfg: TrainConfig, micro_batch: int, device: torch.device, repeats: int
) -> dict[str, float]:
    """What a pipeline stage pays a microbatch beyond its forward and backward: the schedule's
    machinery (each microbatch's inputs detached and kept, its backward run on the stage's outputs)
    and its sends and receives. A block a rank, a pipeline over every rank (the first with the
    embeddings, the last with the head), under 1F1B with few and with many microbatches of
    the same size: its step grows by the busiest stage's work and this a microbatch, the fill and
    drain the same (on 2 CPU ranks at tiny-cpu 1.4-1.8 ms, where a block's microbatch computes in
    2 and the sends' latency said 0.8: pipelines of 8 microbatches were predicted 11% under).
    The stage's own work, a microbatch plainly forward and backward on each rank, is taken out (the
    busiest rank's). With it, each stage's own work a microbatch (``pipeline_first_s``,
    ``pipeline_last_s``, ``pipeline_middle_s``: 0 with 2 ranks) and a block alone
    (``pipeline_block_s``, the ranks' mean), forward and backward, at half ``micro_batch``'s rows.
    And ``pipeline_gpipe_extra_s``: the same pipeline under GPipe with the many microbatches, its
    step over 1F1B's, in the same rounds. The two schedules' chunks are the same, but GPipe's first
    stage runs ahead, so each receive of its forwards is posted after its send while the sender
    computes; on gloo that post blocks until the sender's side answers (on 2 CPU cores 0.1 ms most
    times and 2-6 ms one time in three, against under 0.1 where the sender waits): the trainer's
    tiny-cpu pp2 took 42.4 ms a step under GPipe with 8 microbatches against 37.7 under 1F1B, 30.8
    against 28.7 with 4 (one sweep). The layout model fits that post's cost to this
    (``Basis.pipeline_late_receive_s``: 0.29 ms there, counted on each GPipe forward but the first).
    And ``pipeline_looped_extra_s``: the copy with a second block a rank as a second stage, looped
    (interleaved 1F1B), with the many microbatches, its step over the one-block 1F1B step's (the
    layout model's ``Basis.pipeline_looped_chunk_s``). Every rank must call it."""
    from torch.distributed.pipelining import (
        PipelineStage,
        Schedule1F1B,
        ScheduleGPipe,
        ScheduleInterleaved1F1B,
    )
    from torch.distributed.pipelining.stage import _PipelineStageBase

    from perfkit.trainer.parallelize import stage_ends

    world, rank = dist.get_world_size(), dist.get_rank()
    m = cfg.model
    part = GPT(dataclasses.replace(m, n_layers=1), cfg.kernels.attention).to(device)  # this rank's block
    part = stage_ends(part, first=rank == 0, last=rank == world - 1)
    rows = max(1, micro_batch // 2)  # a pipeline's microbatch: a share of a rank's batch
    counts = [k * world for k in PIPE_MICROBATCHES]
    runs: list[Callable[[], None]] = []
    # and a second block a rank as a looped stage (stage s on rank s % world) under interleaved
    # 1F1B, with the many microbatches: what a looped stage's microbatch costs
    looped: list[_PipelineStageBase] = [
        PipelineStage(
            stage_ends(
                GPT(dataclasses.replace(m, n_layers=1), cfg.kernels.attention).to(device),
                s == 0,
                s == 2 * world - 1,
            ),
            s,
            2 * world,
            device,
            group=dist.group.WORLD,
        )
        for s in (rank, rank + world)
    ]
    built = [
        *(
            kind(PipelineStage(part, rank, world, device, group=dist.group.WORLD), n, cross_entropy)
            for n, kind in ((counts[0], Schedule1F1B), (counts[1], Schedule1F1B), (counts[1], ScheduleGPipe))
        ),
        ScheduleInterleaved1F1B(looped, counts[1], cross_entropy),
    ]
    for schedule in built:
        n = schedule._n_microbatches
        batch = torch.randint(0, m.vocab_size, (n * rows, m.seq_len + 1), device=device)

        def step(schedule: Any = schedule, batch: torch.Tensor = batch) -> None:
            if rank == 0:
                schedule.step(batch[:, :-1])
            elif rank == world - 1:
                schedule.step(target=batch[:, 1:], losses=[])
            else:
                schedule.step()

        runs.append(step)
    tokens = torch.randint(0, m.vocab_size, (rows, m.seq_len + 1), device=device)
    hidden = torch.randn(rows, m.seq_len, m.d_model, device=device)

    def plain() -> None:  # this rank's stage, a microbatch, forward and backward
        x = tokens[:, :-1] if rank == 0 else hidden.clone().requires_grad_(True)
        out = part(x)
        if rank == world - 1:
            cross_entropy(out, tokens[:, 1:]).backward()
        else:
            out.backward(torch.ones_like(out))

    block = stage_ends(
        GPT(dataclasses.replace(m, n_layers=1), cfg.kernels.attention).to(device), False, False
    )

    def alone() -> None:  # a block without the ends, a microbatch, forward and backward
        out = block(hidden.clone().requires_grad_(True))
        out.backward(torch.ones_like(out))

    runs += [plain, alone]
    few, many = counts
    slope, gpipe_extra, looped_extra, own, one = _interleaved(
        runs,
        device,
        _rounds(repeats),
        lambda a, b, g, loop, own, one: ((b - a) / (many - few), g - b, loop - b, own, one),
    )
    # the step is the busiest stage's: the slowest rank's growth less the busiest rank's work; each
    # stage's own work kept too (the first, the last, the busiest middle), for the layout model's
    # simulation of the copy's schedule (``perfkit.optimizer.pipesim``)
    where = 0 if rank == 0 else 1 if rank == world - 1 else 2
    figures = torch.zeros(7, dtype=torch.float64, device=device)
    figures[0], figures[1], figures[2], figures[3 + where] = slope, gpipe_extra, own, own
    figures[6] = looped_extra
    dist.all_reduce(figures, op=dist.ReduceOp.MAX)
    slope, gpipe_extra, own, first, last, middle, looped_extra = (float(x) for x in figures)
    block_s = torch.tensor([one / world], dtype=torch.float64, device=device)
    dist.all_reduce(block_s)  # the ranks' mean
    return {
        "pipeline_gpipe_extra_s": gpipe_extra,
        "pipeline_gpipe_microbatches": float(many),  # what the analysis reads the excess by
        "pipeline_block_s": float(block_s[0]),
        "pipeline_microbatch_s": max(0.0, slope - own),
        "pipeline_first_s": first,
        "pipeline_last_s": last,
        "pipeline_middle_s": middle,
        "pipeline_looped_extra_s": looped_extra,
    }


def tensor_parallel_costs(cfg: TrainConfig, device: torch.device, repeats: int) -> dict[str, float]:
    """What the trainer's tensor-parallel plan over every rank costs beyond its share of the FLOPs,
    forward and backward, at the batch a rank takes when every rank is one tensor-parallel group:
    ``tp_block_s`` a block, ``tp_ends_s`` the rest of a microbatch (the ranks meeting at its first
    collective), and ``sp_block_s``, ``sp_ends_s`` with sequence parallelism (its ends' slice and
    gather too). Its collectives happen between the block's own compute, and each waits for the
    other ranks (on 2 CPU ranks 1.2-1.5 ms a call, where the same call after a barrier takes 0.3);
    DTensor dispatches each module. Copies of one block and of ``depth`` with each plan against plain ones,
    interleaved; none where the model cannot be split so (SP: none where only SP cannot)."""
    from perfkit.errors import ConfigError
    from perfkit.trainer.config import resolve_layout
    from perfkit.trainer.parallelize import _sequence_parallel_ends, _tensor_parallel

    world = dist.get_world_size()
    plans = []
    for sp in (False, True):
        p = dataclasses.replace(
            cfg.parallel, tp=world, pp=1, dp=0, zero=0, microbatches=0, sequence_parallel=sp
        )
        try:
            micro_batch = resolve_layout(dataclasses.replace(cfg, parallel=p), world).micro_batch
        except ConfigError:
            continue
        plans.append(sp)
    if not plans:
        return {}
    m = cfg.model
    batch = torch.randint(0, m.vocab_size, (micro_batch, m.seq_len + 1), device=device)
    mesh = _world_mesh(device)

    def copy(layers: int, plan: bool | None) -> Callable[[], None]:
        model = GPT(dataclasses.replace(m, n_layers=layers), cfg.kernels.attention).to(device)
        if plan is not None:
            _tensor_parallel(model, mesh, plan)
            if plan:
                _sequence_parallel_ends(model, mesh)

        def run() -> None:
            cross_entropy(model(batch[:, :-1]), batch[:, 1:]).backward()

        return run

    deep = depth(cfg)
    runs = [copy(layers, plan) for plan in [None, *plans] for layers in (1, deep)]

    # interleaved, and for a small model twice the repeats: one measurement of 15 calls each moved
    # 9.8 to 14.0 ms a block at tiny-cpu (a large model's calls are longer, and steadier)
    def estimate(one: float, deeper: float, *planned: float) -> tuple[float, ...]:
        # each plan's copies beyond their share of the plain ones' (a rank's share of the blocks,
        # the ends whole)
        per_block = (deeper - one) / (deep - 1)
        out = []
        for plan1, plan_deep in zip(planned[::2], planned[1::2], strict=True):
            out += [
                plan1 - (one - per_block + per_block / world),
                plan_deep - (one - per_block + deep * per_block / world),
            ]
        return tuple(out)

    figures = _interleaved(runs, device, _deep_rounds(_rounds(repeats), deep), estimate)
    out = {}
    for k, sp in enumerate(plans):
        key = "sp" if sp else "tp"
        one, deeper = figures[2 * k : 2 * k + 2]
        out[f"{key}_block_s"], out[f"{key}_ends_s"] = _block_and_ends(one, deeper, deep, m.n_layers)
    return out


def _rounds(repeats: int) -> int:
    """Rounds of the copies' interleaved calls: for a small model twice the repeats (its calls are
    short, and the host drifts as much as they last)."""
    return 2 * repeats if repeats >= REPEATS else repeats


def fsdp_costs(cfg: TrainConfig, batch: torch.Tensor, device: torch.device, repeats: int) -> dict[str, float]:
    """What FSDP2 (ZeRO-3) over every rank costs a microbatch beyond the same copy unsharded, for
    copies of one block and of ``depth``, each block a unit and the root (embeddings, final norm, head)
    another, interleaved: (``fsdp_block_s``, a block; ``fsdp_ends_s``, the root; ``dtensor_param_s``,
    a parameter tensor in the optimizer phase). A
    unit's gathers and scatters move its parameters' bytes, so a block and the root differ as their
    sizes do: at d_model 512 a block holds 3.1M
    parameters and the root 0.26M, where one unit's average (the block and the root over two) had
    charged the four blocks of that model at half their cost (FSDP2 predicted 8-14% under). The
    optimizer phase (the gradient norm, AdamW) of the one-block copy, sharded against plain, a
    tensor: each op dispatched through DTensor, tensor by tensor (measured one after the other, this
    moved 0.07-0.20 ms at tiny-cpu from run to run, and tensor parallelism's optimizer phase then
    measured 4.0 ms where 48 DTensor parameters at 0.18 had predicted 9.9). The same for FSDP2 that
    keeps the parameters gathered from forward to backward (ZeRO-2: ``reshard_after_forward=False``,
    ``fsdp_keep_block_s`` and ``fsdp_keep_ends_s``): it gathers once a microbatch where ZeRO-3
    gathers twice, yet at tiny-cpu's shape on 2 CPU ranks it cost nearly as much (its copies and
    reduce-scatters stay), and ZeRO-2 modelled from its collectives alone was predicted 29% under.
    Every rank must call it."""
    mesh = _world_mesh(device)
    runs: list[Callable[[], None]] = []
    copies: list[nn.Module] = []
    deep = depth(cfg)
    for layers in (1, deep):
        for reshard in (None, True, False):  # plain, ZeRO-3, ZeRO-2
            model = GPT(dataclasses.replace(cfg.model, n_layers=layers), cfg.kernels.attention).to(device)
            if reshard is not None:
                for unit in model.layers.values():
                    fully_shard(unit, mesh=mesh, reshard_after_forward=reshard)
                fully_shard(model, mesh=mesh, reshard_after_forward=reshard)

            def run(model: nn.Module = model) -> None:
                cross_entropy(model(batch[:, :-1]), batch[:, 1:]).backward()

            runs.append(run)
            copies.append(model)

    def estimate(*t: float) -> tuple[float, ...]:
        plain1, fsdp1, keep1, plain_deep, fsdp_deep, keep_deep = t
        return fsdp1 - plain1, fsdp_deep - plain_deep, keep1 - plain1, keep_deep - plain_deep

    one, deeper, keep_one, keep_deep = _interleaved(
        runs, device, _deep_rounds(_rounds(repeats), deep), estimate
    )
    block, ends = _block_and_ends(one, deeper, deep, cfg.model.n_layers)
    keep_block, keep_ends = _block_and_ends(keep_one, keep_deep, deep, cfg.model.n_layers)
    tensors = sum(1 for _ in copies[0].parameters())
    (per_tensor,) = _interleaved(  # over the gradients of the runs above
        [_optimizer_step(cfg, copies[0]), _optimizer_step(cfg, copies[1])],
        device,
        _rounds(repeats),
        lambda plain, sharded: ((sharded - plain) / tensors,),
    )
    return {
        "fsdp_block_s": block,
        "fsdp_ends_s": ends,
        "fsdp_keep_block_s": keep_block,
        "fsdp_keep_ends_s": keep_ends,
        "dtensor_param_s": per_tensor,
    }


def _world_mesh(device: torch.device) -> DeviceMesh:
    world = dist.group.WORLD
    assert world is not None, "the process group is initialized"
    return DeviceMesh.from_group(world, device.type)


def _optimizer_step(cfg: TrainConfig, model: nn.Module) -> Callable[[], None]:
    """The trainer's optimizer phase for ``model``'s parameters and gradients: the gradient norm,
    clipped, and an AdamW step of the configured kernel."""
    params = list(model.parameters())
    opt = build_optimizer(_with_zero(cfg, 0), params, None)

    def step() -> None:
        clip_grad_norm_(params, cfg.optimizer.grad_clip, None)
        opt.step()

    return step


def zero1_costs(cfg: TrainConfig, device: torch.device, repeats: int) -> tuple[float, float]:
    """What ZeroRedundancyOptimizer's step over every rank costs beyond AdamW on a rank's share of
    the parameters, for copies of one block and of ``depth``: (a block, the model's ends). Each parameter is
    broadcast from its owner after the step, one call a tensor, all issued then waited for: on 2
    CPU ranks 0.27 ms a tensor at tiny-cpu's sizes and 3.7 ms a step besides, where the fitted
    latency of a call (0.28-0.42 ms from run to run) missed tiny-cpu's ZeRO-1 by up to 23%. The two
    copies hold the job's own tensors (a block's, the ends'), so the step of any depth follows.
    Every rank must call it."""
    world = dist.get_world_size()
    steps: list[Callable[[], None]] = []  # ZeRO-1's and plain AdamW's, for one block and more
    deep = depth(cfg)
    for layers in (1, deep):
        model = GPT(dataclasses.replace(cfg.model, n_layers=layers), cfg.kernels.attention).to(device)
        params = list(model.parameters())
        for p in params:
            p.grad = torch.zeros_like(p)
        for zero in (1, 0):
            opt = build_optimizer(_with_zero(cfg, zero), params, None)
            steps.append(lambda opt=opt: opt.step())  # type: ignore[misc]

    def estimate(zero1: float, plain1: float, zero_deep: float, plain_deep: float) -> tuple[float, float]:
        return zero1 - plain1 / world, zero_deep - plain_deep / world

    # interleaved, twice the repeats: measured one after the other, a block's 4 ms once came out 0
    one, deeper = _interleaved(steps, device, _deep_rounds(2 * repeats, deep), estimate)
    return _block_and_ends(one, deeper, deep, cfg.model.n_layers)


def _with_zero(cfg: TrainConfig, zero: int) -> TrainConfig:
    return dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, zero=zero))


def tensor_parallel_overhead_s(d_model: int, tokens: int, device: torch.device) -> float:
    """What DTensor costs one module of the tensor-parallel plan, forward and backward, beyond the
    same local matmul done plainly: a column-parallel linear over every rank of the job (its input
    needs no gradient, so no collective runs) timed against a plain linear of its local shape.
    Every rank must call it: placing the weight scatters it."""
    world = dist.get_world_size()
    mesh = _world_mesh(device)
    width = max(world, d_model - d_model % world)
    parallel = parallelize_module(nn.Linear(d_model, width, device=device), mesh, ColwiseParallel())
    plain = nn.Linear(d_model, width // world, device=device)
    x = torch.randn(1, max(1, min(tokens, 4096)), d_model, device=device)
    # interleaved, and many: each call is a fraction of a millisecond, and the host drifts
    (extra,) = _interleaved(
        [lambda: parallel(x).sum().backward(), lambda: plain(x).sum().backward()],
        device,
        TP_PAIRS,
        lambda with_dtensor, without: (with_dtensor - without,),
    )
    return extra
