"""The layout model (perfkit whatif, the sweep's predictions), the sweep's ledger and successive
halving: on synthetic basis runs whose figures are known, so every number can be checked."""

from __future__ import annotations

import dataclasses
import gzip
import json
import math
from pathlib import Path

import pytest
from helpers import run_perfkit
from perfkit.reports.text import sweep_summary

from perfkit.errors import RunDirError
from perfkit.optimizer import layoutmodel as lm
from perfkit.optimizer import sweep as sw
from perfkit.optimizer.pipesim import step_seconds
from perfkit.optimizer.trials import Measurement
from perfkit.run import Run
from perfkit.trainer.config import load_config, resolve_layout

ALPHA, BETA = 0.5e-3, 200e6  # the collectives planted in the basis: 0.5 ms + bus bytes at 200 MB/s


def shape(*sets: str, world: int = 2) -> lm.Shape:
    cfg = load_config("tiny-cpu", list(sets))
    return lm.Shape(cfg, resolve_layout(cfg, world))


def make_basis(
    tmp: Path,
    *sets: str,
    world: int = 2,
    rss: int = 400 << 20,
    link_beta: float | None = None,
    n_steps: int = 10,
    costs: dict[str, float] | None = None,
    step_wait: float | None = None,
) -> Path:
    """A finished run of tiny-cpu with 10 steps a rank: 30 ms a step, 8 forward, 14 backward, 2 optimizer,
    1 data wait; DDP's bucket all-reduce and a 4-byte all-reduce timed exactly by ALPHA and BETA
    (plus, for some, a wait for the last rank that the fit must see through)."""
    cfg = load_config("tiny-cpu", list(sets))
    run = Run.create(tmp / "basis", command=["x"], world_size=world, config=cfg.to_dict(),
                     env={"host_memory_bytes": 24 << 30})  # fmt: skip
    if costs is not None:  # perfkit.trainer.costs, as the trainer describes them
        run.manifest.model["layout_costs"] = costs
    grads = shape(*sets, world=world).rank_params(0) * 4
    t = 1_000_000_000
    for rank in range(world):
        d = run.layout.rank_dir(rank)
        d.mkdir(parents=True, exist_ok=True)
        steps, comms, mem = [], [], []
        for step in range(1, n_steps + 1):
            steps.append({"step": step, "start_ns": t, "end_ns": t + 30_000_000, "step_time_s": 0.030,
                          "data_wait_s": 0.001, "forward_s": 0.008, "backward_s": 0.014, "optimizer_s": 0.002,
                          "tokens": 512, "loss": 5.0, "perfkit_s": 0.0})  # fmt: skip
            start = t
            for seq, nbytes in ((2 * step, grads), (2 * step + 1, 4)):
                dur = ALPHA + (2 * (world - 1) / world) * nbytes / BETA
                wait = 0.004 * (step % 3)  # a wait for the last rank in two steps of three
                end = start + int((dur + wait) * 1e9)
                comms.append({"step": step, "seq": seq, "op": "all_reduce", "source": "ddp", "group": "0",
                              "group_ranks": "0,1", "group_size": world, "bytes": nbytes, "dtype": "float32",
                              "start_ns": start, "end_ns": end})  # fmt: skip
                start = end + 100_000
            mem.append({"step": step, "rss": rss, "device": "cpu"})
            t += 30_000_000
        if link_beta:  # perfkit.probe_links() after the last step: 5 all-reduces of 4 sizes
            for seq, nbytes in enumerate(
                [n for n in (4 << 10, 256 << 10, 4 << 20, 32 << 20) for _ in range(5)]
            ):
                dur = ALPHA + (2 * (world - 1) / world) * nbytes / link_beta
                comms.append({"step": n_steps + 1, "seq": 100 + seq, "op": "all_reduce", "source": "probe", "group": "0",
                              "group_ranks": "0,1", "group_size": world, "bytes": nbytes, "dtype": "float32",
                              "start_ns": t, "end_ns": t + int(dur * 1e9)})  # fmt: skip
                t += int(dur * 1e9) + 100_000
        if link_beta and step_wait is not None:  # then 40 calls after bursts of compute: half wait 2x
            for i in range(40):
                dur = ALPHA + (2 * (world - 1) / world) * (192 << 10) / link_beta + step_wait * 2 * (i % 2)
                comms.append({"step": n_steps + 1, "seq": 200 + i, "op": "all_reduce", "source": "probe-step",
                              "group": "0", "group_ranks": "0,1", "group_size": world, "bytes": 192 << 10,
                              "dtype": "float32", "start_ns": t, "end_ns": t + int(dur * 1e9)})  # fmt: skip
                t += int(dur * 1e9) + 2_000_000
        for name, rows in (("steps", steps), ("comms", comms), ("memory", mem)):
            (d / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run.manifest.status = "complete"
    run.save()
    return run.path


def test_parameter_counts_match_the_trainers() -> None:
    # tiny-cpu: the trainer reports 140,832 parameters (manifest model.parameters)
    s = shape("parallel.tp=1", world=1)
    assert s.rank_params(0) == 140_832
    # pipeline stages and tensor parallel ranks split the blocks; the embeddings and head stay whole
    pp = shape("parallel.pp=2")
    assert pp.rank_params(0) + pp.rank_params(1) == 140_832
    tp = shape("parallel.tp=2")
    assert tp.rank_params(0) == 140_832 - 2 * s.block_params  # half of four blocks' parameters
    # the busiest rank has all the per-token FLOPs of a single process, halved by the layers it has
    assert pp.stage_flops_per_token(1) > pp.stage_flops_per_token(0)  # the head is on the last stage


def test_memory_model_orders_the_layouts() -> None:
    ddp = lm.memory_parts(shape())
    z1, z3 = lm.memory_parts(shape("parallel.zero=1")), lm.memory_parts(shape("parallel.zero=3"))
    assert z1["optimizer state"] == ddp["optimizer state"] / 2  # sharded over 2 data-parallel ranks
    assert z3["parameters"] < ddp["parameters"] and ddp["gradients"] / 2 < z3["gradients"] < ddp["gradients"]
    assert "DDP buckets" in ddp and "DDP buckets" not in lm.memory_parts(
        shape("overlap.gradient_as_bucket_view=true")
    )
    assert lm.activation_bytes(shape("kernels.activation_checkpointing=true")) < lm.activation_bytes(shape())
    assert lm.activation_bytes(shape("kernels.attention=eager")) > lm.activation_bytes(shape())
    # GPipe keeps every microbatch's activations; 1F1B at most one per stage in flight
    gpipe = shape("parallel.pp=2", "parallel.microbatches=8", "parallel.pp_schedule=gpipe")
    onefoneb = shape("parallel.pp=2", "parallel.microbatches=8")
    assert lm.activation_bytes(gpipe) > 2 * lm.activation_bytes(onefoneb)


def test_collectives_per_layout() -> None:
    by = lambda s: {c.what: (c.op, c.calls) for c in lm.collectives(s)}  # noqa: E731
    assert by(shape()) == {"gradients (DDP)": ("all_reduce", 1)}
    # torch's ZeroRedundancyOptimizer broadcasts every parameter tensor (69 in tiny-cpu) from its owner
    assert by(shape("parallel.zero=1"))["parameters (ZeRO-1)"] == ("broadcast", 69)
    # FSDP2's gathers and scatters each wait for the slowest rank; DDP's buckets once, at backward's end
    assert [c.waits for c in lm.collectives(shape("parallel.zero=3"))] == [10, 5, 1]
    assert [c.waits for c in lm.collectives(shape())] == [1]
    assert by(shape("overlap.bucket_cap_mb=0.05"))["gradients (DDP)"][1] == math.ceil(
        140_832 * 4 / (0.05 * 2**20)
    )
    z3 = by(shape("parallel.zero=3"))
    assert z3["parameters (FSDP all-gather)"] == (
        "all_gather",
        2 * 5,
    )  # forward and backward, 4 blocks + root
    # as the trainer's plan issues them (counted in a profiled tiny-cpu run): q, k, v and fc1 each
    # all-reduce their input's gradient, attn.o and fc2 their output
    tp = by(shape("parallel.tp=2"))
    assert tp == {"activations (TP all-reduce)": ("all_reduce", 6 * 4), "gradient norm": ("all_reduce", 1)}
    assert by(shape("parallel.tp=2", "parallel.sequence_parallel=true")) == {
        "activations (TP all-gather)": ("all_gather", 18),
        "activations (TP reduce-scatter)": ("reduce_scatter", 16),
        "gradient norm": ("all_reduce", 1),
    }
    assert by(shape("parallel.pp=2", "parallel.microbatches=4"))["activations (pipeline send/recv)"][1] == 8
    # the last stage (two blocks and the head) is the busiest; the first (two blocks) fills and drains
    two = shape("parallel.pp=2", "parallel.microbatches=2")
    first, last = two.stage_flops_per_token(0), two.stage_flops_per_token(1)
    assert two.busiest == 1 and first < last
    assert two.pipeline_fill == pytest.approx(1 + first / (2 * last)) and 1.4 < two.pipeline_fill < 1.5
    eight = shape("parallel.pp=2", "parallel.microbatches=8")
    assert eight.pipeline_fill == pytest.approx(1 + first / (8 * last))
    # interleaved: (m + (pp - 1) / v) / m
    looped = shape("parallel.pp=2", "parallel.microbatches=4", "parallel.pp_schedule=interleaved-1f1b")
    assert looped.layout.stages_per_rank == 2 and looped.pipeline_fill == pytest.approx((4 + 1 / 2) / 4)


def test_basis_fits_the_planted_collectives_and_predicts_itself(tmp_path: Path) -> None:
    b = lm.basis_from_run(make_basis(tmp_path))
    assert b.alpha_s == pytest.approx(ALPHA, rel=0.05) and b.beta_bytes_per_s == pytest.approx(BETA, rel=0.05)
    assert b.wait_s == pytest.approx(0.004, rel=0.05)  # the median wait planted (0, 4 or 8 ms)
    assert "fitted to 28 recorded collectives" in b.comm_basis  # steps 4-10, two a step, two ranks
    p = lm.predict(b, load_config("tiny-cpu"), 2)
    assert p.step_s == pytest.approx(0.030, rel=1e-6)  # the basis's own layout: its measured step
    assert p.peak_bytes == pytest.approx(400 << 20)
    # an unchanged-compute layout with more collectives costs exactly the modelled collectives more
    small = lm.predict(b, load_config("tiny-cpu", ["overlap.bucket_cap_mb=0.05"]), 2)
    buckets = math.ceil(140_832 * 4 / (0.05 * 2**20))
    assert small.step_s - p.step_s == pytest.approx((buckets - 1) * ALPHA, rel=0.05)
    # ZeRO-3 halves the optimizer's work and the state; FSDP's collectives replace DDP's, and each
    # of them, blocking, also waits for the slower rank
    z3 = lm.predict(b, load_config("tiny-cpu", ["parallel.zero=3"]), 2)
    assert z3.time_parts["parameters (FSDP all-gather)"] > 10 * (ALPHA + 0.004)
    assert z3.time_parts["optimizer"] == pytest.approx(0.001) and z3.peak_bytes < p.peak_bytes
    # on CPU, FSDP2's peak RSS grows step after step: its peak is a lower bound, and says so
    assert z3.to_json()["peak_memory_lower_bound"] and "peak_memory_lower_bound" not in p.to_json()
    # four ranks of data parallelism: half the compute a rank
    four = lm.predict(b, load_config("tiny-cpu"), 4)
    assert four.time_parts["compute"] == pytest.approx(p.time_parts["compute"] / 2)
    # the trainer's own peak (ru_maxrss, what a sweep's runs report) wins over step-end samples
    assert any("sampled at step ends" in n for n in b.notes)
    (tmp_path / "basis" / "train_log.jsonl").write_text(
        json.dumps({"step": 10, "tokens": 512, "step_time_s": 0.03, "peak_memory_bytes": 500 << 20}) + "\n"
    )
    assert (
        lm.predict(lm.basis_from_run(tmp_path / "basis"), load_config("tiny-cpu"), 2).peak_bytes == 500 << 20
    )


def test_a_basis_with_stalls_predicts_its_mean_step(tmp_path: Path) -> None:
    """A sweep measures a layout's mean step: one step of the basis's seven after the warm-up stalls
    30 ms more, so its step is the mean (34.3 ms), its parts add up to the median (30), and every
    layout carries the same share of stalls."""
    basis = make_basis(tmp_path)
    for rank in (0, 1):
        path = basis / f"rank{rank}" / "steps.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        rows[7]["step_time_s"] = 0.060
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    b = lm.basis_from_run(basis)
    assert b.median_step_s == pytest.approx(0.030) and b.step_s == pytest.approx((6 * 0.030 + 0.060) / 7)
    own = lm.predict(b, load_config("tiny-cpu"), 2)
    assert own.step_s == pytest.approx(b.step_s) and b.refusal() is None
    assert own.time_parts["stalls (mean over median step)"] == pytest.approx(b.step_s - 0.030)
    z3 = lm.predict(b, load_config("tiny-cpu", ["parallel.zero=3"]), 2)
    stalls = z3.time_parts.pop("stalls (mean over median step)")
    assert stalls == pytest.approx(sum(z3.time_parts.values()) * (b.step_s / 0.030 - 1))


def test_whatif_prints_one_screen(tmp_path: Path) -> None:
    run = make_basis(tmp_path)
    r = run_perfkit("whatif", str(run), "--set", "parallel.tp=2")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) <= 40 and "tp2 on 2 rank(s)" in lines[0]
    (step,) = [ln for ln in lines if ln.startswith("time per step (ms)")]
    measured, modelled, change = (float(x) for x in step.split()[4:7])
    assert measured == modelled == 30.0 and change > measured  # 24 all-reduces of activations a step
    assert any("activations (TP all-reduce)" in ln for ln in lines) and "alpha 0.500 ms" in r.stdout
    header = next(ln for ln in lines if "measured" in ln and "modelled" in ln)
    assert len(header.split()) == len(step.split()) - 4  # a header over each column of figures
    assert any(ln.startswith("measured: the median step after the first 3 (warm-up) steps") for ln in lines)
    assert "note: the basis run" not in r.stdout
    bad = run_perfkit("whatif", str(run), "--set", "device=cuda")
    assert bad.returncode == 2 and "profile a run there" in bad.stderr and "Traceback" not in bad.stderr
    bad = run_perfkit("whatif", str(run), "--set", "parallel.tp=3")
    assert (
        bad.returncode == 2
        and "does not divide model.n_heads" in bad.stderr
        and "Traceback" not in bad.stderr
    )
    other = Run.create(tmp_path / "script", command=["python", "x.py"], world_size=1)
    bad = run_perfkit("whatif", str(other.path), "--set", "parallel.tp=2")
    assert (
        bad.returncode != 0 and len(bad.stderr.strip().splitlines()) == 1 and "bundled trainer" in bad.stderr
    )


