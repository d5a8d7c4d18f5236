"""Trainer configurations measured side by side: the core of ``perfkit sweep`` and ``perfkit optimize``.

A measurement is one plain run of the reference trainer (no collectors: perfkit's own cost must not
tilt a comparison). Runs of the configurations being compared are interleaved round-robin
(A B C, A B C, ...), so the drift of a shared machine falls on all of them alike; each run's figure
is its time per step over the steps after the warm-up (first compilation, allocation, worker
start-up). Torch-free: the configurations are checked before any process starts.
"""

from __future__ import annotations

import json
import math
import re
import statistics
import subprocess
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from perfkit.errors import ConfigError, PerfkitError, RunDirError
from perfkit.launch import (
    ONE_NODE,
    Nodes,
    check_devices,
    dies_with_perfkit,
    stop_job,
    trainer_command,
    trainer_env,
)
from perfkit.progress import Reporter, quiet
from perfkit.tables import TRAIN_LOG, read_rows
from perfkit.trainer.config import load_config, resolve_layout

WARMUP = 3
"""Steps left out of each run's figure."""


@dataclass
class Measurement:
    """One run of one configuration."""

    ok: bool
    step_ms: float | None = None
    """Wall time per step after the warm-up (rank 0's clock, which all-reduces the loss when it logs)."""
    tokens_per_s: float | None = None
    loss: float | None = None
    """The last logged loss (every configuration runs the same steps on the same data)."""
    mfu: float | None = None
    """Model FLOPs utilization over the same steps (GPU runs only)."""
    peak_memory_bytes: int | None = None
    """Of the busiest rank: CUDA's max allocated on GPU, the process's peak RSS on CPU."""
    samples_ms: list[float] = field(default_factory=list)
    """Time per step of each logged interval after the warm-up (one per step at log_every=1):
    many samples per run, for the confidence interval of a comparison."""
    error: str = ""
    steps: int | None = None
    """The steps the run trained (a sweep's short rounds run fewer)."""

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Measurement:
        """Raises ValueError on a value no run could have written (a ledger edited or damaged)."""
        if not isinstance(d, dict) or not isinstance(d.get("ok"), bool):
            raise ValueError(f"a run without ok: {str(d)[:80]}")
        known = {f for f in cls.__dataclass_fields__}
        m = cls(**{k: v for k, v in d.items() if k in known})

        def number(x: Any, low: float = 0.0) -> bool:
            return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) and x > low

        bad = [
            name
            for name, fine in (
                ("step_ms", m.step_ms is None or number(m.step_ms)),
                ("tokens_per_s", m.tokens_per_s is None or number(m.tokens_per_s)),
                ("mfu", m.mfu is None or number(m.mfu, -1e-12)),
                (
                    "loss",
                    m.loss is None or (isinstance(m.loss, int | float) and not isinstance(m.loss, bool)),
                ),
                ("peak_memory_bytes", m.peak_memory_bytes is None or number(m.peak_memory_bytes)),
                ("samples_ms", isinstance(m.samples_ms, list) and all(number(x) for x in m.samples_ms)),
                ("error", isinstance(m.error, str)),
                ("steps", m.steps is None or (isinstance(m.steps, int) and m.steps > 0)),
            )
            if not fine
        ]
        if bad:
            raise ValueError(f"a run with an impossible {bad[0]}: {getattr(m, bad[0])!r}"[:160])
        return m


