"""``perfkit optimize``: a closed loop that applies the remedies of a run's findings to the reference
trainer and keeps what measurably helps, until nothing is left to try.

The budget goes where the gains are: every remedy is screened before any is refined.

Each round:

1. A profiled run of the configuration so far (the first: given, or made now), and its analysis.
2. **Screen.** Each finding whose remedy has a trainer change becomes a trial; each trial's first
   change (the remedy's own) runs against the configuration so far, all of them in one interleaved
   group (``perfkit.optimizer.trials``): a few pairs each, then more pairs for the undecided ones,
   the most promising first, while the budget lasts. A change passes when the 95% interval of its
   step-time ratio is wholly past ``min_gain`` and the loss is not worse. The plan (remedies, runs,
   minutes) is said first; what the budget cannot hold is not run and is said so, with its cost.
3. **Combine and confirm.** The changes that passed run together against the configuration so far,
   side by side: kept together when the combination passes and is no slower than the best of them
   alone (remedies interact: buckets matter less once checkpointing is off); else the best alone is
   kept, and the others are tried again next round.
4. Stop when a round keeps nothing, no remedy is left untried, or the budget is spent; else profile
   again: the next bottleneck gets its own findings.

Then, with the budget left, **refine**: the second-order choices (the other bucket sizes or optimizer
implementations of a kept remedy, the other alternatives of a remedy whose first change did not
pass), against the configuration so far.

Each trial records its finding's predicted saving beside the measured one, and the predictions
learn: each measured saving rescales the estimates of the remedies still to try (by rule family),
which order the screen when the budget cannot hold every remedy. At the end, the original against
the final configuration side by side, then a profiled run of the final one, compared with the
baseline (findings that went away).
"""

from __future__ import annotations

import statistics
import tempfile
import time
import uuid
from collections.abc import Sequence
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
    expected_ms: float | None = None
    """That estimate rescaled by the savings measured so far (``learned``), when it was screened."""
    base: Candidate | None = None
    """What its first change was screened against: the configuration so far."""
    kept_index: int | None = None
    """The alternative kept (the first: passed its screen; another: a refinement beat it)."""
    skipped: str = ""

    @property
    def change(self) -> list[str]:
        """The kept alternative's change, else the remedy's first."""
        return (self.chosen or self.alternatives[0]).change

    @property
    def chosen(self) -> Alternative | None:
        return self.alternatives[self.kept_index] if self.kept_index is not None else None

    @property
    def verdict(self) -> Verdict | None:
        best = self.chosen or next((a for a in self.alternatives if a.verdict), None)
        return best.verdict if best else None

    @property
    def measured_ms(self) -> float | None:
        """Time per step its first change saved in the screen: the base's step time times one less
        the verdict's ratio (negative: it cost time)."""
        v = self.alternatives[0].verdict
        if self.base is None or not self.base.step_ms or v is None or v.ratio is None:
            return None
        return self.base.step_ms * (1 - v.ratio)

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
            "kept": self.kept_index is not None,
            "ratio": v.ratio if v else None,
            "interval": list(v.interval) if v and v.interval else None,
            "reason": v.reason if v else self.skipped,
            "predicted_ms": self.predicted_ms,
            "expected_ms": self.expected_ms,
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
    plan: list[str] = field(default_factory=list)
    """What each phase set out to run and its estimated minutes, said before it ran."""
    combinations: list[dict[str, Any]] = field(default_factory=list)
    """The changes that passed a round's screen, run together: kept together or not, and why."""
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
            "plan": self.plan,
            "combinations": self.combinations,
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
    """A profiled run of the trainer (every collector, the default kernel window) into ``out``;
    without the measurements after its steps that only the layout predictions read (the link probe
    and the layout costs: 5 of a 10 s run at tiny-cpu), which the optimizer's fixes do not use."""
    from perfkit.collectors.options import CollectOptions
    from perfkit.profile import reference_request, run_profile

    options = CollectOptions(no_probe=True)
    run, rc = run_profile(reference_request(config, overrides, nproc, out, name, options))
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
            loop = _Loop(
                config, nproc, steps, repeats, max_repeats or 4 * repeats, min_gain, Path(tmp), progress, deadline,
                _guess_run_s(analysis, steps), closing_runs=2 * repeats + (1 if verify else 0),
            )  # fmt: skip
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
                learned = _learned(opt.trials)
                for t in runnable:
                    t.expected_ms = t.predicted_ms * learned.get(_family(t.finding), learned.get("", 1.0))
                runnable.sort(
                    key=lambda t: -(t.expected_ms or 0.0)
                )  # the screen's order, if it cannot hold all
                arms = [(t, t.alternatives[0]) for t in runnable]
                confirm_s = loop.minutes(2 * repeats) * 60 if len(arms) > 1 else 0.0  # for _combine
                screened = _screen(
                    loop, opt, arms, current, f"round {number}", reserve_s=confirm_s, combine=True
                )
                trials_left -= len(screened)
                passed = [t for t, a in screened if a.verdict is not None and a.verdict.keep]
                # undecided but faster so far: tried with the others (a neighbour's noise hides 5%
                # gains alone; a combination of them stands out)
                promising = [
                    t
                    for t, a in screened
                    if a.verdict is not None and a.verdict.undecided and (a.verdict.ratio or 1.0) < 1.0
                ]
                kept = _combine(loop, opt, passed, promising, current)
                for t in kept:
                    t.kept_index = 0
                    current += t.change
                    opt.kept += t.change
                for t, a in screened:
                    # passed alone but not kept with the others, or undecided: the next round, on the
                    # configuration with what was kept, screens it again if its finding is still there
                    if (t in passed and t not in kept) or (a.verdict is not None and a.verdict.undecided):
                        tried.difference_update(tuple(a.change) for a in t.alternatives)
                if not kept:
                    r.stop = opt.stopped = "a round kept nothing"
                    break
                if not loop.time_left():
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
            current = _refine(loop, opt, current)
            if opt.kept:
                progress("original against final, side by side")
                opt.final = [
                    Candidate("original", loop.sets(list(overrides))),
                    Candidate("final", loop.sets(current)),
                ]
                interleave(config, nproc, opt.final, repeats, loop.work, progress, stop=loop.spent)
        if opt.kept and verify and loop.spent():
            opt.plan.append("final profile: not run, the --budget was spent (perfkit profile it yourself)")
        elif opt.kept and verify:
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


