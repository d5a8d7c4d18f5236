"""The report in a real browser: Debian's headless Chromium opens it from file://, every figure is
drawn by plotly, no console error occurs, and nothing is fetched (the page's Content-Security-Policy
makes the browser refuse and log any fetch). Skips where chromium is not installed (.ci/run
installs it)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from perfkit.analyzers.analyze import analyze
from perfkit.reports.html import write_report

DATA = Path(__file__).parent / "data"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
    "--virtual-time-budget=10000",
]

pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install chromium)"
)


def open_in_browser(page: Path, tmp: Path) -> tuple[str, str]:
    args = [CHROMIUM, *FLAGS, f"--user-data-dir={tmp / 'profile'}", "--enable-logging=stderr", "--v=0"]
    dom = subprocess.run([*args, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    shot = subprocess.run(
        [*args, "--window-size=1400,1800", f"--screenshot={tmp / 'report.png'}", page.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (tmp / "report.png").stat().st_size > 10_000, shot.stderr[-2000:]
    return dom.stdout, dom.stderr


def test_a_256_rank_report_stays_small_and_draws(tmp_path: Path) -> None:
    """256 ranks (made from a real NCCL trace, three effects planted): under 5 MB, every figure
    drawn, the ranked lists name the planted ranks."""
    from helpers import synth_ranks

    synth = synth_ranks()
    source = DATA / "hta" / "trace_filter" / "sampled_rank-0.json.gz"
    plan = synth.Plan(ranks=256, straggler=17, slow_gpu=99, slow_link=200)
    synth.synthesize(source, tmp_path / "job", plan, jobs=2)
    page = write_report(analyze(tmp_path / "job", jobs=2), tmp_path / "index.html")
    text = page.read_text()
    assert page.stat().st_size < 5_000_000
    assert "Named: slow GPU 99; late 17; slow link 200." in text and "ranks all 256" in text
    dom, _ = open_in_browser(page, tmp_path)
    graphs = re.split(r'class="plotly-graph-div', dom)[1:]
    assert len(graphs) == text.count('class="plotly-graph-div"') >= 2
    assert all('class="main-svg"' in g for g in graphs), "a figure was not drawn"


@pytest.mark.parametrize(
    "source",
    [DATA / "h100" / "tuned_trace.json.gz", DATA / "hta" / "trace_filter"],
    ids=["h100", "hta-2-ranks"],
)
def test_report_draws_every_figure_offline(tmp_path: Path, source: Path) -> None:
    page = write_report(analyze(source), tmp_path / "index.html")
    expected = page.read_text().count('class="plotly-graph-div"')
    assert expected >= 2
    dom, log = open_in_browser(page, tmp_path)
    graphs = re.split(r'class="plotly-graph-div', dom)[1:]
    assert len(graphs) == expected
    assert all('class="main-svg"' in g for g in graphs), "a figure was not drawn"
    console = [line for line in log.splitlines() if "CONSOLE" in line or "Refused" in line]
    assert not console, console


def _candidate(label: str, ms: list[float]) -> dict:
    from perfkit.optimizer.trials import Candidate, Measurement

    runs = [Measurement(ok=True, step_ms=m, tokens_per_s=1e5 / m, loss=4.2) for m in ms]
    return Candidate(label, [f"parallel.{label}=2"], runs).to_json()


@pytest.mark.parametrize("kind", ["sweep", "optimize"])
def test_sweep_and_optimize_pages_draw_offline(tmp_path: Path, kind: str) -> None:
    from perfkit.reports.trials import write

    if kind == "sweep":
        predicted = {"step_ms": 33.0, "peak_memory_bytes": 420 << 20, "time_ms": {}, "memory_bytes": {}}
        rows = [
            {**_candidate("tp", [30.0, 31.0]), "vs_best": 1.0, "predicted": predicted, "measured_steps": 20},
            {**_candidate("<b>pp</b>", [40.0, 41.0]), "vs_best": 1.3, "predicted": None},
            {
                **_candidate("zero3", []),
                "skipped": "predicted peak 9 GiB a rank exceeds 8 GiB",
                "predicted": predicted,
            },
        ]
        data = {
            "kind": "sweep",
            "config": "tiny-cpu",
            "nproc": 2,
            "overrides": [],
            "repeats": 2,
            "steps": 20,
            "rungs": [[3, 7, 1], [2, 20, 2]],
            "basis": {"run": "runs/basis"},
            "agreement": {
                "spearman": 0.8,
                "layouts_ranked": 4,
                "memory_error_median": 0.03,
                "memory_error_max": 0.1,
            },
            "candidates": rows,
        }
    else:
        trial = {
            "finding": "small_ddp_buckets", "title": "Gradients all-reduced in many tiny buckets", "remedy": "bucket_size",
            "change": ["overlap.bucket_cap_mb=25"], "skipped": "", "kept": True, "ratio": 0.6, "reason": "40% faster",
            "base": _candidate("without", [45.0, 44.0]), "variant": _candidate("with", [27.0, 26.0]),
            "round": 1, "interval": [0.55, 0.65], "predicted_ms": 15.0, "measured_ms": 18.0,
            "alternatives": [
                {"change": ["overlap.bucket_cap_mb=25"], "kept": True, "ratio": 0.6, "interval": [0.55, 0.65],
                 "reason": "40% faster", "variant": _candidate("with", [27.0, 26.0])},
                {"change": ["overlap.bucket_cap_mb=<b>50</b>"], "kept": False, "ratio": 0.61, "interval": [0.5, 0.7],
                 "reason": "39% faster", "variant": _candidate("with50", [27.5, 26.5])},
            ],
        }  # fmt: skip
        data = {
            "kind": "optimize", "config": "tiny-cpu", "nproc": 2, "overrides": [], "baseline_run": "runs/b",
            "final_run": "runs/o", "kept": ["overlap.bucket_cap_mb=25"], "speedup": 1.6, "trials": [trial],
            "rounds": [{"round": 1, "profiled_run": "runs/b", "stop": "a round kept nothing"}],
            "stopped": "a round kept nothing", "prediction_error": 0.17,
            "final": [_candidate("original", [45.0]), _candidate("final", [27.0])],
        }  # fmt: skip
    page = write(data, tmp_path / f"{kind}.html")
    assert "<b>pp</b>" not in page.read_text()  # escaped
    dom, log = open_in_browser(page, tmp_path)
    graphs = re.split(r'class="plotly-graph-div', dom)[1:]
    assert len(graphs) == 1 and 'class="main-svg"' in graphs[0]
    console = [line for line in log.splitlines() if "CONSOLE" in line or "Refused" in line]
    assert not console, console
