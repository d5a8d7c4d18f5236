"""``perfkit optimize``: apply the remedies of a run's findings to the reference trainer, one at a
time, and keep each only if it measurably helps.

1. Baseline: a profiled run of the trainer (given, or made now) and its analysis.
2. Each finding whose remedy is a config change becomes a trial, in the findings' order (largest
   estimated saving first): the configuration so far against it plus the change, in alternating
   plain runs (``perfkit.optimizer.trials``). The change is kept when every pair agrees it is faster and the
   median gain passes ``min_gain``, and the loss is not worse; kept changes build on each other.
3. If anything was kept: the original against the final configuration side by side (the gains of
   single trials do not simply multiply), then a profiled run of the final configuration, whose
   analysis is compared with the baseline's (findings that went away, metric deltas).
"""

from __future__ import annotations

import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from perfkit.analyzers.analyze import Analysis, Comparison, analyze, compare
from perfkit.errors import ConfigError, RunDirError
from perfkit.optimizer import remedies
from perfkit.optimizer.trials import Candidate, Verdict, check, interleave, judge, write_toml
from perfkit.run import Run, RunLayout, StudyLayout, write_json_atomic
from perfkit.trainer.config import load_config

SCHEMA_VERSION = 1


@dataclass
class Trial:
    finding: str
    title: str
    remedy: str
    change: list[str]
    base: Candidate | None = None
    variant: Candidate | None = None
    verdict: Verdict | None = None
    skipped: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "finding": self.finding,
            "title": self.title,
            "remedy": self.remedy,
            "change": self.change,
            "skipped": self.skipped,
            "kept": bool(self.verdict and self.verdict.keep),
            "ratio": self.verdict.ratio if self.verdict else None,
            "reason": self.verdict.reason if self.verdict else self.skipped,
            "base": self.base.to_json() if self.base else None,
            "variant": self.variant.to_json() if self.variant else None,
        }


@dataclass
class Optimization:
    config: str
    nproc: int
    base_overrides: list[str]
    baseline_run: Path
    trials: list[Trial] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    final: list[Candidate] = field(default_factory=list)
    """The original and the final configuration, measured side by side (when anything was kept)."""
    final_run: Path | None = None
    started: float = field(default_factory=time.time)
    interrupted: bool = False
    baseline_analysis: Analysis | None = field(default=None, repr=False)
    """The analysis the trials came from (kept for the final comparison; not in the JSON)."""
    comparison: Comparison | None = field(default=None, repr=False)
    """The final profiled run against the baseline (when one was made)."""

    @property
    def speedup(self) -> float | None:
        """Original / final step time, from the side-by-side runs."""
        if len(self.final) != 2:
            return None
        verdict = judge(self.final[0], self.final[1], min_gain=0.0)
        return 1 / verdict.ratio if verdict.ratio else None

    def to_json(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "kind": "optimize",
            "config": self.config,
            "nproc": self.nproc,
            "overrides": self.base_overrides,
            "baseline_run": str(self.baseline_run),
            "final_run": str(self.final_run) if self.final_run else None,
            "kept": self.kept,
            "speedup": self.speedup,
            "trials": [t.to_json() for t in self.trials],
            "final": [c.to_json() for c in self.final],
            "started": self.started,
            "interrupted": self.interrupted,
        }


def baseline_from_run(run_path: Path, out: Path) -> tuple[str, int]:
    """The trainer configuration of a profiled reference-trainer run, as a TOML file in ``out``,
    and its world size."""
    run = Run.open(run_path)
    config = run.manifest.config
    if not config:
        raise ConfigError(
            f"{run_path} is not a run of the bundled trainer (its manifest has no trainer config); "
            "perfkit optimize tunes the reference trainer. For your own script, apply the fixes "
            f"`perfkit analyze {run_path}` prints"
        )
    out.mkdir(parents=True, exist_ok=True)
    return str(write_toml(config, StudyLayout(out, "optimize").baseline_config)), run.manifest.world_size


def profile_reference(config: str, nproc: int, overrides: Sequence[str], out: Path, name: str) -> Run:
    """A profiled run of the trainer (every collector, the default kernel window) into ``out``."""
    from perfkit.profile import reference_request, run_profile

    run, rc = run_profile(reference_request(config, overrides, nproc, out, name))
    if rc != 0:
        raise RunDirError(f"the profiled run in {out} failed (exit code {rc}); see its output above")
    return run


def _trial_sets(cfg_sets: list[str], steps: int | None, config: str, scratch: Path) -> list[str]:
    """Overrides for a timing run: the steps asked for, and checkpoints (if any) in a folder of
    ``scratch``, never resumed (every run must train the same steps from scratch)."""
    out = list(cfg_sets)
    if steps:
        out.append(f"steps={steps}")
    if load_config(config, out).checkpoint.dir:
        out += [f"checkpoint.dir={scratch / f'ckpt-{uuid.uuid4().hex[:8]}'}", "checkpoint.resume=false"]
    return out


