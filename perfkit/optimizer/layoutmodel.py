"""A model of the reference trainer's layouts: per-rank peak memory and step time of any parallel
layout, predicted from one profiled run (the *basis*) without running it.

Step time = compute × pipeline fill + optimizer + collectives + what the basis spent outside the
model (data wait, logging, perfkit). Compute is the busiest rank's share of the model's FLOPs (blocks
split by tp and pp, the head on the last stage, recomputation with activation checkpointing) at the
rate the basis ran; the optimizer scales with the parameters a rank updates (sharded by ZeRO).
Collectives follow each layout's volume and count (DDP buckets, ZeRO-1 broadcasts, FSDP2 all-gathers
and reduce-scatters per block, tensor-parallel all-reduces per block and microbatch, pipeline
sends) at the latency and bus bandwidth fitted to the basis's recorded collectives (alpha + bytes /
beta, the faster quantile of each size: a collective's recorded time also holds its wait for the
last rank). Communication is counted as exposed: on gloo the copies compete with compute for the same
cores; a GPU basis's overlap is not modelled (said in the basis).

Peak memory = the basis's own part (libraries, buffers: its measured peak minus its modelled state)
+ parameters, gradients, DDP buckets and AdamW state by ZeRO stage + activations by micro-batch,
sequence length, tensor/sequence parallelism, checkpointing and the microbatches a pipeline schedule
keeps in flight + the logits on the last stage.

Torch-free: a prediction is arithmetic on the configuration and the basis's tables.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from perfkit.analyzers.comms import bus_factor, own_ns, pipeline_fill
from perfkit.errors import ConfigError, RunDirError
from perfkit.tables import TRAIN_LOG, read_rows
from perfkit.trainer.config import Layout, TrainConfig, config_from_dict, load_config, resolve_layout

WARMUP = 3
"""Steps of the basis left out (allocation, compilation, worker start-up)."""

FP32 = 4


@dataclass(frozen=True)
class Shape:
    """What one layout puts on its busiest rank."""

    cfg: TrainConfig
    layout: Layout
    recompute_measured: bool = False
    """Activation checkpointing's cost is measured (``Basis.checkpoint_block_s``), not counted as FLOPs."""
    ends_in_blocks: tuple[float, float] | None = None
    """The first stage's ends (the embeddings) and the last's (the final norm, the head and the
    loss) in blocks' work, as the basis measured them (``Basis.ends_in_blocks``); None: by FLOPs
    (the embeddings none, the head its matmul)."""

    @property
    def block_params(self) -> int:
        d, r = self.cfg.model.d_model, self.cfg.model.mlp_ratio
        return 4 * d * d + 4 * d + 2 * r * d * d + r * d + d + 4 * d

    @property
    def embed_params(self) -> int:
        m = self.cfg.model
        return m.vocab_size * m.d_model + m.seq_len * m.d_model

    @property
    def head_params(self) -> int:
        m = self.cfg.model
        return (0 if m.tie_embeddings else m.vocab_size * m.d_model) + 2 * m.d_model

    @property
    def stage_layers(self) -> list[list[int]]:
        """Layers of each pipeline rank (looped placement: rank r holds stages r, r + pp, ...)."""
        n, lay = self.cfg.model.n_layers, self.layout
        stages = [
            list(range(s * n // lay.n_stages, (s + 1) * n // lay.n_stages)) for s in range(lay.n_stages)
        ]
        return [sum((stages[r + i * lay.pp] for i in range(lay.stages_per_rank)), []) for r in range(lay.pp)]

    def rank_tensors(self, pp_rank: int) -> int:
        """Parameter tensors of pipeline rank ``pp_rank``: 16 a block (q, k, v, o, fc1, fc2, ln1 and
        ln2, each a weight and a bias), the two embeddings on the first stage, the final norm's two
        and the head on the last."""
        n = 16 * len(self.stage_layers[pp_rank])
        if pp_rank == 0:
            n += 2
        if pp_rank == (self.layout.n_stages - 1) % self.layout.pp:
            n += 2 + (0 if self.cfg.model.tie_embeddings else 1)
        return n

    def rank_params(self, pp_rank: int) -> int:
        """Parameters one tensor-parallel rank of pipeline rank ``pp_rank`` holds, unsharded by ZeRO."""
        lay = self.layout
        p = len(self.stage_layers[pp_rank]) * self.block_params // lay.tp
        if pp_rank == 0:
            p += self.embed_params
        if pp_rank == (lay.n_stages - 1) % lay.pp:
            p += self.head_params
        return p

    @property
    def busiest(self) -> int:
        """The pipeline rank with the most FLOPs (the head counts as much as its matmul)."""
        return max(range(self.layout.pp), key=self.stage_flops_per_token)

    def stage_flops_per_token(self, pp_rank: int) -> float:
        last = pp_rank == (self.layout.n_stages - 1) % self.layout.pp
        return self._flops_per_token(len(self.stage_layers[pp_rank]), pp_rank == 0, last)

    def virtual_stage_flops_per_token(self, stage: int) -> float:
        """A stage's FLOPs a token where a rank holds several (interleaved; stage ``s`` on rank
        ``s % pp``)."""
        n, stages = self.cfg.model.n_layers, self.layout.n_stages
        layers = (stage + 1) * n // stages - stage * n // stages
        return self._flops_per_token(layers, stage == 0, stage == stages - 1)

    def _flops_per_token(self, layers: int, first: bool, last: bool) -> float:
        m = self.cfg.model
        blocks: float = layers * (6 * self.block_params + 12 * m.d_model * m.seq_len)
        if self.cfg.kernels.activation_checkpointing and not self.recompute_measured:
            blocks *= 8 / 6  # the forward again in backward
        if self.ends_in_blocks is None:
            return blocks / self.layout.tp + (6 * m.vocab_size * m.d_model if last else 0)
        block = 6 * self.block_params + 12 * m.d_model * m.seq_len
        first_end, last_end = self.ends_in_blocks
        return blocks / self.layout.tp + block * ((first_end if first else 0) + (last_end if last else 0))

    @property
    def tokens_per_rank(self) -> int:
        return self.layout.local_batch * self.cfg.model.seq_len

    @property
    def flops(self) -> float:
        """FLOPs of the busiest rank per optimizer step (no pipeline fill)."""
        return self.tokens_per_rank * self.stage_flops_per_token(self.busiest)

    @property
    def pipeline_fill(self) -> float:
        """Step compute over the compute of the microbatches alone."""
        lay = self.layout
        if lay.pp == 1:
            return 1.0
        if lay.stages_per_rank > 1:
            return pipeline_fill(lay.pp, lay.microbatches, lay.stages_per_rank)
        # GPipe and 1F1B: the busiest stage's m microbatches, and one microbatch of each other stage
        # to fill and drain (m + pp - 1 microbatches when the stages are equal)
        busiest = self.stage_flops_per_token(self.busiest)
        others = sum(self.stage_flops_per_token(r) for r in range(lay.pp) if r != self.busiest)
        return 1.0 + others / (busiest * lay.microbatches)

    @property
    def act_bytes(self) -> int:
        return 2 if self.cfg.kernels.precision == "bf16" else FP32

    @property
    def optimizer_params(self) -> float:
        """Parameters whose AdamW state one rank keeps and updates."""
        p = self.rank_params(self.busiest)
        return p / self.layout.dp if self.cfg.parallel.zero >= 1 else p


class Collective(NamedTuple):
    what: str
    op: str
    size: float
    """Bytes a call."""
    group: int
    calls: int
    waits: int
    """Calls that also wait for the slowest rank of the group: every call issued inside forward or
    backward and waited for at once (tensor parallel, FSDP2, the gradient norm); one for DDP's
    buckets and ZeRO-1's broadcasts, which run asynchronously until the end of backward or of the
    optimizer step waits for the last; none for a pipeline's sends, whose waits are its bubble."""


def collectives(shape: Shape) -> list[Collective]:
    """Per optimizer step on the busiest rank."""
    cfg, lay = shape.cfg, shape.layout
    out: list[Collective] = []
    p = shape.rank_params(shape.busiest) * FP32
    m = lay.microbatches
    if lay.dp > 1:
        zero = cfg.parallel.zero
        if zero <= 1:
            buckets = max(1, math.ceil(p / (cfg.overlap.bucket_cap_mb * 2**20)))
            out.append(Collective("gradients (DDP)", "all_reduce", p / buckets, lay.dp, buckets, 1))
            if zero == 1:  # torch's ZeroRedundancyOptimizer broadcasts each parameter from its owner
                n = shape.rank_tensors(shape.busiest)
                out.append(Collective("parameters (ZeRO-1)", "broadcast", p / n, lay.dp, n, 1))
        else:
            units = len(shape.stage_layers[shape.busiest]) + 1  # each block, and the root module
            gathers = (2 if zero == 3 else 1) * (m if zero == 3 else 1)
            param_bytes = p // 2 if cfg.kernels.precision == "bf16" else p
            ag, rs = "parameters (FSDP all-gather)", "gradients (FSDP reduce-scatter)"
            out.append(
                Collective(ag, "all_gather", param_bytes / units, lay.dp, units * gathers, units * gathers)
            )
            out.append(Collective(rs, "reduce_scatter", p / units, lay.dp, units * m, units * m))
    if lay.tp > 1:
        layers = len(shape.stage_layers[shape.busiest])
        size = lay.micro_batch * cfg.model.seq_len * cfg.model.d_model * shape.act_bytes
        if cfg.parallel.sequence_parallel:
            # per block: an all-gather before attention and the MLP and a reduce-scatter after each,
            # their opposites in backward; the first block's input and the last's output one more
            # all-gather (measured: 18 and 16 a step at tiny-cpu's 4 layers)
            gathers, scatters = (4 * layers + 2) * m, 4 * layers * m
            out.append(
                Collective("activations (TP all-gather)", "all_gather", size, lay.tp, gathers, gathers)
            )
            out.append(
                Collective(
                    "activations (TP reduce-scatter)", "reduce_scatter", size, lay.tp, scatters, scatters
                )
            )
        else:
            # per block: the attention's output and fc2's in forward; in backward the input gradient
            # of each column-parallel linear: q, k, v and fc1 (measured: 24 a step at 4 layers)
            calls = 6 * layers * m
            out.append(Collective("activations (TP all-reduce)", "all_reduce", size, lay.tp, calls, calls))
    if lay.tp > 1 or lay.pp > 1 or (lay.dp > 1 and cfg.parallel.zero >= 2):
        # the gradient norm of sharded gradients: one small all-reduce a step; in a pipeline its
        # wait for the last stage's backward is the drain, which the bubble counts
        out.append(Collective("gradient norm", "all_reduce", 4, lay.world_size, 1, 0 if lay.pp > 1 else 1))
    if lay.pp > 1:
        size = lay.micro_batch * cfg.model.seq_len * cfg.model.d_model * shape.act_bytes
        # a middle rank receives and sends each microbatch forward and its gradient backward
        sends = (2 if lay.pp > 2 or lay.stages_per_rank > 1 else 1) * 2 * m * lay.stages_per_rank
        out.append(Collective(PIPELINE_SENDS, "send", size, 2, sends, 0))
    return out


PIPELINE_SENDS = "activations (pipeline send/recv)"


def activation_bytes(shape: Shape) -> float:
    """Activations the busiest rank keeps at its peak, and the logits on the last stage."""
    cfg, lay = shape.cfg, shape.layout
    m = cfg.model
    mb, s, d = lay.micro_batch, m.seq_len, m.d_model
    # per token and block: ~ (10 + 2·mlp_ratio)·d values kept for backward (Korthikanti et al. 2022,
    # without dropout), split by tp except the norms' inputs (unless sequence parallel)
    per_token = (10 + 2 * m.mlp_ratio) * d / lay.tp + (0 if cfg.parallel.sequence_parallel else 2 * d)
    if cfg.kernels.attention == "eager":
        per_token += 2 * s * m.n_heads / lay.tp  # the scores and the softmax, s per head
    layers = len(shape.stage_layers[shape.busiest])
    if cfg.kernels.activation_checkpointing:
        kept = layers * d + per_token  # each block's input, and one block's full set
    else:
        kept = layers * per_token
    if lay.pp == 1:
        in_flight = 1  # accumulation steps run one after another
    elif cfg.parallel.pp_schedule == "gpipe":
        in_flight = lay.microbatches
    else:
        in_flight = min(lay.microbatches, lay.pp * lay.stages_per_rank)
    acts = kept * mb * s * shape.act_bytes * in_flight
    if shape.busiest == (lay.n_stages - 1) % lay.pp:
        acts += 3 * mb * s * m.vocab_size * FP32  # logits, log-softmax, their gradient
    return float(acts)


def state_bytes(shape: Shape) -> dict[str, float]:
    """Parameters, gradients, DDP buckets and AdamW state on the busiest rank."""
    cfg, lay = shape.cfg, shape.layout
    p = shape.rank_params(shape.busiest) * FP32
    zero = cfg.parallel.zero
    out = {
        "parameters": p / lay.dp if zero == 3 else p,
        "gradients": p / lay.dp if zero >= 2 else p,
        "optimizer state": 2 * p / lay.dp if zero >= 1 else 2 * p,
    }
    if zero >= 2:  # one block's unsharded gradients, before their reduce-scatter
        out["gradients"] += p / max(1, len(shape.stage_layers[shape.busiest]))
    if zero == 3:
        out["parameters"] += p / max(1, len(shape.stage_layers[shape.busiest]))  # one block gathered
    if zero <= 1 and lay.dp > 1 and not cfg.overlap.gradient_as_bucket_view:
        out["DDP buckets"] = p
    if cfg.kernels.precision == "bf16":
        out["bf16 weight copies"] = p / 2 / (lay.dp if zero == 3 else 1)
    return out


@dataclass
class Basis:
    """What one profiled run measured, to predict other layouts from."""

    run: str
    config: dict[str, Any]
    world_size: int
    device: str
    step_s: float
    """The job's mean step after the warm-up, as a sweep measures a layout (the steps' stalls on a
    shared host included); what a prediction of the basis's own layout must reproduce."""
    median_step_s: float
    """The ranks' median step: what the parts below add up to (``stalls`` makes up the rest)."""
    compute_s: float
    """The busiest rank's model compute per step (forward + backward, collectives taken out)."""
    optimizer_s: float
    outside_s: float
    """Per step, time outside the model: data wait, logging, the rest of the loop."""
    alpha_s: float
    beta_bytes_per_s: float
    wait_s: float
    """What a blocking collective waits for the slowest rank (median, from the largest collectives)."""
    comm_basis: str
    peak_bytes: float | None
    base_bytes: float | None
    """The peak's part no layout changes: libraries, buffers (measured peak − modelled state)."""
    gpu_memory_bytes: float | None = None
    host_memory_bytes: float | None = None
    """The basis's device and host capacities (its manifest), what a sweep's layouts must fit in."""
    notes: list[str] = field(default_factory=list)
    core_share: float = 1.0
    """The part of a core each rank had while every rank computed (``core_share``): under 1 where a
    CPU basis's ranks and their threads outnumber the host's cores."""
    steps_used: int = 0
    """Steps after the warm-up that the basis's figures are medians of."""
    spread_s: float = 0.0
    """Half the p10-p90 range of those steps' times: what a prediction is uncertain by, at least."""
    chunk_s: float | None = None
    """A microbatch more of one block and the model's ends, forward and backward (measured by the
    trainer after its steps: ``perfkit.trainer.costs``); None where the basis did not measure it."""
    checkpoint_block_s: float | None = None
    """What activation checkpointing adds to one block a microbatch (measured, as ``chunk_s``)."""
    tp_module_s: float | None = None
    """What DTensor costs one module of the tensor-parallel plan, forward and backward (measured,
    as ``chunk_s``)."""
    dtensor_param_s: float | None = None
    """What the optimizer phase (gradient norm, AdamW) pays a parameter tensor that is a DTensor
    (FSDP2's, tensor parallel's) beyond a plain one (measured, as ``chunk_s``)."""
    fsdp_block_s: float | None = None
    """What FSDP2 over the basis's ranks costs a block (one unit) a microbatch: its gathers, scatters
    and copies (measured, as ``chunk_s``), in place of its modelled collectives."""
    fsdp_ends_s: float | None = None
    """The same for the root unit (embeddings, final norm, head)."""
    fsdp_keep_block_s: float | None = None
    """What FSDP2 that keeps a unit's parameters gathered from forward to backward (ZeRO-2) costs a
    block a microbatch (measured, as ``chunk_s``); where not measured, ZeRO-3's is charged."""
    fsdp_keep_ends_s: float | None = None
    """The same for its root unit."""
    fsdp_unit_s: float | None = None
    """One unit's average over a block and the root: what runs profiled before the two were
    measured apart hold (used for both there)."""
    zero1_block_s: float | None = None
    """What ZeRO-1's optimizer step over the basis's ranks costs a block beyond AdamW on its share:
    its parameters' broadcasts (measured, as ``chunk_s``), in place of the modelled ones."""
    zero1_ends_s: float | None = None
    """The same for the model's ends (embeddings, final norm, head) and ZeroRedundancyOptimizer's
    own cost a step."""
    tp_block_s: float | None = None
    """What a block of the tensor-parallel plan over all the basis's ranks costs beyond its share of
    the FLOPs, forward and backward, at the batch a rank then takes (measured, as ``chunk_s``): its
    collectives and their waits where they happen, and DTensor's dispatch."""
    tp_ends_s: float | None = None
    """And the rest of a microbatch (the ranks meeting at its first collective)."""
    sp_block_s: float | None = None
    """``tp_block_s`` with sequence parallelism."""
    sp_ends_s: float | None = None
    """``tp_ends_s`` with sequence parallelism (its ends' gather and slice too)."""
    pipeline_microbatch_s: float | None = None
    """What a pipeline stage pays a microbatch beyond its forward and backward: the schedule's
    machinery and its sends and receives (measured, as ``chunk_s``), in place of the modelled sends."""
    pipeline_first_s: float | None = None
    """The pipelined copy's stages' own work a microbatch (``perfkit.trainer.costs.pipeline_costs``):
    the first's (the embeddings and a block), the last's (a block and the head), a middle one's (0
    with 2 ranks), each forward and backward at half the basis's microbatch."""
    pipeline_last_s: float | None = None
    pipeline_middle_s: float | None = None
    model_plain_s: float | None = None
    """The whole model's forward and backward of a microbatch, plainly, every rank at once (CPU:
    ``perfkit.trainer.costs.model_plain_s``)."""
    ddp_step_s: float | None = None
    """What DDP took of a DDP basis's forward and backward beyond that (its hooks, copies and
    all-reduces, on gloo on the compute's cores), where more than its fitted all-reduce: charged
    in place of it to the layouts with DDP over the same ranks."""
    pipeline_block_s: float | None = None
    """A block alone the same way (no ends), on every rank: what the ends add to the first and the
    last stage (``ends_in_blocks``)."""
    pipeline_gpipe_extra_s: float | None = None
    """The pipelined copy's step under GPipe over its step under 1F1B, with the many microbatches
    (``pipeline_costs``): what a receive posted late costs (``pipeline_late_receive_s``)."""
    pipeline_looped_extra_s: float | None = None
    """The pipelined copy with a second block a rank as a second stage, looped (stage ``s`` on rank
    ``s % ranks``) under interleaved 1F1B, its step over the one-block copy's under 1F1B with the
    many microbatches, in the same rounds: what a looped stage's microbatch costs
    (``pipeline_looped_chunk_s``)."""

    @functools.cached_property
    def shape(self) -> Shape:
        cfg = config_from_dict(self.config)
        return self.shape_of(cfg, self.world_size)

    def shape_of(self, cfg: TrainConfig, world_size: int) -> Shape:
        return Shape(
            cfg, resolve_layout(cfg, world_size), self.checkpoint_block_s is not None, self.ends_in_blocks()
        )

    def ends_in_blocks(self) -> tuple[float, float] | None:
        """The model's ends in blocks' work, from the pipelined copy's stages run plainly: the first
        (the embeddings and a block) and the last (a block, the final norm, the head and the loss)
        less a block alone. At tiny-cpu the head's matmul is 0.36 of a block's FLOPs and its time
        with the loss 0.25-0.35 of a block's, the embeddings none and 0.01-0.02
        (``bench/pipeline_schedule.py``). None where not measured."""
        block, first, last = self.pipeline_block_s, self.pipeline_first_s, self.pipeline_last_s
        if block is None or first is None or last is None or block <= 0:
            return None
        return max(0.0, first - block) / block, max(0.0, last - block) / block

    def measured_parts(self, shape: Shape) -> dict[str, float]:
        """What the basis's measured costs (``perfkit.trainer.costs``) add to a layout's step beyond
        its FLOPs, against the basis's own layout: its microbatches' dispatch (a unit: a block, or the
        model's ends, a microbatch: more units than the basis's, each half of ``chunk_s``),
        checkpointing (each block a microbatch), and a pipeline's schedule (each stage a microbatch,
        its sends and receives included)."""
        out: dict[str, float] = {}
        if self.chunk_s is not None:

            def units(s: Shape) -> int:
                return s.layout.microbatches * (len(s.stage_layers[s.busiest]) + 1)

            out["microbatches (dispatch)"] = self.chunk_s / 2 * (units(shape) - units(self.shape))
        if self.checkpoint_block_s is not None and shape.cfg.kernels.activation_checkpointing:
            blocks = len(shape.stage_layers[shape.busiest]) * shape.layout.microbatches
            out["activation checkpointing"] = self.checkpoint_block_s * blocks
        machinery = self.pipeline_machinery_s()
        if machinery is not None and shape.layout.pp > 1:
            lay = shape.layout
            looped = self.pipeline_looped_chunk_s() if lay.stages_per_rank > 1 else None
            added = (machinery if looped is None else looped) * (lay.stages_per_rank - 1)
            out["pipeline schedule (measured)"] = (machinery + added) * lay.microbatches
        return out

    def copy_latency_s(self) -> float:
        """A send's transfer in the pipelined copy: half the basis's microbatch in fp32."""
        return self.pipeline_latency_s(max(1, self.shape.layout.micro_batch // 2), FP32)

    def pipeline_latency_s(self, rows: int, act_bytes: int) -> float:
        """A pipeline send's transfer at the basis's link fit: ``rows`` sequences of activations,
        over one hop of the ring the latency was fitted to (``comm_seconds``)."""
        m = config_from_dict(self.config).model
        hop = self.alpha_s / max(1, self.fit_group - 1)
        return hop + rows * m.seq_len * m.d_model * act_bytes / self.beta_bytes_per_s

    def pipeline_machinery_s(self) -> float | None:
        """What a pipeline stage pays a microbatch beyond its work and its sends' waits: the measured
        copy's growth a microbatch less what its simulated schedule (``pipesim``: its stages' own
        work and the link's latency) grows by; ``pipeline_microbatch_s`` itself where the basis
        measured no stage's own work (its sends' waits in it, and the model adds no other)."""
        if self.pipeline_microbatch_s is None:
            return None
        stages = self.pipeline_stages_s()
        if stages is None:
            return self.pipeline_microbatch_s
        from perfkit.optimizer.pipesim import split, step_seconds
        from perfkit.trainer.costs import PIPE_MICROBATCHES

        slope = self.pipeline_microbatch_s + max(stages)
        few, many = (k * len(stages) for k in PIPE_MICROBATCHES)
        latency = self.copy_latency_s()
        fwd, bwd = split(stages)
        simulated = step_seconds("1f1b", fwd, bwd, many, latency, share=self.core_share) - step_seconds(
            "1f1b", fwd, bwd, few, latency, share=self.core_share
        )
        return max(0.0, slope - simulated / (many - few))

    @property
    def fit_group(self) -> int:
        """The ranks the collectives' latency was fitted over: the link probe's, every rank's
        (``_fit_comms``)."""
        return self.shape.layout.world_size

    def fsdp_costs(self, zero: int) -> tuple[float | None, float | None]:
        """What FSDP2 costs a block and the root a microbatch under ``zero`` (2: the parameters kept
        gathered from forward to backward; 3: resharded after forward), as the basis measured it:
        ZeRO-3's where ZeRO-2's was not measured, one unit's average where neither was apart."""
        for block, ends in (
            (self.fsdp_keep_block_s, self.fsdp_keep_ends_s) if zero == 2 else (None, None),
            (self.fsdp_block_s, self.fsdp_ends_s),
        ):
            if block is not None and ends is not None:
                return block, ends
        return self.fsdp_unit_s, self.fsdp_unit_s

    def pipeline_late_receive_s(self) -> float:
        """What a receive posted after its send costs while the sender computes: the measured
        copy's GPipe step over its 1F1B step (``pipeline_gpipe_extra_s``) less the simulated copy's
        (its stages' own work, the link's latency), over GPipe's late receives, each forward's but
        the first (``pipesim.fit_late_receive``); 1F1B meets none. 0 where not measured."""
        stages, extra = self.pipeline_stages_s(), self.pipeline_gpipe_extra_s
        if stages is None or not extra:
            return 0.0
        from perfkit.optimizer.pipesim import fit_late_receive, split
        from perfkit.trainer.costs import PIPE_MICROBATCHES

        latency = self.copy_latency_s()
        fwd, bwd = split(stages)
        return fit_late_receive(
            fwd, bwd, PIPE_MICROBATCHES[1] * len(stages), latency, extra, share=self.core_share
        )

    def pipeline_looped_chunk_s(self) -> float | None:
        """What a microbatch of a rank's second looped stage (interleaved 1F1B) costs beyond its
        work: the measured copy's step with a second block a rank as that stage over its one-block
        step under 1F1B (``pipeline_looped_extra_s``) less the simulated difference (``pipesim``: the
        stages' own work, the link's latency), over the microbatches. It takes the place of
        ``pipeline_machinery_s`` for those: on 2 CPU ranks at d_model 64 a looped stage's
        microbatch posts its sends and receives one by one, three a microbatch for the two stages
        (c10d::send and recv_ 0.2 ms each, against 0.04-0.13 under 1F1B), and interleaved 1F1B
        with 8 microbatches measured 84 ms a step where a looped stage's microbatch charged as a
        1F1B stage's had predicted 71. None where not measured."""
        stages, block, extra = self.pipeline_stages_s(), self.pipeline_block_s, self.pipeline_looped_extra_s
        if stages is None or block is None or extra is None:
            return None
        from perfkit.optimizer.pipesim import split, step_seconds
        from perfkit.trainer.costs import PIPE_MICROBATCHES

        many = PIPE_MICROBATCHES[1] * len(stages)
        latency = self.copy_latency_s()
        looped = [stages[0], *[block] * (2 * len(stages) - 2), stages[-1]]
        simulated = [
            step_seconds(schedule, *split(work), many, latency, 0.0, self.core_share, v)
            for schedule, work, v in (("1f1b", stages, 1), ("interleaved-1f1b", looped, 2))
        ]
        return max(0.0, extra - (simulated[1] - simulated[0])) / many

    def pipeline_stages_s(self) -> list[float] | None:
        """The measured copy's stages' own work a microbatch, in order, or None (not measured)."""
        first, last, middle = self.pipeline_first_s, self.pipeline_last_s, self.pipeline_middle_s
        if first is None or last is None or self.world_size < 2:
            return None
        return [first, *[middle or 0.0] * (self.world_size - 2), last]

    def to_json(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "config"}

    def refusal(self) -> str | None:
        """Why no prediction may be made from this basis, or None: too few steps after the warm-up,
        or a model that does not reproduce the basis's own step within ``REPRODUCE``."""
        if self.steps_used < MIN_STEPS:
            return (
                f"the basis {self.run} has {self.steps_used} step(s) after its {WARMUP} warm-up steps; predictions "
                f"need {MIN_STEPS} or more (its early steps are allocation and start-up, not the layout): profile "
                f"it with steps={WARMUP + MIN_STEPS + 2} or more"
            )
        modelled = predict(self, config_from_dict(self.config), self.world_size).step_s
        if abs(modelled - self.step_s) > REPRODUCE * self.step_s:
            return (
                f"the layout model does not reproduce its basis {self.run}: {modelled * 1e3:.1f} ms a step "
                f"modelled against the {self.step_s * 1e3:.1f} ms measured ({modelled / self.step_s - 1:+.0%}); "
                + "; ".join(self.notes or ["its collectives do not fit a latency and a bandwidth"])
            )
        return None


MIN_STEPS = 3
"""Steps after the warm-up a basis needs: fewer, and its medians are one or two steps' noise."""
REPRODUCE = 0.05
"""How closely the model must reproduce its basis's own step before it predicts another layout."""


@dataclass
class Prediction:
    step_s: float
    peak_bytes: float | None
    time_parts: dict[str, float]
    memory_parts: dict[str, float]
    notes: list[str] = field(default_factory=list)
    uncertainty_s: float = 0.0
    """The basis's step spread, scaled to this step."""
    peak_lower_bound: bool = False
    """The peak can only be bounded from below (FSDP2's RSS on CPU grows step after step)."""

    def to_json(self) -> dict[str, Any]:
        out = {
            "step_ms": self.step_s * 1e3,
            "uncertainty_ms": self.uncertainty_s * 1e3,
            "peak_memory_bytes": self.peak_bytes,
            "time_ms": {k: v * 1e3 for k, v in self.time_parts.items()},
            "memory_bytes": self.memory_parts,
            **({"peak_memory_lower_bound": True} if self.peak_lower_bound else {}),
        }
        return {**out, "notes": self.notes} if self.notes else out


MEASURED_COSTS = frozenset(
    f.name
    for f in dataclasses.fields(Basis)
    if f.name.endswith("_s") and f.default is None and f.name not in ("step_s", "median_step_s", "ddp_step_s")
)
"""The Basis fields ``perfkit.trainer.costs`` measures (None where the basis did not)."""


def tp_modules(shape: Shape) -> int:
    """Modules of the trainer's tensor-parallel plan the busiest rank runs a step, forward and
    backward: six linears a block (q, k, v, o, fc1, fc2), and with sequence parallelism its two norms
    and the two inputs it gathers; once per microbatch."""
    lay = shape.layout
    if lay.tp == 1:
        return 0
    per_block = 10 if shape.cfg.parallel.sequence_parallel else 6
    return per_block * len(shape.stage_layers[shape.busiest]) * lay.microbatches


def dtensor_params(shape: Shape) -> int:
    """Parameter tensors of the busiest rank that are DTensors: every one under FSDP2 (ZeRO-2 or 3
    over data-parallel ranks); under tensor parallelism the plan's linears' weights and biases (12 a
    block), and with sequence parallelism the norms' too (16)."""
    lay = shape.layout
    if shape.cfg.parallel.zero >= 2 and lay.dp > 1:
        return shape.rank_tensors(shape.busiest)
    if lay.tp > 1:
        per_block = 16 if shape.cfg.parallel.sequence_parallel else 12
        return per_block * len(shape.stage_layers[shape.busiest])
    return 0


def comm_seconds(
    shape: Shape, alpha: float, beta: float, wait: float = 0.0, fit_group: int | None = None
) -> dict[str, float]:
    """Seconds a step of each kind of collective: alpha + bus bytes / beta a call, and ``wait`` for
    the slowest rank each time one waits (``Collective.waits``). Where alpha was fitted to calls
    over ``fit_group`` ranks, a call over another group pays it by the ring's hops, ``group - 1``
    against the fit's (a 4-rank basis's alpha had charged tensor parallelism's 2-rank all-reduces
    at 4 ranks' latency: dp2 tp2 predicted 244 ms a step where it took 144 on 4 CPU ranks)."""
    out: dict[str, float] = {}
    for c in collectives(shape):
        latency = alpha * (c.group - 1) / (fit_group - 1) if fit_group and fit_group > 1 else alpha
        t = c.calls * (latency + bus_factor(c.op, c.group) * c.size / beta) + c.waits * wait
        out[c.what] = out.get(c.what, 0.0) + t
    return out


def step_parts(basis: Basis, shape: Shape) -> dict[str, float]:
    """What a step spends beside its compute, in seconds: each kind of collective (``comm_seconds``
    at the basis's fit), ZeRO-1's broadcasts as the basis measured them a block and for the ends,
    FSDP2's as the basis measured them where it did (ZeRO-2 or 3 over the data-parallel ranks), and
    tensor parallelism's collectives and DTensor's dispatch, as measured a block where they were
    (``measured_tp``), else modelled and DTensor's a module."""
    out = comm_seconds(shape, basis.alpha_s, basis.beta_bytes_per_s, basis.wait_s, basis.fit_group)
    lay = shape.layout
    if basis.pipeline_microbatch_s is not None:  # measured with the schedule (``measured_parts``)
        out.pop(PIPELINE_SENDS, None)
    if basis.ddp_step_s is not None and "gradients (DDP)" in out and lay.dp == basis.shape.layout.dp:
        # as the basis took it, and what other buckets change of it as modelled (an all-reduce more
        # a bucket: at d_model 64 and 96 tokens 0.05 MB buckets measured 7.2 ms a step over 25
        # MB's, the basis's; taken as the basis's, they were predicted 17% under)
        modelled = comm_seconds(
            basis.shape, basis.alpha_s, basis.beta_bytes_per_s, basis.wait_s, basis.fit_group
        )
        change = out["gradients (DDP)"] - modelled.get("gradients (DDP)", 0.0)
        out["gradients (DDP)"] = max(out["gradients (DDP)"], basis.ddp_step_s + change)
    if basis.zero1_block_s is not None and basis.zero1_ends_s is not None and "parameters (ZeRO-1)" in out:
        blocks = len(shape.stage_layers[shape.busiest])
        out["parameters (ZeRO-1)"] = basis.zero1_ends_s + basis.zero1_block_s * blocks + basis.wait_s
    fsdp_block, fsdp_ends = basis.fsdp_costs(shape.cfg.parallel.zero)
    if fsdp_block is not None and fsdp_ends is not None and shape.cfg.parallel.zero >= 2 and lay.dp > 1:
        for c in collectives(shape):
            if c.what.startswith(("parameters (FSDP", "gradients (FSDP")):
                out.pop(c.what, None)
        blocks = len(shape.stage_layers[shape.busiest])
        out["FSDP2 gathers and scatters (measured)"] = (
            (fsdp_block * blocks + fsdp_ends) * lay.microbatches / lay.tp
        )
    measured = measured_tp(basis, shape)
    if measured is not None:  # the plan's collectives and DTensor as measured where they happen
        for key in [k for k in out if k.startswith("activations (TP")]:
            del out[key]
        block, ends = measured
        out["tensor parallel (measured)"] = (
            block * len(shape.stage_layers[shape.busiest]) + ends
        ) * lay.microbatches
    elif tp_modules(shape):
        out["tensor parallel (DTensor)"] = (basis.tp_module_s or 0.0) * tp_modules(shape)
    return out


def measured_tp(basis: Basis, shape: Shape) -> tuple[float, float] | None:
    """The basis's measured cost of tensor parallelism (``Basis.tp_block_s``, ``tp_ends_s``; with
    sequence parallelism ``sp_``), a block and the rest a microbatch, where it applies to ``shape``:
    its ranks all one tensor-parallel group, at the batch the measurement took; else None (the
    collectives and DTensor's dispatch are modelled)."""
    lay = shape.layout
    sp = shape.cfg.parallel.sequence_parallel
    block, ends = (basis.sp_block_s, basis.sp_ends_s) if sp else (basis.tp_block_s, basis.tp_ends_s)
    if block is None or ends is None or lay.tp != basis.world_size or lay.tp == 1 or lay.pp > 1:
        return None
    cfg = config_from_dict(basis.config)  # measured at the basis's batch, every rank one TP group
    p = dataclasses.replace(cfg.parallel, tp=lay.tp, pp=1, dp=0, zero=0, microbatches=0)
    try:
        measured_at = resolve_layout(dataclasses.replace(cfg, parallel=p), lay.tp).micro_batch
    except ConfigError:
        return None
    return (block, ends) if measured_at == lay.micro_batch else None


_FITTED_OPS = ["all_reduce", "all_gather", "reduce_scatter", "broadcast", "send", "recv"]


def _size_classes(c: Any) -> list[tuple[float, float, int, Any]]:
    """Per (op, size, group size): bus bytes, the 20th percentile of the durations (the transfer:
    the rest of a collective's time waited for the last rank to arrive), count, the durations."""
    # less the time queued behind the group's previous call; the GPU's time where recorded (NCCL)
    c = c.assign(dur=own_ns(c) / 1e9)
    c = c[c["bytes"].notna() & (c["group_size"] > 1) & c["op"].isin(_FITTED_OPS) & c["dur"].notna()]
    points = [
        (bus_factor(str(op), int(n)) * float(size), float(g["dur"].quantile(0.2)), len(g), g["dur"])
        for (op, size, n), g in c.groupby(["op", "bytes", "group_size"])
    ]
    return sorted(points, key=lambda p: p[0])


def _enough(points: list[tuple[float, float, int, Any]]) -> list[tuple[float, float, int, Any]]:
    """The size classes of 5 calls or more, when there are any."""
    return [p for p in points if p[2] >= 5] or points


def _line(points: list[tuple[float, float, int, Any]]) -> tuple[float, float]:
    """alpha + slope x bus bytes through the size classes, least squares weighted by count."""
    if len({p[0] for p in points}) < 2:
        u, t = points[0][0], points[0][1]
        alpha = min(t, 50e-6) if u > 4096 else t
        return alpha, max(t - alpha, 1e-7) / u if u else 1e-9
    w = [float(p[2]) for p in points]
    mx = sum(wi * p[0] for wi, p in zip(w, points, strict=True)) / sum(w)
    my = sum(wi * p[1] for wi, p in zip(w, points, strict=True)) / sum(w)
    sxx = sum(wi * (p[0] - mx) ** 2 for wi, p in zip(w, points, strict=True))
    sxy = sum(wi * (p[0] - mx) * (p[1] - my) for wi, p in zip(w, points, strict=True))
    slope = sxy / sxx if sxx else 0.0
    alpha = max(my - slope * mx, min(p[1] for p in points) * 0.5, 1e-6)
    if slope <= 0:
        slope = max(points[-1][1] - alpha, 1e-6) / points[-1][0]
    return alpha, slope


def _fit_comms(comms: Any, steps_after: int, probe: Any = None) -> tuple[float, float, float, str] | None:
    """Latency, bus bandwidth and the wait for the slowest rank, from the 20th percentile of each
    size class's own times (not queued behind the previous call; size classes of under 5 calls left
    out when others have more). With a link probe (``perfkit.probe_links()``: 4 KiB to 32 MiB,
    nothing else running) its line gives the bandwidth and the smallest calls of the steps the
    latency a step pays: the large messages inside the steps are DDP's buckets sharing the machine
    with backward (fitted to alone, they made ZeRO-1's broadcasts 1.9x slower than measured at
    12.8M parameters). Without one, alpha + bus bytes / beta is fitted to the steps' calls by least
    squares weighted by count. The wait, what each blocking collective of a step costs on top of its
    transfer, is the mean time (the slowest tenth left out) beyond the fit of the probe's calls between bursts of compute
    (source "probe-step"); without them, of the largest in-step collectives (DDP's buckets, whose
    ranks drift apart over a whole backward: at 12.8M parameters they made each tensor-parallel
    call wait ~20 ms, 32% too slow a step)."""
    steps = comms[comms["step"] > steps_after] if not comms.empty else comms
    in_steps = _size_classes(steps) if not steps.empty else []
    between: Any = None
    if probe is not None and not probe.empty and "source" in probe.columns:
        between = probe[probe["source"] == "probe-step"]
        probe = probe[probe["source"] == "probe"]
    probed = _size_classes(probe) if probe is not None and not probe.empty else []
    if not in_steps and not probed:
        return None
    if probed:
        # the probe's line for the bandwidth; the latency a step pays from its smallest calls
        probe_alpha, slope = _line(_enough(probed))
        # the smallest in-step calls, when 5 or more: the probe's few calls a size swing 10x on a
        # shared host (4 KiB in 0.4 to 7.6 ms)
        alpha = (
            max(in_steps[0][1] - slope * in_steps[0][0], 1e-6)
            if in_steps and in_steps[0][2] >= 5
            else probe_alpha
        )
        used = in_steps + probed
    else:
        used = _enough(in_steps)
        alpha, slope = _line(used)
    wait = 0.0
    blocking = _size_classes(between) if between is not None and not between.empty else []
    if blocking:  # the probe's calls between bursts of compute: what a blocking call waits
        b = max(blocking, key=lambda p: p[2])
        # the mean, not the median: a step pays every call's wait, and on a shared host one call
        # in four waits 3-4 ms while the rest wait none (the median said 0.45 ms, TP's calls cost
        # 1.2); the slowest tenth left out: one stall of 30 ms had tripled a basis's TP steps
        d = b[3].sort_values()
        kept = d.iloc[: max(1, len(d) - len(d) // 10)]
        wait = max(0.0, float(kept.mean()) - (alpha + slope * b[0]))
    elif in_steps:
        largest = _enough(in_steps)[-1]
        wait = max(0.0, float((largest[3] - (alpha + slope * largest[0])).median()))
    recorded = sum(p[2] for p in used) - sum(p[2] for p in probed)
    probe_note = f" and the link probe's {sum(p[2] for p in probed)}" if probed else ""
    if blocking:
        probe_note += f", the wait from its {sum(p[2] for p in blocking)} calls between compute"
    return (
        alpha,
        1.0 / slope,
        wait,
        f"fitted to {recorded} recorded collectives{probe_note}, {len(used)} size classes",
    )


def core_share(env: dict[str, Any], device: str) -> float:
    """The part of a core each rank has while every rank computes: a CPU job's ranks on a host
    (``local_world_size``) and each one's threads over the host's cores (the manifest's ``env``),
    at most 1; 1 on GPUs, and where the manifest does not say."""
    if device == "cuda" or env.get("gpus"):
        return 1.0
    cores, ranks, threads = (env.get(k) for k in ("cpu_count", "local_world_size", "threads"))
    if (
        isinstance(cores, int)
        and isinstance(ranks, int)
        and isinstance(threads, int)
        and min(cores, ranks, threads) > 0
    ):
        return min(1.0, cores / (ranks * threads))
    return 1.0


def basis_from_run(run_path: Path) -> Basis:
    """Read a profiled run of the reference trainer as a basis for predictions."""
    from perfkit.analyzers.runtables import load_tables
    from perfkit.run import Run

    run = Run.open(run_path)
    config = run.trainer_config("predictions model the reference trainer's layouts")
    t = load_tables(run)
    steps = t.steps
    if steps.empty:
        raise RunDirError(f"{run_path} has no step table; profile it with the steps collector")
    later = steps[steps["step"] > WARMUP]
    if later["step"].nunique() < 2:
        later = steps[steps["step"] > 1] if steps["step"].nunique() > 2 else steps
    steps_used = int(steps.loc[steps["step"] > WARMUP, "step"].nunique())
    per_step = later.groupby("step")["step_time_s"].max()  # the job's step: its slowest rank's
    spread = float((per_step.quantile(0.9) - per_step.quantile(0.1)) / 2) if len(per_step) > 1 else 0.0
    per_rank = later.groupby("rank")[["step_time_s", "data_wait_s", "forward_s", "backward_s", "optimizer_s"]]
    med = per_rank.median()
    step_s = float(med["step_time_s"].median())
    # a sweep measures a layout's mean step, stalls and all (bench/sweep_prediction.py's bases: their
    # mean up to 7% over their median): the stalls are the host's, a share of any layout's step
    stalls = (
        float(per_step.mean() / per_step.median()) if len(per_step) > 1 and per_step.median() > 0 else 1.0
    )
    basis = Basis(
        run=str(run_path),
        config=config,
        world_size=run.manifest.world_size,
        device=str(config.get("device", "cpu")),
        step_s=step_s * stalls,
        median_step_s=step_s,
        compute_s=0.0,
        optimizer_s=0.0,
        outside_s=0.0,
        alpha_s=0.0,
        beta_bytes_per_s=1.0,
        wait_s=0.0,
        comm_basis="",
        peak_bytes=None,
        base_bytes=None,
        gpu_memory_bytes=run.manifest.env.get("gpu_memory_bytes"),
        host_memory_bytes=run.manifest.env.get("host_memory_bytes"),
        core_share=core_share(run.manifest.env, str(config.get("device", "cpu"))),
        steps_used=steps_used,
        spread_s=spread,
    )
    if basis.core_share < 1:
        env = run.manifest.env
        basis.notes.append(
            f"{env.get('local_world_size')} ranks of {env.get('threads')} thread(s) on {env.get('cpu_count')} cores: "
            f"each had {basis.core_share:.2g} of a core while all computed, so a pipeline's stages compute faster "
            "while their neighbours wait (its bubble is charged so)"
        )
    costs = run.manifest.model.get("layout_costs")
    if isinstance(costs, dict) and costs:
        for key, value in costs.items():  # perfkit.trainer.costs's keys: the fields', two renamed
            attr = {"chunk_overhead_s": "chunk_s", "tp_module_overhead_s": "tp_module_s"}.get(key, key)
            if attr in MEASURED_COSTS and isinstance(value, int | float) and value >= 0:
                setattr(basis, attr, float(value))
        if config_from_dict(config).kernels.compile:
            basis.notes.append(
                "the costs beyond FLOPs were measured on an eager copy of a compiled model: "
                "microbatches and checkpointing may cost less than predicted"
            )
    else:
        basis.notes.append(
            "the basis did not measure what microbatches, checkpointing and DTensor cost here "
            "(perfkit.trainer.costs): they are predicted from FLOPs alone"
        )
    shape = basis.shape  # after the costs: measured checkpointing leaves the FLOPs
    fit = _fit_comms(t.comms, WARMUP, t.link_probe)
    if fit is None:
        # nothing to fit (one rank): loopback gloo on this kind of host, or NVLink-class NCCL
        gpu = shape.cfg.device == "cuda" or bool(run.manifest.env.get("gpus"))
        fit = (
            (20e-6, 100e9, 0.0, "assumed (NVLink-class NCCL)")
            if gpu
            else (300e-6, 1e9, 0.0, "assumed (gloo)")
        )
        basis.notes.append(
            "the basis recorded no collectives: latency and bandwidth are assumed, not measured"
        )
    basis.alpha_s, basis.beta_bytes_per_s, basis.wait_s, basis.comm_basis = fit
    status = "failed" if run.abandoned() else run.manifest.status
    if status != "complete":
        basis.notes.append(f"the basis run {status}: its steps may stop early or hold its end")
    c = t.comms
    if (
        not c.empty
        and t.link_probe.empty
        and "source" in c.columns
        and (c.loc[c["bytes"] == c["bytes"].max(), "source"] == "ddp").all()
    ):
        basis.notes.append(
            "the bandwidth is fitted to DDP's bucket all-reduces, which run beside backward: where they are "
            "large, transfers are predicted slower than they are (bench/sweep_prediction.py's 12.8M-parameter case)"
        )
    mid = med.median()  # the ranks' medians: a prediction of the basis itself gives its step time
    model_s = float(mid["forward_s"] + mid["backward_s"])
    fitted = step_parts(basis, shape)
    comm = sum(fitted.values())
    lay = shape.layout
    if basis.model_plain_s is not None and "gradients (DDP)" in fitted and lay.pp == lay.tp == 1:
        # DDP as it took the step: its forward and backward beyond the model's plainly
        others = comm - fitted["gradients (DDP)"]
        ddp = model_s - others - basis.model_plain_s * lay.microbatches
        if ddp > fitted["gradients (DDP)"]:
            basis.ddp_step_s = ddp
            comm = others + ddp
    if comm > 0.8 * model_s:
        basis.notes.append("the fitted collectives explain most of forward + backward: compute is uncertain")
    # what runs per microbatch, stage by stage (compute, and its measured extras), fills the pipeline
    staged = max(model_s - comm, model_s * 0.2) / shape.pipeline_fill
    basis.compute_s = max(staged - sum(basis.measured_parts(shape).values()), staged * 0.2)
    # AdamW's own time: the DTensor parameters' dispatch is charged by the layout (dtensor_params)
    basis.optimizer_s = max(
        0.0, float(mid["optimizer_s"]) - (basis.dtensor_param_s or 0.0) * dtensor_params(shape)
    )
    basis.outside_s = max(0.0, step_s - model_s - float(mid["optimizer_s"]))
    peak = _logged_peak(run.layout.train_log)
    mem = t.memory
    col = "max_allocated" if "max_allocated" in mem.columns and mem["max_allocated"].notna().any() else "rss"
    if peak is None and not mem.empty and col in mem.columns and mem[col].notna().any():
        peak = float(mem[col].max())  # sampled at step ends: a lower bound of the peak within a step
        basis.notes.append("the basis's peak is its memory table's (sampled at step ends), not the trainer's")
    if peak is not None:
        basis.peak_bytes = peak
        basis.base_bytes = peak - sum(memory_parts(shape).values())
        if basis.base_bytes < 0:
            basis.notes.append(
                "the modelled state exceeds the measured peak: memory predictions are upper bounds"
            )
            basis.base_bytes = 0.0
    else:
        basis.notes.append("the basis recorded no memory: peak memory is not predicted")
    if shape.cfg.device == "cuda":
        basis.notes.append("on GPU, communication that overlaps compute is counted as exposed")
    return basis


def _logged_peak(train_log: Path) -> float | None:
    """The busiest rank's peak as the trainer logs it with its last step (CUDA's max allocated, or
    the peak RSS on CPU): what a sweep's runs report, so predictions compare like with like."""

    try:
        rows, _ = read_rows(train_log, TRAIN_LOG, drop_bad_rows=True)
    except RunDirError:
        return None
    value = rows[-1].get("peak_memory_bytes") if rows else None
    return float(value) if isinstance(value, int | float) and value > 0 else None


def memory_parts(shape: Shape) -> dict[str, float]:
    return {**state_bytes(shape), "activations": activation_bytes(shape)}


def predict(basis: Basis, cfg: TrainConfig, world_size: int) -> Prediction:
    """The step time and peak memory of ``cfg`` on ``world_size`` ranks, from ``basis``."""
    shape = basis.shape_of(cfg, world_size)
    base = basis.shape
    rate = base.flops / basis.compute_s if basis.compute_s > 0 else float("inf")
    measured = basis.measured_parts(shape)
    dispatch = measured.pop("microbatches (dispatch)", 0.0)
    compute = shape.flops / rate + min(0.0, dispatch)  # fewer microbatch units than the basis's
    parts = {"compute": compute}
    if dispatch > 0:
        parts["microbatches (dispatch)"] = dispatch
    parts |= measured
    if shape.pipeline_fill > 1:  # every stage's microbatches, their dispatch and recomputation too
        parts |= pipeline_bubble(basis, shape, sum(parts.values()))
    parts["optimizer"] = basis.optimizer_s * shape.optimizer_params / max(1.0, base.optimizer_params)
    parts["optimizer"] += (basis.dtensor_param_s or 0.0) * dtensor_params(shape)
    parts |= step_parts(basis, shape)
    parts["outside the model"] = basis.outside_s  # data wait, logging and the loop, as measured
    mem = memory_parts(shape)
    peak = None
    if basis.base_bytes is not None:
        mem = {"libraries and buffers (basis)": basis.base_bytes, **mem}
        peak = sum(mem.values())
    notes = []
    lower_bound = (
        peak is not None and cfg.parallel.zero >= 2 and shape.layout.dp > 1 and not basis.gpu_memory_bytes
    )
    if lower_bound:
        notes.append(
            "FSDP2 on CPU: a rank's RSS grows step after step (the C allocator keeps freed all-gather "
            "buffers: 591 to 730 MiB over 6 steps at 12.8M parameters), so the peak is a lower bound"
        )
    untimed = kernels_untimed(config_from_dict(basis.config), cfg)
    if untimed:
        notes.append(
            f"{', '.join(untimed)}: the layout model does not time a kernel change (only its memory), so the "
            "step is the basis's kernels' time; measure it (perfkit sweep --layout with the change), or "
            "replay a faster op on the basis's traces (perfkit whatif --speedup FAMILY=K)"
        )
    step = with_stalls(basis, parts)
    spread = basis.spread_s * step / basis.step_s if basis.step_s > 0 else 0.0
    return Prediction(step, peak, parts, mem, notes, spread, lower_bound)


TIMED_KERNELS = frozenset({"activation_checkpointing"})
"""The kernel options whose time the layout model charges (checkpointing: its forward again, as the
basis measured it); the others' speed it cannot know from a basis that did not run them."""


def kernels_untimed(base: TrainConfig, cfg: TrainConfig) -> list[str]:
    """``key=value`` of each kernel option ``cfg`` changes from ``base`` whose time the layout model
    does not charge (eager attention, bf16, compilation, the optimizer's implementation)."""
    return [
        f"kernels.{f.name}={getattr(cfg.kernels, f.name)}"
        for f in dataclasses.fields(cfg.kernels)
        if f.name not in TIMED_KERNELS and getattr(cfg.kernels, f.name) != getattr(base.kernels, f.name)
    ]


LATE_RECEIVES = "pipeline receives posted late"
"""The part of a pipeline's step its receives posted after their sends cost (``pipesim``)."""
CORES_LENT = "cores lent by waiting stages"
"""Under 0: what a pipeline's CPU ranks that share their cores save while their neighbours wait."""


def pipeline_bubble(basis: Basis, shape: Shape, busiest_s: float) -> dict[str, float]:
    """What a pipeline's step spends beyond its busiest stage's own microbatches (``busiest_s``):
    its schedule simulated as torch runs it (``pipesim``: each stage's chunks, its sends waiting for
    their receives, the link's latency) where the basis measured the copy's stages (so the
    machinery a microbatch is known apart from the waits), else the closed form's fill and drain
    (one microbatch of each other stage). Interleaved schedules are simulated too, their stages
    looped over the ranks as torch lowers them (each rank's two stages' sends and receives). Where the
    basis measured what a receive posted late costs, what the schedule's late receives add is a
    part of its own (GPipe's, mostly: a user's reason to choose 1F1B). Where CPU ranks share
    their cores (``Basis.core_share``), a stage computes faster while its neighbours wait, and the
    step can come out under the busiest stage's work at the pace all ranks computing gave it: that
    much is a part of its own, ``CORES_LENT``, under 0."""
    lay = shape.layout
    share = basis.core_share
    weight = [shape.stage_flops_per_token(r) for r in range(lay.pp)]
    if basis.pipeline_stages_s() is None:
        step = busiest_s * shape.pipeline_fill
        if share < 1:  # the fill and drain at the shared pace, the stages' mean work at least
            step = max(step * share, busiest_s * sum(weight) / len(weight) / weight[shape.busiest])
        return _bubble_parts(step, busiest_s)
    from perfkit.optimizer.pipesim import split, step_seconds

    m = lay.microbatches
    if lay.stages_per_rank > 1:
        weight = [shape.virtual_stage_flops_per_token(s) for s in range(lay.n_stages)]
    chunks = [busiest_s / m * w / shape.stage_flops_per_token(shape.busiest) for w in weight]
    latency = basis.pipeline_latency_s(lay.micro_batch, shape.act_bytes)
    fwd, bwd = split(chunks)
    schedule = shape.cfg.parallel.pp_schedule
    v = lay.stages_per_rank
    step = step_seconds(schedule, fwd, bwd, m, latency, share=share, stages_per_rank=v)
    parts = _bubble_parts(step, busiest_s)
    receive = basis.pipeline_late_receive_s()
    late = step_seconds(schedule, fwd, bwd, m, latency, receive, share, v) - step
    if late > 0:
        parts[LATE_RECEIVES] = late
    return parts


def _bubble_parts(step: float, busiest_s: float) -> dict[str, float]:
    if step < busiest_s:
        return {"pipeline bubble": 0.0, CORES_LENT: step - busiest_s}
    return {"pipeline bubble": step - busiest_s}


def with_stalls(basis: Basis, parts: dict[str, float]) -> float:
    """The step of these parts with the basis's stalls (its mean step over its median) added as a
    part of their own."""
    typical = sum(parts.values())
    if basis.median_step_s > 0 and basis.step_s != basis.median_step_s:
        parts["stalls (mean over median step)"] = typical * (basis.step_s / basis.median_step_s - 1)
    return sum(parts.values())


def describe(cfg: TrainConfig, lay: Layout) -> str:
    """A short name for a layout: ``dp2 tp2``, ``dp4 zero3``, ``pp2 dp2 1f1b mb4``."""
    parts = [f"{k}{v}" for k, v in (("pp", lay.pp), ("dp", lay.dp), ("tp", lay.tp)) if v > 1] or ["1 rank"]
    if cfg.parallel.zero:
        parts.append(f"zero{cfg.parallel.zero}")
    if cfg.parallel.sequence_parallel:
        parts.append("sp")
    if lay.pp > 1:
        parts.append(cfg.parallel.pp_schedule)
        if cfg.parallel.microbatches:
            parts.append(f"mb{cfg.parallel.microbatches}")
    return " ".join(parts)


def whatif_lines(
    basis: Basis,
    overrides: list[str],
    world_size: int,
    replayer: Callable[[TrainConfig, int], Prediction] | str | None = None,
) -> list[str]:
    """``perfkit whatif``: the basis as measured and as modelled, and the change, part by part;
    with ``replayer`` (``replay.LayoutReplay.predict``) the change replayed on the basis's traced
    steps too, or (a string) why it cannot be."""
    base_cfg = config_from_dict(basis.config)
    cfg = config_from_dict(basis.config, overrides)
    if cfg.device != base_cfg.device:
        raise ConfigError(
            f"whatif models layouts on the basis's own hardware ({base_cfg.device}); for device={cfg.device}, "
            f"profile a run there and ask whatif of that run"
        )
    lay = resolve_layout(cfg, world_size)
    refusal = basis.refusal()
    if refusal:
        raise RunDirError(f"no prediction: {refusal}")
    before = predict(basis, base_cfg, basis.world_size)
    after = predict(basis, cfg, world_size)
    mib = 2**20
    name = f"{describe(base_cfg, basis.shape.layout)} on {basis.world_size} rank(s)"
    change = " ".join(f"--set {o}" for o in overrides) or "no change"
    lines = [
        f"perfkit whatif: {basis.run} ({name}) with {change} ({describe(cfg, lay)} on {world_size} rank(s))",
        "",
        f"{'':<34}{'measured':>10}{'modelled':>10}{'changed':>10}   ratio  ±ms",
        f"{'time per step (ms)':<34}{basis.step_s * 1e3:>10.1f}{before.step_s * 1e3:>10.1f}"
        f"{after.step_s * 1e3:>10.1f}   {after.step_s / before.step_s:.2f}x  ±{after.uncertainty_s * 1e3:.2g}",
    ]
    if callable(replayer):
        again = replayer(cfg, world_size)
        lines.append(
            f"{'  replayed (its traced steps)':<34}{'':>10}{basis.step_s * 1e3:>10.1f}{again.step_s * 1e3:>10.1f}"
            f"   {again.step_s / basis.step_s:.2f}x  ±{again.uncertainty_s * 1e3:.2g}"
        )
    if after.peak_bytes is not None and before.peak_bytes is not None and basis.peak_bytes:
        lines.append(
            f"{'peak memory a rank (MiB)':<34}{basis.peak_bytes / mib:>10,.0f}{before.peak_bytes / mib:>10,.0f}"
            f"{after.peak_bytes / mib:>10,.0f}   {after.peak_bytes / before.peak_bytes:.2f}x"
        )
    lines += ["", "time per step by part (ms)"]
    for key in dict.fromkeys([*before.time_parts, *after.time_parts]):
        lines.append(
            f"  {key:<32}{'':>10}{before.time_parts.get(key, 0) * 1e3:>10.1f}{after.time_parts.get(key, 0) * 1e3:>10.1f}"
        )
    if after.peak_bytes is not None:
        lines += ["", "peak memory a rank by part (MiB)"]
        for key in dict.fromkeys([*before.memory_parts, *after.memory_parts]):
            lines.append(
                f"  {key:<32}{'':>10}{before.memory_parts.get(key, 0) / mib:>10.1f}"
                f"{after.memory_parts.get(key, 0) / mib:>10.1f}"
            )
    rate = basis.shape.flops / basis.compute_s / 1e9 if basis.compute_s else 0.0
    source = (
        "its whole model's forward + backward measured plainly; DDP the rest"
        if basis.ddp_step_s is not None
        else "forward + backward less modelled collectives"
    )
    lines += [
        "",
        f"basis: compute at {rate:.2f} GFLOP/s a rank ({source}); "
        f"collectives alpha {basis.alpha_s * 1e3:.3f} ms + bytes at {basis.beta_bytes_per_s / 1e9:.2f} GB/s "
        f"bus bandwidth, {basis.wait_s * 1e3:.2f} ms wait a blocking call ({basis.comm_basis}); outside the model {basis.outside_s * 1e3:.1f} ms as measured",
    ]
    measured = [
        f"{what} {value * 1e3:.2f} ms"
        for what, value in (
            ("the whole model plainly, a microbatch", basis.model_plain_s),
            ("DDP's step beyond it (the basis's forward and backward)", basis.ddp_step_s),
            ("a microbatch of a block and the ends", basis.chunk_s),
            ("a checkpointed block", basis.checkpoint_block_s),
            ("a tensor-parallel module (DTensor)", basis.tp_module_s),
            ("an FSDP2 block", basis.fsdp_block_s),
            ("its root", basis.fsdp_ends_s),
            ("an FSDP2 block kept gathered (ZeRO-2)", basis.fsdp_keep_block_s),
            ("its root", basis.fsdp_keep_ends_s),
            ("an FSDP2 unit", basis.fsdp_unit_s),
            ("a DTensor parameter's optimizer step", basis.dtensor_param_s),
            ("ZeRO-1's step a block", basis.zero1_block_s),
            ("ZeRO-1's step for the ends", basis.zero1_ends_s),
            ("a tensor-parallel block", basis.tp_block_s),
            ("its ends", basis.tp_ends_s),
            ("a sequence-parallel block", basis.sp_block_s),
            ("its ends", basis.sp_ends_s),
            ("a pipeline stage's microbatch (its schedule's machinery)", basis.pipeline_machinery_s()),
            ("a receive posted late, its sender computing", basis.pipeline_late_receive_s() or None),
            ("a looped stage's microbatch (interleaved)", basis.pipeline_looped_chunk_s()),
        )
        if value is not None
    ]
    if measured:
        lines.append("measured after the basis's steps, beyond FLOPs: " + ", ".join(measured))
    if basis.base_bytes is not None:
        lines.append(
            f"memory: {basis.base_bytes / mib:,.0f} MiB of the measured peak is libraries and buffers, the same in every layout"
        )
    lines.append(
        f"measured: the median step after the first {WARMUP} (warm-up) steps, a rank's then across ranks; "
        "modelled: the basis as the model sees it; changed: with the change"
    )
    if callable(replayer):
        lines.append(
            "replayed: the basis's traced steps with the layout's share of the work and its cost of the basis's "
            "collectives, plus what the trace cannot hold (new collectives, the bubble, the measured costs) as modelled"
        )
    lines += [f"note: {n}" for n in [*basis.notes, *after.notes]]
    if isinstance(replayer, str):
        lines.append(f"note: not replayed: {replayer}")
    return lines


def predict_overrides(basis: Basis, config: str, overrides: Sequence[str], world_size: int) -> Prediction:
    return predict(basis, load_config(config, list(overrides)), world_size)
