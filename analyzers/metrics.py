"""The structure of ``analysis.json``, declared once: every metric the analyzers produce, typed.

``Analysis.to_json()`` writes these dataclasses as JSON (``SCHEMA_VERSION`` at the top); the report,
``compare``, the CLI summary and the rules read their fields, never string keys. A section is None
when the run had nothing to compute it from (no steps table, no trace, ...). Times are in ms unless
a name says otherwise; shares are fractions (0.25), ``*_pct`` are percents.

Version 2 (this one): findings name a remedy id (see ``perfkit.analyzers.remedies``) instead of
embedding the change; metric sections typed.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

SCHEMA_VERSION = 2

if TYPE_CHECKING:
    from perfkit.analyzers.hangs import HangMetrics
    from perfkit.analyzers.watch import WatchReport


@dataclass(kw_only=True)
class RankSteps:
    rank: int
    step_ms: float
    """Median step time of this rank after the warm-up step."""
    steps: int
    phases_ms: dict[str, float] = field(default_factory=dict)
    """Median time per phase (data_wait, forward, backward, optimizer, checkpoint, ...)."""
    runq_wait_ms: float | None = None
    """Median time a step the training thread was ready to run but had no core (the cpu collector)."""


@dataclass(kw_only=True)
class StepMetrics:
    steps: int
    """The last step recorded."""
    step_time_ms: float
    """Median over every rank's steps after the warm-up."""
    step_time_p90_ms: float
    per_rank: list[RankSteps]
    phase_share: dict[str, float]
    """Each phase's share of the summed step time."""
    tokens_per_step: float | None = None
    tokens_per_s: float | None = None


@dataclass(kw_only=True)
class StragglerRank:
    rank: int
    busy_ms: float
    """Median step time less the time spent waiting for the last rank to arrive at collectives."""
    score: float
    """Fastest rank's busy time over this rank's (1.0 = as fast as the fastest)."""
    arrival_late_ms: float | None
    last_to_arrive_share: float | None
    runq_wait_ms: float | None = None
    slowest_share: float | None = None
    """Share of the steps in which this rank was the busiest: a straggler nearly always is; under
    host noise each rank is, by turns."""
    """Median time a step its training thread was ready to run but had no core (the cpu collector)."""
    extra_ms: float | None = None
    """Median over steps of its busy time beyond that step's fastest rank (0 in steps it led)."""
    wait_ms: float = 0.0
    """Median time a step it waited at collectives for the last rank to arrive."""


@dataclass(kw_only=True)
class Stragglers:
    ranks: list[StragglerRank]
    slow: list[int]
    """Ranks the others wait for because of their own work (compute, data, a sleep)."""
    host_busy: float | None = None
    """Median share of the host's cores busy during the steps (all processes; the cpu collector)."""
    host_bound: list[int] = field(default_factory=list)
    """Ranks the others wait for because their host gave their cores to something else: the run-queue
    wait explains at least half of their extra busy time."""
    stages: dict[int, int] = field(default_factory=dict)
    """A pipeline's stage of each rank that sends and receives (its place in its send/recv group's
    ranks, ascending: Megatron's, torchtitan's and the bundled trainer's order); ranks are compared
    with their own stage's only, the stages differing in work by design."""

    def fastest_peer_ms(self, rank: int) -> float:
        """The least busy time among the ranks ``rank`` is compared with (itself included)."""
        stage = self.stages.get(rank)
        return min(r.busy_ms for r in self.ranks if self.stages.get(r.rank) == stage)


@dataclass(kw_only=True)
class GpuRank:
    """One rank's GPU time per step, from its trace."""

    rank: int
    compute_ms: float
    comm_ms: float
    """Communication kernels' time: under synchronous collectives, mostly waiting for the last rank."""
    idle_ms: float
    peer_compute_ms: float = 0.0
    """The median compute of its peers: the ranks that run the same number of kernels a step (a
    pipeline's stages differ by design and are not compared with each other)."""
    peer_comm_ms: float = 0.0


