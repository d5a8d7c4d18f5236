"""Collectors in one process: tables, the Probe's guard, NVML parsing and sampling, options."""

from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import pandas as pd
import pytest
from perfkit.collectors.base import REGISTRY, Collector, parse_collect
from perfkit.collectors.options import CollectOptions
from perfkit.collectors.probe import Probe
from perfkit.collectors.signals import nvml

from perfkit.errors import ConfigError, RunDirError
from perfkit.tables import NVML, STEPS, RowWriter, read_table

FIXTURE = Path(__file__).parent / "data" / "h100" / "nvml_samples.csv"


def test_parse_collect() -> None:
    assert parse_collect("all")[0] == "steps"
    assert parse_collect("steps, comms") == ["steps", "comms"]
    with pytest.raises(ConfigError, match="unknown collector 'gpu' in --collect; choose from steps, comms"):
        parse_collect("steps,gpu")


def test_table_roundtrip_and_half_written_line(tmp_path: Path) -> None:
    w = RowWriter(tmp_path / "steps.jsonl")
    for i in range(3):
        w.add({"step": i + 1, "start_ns": i, "end_ns": i + 1, "step_time_s": 0.5, "loss": None})
    w.close()
    with open(tmp_path / "steps.jsonl", "a") as f:
        f.write('{"step": 4, "start_')  # killed mid-line
    frame, notes = read_table(tmp_path / "steps.jsonl", STEPS)
    assert list(frame["step"]) == [1, 2, 3]
    assert notes and "half-written" in notes[0]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"step": 1}\n', "missing required column 'start_ns'"),
        ('{"step": "one", "start_ns": 1, "end_ns": 2, "step_time_s": 1.0}\n', "column 'step' should be int"),
        ("[1]\n", "a row must be a JSON object"),
        ("{bad\n{}\n", "not valid JSON"),
        (
            '{"step": 1, "start_ns": 1, "end_ns": 2, "step_time_s": -5.0}\n',
            "is -5.0, not a possible duration",
        ),
        ('{"step": 1, "start_ns": 1, "end_ns": 2, "step_time_s": 1e308}\n', "not a possible duration"),
        (
            '{"step": 1, "start_ns": 1, "end_ns": 2, "step_time_s": 0.1, "checkpoint_s": -1}\n',
            "not a possible",
        ),
    ],
)
def test_table_schema_is_checked(tmp_path: Path, line: str, message: str) -> None:
    (tmp_path / "steps.jsonl").write_text(line)
    with pytest.raises(RunDirError, match=message) as info:
        read_table(tmp_path / "steps.jsonl", STEPS)
    assert "steps.jsonl:1" in str(info.value)


def test_nvml_fixture_parses() -> None:
    frame = nvml.read_samples(FIXTURE)
    assert len(frame) > 100
    assert set(nvml.CSV_COLUMNS) <= set(frame.columns)
    assert frame["t_ns"].is_monotonic_increasing
    assert frame["gpu_util"].between(0, 100).all() and frame["gpu_util"].max() > 90  # it trained
    assert frame["sm_clock_mhz"].max() >= 1900  # H100 boost clock
    gaps = frame["t_ns"].diff().dropna() / 1e6
    assert 40 < gaps.median() < 70  # sampled every 50 ms


