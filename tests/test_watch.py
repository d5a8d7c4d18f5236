"""Watch mode: the detectors on made-up windows (each kind named at its start, a noisy clean job
quiet), the bounded tables and the watcher's reading across their rotation, GPU health from faked
NVML rows, and a real watched 2-rank job with a straggler planted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from perfkit.analyzers.analyze import analyze
from perfkit.analyzers.metrics import Metrics
from perfkit.analyzers.rules import Finding, evaluate
from perfkit.analyzers.watch import BASELINE_WINDOWS, SUSTAIN, Detectors, WatchReport
from perfkit.collectors.signals.nvml import NvmlCollector, NvmlHealth, gpu_health

from perfkit.run import Run, RunLayout
from perfkit.tables import STEPS, RowWriter, Tail

REPO = Path(__file__).resolve().parent.parent
W = 50
STEP_MS = 20.0


def window(
    first: int,
    rng: np.random.Generator,
    *,
    late: dict[int, float] | None = None,
    data_wait: dict[int, float] | None = None,
    gc_ms: dict[int, float] | None = None,
    memory_growth: dict[int, float] | None = None,
    transfer_ms: float = 2.0,
    jitter: float = 0.03,
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """One window of two DDP ranks: each step a rank computes, waits for its data, then one
    all-reduce that starts when the rank arrives and ends ``transfer_ms`` after the last one did.
    ``late``: extra compute ms by rank; ``memory_growth``: bytes a step by rank from step 1."""
    late, data_wait, gc_ms, memory_growth = late or {}, data_wait or {}, gc_ms or {}, memory_growth or {}
    steps, comms, memory, gc = [], [], [], []
    t = 1_000_000_000 * first
    for step in range(first, first + W):
        busy = {
            r: (STEP_MS - transfer_ms) * rng.lognormal(0, jitter)
            + late.get(r, 0)
            + data_wait.get(r, 0)
            + gc_ms.get(r, 0)
            for r in (0, 1)
        }
        last = max(busy.values())
        end = last + transfer_ms * rng.lognormal(0, jitter)
        for r in (0, 1):
            start_ns = t + int(busy[r] * 1e6)
            comms.append(
                {
                    "rank": r,
                    "step": step,
                    "seq": step,
                    "group": "0",
                    "op": "all_reduce",
                    "bytes": 1 << 20,
                    "start_ns": start_ns,
                    "end_ns": t + int(end * 1e6),
                }
            )
            steps.append(
                {
                    "rank": r,
                    "step": step,
                    "step_time_s": end / 1e3,
                    "data_wait_s": (0.2 + data_wait.get(r, 0)) / 1e3,
                    "forward_s": busy[r] / 2e3,
                    "backward_s": (end - busy[r] / 2) / 1e3,
                }
            )
            memory.append(
                {
                    "rank": r,
                    "step": step,
                    "rss": int(2e9 + memory_growth.get(r, 0) * step + rng.integers(0, 1 << 20)),
                    "allocated": None,
                }
            )
            if gc_ms.get(r):
                gc.append({"rank": r, "step": step, "pause_s": gc_ms[r] / 1e3})
        t += int(end * 1e6) + 1000
    return pd.DataFrame(steps), pd.DataFrame(comms), pd.DataFrame(memory), pd.DataFrame(gc)


def run_windows(
    n: int, event_at: int | None = None, seed: int = 0, **event: dict[int, float] | float
) -> Detectors:
    """``n`` windows; from window ``event_at`` on, the event's arguments apply."""
    d = Detectors(capacity_bytes={0: int(64e9), 1: int(64e9)})
    rng = np.random.default_rng(seed)
    for w in range(n):
        first = w * W + 1
        args = event if event_at is not None and w >= event_at else {}
        d.feed(first, first + W - 1, *window(first, rng, **args))  # type: ignore[arg-type]
    return d


