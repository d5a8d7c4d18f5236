"""Throughput of the reference trainer for a configuration, optionally against a variant.

    python bench/trainer.py --config tiny-cpu --nproc 2
    python bench/trainer.py --config tiny-cpu --variant kernels.optimizer_impl=fused --repeats 3
    python bench/trainer.py --config gpt2-small-gpu --set steps=30      # on a GPU: prints MFU

Runs alternate (base, variant, base, ...) so drift on a shared machine hits both alike; each run's
figure is its time per step after the warm-up steps (perfkit.optimizer.trials, as perfkit sweep and
perfkit optimize measure); the ratio printed is variant / base tokens/s, the median of the pairs
measured side by side. Writes the figures as JSON with --json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from perfkit.optimizer.trials import Candidate, check, interleave, judge


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

    candidates = [Candidate("base", args.sets)]
    if args.variant:
        candidates.append(Candidate("variant", args.sets + args.variant))
    for c in candidates:
        problem = check(args.config, args.nproc, c.overrides)
        if problem:
            sys.exit(f"{c.label}: {problem}")
    with tempfile.TemporaryDirectory() as tmp:
        interleave(args.config, args.nproc, candidates, args.repeats, Path(tmp), progress=print)
    print(
        f"config {args.config}, {args.nproc} rank(s), {' '.join(args.sets) or 'no overrides'}, {args.repeats} run(s) each"
    )
    result: dict[str, Any] = {"config": args.config, "nproc": args.nproc, "sets": args.sets}
    for c in candidates:
        if c.failed:
            sys.exit(f"{c.label} run failed: {c.failed}")
        line = f"{c.label:<10} {c.tokens_per_s:>12.0f} tok/s  {c.step_ms:9.2f} ms/step"
        if c.mfu is not None:
            line += f"  MFU {c.mfu:.1%}"
        print(line)
        result[c.label] = c.to_json()
    if args.variant:
        ratio = judge(candidates[0], candidates[1], min_gain=0.0).ratio
        result["variant_settings"] = args.variant
        result["speedup"] = 1 / ratio if ratio else None
        if ratio:
            print(
                f"variant ({' '.join(args.variant)}) / base tokens/s: {1 / ratio:.3f}x (median of the pairs)"
            )
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
