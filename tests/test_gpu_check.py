"""bench/gpu_check.sh, the script a lent GPU runs, end to end in its CPU mode: every stage runs from
outside the repository on perfkit as installed, and writes what it must (it had failed every import:
the repository's own perfkit/ folder shadowed the install)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


def test_the_gpu_check_runs_every_stage_in_cpu_mode(tmp_path: Path) -> None:
    env = {**os.environ, "GPU_CHECK_MODE": "cpu", "PYTHON": sys.executable, "OUT": str(tmp_path / "out")}
    env.pop("PYTHONPATH", None)
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh")], env=env, capture_output=True,
                          text=True, timeout=600, cwd=tmp_path)  # fmt: skip
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    failed = [s for s in summary["stages"] if s["status"] != "ok"]
    assert proc.returncode == 0 and not failed, (failed, proc.stdout[-3000:])
    names = [s["name"] for s in summary["stages"]]
    assert names == ["environment", "gpu_tests", "mfu", "profile", "analyze", "overhead", "two_ranks"]
    env_info = json.loads((tmp_path / "out" / "environment.json").read_text())
    assert "gpu_check_work" in env_info["perfkit_from"]  # the linked layout, not the checkout's folder
    assert summary["trainer"]["tokens_per_s"] > 0 and summary["profiled"]["step_ms_median"] > 0
    lo, hi = summary["overhead"]["interval95"]
    assert lo <= summary["overhead"]["ratio"] <= hi and summary["overhead"]["pairs"] == 2
    assert summary["profiled"]["collectors"]["kernels"] == "ok"
    assert "tests=" in (tmp_path / "out" / "gpu_tests.xml").read_text()  # collected (skipped on CPU)
