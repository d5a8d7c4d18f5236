"""The trainer's whole configuration: one tree of keyword-only dataclasses.

Loadable from TOML (a shipped name such as ``tiny-cpu``, or a path) and overridable with
``--set section.key=value``. This module must not import torch: the CLI validates a configuration
before any process starts.
"""

import dataclasses
import difflib
import math
import tomllib
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from perfkit.errors import ConfigError

Attention = Literal["eager", "sdpa"]
Precision = Literal["fp32", "bf16"]
OptimizerImpl = Literal["unfused", "foreach", "fused"]
PipelineSchedule = Literal["gpipe", "1f1b", "interleaved-1f1b"]
Device = Literal["auto", "cpu", "cuda"]
GcMode = Literal["default", "freeze", "manual"]
CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]


@dataclass(kw_only=True)
class ModelConfig:
    vocab_size: int = 256
    """Number of token ids; the synthetic corpus uses the same vocabulary."""
    seq_len: int = 64
    """Context length in tokens."""
    d_model: int = 48
    """Width of the residual stream."""
    n_layers: int = 4
    """Number of transformer blocks."""
    n_heads: int = 4
    """Attention heads; tensor parallelism splits them, so tp must divide this."""
    mlp_ratio: int = 4
    """Hidden width of the MLP as a multiple of d_model."""
    tie_embeddings: bool = False
    """Share the token embedding with the output head (not possible with pipeline parallelism)."""


@dataclass(kw_only=True)
class ParallelConfig:
    dp: int = 0
    """Data-parallel degree; 0 means whatever is left of the world size after tp and pp."""
    tp: int = 1
    """Tensor-parallel degree (attention heads and MLP split column/row-wise)."""
    pp: int = 1
    """Pipeline-parallel degree (ranks that hold consecutive groups of layers)."""
    zero: int = 0
    """0 plain DDP; 1 optimizer-state sharding; 2 and 3 FSDP2 without / with resharding after forward."""
    pp_schedule: PipelineSchedule = "1f1b"
    """Pipeline schedule: gpipe, 1f1b, or interleaved-1f1b (two stages per rank)."""
    microbatches: int = 0
    """Pipeline microbatches per step; 0 means one per pipeline stage."""
    sequence_parallel: bool = False
    """With tp > 1: the norms and the residual stream between blocks are sharded along the
    sequence (Megatron's sequence parallelism): all-gather + reduce-scatter instead of all-reduce."""


@dataclass(kw_only=True)
class KernelsConfig:
    attention: Attention = "sdpa"
    """eager (matmul + softmax) or sdpa (torch's scaled_dot_product_attention, fused where possible)."""
    precision: Precision = "fp32"
    """fp32, or bf16 autocast with fp32 master weights."""
    optimizer_impl: OptimizerImpl = "foreach"
    """AdamW implementation: unfused (per-parameter loop), foreach (multi-tensor) or fused."""
    compile: bool = False
    """torch.compile each transformer block."""
    compile_mode: CompileMode = "default"
    """torch.compile's mode: reduce-overhead adds CUDA graphs, max-autotune also searches kernels
    (GPU; both compile for longer)."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in backward instead of keeping them."""


@dataclass(kw_only=True)
class OverlapConfig:
    bucket_cap_mb: float = 25.0
    """DDP gradient bucket size: smaller buckets start all-reduce earlier but issue more of them."""
    gradient_as_bucket_view: bool = False
    """Let DDP's gradients alias its buckets, saving a copy and memory."""
    fsdp_prefetch: int = 0
    """FSDP2 (zero 2/3): how many next blocks each block explicitly prefetches (all-gathers early), in
    forward and backward; 0 leaves FSDP2's implicit one-block prefetch."""


@dataclass(kw_only=True)
class OptimizerConfig:
    lr: float = 3e-3
    """Peak learning rate."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay (applied to matrices only)."""
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    """Clip the global gradient norm to this; 0 disables clipping."""
    warmup_steps: int = 5
    """Linear warm-up steps, then cosine decay to min_lr_ratio × lr at the last step."""
    min_lr_ratio: float = 0.1


@dataclass(kw_only=True)
class DataConfig:
    path: str = ""
    """Token file (uint16, raw). Empty: a synthetic corpus generated once into the cache folder."""
    corpus_tokens: int = 1_000_000
    """Length of the synthetic corpus when it is generated."""
    global_batch: int = 16
    """Sequences per optimizer step across all data-parallel ranks; the layout never changes the math."""
    grad_accum: int = 1
    """Gradient-accumulation micro-steps per optimizer step (without pipeline parallelism)."""
    num_workers: int = 1
    """DataLoader worker processes per rank (0 reads in the training process)."""
    pin_memory: bool = True
    """Pin host batches so host-to-device copies can be asynchronous (GPU only)."""
    prefetch_factor: int = 2
    """Batches each worker prepares ahead."""
    read_delay_ms: float = 0.0
    """Milliseconds each batch read waits: a slow storage or a heavy transform, planted for demos
    and tests (more workers and prefetch hide it)."""