EVENT_AT = BASELINE_WINDOWS + 5
CASES = {
    "straggler": ({"late": {1: 5.0}}, "rank 1", {"step_time"}),
    "data_wait": ({"data_wait": {0: 6.0}}, "rank 0", {"step_time", "straggler"}),
    "gc": ({"gc_ms": {1: 4.0}}, "rank 1", {"step_time", "straggler"}),
    "memory": ({"memory_growth": {0: 2e6}}, "rank 0", set()),
    "collective": ({"transfer_ms": 8.0}, "0", {"step_time"}),
}


@pytest.mark.parametrize("kind", sorted(CASES))
def test_each_planted_kind_is_named_from_its_first_window(kind: str) -> None:
    event, subject, also = CASES[kind]
    d = run_windows(EVENT_AT + 8, event_at=EVENT_AT, **event)  # type: ignore[arg-type]
    found = [a for a in d.anomalies if a.kind == kind]
    assert found, f"no {kind} anomaly; found {[(a.kind, a.subject) for a in d.anomalies]}"
    a = found[0]
    assert a.subject == subject
    start = EVENT_AT * W + 1
    if kind == "memory":  # a leak shows once it has grown past the baseline's peak for a few windows
        assert start <= a.start_step <= start + 4 * W
    else:
        assert a.start_step == start
        assert a.detected_step == start + SUSTAIN * W - 1
    assert {x.kind for x in d.anomalies} <= {kind} | also
    assert a.value > a.threshold > a.baseline


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_noisy_clean_job_has_no_anomaly(seed: int) -> None:
    """200 windows at 8% jitter a step (more than this machine's), nothing planted: nothing named."""
    d = run_windows(200, seed=seed, jitter=0.08)
    assert d.ready and not d.anomalies, [a.title for a in d.anomalies]


def test_an_anomaly_ends_when_the_job_recovers() -> None:
    d = Detectors()
    rng = np.random.default_rng(4)
    for w in range(40):
        first = w * W + 1
        late = {1: 6.0} if 15 <= w < 22 else {}
        d.feed(first, first + W - 1, *window(first, rng, late=late))
    a = next(a for a in d.anomalies if a.kind == "straggler")
    assert a.start_step == 15 * W + 1 and a.end_step == 22 * W + 1


def watch_findings(kinds: list[str], also: tuple[str, ...] = ()) -> list[Finding]:
    """The findings of a watched job whose detectors found each of ``kinds`` planted in made-up
    windows (and the anomalies of kinds ``also`` that came with them)."""
    out = []
    for kind in kinds:
        event, _, _ = CASES[kind]
        d = run_windows(EVENT_AT + 8, event_at=EVENT_AT, **event)  # type: ignore[arg-type]
        out += [a.to_json() for a in d.anomalies if a.kind == kind or a.kind in also]
    return evaluate([], Metrics(watch=WatchReport(anomalies=out)))


def test_each_anomaly_kind_is_a_finding_with_its_step_and_rank() -> None:
    found = {f.id: f for f in watch_findings(sorted(CASES))}
    assert set(found) == {f"watch_{k}" for k in CASES}
    s = found["watch_straggler"]
    assert s.ranks == [1] and s.title.startswith(f"Step {EVENT_AT * W + 1}") and s.remedy == "straggler"
    assert s.saving_ms_per_step == pytest.approx(5.0, rel=0.3)
    assert found["watch_memory"].remedy == "memory_leak" and found["watch_memory"].severity == "high"
    assert "full in" in found["watch_memory"].title


