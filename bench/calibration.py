"""Do the diagnoses' savings hold? Predicted against measured, per planted problem.

    python bench/calibration.py                  # every case, 2 CPU ranks, ~5 minutes
    python bench/calibration.py --case buckets --repeats 5

For each case, a planted-slow configuration of the bundled trainer is profiled (every collector) and
analyzed; the finding the case plants must be there. Its remedy's trainer change is then measured:
the planted configuration and the planted one with the fix, in interleaved plain runs (no
collectors), as ``perfkit optimize`` measures. The measured saving is the median of the paired
step-time differences. A prediction holds when it is within a factor of 2 of the measured saving; a
finding that says it cannot estimate (its estimate reads "not estimated") does not count as holding.

Cases are fitted or held out: the small-bucket model's constants were fitted to the ``buckets``
case, so that case cannot judge it; the held-out cases (other model shapes, other bucket sizes)
were never used to set any estimate, and the summary counts only them.

Where a trace is enough, the real H100 capture in ``tests/data/h100`` adds a row: the eager step
loop's trace is analyzed, and its launch-bound finding's predicted saving is set against the step
time the same loop measured compiled (``capture.json``: both configurations timed on the GPU).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from perfkit.analyzers import remedies
from perfkit.analyzers.analyze import analyze

from perfkit.optimizer.trials import Candidate, interleave
from perfkit.profile import reference_request, run_profile

# The workload: tiny-cpu with a wider model (~0.9M parameters), heavy enough that a step is mostly
# compute on 2 shared cores.
WORKLOAD = ["model.d_model=128", "model.n_heads=4"]
OTHER = ["model.d_model=96", "model.n_layers=6", "model.n_heads=4", "model.seq_len=128"]  # held-out shape
CASES: dict[str, tuple[list[str], str, str]] = {
    "buckets": ([*WORKLOAD, "overlap.bucket_cap_mb=0.005"], "small_ddp_buckets", "fitted"),
    "checkpointing": ([*WORKLOAD, "kernels.activation_checkpointing=true"], "recompute_without_pressure", "held-out"),
    "attention": ([*WORKLOAD, "kernels.attention=eager"], "unfused_attention", "held-out"),
    "optimizer": ([*WORKLOAD, "kernels.optimizer_impl=unfused"], "unfused_optimizer", "held-out"),
    "sync": ([*WORKLOAD, "log_every=1"], "host_device_sync", "held-out"),
    "buckets-other": ([*OTHER, "overlap.bucket_cap_mb=0.02"], "small_ddp_buckets", "held-out"),
    "checkpointing-other": ([*OTHER, "kernels.activation_checkpointing=true"], "recompute_without_pressure",
                            "held-out"),
    "attention-other": ([*OTHER, "kernels.attention=eager"], "unfused_attention", "held-out"),
}  # fmt: skip


def run_case(name: str, nproc: int, steps: int, repeats: int, work: Path) -> dict[str, Any]:
    sets, finding_id, role = CASES[name]
    planted = sets
    run, rc = run_profile(
        reference_request("tiny-cpu", [*sets, f"steps={steps}"], nproc, work / f"{name}-profiled", name)
    )
    if rc != 0:
        sys.exit(f"{name}: the profiled run failed (exit code {rc})")
    found = {f.id: f for f in analyze(run.path).findings}
    f = found.get(finding_id)
    row: dict[str, Any] = {"case": name, "planted": planted, "finding": finding_id, "found": f is not None,
                           "role": role}  # fmt: skip
    if f is None:
        row["verdict"] = f"MISSED (found: {', '.join(found) or 'nothing'})"
        return row
    fix = remedies.get(f.remedy).overrides()
    base = Candidate("planted", [*sets, f"steps={steps}"])
    fixed = Candidate("fixed", [*sets, *fix, f"steps={steps}"])
    interleave("tiny-cpu", nproc, [base, fixed], repeats, work, progress=lambda line, *_: print("  " + line))
    pairs = [
        b.step_ms - v.step_ms
        for b, v in zip(base.runs, fixed.runs, strict=False)
        if b.ok and v.ok and b.step_ms and v.step_ms
    ]
    measured = statistics.median(pairs) if pairs else None
    predicted = f.saving_ms_per_step
    row.update(
        fix=fix,
        predicted_ms=predicted,
        estimate=f.estimate,
        measured_ms=measured,
        planted_step_ms=base.step_ms,
        pairs_ms=pairs,
    )
    noise = 0.03 * (base.step_ms or 0.0)  # gains under 3% of the step are inside this machine's noise
    if f.estimate.startswith("not estimated"):
        row["verdict"] = "NOT ESTIMATED (does not count as holding)"
    elif measured is None:
        row["verdict"] = "not measured"
    elif measured <= noise:
        row["verdict"] = (
            "HOLDS (no gain, none predicted)" if predicted <= noise else "OFF: the fix measured no gain"
        )
    else:
        ratio = predicted / measured
        row["ratio"] = ratio
        row["verdict"] = "HOLDS (within 2x)" if 0.5 <= ratio <= 2 else f"OFF ({ratio:.2f}x)"
    return row


H100 = Path(__file__).resolve().parents[1] / "tests" / "data" / "h100"


def fixture_rows() -> list[dict[str, Any]]:
    """Predicted against measured on the real H100 capture: compilation, the launch-bound fix."""
    capture = json.loads((H100 / "capture.json").read_text())
    eager, compiled = capture["tuned"]["step_ms_median"], capture["compiled"]["step_ms_median"]
    found = {f.id: f for f in analyze(H100 / "tuned_trace.json.gz").findings}
    f = found.get("host_launch_bound")
    row: dict[str, Any] = {
        "case": "h100-compile",
        "planted": ["torch.compile"],
        "finding": "host_launch_bound",
        "role": "held-out",
    }
    if f is None:
        return [{**row, "found": False, "verdict": f"MISSED (found: {', '.join(found) or 'nothing'})"}]
    measured = eager - compiled
    ratio = f.saving_ms_per_step / measured
    return [
        {
            **row,
            "found": True,
            "predicted_ms": f.saving_ms_per_step,
            "estimate": f.estimate,
            "measured_ms": measured,
            "planted_step_ms": eager,
            "ratio": ratio,
            "verdict": "HOLDS (within 2x)" if 0.5 <= ratio <= 2 else f"OFF ({ratio:.2f}x)",
        }
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", action="append", choices=[*CASES, "h100"], help="default: every case")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.case or [*CASES, "h100"]:
            if name == "h100":
                rows += fixture_rows()
                continue
            print(f"case {name}: {' '.join(CASES[name][0])}", flush=True)
            rows.append(run_case(name, args.nproc, args.steps, args.repeats, Path(tmp)))
    print(
        f"\ntiny-cpu, {args.nproc} CPU ranks, {args.repeats} interleaved pairs per fix; "
        "h100-compile: the real H100 capture (eager trace analyzed, eager and compiled step times measured there)"
    )
    print(
        f"{'case':<20} {'role':<9} {'finding':<28} {'step ms':>8} {'predicted':>10} {'measured':>9}  verdict"
    )
    for r in rows:
        pred = f"{r['predicted_ms']:.1f}" if "predicted_ms" in r else "-"
        meas = f"{r['measured_ms']:.1f}" if r.get("measured_ms") is not None else "-"
        step = f"{r['planted_step_ms']:.1f}" if r.get("planted_step_ms") else "-"
        print(
            f"{r['case']:<20} {r['role']:<9} {r['finding']:<28} {step:>8} {pred:>10} {meas:>9}  {r['verdict']}"
        )
    held = [r for r in rows if r["role"] == "held-out"]
    print(f"held-out cases that hold: {sum(r['verdict'].startswith('HOLDS') for r in held)} of {len(held)}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
