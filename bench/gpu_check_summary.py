"""bench/gpu_check.sh's last stage: one JSON of every stage and the figures it measured.

    python bench/gpu_check_summary.py OUT MODE RUN

Reads OUT/stages.tsv (a line a stage: name, status, seconds), the MFU and overhead JSON, and the
profiled run's manifest and analysis; writes OUT/summary.json and prints the figures. Exits 1 when
a stage failed (a stage skipped for want of hardware is not a failure).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def _read(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def summarize(out: Path, mode: str, run: Path) -> dict[str, Any]:
    stages = []
    for line in (out / "stages.tsv").read_text().splitlines():
        name, status, seconds = line.split("\t")
        stages.append({"name": name, "status": status, "seconds": int(seconds)})
    env = _read(out / "environment.json") or {}
    mfu = _read(out / "mfu.json") or {}
    base = mfu.get("base") or {}
    overhead = (_read(out / "overhead.json") or [{}])[0]
    manifest = _read(run / "manifest.json") or {}
    analysis = _read(run / "analysis.json") or {}
    metrics = analysis.get("metrics") or {}
    steps = metrics.get("steps") or {}
    snapshot = run / "rank0" / "memory_snapshot.pickle"
    nvml = run / "rank0" / "nvml.jsonl"
    return {
        "mode": mode,
        "gpu": env.get("gpu"),
        "torch": env.get("torch"),
        "cuda": env.get("cuda"),
        "stages": stages,
        "passed": all(s["status"] == "ok" or s["status"].startswith("skipped") for s in stages),
        "trainer": {
            "config": mfu.get("config"),
            "step_ms": base.get("step_ms"),
            "tokens_per_s": base.get("tokens_per_s"),
            "mfu": base.get("mfu"),
        },
        "profiled": {
            "collectors": {k: v.get("status") for k, v in (manifest.get("collectors") or {}).items()},
            "step_ms_median": steps.get("step_time_ms"),
            "tokens_per_s": steps.get("tokens_per_s"),
            "mfu": (metrics.get("throughput") or {}).get("mfu"),
            "nvml_samples": sum(1 for _ in nvml.open()) if nvml.is_file() else 0,
            "allocator_snapshot_bytes": snapshot.stat().st_size if snapshot.is_file() else 0,
            "findings": [
                {"id": f.get("id"), "severity": f.get("severity"), "title": f.get("title")}
                for f in analysis.get("findings") or []
            ],
        },
        "overhead": {
            "ratio": overhead.get("ratio"),
            "interval95": overhead.get("interval"),
            "pairs": len(overhead.get("pairs") or []),
            "self_time_share": overhead.get("self_time_share_median"),
        },
    }


def main() -> int:
    out, mode, run = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
    summary = summarize(out, mode, run)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    t, o = summary["trainer"], summary["overhead"]
    if t["tokens_per_s"]:
        mfu = f", MFU {t['mfu']:.1%}" if t["mfu"] else ""
        print(f"trainer {t['config']}: {t['step_ms']:.1f} ms/step, {t['tokens_per_s']:,.0f} tokens/s{mfu}")
    if o["ratio"]:
        lo, hi = o["interval95"]
        print(f"perfkit overhead: {o['ratio']:.3f}x [{lo:.3f}-{hi:.3f}] over {o['pairs']} pairs")
    print(f"findings: {', '.join(f['id'] for f in summary['profiled']['findings']) or 'none'}")
    print(
        f"summary: {out / 'summary.json'} ({'all stages passed' if summary['passed'] else 'a stage FAILED'})"
    )
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
