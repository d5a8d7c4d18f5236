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
