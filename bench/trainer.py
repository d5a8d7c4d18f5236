"""Throughput of the reference trainer for a configuration, optionally against a variant.

    python bench/trainer.py --config tiny-cpu --nproc 2
    python bench/trainer.py --config tiny-cpu --variant kernels.optimizer_impl=fused --repeats 3
    python bench/trainer.py --config gpt2-small-gpu --set steps=30      # on a GPU: prints MFU

Runs alternate (base, variant, base, ...) so drift on a shared machine hits both alike; each run's
figure is the median step time after the warm-up steps; the ratio printed is variant / base
tokens/s, measured side by side. Writes the figures as JSON with --json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

WARMUP = 3  # steps dropped from each run: first-step allocation, compilation, worker start-up


def one_run(config: str, nproc: int, sets: list[str]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "log.jsonl"
        cmd = [
            sys.executable,
            "-m",
            "perfkit",
            "train",
            "--config",
            config,
            "--nproc",
            str(nproc),
            "--log-json",
            str(log),
        ]
        for s in ["log_every=1", *sets]:
            cmd += ["--set", s]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"run failed ({' '.join(cmd)}):\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
        records = [json.loads(line) for line in log.read_text().splitlines()]
    steady = records[WARMUP:] or records
    step_s = statistics.median(r["step_time_s"] for r in steady)
    out = {
        "step_time_s": step_s,
        "tokens_per_s": records[0]["tokens"] / step_s,
        "final_loss": records[-1]["loss"],
    }
    if "mfu" in records[-1]:
        out["mfu"] = statistics.median(r["mfu"] for r in steady)
    return out


def summarize(name: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    line = f"{name:<10} {med['tokens_per_s']:>12.0f} tok/s  {med['step_time_s'] * 1e3:9.2f} ms/step"
    if "mfu" in med:
        line += f"  MFU {med['mfu']:.1%}"
    print(line)
    return med


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="tiny-cpu")
    ap.add_argument("--nproc", type=int, default=1)
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="settings to compare against the base",
    )
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    base: list[dict[str, Any]] = []
    variant: list[dict[str, Any]] = []
    for _ in range(args.repeats):
        base.append(one_run(args.config, args.nproc, args.sets))
        if args.variant:
            variant.append(one_run(args.config, args.nproc, args.sets + args.variant))
    print(
        f"config {args.config}, {args.nproc} rank(s), {' '.join(args.sets) or 'no overrides'}, {args.repeats} run(s) each"
    )
    result: dict[str, Any] = {
        "config": args.config,
        "nproc": args.nproc,
        "sets": args.sets,
        "base": summarize("base", base),
    }
    if variant:
        result["variant"] = summarize("variant", variant)
        result["variant_settings"] = args.variant
        ratio = result["variant"]["tokens_per_s"] / result["base"]["tokens_per_s"]
        result["speedup"] = ratio
        print(f"variant ({' '.join(args.variant)}) / base tokens/s: {ratio:.3f}x")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
