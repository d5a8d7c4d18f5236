"""Diagnosis rules: registered functions from facts to findings, ranked by the time they would save.

A rule is one function declared with ``@rule(id, remedy=..., reads=..., **thresholds)``:

- ``reads="trace"``: called once per rank with that rank's ``TraceFacts`` (``perfkit.analyzers.facts``);
  a finding that holds on several ranks names them all, with the worst rank's numbers as evidence.
- ``reads="run"``: called once with the ``Metrics`` (of a run's tables, or of a folder of traces:
  the cross-rank spread); only when the run has step times, unless declared ``needs_steps=False``.
- ``reads="snapshot"``: called once per CUDA allocator snapshot (a ``Snapshot``: its summary and,
  when known, the device's capacity).

It returns a ``Diagnosis`` (or None): a title, the estimated saving per step and the model behind that
estimate, the evidence, and (for a rule that declares several remedies) which one applies. The registry turns
it into a ``Finding`` (id, severity, ranks, the saving capped at the step time). Thresholds are named
in the declaration, so a reader sees every number a rule compares against in one place.

Rules live in modules by family (gpu, host, comms, inputs, memory, hangs, ...): every module here is
loaded. Adding a rule is one function in one of them, and its test; a new family is a new module,
which may register its own remedy (``perfkit.analyzers.remedies.register``) before its rules.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from perfkit.analyzers.facts import TraceFacts
from perfkit.analyzers.metrics import Metrics

Reads = Literal["trace", "run", "snapshot"]


@dataclass
class Snapshot:
    """One CUDA allocator snapshot's summary (``perfkit.analyzers.memory``), for the snapshot rules."""

    name: str
    rank: int
    summary: dict[str, Any]
    capacity_bytes: int | None = None
    """The device's memory, when the run or a trace says it."""


Thresholds = dict[str, float]


@dataclass(kw_only=True)
class Diagnosis:
    """What a rule found, before the registry makes it a Finding."""

    title: str
    saving_ms: float
    """Estimated time saved per step if the remedy is applied."""
    estimate: str
    """The model behind the saving, in words ("GPU idle while the CPU launches kernels")."""
    evidence: dict[str, Any]
    remedy: str = ""
    """Which of its rule's declared remedies applies; only a rule that declares several chooses."""
    ranks: list[int] = field(default_factory=list)
    severity: str | None = None
    """Set only where time saved does not measure it (a hang stops the job): else from the saving."""


@dataclass(kw_only=True)
class Finding:
    id: str
    title: str
    severity: str
    """critical (the job stops: a hang, a failure), high (saves >= 10% of the step), medium (>= 3%)
    or low."""
    evidence: dict[str, Any]
    ranks: list[int]
    saving_ms_per_step: float
    estimate: str
    remedy: str
    """The id of a remedy in perfkit.analyzers.remedies."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Rule:
    id: str
    """The id of the findings it makes."""
    reads: Reads
    family: str
    thresholds: Thresholds
    fn: Callable[[Any, Thresholds], Diagnosis | None]
    needs_steps: bool = True
    """A run rule that needs step times (most); a hang or crash has none to speak of."""
    remedies: tuple[str, ...] = ()
    """The remedy ids its findings may name (perfkit.analyzers.remedies), checked at registration."""


RULES: list[Rule] = []


def rule(
    id: str, *, remedy: str | tuple[str, ...], reads: Reads, needs_steps: bool = True, **thresholds: float
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a rule: its finding id, the remedy (or remedies, one chosen per finding) it names,
    what it reads, and its named thresholds. A remedy id not in the registry fails here, at import."""
    from perfkit.analyzers import remedies as registry

    names = (remedy,) if isinstance(remedy, str) else tuple(remedy)
    unknown = [n for n in names if n not in registry.REMEDIES]
    if not names or unknown:
        raise ValueError(f"rule {id!r} names unknown remedy(ies) {unknown or names}; register them first")

    def register(fn: Callable[..., Any]) -> Callable[..., Any]:
        if any(r.id == id and r.reads == reads for r in RULES):
            raise ValueError(f"rule {id!r} reading {reads} is registered twice")
        family = fn.__module__.rsplit(".", 1)[-1]
        RULES.append(Rule(id, reads, family, dict(thresholds), fn, needs_steps, names))
        return fn

    return register