@dataclass(kw_only=True)
class SlowGroup:
    name: str
    ranks: list[int] | None
    call_ms: float
    """Median time of one of its collectives (over its members' traces)."""
    typical_ms: float
    """The same for the groups of its shape (size and stride)."""
    calls_per_step: float


@dataclass(kw_only=True)
class RankSpread:
    """How the ranks of a job differ, from their traces (four ranks or more): the outliers above
    the median by a robust margin (median absolute deviation), so that noise names nobody."""

    ranks: list[GpuRank]
    median_compute_ms: float
    median_comm_ms: float
    slow_gpu: list[int]
    """Ranks whose compute kernels take longer than the others' (the others wait for them)."""
    late: list[int]
    """Ranks the others wait for with no slower compute: their collectives are short (they arrive
    last), their GPU idles before them (their host is late)."""
    slow_groups: list[SlowGroup]
    slow_link: list[int]
    """The ranks every slow group shares, when slow groups of two shapes meet in them."""


@dataclass(kw_only=True)
class CommMetrics:
    table: list[dict[str, Any]]
    """Collectives by op and message size: count, bytes, time, algorithm and bus bandwidth."""
    collectives_per_step: float
    bytes_per_step: float
    ddp_buckets_per_step: float | None = None
    ddp_bucket_bytes: float | None = None
    ddp_exposed_ms: float | None = None
    """Median time a step's DDP all-reduces still ran after the last bucket was handed over (the end
    of backward): communication the step waits for. Unknown where the ends are (NCCL: a call returns
    when its kernel is queued)."""
    ddp_gpu_ms: float | None = None
    """Median GPU time of a step's DDP all-reduces together (NCCL), overlapped or not."""
    callers: list[dict[str, Any]] = field(default_factory=list)
    """Collectives called through the Python API (the script's or its framework's own: a logging
    gather, a loss all-reduce), by caller and op: calls_per_step, bytes, blocking, ms_per_step (the
    host's time in them), transfer_ms_per_step (from the last rank's arrival)."""


@dataclass(kw_only=True)
class IoMetrics:
    data_wait_share: float | None = None
    data_wait_ms: float | None = None
    read_latency_p50_ms: float | None = None
    read_latency_p99_ms: float | None = None
    reads: int | None = None
    checkpoint_saves: int | None = None
    checkpoint_save_ms_max: float | None = None
    checkpoint_save_bytes: float | None = None


@dataclass(kw_only=True)
class MemoryMetrics:
    rss_max_bytes: float
    peak_allocated_bytes: float | None = None
    reserved_max_bytes: float | None = None
    inactive_split_max_bytes: float | None = None
    alloc_retries: int | None = None
    ooms: int | None = None
    fragmentation: float | None = None
    """Largest (reserved - allocated) over the largest reserved."""


@dataclass(kw_only=True)
class Throughput:
    flops_per_token: float
    achieved_tflops: float
    """Over all ranks."""
    peak_tflops_per_gpu: float | None = None
    mfu: float | None = None


@dataclass(kw_only=True)
class RankTrace:
    """One rank's Kineto trace."""

    trace: str
    steps_in_trace: int
    step_ms: float
    temporal_breakdown: dict[str, float]
    """compute/communication/memory/idle ``_pct`` of the span, and ``span_ns``, ``kernels``."""
    idle_attribution: dict[str, float]
    """GPU idle ns by cause: input, sync, host launch, other."""
    communication_overlap: dict[str, float]
    gemm_fp32_share: float | None = None
    recomputed_ops_per_step: float = 0.0
    """Forward-only ops run inside backward a step: activation checkpointing's recompute."""
    critical_path: PathSummary | None = None


