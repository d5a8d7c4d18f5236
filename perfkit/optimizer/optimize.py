"""``perfkit optimize``: a closed loop that applies the remedies of a run's findings to the reference
trainer and keeps what measurably helps, until nothing is left to try.

Each round:

1. A profiled run of the configuration so far (the first: given, or made now), and its analysis.
2. Each finding whose remedy has a trainer change becomes a trial, largest estimated saving first:
   the configuration so far against it plus each alternative the remedy proposes (fused or foreach
   optimizer, 25/50/100 MB buckets, 2/4/8 loader workers), all in interleaved plain runs
   (``perfkit.optimizer.trials``). An alternative is kept when the 95% interval of its step-time
   ratio is wholly past ``min_gain`` and the loss is not worse; while an interval straddles the bar
   more pairs are measured. The best kept alternative builds into the configuration.
3. Stop when a round keeps nothing, no remedy is left untried, or the budget is spent; else profile
   again: the next bottleneck gets its own findings.

Each trial records its finding's predicted saving beside the measured one. At the end, the original
against the final configuration side by side, then a profiled run of the final one, compared with
the baseline (findings that went away).
"""

from __future__ import annotations

import statistics
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from perfkit.analyzers import remedies
from perfkit.analyzers.analyze import Analysis, Comparison, analyze, compare
from perfkit.errors import ConfigError, RunDirError
from perfkit.files import write_json_atomic
from perfkit.optimizer.trials import (
    Candidate,
    Verdict,
    check,
    interleave,
    judge,
    judge_adaptively,
    write_toml,
)
from perfkit.progress import Reporter, quiet
from perfkit.run import Run, RunLayout, StudyLayout
from perfkit.trainer.config import load_config

SCHEMA_VERSION = 2


@dataclass
class Alternative:
    """One candidate change of a trial, measured against the trial's base."""

    change: list[str]
    variant: Candidate | None = None
    verdict: Verdict | None = None

    def to_json(self) -> dict[str, Any]:
        v = self.verdict
        return {
            "change": self.change,
            "kept": bool(v and v.keep),
            "ratio": v.ratio if v else None,
            "interval": list(v.interval) if v and v.interval else None,
            "reason": v.reason if v else "",
            "variant": self.variant.to_json() if self.variant else None,
        }


@dataclass
class Trial:
    finding: str
    title: str
    remedy: str
    alternatives: list[Alternative]
    round: int = 1
    predicted_ms: float = 0.0
    """The finding's estimated saving per step, in the profiled run it came from."""
    base: Candidate | None = None
    skipped: str = ""

    @property
    def change(self) -> list[str]:
        """The kept alternative's change, else the remedy's first."""
        return (self.chosen or self.alternatives[0]).change

    @property
    def chosen(self) -> Alternative | None:
        """The fastest kept alternative."""
        kept = [a for a in self.alternatives if a.verdict and a.verdict.keep and a.verdict.ratio]
        return min(kept, key=lambda a: a.verdict.ratio or 1.0) if kept else None  # type: ignore[union-attr]

    @property
    def verdict(self) -> Verdict | None:
        best = self.chosen or next((a for a in self.alternatives if a.verdict), None)
        return best.verdict if best else None

    @property
    def measured_ms(self) -> float | None:
        """Time per step the chosen (or first) alternative saved: the base's step time times one
        less the verdict's ratio (negative: it cost time)."""
        alt = self.chosen or self.alternatives[0]
        if self.base is None or not self.base.step_ms or alt.verdict is None or alt.verdict.ratio is None:
            return None
        return self.base.step_ms * (1 - alt.verdict.ratio)

    def to_json(self) -> dict[str, Any]:
        v = self.verdict
        shown = (self.chosen or self.alternatives[0]).variant
        return {
            "round": self.round,
            "finding": self.finding,
            "title": self.title,
            "remedy": self.remedy,
            "change": self.change,
            "skipped": self.skipped,
            "kept": bool(v and v.keep),
            "ratio": v.ratio if v else None,
            "interval": list(v.interval) if v and v.interval else None,
            "reason": v.reason if v else self.skipped,
            "predicted_ms": self.predicted_ms,
            "measured_ms": self.measured_ms,
            "base": self.base.to_json() if self.base else None,
            "variant": shown.to_json() if shown else None,
            "alternatives": [a.to_json() for a in self.alternatives],
        }


