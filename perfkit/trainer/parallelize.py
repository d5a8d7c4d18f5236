"""Apply the configured layout to a GPT: tensor parallel, then activation/compile, then FSDP2 or
DDP, then pipeline stages. One function, ``parallelize``, from the config and a DeviceMesh.

The order and the gloo traps are those measured in shared/design/torch-distributed-facts.md.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import (
    PipelineScheduleMulti,
    PipelineScheduleSingle,
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
)
from torch.distributed.pipelining.stage import _PipelineStageBase
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    PrepareModuleOutput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)
from torch.nn.parallel import DistributedDataParallel as DDP

from perfkit.trainer.config import Layout, TrainConfig
from perfkit.trainer.model import GPT, cross_entropy


@dataclass(kw_only=True)
class Parallelized:
    """What the training loop needs from the layout."""

    layout: Layout
    mesh: DeviceMesh
    parts: list[nn.Module]
    """The model, or this rank's pipeline stages, wrapped for data parallelism."""
    optimizers: list[torch.optim.Optimizer]
    """One per part, so each part's state dict (and checkpoint) stands alone."""
    schedule: PipelineScheduleSingle | PipelineScheduleMulti | None = None
    """The pipeline schedule when pp > 1."""
    has_first_stage: bool = True
    has_last_stage: bool = True
    dp_rank: int = 0
    params: list[nn.Parameter] = field(default_factory=list)
    """Every parameter this rank updates, each once."""
    reduce_after_backward: bool = False
    """Gradients still need averaging over data-parallel ranks after backward (PP without FSDP)."""

    @property
    def dp_group(self) -> dist.ProcessGroup:
        return self.mesh["dp"].get_group()

    @property
    def pp_group(self) -> dist.ProcessGroup:
        return self.mesh["pp"].get_group()


def build_mesh(layout: Layout, device_type: str) -> DeviceMesh:
    return init_device_mesh(device_type, (layout.pp, layout.dp, layout.tp), mesh_dim_names=("pp", "dp", "tp"))


def _tensor_parallel(model: GPT, tp_mesh: DeviceMesh, sequence_parallel: bool) -> None:
    plan: dict[str, ParallelStyle] = {
        "attn.q": ColwiseParallel(),
        "attn.k": ColwiseParallel(),
        "attn.v": ColwiseParallel(),
        "attn.o": RowwiseParallel(),
        "mlp.fc1": ColwiseParallel(),
        "mlp.fc2": RowwiseParallel(),
    }
    if sequence_parallel:
        # Between blocks and through the norms the residual stream is sharded along the sequence;
        # attention and MLP gather it (all-gather) and their row-wise outputs reduce-scatter back.
        gather = PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),))
        plan |= {
            "ln1": SequenceParallel(),
            "attn": gather,
            "attn.o": RowwiseParallel(output_layouts=Shard(1), use_local_output=False),
            "ln2": SequenceParallel(),
            "mlp": gather,
            "mlp.fc2": RowwiseParallel(output_layouts=Shard(1), use_local_output=False),
        }
    for block in model.layers.values():
        parallelize_module(block, tp_mesh, plan)


def _sequence_parallel_ends(part: GPT, tp_mesh: DeviceMesh) -> None:
    """Around a run of sequence-parallel blocks (a model, or one pipeline stage): the first block
    takes its slice of the full hidden states (no communication), the last gathers them back, so
    embeddings, the final norm, the head and stage-to-stage sends see plain full tensors."""
    blocks = list(part.layers.values())
    shard = PrepareModuleInput(input_layouts=(Replicate(),), desired_input_layouts=(Shard(1),))
    gather = PrepareModuleOutput(
        output_layouts=(Shard(1),), desired_output_layouts=(Replicate(),), use_local_output=True
    )
    parallelize_module(blocks[0], tp_mesh, shard)
    parallelize_module(blocks[-1], tp_mesh, gather)


def _stage_ids(layout: Layout, pp_rank: int) -> list[int]:
    # Looped placement: with two stages per rank, rank r holds stages r and r + pp.
    return [pp_rank + i * layout.pp for i in range(layout.stages_per_rank)]


def _split_stage(model: GPT, stage: int, n_stages: int) -> GPT:
    """A copy of the model keeping only the layers (and embeddings / head) of one stage."""
    n = len(model.layers)
    lo, hi = stage * n // n_stages, (stage + 1) * n // n_stages
    part = copy.deepcopy(model)
    for key in list(part.layers.keys()):
        if not lo <= int(key) < hi:
            del part.layers[key]
    return stage_ends(part, first=stage == 0, last=stage == n_stages - 1)


def stage_ends(part: GPT, first: bool, last: bool) -> GPT:
    """``part`` as a pipeline stage: the embeddings only on the first, the final norm and head only
    on the last (a stage between takes and gives hidden states)."""
    if not first:
        part.tok_emb = part.pos_emb = None
    if not last:
        part.norm = part.head = None
    return part