@dataclass
class Candidate:
    """A configuration: a label and the ``--set`` overrides that make it."""

    label: str
    overrides: list[str]
    runs: list[Measurement] = field(default_factory=list)
    skipped: str = ""
    """Why it was not run (an invalid configuration for this world size or device)."""
    predicted: dict[str, Any] | None = None
    """A layout model's prediction (sweep): step_ms, peak_memory_bytes and their parts."""

    @property
    def failed(self) -> str:
        return next((r.error for r in self.runs if not r.ok), "")

    @property
    def step_ms(self) -> float | None:
        good = [r.step_ms for r in self.runs if r.ok and r.step_ms]
        return statistics.median(good) if good else None

    @property
    def tokens_per_s(self) -> float | None:
        good = [r.tokens_per_s for r in self.runs if r.ok and r.tokens_per_s]
        return statistics.median(good) if good else None

    @property
    def mfu(self) -> float | None:
        good = [r.mfu for r in self.runs if r.ok and r.mfu is not None]
        return statistics.median(good) if good else None

    @property
    def peak_memory_bytes(self) -> int | None:
        good = [r.peak_memory_bytes for r in self.runs if r.ok and r.peak_memory_bytes]
        return max(good) if good else None

    @property
    def loss(self) -> float | None:
        good = [r.loss for r in self.runs if r.ok and r.loss is not None]
        return statistics.median(good) if good else None

    def to_json(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "step_ms": self.step_ms,
            "tokens_per_s": self.tokens_per_s,
            "loss": self.loss,
            "mfu": self.mfu,
            "peak_memory_bytes": self.peak_memory_bytes,
        }


def check(config: str, nproc: int, overrides: Sequence[str], nodes: int = 1) -> str:
    """'' when the configuration can run with ``nproc`` ranks here (on each of ``nodes``), else the
    reason it cannot."""
    try:
        cfg = load_config(config, list(overrides))
        resolve_layout(cfg, nproc * nodes)
        check_devices(cfg, nproc)
    except ConfigError as e:
        return str(e)
    return ""


def step_figures(records: list[dict[str, Any]], warmup: int = WARMUP) -> tuple[float, float] | None:
    """(seconds per step, tokens/s) over the steps after ``warmup``, from the trainer's ``--log-json``
    records. Each record's ``step_time_s`` is the mean over the steps since the previous record, so
    the figure is time-weighted and does not depend on ``log_every``."""
    records = sorted(records, key=lambda r: r["step"])
    start = next((i for i, r in enumerate(records) if r["step"] >= warmup), None)
    if start is None or start == len(records) - 1:
        start = 0 if len(records) > 1 else None  # too short to leave the warm-up out
    if start is None:
        return None
    seconds = steps = tokens = 0.0
    previous = records[start]["step"]
    for r in records[start + 1 :]:
        n = r["step"] - previous
        previous = r["step"]
        seconds += r["step_time_s"] * n
        steps += n
        tokens += r["tokens"] * n
    if not steps or seconds <= 0:
        return None
    return seconds / steps, tokens / seconds


_EXCEPTION = re.compile(r"^(?:\[rank\d+\]:)?\s*([\w.]*(?:Error|Exception)|error): (.+)")


