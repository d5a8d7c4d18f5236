"""Do the sweep's predictions (the replay of the basis's traced steps, and the layout model
alone, side by side) match what the sweep then measures?

    python bench/sweep_prediction.py                 # every case, ~14 minutes on 2 CPU cores
    python bench/sweep_prediction.py --case time
    python bench/sweep_prediction.py --case time --steps 60    # longer runs than the case's own

Each case is one ``perfkit sweep`` on 2 CPU ranks: a profiled basis (the first layout), every layout
predicted from it (by replaying a short traced run of the basis's layout, and by the layout model
alone), then every layout measured in full: three plain runs each (five in the ``time`` case), interleaved,
their median the measured figure (one run of a layout on these shared cores has come out 15% off
its others; the median of three leaves one such run out; at tiny-cpu a pipeline's step came out in
two states 10-20% apart from run to run, 28 and 34 ms for 4 microbatches, and the median of five
leaves two such runs out). Printed per layout:
predicted step time (± the basis's step spread, scaled) and measured, their error, the error of the
ratio to the basis's own layout (the model predicts that ratio; the absolute error also carries the
basis run's drift from the runs measured after it), each engine's step and error ("model",
"replay"), how far its runs are from their median ("runs": the measurement's own noise), and peak
memory predicted and measured; per case: what the runs themselves resolve (each round, one run of
every layout against the median of its other runs, the largest over the layouts: a prediction made
from one run can be held no closer), the Spearman correlation of the
predicted and measured rankings (each engine's too),
the step-time and peak-memory errors, and the no-change check (the model's step for the basis's own
layout against the basis's measured step). Targets (issues 15 and 28): Spearman >= 0.9, step time and
peak memory within 15%, no-change within 5% or no prediction at all.

- ``time``: tiny-cpu (0.14M parameters) over nine layouts: DDP, ZeRO-1, FSDP2, TP with and without
  sequence parallelism, pipelines of 2, 4 and 8 microbatches (1F1B and GPipe), checkpointing.
- ``memory``: tiny-cpu widened to d_model 512 (12.8M parameters: model state is a third of a rank's
  RSS, no longer lost in the libraries' 400 MiB) over DDP, ZeRO-1, FSDP2, TP and a pipeline, 6 steps.
- ``shape``: a shape the model was never tuned on (d_model 128, 6 blocks, 128 tokens: 1.2M
  parameters) over eight layouts, 12 steps.
- ``short``: a 4-step basis (1 step after the warm-up): the sweep must say why it predicts nothing
  and measure the layouts anyway (such a basis had predicted 2368 ms for a layout that measured 119).

On request (``--case``), each 6-9 minutes:

- ``layouts``: layouts beyond the issue's at d_model 64, 96 tokens: ZeRO-2, DDP's buckets at
  0.05 MB, gradient accumulation, GPipe and interleaved 1F1B with 4 microbatches, checkpointing
  with a pipeline, FSDP2 and TP.
- ``ranks4``: 4 ranks on the host's cores (on 2 cores each has half a core while all compute): DDP,
  FSDP2, TP over 2 and 4, pipelines of 2 and 4 stages, pipeline x TP.
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
        5,
    ),
    "memory": (
        ["model.d_model=512", "model.n_heads=8"],
        ["tp=1", "zero=1", "zero=3", "tp=2", "pp=2"],
        6,
        3,
    ),
    "short": ([], ["tp=1", "tp=2", "pp=2"], 4, 1),
    # a shape nothing here was tuned on: 1.2M parameters, 6 blocks (3 a pipeline stage), 128 tokens
    "shape": (
        ["model.d_model=128", "model.n_layers=6", "model.seq_len=128"],
        [
            "tp=1",
            "zero=1",
            "zero=3",
            "tp=2",
            "tp=2,sequence_parallel=true",
            "pp=2",
            "pp=2,microbatches=4",
            "tp=1,kernels.activation_checkpointing=true",
        ],
        12,
        3,
    ),
    # run on request (--case): layouts beyond the issue's, and more ranks than cores
    "layouts": (
        ["model.d_model=64", "model.seq_len=96", "data.global_batch=24"],
        [
            "tp=1",
            "zero=2",
            "overlap.bucket_cap_mb=0.05",
            "data.grad_accum=2",
            "pp=2,microbatches=4,pp_schedule=gpipe",
            "pp=2,microbatches=4,pp_schedule=interleaved-1f1b",
            "pp=2,kernels.activation_checkpointing=true",
            "zero=3,kernels.activation_checkpointing=true",
            "tp=2,kernels.activation_checkpointing=true",
        ],
        16,
        3,
    ),
    "ranks4": (
        [],
        [
            "tp=1",
            "zero=3",
            "tp=2",
            "pp=2",
            "pp=4",
            "pp=2,tp=2",
            "tp=4",
            "pp=4,microbatches=8,pp_schedule=gpipe",
        ],
        12,
        3,
    ),
}
ON_REQUEST = ("layouts", "ranks4")
NPROC = {"ranks4": 4}
WITHIN = 0.15


def run_case(name: str, work: Path, steps_override: int | None = None) -> dict[str, Any]:
    overrides, layouts, steps, repeats = CASES[name]
    steps = steps_override or steps
    nproc = NPROC.get(name, 2)
    sweep = run_sweep(
        "tiny-cpu",
        nproc,
        [*overrides, f"steps={steps}"],
        layouts,
        repeats,
        work / name,
        progress=lambda line, *_: print(f"  {line}", flush=True),
    )
    data = sweep.to_json()
    print(f"\n{name}: tiny-cpu {' '.join(overrides)} on {nproc} CPU ranks, {steps} steps x {repeats} run(s)")
    if data.get("no_predictions"):
        print(f"no predictions: {data['no_predictions']}")
    print(
        f"{'layout':<34} {'pred ms':>8} {'±':>5} {'meas ms':>8} {'err':>7} {'vs basis':>8} {'model':>7} {'err':>7} "
        f"{'replay':>7} {'err':>7} {'runs':>6} {'pred MiB':>9} {'meas MiB':>9} {'mem err':>8}"
    )
    # the model predicts each layout against its basis: "vs basis" is the error of that ratio, the
    # predicted over the basis layout's predicted against the measured over its measured (the
    # absolute error also carries the basis run's own drift from the runs measured after it)
    own = next((c for c in data["candidates"] if c["label"] == data.get("basis_layout")), None)
    own_p = ((own or {}).get("predicted") or {}).get("step_ms")
    own_m = (own or {}).get("step_ms")
    ratio_errors = []
    own_e = ((own or {}).get("predicted") or {}).get("engines") or {}
    engine_ratio: dict[str, list[float]] = {}
    # the measurement's own noise: how far a layout's runs are from their median (the figure the
    # predictions are held to), the largest over the layouts
    spreads = []
    rows = []
    for c in data["candidates"]:
        p = c.get("predicted") or {}
        pm, mm = p.get("peak_memory_bytes"), c.get("peak_memory_bytes")
        merr = f"{pm / mm - 1:>+8.1%}" if pm and mm else f"{'-':>8}"
        pt, mt = p.get("step_ms"), c.get("step_ms")
        terr = f"{pt / mt - 1:>+7.1%}" if pt and mt else f"{'-':>7}"
        rerr = f"{'-':>8}"
        if pt and mt and own_p and own_m:
            ratio_errors.append((pt / own_p) / (mt / own_m) - 1)
            rerr = f"{ratio_errors[-1]:>+8.1%}"
        by_engine = ""
        for engine in ("model", "replay"):
            e = (p.get("engines") or {}).get(engine)
            by_engine += f" {e or 0:>7.1f} " + (f"{e / mt - 1:>+7.1%}" if e and mt else f"{'-':>7}")
            if e and mt and own_e.get(engine) and own_m:
                engine_ratio.setdefault(engine, []).append(abs((e / own_e[engine]) / (mt / own_m) - 1))
        runs = [r["step_ms"] for r in c.get("runs", []) if r.get("ok") and r.get("step_ms")]
        spread = max((abs(r / mt - 1) for r in runs), default=None) if mt else None
        if spread is not None and len(runs) > 1:
            spreads.append(spread)
        rows.append(
            {
                "layout": c["label"],
                "predicted_ms": pt,
                "uncertainty_ms": p.get("uncertainty_ms"),
                "measured_ms": mt,
                "runs_ms": runs,
                **{f"{e}_ms": v for e, v in (p.get("engines") or {}).items()},
                "predicted_peak_bytes": pm,
                "measured_peak_bytes": mm,
                "time_parts_ms": p.get("time_ms"),  # the prediction part by part, to read a miss by
            }
        )
        print(
            f"{c['label']:<34} {pt or 0:>8.1f} {p.get('uncertainty_ms') or 0:>5.1f} {mt or 0:>8.1f} {terr} {rerr}"
            f"{by_engine} {f'{spread:.1%}' if len(runs) > 1 and spread is not None else '-':>6}"
            f" {(pm or 0) / 2**20:>9.0f} {(mm or 0) / 2**20:>9.0f} {merr}"
        )
    ratio_max = max((abs(e) for e in ratio_errors), default=None)
    a = data["agreement"]
    basis = data.get("basis") or {}
    own = [c for c in data["candidates"] if c["label"] == data.get("basis_layout") and c.get("predicted")]
    # no change: the model's step for the basis's own layout against the basis's measured step
    no_change = own[0]["predicted"]["step_ms"] / (basis["step_s"] * 1e3) - 1 if own and basis else None
    if a.get("spearman") is not None:
        print(
            f"Spearman {a['spearman']:.2f} over {a['layouts_ranked']} layouts; step time error median "
            f"{a['time_error_median']:.1%}, max {a['time_error_max']:.1%}; peak memory error median "
            f"{a['memory_error_median']:.1%}, max {a['memory_error_max']:.1%}"
            + (f"; no change {no_change:+.1%}" if no_change is not None else "")
            + (
                f"; against the basis layout's measured step, {ratio_max:.1%} at most"
                if ratio_max is not None
                else ""
            )
        )
    engines = a.pop("engines", {})
    for engine, e in engines.items():
        e["ratio_error_max"] = max(engine_ratio.get(engine, []), default=None)
        print(
            f"  {engine:>6}: Spearman {e['spearman']:.2f}, step time error max {e['time_error_max']:.1%}, "
            f"against the basis layout {e['ratio_error_max'] or 0:.1%} at most"
        )
    if data.get("no_replay"):
        print(f"  no replay: {data['no_replay']}")
    if a.get("memory_lower_bounds"):
        print(
            f"  {a['memory_lower_bounds_held']} of {a['memory_lower_bounds']} peaks predicted as a lower bound "
            "(FSDP2 on CPU) were at or above it; the memory error is the point predictions'"
        )
    noise = max(spreads, default=None)
    if noise is not None:
        print(f"  the measurement's own noise: a layout's runs {noise:.1%} from their median at most")
    if (rounds := a.get("runs_resolve_rounds")) is not None:
        # the best a prediction from one run could do: one round's run of each layout held to the
        # median of its other runs, as a prediction is held to the median of all
        beyond = sum(r > WITHIN for r in rounds)
        print(
            f"  what the runs resolve: one round's run of each layout against the median of its others,"
            f" {a['runs_resolve']:.1%} at most (the median over {len(rounds)} rounds); beyond {WITHIN:.0%}"
            f" in {beyond} of {len(rounds)}"
        )
    return {
        "case": name,
        "steps": steps,
        "engine": next(
            (c["predicted"].get("engine") for c in data["candidates"] if c.get("predicted")), None
        ),
        "engines": engines,
        **a,
        "no_change": no_change,
        "ratio_error_max": ratio_max,
        "runs_from_median_max": noise,
        "no_predictions": data.get("no_predictions"),
        "layouts": rows,
        "basis": data.get("basis"),  # what it measured (its costs beyond FLOPs, its link fit)
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--case",
        action="append",
        choices=list(CASES),
        help=f"default: every case but {', '.join(ON_REQUEST)}",
    )
    ap.add_argument("--json", type=Path)
    ap.add_argument("--steps", type=int, help="steps a run, in place of each case's own")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.case or [c for c in CASES if c not in ON_REQUEST]:
            rows.append(run_case(name, Path(tmp), args.steps))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    met = {r["case"]: _met(r) for r in rows}
    print()
    for r in rows:
        resolve = r.get("runs_resolve")
        verdict = "met" if met[r["case"]] else "missed"
        if not met[r["case"]] and resolve is not None and resolve > WITHIN:
            # a miss where one run of each layout misses the others' median by more than the target
            # too: the measurement cannot tell the prediction's error from its own
            verdict += f" (unresolved: this run's runs resolve {resolve:.0%}, over the {WITHIN:.0%} target)"
        print(f"{r['case']}: {verdict}")
    sys.exit(0 if all(met.values()) else 1)


def _met(r: dict[str, Any]) -> bool:
    """The issue's targets: Spearman >= 0.9, every step time and point peak within 15%, every lower
    bound held; the short case, no prediction at all."""
    if r["case"] == "short":
        return bool(r["no_predictions"])
    return bool(
        (r["spearman"] or 0) >= 0.9
        and (r["time_error_max"] or 1) <= WITHIN
        and (r["memory_error_max"] is None or r["memory_error_max"] <= WITHIN)
        and r.get("memory_lower_bounds_held") == r.get("memory_lower_bounds")
    )


if __name__ == "__main__":
    main()