def test_a_basis_that_cannot_reproduce_itself_refuses(tmp_path: Path) -> None:
    """Too few steps after the warm-up, or a model that misses the basis's own step by more than 5%:
    no prediction, and one line that says why (a 4-step basis had predicted 2368 ms for a layout that
    measured 119, and whatif of it with no change had printed 2368 against the 329 ms it measured)."""
    short = run_perfkit("whatif", str(make_basis(tmp_path / "short", n_steps=4)), "--set", "parallel.tp=2")
    assert short.returncode != 0 and len(short.stderr.strip().splitlines()) == 1, short.stderr
    assert "has 1 step(s) after its 3 warm-up steps" in short.stderr and "steps=" in short.stderr
    b = lm.basis_from_run(make_basis(tmp_path / "long"))
    assert b.refusal() is None and b.steps_used == 7
    p = lm.predict(b, load_config("tiny-cpu", ["parallel.tp=2"]), 2)
    assert p.uncertainty_s == 0.0  # every planted step lasts 30 ms: no spread
    b.alpha_s = 0.05  # collectives fitted at 50 ms a call: more than the step's forward and backward
    refusal = b.refusal()
    assert refusal is not None and "does not reproduce its basis" in refusal and "+" in refusal


def test_a_basis_whose_perfkit_was_killed_says_so(tmp_path: Path) -> None:
    run = Run.open(make_basis(tmp_path))
    run.manifest.status, run.manifest.pid = "running", 2**22 + 12345  # no such process
    run.save()
    r = run_perfkit("whatif", str(run.path), "--set", "parallel.tp=2")
    assert r.returncode == 0 and "note: the basis run failed: its steps may stop early" in r.stdout