def _last_error(text: str) -> str:
    """The line of a failed run's output that says what went wrong: the last exception a rank
    raised (or the trainer's own ``error:`` line), else the root cause torchrun reports (a rank
    killed by a signal), else the last line."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    raised = [m for ln in lines if (m := _EXCEPTION.match(ln)) and "ChildFailedError" not in m.group(1)]
    if raised:
        return f"{raised[-1].group(1)}: {raised[-1].group(2)}"[:300]
    if "Root Cause (first observed failure):" in lines:
        cause = lines[lines.index("Root Cause (first observed failure):") :]
        rank = next((ln.split(":", 1)[1].strip() for ln in cause if ln.startswith("rank ")), "?")
        code = next((ln.split(":", 1)[1].strip() for ln in cause if ln.startswith("exitcode ")), "?")
        return f"rank {rank} ended with exit code {code}"[:300]
    return (lines[-1] if lines else "no output")[:300]


def measure(
    config: str,
    nproc: int,
    overrides: Sequence[str],
    workdir: Path,
    nodes: Nodes = ONE_NODE,
    run_id: str = "",
) -> Measurement:
    """Run the trainer once, without collectors, and read its log (``nproc`` ranks on each of
    ``nodes``; ``run_id`` names the run alike on every node)."""
    log = workdir / f"run-{uuid.uuid4().hex}.jsonl"
    env = trainer_env(nproc)
    env.pop("PERFKIT_RUN_DIR", None)  # never profiled, even when perfkit itself is
    argv = trainer_command(nproc, config, list(overrides), log, nodes, run_id or uuid.uuid4().hex)
    try:
        proc = subprocess.Popen(
            dies_with_perfkit(argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )
    except OSError as e:
        return Measurement(ok=False, error=f"could not start the trainer: {e}")
    try:
        stdout, stderr = proc.communicate()
    except BaseException:  # Ctrl-C: torchrun and every rank below it stop before perfkit does
        stop_job(proc, proc.send_signal, grace=5.0)
        raise
    if proc.returncode != 0:
        return Measurement(ok=False, error=f"exit code {proc.returncode}: {_last_error(stderr + stdout)}")
    if not nodes.single and not log.exists():
        return Measurement(
            ok=True, error="", steps=None
        )  # global rank 0 ran on another node: its log is there
    try:
        records, _ = read_rows(log, TRAIN_LOG)  # its declared schema: a damaged record is named
    except RunDirError as e:
        return Measurement(ok=False, error=f"the trainer's log could not be read: {e}")
    finally:
        log.unlink(missing_ok=True)
    figures = step_figures(records)
    samples = step_samples(records)
    if figures is None:
        return Measurement(ok=False, error="too few logged steps to time; raise steps")
    last = records[-1]
    loss, mfu = last.get("loss"), last.get("mfu")
    return Measurement(
        ok=True,
        step_ms=figures[0] * 1e3,
        tokens_per_s=figures[1],
        loss=float(loss) if isinstance(loss, int | float) else None,
        # MFU is inversely proportional to the step time: rescale the last record's to the window's
        mfu=mfu * last["step_time_s"] / figures[0] if isinstance(mfu, int | float) else None,
        peak_memory_bytes=last.get("peak_memory_bytes"),
        samples_ms=samples,
    )


def step_samples(records: list[dict[str, Any]], warmup: int = WARMUP) -> list[float]:
    """Each logged interval's time per step (ms) after the warm-up: one sample per step at
    log_every=1, one per interval otherwise."""
    records = sorted(records, key=lambda r: r["step"])
    later = [r for r in records if r["step"] > warmup] or records[1:] or records
    return [float(r["step_time_s"]) * 1e3 for r in later if r.get("step_time_s")]


def interleave(
    config: str,
    nproc: int,
    candidates: list[Candidate],
    repeats: int,
    workdir: Path,
    progress: Reporter = quiet,
    stop: Callable[[], bool] | None = None,
) -> None:
    """Measure every runnable candidate ``repeats`` times, round-robin; a candidate whose run fails is
    not run again (its error is kept). ``stop`` (asked before each run) ends it early: a time budget."""
    total = repeats * sum(1 for c in candidates if not c.skipped)
    done = 0
    for r in range(repeats):
        for c in candidates:
            if c.skipped or c.failed:
                continue
            if stop is not None and stop():
                return
            m = measure(config, nproc, c.overrides, workdir)
            c.runs.append(m)
            done += 1
            figure = f"{m.step_ms:.1f} ms/step" if m.ok and m.step_ms else f"failed: {m.error}"
            progress(f"[{done}/{total}] {c.label} (run {r + 1}/{repeats}): {figure}", done, total)


@dataclass
class Verdict:
    keep: bool
    ratio: float | None
    """Variant / base time per step, pooled medians (0.9 = 10% faster)."""
    reason: str
    interval: tuple[float, float] | None = None
    """95% confidence interval of the ratio (t interval over the interleaved pairs' log-ratios)."""
    undecided: bool = False
    """The interval straddles the bar: more runs could decide it."""


# Student's t, 97.5th percentile, by degrees of freedom: a 95% two-sided interval. 95% rather than
# 90%: more pairs are measured while the interval straddles the bar, and each look is a chance to be
# fooled (simulated with this machine's noise: 90% kept a 0% change in up to 2 of 30 trials).
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 20: 2.086, 30: 2.042}  # fmt: skip


def _t975(df: int) -> float:
    return _T975.get(df) or next((v for k, v in sorted(_T975.items()) if k >= df), 1.960)


