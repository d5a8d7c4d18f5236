"""Does the layout model predict what the sweep then measures?

    python bench/sweep_prediction.py                 # both cases, ~6 minutes on 2 CPU cores
    python bench/sweep_prediction.py --case time

Each case is one ``perfkit sweep`` on 2 CPU ranks: a profiled basis (the first layout), every layout
predicted from it, then every layout measured in full (interleaved plain runs). Printed per layout:
predicted and measured step time and peak memory; per case: the Spearman correlation of the
predicted and measured rankings and the peak-memory error. Targets (issue 15): Spearman >= 0.8,
peak memory within 15%.

- ``time``: tiny-cpu (0.14M parameters) over nine layouts: DDP, ZeRO-1, FSDP2, TP with and without
  sequence parallelism, pipelines of 2, 4 and 8 microbatches (1F1B and GPipe), checkpointing.
- ``memory``: tiny-cpu widened to d_model 512 (12.8M parameters: model state is a third of a rank's
  RSS, no longer lost in the libraries' 400 MiB) over DDP, ZeRO-1, FSDP2, TP and a pipeline, 6 steps.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from perfkit.optimizer.sweep import run_sweep

CASES: dict[str, tuple[list[str], list[str], int, int]] = {
    # overrides, layouts, steps, repeats
    "time": (
        [],
        [
            "tp=1",
            "zero=1",
            "zero=3",
            "tp=2",
            "tp=2,sequence_parallel=true",
            "pp=2",
            "pp=2,microbatches=4",
            "pp=2,microbatches=8,pp_schedule=gpipe",
            "tp=1,kernels.activation_checkpointing=true",
        ],
        20,
        2,
    ),
    "memory": (
        ["model.d_model=512", "model.n_heads=8"],
        ["tp=1", "zero=1", "zero=3", "tp=2", "pp=2"],
        6,
        1,
    ),
}


def run_case(name: str, work: Path) -> dict[str, Any]:
    overrides, layouts, steps, repeats = CASES[name]
    sweep = run_sweep(
        "tiny-cpu",
        2,
        [*overrides, f"steps={steps}"],
        layouts,
        repeats,
        work / name,
        progress=lambda line, *_: print(f"  {line}", flush=True),
    )
    data = sweep.to_json()
    print(f"\n{name}: tiny-cpu {' '.join(overrides)} on 2 CPU ranks, {steps} steps x {repeats} run(s)")
    print(f"{'layout':<34} {'pred ms':>8} {'meas ms':>8} {'pred MiB':>9} {'meas MiB':>9} {'mem err':>8}")
    for c in data["candidates"]:
        p = c.get("predicted") or {}
        pm, mm = p.get("peak_memory_bytes"), c.get("peak_memory_bytes")
        err = f"{pm / mm - 1:>+8.1%}" if pm and mm else f"{'-':>8}"
        print(
            f"{c['label']:<34} {p.get('step_ms') or 0:>8.1f} {c.get('step_ms') or 0:>8.1f} "
            f"{(pm or 0) / 2**20:>9.0f} {(mm or 0) / 2**20:>9.0f} {err}"
        )
    a = data["agreement"]
    print(
        f"Spearman {a['spearman']:.2f} over {a['layouts_ranked']} layouts; peak memory error median "
        f"{a['memory_error_median']:.1%}, max {a['memory_error_max']:.1%}"
    )
    return {"case": name, **a}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", action="append", choices=list(CASES), help="default: both")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.case or list(CASES):
            rows.append(run_case(name, Path(tmp)))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    ok = all(
        (r["spearman"] or 0) >= 0.8 and (r["memory_error_max"] is None or r["memory_error_max"] <= 0.15)
        for r in rows
    )
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