class FakeNvml(types.SimpleNamespace):
    """pynvml replaying the H100 fixture's samples."""

    NVML_CLOCK_SM, NVML_CLOCK_MEM, NVML_TEMPERATURE_GPU = 1, 2, 0
    NVML_PCIE_UTIL_TX_BYTES, NVML_PCIE_UTIL_RX_BYTES = 0, 1

    def __init__(self, rows: list[dict]) -> None:
        super().__init__()
        self.rows, self.i = rows, -1

    def _row(self) -> dict:
        return self.rows[self.i % len(self.rows)]

    def nvmlInit(self) -> None: ...
    def nvmlShutdown(self) -> None: ...
    def nvmlDeviceGetCount(self) -> int:
        return 1

    def nvmlDeviceGetHandleByIndex(self, i: int) -> str:
        return "gpu0"

    def nvmlDeviceGetHandleByUUID(self, u: str) -> str:
        return "gpu0"

    def nvmlDeviceGetUtilizationRates(self, h: str) -> types.SimpleNamespace:
        self.i += 1
        return types.SimpleNamespace(gpu=self._row()["gpu_util"], memory=self._row()["mem_util"])

    def nvmlDeviceGetMemoryInfo(self, h: str) -> types.SimpleNamespace:
        return types.SimpleNamespace(used=self._row()["mem_used_mb"] * 2**20)

    def nvmlDeviceGetClockInfo(self, h: str, which: int) -> int:
        return self._row()["sm_clock_mhz" if which == 1 else "mem_clock_mhz"]

    def nvmlDeviceGetPowerUsage(self, h: str) -> int:
        return int(self._row()["power_w"] * 1000)

    def nvmlDeviceGetTemperature(self, h: str, which: int) -> int:
        return self._row()["temp_c"]

    def nvmlDeviceGetPcieThroughput(self, h: str, which: int) -> int:
        raise RuntimeError("not supported")


def _probe(tmp_path: Path, collect: list[str], **kw) -> Probe:
    return Probe(tmp_path, 0, 1, 0, CollectOptions(collect=collect, **kw))


def test_nvml_sampler_writes_what_nvml_reports(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rows = pd.read_csv(FIXTURE).head(40).to_dict("records")
    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml(rows))
    probe = _probe(tmp_path, ["nvml", "steps"], nvml_hz=200.0).start()
    assert probe.status["nvml"]["status"] == "ok"
    import time

    time.sleep(0.3)
    probe.end_step()
    probe.stop()
    frame = nvml.read_samples(tmp_path / "rank0" / "nvml.jsonl")
    assert len(frame) >= 10
    replayed = pd.DataFrame(rows)
    # Each sample's counters are one fixture row's (the sampler reads the utilization first).
    for _, r in frame.head(5).iterrows():
        match = replayed[
            (replayed["gpu_util"] == r["gpu_util"]) & (replayed["sm_clock_mhz"] == r["sm_clock_mhz"])
        ]
        assert not match.empty
    assert "pcie_tx_kbs" not in frame.columns or frame["pcie_tx_kbs"].isna().all()


