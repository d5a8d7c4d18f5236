"""``perfkit profile``: run a training command with collectors attached, into a run directory.

The parent process here never imports torch. It creates the run directory, starts the command
with the collector settings in the environment and perfkit's sitecustomize on PYTHONPATH (so every
rank process of an unmodified script attaches itself), shows a live progress line, and at the end
merges what each rank reported (rank<N>/probe.json) into the manifest.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from perfkit.envinfo import environment
from perfkit.errors import ConfigError
from perfkit.run import CollectorState, Run, Status


def site_dir() -> Path:
    """Folder holding perfkit's sitecustomize.py (inside the installed perfkit.collectors)."""
    import perfkit.collectors

    return Path(perfkit.collectors.__file__).resolve().parent / "site"


def parse_window(text: str | None, what: str) -> tuple[int, int] | None:
    """``5-7`` or ``5`` to (first, last), 1-based inclusive."""
    if not text:
        return None
    a, _, b = text.partition("-")
    try:
        first, last = int(a), int(b or a)
    except ValueError:
        raise ConfigError(f"{what} {text!r} is not a step range; write e.g. 5-7") from None
    if first < 1 or last < first:
        raise ConfigError(f"{what} {text!r} must be FIRST-LAST with 1 <= FIRST <= LAST")
    return first, last


@dataclass(kw_only=True)
class ProfileRequest:
    command: list[str]
    """The argv to run."""
    out: Path
    collect: list[str]
    profile_steps: tuple[int, int] | None
    nvml_hz: float
    memory_history: tuple[int, int] | None
    memory_history_entries: int
    world_size: int = 1
    """Known in advance for the reference trainer; otherwise read back from the ranks."""
    config: dict[str, Any] = field(default_factory=dict)
    name: str | None = None


def child_env(req: ProfileRequest) -> dict[str, str]:
    env = dict(os.environ)
    env["PERFKIT_RUN_DIR"] = str(req.out.resolve())
    env["PERFKIT_COLLECT"] = ",".join(req.collect)
    env["PERFKIT_NVML_HZ"] = str(req.nvml_hz)
    env["PERFKIT_MEMORY_HISTORY_ENTRIES"] = str(req.memory_history_entries)
    if req.profile_steps:
        env["PERFKIT_PROFILE_STEPS"] = f"{req.profile_steps[0]}-{req.profile_steps[1]}"
    if req.memory_history:
        env["PERFKIT_MEMORY_HISTORY"] = f"{req.memory_history[0]}-{req.memory_history[1]}"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(site_dir()), env.get("PYTHONPATH", "")) if p)
    # torchrun would set 1 thread per rank and print a banner about it; share the cores instead.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // max(1, req.world_size))))
    return env


class Progress:
    """A live line (step, step time, tokens/s) from rank 0's steps table, on a terminal only."""

    def __init__(self, run: Run, stream: TextIO) -> None:
        self.path = run.path / "rank0" / "steps.jsonl"
        self.stream = stream
        self.enabled = stream.isatty()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._offset = 0
        self._last: dict[str, Any] | None = None

    def __enter__(self) -> Progress:
        if self.enabled:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self.enabled:
            self._thread.join(timeout=2)
            self.stream.write("\r\033[K")
            self.stream.flush()

    def _loop(self) -> None:
        while not self._stop.wait(0.5):
            try:
                with open(self.path) as f:
                    f.seek(self._offset)
                    chunk = f.read()
            except OSError:
                continue
            complete = chunk[: chunk.rfind("\n") + 1]
            self._offset += len(complete)
            for line in complete.splitlines():
                self._last = json.loads(line)
            if self._last:
                r = self._last
                tok = f"  {r['tokens'] / r['step_time_s']:,.0f} tok/s (rank 0)" if r.get("tokens") else ""
                self.stream.write(
                    f"\r\033[K[perfkit] step {r['step']}  {r['step_time_s'] * 1e3:.1f} ms/step{tok}"
                )
                self.stream.flush()


def check_command(argv: list[str]) -> None:
    if not argv or shutil.which(argv[0]) is None:
        what = argv[0] if argv else "(none)"
        raise ConfigError(
            f"command {what!r} not found; check the command after -- (is its virtual environment active?)"
        )