@dataclass
class _Loop:
    """What every measurement of one optimization shares: the runs' settings, the budget, and the
    seconds a plain run takes here (a guess until runs are timed)."""

    config: str
    nproc: int
    steps: int | None
    repeats: int
    max_pairs: int
    min_gain: float
    work: Path
    progress: Reporter
    deadline: float | None
    guess_run_s: float
    runs: int = 0
    spent_s: float = 0.0

    closing_runs: int = 0
    """Runs kept back at the end of the budget: the original against the final side by side, and
    the final profile."""

    def time_left(self) -> bool:
        return self.seconds_left() > 0

    def seconds_left(self) -> float:
        """Seconds the trials may still use: the budget less the closing runs."""
        if self.deadline is None:
            return float("inf")
        return max(0.0, self.deadline - self.closing_runs * self.run_s() - time.monotonic())

    def spent(self) -> bool:
        """The whole budget is spent (the closing runs' own stop)."""
        return self.deadline is not None and time.monotonic() >= self.deadline

    def run_s(self) -> float:
        return self.spent_s / self.runs if self.runs else self.guess_run_s

    def minutes(self, runs: int) -> float:
        return runs * self.run_s() / 60

    def sets(self, overrides: list[str]) -> list[str]:
        return _trial_sets(overrides, self.steps, self.config, self.work)

    def measure(self, group: list[Candidate], repeats: int) -> None:
        """Interleaved runs of the group, never past the budget (checked before each run)."""
        before = sum(len(c.runs) for c in group)
        t0 = time.monotonic()
        interleave(
            self.config,
            self.nproc,
            group,
            repeats,
            self.work,
            self.progress,
            stop=lambda: not self.time_left(),
        )
        made = sum(len(c.runs) for c in group) - before
        if made:
            self.runs += made
            self.spent_s += time.monotonic() - t0


def _guess_run_s(analysis: Analysis, steps: int | None) -> float:
    """A plain run's seconds before any is timed: start-up (processes, imports, the model) and the
    steps at the profiled step time."""
    step_ms = analysis.metrics.step_ms or 100.0
    return 10.0 + (steps or 20) * step_ms / 1e3


def _family(finding: str) -> str:
    """The rule family of a finding id (gpu, host, comms, ...): savings of one family scale alike."""
    from perfkit.analyzers.rules import RULES

    return next((r.family for r in RULES if r.id == finding), "")


def _learned(trials: list[Trial]) -> dict[str, float]:
    """Measured over predicted saving, the median by rule family ("" for all), from the trials
    measured so far: each new estimate is scaled by what the earlier ones turned out to be."""
    by: dict[str, list[float]] = {}
    for t in trials:
        measured = t.measured_ms
        if t.predicted_ms > 0 and measured is not None:
            ratio = max(0.0, measured) / t.predicted_ms
            by.setdefault(_family(t.finding), []).append(ratio)
            by.setdefault("", []).append(ratio)
    return {k: statistics.median(v) for k, v in by.items()}