@dataclass
class FusionCandidate:
    """A run of short kernels (CPU ops on a CPU trace) that recurs on the critical path."""

    ops: list[str]
    """Their short names, in order."""
    per_step: float
    """How often the run occurs on a step's critical path."""
    own_us: float
    """The run's own time, per occurrence."""
    between_us: float
    """What running them as one kernel would take off the path, per occurrence: the path's time
    between them (launch delays, gaps, dispatch), and on a GPU trace's host all but one op's own."""
    saving_ms: float
    """``between_us`` times ``per_step``, in ms a step."""
    inside: str = ""
    """The innermost CPU op, module or annotation all of them ran inside, where one did."""


@dataclass
class PathSummary:
    """One rank's critical path, over its profiled steps (``perfkit.analyzers.critical_path``)."""

    steps: int
    step_ms: float
    """The steps' median span (their ProfilerStep annotations)."""
    length_ms: float
    """The median step's critical path."""
    by_kind_ms: dict[str, float]
    """Mean ms a step of the path by kind: compute, communication, memory, host, launch, gpu_gap,
    input, waiting (for another rank, at a collective: from the run's tables where it has them)."""
    contributors: list[dict[str, Any]]
    """The largest: name, kind, ms a step."""
    segments: list[dict[str, Any]] = field(default_factory=list)
    """The median step's path: start_ms, end_ms (from the step's start), kind, name, lane."""
    fusion: list[FusionCandidate] = field(default_factory=list)
    fusable_ms: float = 0.0
    """What fusing every pair of short kernels (ops) back to back on the path would take off it, ms
    a step (each pair once; the candidates overlap)."""


@dataclass(kw_only=True)
class RunInfo:
    name: str
    status: str
    world_size: int
    command: list[str]
    env: dict[str, Any]
    collectors: dict[str, str]
    """Each collector by name: ok, disabled or failed."""
    notes: list[str] = field(default_factory=list)
    """What collectors that ran said of the run (the step after which the trace was written)."""


@dataclass(kw_only=True)
class Metrics:
    device: str | None = None
    """The GPU the traces name, if any."""
    run: RunInfo | None = None
    """None for a bare trace or a folder of traces."""
    config: dict[str, Any] = field(default_factory=dict)
    """The bundled trainer's resolved configuration; empty for any other script."""
    model: dict[str, Any] = field(default_factory=dict)
    """What the workload said of itself (flops_per_token, parameters, layout) in the manifest."""
    steps: StepMetrics | None = None
    stragglers: Stragglers | None = None
    comms: CommMetrics | None = None
    io: IoMetrics | None = None
    memory: MemoryMetrics | None = None
    throughput: Throughput | None = None
    peak_tflops: float | None = None
    trace: dict[int, RankTrace] = field(default_factory=dict)
    kernel_categories: dict[str, float] = field(default_factory=dict)
    """Share of GPU kernel time per category, all ranks."""
    trace_collectives: list[dict[str, Any]] = field(default_factory=list)
    memory_snapshot: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Allocator snapshot summaries by file (``rank0/memory_snapshot.pickle``)."""
    hang: HangMetrics | None = None
    """Who waits for whom when ranks hung or one failed (perfkit.analyzers.hangs)."""
    traced_ranks: list[int] = field(default_factory=list)
    """The ranks whose kernel traces were analyzed (a run may trace only some: --trace-ranks)."""
    rank_spread: RankSpread | None = None
    """Slow GPUs, late ranks and slow links, from the traces of four ranks or more."""
    watch: WatchReport | None = None
    """A watched run's anomalies, captures and their diagnoses (perfkit profile --watch)."""
    signals: dict[str, Any] = field(default_factory=dict)
    """Each collector's own metrics by its name (``Collector.fold``: a dataclass the collector
    module declares), for those that fold their rows themselves."""

    @property
    def step_ms(self) -> float | None:
        return self.steps.step_time_ms if self.steps else None

    @property
    def is_bundled_trainer(self) -> bool:
        return bool(self.config)


