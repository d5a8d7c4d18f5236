"""Step-time overhead of the collectors on the reference trainer (every collector but the kernel
window and the allocator history, which are opt-in diagnostics).

    python bench/collector_overhead.py --repeats 5 --steps 60 --nproc 2

Alternates plain ``perfkit train`` runs with ``perfkit profile`` runs of the same configuration,
so drift on a shared machine hits both alike. Each run's figure is the median of the trainer's
own per-step time after the warm-up steps; the result is the median over pairs of
profiled / plain. Target: at most 1.01.

On a shared 2-core machine two ranks make each run's step time drift by several percent, more than
the effect measured, so the script also prints perfkit's own time per step as the ranks measured
it (the ``perfkit_s`` column of rank<N>/steps.jsonl: the thread CPU time of the step-end work,
collectors, writing and collective records) as a share of the step time, on the median step: a direct figure that machine noise does not blur.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

WARMUP = 5
COLLECT = "steps,comms,cpu,memory,io,nvml"


def median_step(log: Path) -> float:
    records = [json.loads(line) for line in log.read_text().splitlines()]
    return statistics.median(r["step_time_s"] for r in records[WARMUP:])


def run(cmd: list[str], env: dict[str, str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="tiny-cpu")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--set", dest="sets", action="append", default=[])
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    sets = [f"steps={args.steps}", "log_every=1", *args.sets]
    set_args = [a for s in sets for a in ("--set", s)]
    plain: list[float] = []
    profiled: list[float] = []
    self_share: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            log = Path(tmp) / f"plain{i}.jsonl"
            run(
                [
                    sys.executable,
                    "-m",
                    "perfkit",
                    "train",
                    "--config",
                    args.config,
                    "--nproc",
                    str(args.nproc),
                    "--log-json",
                    str(log),
                    *set_args,
                ],
                env,
            )
            plain.append(median_step(log))
            out = Path(tmp) / f"run{i}"
            run(
                [
                    sys.executable,
                    "-m",
                    "perfkit",
                    "profile",
                    "--out",
                    str(out),
                    "--collect",
                    COLLECT,
                    "--profile-steps",
                    "none",
                    "--nproc",
                    str(args.nproc),
                    "--",
                    "reference",
                    "--config",
                    args.config,
                    *set_args,
                ],
                env,
            )
            profiled.append(median_step(out / "train_log.jsonl"))
            # per rank: the median step's own share (rank<N>/steps.jsonl perfkit_s / step_time_s)
            shares = []
            for r in range(args.nproc):
                rows = [json.loads(x) for x in (out / f"rank{r}" / "steps.jsonl").read_text().splitlines()]
                shares.append(statistics.median(x["perfkit_s"] / x["step_time_s"] for x in rows[WARMUP:]))
            self_share.append(max(shares))
            print(
                f"pair {i + 1}: plain {plain[-1] * 1e3:.2f} ms/step, profiled {profiled[-1] * 1e3:.2f} ms/step, "
                f"ratio {profiled[-1] / plain[-1]:.3f}",
                flush=True,
            )
    ratios = [p / q for p, q in zip(profiled, plain)]
    result = {
        "config": args.config,
        "nproc": args.nproc,
        "steps": args.steps,
        "collect": COLLECT,
        "plain_ms": statistics.median(plain) * 1e3,
        "profiled_ms": statistics.median(profiled) * 1e3,
        "ratio_median": statistics.median(ratios),
        "ratios": ratios,
        "self_time_share_median": statistics.median(self_share),
    }
    print(
        f"collectors ({COLLECT}) / plain step time, median of {args.repeats} pairs: {result['ratio_median']:.3f}x "
        f"({result['profiled_ms']:.2f} vs {result['plain_ms']:.2f} ms/step; pairs ranged "
        f"{min(ratios):.3f}-{max(ratios):.3f})"
    )
    print(f"perfkit's own time, measured in place: {result['self_time_share_median']:.2%} of the step time")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