def _screen(
    loop: _Loop,
    opt: Optimization,
    arms: list[tuple[Trial, Alternative]],
    current: list[str],
    phase: str,
    reserve_s: float = 0.0,
    combine: bool = False,
) -> list[tuple[Trial, Alternative]]:
    """Each arm against one base, the configuration so far, in one interleaved group: ``repeats``
    pairs each, then one pair at a time for the undecided arms (the most promising first) while the
    budget lasts, less ``reserve_s`` (kept for what follows: the combination's confirmation); then
    the most promising undecided arm alone, unless ``combine`` and several will be combined. The
    plan is said first; the arms the budget cannot hold are not run, and say what they would have
    cost. Returns the arms measured, each with its verdict."""
    runnable = []
    for t, alt in arms:
        clash = check(loop.config, loop.nproc, [*current, *alt.change])  # with a change kept earlier
        if clash:
            alt.verdict = Verdict(False, None, f"cannot run with the kept changes: {clash}")
            if alt is t.alternatives[0]:
                t.skipped = "cannot run with the kept changes"
        else:
            runnable.append((t, alt))
    if not runnable:
        return []
    fits = len(runnable)
    while fits > 1 and loop.minutes((1 + fits) * loop.repeats) * 60 > loop.seconds_left():
        fits -= 1
    chosen, left = runnable[:fits], runnable[fits:]
    if not loop.time_left():
        chosen, left = [], runnable
    line = (
        f"{phase}: {len(chosen)} change(s) against the configuration so far, {loop.repeats} pair(s) each "
        f"(~{loop.minutes((1 + len(chosen)) * loop.repeats):.1f} min, more pairs while undecided): "
        + " | ".join(" ".join(a.change) for _, a in chosen)
        if chosen
        else f"{phase}: nothing run"
    )
    if left:
        line += (
            f"; not run, the --budget left holds no more: {' | '.join(' '.join(a.change) for _, a in left)}"
        )
    opt.plan.append(line)
    loop.progress(line)
    for t, alt in left:
        said = f"not tried: the --budget was spent (~{loop.minutes(2 * loop.repeats):.1f} min to measure it)"
        alt.verdict = Verdict(False, None, said)
        if alt is t.alternatives[0]:
            t.skipped = said
    if not chosen:
        return []
    base = Candidate("without", loop.sets(current))
    for t, alt in chosen:
        if alt is t.alternatives[0]:
            t.base = base
        alt.variant = Candidate(" ".join(alt.change), loop.sets([*current, *alt.change]))
    loop.measure([base, *(a.variant for _, a in chosen if a.variant)], loop.repeats)

    def decide(arms: list[tuple[Trial, Alternative]]) -> None:
        for _, alt in arms:
            assert alt.variant is not None
            alt.verdict = judge(base, alt.variant, loop.min_gain)

    decide(chosen)
    # Several arms: at most twice the first pairs each, the budget left for the combination, which
    # tells small gains apart better together than each alone; one arm: up to --max-repeats.
    pairs = loop.max_pairs if len(chosen) == 1 else min(loop.max_pairs, 2 * loop.repeats)
    while loop.time_left():
        undecided = [
            (t, a)
            for t, a in chosen
            if a.verdict is not None and a.verdict.undecided and a.variant and len(a.variant.runs) < pairs
        ]
        if not undecided or loop.seconds_left() < reserve_s + loop.run_s() * (1 + len(undecided)):
            break
        undecided.sort(key=lambda ta: ta[1].verdict.ratio or 1.0)  # type: ignore[union-attr]
        loop.measure([base, *(a.variant for _, a in undecided if a.variant)], 1)
        decide(undecided)
    # Settle: the most promising arm still undecided (its gain so far past the bar) gets more pairs
    # alone, up to --max-repeats, unless several of a round's go on to be combined (``_combine``).
    promising = sorted(
        (
            (t, a)
            for t, a in chosen
            if a.verdict is not None and a.verdict.undecided and (a.verdict.ratio or 1.0) < 1 - loop.min_gain
        ),
        key=lambda ta: ta[1].verdict.ratio or 1.0,  # type: ignore[union-attr]
    )
    if promising and (len(promising) == 1 or not combine):
        t, alt = promising[0]
        while (
            alt.verdict is not None
            and alt.verdict.undecided
            and alt.variant is not None
            and len(alt.variant.runs) < loop.max_pairs
            and loop.seconds_left() >= reserve_s + 2 * loop.run_s()
        ):
            loop.measure([base, alt.variant], 1)
            decide([(t, alt)])
    for _, alt in chosen:  # an arm still undecided (out of pairs or budget) is not kept
        loop.progress(
            f"  {' '.join(alt.change)} -> {'passed' if alt.verdict and alt.verdict.keep else 'dropped'}: "
            f"{alt.verdict.reason if alt.verdict else ''}"
        )
    return chosen