def check_sanity(m: Metrics) -> list[str]:
    """Take out what cannot be true before anyone reads it (a share outside 0-100%, a step time that
    is not positive, MFU above 100%) and say so: a wrong number printed with exit code 0 is worse
    than none."""
    problems = []
    for rank, t in m.trace.items():
        b = t.temporal_breakdown
        bad = [
            k
            for k, v in b.items()
            if k.endswith("_pct") and not (math.isfinite(v) and -1e-6 <= v <= 100 + 1e-6)
        ]
        if bad:
            problems.append(f"rank {rank}: GPU time breakdown impossible ({', '.join(bad)}); left out")
            t.temporal_breakdown = {}
    if m.steps is not None and not (math.isfinite(m.steps.step_time_ms) and m.steps.step_time_ms > 0):
        problems.append(f"median step time {m.steps.step_time_ms} ms is impossible; step metrics left out")
        m.steps = None
    if m.throughput is not None and m.throughput.mfu is not None and not 0 <= m.throughput.mfu <= 1:
        problems.append(
            f"MFU {m.throughput.mfu:.0%} is impossible: the declared flops_per_token or the peak TFLOP/s is "
            "wrong; MFU left out"
        )
        m.throughput.mfu = None
    return problems


def records(frame: Any) -> list[dict[str, Any]]:
    """A DataFrame's rows as dicts with string keys."""
    return [{str(k): v for k, v in row.items()} for row in frame.to_dict("records")]


def to_json(obj: Any) -> Any:
    """A metrics dataclass (or anything holding them) as plain JSON values; NaN becomes null."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_json(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): to_json(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_json(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalars
        return to_json(obj.item())
    return obj


@dataclass(kw_only=True)
class Delta:
    """One metric of two analyses side by side (``compare``)."""

    name: str
    a: float | None
    b: float | None
    unit: str
    delta: float | None
    """b / a - 1."""
    worse: bool


def _comparable(m: Metrics) -> dict[str, tuple[float | None, str, bool]]:
    """name -> (value, unit, lower is better)"""
    s, io, comms = m.steps, m.io, m.comms
    out: dict[str, tuple[float | None, str, bool]] = {
        "step time (median)": (s.step_time_ms if s else None, "ms", True),
        "step time (p90)": (s.step_time_p90_ms if s else None, "ms", True),
        "tokens/s": (s.tokens_per_s if s else None, "", False),
        "MFU": (m.throughput.mfu if m.throughput else None, "", False),
        "data wait": (
            100 * io.data_wait_share if io and io.data_wait_share is not None else None,
            "% of step",
            True,
        ),
        "collectives per step": (comms.collectives_per_step if comms else None, "", True),
    }
    for phase, share in (s.phase_share if s else {}).items():
        if phase != "data_wait":  # (the row above: it was listed twice)
            out[phase.replace("_", " ")] = (100 * share, "% of step", True)
    for rank, r in sorted(m.trace.items()):
        if r.temporal_breakdown:
            out[f"rank {rank} GPU idle"] = (r.temporal_breakdown["idle_pct"], "%", True)
    return out


def deltas(a: Metrics, b: Metrics) -> list[Delta]:
    """Every comparable metric of A and B, with B's relative change and whether it is worse."""
    ma, mb = _comparable(a), _comparable(b)
    rows = []
    for name in dict.fromkeys([*ma, *mb]):
        va, unit, lower = ma.get(name, (None, "", True))
        vb = mb.get(name, (None, unit, lower))[0]
        delta = (vb / va - 1) if (va and vb is not None) else None
        worse = delta is not None and ((delta > 0) if lower else (delta < 0))
        rows.append(Delta(name=name, a=va, b=vb, unit=unit, delta=delta, worse=worse))
    return rows


def step_change(a: Metrics, b: Metrics) -> float | None:
    """Relative change of the median step time, B against A (0.05 = 5% slower)."""
    return b.step_ms / a.step_ms - 1 if a.step_ms and b.step_ms else None