def plan(
    analysis: Analysis, config: str, nproc: int, overrides: Sequence[str], max_trials: int
) -> list[Trial]:
    """One trial per distinct config change among the findings' remedies, largest saving first."""
    trials: list[Trial] = []
    seen: set[tuple[str, ...]] = set()
    current = load_config(config, list(overrides)).to_dict()
    for f in analysis.findings:
        change = remedies.get(f.remedy).overrides()
        if not change or tuple(change) in seen:
            continue
        seen.add(tuple(change))
        t = Trial(f.id, f.title, f.remedy, change)
        problem = check(config, nproc, [*overrides, *change])
        if problem:
            t.skipped = f"cannot run here: {problem}"
        elif load_config(config, [*overrides, *change]).to_dict() == current:
            t.skipped = "already set"
        trials.append(t)
    runnable = [t for t in trials if not t.skipped]
    for t in runnable[max_trials:]:
        t.skipped = f"not tried: --max-trials {max_trials}"
    return trials


def run_optimize(
    *,
    config: str,
    nproc: int,
    overrides: Sequence[str],
    out: Path,
    run: Path | None = None,
    steps: int | None = 30,
    repeats: int = 3,
    min_gain: float = 0.03,
    max_trials: int = 5,
    verify: bool = True,
    progress: Callable[[str], None] = lambda _: None,
) -> Optimization:
    folder = StudyLayout(out, "optimize")
    out.mkdir(parents=True, exist_ok=True)
    if run is not None:
        config, nproc = baseline_from_run(run, out)
        overrides = []
        baseline = run
    else:
        problem = check(config, nproc, overrides)
        if problem:
            raise ConfigError(problem)
        progress("profiling the baseline")
        baseline = profile_reference(config, nproc, overrides, folder.baseline, "baseline").path
    analysis = analyze(baseline)
    opt = Optimization(config, nproc, list(overrides), baseline, baseline_analysis=analysis)
    opt.trials = plan(analysis, config, nproc, overrides, max_trials)
    current = list(overrides)
    try:
        with tempfile.TemporaryDirectory(dir=out) as tmp:
            work = Path(tmp)
            for t in opt.trials:
                if t.skipped:
                    progress(f"skip {t.remedy} ({' '.join(t.change)}): {t.skipped}")
                    continue
                clash = check(config, nproc, [*current, *t.change])  # with a change kept earlier
                if clash:
                    t.skipped = f"cannot run with the kept changes: {clash}"
                    continue
                progress(f"trial {t.remedy}: {' '.join(t.change)}")
                t.base = Candidate("without", _trial_sets(current, steps, config, work))
                t.variant = Candidate("with", _trial_sets([*current, *t.change], steps, config, work))
                interleave(config, nproc, [t.base, t.variant], repeats, work, progress)
                t.verdict = judge(t.base, t.variant, min_gain)
                progress(f"  -> {'KEPT' if t.verdict.keep else 'dropped'}: {t.verdict.reason}")
                if t.verdict.keep:
                    current += t.change
                    opt.kept += t.change
            if opt.kept:
                progress("original against final, side by side")
                opt.final = [
                    Candidate("original", _trial_sets(list(overrides), steps, config, work)),
                    Candidate("final", _trial_sets(current, steps, config, work)),
                ]
                interleave(config, nproc, opt.final, repeats, work, progress)
        if opt.kept and verify:
            progress("profiling the final configuration")
            opt.final_run = profile_reference(config, nproc, current, folder.optimized, "optimized").path
            opt.comparison = _compare_final(analysis, opt.final_run, out)
    except KeyboardInterrupt:
        opt.interrupted = True  # keep the trials measured so far
        raise
    finally:
        write_json_atomic(folder.results, opt.to_json())
    from perfkit.reports.trials import write

    write(opt.to_json(), folder.page)
    return opt


def _compare_final(before: Analysis, final_run: Path, out: Path) -> Comparison:
    """Analyze the final run, write the reports of the runs made here (a run the user gave is left
    as it is), and the final run's comparison page against the baseline."""
    from perfkit.reports.compare import write as write_compare
    from perfkit.reports.publish import write_outputs

    after = analyze(final_run)
    for result in (before, after):
        if result.source.is_relative_to(out):
            layout = RunLayout(result.source)
            write_outputs(result, json_path=layout.analysis, report_path=layout.report)
    comparison = compare(before, after)
    write_compare(comparison, RunLayout(final_run).compare_page)
    return comparison
