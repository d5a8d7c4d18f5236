"""perfkit's analyzers against Holistic Trace Analysis (HTA) on the same files, side by side.

    pip install holistictraceanalysis      # or: pip install -e '.[bench]'
    python bench/analyze_vs_hta.py                       # the largest HTA fixture (216k events)
    python bench/analyze_vs_hta.py --trace A.json.gz --repeats 3

Two comparisons, each tool in a fresh process per repeat, alternating, medians printed:

1. **As a user runs it** (the headline): ``perfkit analyze TRACE`` (the whole CLI: start-up,
   imports, parse, every metric and rule, analysis.json written) against a Python process that
   imports HTA and computes its first four metrics (temporal breakdown, idle-time attribution,
   kernel breakdown, communication/computation overlap), timed from outside, process start to exit.
2. **The same four metrics in-process**, imports excluded on both sides: perfkit's loader and four
   functions against HTA's.

Also printed: peak RSS of each, and HTA's four metrics computed by perfkit with HTA's definitions
(``perfkit.analyzers.hta``) against HTA's own: the temporal breakdown (percent), the kernel-type
table, the communication/computation overlap and the per-stream idle breakdown (microseconds).
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

SHARED = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "hta" / "tests" / "data"
DEFAULT = SHARED / "df_index_resolver" / "df_index_resolver.json.gz"

PERFKIT = r"""
import json, resource, sys, time
from pathlib import Path
t0 = time.perf_counter()
from perfkit.analyzers.trace import load_trace
from perfkit.analyzers.breakdown import temporal_breakdown, idle_attribution, exposed_communication
from perfkit.analyzers.kernels import kernel_table
from perfkit.analyzers.comms import trace_collectives
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t1 = time.perf_counter()
trace = load_trace(Path(sys.argv[1]))
tb = temporal_breakdown(trace, hta_definitions=True)
idle_attribution(trace); kernel_table(trace); trace_collectives(trace); exposed_communication(trace)
t2 = time.perf_counter()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
from perfkit.analyzers import hta
idle = hta.idle_breakdown(trace)
print(json.dumps({"seconds": t2 - t1, "import_s": t1 - t0, "peak_kb": peak,
                  "after_import_kb": base, "idle_pct": tb["idle_pct"], "compute_pct": tb["compute_pct"],
                  "non_compute_pct": tb["non_compute_pct"],
                  "kernel_us": {k: v / 1e3 for k, v in hta.kernel_breakdown(trace).items()},
                  "overlap_pct": hta.comm_comp_overlap_pct(trace),
                  "idle_us": {f"{r.stream}/{r.idle_category}": r.idle_ns / 1e3 for r in idle.itertuples()}}))
"""

HTA = r"""
import json, resource, sys, time, warnings, logging
warnings.filterwarnings("ignore")
t0 = time.perf_counter()
from hta.trace_analysis import TraceAnalysis
logging.disable(logging.WARNING)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t1 = time.perf_counter()
a = TraceAnalysis(trace_dir=sys.argv[1])
tb = a.get_temporal_breakdown(visualize=False)
ranks = list(a.t.traces.keys())
idle = a.get_idle_time_breakdown(ranks=ranks, visualize=False)[0]
kernel = a.get_gpu_kernel_breakdown(visualize=False)[0]
overlap = a.get_comm_comp_overlap(visualize=False)["comp_comm_overlap_pctg"].iloc[0]
t2 = time.perf_counter()
row = tb.iloc[0]
print(json.dumps({"seconds": t2 - t1, "import_s": t1 - t0, "peak_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  "after_import_kb": base, "idle_pct": float(row["idle_time_pctg"]),
                  "compute_pct": float(row["compute_time_pctg"]), "non_compute_pct": float(row["non_compute_time_pctg"]),
                  "kernel_us": {r.kernel_type: float(r.sum) for r in kernel.itertuples()},
                  "overlap_pct": None if overlap != overlap else float(overlap),
                  "idle_us": {f"{r.stream}/{r.idle_category}": float(r.idle_time) for r in idle.itertuples()}}))
"""


def run(code: str, arg: str, python: str) -> dict:
    proc = subprocess.run([python, "-c", code, arg], capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def whole_process(argv: list[str]) -> dict:
    """Wall time from process start to exit, and the process's peak RSS (os.wait4's own rusage)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        sys.exit(f"{argv[0]} failed:\n{proc.stderr.read().decode()[-3000:] if proc.stderr else ''}")
    return {"seconds": seconds, "peak_kb": usage.ru_maxrss}