def test_spearman_and_halving() -> None:
    assert sw.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert sw.spearman([1, 2, 3, 4], [40, 30, 20, 10]) == pytest.approx(-1.0)
    assert sw.spearman([1, 2, 3, 4], [10, 30, 20, 40]) == pytest.approx(0.8)
    assert sw.spearman([1, 2], [1, 2]) is None
    assert sw.halving_rungs(4, None, 20, 2) == [(4, 20, 2)]
    assert sw.halving_rungs(9, 2, 40, 3) == [(9, 7, 1), (5, 10, 1), (3, 20, 1), (2, 40, 3)]


def _fake_measure(calls: list[tuple[str, ...]], stop_after: int | None = None):  # type: ignore[no-untyped-def]
    """A measure() that times a layout by its predicted order: dp2 10 ms, zero3 20, tp2 30, pp2 40."""
    speed = {"parallel.zero=3": 20.0, "parallel.tp=2": 30.0, "parallel.pp=2": 40.0}

    def measure(config, nproc, overrides, workdir, nodes=None, run_id=""):  # type: ignore[no-untyped-def]
        if stop_after is not None and len(calls) >= stop_after:
            raise KeyboardInterrupt
        calls.append(tuple(overrides))
        ms = next((v for k, v in speed.items() if k in overrides), 10.0)
        return Measurement(ok=True, step_ms=ms, tokens_per_s=1e5 / ms, loss=4.0, peak_memory_bytes=400 << 20,
                           samples_ms=[ms] * 5)  # fmt: skip

    return measure


LAYOUTS = ["tp=1", "zero=3", "tp=2", "pp=2"]


def test_sweep_ledger_resumes_without_measuring_twice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    basis, out = make_basis(tmp_path), tmp_path / "sweep"
    calls: list[tuple[str, ...]] = []
    monkeypatch.setattr(sw, "measure", _fake_measure(calls, stop_after=3))
    with pytest.raises(KeyboardInterrupt):
        sw.run_sweep("tiny-cpu", 2, ["steps=12"], LAYOUTS, 2, out, basis_run=basis)
    kept = json.loads((out / "sweep.json").read_text())
    assert kept["interrupted"] and sum(len(c["runs"]) for c in kept["candidates"]) == 3
    monkeypatch.setattr(sw, "measure", _fake_measure(calls))
    result = sw.run_sweep("tiny-cpu", 2, ["steps=12"], LAYOUTS, 2, out, basis_run=basis)
    assert len(calls) == 8 and len(set(calls)) == 4  # 4 layouts x 2 runs, none twice (3 before, 5 after)
    assert all(len(c.runs) == 2 for c in result.candidates)
    data = result.to_json()
    assert [c["label"] for c in data["candidates"]] == ["dp2", "dp2 zero3", "tp2", "pp2 1f1b"]
    assert data["agreement"]["layouts_ranked"] == 4 and data["agreement"]["spearman"] is not None
    # the basis's own layout (dp2, the basis's 30 ms against the 10 ms its plain runs took here):
    # the host's drift every prediction carries, and each layout's ratio to it without that drift
    a = data["agreement"]
    own = data["candidates"][0]["predicted"]["step_ms"]
    assert a["basis_drift"] == pytest.approx(own / 10.0 - 1)
    ratios = [(c["predicted"]["step_ms"] / own) / (c["step_ms"] / 10.0) - 1 for c in data["candidates"]]
    assert a["ratio_error_max"] == pytest.approx(max(abs(r) for r in ratios))
    assert (
        f"the basis's profiled run took {a['basis_drift']:+.0%} against its layout's plain runs"
        in sweep_summary(data, 12)
    )
    assert all(c["predicted"]["step_ms"] > 0 for c in data["candidates"])
    # a third start measures nothing; a different sweep in the same folder is refused in one line
    sw.run_sweep("tiny-cpu", 2, ["steps=12"], LAYOUTS, 2, out, basis_run=basis)
    assert len(calls) == 8
    r = run_perfkit("sweep", "--steps", "8", "--layout", "tp=1", "--out", str(out), "--basis", str(basis))
    assert r.returncode == 2 and "holds a different sweep" in r.stderr