def severity(saving_ms: float, step_ms: float | None) -> str:
    share = saving_ms / step_ms if step_ms else 0.0
    return "high" if share >= 0.10 else "medium" if share >= 0.03 else "low"


def _finding(r: Rule, d: Diagnosis, step_ms: float | None, ranks: list[int]) -> Finding:
    remedy = d.remedy or (r.remedies[0] if len(r.remedies) == 1 else "")
    if remedy not in r.remedies:
        raise ValueError(
            f"rule {r.id!r} named remedy {d.remedy!r}, not one it declares ({', '.join(r.remedies)})"
        )
    saving = min(d.saving_ms, step_ms) if step_ms else d.saving_ms  # never more than the step
    return Finding(
        id=r.id,
        title=d.title,
        severity=d.severity or severity(saving, step_ms),
        evidence=d.evidence,
        ranks=ranks,
        saving_ms_per_step=round(max(0.0, saving), 3),
        estimate=d.estimate,
        remedy=remedy,
    )


def evaluate(
    trace_facts: list[TraceFacts], metrics: Metrics | None, snapshots: list[Snapshot] | None = None
) -> list[Finding]:
    """Every registered rule over every rank's trace facts, the run's metrics and the allocator
    snapshots, merged and ranked."""
    out: list[Finding] = []
    step_ms = metrics.step_ms if metrics is not None else None
    if step_ms is None and trace_facts:  # a folder of traces: their steps are the reference
        step_ms = sorted(f.step_ms for f in trace_facts)[len(trace_facts) // 2]
    for f in trace_facts:  # what the run's own config says it used comes before what the trace suggests
        f.config = metrics.config if metrics is not None else {}
    for r in RULES:
        if r.reads == "trace":
            found = []
            for f in trace_facts:
                d = r.fn(f, r.thresholds)
                if d is not None:
                    found.append(_finding(r, d, f.step_ms, [f.rank]))
            if found:
                worst = max(found, key=lambda x: x.saving_ms_per_step)
                worst.ranks = sorted(rank for x in found for rank in x.ranks)
                out.append(worst)
        elif r.reads == "snapshot":
            found = [_finding(r, d, None, [s.rank]) for s in snapshots or [] if (d := r.fn(s, r.thresholds))]
            if found:
                found[0].ranks = sorted({rank for x in found for rank in x.ranks})
                out.append(found[0])
        elif metrics is not None and (metrics.step_ms or not r.needs_steps):
            d = r.fn(metrics, r.thresholds)
            if d is not None:
                out.append(_finding(r, d, step_ms, d.ranks))
    return rank(out)


def rank(findings: list[Finding]) -> list[Finding]:
    """Merge duplicates (the same id from tables and traces: keep the larger saving), then rank."""
    best: dict[str, Finding] = {}
    for f in findings:
        if f.id not in best or f.saving_ms_per_step > best[f.id].saving_ms_per_step:
            if f.id in best:
                f.ranks = sorted(set(f.ranks) | set(best[f.id].ranks))
            best[f.id] = f
    order = {"critical": 0, "high": 1, "medium": 2, "low": 3}
    return sorted(best.values(), key=lambda f: (order[f.severity], -f.saving_ms_per_step))


# The families register their rules (and any remedy of their own) on import: every module here.
def _load_families() -> None:
    import importlib
    import pkgutil

    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        importlib.import_module(f"{__name__}.{info.name}")


_load_families()

__all__ = ["RULES", "Diagnosis", "Finding", "Rule", "Snapshot", "evaluate"]