def _agreement(ours: dict, theirs: dict) -> dict[str, float]:
    """Largest differences between perfkit's HTA-definition figures and HTA's (microseconds)."""
    out = {}
    for key in ("kernel_us", "idle_us"):
        a, b = ours[key], theirs[key]
        out[key] = max((abs(a.get(k, 0.0) - b.get(k, 0.0)) for k in {*a, *b}), default=0.0)
        out[key.replace("_us", "_total_us")] = sum(b.values())
    return out


def _pct(value: float | None) -> str:
    return "none" if value is None else f"{value:.2f}%"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--trace", type=Path, action="append", help="trace file(s); default: the largest HTA fixture"
    )
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--hta-python", default=sys.executable, help="a Python with holistictraceanalysis installed"
    )
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    results = []
    perfkit_cli = str(Path(sys.executable).with_name("perfkit"))
    for trace in args.trace or [DEFAULT]:
        with tempfile.TemporaryDirectory() as tmp:  # HTA reads a folder of traces
            (Path(tmp) / trace.name).symlink_to(trace.resolve())
            ours, theirs, cli, hta_cli = [], [], [], []
            for _ in range(args.repeats):  # alternate, so drift hits both alike
                cli.append(
                    whole_process([perfkit_cli, "analyze", str(trace), "--out", str(Path(tmp) / "out")])
                )
                hta_cli.append(whole_process([args.hta_python, "-c", HTA, tmp]))
                ours.append(run(PERFKIT, str(trace), sys.executable))
                theirs.append(run(HTA, tmp, args.hta_python))

        def med(rs: list[dict], key: str) -> float:
            return statistics.median(r[key] for r in rs)

        whole = med(hta_cli, "seconds") / med(cli, "seconds")
        spread = sorted(h["seconds"] / c["seconds"] for c, h in zip(cli, hta_cli, strict=True))
        speedup = med(theirs, "seconds") / med(ours, "seconds")
        memory = med(cli, "peak_kb") / med(hta_cli, "peak_kb")
        diff = {k: abs(ours[0][k] - theirs[0][k]) for k in ("idle_pct", "compute_pct", "non_compute_pct")}
        print(f"{trace.name} ({args.repeats} alternating fresh processes each):")
        print(
            f"  as a user runs it: perfkit analyze {med(cli, 'seconds'):.2f} s, HTA script "
            f"{med(hta_cli, 'seconds'):.2f} s -> {whole:.1f}x faster (pairs {spread[0]:.1f}x-{spread[-1]:.1f}x)"
        )
        print(
            f"  the four metrics in-process, imports excluded: perfkit {med(ours, 'seconds'):.2f} s, "
            f"HTA {med(theirs, 'seconds'):.2f} s -> {speedup:.1f}x"
        )
        print(
            f"  peak RSS, whole process: perfkit {med(cli, 'peak_kb') / 1024:.0f} MiB, HTA "
            f"{med(hta_cli, 'peak_kb') / 1024:.0f} MiB -> {memory:.2f} of HTA's"
        )
        print(
            "  temporal breakdown (perfkit with HTA's definitions vs HTA): "
            + ", ".join(f"{k} {ours[0][k]:.2f} vs {theirs[0][k]:.2f}" for k in diff)
            + f"; max difference {max(diff.values()):.2f} points"
        )
        agree = _agreement(ours[0], theirs[0])
        print(
            f"  kernel-type table: max difference {agree['kernel_us']:.0f} us of {agree['kernel_total_us']:.0f}; "
            f"overlap {_pct(ours[0]['overlap_pct'])} vs {_pct(theirs[0]['overlap_pct'])}; "
            f"idle per stream and category: max difference {agree['idle_us']:.0f} us of {agree['idle_total_us']:.0f}"
        )
        results.append(
            {
                "trace": str(trace),
                "cli": cli,
                "hta_script": hta_cli,
                "perfkit": ours,
                "hta": theirs,
                "whole_process_speedup": whole,
                "in_process_speedup": speedup,
                "memory_ratio": memory,
                "breakdown_max_diff_pts": max(diff.values()),
                **agree,
            }
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