def _data_parallel(
    module: GPT, cfg: TrainConfig, dp_mesh: DeviceMesh, device: torch.device, ddp: bool = True
) -> nn.Module:
    """FSDP2 for zero >= 2; else DDP when ``ddp`` and more than one data-parallel rank."""
    p = cfg.parallel
    if p.zero >= 2:
        bf16 = cfg.kernels.precision == "bf16"
        mp = MixedPrecisionPolicy(
            param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32 if bf16 else None
        )
        reshard = p.zero == 3
        blocks = list(module.layers.values())
        for block in blocks:
            fully_shard(block, mesh=dp_mesh, reshard_after_forward=reshard, mp_policy=mp)
        fully_shard(module, mesh=dp_mesh, reshard_after_forward=reshard, mp_policy=mp)
        ahead = cfg.overlap.fsdp_prefetch
        if ahead:  # explicit prefetch: all-gather the next blocks' parameters before they are needed
            for i, block in enumerate(blocks):
                block.set_modules_to_forward_prefetch(blocks[i + 1 : i + 1 + ahead])  # type: ignore[operator]
                block.set_modules_to_backward_prefetch(blocks[max(0, i - ahead) : i][::-1])  # type: ignore[operator]
        return module
    if dp_mesh.size() == 1 or not ddp:
        return module
    return DDP(
        module,
        device_mesh=dp_mesh,
        device_ids=[device.index] if device.type == "cuda" else None,
        bucket_cap_mb=cfg.overlap.bucket_cap_mb,
        gradient_as_bucket_view=cfg.overlap.gradient_as_bucket_view,
    )


def _unique_params(parts: list[nn.Module]) -> list[nn.Parameter]:
    return list({id(p): p for part in parts for p in part.parameters()}.values())


def build_optimizer(
    cfg: TrainConfig, params: list[nn.Parameter], dp_group: dist.ProcessGroup | None
) -> torch.optim.Optimizer:
    o, impl = cfg.optimizer, cfg.kernels.optimizer_impl
    # Weight decay on matrices only (not biases, norms), as in GPT-2 and nanoGPT. The foreach and
    # fused kernels refuse a group that mixes plain tensors and DTensors (TP), so split by mesh too.
    by_key: dict[tuple[bool, object], list[nn.Parameter]] = {}
    for p in params:
        mesh = p.device_mesh if isinstance(p, DTensor) else None
        by_key.setdefault((p.dim() >= 2, mesh), []).append(p)
    groups = [
        {"params": ps, "weight_decay": o.weight_decay if decay else 0.0} for (decay, _), ps in by_key.items()
    ]
    kwargs: dict[str, Any] = dict(
        lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, foreach=impl == "foreach", fused=impl == "fused"
    )
    if cfg.parallel.zero == 1:
        return ZeroRedundancyOptimizer(
            groups, optimizer_class=torch.optim.AdamW, process_group=dp_group, **kwargs
        )
    return torch.optim.AdamW(groups, **kwargs)


def parallelize(
    model: GPT, cfg: TrainConfig, layout: Layout, mesh: DeviceMesh, device: torch.device
) -> Parallelized:
    """Shard ``model`` (built identically on every rank) over ``mesh`` as the config says."""
    sequence_parallel = layout.tp > 1 and cfg.parallel.sequence_parallel
    if layout.tp > 1:
        _tensor_parallel(model, mesh["tp"], sequence_parallel)
    if sequence_parallel and layout.pp == 1:
        _sequence_parallel_ends(model, mesh["tp"])
    if cfg.kernels.compile:
        for block in model.layers.values():
            block.compile(mode=cfg.kernels.compile_mode)
    pp_rank = mesh.get_local_rank("pp")
    dp_rank = mesh.get_local_rank("dp")
    if layout.pp == 1:
        whole = _data_parallel(model, cfg, mesh["dp"], device)
        params = _unique_params([whole])
        return Parallelized(
            layout=layout,
            mesh=mesh,
            parts=[whole],
            optimizers=[build_optimizer(cfg, params, mesh["dp"].get_group())],
            dp_rank=dp_rank,
            params=params,
        )

    stage_ids = _stage_ids(layout, pp_rank)
    parts: list[nn.Module] = []
    stages: list[_PipelineStageBase] = []
    for sid in stage_ids:
        # DDP cannot wrap a pipeline stage: its forward arms the reducer for every microbatch while
        # the schedule only skips the sync in backward (reducer.cpp asserts). Without FSDP the
        # stage's gradients are all-reduced after the schedule step instead (reduce_gradients).
        split = _split_stage(model, sid, layout.n_stages)
        if sequence_parallel:
            _sequence_parallel_ends(split, mesh["tp"])
        part = _data_parallel(split, cfg, mesh["dp"], device, ddp=False)
        parts.append(part)
        stages.append(PipelineStage(part, sid, layout.n_stages, device, group=mesh["pp"].get_group()))
    schedule: PipelineScheduleSingle | PipelineScheduleMulti
    if cfg.parallel.pp_schedule == "interleaved-1f1b":
        schedule = ScheduleInterleaved1F1B(stages, n_microbatches=layout.microbatches, loss_fn=cross_entropy)
    else:
        cls = ScheduleGPipe if cfg.parallel.pp_schedule == "gpipe" else Schedule1F1B
        schedule = cls(stages[0], n_microbatches=layout.microbatches, loss_fn=cross_entropy)
    return Parallelized(
        layout=layout,
        mesh=mesh,
        parts=parts,
        optimizers=[build_optimizer(cfg, _unique_params([part]), mesh["dp"].get_group()) for part in parts],
        schedule=schedule,
        has_first_stage=0 in stage_ids,
        has_last_stage=layout.n_stages - 1 in stage_ids,
        dp_rank=dp_rank,
        params=_unique_params(parts),
        reduce_after_backward=cfg.parallel.zero < 2 and layout.dp > 1,
    )


