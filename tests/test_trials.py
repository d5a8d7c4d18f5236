"""perfkit sweep and perfkit optimize: the measurement rules, the plan, and both commands end to end
on 2 CPU ranks."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from helpers import bench_module, run_perfkit
from perfkit.analyzers import remedies
from perfkit.analyzers.rules import Finding
from perfkit.reports.text import optimize_summary

from perfkit.errors import ConfigError
from perfkit.optimizer.optimize import baseline_from_run, plan
from perfkit.optimizer.sweep import default_layouts, label, parse_layout
from perfkit.optimizer.trials import Candidate, Measurement, judge, step_figures, write_toml
from perfkit.run import Run
from perfkit.trainer.config import TrainConfig, load_config


def records(step_ms: list[float], every: int = 1) -> list[dict]:
    return [{"step": (i + 1) * every, "step_time_s": ms / 1e3, "tokens": 100} for i, ms in enumerate(step_ms)]


def test_step_figures_leave_out_the_warmup_and_weigh_by_steps() -> None:
    sec, tok = step_figures(records([500, 500, 500, 10, 10, 20, 30]))
    assert sec == pytest.approx(0.0175) and tok == pytest.approx(100 / 0.0175)  # steps 4-7
    # log_every=10: each record is the mean of its 10 steps; the first (steps 1-10) holds the warm-up
    sec, _ = step_figures(records([90, 20, 40], every=10))
    assert sec == pytest.approx(0.030)
    assert step_figures(records([20])) is None


def cand(ms: list[float | None], loss: float = 4.0) -> Candidate:
    runs = [
        Measurement(ok=m is not None, step_ms=m, loss=loss, error="" if m else "exit code 1: boom")
        for m in ms
    ]
    return Candidate("x", [], runs)


@pytest.mark.parametrize(
    ("base", "variant", "loss", "keep", "reason"),
    [
        ([30, 31, 29], [20, 21, 20], 4.0, True, "faster (95% interval"),
        ([30, 31, 29], [29.9, 30.8, 28.9], 4.0, False, "below the 3% bar"),
        ([30, 31, 29], [20, 32, 20], 4.0, False, "undecided: the interval straddles the 3% bar"),
        ([30, 31, 29], [33, 34, 32], 4.0, False, "slower"),
        ([30, 31, 29], [20, 21, 20], 4.5, False, "it changes the training: final loss 4.5000 vs 4.0000"),
        ([30, 31, 29], [20, 21, 20], math.nan, False, "breaks training"),
        ([30, 31, 29], [None], 4.0, False, "the run failed: exit code 1: boom"),
    ],
)
def test_judge(base, variant, loss, keep, reason) -> None:
    v = judge(cand(base), cand(variant, loss), min_gain=0.03)
    assert v.keep is keep and reason in v.reason


@pytest.mark.parametrize("seed", [11])
def test_decisions_survive_noise_for_any_seed(seed: int) -> None:
    """The decision rule under this machine's noise (bench/decision_noise.py: 3% drift between runs,
    8% between steps), over 2000 simulated trials a case: a 0% change must be kept at most 2.5% of the
    time (the rule's 95% interval, one side, each look), a real 6% gain at least 75%. The bench
    measured 0.45-0.7% and 82-85% over seeds 1, 2, 3, 11 and 12. With 2000 trials a rate's standard
    error is under 0.9 points, so both bounds sit more than 4 of them from what was measured: the test
    holds for any seed. (It had asserted 24 of 30 with one seed that happened to give 24; over seeds
    0-39 that figure ran 20-29.)"""
    noise = bench_module("decision_noise")
    false_keep, _ = noise.keep_rate(0.0, seed)
    assert false_keep <= 0.025, false_keep
    power, verdicts = noise.keep_rate(0.06, seed)
    assert power >= 0.75, power
    assert all(v.interval and v.interval[0] <= v.ratio <= v.interval[1] for v in verdicts)  # type: ignore[operator]


def test_layouts() -> None:
    assert parse_layout("tp=2, pp=2,kernels.compile=true") == [
        "parallel.tp=2",
        "parallel.pp=2",
        "kernels.compile=true",
    ]
    with pytest.raises(ConfigError, match="is not KEY=VALUE"):
        parse_layout("tp2")
    specs = default_layouts(4)
    assert len(specs) == 8 and "pp=1,tp=1,zero=3" in specs and "pp=4,tp=1" in specs
    labels = {label("tiny-cpu", 4, parse_layout(s), s) for s in specs}
    assert {"dp4", "dp4 zero3", "dp2 tp2", "tp4", "pp2 dp2 1f1b", "pp4 1f1b"} <= labels
    sp = "tp=2,sequence_parallel=true"
    assert label("tiny-cpu", 2, parse_layout(sp), sp) == "tp2 sp"


def test_resolved_config_round_trips_through_toml(tmp_path: Path) -> None:
    cfg = load_config("tiny-cpu", ["parallel.tp=2", 'data.path=we "quote" it', "optimizer.eps=1e-08"])
    path = write_toml(cfg.to_dict(), tmp_path / "c.toml")
    assert load_config(str(path)).to_dict() == cfg.to_dict()


def test_baseline_from_a_run_that_is_not_the_trainer_is_one_line(tmp_path: Path) -> None:
    Run.create(tmp_path / "r", command=["python", "train.py"], world_size=1).finish("complete", 0)
    with pytest.raises(ConfigError, match="not a run of the bundled trainer") as e:
        baseline_from_run(tmp_path / "r", tmp_path / "out")
    assert "\n" not in str(e.value)
    Run.create(tmp_path / "t", command=["x"], world_size=2, config=TrainConfig().to_dict()).finish(
        "complete", 0
    )
    config, nproc = baseline_from_run(tmp_path / "t", tmp_path / "out")
    assert nproc == 2 and load_config(config).to_dict() == TrainConfig().to_dict()


def _finding(id: str, remedy: str, saving: float) -> Finding:
    return Finding(
        id=id,
        title=id,
        severity="high",
        evidence={},
        ranks=[],
        saving_ms_per_step=saving,
        estimate="",
        remedy=remedy,
    )


def test_plan_skips_what_is_set_invalid_or_repeated(monkeypatch: pytest.MonkeyPatch) -> None:
    def finding(id: str, change: dict) -> Finding:
        monkeypatch.setitem(
            remedies.REMEDIES, f"test_{id}", remedies.Remedy(id=id, description=id, trainer=change)
        )
        return _finding(id, f"test_{id}", 1.0)

    analysis = SimpleNamespace(
        findings=[
            finding("a", {"overlap.bucket_cap_mb": 25}),  # tiny-cpu's own value: already set
            finding("b", {"parallel.tp": 3}),  # cannot run: tp must divide n_heads
            finding("c", {"kernels.optimizer_impl": "fused"}),
            finding("d", {"kernels.optimizer_impl": "fused"}),  # the same change again
            finding("e", {"log_every": 10}),
            finding("f", {"data.num_workers": 4}),
            finding("g", {}),  # no config change to try
        ]
    )
    trials = plan(analysis, "tiny-cpu", 2, [], max_trials=2)  # type: ignore[arg-type]
    by = {t.finding: t for t in trials}
    assert list(by) == ["a", "b", "c", "e", "f"]
    assert by["a"].skipped == "already set"
    assert "does not divide model.n_heads" in by["b"].skipped
    assert not by["c"].skipped and not by["e"].skipped
    assert by["f"].skipped == "not tried: --max-trials 2"


def test_cli_errors_are_one_line(tmp_path: Path) -> None:
    r = run_perfkit("sweep", "--layout", "tp=3", "--out", str(tmp_path / "s"))
    assert r.returncode == 2 and "none of the layouts can run" in r.stderr and "Traceback" not in r.stderr
    r = run_perfkit("sweep", "--layout", "tp", "--out", str(tmp_path / "s"))
    assert r.returncode == 2 and "is not KEY=VALUE" in r.stderr
    r = run_perfkit("optimize", "--set", "parallel.tp=3", "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "does not divide model.n_heads" in r.stderr and "Traceback" not in r.stderr
    r = run_perfkit("optimize", str(tmp_path / "missing"), "--out", str(tmp_path / "o"))
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1


def test_sweep_measures_layouts_side_by_side(tmp_path: Path) -> None:
    """Real runs through torchrun's c10d rendezvous (--nnodes 1 --rdzv-endpoint: the multi-node path on
    one node), predicted first from a basis the sweep profiles itself."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "sweep"
    r = run_perfkit(
        "sweep", "--nproc", "2", "--steps", "6", "--repeats", "1", "--layout", "tp=1", "--layout", "pp=2",
        "--layout", "tp=3", "--out", str(out), "--nnodes", "1", "--rdzv-endpoint", f"127.0.0.1:{port}",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    data = json.loads((out / "sweep.json").read_text())
    assert data["schema_version"] == 2 and data["nproc"] == 2 and data["nodes"] == 1
    assert data["basis"]["run"] == str(out / "basis") and (out / "basis" / "rank1" / "comms.jsonl").exists()
    by = {c["label"]: c for c in data["candidates"]}
    assert set(by) == {"dp2", "pp2 1f1b", "tp=3"}
    assert by["dp2"]["step_ms"] > 0 and by["pp2 1f1b"]["step_ms"] > 0
    assert by["dp2"]["peak_memory_bytes"] > 100 << 20  # the peak RSS of a torch process
    fastest = min(("dp2", "pp2 1f1b"), key=lambda k: by[k]["step_ms"])
    slowest = "pp2 1f1b" if fastest == "dp2" else "dp2"
    assert by[slowest]["vs_best"] == pytest.approx(by[slowest]["step_ms"] / by[fastest]["step_ms"])
    assert data["candidates"][0]["label"] == fastest  # ranked fastest first
    assert "does not divide model.n_heads" in by["tp=3"]["skipped"] and not by["tp=3"]["runs"]
    assert "skipped: parallel.tp=3" in r.stdout
    for c in (by["dp2"], by["pp2 1f1b"]):  # predicted beside measured, memory within 15% here
        assert c["predicted"]["step_ms"] > 0
        assert abs(c["predicted"]["peak_memory_bytes"] / c["peak_memory_bytes"] - 1) < 0.15
    assert "predictions from" in r.stdout
    # the basis's layout traced apart, to replay: each prediction keeps both engines' figures
    assert (out / "basis-trace" / "rank1" / "trace.json.gz").exists()
    for c in (by["dp2"], by["pp2 1f1b"]):
        engines = c["predicted"]["engines"]
        assert engines["model"] > 0 and c["predicted"]["step_ms"] == engines[c["predicted"]["engine"]]
        assert "replay" in engines or "by the layout model alone: " in r.stdout
    page = (out / "sweep.html").read_text()
    assert "plotly-graph-div" in page and "pp2 1f1b" in page and "predicted" in page
    assert ("layout model ms/step" in page) == (by["dp2"]["predicted"]["engine"] == "replay")


def test_optimize_keeps_the_fix_for_a_planted_problem(tmp_path: Path) -> None:
    """Tiny DDP buckets (10 KB: ~55 all-reduces a step instead of 1) make the bucket finding the
    top one; its remedy is tried first, measured faster, kept, and gone from the final run."""
    out = tmp_path / "opt"
    r = run_perfkit(
        "optimize", "--nproc", "2", "--set", "overlap.bucket_cap_mb=0.01", "--steps", "10", "--repeats", "1",
        "--max-trials", "1", "--out", str(out),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.loads((out / "optimize.json").read_text())
    first = data["trials"][0]
    assert first["finding"] == "small_ddp_buckets"
    # the remedy's alternatives (25, 50, 100 MB) were measured together; the fastest kept one is chosen
    assert [a["change"] for a in first["alternatives"]] == [
        [f"overlap.bucket_cap_mb={mb}"] for mb in (25, 50, 100)
    ]
    # kept by the decision rule: the ratio's interval under 1 (how much faster is the benchmark's to
    # say, bench/optimize_recovery.py: a threshold here had failed CI at a final speed-up of 1.05x
    # from one run of each, on a host whose runs moved 22-25% from their median that hour)
    assert first["kept"] and first["ratio"] < 1 and first["interval"][1] < 1, first["reason"]
    (chosen,) = data["kept"]
    assert (
        chosen.startswith("overlap.bucket_cap_mb=") and data["speedup"] is not None
    )  # measured side by side
    assert first["predicted_ms"] > 0 and first["measured_ms"] > 0  # predicted beside measured
    assert all(t["skipped"] for t in data["trials"][1:])
    # one round: its trial kept, or (on a noisy host, 25 MB's screen undecided) kept when refined
    # to 50 or 100 MB after a round that kept nothing
    assert data["stopped"] in ("--max-trials 1 reached", "a round kept nothing") and len(data["rounds"]) == 1
    assert f"train with: perfkit train --config tiny-cpu --nproc 2 --set {chosen}" in r.stdout
    (gone,) = [line for line in r.stdout.splitlines() if line.startswith("findings gone after: ")]
    assert (
        "Gradients all-reduced in many tiny buckets" in gone
    )  # beside any noise (a straggler on a busy machine)
    final = Path(data["final_run"])
    assert (final / "report" / "compare.html").exists() and (final / "report" / "index.html").exists()
    assert (out / "baseline" / "report" / "index.html").exists()
    page = (out / "optimize.html").read_text()
    assert "plotly-graph-div" in page and 'href="optimized/report/compare.html"' in page


def test_ctrl_c_keeps_what_a_sweep_measured(tmp_path: Path) -> None:
    import os
    import signal
    import subprocess
    import sys

    from helpers import user_env

    out = tmp_path / "sweep"
    proc = subprocess.Popen(
        [sys.executable, "-m", "perfkit", "sweep", "--steps", "6", "--repeats", "3", "--layout", "tp=1",
         "--layout", "pp=2", "--out", str(out)],
        stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=user_env(), start_new_session=True,
    )  # fmt: skip
    assert proc.stderr is not None
    for line in proc.stderr:
        if "[1/6]" in line:
            break
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C reaches the whole foreground group
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert err.strip().splitlines()[-1].startswith("perfkit: interrupted; what was measured so far is in")
    data = json.loads((out / "sweep.json").read_text())
    assert data["interrupted"] and sum(len(c["runs"]) for c in data["candidates"]) >= 1


ROOT_CAUSE = """torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
Root Cause (first observed failure):
[0]:
  rank      : 1 (local_rank: 1)
  exitcode  : -9 (pid: 11885)  (SIGKILL)
  traceback : Signal 9 (SIGKILL) received by PID 11885
"""


@pytest.mark.parametrize(
    ("output", "line"),
    [
        ("Traceback:\n  File x\n[rank1]: torch.OutOfMemoryError: CUDA out of memory\nChildFailedError: x", "torch.OutOfMemoryError: CUDA out of memory"),
        ("error: model.n_heads=5 does not divide model.d_model=48\n", "error: model.n_heads=5 does not divide model.d_model=48"),
        (ROOT_CAUSE, "rank 1 (local_rank: 1) ended with exit code -9 (pid: 11885)  (SIGKILL)"),
        ("", "no output"),
    ],
)  # fmt: skip
def test_a_failed_run_is_told_by_its_cause(output: str, line: str) -> None:
    from perfkit.optimizer.trials import _last_error

    assert _last_error(output) == line


def test_the_loop_profiles_again_and_stops_when_a_round_keeps_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Round 1 finds tiny buckets; fixed, the re-profiled run shows the optimizer as the next
    bottleneck; round 2 keeps foreach over fused; round 3 finds nothing to keep: the loop stops.
    The trainer runs are stood in for (the loop's logic is under test; real runs are in the test
    above)."""
    import perfkit.optimizer.optimize as optimize_module

    profiled: list[list[str]] = []

    def fake_profile(config: str, nproc: int, overrides, out: Path, name: str):  # type: ignore[no-untyped-def]
        out.mkdir(parents=True, exist_ok=True)
        profiled.append(list(overrides))
        return SimpleNamespace(path=out)

    def fake_analyze(path: Path):  # type: ignore[no-untyped-def]
        current = profiled[-1] if profiled else []
        if not any(
            o.startswith("overlap.bucket_cap_mb=2")
            or o.startswith("overlap.bucket_cap_mb=5")
            or o.startswith("overlap.bucket_cap_mb=1")
            for o in current
        ):
            return SimpleNamespace(
                findings=[_finding("small_ddp_buckets", "bucket_size", 12.0)],
                metrics=SimpleNamespace(step_ms=100.0),
            )
        return SimpleNamespace(
            findings=[
                _finding("unfused_optimizer", "fused_optimizer", 0.0),
                _finding("input_stall", "more_workers", 1.0),
            ],
            metrics=SimpleNamespace(step_ms=100.0),
        )

    def cost(overrides: list[str]) -> float:
        ms = 100.0
        if "overlap.bucket_cap_mb=0.01" in overrides and not any(
            o in overrides
            for o in ("overlap.bucket_cap_mb=25", "overlap.bucket_cap_mb=50", "overlap.bucket_cap_mb=100")
        ):
            ms += 30
        if "kernels.optimizer_impl=foreach" in overrides:
            ms -= 10
        elif "kernels.optimizer_impl=fused" in overrides:
            ms -= 4
        return ms

    rng = np.random.default_rng(3)

    def fake_interleave(config, nproc, candidates, repeats, work, progress=None, stop=None):  # type: ignore[no-untyped-def]
        for _ in range(repeats):
            for c in candidates:
                samples = list(cost(c.overrides) * (1 + rng.normal(0, 0.01, 20)))
                c.runs.append(
                    Measurement(ok=True, step_ms=float(np.median(samples)), loss=4.0, samples_ms=samples)
                )

    monkeypatch.setattr(optimize_module, "profile_reference", fake_profile)
    monkeypatch.setattr(optimize_module, "analyze", fake_analyze)
    monkeypatch.setattr(optimize_module, "interleave", fake_interleave)
    monkeypatch.setattr(optimize_module, "check", lambda config, nproc, overrides: "")
    opt = optimize_module.run_optimize(
        config="tiny-cpu", nproc=2, overrides=["kernels.optimizer_impl=unfused", "overlap.bucket_cap_mb=0.01"],
        out=tmp_path / "opt", steps=None, repeats=3, verify=False,
    )  # fmt: skip
    assert [r.number for r in opt.rounds] == [1, 2, 3]
    assert opt.stopped == "no remedy left to try" or opt.stopped == "a round kept nothing"
    assert "kernels.optimizer_impl=foreach" in opt.kept  # the alternative, not the remedy's first choice
    assert any(k.startswith("overlap.bucket_cap_mb=") for k in opt.kept)
    assert len(profiled) == 3  # the baseline and one profile a round after a kept change
    data = json.loads((tmp_path / "opt" / "optimize.json").read_text())
    assert data["schema_version"] == 2 and [t["round"] for t in data["trials"] if not t["skipped"]][:1] == [1]
    more_workers = next(t for t in data["trials"] if t["remedy"] == "more_workers")
    assert not more_workers["kept"]  # no gain planted: dropped, whatever its alternatives


# A planted-slow trainer stood in for: each change's effect on the step time (ms), the runs noisy.
_PLANTED = {
    "kernels.activation_checkpointing=false": -40.0,
    "kernels.attention=sdpa": -25.0,
    "kernels.optimizer_impl=fused": -12.0,
    "kernels.optimizer_impl=foreach": -14.0,
    "overlap.bucket_cap_mb=25": -20.0,
    "overlap.bucket_cap_mb=50": -20.5,
    "overlap.bucket_cap_mb=100": -21.0,
}


def _fake_trainer(monkeypatch: pytest.MonkeyPatch, noise: float, run_s: float, findings: list[Finding]):  # type: ignore[no-untyped-def]
    """Runs that take ``run_s`` of a fake clock and time ``_PLANTED``'s effects with ``noise``; the
    profiled runs show ``findings`` whose changes are not yet in the configuration."""
    import perfkit.optimizer.optimize as optimize_module

    clock = [0.0]
    monkeypatch.setattr(
        optimize_module, "time", SimpleNamespace(monotonic=lambda: clock[0], time=lambda: 0.0)
    )
    profiled: list[list[str]] = []

    def fake_profile(config: str, nproc: int, overrides, out: Path, name: str):  # type: ignore[no-untyped-def]
        out.mkdir(parents=True, exist_ok=True)
        profiled.append(list(overrides))
        return SimpleNamespace(path=out)

    def fake_analyze(path: Path):  # type: ignore[no-untyped-def]
        applied = profiled[-1]
        left = [
            f for f in findings if not any(o in applied for o in remedies.get(f.remedy).all_overrides()[0])
        ]
        return SimpleNamespace(findings=left, metrics=SimpleNamespace(step_ms=200.0))

    def cost(overrides: list[str]) -> float:
        last: dict[str, str] = {}
        for o in overrides:
            last[o.split("=", 1)[0]] = o
        return 200.0 + sum(_PLANTED.get(o, 0.0) for o in last.values())

    rng = np.random.default_rng(7)

    def fake_interleave(config, nproc, candidates, repeats, work, progress=None, stop=None):  # type: ignore[no-untyped-def]
        for _ in range(repeats):
            for c in candidates:
                if stop is not None and stop():
                    return
                clock[0] += run_s
                drift = 1 + rng.normal(0, noise)  # the whole run slower or faster: a neighbour
                samples = list(cost(c.overrides) * drift * (1 + rng.normal(0, noise / 2, 20)))
                c.runs.append(
                    Measurement(ok=True, step_ms=float(np.median(samples)), loss=4.0, samples_ms=samples)
                )

    monkeypatch.setattr(optimize_module, "profile_reference", fake_profile)
    monkeypatch.setattr(optimize_module, "analyze", fake_analyze)
    monkeypatch.setattr(optimize_module, "interleave", fake_interleave)
    monkeypatch.setattr(optimize_module, "check", lambda config, nproc, overrides: "")
    return optimize_module, clock


_FOUR = [
    _finding("recompute_without_pressure", "no_activation_checkpointing", 5.0),
    _finding("small_ddp_buckets", "bucket_size", 60.0),  # over-predicted: tried first by the old loop
    _finding("unfused_attention", "sdpa", 10.0),
    _finding("unfused_optimizer", "fused_optimizer", 8.0),
]
_SLOW = [
    "kernels.activation_checkpointing=true",
    "kernels.attention=eager",
    "kernels.optimizer_impl=unfused",
    "overlap.bucket_cap_mb=0.005",
]


@pytest.mark.parametrize(("noise", "minutes"), [(0.005, 15), (0.04, 15), (0.005, 5.5), (0.04, 5.5)])
def test_every_remedy_is_screened_before_any_is_refined(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, noise: float, minutes: float
) -> None:
    """Four planted slowdowns (the largest predicted least, the smallest most), runs of 10 s, and a
    budget that holds the screen and the combination, or those and the refinements: on a quiet
    machine or a noisy one, the four first-order remedies are all kept, and what the budget could not
    hold is said with its cost."""
    optimize_module, clock = _fake_trainer(monkeypatch, noise, run_s=10.0, findings=_FOUR)
    opt = optimize_module.run_optimize(
        config="tiny-cpu", nproc=2, overrides=_SLOW, out=tmp_path / "opt", steps=None, repeats=3,
        budget_s=minutes * 60, verify=False,
    )  # fmt: skip
    assert clock[0] <= minutes * 60  # a hard limit: the closing side-by-side runs too
    assert len(opt.final) == 2 and all(len(c.runs) == 3 for c in opt.final)  # and they were kept room for
    first = [t.alternatives[0] for t in opt.trials if t.round == 1]
    assert len(first) == 4 and all(a.variant and len(a.variant.runs) >= 3 for a in first)  # each screened
    big = {"kernels.activation_checkpointing=false", "kernels.attention=sdpa", "overlap.bucket_cap_mb=25"}
    assert big <= set(opt.kept), (opt.kept, opt.plan)  # 10-20% each: kept however noisy the runs
    if noise < 0.01 or minutes > 10:  # the 6% one too, where the runs or the budget allow
        assert {a.change[0] for a in first} <= set(opt.kept), (opt.kept, opt.plan)
    assert opt.plan[0].startswith("round 1: 4 change(s)")  # the screen came first, every remedy in it
    assert opt.combinations and opt.combinations[0]["kept"]
    refine = [i for i, line in enumerate(opt.plan) if line.startswith("refine")]
    assert not refine or refine[0] > 0
    refined = [" ".join(a.change) for t in opt.trials for a in t.alternatives[1:] if a.variant]
    assert len(refined) == len(set(refined)), refined  # each second-order choice measured once
    data = json.loads((tmp_path / "opt" / "optimize.json").read_text())
    said = [a["reason"] for t in data["trials"] for a in t["alternatives"]]
    if minutes < 10:  # the refinements do not fit: each says so, with what it would have cost
        assert (
            sum(bool(re.search(r"--budget was spent \(~\d+\.\d min to measure it\)", r)) for r in said) >= 2
        )
    summary = optimize_summary(data)
    assert "plan, round 1: 4 change(s)" in summary and "together:" in summary


def test_small_gains_that_noise_hides_alone_are_kept_together(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three changes of about 5% each on a machine whose runs drift by 12%: alone, a few pairs leave
    each undecided; together (14%) they pass and are kept, and each says so."""
    for key, ms in (
        ("kernels.attention=sdpa", -9.0),
        ("overlap.bucket_cap_mb=25", -9.0),
        ("kernels.optimizer_impl=fused", -10.0),
    ):
        monkeypatch.setitem(_PLANTED, key, ms)
    optimize_module, _ = _fake_trainer(monkeypatch, 0.12, run_s=10.0, findings=_FOUR[1:])
    opt = optimize_module.run_optimize(
        config="tiny-cpu", nproc=2, overrides=_SLOW[1:], out=tmp_path / "opt", steps=None, repeats=2,
        budget_s=8 * 60, verify=False,
    )  # fmt: skip
    first = [t.alternatives[0] for t in opt.trials if t.round == 1]
    together = opt.combinations[0]
    assert together["kept"] and together["undecided_alone"], together
    assert {a.change[0] for a in first} <= set(opt.kept)
    said = [a.verdict.reason if a.verdict else "" for a in first]
    assert all("undecided" in r and r.endswith("kept: it passed together with the others") for r in said), (
        said
    )


def test_predictions_learn_from_the_savings_measured(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Round 1 measures buckets saving a third of their 60 ms prediction; round 2's comms estimate
    is scaled by what round 1 measured, and the summary shows both."""
    findings = [
        _finding("small_ddp_buckets", "bucket_size", 60.0),
        _finding("exposed_communication", "overlap", 30.0),
    ]
    optimize_module, _ = _fake_trainer(monkeypatch, 0.005, run_s=1.0, findings=findings[:1])
    second = [findings[1]]

    real = optimize_module.analyze

    def analyze_rounds(path: Path):  # type: ignore[no-untyped-def]
        a = real(path)
        return a if a.findings else SimpleNamespace(findings=second, metrics=a.metrics)

    monkeypatch.setattr(optimize_module, "analyze", analyze_rounds)
    opt = optimize_module.run_optimize(
        config="tiny-cpu", nproc=2, overrides=["overlap.bucket_cap_mb=0.005"], out=tmp_path / "opt",
        steps=None, repeats=3, verify=False,
    )  # fmt: skip
    buckets = next(t for t in opt.trials if t.remedy == "bucket_size")
    assert buckets.measured_ms == pytest.approx(20.0, rel=0.2)
    overlap = next(t for t in opt.trials if t.remedy == "overlap")  # the same family: scaled by ~1/3
    assert overlap.expected_ms == pytest.approx(30.0 * buckets.measured_ms / 60.0, rel=1e-6)
    assert "predicted 30.0 (learned from earlier trials: 10." in optimize_summary(opt.to_json())


def test_a_sweep_never_drops_what_an_earlier_start_measured(tmp_path: Path) -> None:
    """Rerunning a sweep with fewer layouts into the same --out had rewritten its ledger without the
    layouts left out, measured runs and all."""
    from perfkit.optimizer.sweep import Sweep, _ledger

    def sweep(*layouts: str) -> Sweep:
        s = Sweep("tiny-cpu", 2, [], 1)
        s.candidates = [Candidate(x, [x]) for x in layouts]
        return s

    ledger = {"schema_version": 2, "config": "tiny-cpu", "nproc": 2, "nodes": 1, "overrides": [], "candidates": [
        {"overrides": ["parallel.tp=2"], "runs": [{"ok": True, "step_ms": 40.0}]},
        {"overrides": ["parallel.pp=2"], "runs": [{"ok": True, "step_ms": 30.0}]},
    ]}  # fmt: skip
    (tmp_path / "sweep.json").write_text(json.dumps(ledger))
    assert _ledger(tmp_path, sweep("parallel.tp=2", "parallel.pp=2", "parallel.zero=1"))[("parallel.pp=2",)]
    with pytest.raises(ConfigError, match=r"measured layouts this one leaves out \(parallel.pp=2\)"):
        _ledger(tmp_path, sweep("parallel.tp=2"))


@pytest.mark.parametrize(
    ("change", "said"),
    [
        ({"schema_version": 9}, "schema 9"),
        ({"schema_version": "2"}, "schema '2'"),
        ({"candidates": [{"overrides": ["parallel.tp=2"], "runs": [{"ok": True, "step_ms": -70.0}]}]},
         "impossible step_ms"),
        ({"candidates": [{"overrides": ["parallel.tp=2"], "runs": [{"ok": "yes"}]}]}, "without ok"),
        ({"candidates": [{"overrides": ["parallel.tp=2"], "runs": [{"ok": True, "samples_ms": [1, "x"]}]}]},
         "impossible samples_ms"),
        ({"candidates": [{"overrides": ["parallel.tp=2"], "runs": 5}]}, "damaged"),
    ],
)  # fmt: skip
def test_a_tampered_or_newer_sweep_ledger_is_refused(
    tmp_path: Path, change: dict[str, Any], said: str
) -> None:
    """A ledger from a newer perfkit had been rewritten in the old schema (its data dropped); an edited
    one gave tracebacks or negative speed-ups."""
    from perfkit.errors import RunDirError
    from perfkit.optimizer.sweep import Sweep, _ledger

    s = Sweep("tiny-cpu", 2, [], 1)
    s.candidates = [Candidate("tp", ["parallel.tp=2"])]
    ledger = {
        "schema_version": 2,
        "config": "tiny-cpu",
        "nproc": 2,
        "nodes": 1,
        "overrides": [],
        "candidates": [],
    }
    (tmp_path / "sweep.json").write_text(json.dumps({**ledger, **change}))
    with pytest.raises(RunDirError, match=re.escape(said)):
        _ledger(tmp_path, s)


def test_one_sweep_at_a_time_in_a_folder(tmp_path: Path) -> None:
    """Two sweeps in one --out at once: the second had renamed the first's basis and both measured on
    the same cores. A claim left by a killed sweep is taken over."""
    import os
    import socket

    from perfkit.optimizer.sweep import _claimed

    lock = tmp_path / ".sweep.lock"
    with _claimed(tmp_path):
        assert lock.read_text() == f"{os.getpid()} {socket.gethostname()}"
        with pytest.raises(ConfigError, match=f"another perfkit sweep \\(pid {os.getpid()}\\) is running"):
            with _claimed(tmp_path):
                pass
    assert not lock.exists()
    lock.write_text(f"999999999 {socket.gethostname()}")  # no such process: a killed sweep's claim
    with _claimed(tmp_path):
        assert lock.read_text().startswith(str(os.getpid()))


def test_a_peak_predicted_as_a_lower_bound_is_held_not_scored() -> None:
    """FSDP2's RSS on CPU grows step after step, so its peak is predicted as a lower bound: the
    sweep counts whether the measured peak reached it, and keeps it out of the point predictions'
    error (which a 24% shortfall there had dominated in every run)."""
    from perfkit.optimizer.sweep import Sweep

    def layout(name: str, predicted_mib: float, measured_mib: float, bound: bool = False) -> Candidate:
        c = Candidate(
            name, [], [Measurement(ok=True, step_ms=10.0, peak_memory_bytes=int(measured_mib * 2**20))]
        )
        c.runs[0].steps = 8
        c.predicted = {"step_ms": 10.0, "peak_memory_bytes": predicted_mib * 2**20}
        if bound:
            c.predicted["peak_memory_lower_bound"] = True
        return c

    sweep = Sweep("tiny-cpu", 2, [], 1)
    sweep.candidates = [layout("dp2", 100, 110), layout("zero3", 100, 130, bound=True), layout("tp2", 90, 90)]
    a = sweep.agreement()
    assert a["memory_error_max"] == pytest.approx(10 / 110) and a["layouts_with_memory"] == 2
    assert (a["memory_lower_bounds"], a["memory_lower_bounds_held"]) == (1, 1)
    sweep.candidates[1] = layout("zero3", 100, 80, bound=True)  # under its own lower bound: not held
    assert sweep.agreement()["memory_lower_bounds_held"] == 0
    sweep.candidates.pop(1)
    assert "memory_lower_bounds" not in sweep.agreement()


def test_a_sweep_says_what_its_own_runs_resolve() -> None:
    """On 2 CPU ranks at tiny-cpu one run of a layout missed the median of its other runs by over 15%
    in half the bench's rounds: a prediction from one basis run cannot be held closer than that,
    so the sweep says how far one round's runs came from the median of the others, each round."""
    from perfkit.reports.text import sweep_summary

    from perfkit.optimizer.sweep import Sweep

    def layout(name: str, runs: list[float]) -> Candidate:
        c = Candidate(name, [], [Measurement(ok=True, step_ms=ms) for ms in runs])
        for r in c.runs:
            r.steps = 8
        c.predicted = {"step_ms": runs[0]}
        return c

    sweep = Sweep("tiny-cpu", 2, [], 1)
    sweep.candidates = [layout("dp2", [10.0, 12.0, 10.0]), layout("tp2", [40.0, 40.0, 50.0])]
    # round 0: dp2 10 against 11 (-9.1%), tp2 40 against 45 (-11.1%); round 1: dp2 12 against 10
    # (+20%), tp2 40 against 45; round 2: dp2 10 against 11, tp2 50 against 40 (+25%)
    assert sweep.resolution(8) == pytest.approx([1 / 9, 0.2, 0.25])
    a = sweep.agreement()
    assert a["runs_resolve"] == pytest.approx(0.2)
    line = "the runs themselves resolve about 20%: one round's run of each layout came within that"
    assert line in sweep_summary(sweep.to_json(), 8)
    assert "25% at worst" in sweep_summary(sweep.to_json(), 8)
    for c in sweep.candidates:  # measured only (--no-predict): the runs resolve the same
        c.predicted = None
    assert sweep.agreement()["runs_resolve"] == pytest.approx(0.2)
    from perfkit.reports.trials import render

    assert "The runs themselves resolve about 20%" in render(sweep.to_json())
    sweep.candidates[1].runs.pop()  # two runs: nothing to hold one against
    assert sweep.resolution(8) == [] and "runs_resolve" not in sweep.agreement()