@dataclass(kw_only=True)
class CheckpointConfig:
    dir: str = ""
    """Folder for sharded checkpoints (torch.distributed.checkpoint); empty disables them."""
    every: int = 0
    """Save every this many steps (and at the last step); 0 saves only at the end when dir is set."""
    async_save: bool = False
    """Save in the background while training goes on."""
    resume: bool = True
    """Continue from the newest complete checkpoint in dir when there is one."""


@dataclass(kw_only=True)
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    kernels: KernelsConfig = field(default_factory=KernelsConfig)
    overlap: OverlapConfig = field(default_factory=OverlapConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    steps: int = 20
    """Optimizer steps to run (in total, counting those before a resume)."""
    seed: int = 0
    """Seed for the model's initialization and the data order."""
    device: Device = "auto"
    """auto (cuda when available), cpu (gloo) or cuda (NCCL, one GPU per local rank)."""
    log_every: int = 1
    """Print (and all-reduce) the loss every this many steps."""
    peak_tflops: float = 0.0
    """Peak TFLOP/s of one GPU for MFU; 0: from the GPU's name (perfkit.hardware)."""
    gc: GcMode = "default"
    """Python's garbage collector: default (automatic: a collection pauses whichever rank crosses a
    threshold, and the others wait for it at the next collective); freeze (``gc.freeze()`` once
    set-up is done: the objects alive then are never scanned again); manual (freeze, automatic
    collection off, and a young collection on every rank at the same step every ``gc_every``)."""
    gc_every: int = 50
    """With gc=manual: collect (generations 0 and 1) every this many steps, on every rank at once."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def flops_per_token(cfg: ModelConfig) -> int:
    """Training FLOPs per token: 6N + 12·L·d·T (PaLM, appendix B), with N every parameter but the
    position embedding, as nanoGPT and the H100 fixtures' capture.json count it, so MFU figures
    compare with theirs."""
    d, r = cfg.d_model, cfg.mlp_ratio
    per_layer = 4 * d * d + 4 * d + 2 * r * d * d + r * d + d + 4 * d
    embeddings = cfg.vocab_size * d * (1 if cfg.tie_embeddings else 2)
    n = cfg.n_layers * per_layer + embeddings + 2 * d
    return 6 * n + 12 * cfg.n_layers * d * cfg.seq_len


def named_configs() -> list[str]:
    """Names of the configurations shipped with perfkit."""
    folder = resources.files("perfkit.trainer") / "configs"
    return sorted(p.name.removesuffix(".toml") for p in folder.iterdir() if p.name.endswith(".toml"))


def load_config(name_or_path: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """A shipped name (``tiny-cpu``) or a TOML path, then ``section.key=value`` overrides."""
    cfg = TrainConfig()
    if name_or_path:
        _apply_mapping(cfg, _read_toml(name_or_path), "")
    _apply_overrides(cfg, overrides)
    return cfg


def _apply_overrides(cfg: TrainConfig, overrides: list[str] | tuple[str, ...]) -> None:
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r} is not KEY=VALUE; write e.g. --set parallel.tp=2")
        key, value = item.split("=", 1)
        set_key(cfg, key.strip(), value.strip())


def config_from_dict(data: dict[str, Any], overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """A configuration from its ``to_dict()`` form (as a run's manifest holds it), checked like TOML,
    then ``section.key=value`` overrides."""
    cfg = TrainConfig()
    _apply_mapping(cfg, data, "")
    _apply_overrides(cfg, overrides)
    return cfg


def _read_toml(name_or_path: str) -> dict[str, Any]:
    path = Path(name_or_path)
    if path.suffix == ".toml" or path.exists():
        if not path.is_file():
            raise ConfigError(
                f"config file {path} does not exist; give a TOML path or one of: {', '.join(named_configs())}"
            )
        text = path.read_text()
        source = str(path)
    else:
        shipped = resources.files("perfkit.trainer") / "configs" / f"{name_or_path}.toml"
        if not shipped.is_file():
            raise ConfigError(
                f"unknown config {name_or_path!r}; choose one of {', '.join(named_configs())} or a .toml path"
            )
        text = shipped.read_text()
        source = f"config {name_or_path}"
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{source} is not valid TOML: {e}") from None


def _fields(obj: Any) -> dict[str, dataclasses.Field[Any]]:
    return {f.name: f for f in dataclasses.fields(obj)}


def _unknown(key: str, known: list[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], known, n=1)
    hint = f"; did you mean {close[0]}?" if close else ""
    return ConfigError(f"unknown key {key!r}{hint} Known keys{where}: {', '.join(known)}")


def _apply_mapping(obj: Any, data: dict[str, Any], prefix: str) -> None:
    hints = typing.get_type_hints(type(obj))
    fields = _fields(obj)
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in fields:
            raise _unknown(full, list(fields), f" of {prefix.rstrip('.')}" if prefix else "")
        if dataclasses.is_dataclass(hints[key]):
            if not isinstance(value, dict):
                raise ConfigError(f"{full} is a section; write [{full}] with keys under it")
            _apply_mapping(getattr(obj, key), value, f"{full}.")
        else:
            setattr(obj, key, _coerce(full, hints[key], value))


def set_key(cfg: TrainConfig, dotted: str, raw: str) -> None:
    """Set one ``section.key`` from its text form, checking the key and the value's type."""
    obj: Any = cfg
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        fields = _fields(obj)
        hints = typing.get_type_hints(type(obj))
        where = " of " + ".".join(parts[:i]) if i else ""
        if part not in fields:
            raise _unknown(dotted, list(fields), where)
        if dataclasses.is_dataclass(hints[part]):
            if i == len(parts) - 1:
                raise ConfigError(
                    f"{dotted} is a section; set one of its keys: {', '.join(_fields(getattr(obj, part)))}"
                )
            obj = getattr(obj, part)
            continue
        if i != len(parts) - 1:
            raise ConfigError(
                f"{'.'.join(parts[: i + 1])} is a value, not a section; write --set {'.'.join(parts[: i + 1])}=VALUE"
            )
        setattr(obj, part, _coerce(dotted, hints[part], raw, from_text=True))


def _coerce(key: str, typ: Any, value: Any, from_text: bool = False) -> Any:
    if get_origin(typ) is Literal:
        choices = get_args(typ)
        if value not in choices:
            raise ConfigError(f"{key}={value!r} is not allowed; choose one of {', '.join(map(str, choices))}")
        return value
    if typ is bool:
        if isinstance(value, bool):
            return value
        if from_text and str(value).lower() in ("1", "true", "yes", "on"):
            return True
        if from_text and str(value).lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{key}={value!r} is not a boolean; write true or false")
    if typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if from_text:
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}={value!r} is not an integer")
    if typ is float:
        number: float | None = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif from_text:
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None and math.isfinite(number):
            return number
        if number is not None:  # nan, inf: every rank had crashed on them, whatif had been a traceback
            raise ConfigError(f"{key}={value!r} is not a finite number")
        raise ConfigError(f"{key}={value!r} is not a number")
    if typ is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}={value!r} is not a string; quote it in TOML")
    raise AssertionError(f"config field {key} has unsupported type {typ!r}")