def _combine(
    loop: _Loop, opt: Optimization, passed: list[Trial], promising: list[Trial], current: list[str]
) -> list[Trial]:
    """The changes that passed their screen, and those left undecided that were faster so far
    (``promising``: on a noisy machine several 5% gains do not stand out alone, and do together),
    all together against the configuration so far, side by side. Kept together when the
    combination passes and is no slower than the best that passed alone; else the best alone (or
    nothing, when none passed)."""
    group = [*passed, *promising]
    if len(group) <= 1:
        return passed

    def ratio(t: Trial) -> float:
        v = t.alternatives[0].verdict
        return v.ratio if v and v.ratio else 1.0

    best = min(passed, key=ratio) if passed else None
    fallback = [best] if best is not None else []
    changes = [c for t in group for c in t.alternatives[0].change]
    record: dict[str, Any] = {
        "changes": changes,
        "undecided_alone": [c for t in promising for c in t.alternatives[0].change],
        "best_alone": best.alternatives[0].change if best else [],
    }
    opt.combinations.append(record)
    if not loop.time_left():
        record["kept"] = bool(passed)
        record["reason"] = "not run: the --budget was spent; what passed its screen alone is kept"
        return passed
    line = f"together: {' '.join(changes)} (~{loop.minutes(2 * loop.repeats):.1f} min)"
    opt.plan.append(line)
    loop.progress(line)
    base = Candidate("without", loop.sets(current))
    together = Candidate("together", loop.sets([*current, *changes]))
    loop.measure([base, together], loop.repeats)

    def more() -> bool:
        if not loop.time_left():
            return False
        loop.measure([base, together], 1)
        return True

    verdict = judge_adaptively(base, together, loop.min_gain, more, loop.max_pairs)
    # no slower than the best alone (within half the bar: the two ratios come from different runs)
    ok = (
        verdict.keep
        and verdict.ratio is not None
        and (best is None or verdict.ratio <= ratio(best) + loop.min_gain / 2)
    )
    record.update(
        kept=ok, ratio=verdict.ratio, reason=verdict.reason, runs=together.to_json(), base=base.to_json()
    )
    if not ok and passed and (verdict.undecided or verdict.ratio is None) and not loop.time_left():
        record["kept"] = True  # the budget, not the runs, cut it short: what passed alone is kept
        record["reason"] += "; not confirmed before the --budget was spent: what passed alone is kept"
        return passed
    if not ok and best is not None:
        record["reason"] += f"; not faster than {' '.join(best.alternatives[0].change)} alone: that is kept"
    loop.progress(f"  together -> {'KEPT' if ok else 'not together'}: {record['reason']}")
    if ok:
        for t in promising:
            v = t.alternatives[0].verdict
            assert v is not None
            t.alternatives[0].verdict = Verdict(
                True, v.ratio, f"{v.reason}; kept: it passed together with the others", v.interval
            )
    return group if ok else fallback


def _refine(loop: _Loop, opt: Optimization, current: list[str]) -> list[str]:
    """The second-order choices, with the budget left, against the configuration so far: the other
    alternatives of each kept remedy (kept instead when measurably faster) and of each remedy whose
    first change did not pass (kept when it helps). Returns the configuration after."""
    kept = [t for t in opt.trials if t.kept_index == 0 and len(t.alternatives) > 1]
    dropped = [
        t
        for t in opt.trials
        if t.kept_index is None and not t.skipped and len(t.alternatives) > 1 and t.alternatives[0].verdict
    ]
    latest: dict[str, Trial] = {}  # a remedy screened in two rounds is refined once, from its latest
    for t in [*kept, *dropped]:
        if t.kept_index is not None or t.remedy not in latest or latest[t.remedy].kept_index is None:
            latest[t.remedy] = t
    kept = [t for t in kept if latest[t.remedy] is t]
    dropped = [t for t in dropped if latest[t.remedy] is t and t.remedy not in {k.remedy for k in kept}]
    arms = [(t, a) for t in [*kept, *dropped] for a in t.alternatives[1:] if a.verdict is None]
    if not arms:
        return current
    measured = _screen(loop, opt, arms, current, "refine")
    for t in [*kept, *dropped]:
        wins = [
            (i, a)
            for i, a in enumerate(t.alternatives)
            if any(a is m for _, m in measured) and a.verdict is not None and a.verdict.keep
        ]
        if not wins:
            continue
        i, alt = min(wins, key=lambda ia: ia[1].verdict.ratio or 1.0)  # type: ignore[union-attr]
        if t.kept_index is not None:  # a better choice of a kept remedy replaces it
            old = t.alternatives[t.kept_index].change
            current = [o for o in current if o not in old]
            opt.kept = [o for o in opt.kept if o not in old]
        t.kept_index = i
        current += alt.change
        opt.kept += alt.change
    return current


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