def test_nvml_absent_disables_only_itself(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    broken = types.SimpleNamespace(
        nvmlInit=lambda: (_ for _ in ()).throw(OSError("libnvidia-ml.so.1 not found"))
    )
    monkeypatch.setitem(sys.modules, "pynvml", broken)
    probe = _probe(tmp_path, ["steps", "nvml", "memory"]).start()
    probe.end_step(tokens=10, loss=1.5)
    probe.stop()
    assert probe.status["nvml"]["status"] == "disabled"
    assert "libnvidia-ml.so.1 not found" in probe.status["nvml"]["reason"]
    report = json.loads((tmp_path / "rank0" / "probe.json").read_text())
    assert report["status"] == "complete" and report["collectors"]["memory"]["status"] == "ok"
    steps, _ = read_table(tmp_path / "rank0" / "steps.jsonl", STEPS)
    assert list(steps["tokens"]) == [10] and list(steps["loss"]) == [1.5]


def test_failing_collector_is_disabled_and_training_goes_on(tmp_path: Path) -> None:
    class Exploding(Collector):
        name = "exploding"

        def step_end(self, probe: Probe, step: int) -> None:
            if step == 2:
                raise OSError(28, "No space left on device")

    REGISTRY["exploding"] = Exploding
    try:
        probe = _probe(tmp_path, ["steps", "exploding"]).start()
        for _ in range(4):
            with probe.phase("forward"):
                pass
            probe.end_step()
        probe.stop()
    finally:
        del REGISTRY["exploding"]
    assert probe.status["exploding"] == {
        "status": "failed",
        "reason": "step_end failed: OSError: [Errno 28] No space left on device",
    }
    steps, _ = read_table(tmp_path / "rank0" / "steps.jsonl", STEPS)
    assert list(steps["step"]) == [1, 2, 3, 4]
    assert (steps["forward_s"] >= 0).all()


def test_probe_options_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PERFKIT_COLLECT", "steps,comms")
    monkeypatch.setenv("PERFKIT_PROFILE_STEPS", "5-7")
    monkeypatch.setenv("PERFKIT_MEMORY_HISTORY", "3")
    o = CollectOptions.from_env()
    assert o.collect == ["steps", "comms"] and o.profile_steps == (5, 7) and o.memory_history == (3, 3)


def test_collect_options_round_trip_through_the_environment() -> None:
    o = CollectOptions(
        collect=["steps", "nvml"], profile_steps=None, nvml_hz=2.5, memory_history=(3, 4), trace_ranks="0,7-9"
    )
    assert CollectOptions.from_env(o.to_env()) == o
    assert CollectOptions.from_env({}) == CollectOptions()  # unset variables: the defaults


@pytest.mark.parametrize(
    ("field", "text", "message"),
    [
        ("nvml_hz", "nan", "positive finite"),
        ("nvml_hz", "0", "positive finite"),
        ("profile_steps", "7-5", "FIRST-LAST"),
        ("memory_history_entries", "many", "not a whole number"),
        ("collect", "steps,gpu", "unknown collector 'gpu'"),
        ("trace_ranks", "0,x", "sample:N"),
        ("trace_ranks", "9-3", "ranks and ranges"),
        ("trace_ranks", "sample:0", "sample:N"),
    ],
)
def test_collect_options_reject_bad_text_with_one_line(field: str, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        CollectOptions.from_text({field: text})


@pytest.mark.parametrize(
    ("spec", "world", "traced"),
    [
        ("all", 4, [0, 1, 2, 3]),
        ("0,7", 16, [0, 7]),
        ("1-3, 10", 16, [1, 2, 3, 10]),
        ("sample:4", 256, [0, 64, 128, 192]),
        ("sample:8", 4, [0, 1, 2, 3]),
    ],
)
def test_trace_ranks_resolve_against_the_world(spec: str, world: int, traced: list[int]) -> None:
    from perfkit.collectors.options import rank_selected

    parsed = CollectOptions.from_text({"trace_ranks": spec}).trace_ranks
    assert [r for r in range(world) if rank_selected(parsed, r, world)] == traced


def test_every_collector_module_registers_one_collector_of_its_name() -> None:
    """The collectors are the modules of perfkit.collectors.signals, known without importing torch;
    no two declare a table of the same name."""
    from perfkit.collectors.base import known, load, tables

    assert {"steps", "comms", "memory", "io", "nvml", "kernels"} <= set(known())
    declared = [t for name in known() for t in load(name).tables]
    for name in known():
        cls = load(name)
        assert cls.name == name and issubclass(cls, Collector)
    assert len({t.name for t in declared}) == len(declared) == len(tables())


def test_signal_modules_load_without_torch() -> None:
    """The analysis and the report read each collector's declarations (tables, fold, charts) from its
    module: loading every one imports neither torch nor the rank's probe."""
    code = (
        "import sys; from perfkit.collectors.base import declared; declared(); "
        "print(sorted(m for m in ('torch', 'perfkit.collectors.probe') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_nvml_table_schema_matches_fixture_columns() -> None:
    assert set(nvml.CSV_COLUMNS) <= set(NVML.columns)


def test_manual_mode_takes_the_automatic_hooks_off(tmp_path: Path) -> None:
    """A script that marks its own steps pays for no module or optimizer hook: a global module hook
    alone sends every module call of the model down nn.Module's slow path."""
    import torch
    from perfkit.collectors.auto import install
    from torch.nn.modules import module
    from torch.optim import optimizer

    hooks = (
        module._global_forward_pre_hooks,
        module._global_forward_hooks,
        optimizer._global_optimizer_pre_hooks,
        optimizer._global_optimizer_post_hooks,
    )
    before = [len(h) for h in hooks]
    probe = _probe(tmp_path, ["steps"])
    probe.auto = install(probe)
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters())
    try:
        assert [len(h) for h in hooks] == [n + 1 for n in before]
        model(torch.ones(1, 2)).sum().backward()
        opt.step()  # auto mode: the optimizer hooks end a step
        model(torch.ones(1, 2))  # the next step begins: only the outermost module keeps hooks
        assert model._forward_pre_hooks and model._forward_hooks and probe.step == 1
        probe.set_manual()
        assert [len(h) for h in hooks] == before
        assert not model._forward_pre_hooks and not model._forward_hooks
    finally:
        probe.auto.remove_hooks()
        probe.stop()


_STEP_LOOP = """
import json, sys, time
import perfkit

with_phases = sys.argv[2] == "phases"
own = []
with perfkit.profile(sys.argv[1], collect="steps", profile_steps=None):
    t = time.perf_counter()  # step 1 begins where profiling begins
    perfkit.describe(flops_per_token=6000, layout={"dp": 1, "tp": 1, "pp": 1})
    for i in range(12):
        if with_phases:
            with perfkit.phase("forward"):
                time.sleep(0.004)
            with perfkit.phase("backward"):
                time.sleep(0.002)
        else:
            time.sleep(0.006)
        time.sleep(0.001 * (i % 3))  # untimed work between phases still belongs to the step
        perfkit.step(tokens=128)
        now = time.perf_counter()
        own.append(now - t)
        t = now
print(json.dumps(own))
"""


@pytest.mark.parametrize("mode", ["phases", "plain"])
def test_public_step_api_measures_the_loops_own_steps(tmp_path: Path, mode: str) -> None:
    """perfkit.step() ends the step that began at the previous step() (or the start of profiling):
    the recorded step times match the loop's own clock, with and without phases."""
    import subprocess

    from perfkit.run import Run, RunLayout

    script = tmp_path / "loop.py"
    script.write_text(_STEP_LOOP)
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "run"), mode],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    own = json.loads(proc.stdout)
    steps, _ = read_table(RunLayout(tmp_path / "run").table(0, STEPS), STEPS)
    assert list(steps["step"]) == list(range(1, 13))
    recorded = steps["step_time_s"].to_numpy()
    for mine, theirs in zip(own, recorded, strict=True):
        assert abs(theirs - mine) <= 0.10 * mine, (own, list(recorded))
    if mode == "phases":
        assert (steps["forward_s"] >= 0.004).all() and (steps["backward_s"] >= 0.002).all()
    run = Run.open(tmp_path / "run")
    assert run.manifest.status == "complete"
    assert run.manifest.model["flops_per_token"] == 6000  # perfkit.describe() reaches the manifest