def reference_request(
    config: str, overrides: Sequence[str], nproc: int, out: Path, name: str, **options: Any
) -> ProfileRequest:
    """A request to profile the bundled trainer, its configuration checked before any process
    starts, its log written into the run; every collector and the kernel window of steps 5-7
    unless ``options`` (ProfileRequest fields) say otherwise."""
    from perfkit.collectors.base import parse_collect
    from perfkit.launch import check_devices, trainer_command
    from perfkit.trainer.config import load_config, resolve_layout

    cfg = load_config(config, list(overrides))
    resolve_layout(cfg, nproc)
    check_devices(cfg, nproc)
    defaults: dict[str, Any] = {
        "collect": parse_collect("all"),
        "profile_steps": (5, 7) if cfg.steps >= 7 else None,
        "nvml_hz": 10.0,
        "memory_history": None,
        "memory_history_entries": 100_000,
    }
    return ProfileRequest(
        command=trainer_command(nproc, config, list(overrides), out / "train_log.jsonl"),
        out=out,
        world_size=nproc,
        config=cfg.to_dict(),
        name=name,
        **{**defaults, **options},
    )


def run_profile(req: ProfileRequest, stream: TextIO = sys.stderr) -> tuple[Run, int]:
    """Run the command under the collectors; returns the run and the command's exit code."""
    if not req.command or shutil.which(req.command[0]) is None:
        what = req.command[0] if req.command else "(none)"
        raise ConfigError(
            f"command {what!r} not found; check the command after -- (is its virtual environment active?)"
        )
    run = Run.create(
        req.out,
        command=req.command,
        world_size=req.world_size,
        config=req.config,
        env=environment(),
        name=req.name,
    )
    status: Status = "failed"
    rc = 1
    try:
        proc = subprocess.Popen(req.command, env=child_env(req))
    except OSError as e:
        run.finish("failed", 127)
        raise ConfigError(
            f"cannot start {req.command[0]!r}: {e.strerror}; check the command after --"
        ) from None

    def forward(signum: int, frame: object) -> None:
        nonlocal status
        status = "interrupted"
        proc.send_signal(signum)

    previous = signal.signal(signal.SIGTERM, forward)
    try:
        with Progress(run, stream):
            while True:
                try:
                    rc = proc.wait()
                    break
                except KeyboardInterrupt:  # the ranks got the same SIGINT: wait for them to flush
                    status = "interrupted"
    finally:
        signal.signal(signal.SIGTERM, previous)
    if rc == 0:
        status = "complete"
    elif rc in (-signal.SIGINT, -signal.SIGTERM, 130, 143) or status == "interrupted":
        status = "interrupted"
    merge_rank_reports(run)
    run.finish(status, rc)
    return run, rc


def rank_reports(run: Run) -> dict[int, dict[str, Any]]:
    reports = {}
    for rank in run.ranks():
        path = run.path / f"rank{rank}" / "probe.json"
        try:
            reports[rank] = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
    return reports


def merge_rank_reports(run: Run) -> None:
    """Fold each rank's collector status, world size and environment into the manifest: a collector
    failed on any rank is failed (naming the rank), disabled on all is disabled, else ok."""
    reports = rank_reports(run)
    if not reports:
        return
    m = run.manifest
    m.world_size = max([m.world_size, *(r.get("world_size", 1) for r in reports.values())])
    if 0 in reports and reports[0].get("env"):
        m.env.update(reports[0]["env"])
    names = sorted({n for r in reports.values() for n in r.get("collectors", {})})
    for name in names:
        states = {
            rank: r["collectors"][name] for rank, r in reports.items() if name in r.get("collectors", {})
        }
        failed = [(rank, s) for rank, s in states.items() if s["status"] == "failed"]
        disabled = [s for s in states.values() if s["status"] == "disabled"]
        if failed:
            rank, state = failed[0]
            m.collectors[name] = CollectorState(status="failed", reason=f"rank {rank}: {state['reason']}")
        elif len(disabled) == len(states):
            m.collectors[name] = CollectorState(status="disabled", reason=disabled[0]["reason"])
        else:
            m.collectors[name] = CollectorState(status="ok")
    run.save()
