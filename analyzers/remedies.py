"""The remedy registry: what each fix a finding names (by id) changes, in two dialects.

- ``trainer``: the ``--set`` overrides of the bundled trainer that apply it (empty where the trainer
  has no switch for it). ``perfkit optimize`` applies these; a test checks that every key exists in
  the trainer's configuration tree and that its value validates.
- ``script``: the same fix for any other training script, as the code or environment change to
  make (``DataLoader(num_workers=...)``, ``AdamW(fused=True)``, ...).
- ``frameworks``: the same fix in the terms of a training framework that drives the loop (perfkit
  saw it on the optimizer step's stack): Hugging Face ``TrainingArguments`` fields, Lightning
  ``Trainer`` arguments, Accelerate's ``Accelerator``. A framework not named here gets ``script``.

A finding names its remedy's id and nothing else (each rule declares the ids it may name, checked
when it registers); the CLI summary, the report and the optimizer read the change from here, in the
dialect that fits the run. Beside the rules, torch- and trainer-free: the reports read it without
reaching up into the optimizer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from perfkit.errors import ConfigError


@dataclass(frozen=True, kw_only=True)
class Remedy:
    id: str
    description: str
    """What the fix does, in a sentence."""
    trainer: dict[str, Any] = field(default_factory=dict)
    """Config overrides of the bundled trainer (``--set key=value``); empty: no switch."""
    script: str = ""
    """The change to make in any other training script (code or environment)."""
    alternatives: tuple[dict[str, Any], ...] = ()
    """Other trainer changes for the same fix, measured beside ``trainer`` (the best is kept)."""
    site: str = ""
    """The call in a user's script the change goes to (``dataloader``, ``optimizer``), when perfkit
    saw where the script makes it."""
    script_at: Callable[[dict[str, Any]], str] | None = None
    """``script`` worded for what perfkit saw at that call (the script's own optimizer class)."""
    frameworks: dict[str, str] = field(default_factory=dict)
    """The change in a framework's own terms, by framework (``transformers``, ``lightning``,
    ``accelerate``; ``perfkit.frames.FRAMEWORKS``)."""

    def script_for(self, site: dict[str, Any] | None) -> str:
        """The script change, in the terms of the call the script makes where perfkit saw it."""
        if site and self.script_at is not None:
            return self.script_at(site) or self.script
        return self.script

    def overrides(self) -> list[str]:
        """The trainer change as ``--set`` arguments read it: ``["kernels.compile=true"]``."""
        return [as_override(k, v) for k, v in self.trainer.items()]

    def all_overrides(self) -> list[list[str]]:
        """The trainer change and each alternative, as ``--set`` arguments."""
        if not self.trainer:
            return []
        return [self.overrides(), *([as_override(k, v) for k, v in alt.items()] for alt in self.alternatives)]


def as_override(key: str, value: Any) -> str:
    """``key=value`` in the form ``--set`` reads (booleans as true/false)."""
    text = ("true" if value else "false") if isinstance(value, bool) else str(value)
    return f"{key}={text}"


# Trainer keys that act only in some layouts: a change of one elsewhere would measure nothing.
_ACTS_WHEN: dict[str, Callable[[dict[str, Any]], bool]] = {
    "overlap.bucket_cap_mb": lambda c: c["parallel"]["zero"] < 2,  # DDP's buckets
    "overlap.gradient_as_bucket_view": lambda c: c["parallel"]["zero"] < 2,
    "overlap.fsdp_prefetch": lambda c: c["parallel"]["zero"] >= 2,  # FSDP2's blocks
    "parallel.pp_schedule": lambda c: c["parallel"]["pp"] > 1,
    "parallel.microbatches": lambda c: c["parallel"]["pp"] > 1,
    "parallel.sequence_parallel": lambda c: c["parallel"]["tp"] > 1,
    # CUDA graphs and kernel search: GPU modes (on CPU they compile for longer and run the same)
    "kernels.compile_mode": lambda c: c["kernels"]["compile"] and c["device"] != "cpu",
}


def acts_in(change: list[str], config: dict[str, Any]) -> bool:
    """Whether every key of a ``--set`` change acts in a configuration (``TrainConfig.to_dict()``
    with the change applied): FSDP prefetch does nothing under DDP, bucket sizes nothing under FSDP."""
    return all(_ACTS_WHEN.get(item.split("=", 1)[0], lambda c: True)(config) for item in change)


REMEDIES: dict[str, Remedy] = {}


def register(remedy: Remedy) -> Remedy:
    if remedy.id in REMEDIES:
        raise ValueError(f"remedy {remedy.id!r} is registered twice")
    REMEDIES[remedy.id] = remedy
    return remedy


def get(remedy_id: str) -> Remedy:
    """The remedy of that id; an unknown id names the known ones."""
    try:
        return REMEDIES[remedy_id]
    except KeyError:
        raise ConfigError(f"unknown remedy {remedy_id!r}; known: {', '.join(sorted(REMEDIES))}") from None


# torch.optim's classes with a fused implementation (torch 2.4 and later), for runs recorded before
# the call site said whether the script's class takes ``fused``.
_FUSED = {"Adam", "AdamW", "SGD", "Adagrad"}


def _fused_optimizer(site: dict[str, Any]) -> str:
    """The fused change for the optimizer class the script builds: its own class where it has a fused
    (or else a foreach) implementation; AdamW's fused one where it has neither."""
    name, module = site.get("type"), site.get("module") or "torch.optim"
    if not name:
        return ""
    where = f"torch.optim.{name}" if module.startswith("torch.optim") else f"{module}.{name}"
    if site.get("can_fuse", name in _FUSED and module.startswith("torch.optim")):
        return f"{where}(model.parameters(), ..., fused=True)"
    if site.get("can_foreach"):
        return f"{where}(model.parameters(), ..., foreach=True)  (it has no fused implementation)"
    return f"torch.optim.AdamW(model.parameters(), ..., fused=True)  (in place of {name}, which has no fused implementation)"


def _more_workers(site: dict[str, Any]) -> str:
    """A script that already runs 4 workers or more is told twice as many, not 4."""
    now = site.get("num_workers")
    if not isinstance(now, int) or now < 4:
        return ""
    return f"DataLoader(..., num_workers={2 * now} (it has {now}), pin_memory=True, persistent_workers=True, prefetch_factor=4)"


_BUCKETS = {
    "transformers": "TrainingArguments(..., ddp_bucket_cap_mb=25)",
    "lightning": "Trainer(..., strategy=DDPStrategy(bucket_cap_mb=25))",
    "accelerate": "Accelerator(kwargs_handlers=[DistributedDataParallelKwargs(bucket_cap_mb=25)])",
}


def _aimed_sync(site: dict[str, Any]) -> str:
    """The sync fix aimed at the line that reads tensors back most often (perfkit counted them)."""
    n, lib, user = site.get("per_step"), site.get("library"), site.get("user_at")
    if lib and user:  # a library handed tensors where it wants Python numbers (numpy indexing)
        return (
            f"{n:g} host reads a step where {lib} is handed tensors that it turns into Python numbers, "
            f"at {user}: convert them once (idx.tolist()) or make them on the host (numpy, random)"
        )
    if lib:
        return f"{n:g} host reads a step inside {lib}: the setting of {lib} that reads every step (logging, metrics)"
    return f"read it every N steps (if step % 10 == 0: print(loss.item())): {n:g} host reads a step there"


# ---- tuned kernels -----------------------------------------------------------------------------
register(
    Remedy(
        id="compile",
        description="Fuse kernels with torch.compile (or CUDA graphs); a larger micro-batch also gives "
        "each launch more work.",
        trainer={"kernels.compile": True},
        alternatives=(
            {"kernels.compile": True, "kernels.compile_mode": "reduce-overhead"},
            {"kernels.compile": True, "kernels.compile_mode": "max-autotune"},
        ),
        script="model = torch.compile(model)  (mode='reduce-overhead' adds CUDA graphs; or capture the "
        "step in CUDA graphs)",
        frameworks={
            "transformers": "TrainingArguments(..., torch_compile=True)  (--torch_compile)",
            "lightning": "trainer.fit(torch.compile(model), ...)  (compile the LightningModule before fit)",
            "accelerate": "Accelerator(dynamo_backend='inductor')  (or accelerate launch --dynamo_backend inductor)",
        },
    )
)
register(
    Remedy(
        id="cuda_graphs",
        description="The step is compiled and still launch-bound: replay it as CUDA graphs (one launch for "
        "many kernels), or give each launch more work with a larger micro-batch.",
        trainer={"kernels.compile": True, "kernels.compile_mode": "reduce-overhead"},
        script="model = torch.compile(model, mode='reduce-overhead')  (CUDA graphs; static shapes), or a "
        "larger micro-batch per launch",
        frameworks={
            "transformers": "TrainingArguments(..., torch_compile=True, torch_compile_mode='reduce-overhead')",
            "lightning": "trainer.fit(torch.compile(model, mode='reduce-overhead'), ...)",
            "accelerate": "Accelerator(dynamo_plugin=TorchDynamoPlugin(backend='inductor', mode='reduce-overhead'))",
        },
    )
)
register(
    Remedy(
        id="larger_microbatch",
        description="The step already replays CUDA graphs and the GPU still waits for launches: give each "
        "launch more work (a larger micro-batch, fewer gradient-accumulation steps).",
        script="a larger micro-batch per step (and fewer gradient-accumulation steps for the same global batch)",
    )
)
register(
    Remedy(
        id="bf16",
        description="Run matrix multiplies in bf16 autocast (or at least TF32) on tensor cores.",
        trainer={"kernels.precision": "bf16"},
        script="with torch.autocast('cuda', dtype=torch.bfloat16): loss = model(batch)  "
        "(or torch.backends.cuda.matmul.allow_tf32 = True)",
        frameworks={
            "transformers": "TrainingArguments(..., bf16=True)  (--bf16; or tf32=True)",
            "lightning": "Trainer(..., precision='bf16-mixed')",
            "accelerate": "Accelerator(mixed_precision='bf16')",
        },
    )
)
register(
    Remedy(
        id="sdpa",
        description="Use scaled_dot_product_attention (flash / memory-efficient kernels).",
        trainer={"kernels.attention": "sdpa"},
        script="y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)",
        frameworks={
            "transformers": "from_pretrained(..., attn_implementation='sdpa')  (or 'flash_attention_2')"
        },
    )
)
register(
    Remedy(
        id="fused_optimizer",
        description="Update all parameters in one fused optimizer kernel.",
        trainer={"kernels.optimizer_impl": "fused"},
        alternatives=({"kernels.optimizer_impl": "foreach"},),  # foreach is the faster one on CPU
        script="torch.optim.AdamW(model.parameters(), ..., fused=True)",
        site="optimizer",
        script_at=_fused_optimizer,
        frameworks={
            "transformers": "TrainingArguments(..., optim='adamw_torch_fused')  (--optim adamw_torch_fused)"
        },
    )
)
register(
    Remedy(
        id="activation_checkpointing",
        description="Recompute activations in backward instead of keeping them; or a smaller micro-batch, "
        "or let the allocator grow segments (PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True).",
        trainer={"kernels.activation_checkpointing": True},
        script="torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False) around each block; "
        "or PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True",
        frameworks={"transformers": "TrainingArguments(..., gradient_checkpointing=True)"},
    )
)
register(
    Remedy(
        id="no_activation_checkpointing",
        description="Keep activations instead of recomputing them in backward: memory allows it.",
        trainer={"kernels.activation_checkpointing": False},
        script="call the blocks directly, without torch.utils.checkpoint.checkpoint (or checkpoint fewer of them)",
        frameworks={"transformers": "TrainingArguments(..., gradient_checkpointing=False)"},
    )
)
register(
    Remedy(
        id="expandable_segments",
        description="Let the CUDA allocator grow segments instead of splitting fixed ones: no stranded "
        "free blocks, fewer cache flushes.",
        script="PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True in the job's environment",
    )
)
register(
    Remedy(
        id="pipeline_microbatches",
        description="Split each step into more pipeline microbatches (or give each rank two stages, "
        "interleaved 1F1B): the fill and drain become a smaller share of the step.",
        trainer={"parallel.microbatches": 8},
        alternatives=(
            {"parallel.microbatches": 16},
            {"parallel.pp_schedule": "interleaved-1f1b", "parallel.microbatches": 8},
        ),
        script="more microbatches a step (Megatron --num-microbatches via a larger global batch or a "
        "smaller --micro-batch-size; DeepSpeed gradient_accumulation_steps), or "
        "--num-layers-per-virtual-pipeline-stage for the interleaved schedule",
    )
)
register(
    Remedy(
        id="pipeline_1f1b",
        description="Run the pipeline under 1F1B, not GPipe: each stage waits on its neighbour's "
        "batch, so no receive is posted after its send while the sender computes, and a stage keeps "
        "at most its stages' count of microbatches' activations, not every one.",
        trainer={"parallel.pp_schedule": "1f1b"},
        script="torch.distributed.pipelining.Schedule1F1B in place of ScheduleGPipe (Megatron and "
        "DeepSpeed's pipelines run 1F1B already)",
    )
)
register(
    Remedy(
        id="sequence_parallel",
        description="Sequence parallelism: shard the activations outside attention and MLP over the "
        "tensor-parallel ranks (then activation checkpointing if still short).",
        trainer={"parallel.sequence_parallel": True},
        script="parallelize_module(..., {'norm': SequenceParallel(), ...}) in the tensor-parallel plan",
    )
)

# ---- host ----------------------------------------------------------------------------------------
register(
    Remedy(
        id="avoid_sync",
        description="Avoid .item()/.cpu()/print of tensors every step; read the loss every N steps.",
        trainer={"log_every": 10},
        script="if step % 10 == 0: print(loss.item())  (no .item(), .cpu() or tensor printing on other steps)",
        site="sync",
        script_at=_aimed_sync,
        frameworks={
            "transformers": "TrainingArguments(..., logging_nan_inf_filter=False, logging_steps=50)  (the "
            "Trainer reads each micro-batch's loss back to check it for nan/inf, and the loss at each logging "
            "step)",
            "lightning": "Trainer(..., log_every_n_steps=50) and self.log(..., prog_bar=False) for per-step "
            "values (the progress bar reads them every step)",
            "accelerate": "if accelerator.sync_gradients and step % 10 == 0: accelerator.print(loss.item())",
        },
    )
)

# ---- overlap schedules ---------------------------------------------------------------------------
register(
    Remedy(
        id="overlap",
        description="Overlap gradient communication with backward: larger DDP buckets issued earlier, "
        "FSDP prefetch, or fewer collectives.",
        trainer={"overlap.bucket_cap_mb": 25},
        alternatives=(
            {"overlap.bucket_cap_mb": 25, "overlap.gradient_as_bucket_view": True},
            {"overlap.fsdp_prefetch": 1},
            {"overlap.fsdp_prefetch": 2},
            {"parallel.zero": 2},  # FSDP2: keep the gathered parameters from forward to backward
        ),
        script="DDP(model, bucket_cap_mb=25); with FSDP2, model.set_modules_to_forward_prefetch(...)",
        frameworks=dict(_BUCKETS),
    )
)
register(
    Remedy(
        id="bucket_size",
        description="Larger DDP buckets (bucket_cap_mb, default 25).",
        trainer={"overlap.bucket_cap_mb": 25},
        alternatives=({"overlap.bucket_cap_mb": 50}, {"overlap.bucket_cap_mb": 100}),
        script="DDP(model, bucket_cap_mb=25)",
        frameworks=dict(_BUCKETS),
    )
)

register(
    Remedy(
        id="fewer_small_collectives",
        description="Call these small collectives less often, or all at once: gather logged values every "
        "N steps, or pack them into one tensor and reduce it in one call.",
        trainer={"log_every": 10},  # the bundled trainer's one: the loss all-reduce of each logged step
        script="if step % 50 == 0: dist.all_reduce(torch.stack([loss, tokens, ...]))  (one call every N "
        "steps, not one a value every step)",
        frameworks={
            "transformers": "TrainingArguments(..., logging_steps=50)  (each logging step gathers the loss "
            "and more); average_tokens_across_devices=False drops the per-step token-count gather (the "
            "loss is then averaged per device)",
            "lightning": "self.log(..., sync_dist=False) for per-step values (sync_dist=True with "
            "on_epoch=True only), Trainer(..., log_every_n_steps=50)",
            "accelerate": "accelerator.gather / accelerator.reduce every N steps (if step % 50 == 0), not "
            "every step",
        },
    )
)
register(
    Remedy(
        id="no_find_unused_parameters",
        description="Build DDP without the unused-parameter search: every parameter gets a gradient, so "
        "it finds nothing (static_graph=True where some are unused on every step alike).",
        script="DistributedDataParallel(model, ..., find_unused_parameters=False)",
        frameworks={
            "transformers": "TrainingArguments(..., ddp_find_unused_parameters=False)  "
            "(--ddp_find_unused_parameters false)",
            "lightning": "Trainer(..., strategy='ddp')  (not 'ddp_find_unused_parameters_true')",
            "accelerate": "Accelerator(kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)])",
        },
    )
)

# ---- input and I/O -------------------------------------------------------------------------------
register(
    Remedy(
        id="more_workers",
        description="More DataLoader workers and a deeper prefetch.",
        trainer={"data.num_workers": 4, "data.prefetch_factor": 4},
        alternatives=(
            {"data.num_workers": 2, "data.prefetch_factor": 2},
            {"data.num_workers": 8, "data.prefetch_factor": 4},
        ),
        script="DataLoader(..., num_workers=4, pin_memory=True, persistent_workers=True, prefetch_factor=4)",
        site="dataloader",
        script_at=_more_workers,
        frameworks={
            "transformers": "TrainingArguments(..., dataloader_num_workers=4, dataloader_pin_memory=True, "
            "dataloader_persistent_workers=True, dataloader_prefetch_factor=4)"
        },
    )
)
register(
    Remedy(
        id="pin_memory",
        description="Copy batches from pinned memory, without blocking the host.",
        trainer={"data.pin_memory": True},
        script="DataLoader(..., pin_memory=True) and batch.to(device, non_blocking=True)",
        site="dataloader",
        frameworks={"transformers": "TrainingArguments(..., dataloader_pin_memory=True)"},
    )
)
register(
    Remedy(
        id="async_checkpoint",
        description="Save checkpoints asynchronously, off the training step.",
        trainer={"checkpoint.async_save": True},
        script="torch.distributed.checkpoint.async_save(state_dict, checkpoint_id=...)",
    )
)

# ---- no switch: advice ---------------------------------------------------------------------------
register(
    Remedy(
        id="straggler",
        description="Find what is slow on that rank (its host, data shard, thermal throttling in NVML); "
        "rebalance or exclude the node.",
    )
)
register(
    Remedy(
        id="cpu_contention",
        description="Give each rank its cores: find what else runs on that host (top -H; a neighbour "
        "job), keep OpenMP threads x ranks + DataLoader workers within the cores, and bind each rank "
        "to its own cores.",
        script="OMP_NUM_THREADS=<cores / ranks> torchrun ...; DataLoader(..., num_workers=<what the "
        "cores left allow>); numactl --physcpubind or taskset per rank",
    )
)
register(
    Remedy(
        id="host_oversubscribed",
        description="Run no more threads than the host has cores: OpenMP threads x ranks on the host + "
        "DataLoader workers within the cores, or fewer ranks on this host; and see what else runs there "
        "(top -H: another job, a runaway process).",
        script="OMP_NUM_THREADS=<cores / ranks on the host> torchrun ... (or torch.set_num_threads(n) in the "
        "script); DataLoader(..., num_workers=<what the cores left allow>)",
        frameworks={
            "transformers": "OMP_NUM_THREADS=<cores / ranks> torchrun ...; TrainingArguments(..., "
            "dataloader_num_workers=<what the cores left allow>)",
            "lightning": "OMP_NUM_THREADS=<cores / ranks> torchrun ...; DataLoader(..., num_workers=<what "
            "the cores left allow>); Trainer(devices=<fewer>) on a small host",
        },
    )
)
register(
    Remedy(
        id="slow_gpu",
        description="Check that GPU: clocks and throttle reasons (nvidia-smi -q -d PERFORMANCE,CLOCK), "
        "temperature and power, ECC and row remapping; drain the node if it stays slow.",
    )
)
register(
    Remedy(
        id="slow_link",
        description="Test the links of the ranks named: nccl-tests (all_reduce_perf) on their nodes, "
        "NCCL_DEBUG=INFO for the transport each ring uses, ibstat / nvidia-smi nvlink -s for errors "
        "and link width; move the job off the link or fix it.",
    )
)
register(Remedy(id="see_causes", description="See the other findings for its causes."))
register(
    Remedy(
        id="fix_hang",
        description="Make every rank reach the collective the others wait in: look at the stuck ranks' "
        "line (a rank-dependent branch, a data read that never returns, an exception swallowed).",
    )
)
register(
    Remedy(
        id="fix_desync",
        description="Every rank of a group must call the same collectives, in the same order, with the "
        "same sizes and dtypes: look for rank-dependent code paths before this call.",
    )
)
register(
    Remedy(
        id="fix_failure",
        description="Fix the exception the first failing rank raised; the others only stopped because "
        "it did.",
    )
)