def quiet_watch_findings() -> list[Finding]:
    """What could fool the detectors: 8% jitter a step, one window where rank 1 is 10 ms late and
    its data, collectives and GC are slow (a blip of the host), and a memory step up that then
    stays flat (a cache filled once, not a leak)."""
    d = Detectors()
    rng = np.random.default_rng(7)
    for w in range(60):
        first = w * W + 1
        blip = w == 30
        f = window(
            first,
            rng,
            jitter=0.08,
            late={1: 10.0} if blip else None,
            data_wait={1: 10.0} if blip else None,
            gc_ms={1: 10.0} if blip else None,
            transfer_ms=10.0 if blip else 2.0,
        )
        if w >= 40:
            f[2]["rss"] += int(1e9)
        d.feed(first, first + W - 1, *f)
    return evaluate([], Metrics(watch=WatchReport(anomalies=[a.to_json() for a in d.anomalies])))


def test_a_blip_and_a_one_time_memory_step_are_not_anomalies() -> None:
    assert quiet_watch_findings() == []


# ---- bounded tables, followed across their rotation ------------------------------------------------
def test_a_bounded_table_keeps_its_latest_rows_within_its_bound_and_the_watcher_reads_every_row(
    tmp_path: Path,
) -> None:
    path = tmp_path / "rank0" / "steps.jsonl"
    path.parent.mkdir()
    bound = 20_000
    w = RowWriter(path, bound, RunLayout.rotated(path))
    tail = Tail(path, RunLayout.rotated(path))
    seen = []
    for step in range(1, 3001):
        w.add({"step": step, "start_ns": step, "end_ns": step + 1, "step_time_s": 0.001})
        w.flush()
        if step % 37 == 0:
            seen += [r["step"] for r in tail.read()]
        files = [p for p in (path, RunLayout.rotated(path)) if p.exists()]
        assert sum(p.stat().st_size for p in files) <= bound + 200  # one row over at most
    w.close()
    seen += [r["step"] for r in tail.read()]
    assert seen == list(range(1, 3001))  # nothing lost, nothing twice, in order
    assert w.rotations > 10
    kept = RunLayout(tmp_path).table_files(0, STEPS)
    assert kept == [RunLayout.rotated(path), path]
    last = [json.loads(line)["step"] for p in kept for line in p.read_text().splitlines()]
    assert last == list(range(last[0], 3001)) and len(last) > 100


# ---- GPU health from NVML rows ---------------------------------------------------------------------
def nvml_rows(**planted: int) -> pd.DataFrame:
    """60 samples of GPU 0 of rank 0; from sample 30 on, ``planted`` columns take their values."""
    rows = []
    for i in range(60):
        row = {
            "rank": 0,
            "t_ns": i * 100_000_000,
            "gpu": 0,
            "throttle_reasons": 0,
            "xid": 0,
            "ecc_uncorrected": 0,
            "pcie_replay": 3,
            "nvlink_replay": 0,
        }
        if i >= 30:
            row.update(planted)
        if i != 30 and "xid" in planted:
            row["xid"] = 0  # an XID is an event: reported once
        rows.append(row)
    return pd.DataFrame(rows)


def health_findings(**planted: int) -> list[Finding]:
    health = NvmlCollector.fold({"nvml": nvml_rows(**planted)}, pd.DataFrame())
    return evaluate([], Metrics(signals={"nvml": health}))


@pytest.mark.parametrize(
    ("planted", "said"),
    [
        ({"throttle_reasons": 0x40}, "hardware thermal slowdown"),
        ({"throttle_reasons": 0x8 | 0x1}, "hardware slowdown"),
        ({"xid": 79}, "XID 79"),
        ({"ecc_uncorrected": 2}, "uncorrectable ECC"),
        ({"nvlink_replay": 40}, "NVLink replays"),
    ],
)
def test_gpu_health_names_what_nvml_says(planted: dict[str, int], said: str) -> None:
    found = {f.id: f for f in health_findings(**planted)}
    f = found["gpu_health"]
    assert said in f.title and f.severity == "high" and f.ranks == [0] and f.remedy == "gpu_health"