def ratio_interval(base: Candidate, variant: Candidate) -> tuple[float, tuple[float, float]] | None:
    """The variant/base ratio of step times and its 95% confidence interval. Each interleaved pair
    gives one ratio of the runs' median per-step times (the many steps of a run make its median
    robust to single slow steps); the pairs' log-ratios give a t interval, which carries the drift
    between runs of a shared machine (a bootstrap over three pairs does not, and kept a 0% change).
    One pair has no interval: the whole line counts as undecided."""
    ratios = [
        float(np.median(v.samples_ms or [v.step_ms])) / float(np.median(b.samples_ms or [b.step_ms]))
        for b, v in zip(base.runs, variant.runs, strict=False)
        if b.ok and v.ok and b.step_ms and v.step_ms
    ]
    if not ratios:
        return None
    logs = np.log(ratios)
    point = float(np.exp(logs.mean()))
    if len(ratios) < 2:
        return point, (0.0, float("inf"))
    half = _t975(len(ratios) - 1) * float(logs.std(ddof=1)) / math.sqrt(len(ratios))
    return point, (float(np.exp(logs.mean() - half)), float(np.exp(logs.mean() + half)))


def judge(base: Candidate, variant: Candidate, min_gain: float, loss_tolerance: float = 0.02) -> Verdict:
    """Keep the variant only when the whole confidence interval of its step-time ratio is past the
    bar (at least ``min_gain`` faster) and the loss is not worse; drop it when the whole interval
    falls short; between the two the verdict is undecided (more runs may tell)."""
    if variant.failed:
        return Verdict(False, None, f"the run failed: {variant.failed}")
    if base.failed:
        return Verdict(False, None, f"the base run failed: {base.failed}")
    found = ratio_interval(base, variant)
    if found is None:
        return Verdict(False, None, "nothing measured")
    ratio, (lo, hi) = found
    loss, base_loss = variant.loss, base.loss
    if loss is not None and not math.isfinite(loss):
        return Verdict(False, ratio, f"the loss is {loss}: this change breaks training", (lo, hi))
    if loss is not None and base_loss is not None and loss > base_loss * (1 + loss_tolerance) + 1e-6:
        return Verdict(
            False,
            ratio,
            f"it changes the training: final loss {loss:.4f} vs {base_loss:.4f} without it",
            (lo, hi),
        )
    n = sum(1 for b, v in zip(base.runs, variant.runs, strict=False) if b.ok and v.ok)
    spread = f"95% interval {lo:.3f}-{hi:.3f}, {n} pair(s)"
    bar = 1 - min_gain
    if hi < bar:
        return Verdict(True, ratio, f"{1 - ratio:.1%} faster ({spread})", (lo, hi))
    if lo >= bar:
        what = (
            f"{ratio - 1:.1%} slower"
            if ratio >= 1
            else f"{1 - ratio:.1%} faster: below the {min_gain:.0%} bar"
        )
        return Verdict(False, ratio, f"{what} ({spread})", (lo, hi))
    return Verdict(
        False, ratio, f"{1 - ratio:+.1%} gain, undecided: the interval straddles the {min_gain:.0%} bar ({spread})",
        (lo, hi), undecided=True,
    )  # fmt: skip


def judge_adaptively(
    base: Candidate,
    variant: Candidate,
    min_gain: float,
    more: Callable[[], bool],
    max_pairs: int,
) -> Verdict:
    """``judge``, then one more interleaved pair at a time (``more`` measures it, False when the
    budget is spent) while the interval straddles the bar, up to ``max_pairs``; still undecided
    then, the change is dropped."""
    verdict = judge(base, variant, min_gain)
    while verdict.undecided and min(len(base.runs), len(variant.runs)) < max_pairs and more():
        verdict = judge(base, variant, min_gain)
    return verdict


def write_toml(config: dict[str, Any], path: Path) -> Path:
    """A resolved trainer configuration (``TrainConfig.to_dict()``, as a manifest holds it) as a TOML
    file that ``--config`` reads back."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return repr(v) if math.isfinite(v) else ("nan" if v != v else ("inf" if v > 0 else "-inf"))
        if isinstance(v, str):
            return json.dumps(v)
        raise PerfkitError(f"config value {v!r} cannot be written as TOML")

    lines = [f"{k} = {value(v)}" for k, v in config.items() if not isinstance(v, dict)]
    for section, body in config.items():
        if isinstance(body, dict):
            lines += ["", f"[{section}]", *(f"{k} = {value(v)}" for k, v in body.items())]
    path.write_text("\n".join(lines) + "\n")
    return path