@dataclass
class Round:
    number: int
    profiled_run: Path
    stop: str = ""


@dataclass
class Optimization:
    config: str
    nproc: int
    base_overrides: list[str]
    baseline_run: Path
    trials: list[Trial] = field(default_factory=list)
    rounds: list[Round] = field(default_factory=list)
    stopped: str = ""
    """Why the loop ended: nothing kept in a round, no remedy left, the budget spent."""
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

    @property
    def prediction_error(self) -> float | None:
        """Median relative error of the findings' predicted savings against the measured ones, over
        the trials where both exist and the measured saving is positive."""
        errors = [
            abs(t.predicted_ms - t.measured_ms) / t.measured_ms
            for t in self.trials
            if t.predicted_ms > 0 and t.measured_ms is not None and t.measured_ms > 0
        ]
        return statistics.median(errors) if errors else None

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
            "prediction_error": self.prediction_error,
            "rounds": [
                {"round": r.number, "profiled_run": str(r.profiled_run), "stop": r.stop} for r in self.rounds
            ],
            "stopped": self.stopped,
            "trials": [t.to_json() for t in self.trials],
            "final": [c.to_json() for c in self.final],
            "findings_gone": [f.title for f in self.comparison.resolved] if self.comparison else None,
            "started": self.started,
            "interrupted": self.interrupted,
        }