def test_a_healthy_gpu_is_quiet() -> None:
    """Idle (0x1) and application-clocks (0x2) reasons, steady replay counters: nothing."""
    health = NvmlCollector.fold({"nvml": nvml_rows(throttle_reasons=0x3)}, pd.DataFrame())
    assert isinstance(health, NvmlHealth) and not health.events
    assert "gpu_health" not in {f.id for f in evaluate([], Metrics(signals={"nvml": health}))}


def test_gpu_health_counts_a_counter_that_grew_between_calls() -> None:
    before: dict[str, float] = {}
    assert gpu_health([{"t_ns": 1, "pcie_replay": 5}], before) == []
    assert [e["event"] for e in gpu_health([{"t_ns": 2, "pcie_replay": 9}], before)] == ["PCIe replays"]


# ---- a real watched job ------------------------------------------------------------------------------
def test_a_watched_job_names_a_planted_straggler_captures_it_and_stays_in_budget(tmp_path: Path) -> None:
    """2 CPU ranks, ~6 ms steps, 2,800 of them; from step 1300 rank 1 computes 6 ms more a step. The watcher names
    rank 1 late from the window holding that step, every rank traces the same steps, and the capture's diagnosis
    names the extra matrix products on rank 1; a tiny budget keeps the directory bounded."""
    out = tmp_path / "run"
    env = {**os.environ, "PLANT_SLOW": "1:1300:6"}
    cmd = [
        sys.executable, "-m", "perfkit", "profile", "--watch", "--watch-window", "100", "--watch-budget", "10",
        "--out", str(out), "--", sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        str(REPO / "bench" / "watch_workload.py"), "--steps", "2800", "--width", "512", "--batch", "64",
    ]  # fmt: skip
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "became late" in p.stderr
    layout = RunLayout(out)
    records = [json.loads(line) for line in layout.anomalies.read_text().splitlines()]
    late = [r for r in records if r.get("kind") == "straggler"]
    # named from the window that holds step 1300: a window is whole --watch-windows lasting 0.5 s
    # at least, so on a fast host 200 steps (a CI run named it from 1201, its window 1201-1400)
    span = json.loads(layout.watch_state.read_text())["judged_window_steps"]
    assert late and late[0]["subject"] == "rank 1" and 1300 - span < late[0]["start_step"] <= 1300 + 2 * span
    cid = late[0]["capture"]
    assert cid and len(layout.capture_traces(cid)) == 2 and len(layout.capture_traces("baseline")) == 2
    diagnosis = json.loads(layout.capture_diagnosis(cid).read_text())
    grew = diagnosis["per_rank"]["1"]["grew"][0]
    assert grew["name"] in ("aten::mm", "aten::matmul") and grew["delta_ms"] > 2.0
    assert not json.loads(layout.watch_state.read_text())["warnings"]
    disk = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    assert disk <= 10e6
    a = subprocess.run(
        [sys.executable, "-m", "perfkit", "analyze", str(out), "--report"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert a.returncode == 0 and "became late" in a.stdout
    page = layout.report.read_text()
    assert "Watch: the whole job" in page and "anomalies shaded" in page and "aten::mm" in page
    top = subprocess.run(
        [sys.executable, "-m", "perfkit", "top", str(out), "--once"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert top.returncode == 0 and "Rank 1 became late" in top.stdout.replace("\n", " ")


def test_damaged_watch_files_are_said_and_the_rest_is_kept(tmp_path: Path) -> None:
    """A half-written anomaly line, a request that is not JSON, a rank's capture states cut short:
    each is one problem line; the anomalies that could be read are still findings."""
    run = Run.create(tmp_path / "run", command=["train.py"], world_size=1)
    layout = run.layout
    rows = [{"step": s, "start_ns": s, "end_ns": s + 1, "step_time_s": 0.02} for s in range(1, 40)]
    layout.rank_dir(0).mkdir(parents=True)
    layout.table(0, STEPS).write_text("".join(json.dumps(r) + "\n" for r in rows))
    layout.watch_dir.mkdir()
    good = {
        "id": "a1", "kind": "straggler", "subject": "rank 0", "ranks": [0], "start_step": 20,
        "detected_step": 30, "value": 9.0, "baseline": 1.0, "threshold": 2.0, "unit": "ms",
        "title": "Rank 0 became late", "capture": "c1",
    }  # fmt: skip
    layout.anomalies.write_text(json.dumps(good) + "\n" + '{"id": "a2", "kind": "da')
    layout.capture_requests.mkdir()
    layout.capture_request("c1").write_text("{not json")
    layout.capture_state(0).write_text('{"captures": {"c1": "steps')
    run.finish("complete", 0)
    a = analyze(tmp_path / "run")
    found = {f.id: f for f in a.findings}
    assert "watch_straggler" in found and found["watch_straggler"].ranks == [0]
    said = " ".join(a.problems)
    assert "damaged line" in said and "damaged capture request" in said and "captures.json" in said


def test_top_and_capture_refuse_what_they_cannot_use_in_one_line(tmp_path: Path) -> None:
    def perfkit(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "perfkit", *args], capture_output=True, text=True, timeout=60
        )

    p = perfkit("top", str(tmp_path), "--once")
    assert p.returncode == 2 and "not a run directory" in p.stderr and "Traceback" not in p.stderr
    Run.create(tmp_path / "done", command=["train.py"], world_size=1).finish("complete", 0)
    p = perfkit("capture", str(tmp_path / "done"))
    assert p.returncode != 0 and "not running" in p.stderr and "Traceback" not in p.stderr
    live = Run.create(tmp_path / "live", command=["train.py"], world_size=1)
    p = perfkit("capture", str(tmp_path / "live"))
    assert p.returncode != 0 and "no rank has started" in p.stderr
    live.layout.rank_dir(0).mkdir()
    live.layout.probe(0).write_text(json.dumps({"world_size": 1, "options": {"watch": False}}))
    p = perfkit("capture", str(tmp_path / "live"))
    assert p.returncode != 0 and "--watch" in p.stderr and "Traceback" not in p.stderr


SCRIPT = """
import sys, time, torch, perfkit
out, steps, slow_from = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
with perfkit.profile(out=out, watch=True, watch_window=20):
    model = torch.nn.Linear(64, 64)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(32, 64)
    for step in range(1, steps + 1):
        with perfkit.phase("forward"):
            loss = model(x).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        time.sleep(0.006 if step >= slow_from else 0.002)
        perfkit.step()
"""


def test_perfkit_watch_watches_a_job_that_perfkit_profile_did_not_start(tmp_path: Path) -> None:
    """The script watches itself (perfkit.profile(watch=True)); ``perfkit watch RUN`` beside it
    names the slowdown planted at step 2,600 and asks for a capture, which the rank takes."""
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    out = tmp_path / "run"
    job = subprocess.Popen(
        [sys.executable, str(script), str(out), "4200", "2600"], stderr=subprocess.PIPE, text=True
    )
    watcher = subprocess.run(
        [sys.executable, "-m", "perfkit", "watch", str(out), "--interval", "0.5"],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert job.wait(timeout=60) == 0, job.stderr.read() if job.stderr else ""
    assert watcher.returncode == 0, watcher.stderr[-2000:]
    assert "step time rose" in watcher.stderr and "the job ended" in watcher.stdout
    records = [json.loads(line) for line in RunLayout(out).anomalies.read_text().splitlines()]
    a = next(r for r in records if r.get("kind") == "step_time")
    assert 2600 - 400 <= a["start_step"] <= 2600 + 400
    assert a["capture"] and RunLayout(out).capture_traces(a["capture"])
    p = subprocess.run(
        [sys.executable, "-m", "perfkit", "watch", str(out)], capture_output=True, text=True, timeout=60
    )
    assert p.returncode != 0 and "not running" in p.stderr and "Traceback" not in p.stderr