def test_cpu_collector_measures_the_process_and_the_host(tmp_path: Path) -> None:
    """A busy step (spinning on the CPU) records CPU time near its wall time; a sleeping one, near none."""
    import time

    from perfkit.tables import CPU

    probe = _probe(tmp_path, ["steps", "cpu"]).start()
    for busy in (True, False, True, False):
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < 0.3:
            if not busy:
                time.sleep(0.05)
        probe.end_step()
    probe.stop()
    assert probe.status["cpu"]["status"] == "ok"
    cpu, _ = read_table(tmp_path / "rank0" / "cpu.jsonl", CPU)
    assert list(cpu["step"]) == [1, 2, 3, 4]
    share = cpu["cpu_s"] / cpu["wall_s"]
    # spinning steps use the CPU, sleeping ones hardly (shares relative: a loaded machine lends less)
    assert share[[0, 2]].min() > 3 * share[[1, 3]].max() and share[[0, 2]].min() > 0.25, list(share)
    assert cpu["host_busy"].notna().sum() >= 2 and cpu["host_busy"].dropna().between(0, 1).all()


def test_cuda_collectives_are_written_once_their_work_completed(tmp_path: Path) -> None:
    """NCCL works are polled at step ends, never waited for: a completed one is written with its GPU
    duration, a running one waits for a later step (or the stop, without a duration)."""
    from perfkit.collectors.collectives import _Recorder
    from perfkit.collectors.signals.comms import CommsCollector

    from perfkit.tables import COMMS

    class FakeWork:
        def __init__(self, done: bool, ms: float) -> None:
            self.done, self.ms = done, ms

        def is_completed(self) -> bool:
            return self.done

        def _get_duration(self) -> float:
            return self.ms

    probe = _probe(tmp_path, ["steps"]).start()
    rec = _Recorder(probe, CommsCollector())
    fast, slow = FakeWork(True, 1.5), FakeWork(False, 9.0)
    rec.on_gpu = [(w, ("all_reduce", "ddp", None, None, 100, None, 1, None, False)) for w in (fast, slow)]
    rec.resolve_gpu()
    assert len(rec.on_gpu) == 1 and rec.on_gpu[0][0] is slow
    slow.done = True
    rec.resolve_gpu()
    probe.stop()
    comms, _ = read_table(tmp_path / "rank0" / "comms.jsonl", COMMS)
    assert list(comms["gpu_ms"]) == [1.5, 9.0] and comms["end_ns"].isna().all()


