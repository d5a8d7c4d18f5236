"""Watch mode on a long job: planted events named as they start, a clean job left alone, the disk
under its budget, and what watching costs a step.

    python bench/watch.py                       # every case and the overhead A/B
    python bench/watch.py --cases slow --steps 20000 --repeats 0

A 2-rank CPU DDP job of ``--steps`` fast steps (``bench/watch_workload.py``, an MLP, ~1 ms a step
here) runs under ``perfkit profile --watch`` once per case:

- ``clean``: nothing planted; no anomaly may be named;
- ``slow``: from the middle step on, rank 1 computes ``--slow-ms`` more a step;
- ``leak``: from the middle step on, rank 0 keeps ``--leak-kb`` more memory each step;
- ``data``: from the middle step on, rank 1's batches take ``--data-ms`` longer to load.

For each: the anomalies named (kind, subject, the first step of the window it started in, the step
it was confirmed at: the latency from the planted step), whether every rank traced its capture and
what the diagnosis says against the baseline capture, the run directory's size against the budget.

Overhead: ``--repeats`` pairs of the same job without perfkit and under ``perfkit profile --watch``,
alternating, each timed by the job's own clock (rank 0's per-step times, median after the warm-up);
the ratio's geometric mean with a 95% t interval over the pairs
(``perfkit.optimizer.trials.ratio_interval``), for each job of ``--overhead`` (a fast toy step,
where perfkit's fixed cost a step shows most, and a bigger one).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from perfkit.optimizer.trials import Candidate, Measurement, ratio_interval

HERE = Path(__file__).resolve().parent
WORKLOAD = HERE / "watch_workload.py"
WARMUP = 200


def torchrun(steps: int, width: int, batch: int) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        str(WORKLOAD), "--steps", str(steps), "--width", str(width), "--batch", str(batch),
    ]  # fmt: skip


def watched(out: Path, budget: float) -> list[str]:
    return [
        sys.executable,
        "-m",
        "perfkit",
        "profile",
        "--watch",
        "--watch-budget",
        str(budget),
        "--out",
        str(out),
        "--",
    ]


def run(cmd: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0 and "terminate called without an active exception" in p.stderr:
        # gloo aborts now and then as a rank tears down, with or without perfkit: run it again
        p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{p.stdout[-3000:]}{p.stderr[-3000:]}")
    return p


def case(name: str, plant: str | None, args: argparse.Namespace, tmp: Path, folder: str) -> dict:
    out = tmp / folder
    env = {**os.environ}
    for var in ("PLANT_SLOW", "PLANT_LEAK", "PLANT_DATA"):
        env.pop(var, None)
    if plant:
        var, value = plant.split("=")
        env[var] = value
    t0 = time.perf_counter()
    run([*watched(out, args.budget), *torchrun(args.steps, args.width, args.batch)], env)
    wall = time.perf_counter() - t0
    records = (
        [json.loads(x) for x in (out / "watch" / "anomalies.jsonl").read_text().splitlines()]
        if (out / "watch" / "anomalies.jsonl").exists()
        else []
    )
    started = [r for r in records if "kind" in r]
    state = json.loads((out / "watch" / "state.json").read_text())
    captures = {}
    for c in state.get("captures", []):
        diag = out / "watch" / "captures" / f"{c['id']}.json"
        traced = sorted(
            int(p.parent.parent.name.removeprefix("rank"))
            for p in out.glob(f"rank*/captures/{c['id']}.json.gz")
        )
        captures[c["id"]] = {
            "steps": [c["first_step"], c["last_step"]],
            "ranks_traced": traced,
            "diagnosis": json.loads(diag.read_text()).get("summary") if diag.exists() else None,
        }
    disk = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    result = {
        "case": name,
        "plant": plant,
        "planted_step": args.steps // 2 if plant else None,
        "wall_s": round(wall, 1),
        "judged_window_steps": state.get("judged_window_steps"),
        "baseline_step_ms": state.get("baseline_step_ms"),
        "anomalies": [
            {
                k: r.get(k)
                for k in ("id", "kind", "subject", "start_step", "detected_step", "title", "capture")
            }
            for r in started
        ],
        "captures": captures,
        "disk_mb": round(disk / 1e6, 2),
        "budget_mb": args.budget,
        "warnings": state.get("warnings", []),
    }
    print(
        f"\n== {name} ({plant or 'nothing planted'}): {wall:.0f} s, windows of {result['judged_window_steps']} steps, baseline {result['baseline_step_ms'] or 0:.2f} ms/step"
    )
    for a in result["anomalies"]:
        late = f", {a['detected_step'] - result['planted_step']} steps after the plant" if plant else ""
        print(
            f"  step {a['start_step']} (confirmed {a['detected_step']}{late}): {a['title']} [capture {a['capture']}]"
        )
    if not result["anomalies"]:
        print("  no anomaly")
    for cid, c in captures.items():
        print(
            f"  capture {cid} steps {c['steps'][0]}-{c['steps'][1]} traced by ranks {c['ranks_traced']}: {c['diagnosis']}"
        )
    print(f"  disk {result['disk_mb']} MB of {args.budget:g} MB")
    return result


def overhead(args: argparse.Namespace, width: int, batch: int, steps: int, tmp: Path) -> dict:
    plain, profiled = Candidate("plain", []), Candidate("watched", [])
    for i in range(args.repeats):
        times = tmp / f"times{width}-{i}.json"
        env = {**os.environ, "BENCH_STEP_TIMES": str(times)}
        for var in ("PLANT_SLOW", "PLANT_LEAK", "PLANT_DATA"):
            env.pop(var, None)
        for cand, prefix in ((plain, []), (profiled, watched(tmp / f"o{width}-{i}", args.budget))):
            run([*prefix, *torchrun(steps, width, batch)], env)
            samples = [t * 1e3 for t in json.loads(times.read_text())][WARMUP:]
            cand.runs.append(Measurement(ok=True, step_ms=statistics.median(samples), samples_ms=samples))
        b, v = plain.runs[-1].step_ms, profiled.runs[-1].step_ms
        print(
            f"  width {width} pair {i + 1}: plain {b:.3f} ms/step, watched {v:.3f}, ratio {v / b:.3f}",
            flush=True,
        )  # type: ignore[operator]
    point, (lo, hi) = ratio_interval(plain, profiled)  # type: ignore[misc]
    return {
        "width": width,
        "batch": batch,
        "steps": steps,
        "plain_ms": statistics.median(r.step_ms for r in plain.runs),  # type: ignore[type-var]
        "watched_ms": statistics.median(r.step_ms for r in profiled.runs),  # type: ignore[type-var]
        "ratio": point,
        "interval": [lo, hi],
        "pairs": [v.step_ms / b.step_ms for b, v in zip(plain.runs, profiled.runs, strict=True)],  # type: ignore[operator]
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20000)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--budget", type=float, default=100.0, help="--watch-budget, MB")
    p.add_argument("--cases", default="clean,slow,leak,data", help="cases to run, in order (one may repeat)")
    p.add_argument("--slow-ms", type=float, default=1.0)
    p.add_argument("--leak-kb", type=float, default=64.0)
    p.add_argument("--data-ms", type=float, default=1.0)
    p.add_argument("--repeats", type=int, default=6, help="overhead pairs (0: none)")
    p.add_argument(
        "--overhead",
        default="128:16:3000,1024:64:1000",
        help="jobs for the overhead A/B, WIDTH:BATCH:STEPS each (~0.7 ms and ~17 ms a step here)",
    )
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--keep", type=Path, help="keep the run directories in this folder")
    args = p.parse_args()
    mid = args.steps // 2
    plants = {
        "clean": None,
        "slow": f"PLANT_SLOW=1:{mid}:{args.slow_ms}",
        "leak": f"PLANT_LEAK=0:{mid}:{args.leak_kb}",
        "data": f"PLANT_DATA=1:{mid}:{args.data_ms}",
    }
    results: dict = {"steps": args.steps, "width": args.width, "cases": [], "overhead": []}
    with tempfile.TemporaryDirectory() as t:
        tmp = args.keep or Path(t)
        tmp.mkdir(parents=True, exist_ok=True)
        for i, name in enumerate(c for c in args.cases.split(",") if c):
            results["cases"].append(case(name, plants[name], args, tmp, f"{name}{i}"))
        for spec in [w for w in args.overhead.split(",") if w] if args.repeats else []:
            width, batch, steps = (int(x) for x in spec.split(":"))
            print(f"\n== overhead, width {width}, batch {batch}: {args.repeats} pairs of {steps} steps")
            o = overhead(args, width, batch, steps, tmp)
            results["overhead"].append(o)
            print(
                f"  watched / plain {o['ratio']:.3f} (95% interval {o['interval'][0]:.3f}-{o['interval'][1]:.3f}), {o['plain_ms']:.3f} ms/step plain"
            )
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