def baseline_from_run(run_path: Path, out: Path) -> tuple[str, int]:
    """The trainer configuration of a profiled reference-trainer run, as a TOML file in ``out``,
    and its world size."""
    run = Run.open(run_path)
    config = run.trainer_config(
        f"perfkit optimize tunes the reference trainer. For your own script, apply the fixes `perfkit analyze {run_path}` prints"
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
    analysis: Analysis,
    config: str,
    nproc: int,
    overrides: Sequence[str],
    max_trials: int,
    tried: set[tuple[str, ...]] | None = None,
    round_number: int = 1,
) -> list[Trial]:
    """One trial per distinct remedy with a trainer change among the findings, largest saving first;
    its alternatives are those of the remedy that can run here and change something. A remedy whose
    changes were all tried in an earlier round is not tried again."""
    trials: list[Trial] = []
    seen: set[tuple[str, ...]] = set(tried or ())
    current = load_config(config, list(overrides)).to_dict()
    for f in analysis.findings:
        remedy = remedies.get(f.remedy)
        changes = remedy.all_overrides()
        if not changes or all(tuple(c) in seen for c in changes):
            continue
        seen.update(tuple(c) for c in changes)
        problems = {tuple(c): check(config, nproc, [*overrides, *c]) for c in changes}
        runnable = []
        for c in changes:
            if problems[tuple(c)]:
                continue
            changed = load_config(config, [*overrides, *c]).to_dict()
            if changed != current and remedies.acts_in(c, changed):
                runnable.append(c)
        t = Trial(
            f.id,
            f.title,
            f.remedy,
            [Alternative(c) for c in (runnable or changes[:1])],
            round=round_number,
            predicted_ms=f.saving_ms_per_step,
        )
        if not runnable:
            problem = next((p for p in problems.values() if p), "")
            t.skipped = f"cannot run here: {problem}" if problem else "already set"
        trials.append(t)
    runnable_trials = [t for t in trials if not t.skipped]
    for t in runnable_trials[max_trials:]:
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
    max_repeats: int | None = None,
    min_gain: float = 0.03,
    max_trials: int = 5,
    max_rounds: int = 4,
    budget_s: float | None = None,
    verify: bool = True,
    progress: Reporter = quiet,
) -> Optimization:
    folder = StudyLayout(out, "optimize")
    out.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + budget_s if budget_s else None
    max_pairs = max_repeats or 4 * repeats

    def time_left() -> bool:
        return deadline is None or time.monotonic() < deadline

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
    current = list(overrides)
    tried: set[tuple[str, ...]] = set()
    trials_left = max_trials
    try:
        with tempfile.TemporaryDirectory(dir=out) as tmp:
            work = Path(tmp)
            profiled, round_analysis = baseline, analysis
            for number in range(1, max_rounds + 1):
                r = Round(number, profiled)
                opt.rounds.append(r)
                trials = plan(round_analysis, config, nproc, current, trials_left, tried, number)
                opt.trials += trials
                for t in trials:
                    tried.update(tuple(a.change) for a in t.alternatives)
                runnable = [t for t in trials if not t.skipped]
                if not runnable:
                    r.stop = opt.stopped = "no remedy left to try"
                    break
                kept_now = 0
                for t in runnable:
                    if not time_left():
                        t.skipped = "not tried: the --budget was spent"
                        continue
                    trials_left -= 1
                    if _run_trial(
                        t,
                        config,
                        nproc,
                        current,
                        steps,
                        repeats,
                        max_pairs,
                        min_gain,
                        work,
                        progress,
                        time_left,
                    ):
                        current += t.change
                        opt.kept += t.change
                        kept_now += 1
                if not kept_now:
                    r.stop = opt.stopped = "a round kept nothing"
                    break
                if not time_left():
                    r.stop = opt.stopped = "the --budget was spent"
                    break
                if trials_left <= 0:
                    r.stop = opt.stopped = f"--max-trials {max_trials} reached"
                    break
                if number == max_rounds:
                    r.stop = opt.stopped = f"{max_rounds} rounds"
                    break
                progress(f"round {number + 1}: profiling the configuration so far")
                profiled = profile_reference(
                    config, nproc, current, out / f"round-{number + 1}", f"round-{number + 1}"
                ).path
                round_analysis = analyze(profiled)
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


def _run_trial(
    t: Trial,
    config: str,
    nproc: int,
    current: list[str],
    steps: int | None,
    repeats: int,
    max_pairs: int,
    min_gain: float,
    work: Path,
    progress: Reporter,
    time_left: Callable[[], bool],
) -> bool:
    """Measure the trial's alternatives against its base, interleaved; more pairs while an
    interval straddles the bar. True when an alternative was kept (``t.chosen``)."""
    runnable = []
    for alt in t.alternatives:
        clash = check(config, nproc, [*current, *alt.change])  # with a change kept earlier
        if clash:
            alt.verdict = Verdict(False, None, f"cannot run with the kept changes: {clash}")
        else:
            runnable.append(alt)
    if not runnable:
        t.skipped = "cannot run with the kept changes"
        return False
    progress(f"trial {t.remedy}: " + " | ".join(" ".join(a.change) for a in runnable))
    t.base = Candidate("without", _trial_sets(current, steps, config, work))
    for alt in runnable:
        alt.variant = Candidate(
            " ".join(alt.change), _trial_sets([*current, *alt.change], steps, config, work)
        )
    group = [t.base, *(a.variant for a in runnable if a.variant)]
    interleave(config, nproc, group, repeats, work, progress)

    def more() -> bool:
        if not time_left():
            return False
        interleave(config, nproc, group, 1, work, progress)
        return True

    for alt in runnable:
        assert alt.variant is not None
        alt.verdict = judge_adaptively(t.base, alt.variant, min_gain, more, max_pairs)
        progress(
            f"  {' '.join(alt.change)} -> {'KEPT' if alt.verdict.keep else 'dropped'}: {alt.verdict.reason}"
        )
    return t.chosen is not None


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