def test_a_sweep_of_a_kernel_change_says_its_speed_is_not_predicted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A layout with eager attention is predicted at the basis's kernels' time: the sweep's summary
    says so beside it, and not beside a plain layout."""
    basis, out = make_basis(tmp_path), tmp_path / "sweep"
    monkeypatch.setattr(sw, "measure", _fake_measure([]))
    data = sw.run_sweep(
        "tiny-cpu", 2, ["steps=12"], ["tp=1", "tp=1,kernels.attention=eager"], 1, out, basis_run=basis
    ).to_json()
    said = sweep_summary(data, 12).splitlines()
    eager = [line for line in said if "does not time a kernel change" in line]
    assert len(eager) == 1 and "kernels.attention=eager" in eager[0] and "whatif --speedup" in eager[0]
    from perfkit.reports import trials

    page = trials.render(data)
    assert page.count("does not time a kernel change") == 1 and "dp2 kernels.attention=eager:" in page


def test_sweep_prunes_what_will_not_fit_and_halves_the_rest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    basis = make_basis(tmp_path)
    calls: list[tuple[str, ...]] = []
    monkeypatch.setattr(sw, "measure", _fake_measure(calls))
    b = lm.basis_from_run(basis)
    # a limit just under the largest predicted peak: that layout is listed, not run
    peaks = {s: lm.predict_overrides(b, "tiny-cpu", sw.parse_layout(s), 2).peak_bytes or 0.0 for s in LAYOUTS}
    biggest = max(peaks, key=lambda k: peaks[k])
    limit = (peaks[biggest] + max(v for k, v in peaks.items() if k != biggest)) / 2
    result = sw.run_sweep("tiny-cpu", 2, ["steps=16"], LAYOUTS, 2, tmp_path / "s", basis_run=basis,
                          top=1, memory_limit=limit)  # fmt: skip
    pruned = [c for c in result.candidates if c.skipped]
    assert len(pruned) == 1 and pruned[0].overrides[-1] == sw.parse_layout(biggest)[0]
    assert "exceeds" in pruned[0].skipped and "--memory-limit" in pruned[0].skipped and not pruned[0].runs
    assert result.rungs == [(3, 7, 1), (2, 8, 1), (1, 16, 2)]
    # the fastest measured layout reached the full runs; the slowest stopped after the first rung
    ran = sorted((c for c in result.candidates if c.runs), key=lambda c: c.runs[0].step_ms or 0)
    assert [r.steps for r in ran[0].runs] == [7, 8, 16, 16]
    assert [r.steps for r in ran[-1].runs] == [7]
    data = result.to_json()
    assert data["candidates"][0]["label"] == ran[0].label and data["candidates"][0]["vs_best"] == 1.0
    assert data["rungs"] == [[3, 7, 1], [2, 8, 1], [1, 16, 2]] and data["candidates"][-1]["skipped"]


def test_nccl_collectives_are_fitted_from_their_gpu_time(tmp_path: Path) -> None:
    """On NCCL a row's end is unknown (the call returned once queued) and its time is the GPU's
    (gpu_ms): the fit had dropped every such row, the link probe's too."""
    run = make_basis(tmp_path, link_beta=4 * BETA)
    for rank in (0, 1):
        path = run / f"rank{rank}" / "comms.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        for r in rows:
            r["gpu_ms"], r["end_ns"] = (r["end_ns"] - r["start_ns"]) / 1e6, None
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    b = lm.basis_from_run(run)
    assert b.beta_bytes_per_s > 3 * BETA and "and the link probe's 40" in b.comm_basis
    assert not any("assumed" in n for n in b.notes)


def test_the_link_probe_gives_the_bandwidth(tmp_path: Path) -> None:
    """In the steps, large collectives share the machine with backward; the link probe (nothing else
    running, up to 32 MiB) sets the bandwidth, the steps' calls the latency and the wait."""
    b = lm.basis_from_run(make_basis(tmp_path, link_beta=4 * BETA))
    assert b.beta_bytes_per_s > 3 * BETA and b.alpha_s == pytest.approx(ALPHA, rel=0.2)
    assert "and the link probe's 40" in b.comm_basis
    assert not any("DDP's bucket" in n for n in b.notes)  # the note for a fit to DDP's buckets alone
    # the probe's rows are not the job's: the collectives table and the basis's own prediction ignore them
    p = lm.predict(b, load_config("tiny-cpu"), 2)
    assert p.step_s == pytest.approx(0.030, rel=1e-6)


def test_a_blocking_call_waits_what_the_probe_measured_between_compute(tmp_path: Path) -> None:
    """The wait a blocking collective pays (tensor parallel, FSDP2) is the mean time beyond the fit
    of the probe's calls after bursts of compute, the slowest tenth left out: half of them wait 2 ms
    here (the median would say 0 or 2 by a coin; DDP's drifting buckets had said 20 ms at 12.8M)."""
    b = lm.basis_from_run(make_basis(tmp_path, link_beta=4 * BETA, step_wait=0.001))
    # the slowest tenth (8 of the 40 waits of 2 ms over both ranks) left out: 32 x 2 ms over 72 calls
    assert b.wait_s == pytest.approx(0.002 * 32 / 72, rel=0.05) and "between compute" in b.comm_basis
    tp = lm.predict(b, load_config("tiny-cpu", ["parallel.tp=2"]), 2)
    calls = 6 * 4  # six all-reduces a block
    transfer = b.alpha_s + 196_608 / b.beta_bytes_per_s  # bus bytes of a 2-rank all-reduce: the size
    assert tp.time_parts["activations (TP all-reduce)"] == pytest.approx(calls * (transfer + b.wait_s))
    # without the probe's calls, the wait is read from DDP's buckets (the planted 0, 4 and 8 ms)
    alone = lm.basis_from_run(make_basis(tmp_path / "b", link_beta=4 * BETA))
    assert alone.wait_s > 0.003 and "between compute" not in alone.comm_basis