@contextlib.contextmanager
def no_gradient_sync(parts: list[nn.Module]) -> Iterator[None]:
    """Skip the data-parallel gradient reduction (accumulation micro-steps but the last)."""
    with contextlib.ExitStack() as stack:
        for part in parts:
            if isinstance(part, DDP):
                stack.enter_context(part.no_sync())
            elif isinstance(part, FSDPModule):
                part.set_requires_gradient_sync(False)
                stack.callback(part.set_requires_gradient_sync, True)
        yield


@torch.no_grad()
def reduce_gradients(params: list[nn.Parameter], group: dist.ProcessGroup) -> None:
    """Average gradients over ``group`` in one flat all-reduce per dtype (gloo has no AVG op)."""
    grads = [p.grad for p in params if p.grad is not None]
    size = dist.get_world_size(group)
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(g)
    for same in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in same])
        dist.all_reduce(flat, group=group)
        flat /= size
        offset = 0
        for g in same:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()


@torch.no_grad()
def _reduce_partial_gradients(params: list[nn.Parameter]) -> None:
    """Sum, in one all-reduce per mesh, the gradients DTensor leaves pending a sum over ranks
    (Partial: a replicated weight applied to a sequence-sharded input, as sequence parallelism's
    norms and row-wise biases). Left pending, each is all-reduced again every time it is read: by
    the norm below and twice by AdamW (65 all-reduces a step instead of 1 for tiny-cpu's TP2+SP)."""
    by_mesh: dict[DeviceMesh, list[nn.Parameter]] = {}
    for p in params:
        g = p.grad
        if isinstance(g, DTensor) and g.device_mesh.ndim == 1 and g.placements == (Partial("sum"),):
            by_mesh.setdefault(g.device_mesh, []).append(p)
    for mesh, group in by_mesh.items():
        local = [p.grad.to_local() for p in group]  # type: ignore[union-attr]
        flat = torch.cat([t.reshape(-1) for t in local])
        dist.all_reduce(flat, group=mesh.get_group())
        for p, t, piece in zip(group, local, flat.split([t.numel() for t in local]), strict=True):
            p.grad = DTensor.from_local(piece.view(t.shape), mesh, [Replicate()], run_check=False)


def clip_grad_norm_(
    params: list[nn.Parameter], max_norm: float, pp_group: dist.ProcessGroup | None
) -> torch.Tensor:
    """Clip the global gradient norm of a mix of plain tensors and DTensors on different meshes.

    ``torch.nn.utils.clip_grad_norm_`` refuses to mix Tensors and DTensors (TP leaves norms and
    embeddings plain) and does not know about pipeline stages: take the norm per mesh, reduce each
    DTensor norm with ``full_tensor()``, sum the squares over pipeline ranks, then scale."""
    _reduce_partial_gradients(params)
    grads = [p.grad for p in params if p.grad is not None]
    by_mesh: dict[object, list[torch.Tensor]] = {}
    for g in grads:
        by_mesh.setdefault(g.device_mesh if isinstance(g, DTensor) else None, []).append(g)
    total_sq = torch.zeros((), device=grads[0].device if grads else "cpu", dtype=torch.float32)
    for group in by_mesh.values():
        norm = torch.nn.utils.get_total_norm(group)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        total_sq = total_sq + norm.float().to(total_sq.device) ** 2
    if pp_group is not None and dist.get_world_size(pp_group) > 1:
        dist.all_reduce(total_sq, group=pp_group)
    total = total_sq.sqrt()
    if max_norm > 0:
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for g in grads:
            (g.to_local() if isinstance(g, DTensor) else g).mul_(coef.to(g.device))
    return total