def test_a_synchronous_cuda_collective_is_timed_on_the_stream(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A synchronous NCCL all-reduce returns no Work, once its kernel is queued: its host-side end
    had been recorded, the enqueue. CUDA events around the call (faked here) give its time on the
    stream, read at a later step end without a sync; an async call keeps its Work."""
    import torch
    from perfkit.collectors import collectives as C

    from perfkit.tables import COMMS

    class FakeEvent:
        clock, ready = [0.0], False

        def __init__(self, enable_timing: bool = False) -> None:
            self.t = -1.0

        def record(self) -> None:
            self.t = FakeEvent.clock[0]

        def query(self) -> bool:
            return FakeEvent.ready

        def elapsed_time(self, other: FakeEvent) -> float:
            return other.t - self.t

    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(C, "_on_cuda", lambda t: True)
    probe = _probe(tmp_path, ["steps", "comms"]).start()

    def all_reduce(tensor: object, op: object = None, group: object = None, async_op: bool = False) -> object:
        FakeEvent.clock[0] += 7.5  # the collective's 7.5 ms on the stream
        return "work" if async_op else None

    wrapped = C._wrap_op("all_reduce", all_reduce, C._recorder, 0, 2)
    assert wrapped(torch.ones(4)) is None  # what the caller gets is unchanged
    rec = C._recorder[0]
    assert rec is not None and len(rec.on_gpu) == 1
    rec.resolve_gpu()
    assert len(rec.on_gpu) == 1  # not done on the GPU yet: it waits, nothing synchronizes
    FakeEvent.ready = True
    rec.resolve_gpu()
    assert wrapped(torch.ones(4), async_op=True) == "work"  # an async call keeps its Work
    probe.stop()
    comms, _ = read_table(tmp_path / "rank0" / "comms.jsonl", COMMS)
    synchronous = comms[comms["gpu_ms"].notna()]
    assert list(synchronous["gpu_ms"]) == [7.5] and synchronous["end_ns"].isna().all()
    assert synchronous["bytes"].tolist() == [16]


@pytest.mark.parametrize("critic_steps", [1, 5])
def test_optimizers_with_forwards_between_them_make_one_step(tmp_path: Path, critic_steps: int) -> None:
    """A GAN steps its discriminator (critic_steps times) and then its generator, with forward passes
    between: from the second iteration on, a step holds every optimizer's steps of one iteration
    (it had been a step per optimizer call)."""
    import torch
    from perfkit.collectors.auto import install

    probe = _probe(tmp_path, ["steps"]).start()
    probe.auto = install(probe)
    g, d = torch.nn.Linear(4, 8), torch.nn.Linear(8, 1)
    og, od = torch.optim.SGD(g.parameters()), torch.optim.SGD(d.parameters())
    iterations = 6
    try:
        for _ in range(iterations):
            for _ in range(critic_steps):
                fake = g(torch.randn(16, 4))
                od.zero_grad()
                d(fake.detach()).mean().backward()
                od.step()
            og.zero_grad()
            (-d(g(torch.randn(16, 4))).mean()).backward()
            og.step()
    finally:
        probe.auto.remove_hooks()
        probe.stop()
    steps, _ = read_table(tmp_path / "rank0" / "steps.jsonl", STEPS)
    # The first iteration ends a step at each call (the generator's optimizer is not known yet).
    assert len(steps) == iterations + critic_steps, list(steps["step"])


def test_an_optimizer_no_longer_stepping_is_no_longer_awaited(tmp_path: Path) -> None:
    """A warm-up optimizer stepped once and kept: once the training one has stepped STALE_AFTER + 1
    times without it, each training step is a step again."""
    import torch
    from perfkit.collectors.auto import STALE_AFTER, install

    probe = _probe(tmp_path, ["steps"]).start()
    probe.auto = install(probe)
    model = torch.nn.Linear(4, 1)
    warmup, train = torch.optim.SGD(model.parameters()), torch.optim.SGD(model.parameters())
    try:
        for opt in [warmup] + [train] * 20:
            model(torch.randn(8, 4)).mean().backward()
            opt.step()
    finally:
        probe.auto.remove_hooks()
        probe.stop()
    steps, _ = read_table(tmp_path / "rank0" / "steps.jsonl", STEPS)
    assert len(steps) == 21 - STALE_AFTER, list(steps["step"])


def test_auto_steps_read_tokens_and_loss_as_frameworks_pass_them(tmp_path: Path) -> None:
    """Gradient accumulation of 2 with each micro-batch's loss scaled by 1/2 and by a GradScaler, the
    model called with input_ids=, an evaluation pass under no_grad: a step's loss is the mean of its
    micro-batches' losses (what Hugging Face logs), its tokens the trained ones only."""
    import torch
    from perfkit.collectors.auto import install

    class LM(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed, self.head = torch.nn.Embedding(32, 8), torch.nn.Linear(8, 32)

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            return self.head(self.embed(input_ids))

    probe = _probe(tmp_path, ["steps"]).start()
    probe.auto = install(probe)
    model, scaler = LM(), torch.amp.GradScaler("cpu", init_scale=1024.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    losses = []
    try:
        for _ in range(4):
            micro = []
            for _ in range(2):
                ids = torch.randint(0, 32, (4, 6))
                loss = torch.nn.functional.cross_entropy(model(input_ids=ids).flatten(0, 1), ids.flatten())
                micro.append(loss.item())
                scaler.scale(loss / 2).backward()
            with torch.no_grad():
                model(input_ids=torch.randint(0, 32, (4, 6)))  # evaluation: no tokens trained
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
            losses.append(sum(micro) / 2)
    finally:
        probe.auto.remove_hooks()
        probe.stop()
    steps, _ = read_table(tmp_path / "rank0" / "steps.jsonl", STEPS)
    assert list(steps["loss"]) == pytest.approx(losses, rel=1e-5)
    assert list(steps["tokens"]) == [2 * 4 * 6] * 4


def test_bare_step_calls_under_perfkit_profile_record_whole_steps(tmp_path: Path) -> None:
    """A script calling perfkit.step() with no perfkit.profile() or attach(), under perfkit profile:
    the first call had recorded a step of no length (and a 465% 'own time'); it now begins the
    first step, and every recorded step is one iteration."""
    from helpers import run_perfkit

    script = tmp_path / "loop.py"
    script.write_text(
        "import time\nimport perfkit\nfor _ in range(4):\n    time.sleep(0.05)\n    perfkit.step()\n"
    )
    proc = run_perfkit("profile", "--out", str(tmp_path / "run"), "--", sys.executable, str(script))
    assert proc.returncode == 0, proc.stderr
    steps, _ = read_table(tmp_path / "run" / "rank0" / "steps.jsonl", STEPS)
    assert len(steps) == 3 and (steps["step_time_s"] > 0.045).all(), list(steps["step_time_s"])


def test_the_trainers_log_has_a_declared_schema(tmp_path: Path) -> None:
    """train_log.jsonl, which the optimizer decides from, is checked like the other tables: a diverged
    loss (NaN) is a real value; a negative step time or a record without its tokens is damage."""
    from perfkit.tables import TRAIN_LOG, read_rows

    log = tmp_path / "train_log.jsonl"
    good = {"step": 1, "loss": float("nan"), "tokens": 512, "step_time_s": 0.05, "tokens_per_s": 10240.0}
    log.write_text(json.dumps(good) + "\n")
    (row,) = read_rows(log, TRAIN_LOG)[0]
    assert row["step"] == 1 and row["loss"] != row["loss"]
    for bad, said in (({**good, "step_time_s": -5}, "not a possible duration"), ({"step": 1, "step_time_s": 0.1},
                      "missing required column 'tokens'")):  # fmt: skip
        log.write_text(json.dumps(bad) + "\n")
        with pytest.raises(RunDirError, match=said):
            read_rows(log, TRAIN_LOG)