@dataclass(kw_only=True, frozen=True)
class Layout:
    """The resolved parallel layout of a run on a given world size."""

    world_size: int
    dp: int
    tp: int
    pp: int
    stages_per_rank: int
    microbatches: int
    local_batch: int
    """Sequences per data-parallel rank per optimizer step."""

    @property
    def n_stages(self) -> int:
        return self.pp * self.stages_per_rank

    @property
    def micro_batch(self) -> int:
        """Sequences per forward pass on one rank (one pipeline microbatch or accumulation step)."""
        return self.local_batch // self.microbatches


def _divisors(n: int) -> str:
    ds = [str(d) for d in range(1, n + 1) if n % d == 0]
    return ", ".join(ds[:-1]) + f" or {ds[-1]}" if len(ds) > 1 else ds[0]


def resolve_layout(cfg: TrainConfig, world_size: int) -> Layout:
    """Check the configuration against the world size and return the layout, or raise a ConfigError
    whose message names the fix."""
    m, p, d = cfg.model, cfg.parallel, cfg.data
    for name, value, low in (
        ("model.vocab_size", m.vocab_size, 2),
        ("model.seq_len", m.seq_len, 1),
        ("model.d_model", m.d_model, 1),
        ("model.n_layers", m.n_layers, 1),
        ("model.n_heads", m.n_heads, 1),
        ("model.mlp_ratio", m.mlp_ratio, 1),
        ("parallel.tp", p.tp, 1),
        ("parallel.pp", p.pp, 1),
        ("parallel.dp", p.dp, 0),
        ("parallel.microbatches", p.microbatches, 0),
        ("data.global_batch", d.global_batch, 1),
        ("data.grad_accum", d.grad_accum, 1),
        ("data.num_workers", d.num_workers, 0),
        ("data.prefetch_factor", d.prefetch_factor, 1),
        ("steps", cfg.steps, 1),
        ("log_every", cfg.log_every, 1),
        ("gc_every", cfg.gc_every, 1),
        ("checkpoint.every", cfg.checkpoint.every, 0),
        ("overlap.fsdp_prefetch", cfg.overlap.fsdp_prefetch, 0),
    ):
        if value < low:
            raise ConfigError(f"{name}={value} must be at least {low}")
    if not cfg.peak_tflops >= 0:
        raise ConfigError(f"peak_tflops={cfg.peak_tflops} must be 0 (from the GPU's name) or above")
    if not cfg.overlap.bucket_cap_mb > 0:
        raise ConfigError(
            f"overlap.bucket_cap_mb={cfg.overlap.bucket_cap_mb} must be above 0 (25 is DDP's default)"
        )
    if world_size < 1:
        raise ConfigError(f"--nproc {world_size} must be at least 1")
    if m.vocab_size > 65536:
        raise ConfigError(
            f"model.vocab_size={m.vocab_size} exceeds 65536, the most a uint16 token file holds"
        )
    if m.d_model % m.n_heads:
        raise ConfigError(
            f"model.n_heads={m.n_heads} does not divide model.d_model={m.d_model}; choose {_divisors(m.d_model)}"
        )
    if m.n_heads % p.tp:
        raise ConfigError(
            f"parallel.tp={p.tp} does not divide model.n_heads={m.n_heads}; choose {_divisors(m.n_heads)}"
        )
    if p.zero not in (0, 1, 2, 3):
        raise ConfigError(
            f"parallel.zero={p.zero} is not a ZeRO stage; choose 0 (DDP), 1 (optimizer sharding), 2 or 3 (FSDP2)"
        )
    if p.dp == 0:
        if world_size % (p.tp * p.pp):
            raise ConfigError(
                f"world size {world_size} is not divisible by tp×pp={p.tp * p.pp}; "
                f"use --nproc a multiple of {p.tp * p.pp} or change parallel.tp/parallel.pp"
            )
        dp = world_size // (p.tp * p.pp)
    else:
        dp = p.dp
        if dp * p.tp * p.pp != world_size:
            raise ConfigError(
                f"parallel.dp={dp} × tp={p.tp} × pp={p.pp} = {dp * p.tp * p.pp} does not match the world size "
                f"{world_size}; use --nproc {dp * p.tp * p.pp} or set parallel.dp=0 to fill the rest"
            )
    stages_per_rank = 2 if p.pp_schedule == "interleaved-1f1b" and p.pp > 1 else 1
    n_stages = p.pp * stages_per_rank
    if n_stages > m.n_layers:
        what = f"parallel.pp={p.pp}" + (
            " with interleaved-1f1b (2 stages per rank)" if stages_per_rank == 2 else ""
        )
        raise ConfigError(
            f"{what} needs {n_stages} pipeline stages but model.n_layers={m.n_layers}; "
            f"use at most {m.n_layers // stages_per_rank} pipeline ranks or more layers"
        )
    if p.pp > 1:
        if m.tie_embeddings:
            raise ConfigError(
                "model.tie_embeddings=true cannot be split across pipeline stages; set model.tie_embeddings=false"
            )
        if d.grad_accum != 1:
            raise ConfigError(
                "data.grad_accum applies without pipeline parallelism; with parallel.pp>1 use parallel.microbatches"
            )
        microbatches = p.microbatches or n_stages
        if microbatches < n_stages:
            raise ConfigError(
                f"parallel.microbatches={microbatches} is fewer than the {n_stages} pipeline stages; "
                f"set parallel.microbatches to at least {n_stages}"
            )
        if stages_per_rank == 2 and microbatches % p.pp:
            raise ConfigError(
                f"interleaved-1f1b needs parallel.microbatches a multiple of pp={p.pp}; got {microbatches}"
            )
    else:
        microbatches = d.grad_accum
    if p.sequence_parallel and p.tp == 1:
        raise ConfigError(
            "parallel.sequence_parallel=true shards over the tensor-parallel ranks; set parallel.tp>1"
        )
    if p.sequence_parallel and m.seq_len % p.tp:
        raise ConfigError(
            f"parallel.sequence_parallel needs model.seq_len={m.seq_len} divisible by parallel.tp={p.tp}"
        )
    if p.zero == 1 and p.tp > 1:
        raise ConfigError(
            "parallel.zero=1 (ZeroRedundancyOptimizer) cannot shard tensor-parallel DTensors; use parallel.zero=2 or 3 with tp"
        )
    if d.global_batch % (dp * microbatches):
        unit = "parallel.microbatches" if p.pp > 1 else "data.grad_accum"
        raise ConfigError(
            f"data.global_batch={d.global_batch} is not divisible by dp={dp} × {unit}={microbatches}; "
            f"use a multiple of {dp * microbatches}"
        )
    return Layout(
        world_size=world_size,
        dp=dp,
        tp=p.tp,
        pp=p.pp,
        stages_per_rank=stages_per_rank,
        microbatches=microbatches,
        local_batch=d.global_batch // dp,
    )