def test_pipeline_schedule_is_simulated_where_its_stages_were_measured(tmp_path: Path) -> None:
    """With the pipelined copy's stages measured, the bubble is the schedule simulated as torch
    runs it (each send waits for its receive, at the link's latency) and the machinery a microbatch
    is the copy's growth less its simulated schedule's: both less than the closed form said."""
    costs = {"chunk_overhead_s": 0.0005, "pipeline_microbatch_s": 0.0015, "pipeline_first_s": 0.002,
             "pipeline_last_s": 0.0024, "pipeline_middle_s": 0.0}  # fmt: skip
    b = lm.basis_from_run(make_basis(tmp_path / "sim", costs=costs))
    old = lm.basis_from_run(
        make_basis(tmp_path / "closed", costs={"chunk_overhead_s": 0.0005, "pipeline_microbatch_s": 0.0015})
    )
    machinery = b.pipeline_machinery_s()
    assert machinery is not None and 0 < machinery < 0.0015 and old.pipeline_machinery_s() == 0.0015
    # the copy's slope as the simulation has it (2 stages, 1F1B, 4 and 12 microbatches): the rest
    fwd, bwd = [0.002 / 3, 0.0024 / 3], [0.004 / 3, 0.0048 / 3]
    latency = b.pipeline_latency_s(b.shape.layout.micro_batch // 2, 4)
    slope = (step_seconds("1f1b", fwd, bwd, 12, latency) - step_seconds("1f1b", fwd, bwd, 4, latency)) / 8
    assert machinery == pytest.approx(0.0015 + 0.0024 - slope)
    for sets in (["parallel.pp=2"], ["parallel.pp=2", "parallel.microbatches=8"],
                 ["parallel.pp=2", "parallel.microbatches=8", "parallel.pp_schedule=gpipe"]):  # fmt: skip
        cfg = load_config("tiny-cpu", sets)
        parts = lm.predict(b, cfg, 2).time_parts
        busiest = sum(
            parts[k]
            for k in ("compute", "microbatches (dispatch)", "pipeline schedule (measured)")
            if k in parts
        )
        shape = b.shape_of(cfg, 2)
        m = shape.layout.microbatches
        w = [shape.stage_flops_per_token(r) for r in range(2)]
        chunks = [busiest / m * x / max(w) for x in w]
        step = step_seconds(cfg.parallel.pp_schedule, [c / 3 for c in chunks], [2 * c / 3 for c in chunks], m,
                            b.pipeline_latency_s(shape.layout.micro_batch, 4))  # fmt: skip
        assert parts["pipeline bubble"] == pytest.approx(step - busiest)
        # the sends' waits: more than the closed form's fill and drain at these parts
        assert parts["pipeline bubble"] > busiest * (shape.pipeline_fill - 1)
    # GPipe waits on every send, 1F1B on fewer: at 8 microbatches GPipe's bubble is the larger
    one, gp = (lm.predict(b, load_config("tiny-cpu", ["parallel.pp=2", "parallel.microbatches=8", f"parallel.pp_schedule={s}"]), 2)
               for s in ("1f1b", "gpipe"))  # fmt: skip
    assert gp.time_parts["pipeline bubble"] > one.time_parts["pipeline bubble"]
    # interleaved schedules are simulated too, each rank's two looped stages a chunk each
    sets = ["parallel.pp=2", "parallel.microbatches=4", "parallel.pp_schedule=interleaved-1f1b"]
    looped = lm.predict(b, load_config("tiny-cpu", sets), 2)
    shape = b.shape_of(load_config("tiny-cpu", sets), 2)
    staged = sum(
        looped.time_parts[k]
        for k in ("compute", "microbatches (dispatch)", "pipeline schedule (measured)")
        if k in looped.time_parts
    )
    w = [shape.virtual_stage_flops_per_token(s) for s in range(4)]
    assert sum(w) == pytest.approx(sum(shape.stage_flops_per_token(r) for r in range(2)))
    chunks = [staged / 4 * x / shape.stage_flops_per_token(shape.busiest) for x in w]
    step = step_seconds("interleaved-1f1b", [c / 3 for c in chunks], [2 * c / 3 for c in chunks], 4,
                        b.pipeline_latency_s(shape.layout.micro_batch, 4), stages_per_rank=2)  # fmt: skip
    assert looped.time_parts["pipeline bubble"] == pytest.approx(step - staged)
    # the sends' waits (three transfers a microbatch each way): more than the closed form's fill
    assert looped.time_parts["pipeline bubble"] > staged * (shape.pipeline_fill - 1)


def test_a_looped_stage_pays_what_the_interleaved_copy_measured(tmp_path: Path) -> None:
    """The copy with a second block a rank as a looped stage (interleaved 1F1B) took longer than
    its one-block 1F1B copy beyond what the simulation of both says: that much a microbatch of each
    second stage is charged in place of the 1F1B stage's machinery; without it, the machinery."""
    from perfkit.optimizer.pipesim import step_seconds
    from perfkit.trainer.costs import PIPE_MICROBATCHES

    costs = {"chunk_overhead_s": 0.0005, "pipeline_microbatch_s": 0.0015, "pipeline_first_s": 0.002,
             "pipeline_last_s": 0.0024, "pipeline_block_s": 0.0016}  # fmt: skip
    plain = lm.basis_from_run(make_basis(tmp_path / "plain", costs=costs))
    assert plain.pipeline_looped_chunk_s() is None
    b = lm.basis_from_run(make_basis(tmp_path / "l", costs=costs | {"pipeline_looped_extra_s": 0.03}))
    many = PIPE_MICROBATCHES[1] * 2
    latency = b.pipeline_latency_s(b.shape.layout.micro_batch // 2, 4)
    one, two = [0.002, 0.0024], [0.002, 0.0016, 0.0016, 0.0024]
    sims = [step_seconds(s, [t / 3 for t in w], [2 * t / 3 for t in w], many, latency, stages_per_rank=v)
            for s, w, v in (("1f1b", one, 1), ("interleaved-1f1b", two, 2))]  # fmt: skip
    chunk = b.pipeline_looped_chunk_s()
    assert chunk == pytest.approx((0.03 - (sims[1] - sims[0])) / many) and chunk > 0
    sets = ["parallel.pp=2", "parallel.microbatches=4", "parallel.pp_schedule=interleaved-1f1b"]
    machinery = b.pipeline_machinery_s()
    assert machinery is not None
    for basis, second in ((b, chunk), (plain, machinery)):
        parts = lm.predict(basis, load_config("tiny-cpu", sets), 2).time_parts
        assert parts["pipeline schedule (measured)"] == pytest.approx((machinery + second) * 4)
    # no slower than its simulation: nothing added
    fast = lm.basis_from_run(make_basis(tmp_path / "f", costs=costs | {"pipeline_looped_extra_s": 0.001}))
    assert fast.pipeline_looped_chunk_s() == 0.0
    said = "\n".join(lm.whatif_lines(b, sets, 2))
    assert f"a looped stage's microbatch (interleaved) {chunk * 1e3:.2f} ms" in said


def test_gpipe_pays_its_late_receives_as_the_copy_measured(tmp_path: Path) -> None:
    """The pipelined copy took longer under GPipe than under 1F1B (its receives posted after their
    sends while the sender computes): the cost of such a receive is fitted so the simulated copy
    shows the same excess, and GPipe's layouts pay it where their schedule meets it; 1F1B's do not."""
    costs = {"chunk_overhead_s": 0.0005, "pipeline_microbatch_s": 0.0015, "pipeline_first_s": 0.002,
             "pipeline_last_s": 0.0024, "pipeline_middle_s": 0.0}  # fmt: skip
    run = make_basis(tmp_path / "g", costs=costs | {"pipeline_gpipe_extra_s": 0.009})
    b = lm.basis_from_run(run)
    plain = lm.basis_from_run(make_basis(tmp_path / "p", costs=costs))
    late = b.pipeline_late_receive_s()
    assert plain.pipeline_late_receive_s() == 0.0 and 0 < late < 0.009
    fwd, bwd = [0.002 / 3, 0.0024 / 3], [0.004 / 3, 0.0048 / 3]
    latency = b.pipeline_latency_s(b.shape.layout.micro_batch // 2, 4)
    excess = step_seconds("gpipe", fwd, bwd, 12, latency, late) - step_seconds(
        "1f1b", fwd, bwd, 12, latency, late
    )
    assert excess == pytest.approx(0.009, rel=0.1)
    # GPipe's waits at the link's latency (0.75 ms here) explain part of the excess without it
    assert (
        0 < step_seconds("gpipe", fwd, bwd, 12, latency) - step_seconds("1f1b", fwd, bwd, 12, latency) < 0.009
    )

    def step(basis: lm.Basis, schedule: str) -> float:
        sets = ["parallel.pp=2", "parallel.microbatches=8", f"parallel.pp_schedule={schedule}"]
        return lm.predict(basis, load_config("tiny-cpu", sets), 2).step_s

    assert step(b, "1f1b") == pytest.approx(step(plain, "1f1b"))
    assert step(b, "gpipe") > step(plain, "gpipe") + late  # several receives late at 8 microbatches
    # a part of its own, so a user sees what GPipe pays that 1F1B does not
    gp = lm.predict(b, load_config("tiny-cpu", ["parallel.pp=2", "parallel.microbatches=8", "parallel.pp_schedule=gpipe"]), 2)  # fmt: skip
    one = lm.predict(b, load_config("tiny-cpu", ["parallel.pp=2", "parallel.microbatches=8"]), 2)
    assert gp.time_parts[lm.LATE_RECEIVES] > late and lm.LATE_RECEIVES not in one.time_parts
    without = lm.predict(plain, load_config("tiny-cpu", ["parallel.pp=2", "parallel.microbatches=8", "parallel.pp_schedule=gpipe"]), 2)  # fmt: skip
    assert gp.time_parts["pipeline bubble"] == pytest.approx(without.time_parts["pipeline bubble"])
    out = run_perfkit("whatif", str(run), "--set", "parallel.pp=2")
    assert f"a receive posted late, its sender computing {late * 1e3:.2f} ms" in out.stdout


def test_the_models_ends_as_measured(tmp_path: Path) -> None:
    """The ends weighed as the pipelined copy's stages measured them (the last stage's head and
    loss, the first's embeddings, each less a block alone), not by FLOPs; the basis still
    predicts itself."""
    costs = {"pipeline_microbatch_s": 0.001, "pipeline_first_s": 0.0022, "pipeline_last_s": 0.0026,
             "pipeline_middle_s": 0.0, "pipeline_block_s": 0.002}  # fmt: skip
    b = lm.basis_from_run(make_basis(tmp_path / "m", costs=costs))
    plain = lm.basis_from_run(make_basis(tmp_path / "p"))
    assert b.ends_in_blocks() == pytest.approx((0.1, 0.3)) and plain.ends_in_blocks() is None
    assert lm.predict(b, load_config("tiny-cpu"), 2).step_s == pytest.approx(0.030)
    shape = b.shape_of(load_config("tiny-cpu", ["parallel.pp=2"]), 2)
    block = shape.stage_flops_per_token(0) / 2.1  # the first stage: 2 blocks and a tenth
    assert shape.stage_flops_per_token(1) == pytest.approx(block * 2.3) and shape.busiest == 1
    # by FLOPs the embeddings weigh nothing and the head its matmul
    flops = plain.shape_of(load_config("tiny-cpu", ["parallel.pp=2"]), 2)
    assert flops.stage_flops_per_token(0) == pytest.approx(block * 2)
    # a pipeline's last stage against the whole model, at twice the rows: 2.3 blocks' work against
    # 4.4, where the head's FLOPs made it 2.36 blocks against 4.36
    ratio = shape.flops / b.shape.flops
    assert ratio == pytest.approx(2 * 2.3 / 4.4) and ratio < flops.flops / plain.shape.flops


def test_a_ddp_basis_compute_is_the_model_measured_plainly(tmp_path: Path) -> None:
    """Where the basis measured its whole model plainly, its compute is that and DDP the rest of
    its forward and backward (on gloo, its hooks and all-reduces take the compute's cores): charged
    to the layouts with DDP, not to a pipeline; the basis still predicts itself. Where the plain
    model leaves DDP less than its fitted all-reduce, the fit stands."""
    b = lm.basis_from_run(make_basis(tmp_path / "m", costs={"model_plain_s": 0.012}))
    fitted = lm.basis_from_run(make_basis(tmp_path / "f"))
    assert b.ddp_step_s is not None and b.compute_s == pytest.approx(0.012)
    others = sum(v for k, v in lm.step_parts(fitted, fitted.shape).items() if k != "gradients (DDP)")
    assert b.ddp_step_s == pytest.approx(0.022 - others - 0.012)
    assert b.ddp_step_s > lm.step_parts(fitted, fitted.shape)["gradients (DDP)"]
    assert lm.predict(b, load_config("tiny-cpu"), 2).step_s == pytest.approx(0.030)
    z1 = lm.predict(b, load_config("tiny-cpu", ["parallel.zero=1"]), 2).time_parts
    assert z1["gradients (DDP)"] == pytest.approx(b.ddp_step_s)
    # smaller buckets: DDP as the basis took it, and an all-reduce more a bucket as modelled
    small = lm.predict(b, load_config("tiny-cpu", ["overlap.bucket_cap_mb=0.05"]), 2).time_parts
    modelled = {
        cap: lm.comm_seconds(
            b.shape_of(load_config("tiny-cpu", [f"overlap.bucket_cap_mb={cap}"]), 2),
            b.alpha_s,
            b.beta_bytes_per_s,
            b.wait_s,
        )["gradients (DDP)"]
        for cap in (0.05, 25)
    }
    assert modelled[0.05] > modelled[25] + 5 * b.alpha_s  # 0.56 MB of gradients in 11 buckets, not 1
    assert small["gradients (DDP)"] == pytest.approx(b.ddp_step_s + modelled[0.05] - modelled[25])
    pp, pp_fitted = (lm.predict(x, load_config("tiny-cpu", ["parallel.pp=2"]), 2) for x in (b, fitted))
    assert (
        "gradients (DDP)" not in pp.time_parts and pp.time_parts["compute"] < pp_fitted.time_parts["compute"]
    )
    high = lm.basis_from_run(make_basis(tmp_path / "h", costs={"model_plain_s": 0.0215}))
    assert high.ddp_step_s is None and high.compute_s == pytest.approx(fitted.compute_s)
    assert "ddp_step_s" not in lm.MEASURED_COSTS and "model_plain_s" in lm.MEASURED_COSTS


def test_measured_costs_are_charged_beyond_the_flops(tmp_path: Path) -> None:
    """What the trainer measured after its steps (perfkit.trainer.costs): a microbatch unit more, a
    checkpointed block, a tensor-parallel module, each charged as often as the layout runs it; the
    basis still predicts itself."""
    costs = {"chunk_overhead_s": 0.002, "checkpoint_block_s": 0.001, "tp_module_overhead_s": 0.0005,
             "fsdp_block_s": 0.003, "fsdp_ends_s": 0.0005, "dtensor_param_s": 0.0001, "zero1_block_s": 0.004,
             "zero1_ends_s": 0.003, "pipeline_microbatch_s": 0.0015}  # fmt: skip
    b = lm.basis_from_run(make_basis(tmp_path, costs=costs))
    assert (b.chunk_s, b.checkpoint_block_s, b.tp_module_s, b.fsdp_block_s) == (0.002, 0.001, 0.0005, 0.003)
    assert not any("FLOPs alone" in n for n in b.notes)

    def parts(*sets: str) -> dict[str, float]:
        return lm.predict(b, load_config("tiny-cpu", list(sets)), 2).time_parts

    assert lm.predict(b, load_config("tiny-cpu"), 2).step_s == pytest.approx(0.030)
    # GPipe with 8 microbatches of 2 blocks and an end: 24 units against the basis's 5 (4 blocks, 1)
    gpipe = parts("parallel.pp=2", "parallel.microbatches=8", "parallel.pp_schedule=gpipe")
    assert gpipe["microbatches (dispatch)"] == pytest.approx(0.002 / 2 * (24 - 5))
    # its schedule as measured a stage's microbatch, in place of the modelled sends; in the bubble
    # too (each other stage pays it), and twice a microbatch for two stages a rank
    assert gpipe["pipeline schedule (measured)"] == pytest.approx(0.0015 * 8)
    assert (
        lm.PIPELINE_SENDS not in gpipe
        and lm.PIPELINE_SENDS
        in lm.predict(
            lm.basis_from_run(make_basis(tmp_path / "sends")), load_config("tiny-cpu", ["parallel.pp=2"]), 2
        ).time_parts
    )
    staged = sum(
        v
        for k, v in gpipe.items()
        if k in ("compute", "microbatches (dispatch)", "pipeline schedule (measured)")
    )
    assert gpipe["pipeline bubble"] == pytest.approx(
        staged
        * (
            b.shape_of(load_config("tiny-cpu", ["parallel.pp=2", "parallel.microbatches=8"]), 2).pipeline_fill
            - 1
        )
    )
    looped = parts("parallel.pp=2", "parallel.microbatches=4", "parallel.pp_schedule=interleaved-1f1b")
    assert looped["pipeline schedule (measured)"] == pytest.approx(0.0015 * 4 * 2)
    # checkpointing: its measured cost a block, and the FLOPs without the recomputation
    ckpt = parts("kernels.activation_checkpointing=true")
    assert ckpt["activation checkpointing"] == pytest.approx(0.001 * 4)
    assert ckpt["compute"] == pytest.approx(parts()["compute"])
    assert parts("parallel.tp=2")["tensor parallel (DTensor)"] == pytest.approx(0.0005 * 6 * 4)
    # FSDP2 as measured, 4 blocks and the root (each at its own cost: their bytes differ) a
    # microbatch, in place of its modelled collectives
    z3 = parts("parallel.zero=3")
    assert z3["FSDP2 gathers and scatters (measured)"] == pytest.approx(0.003 * 4 + 0.0005)
    assert parts("parallel.zero=3", "model.n_layers=8")[
        "FSDP2 gathers and scatters (measured)"
    ] == pytest.approx(0.003 * 8 + 0.0005)
    # a run profiled before the two were measured apart: one unit's average for each
    old = dict(costs, fsdp_unit_s=0.002)
    del old["fsdp_block_s"], old["fsdp_ends_s"]
    older = lm.basis_from_run(make_basis(tmp_path / "older", costs=old))
    z3_older = lm.predict(older, load_config("tiny-cpu", ["parallel.zero=3"]), 2).time_parts
    assert z3_older["FSDP2 gathers and scatters (measured)"] == pytest.approx(0.002 * 5)
    # ZeRO-2 (the parameters kept gathered from forward to backward): its own measured costs, else
    # ZeRO-3's (where the basis measured only those), never its modelled collectives alone
    z2 = parts("parallel.zero=2")
    assert z2["FSDP2 gathers and scatters (measured)"] == pytest.approx(0.003 * 4 + 0.0005)
    kept = lm.basis_from_run(
        make_basis(tmp_path / "kept", costs=dict(costs, fsdp_keep_block_s=0.002, fsdp_keep_ends_s=0.0004))
    )
    z2_kept = lm.predict(kept, load_config("tiny-cpu", ["parallel.zero=2"]), 2).time_parts
    assert z2_kept["FSDP2 gathers and scatters (measured)"] == pytest.approx(0.002 * 4 + 0.0004)
    assert lm.predict(kept, load_config("tiny-cpu", ["parallel.zero=3"]), 2).time_parts[
        "FSDP2 gathers and scatters (measured)"
    ] == pytest.approx(0.003 * 4 + 0.0005)
    assert z2["optimizer"] == pytest.approx(parts()["optimizer"] / 2 + 0.0001 * 69)
    # its 69 parameters are DTensors: the optimizer phase pays each, beyond half of DDP's AdamW
    assert z3["optimizer"] == pytest.approx(parts()["optimizer"] / 2 + 0.0001 * 69)
    assert parts("parallel.tp=2")["optimizer"] > parts()["optimizer"] / 2 + 0.0001 * 12 * 4 - 1e-9
    assert not any(k.startswith(("parameters (FSDP", "gradients (FSDP")) for k in z3)
    # ZeRO-1's step as measured, a block (4) and the ends, in place of its 69 modelled broadcasts
    z1 = parts("parallel.zero=1")["parameters (ZeRO-1)"]
    assert z1 == pytest.approx(0.003 + 0.004 * 4 + b.wait_s)
    sp = parts("parallel.tp=2", "parallel.sequence_parallel=true")
    assert sp["tensor parallel (DTensor)"] == pytest.approx(0.0005 * 10 * 4)
    r = run_perfkit("whatif", str(b.run), "--set", "parallel.tp=2")
    assert r.returncode == 0, r.stderr
    assert "tensor parallel (DTensor)" in r.stdout and (
        "beyond FLOPs: a microbatch of a block and the ends 2.00 ms, a checkpointed block 1.00 ms, "
        "a tensor-parallel module (DTensor) 0.50 ms, an FSDP2 block 3.00 ms, its root 0.50 ms, a DTensor parameter's optimizer step "
        "0.10 ms, ZeRO-1's step a block 4.00 ms, ZeRO-1's step for the ends 3.00 ms, "
        "a pipeline stage's microbatch (its schedule's machinery) 1.50 ms" in r.stdout
    )
    # tensor parallelism over every rank as measured a block, where the basis measured it at the
    # layout's batch: in place of its modelled collectives and DTensor's cost a module
    tp = lm.basis_from_run(
        make_basis(
            tmp_path / "tp",
            costs={**costs, "tp_block_s": 0.01, "tp_ends_s": 0.002, "sp_block_s": 0.015, "sp_ends_s": 0.003},
        )
    )
    tp2 = lm.predict(tp, load_config("tiny-cpu", ["parallel.tp=2"]), 2).time_parts
    assert tp2["tensor parallel (measured)"] == pytest.approx(0.01 * 4 + 0.002)
    assert not any(k.startswith("activations (TP") or "DTensor)" in k for k in tp2)
    sp = lm.predict(tp, load_config("tiny-cpu", ["parallel.tp=2", "parallel.sequence_parallel=true"]), 2)
    assert sp.time_parts["tensor parallel (measured)"] == pytest.approx(0.015 * 4 + 0.003)
    halves = lm.predict(tp, load_config("tiny-cpu", ["parallel.tp=2", "data.global_batch=8"]), 2).time_parts
    assert "tensor parallel (measured)" not in halves and "activations (TP all-reduce)" in halves
    # a basis that measured none of it says so, and counts checkpointing's recomputation as FLOPs
    old = lm.basis_from_run(make_basis(tmp_path / "old"))
    assert old.chunk_s is None and any("FLOPs alone" in n for n in old.notes)
    assert (
        "parameters (FSDP all-gather)"
        in lm.predict(old, load_config("tiny-cpu", ["parallel.zero=3"]), 2).time_parts
    )
    again = lm.predict(old, load_config("tiny-cpu", ["kernels.activation_checkpointing=true"]), 2)
    assert "activation checkpointing" not in again.time_parts
    assert again.time_parts["compute"] > lm.predict(old, load_config("tiny-cpu"), 2).time_parts["compute"]


def _traced(basis: Path) -> Path:
    """Three profiled 30 ms steps a rank in the basis: 24 ms of a forward-backward op, 1 ms of
    Python, the optimizer (2 ms within its annotation), 0.5 ms of Python, 2.5 ms of another op."""
    from test_critical_path import Kineto

    run = Run.open(basis)
    for rank in range(run.manifest.world_size):
        k = Kineto()
        for s in range(3):
            t0 = 31_000 * s
            k.x("user_annotation", f"ProfilerStep#{s + 4}", t0, 30_000)
            k.x("cpu_op", "aten::mm", t0, 24_000)
            k.x("user_annotation", "Optimizer.step#AdamW.step", t0 + 25_000, 2_000)
            k.x("cpu_op", "aten::mul_", t0 + 25_000, 2_000)
            k.x("cpu_op", "aten::add", t0 + 27_500, 2_500)
        run.layout.trace(rank).write_bytes(gzip.compress(json.dumps({"traceEvents": k.events}).encode()))
    return basis


def test_a_layout_is_predicted_by_replaying_the_basiss_traced_steps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The basis's steps replayed with the layout's share of the work (the ops and the Python
    between them at its FLOPs, the optimizer's span at its parameters): the basis itself exactly;
    ZeRO-1 half the optimizer's 2 ms and its broadcasts as modelled; a layout with more FLOPs a rank
    slower in proportion; the sweep keeps both engines' figures."""
    from perfkit.optimizer.replay import LayoutReplay

    b = lm.basis_from_run(_traced(make_basis(tmp_path)))
    r = LayoutReplay.of(b)
    assert r.scale == pytest.approx(1.0)

    def replay(*sets: str) -> lm.Prediction:
        return r.predict(load_config("tiny-cpu", list(sets)), 2)

    assert replay().step_s == pytest.approx(0.030, rel=1e-6)
    z1 = replay("parallel.zero=1")
    assert z1.time_parts["the basis's steps, replayed"] == pytest.approx(0.029, rel=1e-3)
    assert z1.time_parts["parameters (ZeRO-1)"] == pytest.approx(
        lm.predict(b, load_config("tiny-cpu", ["parallel.zero=1"]), 2).time_parts["parameters (ZeRO-1)"]
    )
    tp = load_config("tiny-cpu", ["parallel.tp=2"])
    change = r.change(tp, 2)
    assert change.link == math.inf  # DDP's all-reduce is gone: the basis's collectives weigh nothing
    replayed = 0.028 / change.rest + 0.002 / change.speedup["optimizer"]
    assert change.rest < 1 and r.predict(tp, 2).time_parts["the basis's steps, replayed"] == pytest.approx(
        replayed, rel=1e-3
    )
    # on CPU, what the trace shows of the basis's collectives beside its compute (here: all of
    # DDP's all-reduce, none on the path) goes with them: gloo's threads share the cores
    gone = r.predict(tp, 2).time_parts["the basis's collectives beside its compute"]
    assert gone == pytest.approx(-sum(lm.step_parts(b, b.shape).values()))
    assert "the basis's collectives beside its compute" not in z1.time_parts  # DDP's all-reduce stays
    # smaller DDP buckets on CPU: the trace's collectives are not stretched (their waits do not
    # grow with the buckets); what the model adds is added, and the path replayed as it was
    small = load_config("tiny-cpu", ["overlap.bucket_cap_mb=0.05"])
    assert r.change(small, 2).link < 1
    grown = r.predict(small, 2).time_parts
    assert grown["the basis's steps, replayed"] == pytest.approx(0.030, rel=1e-6)
    assert grown["the basis's collectives, as the layout has them"] == pytest.approx(
        lm.predict(b, small, 2).time_parts["gradients (DDP)"]
        - lm.predict(b, load_config("tiny-cpu"), 2).time_parts["gradients (DDP)"]
    )
    # memory as the model predicts it, FSDP2's peak on CPU a lower bound there too
    z3 = replay("parallel.zero=3")
    assert (
        z3.peak_lower_bound
        and z3.peak_bytes == lm.predict(b, load_config("tiny-cpu", ["parallel.zero=3"]), 2).peak_bytes
    )
    with pytest.raises(RunDirError, match="holds no kernel trace"):
        LayoutReplay.of(lm.basis_from_run(make_basis(tmp_path / "untraced")))
    calls: list[tuple[str, ...]] = []
    monkeypatch.setattr(sw, "measure", _fake_measure(calls))
    data = sw.run_sweep(
        "tiny-cpu", 2, ["steps=12"], LAYOUTS, 1, tmp_path / "s", basis_run=Path(b.run)
    ).to_json()
    for c in data["candidates"]:
        # a pipeline's step is its stages' schedule, which the basis's graph does not hold: the
        # layout model's, the replayed figure kept beside it
        engine = "model" if c["label"].startswith("pp2") else "replay"
        assert c["predicted"]["engine"] == engine and set(c["predicted"]["engines"]) == {"model", "replay"}
        assert c["predicted"]["step_ms"] == c["predicted"]["engines"][engine]
    assert sum(c["label"].startswith("pp2") for c in data["candidates"]) == 1
    assert set(data["agreement"]["engines"]) == {"model", "replay"} and "no_replay" not in data


def test_a_cpu_basis_on_fewer_cores_than_ranks_and_another_group_size(tmp_path: Path) -> None:
    """4 CPU ranks of a thread on 2 cores: each had half a core while all computed, so a pipeline's
    waiting stages hand theirs to the others (its bubble shrinks); the latency, fitted over the
    4 ranks' ring, is charged by the hops of a call's own group (tensor parallelism's 2-rank
    all-reduces a third of it, a pipeline's send one hop)."""
    assert lm.core_share({"cpu_count": 2, "local_world_size": 4, "threads": 1}, "cpu") == 0.5
    assert lm.core_share({"cpu_count": 16, "local_world_size": 4, "threads": 2}, "cpu") == 1.0
    assert (
        lm.core_share({"cpu_count": 2, "local_world_size": 4, "threads": 1, "gpus": ["H100"]}, "cuda") == 1.0
    )
    assert lm.core_share({}, "cpu") == 1.0  # an older manifest: as before
    b = lm.basis_from_run(make_basis(tmp_path, world=4))
    assert b.fit_group == 4 and b.core_share == 1.0
    tp = b.shape_of(load_config("tiny-cpu", ["parallel.tp=2"]), 4)
    ring = lm.comm_seconds(tp, b.alpha_s, b.beta_bytes_per_s, 0.0)["activations (TP all-reduce)"]
    hops = lm.comm_seconds(tp, b.alpha_s, b.beta_bytes_per_s, 0.0, fit_group=4)["activations (TP all-reduce)"]
    calls = next(c.calls for c in lm.collectives(tp) if c.what == "activations (TP all-reduce)")
    assert ring - hops == pytest.approx(calls * b.alpha_s * (1 - 1 / 3))
    shared = dataclasses.replace(b, core_share=0.5)
    pp4 = load_config("tiny-cpu", ["parallel.pp=4"])
    whole, half = (lm.predict(x, pp4, 4).time_parts for x in (b, shared))
    assert 0 <= half["pipeline bubble"] < whole["pipeline bubble"] and lm.CORES_LENT not in whole
    # the stages' work unequal (the head on the last): the others' waits lend the busiest cores
    assert half.get(lm.CORES_LENT, 0.0) <= 0.0
    assert lm.predict(shared, pp4, 4).step_s < lm.predict(b, pp4, 4).step_s


def test_a_kernel_change_the_model_cannot_time_says_so(tmp_path: Path) -> None:
    """Eager attention, bf16, compilation or another optimizer: the prediction keeps the basis's
    kernels' time, and says so with what to do instead; checkpointing, which it times, and layouts
    say nothing."""
    b = lm.basis_from_run(make_basis(tmp_path / "b"))
    for sets, named in (
        (["kernels.attention=eager"], "kernels.attention=eager"),
        (["kernels.precision=bf16", "parallel.tp=2"], "kernels.precision=bf16"),
        (["kernels.compile=true"], "kernels.compile=True"),
    ):
        said = "\n".join(lm.whatif_lines(b, sets, 2))
        assert f"note: {named}: the layout model does not time a kernel change" in said, said
        assert "perfkit whatif --speedup" in said
    for sets in (["kernels.activation_checkpointing=true"], ["parallel.tp=2"], []):
        assert "does not time a kernel change" not in "\n".join(lm.whatif_lines(b, sets, 2))
