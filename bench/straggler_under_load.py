"""Stragglers on a busy host: the planted script of tests/test_planted.py (2 CPU ranks under
``perfkit profile``), N runs with rank 1 sleeping 50 ms a step and N clean runs, all beside a CPU
hog (a spinning process, unpinned, sharing the 2 cores). Prints how often the straggler was named,
how often a clean run got a straggler finding, and each run's figures.

    python bench/straggler_under_load.py --runs 20
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from perfkit.analyzers.analyze import analyze  # noqa: E402
from test_planted import SCRIPT  # noqa: E402


def hog() -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def profile(tmp: Path, plant: str) -> Path:
    script = tmp / "train.py"
    script.write_text(SCRIPT)
    out = tmp / "run"
    cmd = [sys.executable, "-m", "perfkit", "profile", "--out", str(out), "--profile-steps", "none", "--"]
    cmd += ["torchrun", "--nproc_per_node", "2", str(script)]
    env = {"PLANT": plant, "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin"}
    subprocess.run(cmd, check=True, capture_output=True, env=env, timeout=600)
    return out


def one(plant: str) -> tuple[bool, str]:
    with tempfile.TemporaryDirectory() as tmp:
        spinner = hog()
        try:
            out = profile(Path(tmp), plant)
        finally:
            spinner.kill()
        a = analyze(out)
    st = a.metrics.stragglers
    named = any(f.id == "straggler" and f.ranks == [1] for f in a.findings)
    figures = ", ".join(
        f"r{r.rank} busy {r.busy_ms:.0f} score {r.score:.2f} busiest {r.slowest_share:.2f} extra {r.extra_ms:.0f} "
        f"runq {r.runq_wait_ms or 0:.0f}"
        for r in (st.ranks if st else [])
    )
    return named, f"host busy {st.host_busy if st else None:.2f}; {figures}; " + ",".join(
        f.id for f in a.findings
    )


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--runs", type=int, default=20)
    a = p.parse_args()
    named = false_alarms = 0
    for i in range(a.runs):
        hit, said = one("straggler")
        named += hit
        print(f"straggler run {i + 1}: {'named' if hit else 'MISSED'}  {said}", flush=True)
        alarm, said = one("")
        false_alarms += alarm
        print(f"clean run {i + 1}: {'FALSE STRAGGLER' if alarm else 'ok'}  {said}", flush=True)
    print(
        f"straggler named in {named}/{a.runs} runs beside a CPU hog; clean runs with a straggler finding: "
        f"{false_alarms}/{a.runs}"
    )


if __name__ == "__main__":
    main()
