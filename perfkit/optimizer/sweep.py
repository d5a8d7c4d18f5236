"""``perfkit sweep``: the reference trainer over a set of parallel layouts, measured side by side.

Each layout is a short spec of parallel keys (``tp=2,pp=2``, ``zero=3``; a dotted key such as
``kernels.compile=true`` sets any config key). By default: every way to split the ranks into
pipeline × tensor × data parallel groups, and for pure data parallelism DDP and FSDP2 (zero=3).
Layouts this model or world size cannot take are listed with the reason, not run.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from perfkit.errors import ConfigError
from perfkit.optimizer.trials import Candidate, check, interleave
from perfkit.progress import Reporter, quiet
from perfkit.run import StudyLayout, write_json_atomic
from perfkit.trainer.config import load_config, resolve_layout

SCHEMA_VERSION = 1


def parse_layout(spec: str) -> list[str]:
    """``tp=2,pp=2`` -> ``["parallel.tp=2", "parallel.pp=2"]``; a dotted key is kept as it is."""
    out = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        if "=" not in item:
            raise ConfigError(f"--layout {spec!r}: {item!r} is not KEY=VALUE; write e.g. --layout tp=2,pp=2")
        key, value = item.split("=", 1)
        key = key.strip()
        out.append(f"{key if '.' in key else 'parallel.' + key}={value.strip()}")
    if not out:
        raise ConfigError(f"--layout {spec!r} is empty; write e.g. --layout tp=2,pp=2")
    return out


def default_layouts(nproc: int) -> list[str]:
    """Every pp × tp × dp split of ``nproc`` ranks; with dp > 1 and no pp, DDP and FSDP2 both."""
    specs = []
    for pp in (d for d in range(1, nproc + 1) if nproc % d == 0):
        for tp in (d for d in range(1, nproc // pp + 1) if (nproc // pp) % d == 0):
            dp = nproc // (pp * tp)
            base = f"pp={pp},tp={tp}"
            specs.append(base)
            if dp > 1 and pp == 1:
                specs.append(base + ",zero=3")
    return specs


def label(config: str, nproc: int, overrides: Sequence[str], spec: str) -> str:
    """A short name for a layout: ``dp2 tp2``, ``dp4 zero3``, ``pp2 dp2 1f1b``, plus the non-parallel
    keys the spec sets."""
    extra = [o for o in parse_layout(spec) if not o.startswith("parallel.")]
    try:
        cfg = load_config(config, list(overrides))
        lay = resolve_layout(cfg, nproc)
    except ConfigError:
        return spec
    parts = [f"{k}{v}" for k, v in (("pp", lay.pp), ("dp", lay.dp), ("tp", lay.tp)) if v > 1] or ["1 rank"]
    if cfg.parallel.zero:
        parts.append(f"zero{cfg.parallel.zero}")
    if cfg.parallel.sequence_parallel:
        parts.append("sp")
    if lay.pp > 1:
        parts.append(cfg.parallel.pp_schedule)
    return " ".join(parts + extra)


@dataclass
class Sweep:
    config: str
    nproc: int
    base_overrides: list[str]
    repeats: int
    candidates: list[Candidate] = field(default_factory=list)
    started: float = field(default_factory=time.time)
    interrupted: bool = False

    def ranked(self) -> list[Candidate]:
        """Measured layouts, fastest first, then the failed and the skipped."""
        measured = sorted((c for c in self.candidates if c.step_ms), key=lambda c: c.step_ms or 0.0)
        return measured + [c for c in self.candidates if not c.step_ms]

    def to_json(self) -> dict[str, Any]:
        best = self.ranked()[0].step_ms if self.candidates else None
        return {
            "schema_version": SCHEMA_VERSION,
            "kind": "sweep",
            "config": self.config,
            "nproc": self.nproc,
            "overrides": self.base_overrides,
            "repeats": self.repeats,
            "started": self.started,
            "interrupted": self.interrupted,
            "candidates": [
                {**c.to_json(), "vs_best": (c.step_ms / best if c.step_ms and best else None)}
                for c in self.ranked()
            ],
        }


def run_sweep(
    config: str,
    nproc: int,
    overrides: Sequence[str],
    layouts: Sequence[str],
    repeats: int,
    out: Path,
    progress: Reporter = quiet,
) -> Sweep:
    problem = check(config, 1, [o for o in overrides if not o.startswith("parallel.")])
    if problem:
        raise ConfigError(problem)
    sweep = Sweep(config, nproc, list(overrides), repeats)
    seen: set[tuple[str, ...]] = set()
    for spec in layouts or default_layouts(nproc):
        sets = [*overrides, *parse_layout(spec)]
        key = tuple(sets)
        if key in seen:
            continue
        seen.add(key)
        c = Candidate(label(config, nproc, sets, spec), sets)
        c.skipped = check(config, nproc, sets)
        sweep.candidates.append(c)
    runnable = [c for c in sweep.candidates if not c.skipped]
    if not runnable:
        raise ConfigError(
            "none of the layouts can run with --nproc "
            f"{nproc}: " + "; ".join(f"{c.label}: {c.skipped}" for c in sweep.candidates)
        )
    out.mkdir(parents=True, exist_ok=True)
    try:
        with tempfile.TemporaryDirectory(dir=out) as work:
            interleave(config, nproc, sweep.candidates, repeats, Path(work), progress)
    except KeyboardInterrupt:
        sweep.interrupted = True  # keep what was measured
        raise
    finally:
        write_json_atomic(StudyLayout(out, "sweep").results, sweep.to_json())
    from perfkit.reports.trials import write

    write(sweep.to_json(), StudyLayout(out, "sweep").page)
    return sweep
