"""``perfkit sweep``: the reference trainer over a set of parallel layouts, predicted first, then
measured side by side.

Each layout is a short spec of parallel keys (``tp=2,pp=2``, ``zero=3``; a dotted key such as
``kernels.compile=true`` sets any config key). By default: every way to split the ranks into
pipeline × tensor × data parallel groups, and for pure data parallelism DDP and FSDP2 (zero=3).
Layouts this model or world size cannot take are listed with the reason, not run.

Before anything is measured, one profiled run (the *basis*: ``--basis RUN``, or the first layout
profiled with the cheap collectors) gives every layout a predicted step time and peak memory: by
replaying traced steps of the basis's layout changed to the layout (``replay.LayoutReplay``: the
given basis's trace, or a short traced run of its own) where they replay, else by the layout model
alone (``layoutmodel``); both figures are kept. A pipeline layout takes the layout model's: its
step is its stages' simulated schedule, which a graph of the basis's steps does not hold, and the
replay (the basis's path at the busiest stage's share, the model's bubble added) came out 0.6 to
2.7 ms above it at tiny-cpu's pipelines in each of three bench runs, where the model's errors
centred on 0 (+3% on average against the replay's +7.5%), and 15 ms above it at 4 stages on 4
CPU ranks. Layouts predicted not to fit in memory are listed,
not run; the rest run in the predicted order. With ``top``, successive halving: every layout runs short, the faster half runs
again for twice the steps, until ``top`` are left for the full runs.

``sweep.json`` is a ledger, written after every run: the same sweep started again in the same folder
measures nothing twice, and a Ctrl-C keeps every finished run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import os
import socket
import statistics
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from perfkit.errors import ConfigError, RunDirError
from perfkit.files import write_json_atomic
from perfkit.launch import ONE_NODE, Nodes
from perfkit.optimizer.layoutmodel import Basis, basis_from_run, describe, predict_overrides
from perfkit.optimizer.replay import LAYOUT_STEPS, LayoutReplay
from perfkit.optimizer.trials import WARMUP, Candidate, Measurement, check, measure
from perfkit.progress import Reporter, quiet
from perfkit.run import StudyLayout
from perfkit.tables import loads
from perfkit.trainer.config import load_config, resolve_layout

SCHEMA_VERSION = 2
MIN_STEPS = WARMUP + 4
"""The fewest steps a short (halving) run trains: the warm-up and a few timed steps."""


def resolution(runs: Sequence[Sequence[float]]) -> list[float]:
    """Each round (a run's index), how far that run of each layout came from the median of the
    layout's other runs, the largest over the layouts with 3 runs or more; empty where fewer than
    two layouts have 3 (``Sweep.resolution``)."""
    kept = [list(r) for r in runs if len(r) >= 3]
    if len(kept) < 2:
        return []
    return [
        max(abs(r[i] / statistics.median(r[:i] + r[i + 1 :]) - 1) for r in kept)
        for i in range(min(len(r) for r in kept))
    ]


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
    return " ".join([describe(cfg, lay), *extra])


def spearman(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Spearman's rank correlation (ties share their mean rank); None under three pairs."""
    if len(xs) < 3 or len(xs) != len(ys):
        return None

    def ranks(v: Sequence[float]) -> list[float]:
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r

    rx, ry = ranks(xs), ranks(ys)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    sxx = sum((a - mx) ** 2 for a in rx)
    syy = sum((b - my) ** 2 for b in ry)
    return sxy / math.sqrt(sxx * syy) if sxx and syy else None


def halving_rungs(n: int, top: int | None, steps: int, repeats: int) -> list[tuple[int, int, int]]:
    """Successive halving: (layouts kept, steps, runs each) per rung. Every rung halves the field and
    doubles the steps; the last runs ``top`` layouts for ``steps`` × ``repeats``."""
    if not top or n <= top:
        return [(n, steps, repeats)]
    sizes = [n]
    while sizes[-1] > top:
        sizes.append(max(top, math.ceil(sizes[-1] / 2)))
    rungs = []
    for i, size in enumerate(sizes[:-1]):
        rung_steps = max(MIN_STEPS, steps >> (len(sizes) - 1 - i))
        rungs.append((size, min(rung_steps, steps), 1))
    rungs.append((sizes[-1], steps, repeats))
    return rungs


@dataclass
class Sweep:
    config: str
    nproc: int
    base_overrides: list[str]
    repeats: int
    steps: int = 0
    top: int | None = None
    nodes: int = 1
    memory_limit: float | None = None
    candidates: list[Candidate] = field(default_factory=list)
    basis: Basis | None = None
    basis_layout: str | None = None
    """The layout the sweep profiled as its basis (its label), where it profiled one."""
    refusal: str | None = None
    """Why the basis gave no predictions (too few steps, a model that misses the basis itself)."""
    no_replay: str | None = None
    """Why the predictions are the layout model's alone (the basis has no trace that replays)."""
    rungs: list[tuple[int, int, int]] = field(default_factory=list)
    started: float = field(default_factory=time.time)
    interrupted: bool = False

    def runs_at(self, c: Candidate, steps: int) -> list[Measurement]:
        return [r for r in c.runs if r.steps == steps]

    def median_at(self, c: Candidate, steps: int) -> float | None:
        """Median ms/step of the candidate's good runs of ``steps`` steps."""
        good = [r.step_ms for r in self.runs_at(c, steps) if r.ok and r.step_ms]
        return statistics.median(good) if good else None

    def figure(self, c: Candidate) -> tuple[int, float] | None:
        """(steps, median ms/step) of the longest runs the candidate got."""
        for steps in sorted({r.steps or 0 for r in c.runs}, reverse=True):
            if (ms := self.median_at(c, steps)) is not None:
                return steps, ms
        return None

    def ranked(self) -> list[Candidate]:
        """Measured layouts: those that reached the full runs first, fastest first; then those
        stopped at a shorter rung; then the failed and the skipped."""
        measured = [c for c in self.candidates if self.figure(c)]
        measured.sort(key=lambda c: (-(f := self.figure(c) or (0, 0.0))[0], f[1]))
        return measured + [c for c in self.candidates if not self.figure(c)]

    def agreement(self) -> dict[str, Any]:
        """Predicted against measured: rank correlation of step time over the largest set of layouts
        measured at one length, and the peak-memory error of every measured layout."""
        by_steps: dict[int, list[tuple[float, float]]] = {}
        for c in self.candidates:
            if not c.predicted:
                continue
            for steps in {r.steps or 0 for r in c.runs}:
                if (ms := self.median_at(c, steps)) is not None:
                    by_steps.setdefault(steps, []).append((c.predicted["step_ms"], ms))
        pairs = max(by_steps.values(), key=len, default=[])
        steps_of = next((s for s, v in by_steps.items() if v is pairs), None)
        engines: dict[str, dict[str, Any]] = {}
        for engine in ("replay", "model"):
            both = [
                (p[engine], ms)
                for c in self.candidates
                if c.predicted
                and (p := c.predicted.get("engines") or {}).get(engine)
                and steps_of is not None
                and (ms := self.median_at(c, steps_of)) is not None
            ]
            if both:
                engines[engine] = {
                    "spearman": spearman([a for a, _ in both], [m for _, m in both]),
                    "time_error_max": max(abs(a - m) / m for a, m in both),
                    "layouts_ranked": len(both),
                }
        with_memory = [
            c
            for c in self.candidates
            if c.predicted and c.predicted.get("peak_memory_bytes") and c.peak_memory_bytes
        ]
        # a peak predicted as a lower bound (FSDP2's RSS on CPU) is right when the measured one is
        # at or above it: not an error of a point prediction
        held = [
            (c.predicted or {})["peak_memory_bytes"] <= (c.peak_memory_bytes or 0)
            for c in with_memory
            if (c.predicted or {}).get("peak_memory_lower_bound")
        ]
        errors = [
            abs(p["peak_memory_bytes"] - c.peak_memory_bytes) / c.peak_memory_bytes
            for c in with_memory
            if (p := c.predicted) and not p.get("peak_memory_lower_bound")
        ]
        time_errors = [abs(p - m) / m for p, m in pairs if m]
        own = self._basis_drift(steps_of, pairs)
        longest = (
            steps_of
            if steps_of is not None
            else max((r.steps or 0 for c in self.candidates for r in c.runs), default=0)
        )
        resolves = self.resolution(longest)
        return {
            "spearman": spearman([p for p, _ in pairs], [m for _, m in pairs]),
            "layouts_ranked": len(pairs),
            "time_error_median": statistics.median(time_errors) if time_errors else None,
            "time_error_max": max(time_errors, default=None),
            "memory_error_median": statistics.median(errors) if errors else None,
            "memory_error_max": max(errors, default=None),
            "layouts_with_memory": len(errors),
            **(
                {
                    "memory_lower_bounds": len(held),
                    "memory_lower_bounds_held": sum(held),
                }
                if held
                else {}
            ),
            **({"engines": engines} if engines else {}),
            **own,
            **(
                {"runs_resolve": statistics.median(resolves), "runs_resolve_rounds": resolves}
                if resolves
                else {}
            ),
        }

    def resolution(self, steps: int) -> list[float]:
        """What the measurement itself resolves: for each round, how far one run of every layout
        (of those with 3 runs or more of ``steps`` steps) came from the median of its other runs, the
        largest over the layouts; empty where fewer than two layouts have 3 runs. A prediction from
        one profiled basis run can be held no closer than its own layout's single run: on 2 CPU ranks
        at tiny-cpu (24-115 ms steps) one round's runs missed that median by over 15% in 50 of 90
        rounds of the bench's time case, at 12.8M parameters in 3 of 48 (``bench/noise_floor.py``)."""
        return resolution(
            [[r.step_ms for r in self.runs_at(c, steps) if r.ok and r.step_ms] for c in self.candidates]
        )

    def _basis_drift(self, steps: int | None, pairs: list[tuple[float, float]]) -> dict[str, float]:
        """Where the basis's own layout was measured: its predicted step (the basis's profiled run)
        against its plain runs (``basis_drift``: the host's drift between them, which every
        prediction carries), and each layout's predicted ratio to it against the measured ratio
        (``ratio_error_max``: what the model says, without that drift). On 2 CPU ranks a basis run
        took 30.6% longer than its layout's plain runs minutes later (bench 2026-12-06f)."""
        if self.basis is None or steps is None:
            return {}
        from perfkit.trainer.config import config_from_dict

        name = self.basis_layout
        if name is None and self.basis.world_size == self.nproc * self.nodes:
            name = describe(config_from_dict(self.basis.config), self.basis.shape.layout)
        own = next((c for c in self.candidates if c.label == name and c.predicted), None)
        measured = self.median_at(own, steps) if own is not None else None
        if own is None or not measured or not own.predicted:
            return {}
        predicted = own.predicted["step_ms"]
        return {
            "basis_drift": predicted / measured - 1,
            "ratio_error_max": max(abs((p / predicted) / (m / measured) - 1) for p, m in pairs if m),
        }

    def to_json(self) -> dict[str, Any]:
        ranked = self.ranked()
        best = self.figure(ranked[0]) if ranked else None
        return {
            "schema_version": SCHEMA_VERSION,
            "kind": "sweep",
            "config": self.config,
            "nproc": self.nproc,
            "nodes": self.nodes,
            "overrides": self.base_overrides,
            "repeats": self.repeats,
            "steps": self.steps,
            "top": self.top,
            "memory_limit": self.memory_limit,
            "rungs": [list(r) for r in self.rungs],
            "started": self.started,
            "interrupted": self.interrupted,
            "basis": self.basis.to_json() if self.basis else None,
            **({"no_predictions": self.refusal} if self.refusal else {}),
            **({"no_replay": self.no_replay} if self.no_replay else {}),
            **({"basis_layout": self.basis_layout} if self.basis_layout else {}),
            "agreement": self.agreement(),
            "candidates": [
                {
                    **c.to_json(),
                    "step_ms": (f := self.figure(c)) and f[1],
                    "measured_steps": f and f[0],
                    "vs_best": f[1] / best[1] if f and best and f[0] == best[0] else None,
                }
                for c in ranked
            ],
        }


def _ledger(out: Path, sweep: Sweep) -> dict[tuple[str, ...], list[Measurement]]:
    """Runs an earlier start of the same sweep in ``out`` measured, by a candidate's overrides."""
    path = StudyLayout(out, "sweep").results
    if not path.exists():
        return {}
    try:
        old = loads(path.read_text())
    except (OSError, ValueError) as e:
        raise RunDirError(f"{path} cannot be read ({e}); move it away or use another --out") from None
    if not isinstance(old, dict):
        raise RunDirError(
            f"{path} is not a sweep ledger (not a JSON object); move it away or use another --out"
        )
    version = old.get("schema_version")
    if not isinstance(version, int) or isinstance(version, bool) or version > SCHEMA_VERSION:
        raise RunDirError(
            f"{path} is a sweep ledger of schema {version!r}, which this perfkit (schema {SCHEMA_VERSION}) "
            "cannot extend without dropping data; use the perfkit that wrote it, or another --out"
        )
    same = (old.get("config"), old.get("nproc"), old.get("nodes", 1), old.get("overrides")) == (
        sweep.config,
        sweep.nproc,
        sweep.nodes,
        sweep.base_overrides,
    )
    if not same:
        raise ConfigError(
            f"{out} holds a different sweep ({old.get('config')} on {old.get('nproc')} rank(s), "
            f"overrides {' '.join(old.get('overrides') or []) or 'none'}); use another --out to start a new one"
        )
    try:
        measured = {
            tuple(map(str, c["overrides"])): [Measurement.from_json(r) for r in c.get("runs") or []]
            for c in old.get("candidates") or []
            if isinstance(c, dict) and isinstance(c.get("overrides"), list)
        }
    except (ValueError, TypeError) as e:
        raise RunDirError(f"{path} is damaged ({e}); move it away or use another --out") from None
    wanted = [list(c.overrides) for c in sweep.candidates]
    dropped = [" ".join(k) for k, runs in measured.items() if runs and list(k) not in wanted]
    if dropped:  # rewriting the ledger without them would lose what was measured
        raise ConfigError(
            f"{out} holds a sweep that measured layouts this one leaves out ({'; '.join(dropped[:3])}"
            f"{', ...' if len(dropped) > 3 else ''}); name them too (--layout), or use another --out"
        )
    return measured


@contextlib.contextmanager
def _claimed(out: Path) -> Iterator[None]:
    """One sweep at a time in ``out``: a second one started there would rename the first's basis,
    measure on the same cores, and the last writer's ledger would win. A claim whose process is gone
    (a killed sweep) is taken over."""
    out.mkdir(parents=True, exist_ok=True)
    claim = out / ".sweep.lock"
    mine = f"{os.getpid()} {socket.gethostname()}"
    for _ in range(2):
        try:
            fd = os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                pid, host = claim.read_text().split()
            except (OSError, ValueError):
                pid, host = "0", ""
            if host == socket.gethostname() and pid.isdigit() and _alive(int(pid)):
                raise ConfigError(
                    f"another perfkit sweep (pid {pid}) is running in {out}; wait for it or use another --out"
                ) from None
            claim.unlink(missing_ok=True)  # its sweep was killed: take the folder over
            continue
        with os.fdopen(fd, "w") as f:
            f.write(mine)
        break
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            if claim.read_text() == mine:
                claim.unlink()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _basis(sweep: Sweep, basis_run: Path | None, out: Path, nodes: Nodes, progress: Reporter) -> Basis:
    """The given profiled run, or the first runnable layout profiled with the cheap collectors into
    ``out/basis`` (reused when an earlier start of this sweep completed it)."""
    if basis_run is not None:
        return basis_from_run(basis_run)
    from perfkit.collectors.options import CollectOptions

    first = next(c for c in sweep.candidates if not c.skipped)
    sweep.basis_layout = first.label
    progress(f"profiling the basis ({first.label}) for the predictions", 0, 0)
    options = CollectOptions(collect=["steps", "comms", "memory", "cpu"], profile_steps=None)
    return basis_from_run(_profiled(sweep, first.overrides, out / "basis", options, nodes))


def _profiled(sweep: Sweep, overrides: list[str], folder: Path, options: Any, nodes: Nodes) -> Path:
    """``folder``: the reference trainer with ``overrides`` profiled there, or what an earlier start
    of the sweep completed there; a ``RunDirError`` where the run fails."""
    import io

    from perfkit.profile import reference_request, run_profile
    from perfkit.run import Run

    if folder.exists():
        try:
            if Run.open(folder).manifest.status == "complete":
                return folder
        except RunDirError:
            pass
        # an earlier start stopped while profiling: keep what it wrote beside, profile again
        folder.rename(folder.with_name(f"{folder.name}.incomplete-{int(time.time())}"))
    req = reference_request(sweep.config, overrides, sweep.nproc, folder, folder.name, options, nodes)
    _, rc = run_profile(req, io.StringIO())
    if rc != 0:
        raise RunDirError(
            f"the {folder.name} run in {folder} failed (exit code {rc}); run it with perfkit profile to see why"
        )
    return folder


def _replayer(
    sweep: Sweep, basis_run: Path | None, out: Path, nodes: Nodes, progress: Reporter
) -> LayoutReplay | None:
    """The basis's traced steps, ready to replay each layout: the given basis's trace, or a short
    run of the basis's layout traced after its warm-up (``out/basis-trace``: the profiler slows the
    steps it traces and swells the peak, so the basis itself is left untraced). None, and why in
    the sweep, where no trace replays."""
    assert sweep.basis is not None
    try:
        traces = None
        if basis_run is None:
            from perfkit.collectors.options import CollectOptions

            first = next(c for c in sweep.candidates if c.label == sweep.basis_layout)
            steps = WARMUP + LAYOUT_STEPS
            progress(f"tracing {LAYOUT_STEPS} steps of the basis ({first.label}) to replay", 0, 0)
            options = CollectOptions(collect=["steps", "kernels"], profile_steps=(WARMUP + 1, steps))
            traces = _profiled(
                sweep, [*first.overrides, f"steps={steps}"], out / "basis-trace", options, nodes
            )
        return LayoutReplay.of(sweep.basis, traces)
    except RunDirError as e:
        sweep.no_replay = str(e)
        progress(f"predictions by the layout model alone: {e}", 0, 0)
        return None


def _limit(sweep: Sweep, memory_limit: float | None, basis: Basis) -> tuple[float | None, str]:
    """The per-rank memory a layout must fit in, and what it is."""
    if memory_limit:
        return memory_limit, "--memory-limit"
    if basis.gpu_memory_bytes:
        return basis.gpu_memory_bytes, "the GPU's memory"
    if basis.host_memory_bytes:
        return basis.host_memory_bytes / sweep.nproc, f"this host's memory shared by {sweep.nproc} ranks"
    return None, ""


def run_sweep(
    config: str,
    nproc: int,
    overrides: Sequence[str],
    layouts: Sequence[str],
    repeats: int,
    out: Path,
    progress: Reporter = quiet,
    basis_run: Path | None = None,
    top: int | None = None,
    memory_limit: float | None = None,
    nodes: Nodes = ONE_NODE,
    predict: bool = True,
) -> Sweep:
    problem = check(config, 1, [o for o in overrides if not o.startswith("parallel.")])
    if problem:
        raise ConfigError(problem)
    if top and nodes.count > 1:
        raise ConfigError(
            "--top needs every layout's figures on every node, but only the node of rank 0 logs them; "
            "sweep several nodes without --top"
        )
    world = nproc * nodes.count
    steps = load_config(config, list(overrides)).steps
    sweep = Sweep(config, nproc, list(overrides), repeats, steps, top, nodes.count, memory_limit)
    seen: set[tuple[str, ...]] = set()
    for spec in layouts or default_layouts(world):
        sets = [*overrides, *parse_layout(spec)]
        key = tuple(sets)
        if key in seen:
            continue
        seen.add(key)
        c = Candidate(label(config, world, sets, spec), sets)
        c.skipped = check(config, nproc, sets, nodes.count)
        sweep.candidates.append(c)
    if not any(not c.skipped for c in sweep.candidates):
        raise ConfigError(
            f"none of the layouts can run with {world} rank(s): "
            + "; ".join(f"{c.label}: {c.skipped}" for c in sweep.candidates)
        )
    with _claimed(out):  # the folder is claimed once the request has been checked
        earlier = _ledger(out, sweep)
        for c in sweep.candidates:
            c.runs = earlier.get(tuple(c.overrides), [])
        results = StudyLayout(out, "sweep").results
        try:
            if predict:
                sweep.basis = _basis(sweep, basis_run, out, nodes, progress)
                sweep.refusal = sweep.basis.refusal()
                if sweep.refusal:  # measured only: a prediction that misses its own basis misleads
                    progress(f"no predictions: {sweep.refusal}", 0, 0)
                    predict = False
            if predict and sweep.basis is not None:
                limit, what = _limit(sweep, memory_limit, sweep.basis)
                replayer = _replayer(sweep, basis_run, out, nodes, progress)
                for c in sweep.candidates:
                    if c.skipped:
                        continue
                    p = predict_overrides(sweep.basis, config, c.overrides, world)
                    engines, engine = {"model": p.step_s * 1e3}, "model"
                    if replayer is not None:
                        cfg = load_config(config, c.overrides)
                        replayed = replayer.predict(cfg, world)
                        engines["replay"] = replayed.step_s * 1e3
                        if sweep.basis.shape_of(cfg, world).layout.pp == 1:  # the model's notes kept
                            p, engine = (
                                dataclasses.replace(replayed, notes=[*p.notes, *replayed.notes]),
                                "replay",
                            )
                    c.predicted = {**p.to_json(), "engine": engine, "engines": engines}
                    if limit and p.peak_bytes and p.peak_bytes > limit:
                        c.skipped = f"predicted peak {p.peak_bytes / 2**30:.2f} GiB a rank exceeds {limit / 2**30:.2f} GiB ({what})"
                sweep.candidates.sort(key=lambda c: (c.predicted or {}).get("step_ms") or math.inf)
            field_ = [c for c in sweep.candidates if not c.skipped]
            if not field_:
                raise ConfigError("no layout is predicted to fit in memory: " + "; ".join(
                    f"{c.label}: {c.skipped}" for c in sweep.candidates))  # fmt: skip
            sweep.rungs = halving_rungs(len(field_), top, steps, repeats)
            write_json_atomic(results, sweep.to_json())
            with tempfile.TemporaryDirectory(dir=out) as work:
                for i, (size, rung_steps, runs) in enumerate(sweep.rungs):
                    if i:
                        last = sweep.rungs[i - 1][1]
                        field_ = sorted(field_, key=lambda c: sweep.median_at(c, last) or math.inf)[:size]
                    _measure_rung(sweep, field_, rung_steps, runs, Path(work), nodes, progress, results, i)
        except KeyboardInterrupt:
            sweep.interrupted = True  # keep what was measured
            raise
        finally:
            write_json_atomic(results, sweep.to_json())
        from perfkit.reports.trials import write

        write(sweep.to_json(), StudyLayout(out, "sweep").page)
        return sweep


def _measure_rung(
    sweep: Sweep,
    field_: list[Candidate],
    steps: int,
    runs: int,
    work: Path,
    nodes: Nodes,
    progress: Reporter,
    results: Path,
    rung: int,
) -> None:
    """Each layout of ``field_`` until it has ``runs`` runs of ``steps`` steps, round-robin; runs the
    ledger already holds are not made again; the ledger is written after every run."""
    todo = {id(c): max(0, runs - len(sweep.runs_at(c, steps))) for c in field_}
    total, done = sum(todo.values()), 0
    where = f"rung {rung + 1}/{len(sweep.rungs)}, {steps} steps" if len(sweep.rungs) > 1 else f"{steps} steps"
    for r in range(runs):
        for c in field_:
            if todo[id(c)] <= 0 or any(not m.ok for m in c.runs):
                continue
            todo[id(c)] -= 1
            key = hashlib.sha1(f"{sweep.config}{c.overrides}{steps}{r}".encode()).hexdigest()[:12]
            m = measure(
                sweep.config, sweep.nproc, [*c.overrides, f"steps={steps}"], work, nodes, f"perfkit-{key}"
            )
            m.steps = steps
            c.runs.append(m)
            done += 1
            write_json_atomic(results, sweep.to_json())
            figure = (
                f"{m.step_ms:.1f} ms/step"
                if m.ok and m.step_ms
                else (f"failed: {m.error}" if not m.ok else "done")
            )
            predicted = (
                f" (predicted {c.predicted['step_ms']:.1f} ± {c.predicted.get('uncertainty_ms') or 0:.1f})"
                if c.predicted
                else ""
            )
            progress(f"[{done}/{total}] {c.label} ({where}): {figure}{predicted}", done, total)
