"""``perfkit profile``: run a training command with collectors attached, into a run directory.

The parent process here never imports torch. It creates the run directory, starts the command
with the collector settings in the environment and perfkit's sitecustomize on PYTHONPATH (so every
rank process of an unmodified script attaches itself), shows a live progress line, and at the end
merges what each rank reported (rank<N>/probe.json) into the manifest.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from perfkit.collectors.options import CollectOptions
from perfkit.envinfo import environment
from perfkit.errors import ConfigError
from perfkit.launch import Nodes, dies_with_perfkit, exit_code, stop_job, trainer_env
from perfkit.run import Run, RunLayout, Status
from perfkit.tables import STEPS, Tail


def site_dir() -> Path:
    """Folder holding perfkit's sitecustomize.py (inside the installed perfkit.collectors)."""
    import perfkit.collectors

    return Path(perfkit.collectors.__file__).resolve().parent / "site"


@dataclass(kw_only=True)
class ProfileRequest:
    command: list[str]
    """The argv to run."""
    out: Path
    options: CollectOptions = field(default_factory=CollectOptions)
    world_size: int = 1
    """Known in advance for the reference trainer; otherwise read back from the ranks."""
    config: dict[str, Any] = field(default_factory=dict)
    name: str | None = None


def child_env(req: ProfileRequest) -> dict[str, str]:
    # The bundled trainer's ranks share the cores; a user's command gets the environment it would
    # have without perfkit (torchrun's own thread default): setting OMP_NUM_THREADS for a world size
    # perfkit does not know had put 2 ranks x 2 threads on 2 cores, half of each step waiting for one.
    base = trainer_env(req.world_size) if req.config else dict(os.environ)
    env = {**base, **req.options.to_env()}
    env["PERFKIT_RUN_DIR"] = str(req.out.resolve())
    # NCCL collectives' GPU durations (CUDA events on the NCCL stream; read by the comms collector
    # once each work completed). No effect on gloo.
    env.setdefault("TORCH_NCCL_ENABLE_TIMING", "1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(site_dir()), env.get("PYTHONPATH", "")) if p)
    return env


class Progress:
    """A live line (step, step time, tokens/s) from rank 0's steps table, on a terminal only."""

    def __init__(self, run: Run, stream: TextIO) -> None:
        path = run.layout.table(0, STEPS)
        self.tail = Tail(path, run.layout.rotated(path))  # under --watch the table turns over
        self.stream = stream
        self.enabled = stream.isatty()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
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
            rows = self.tail.read()
            if rows:
                self._last = rows[-1]
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
    config: str,
    overrides: Sequence[str],
    nproc: int,
    out: Path,
    name: str,
    options: CollectOptions | None = None,
    nodes: Nodes | None = None,
) -> ProfileRequest:
    """A request to profile the bundled trainer, its configuration checked before any process
    starts, its log written into the run; every collector and the default kernel window unless
    ``options`` say otherwise (no window when the run is too short for it)."""
    from perfkit.launch import ONE_NODE, check_devices, trainer_command
    from perfkit.trainer.config import load_config, resolve_layout

    nodes = nodes or ONE_NODE
    cfg = load_config(config, list(overrides))
    resolve_layout(cfg, nproc * nodes.count)
    check_devices(cfg, nproc)
    options = options or CollectOptions()
    if options.profile_steps and options.profile_steps[1] > cfg.steps:
        options = dataclasses.replace(options, profile_steps=None)
    return ProfileRequest(
        command=trainer_command(nproc, config, list(overrides), RunLayout(out).train_log, nodes, name),
        out=out,
        options=options,
        world_size=nproc * nodes.count,
        config=cfg.to_dict(),
        name=name,
    )


def run_profile(req: ProfileRequest, stream: TextIO = sys.stderr) -> tuple[Run, int]:
    """Run the command under the collectors; returns the run and the command's exit code."""
    check_command(req.command)
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
        # The job runs in its own process group, so that a signal reaches all of it (torchrun and
        # every rank) when perfkit passes it on; and it gets SIGTERM if perfkit itself dies.
        proc = subprocess.Popen(dies_with_perfkit(req.command), env=child_env(req), start_new_session=True)
    except OSError as e:
        run.finish("failed", 127)
        raise ConfigError(
            f"cannot start {req.command[0]!r}: {e.strerror}; check the command after --"
        ) from None

    def to_job(signum: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signum)

    received: list[int] = []  # the signals perfkit itself got and passed on

    def forward(signum: int, frame: object) -> None:
        nonlocal status
        status = "interrupted"
        received.append(signum)
        to_job(signum)

    previous = signal.signal(signal.SIGTERM, forward)
    interrupts = 0
    hang: HangWatch | None = HangWatch(run, req.options.hang_timeout) if req.options.hang_timeout else None
    watcher = None
    if req.options.watch:
        from perfkit.watch import Watcher

        watcher = Watcher(req.out, req.options)
        # The watcher judges on the cores the ranks use: at a lower priority (this thread only, the
        # job was started at the caller's), it takes what they leave idle and lags when there is none.
        with contextlib.suppress(OSError):
            os.nice(10)
    try:
        with Progress(run, stream):
            while True:
                try:
                    rc = proc.wait(timeout=1.0)
                    break
                except subprocess.TimeoutExpired:
                    if watcher is not None:
                        watch_poll(watcher, stream)
                    if hang is not None and hang.should_stop():
                        status = "hung"
                        stream.write(f"\nperfkit: the job hung; stopping it ({hang.said()})\n")
                        rc = stop_job(proc, to_job)
                        break
                except KeyboardInterrupt:  # passed on; the ranks flush and stop. Again: harder.
                    status = "interrupted"
                    received.append(signal.SIGINT)
                    to_job((signal.SIGINT, signal.SIGTERM, signal.SIGKILL)[min(interrupts, 2)])
                    interrupts += 1
    finally:
        signal.signal(signal.SIGTERM, previous)
    if watcher is not None:
        watch_poll(watcher, stream)  # the job's last windows
    rc = HUNG_EXIT if status == "hung" else exit_code(rc)
    if received and rc != 0 and status != "hung":
        # As a shell reports a command stopped by that signal (130, 143): torchrun itself exits 1
        # once its ranks stopped, which would read as a failure of the job.
        rc = 128 + received[0]
    if rc == 0:
        status = "complete"
    elif status == "hung":
        pass
    elif rc in (128 + signal.SIGINT, 128 + signal.SIGTERM) or status == "interrupted":
        status = "interrupted"
    run.merge_rank_reports()
    run.finish(status, rc)
    return run, rc


def watch_poll(watcher: Any, stream: TextIO) -> None:
    """One look of the watcher; an anomaly is said as it starts. A watcher that fails is said once
    and stops watching; the job goes on."""
    if watcher.failed:
        return
    try:
        for a in watcher.poll():
            stream.write(
                f"\nperfkit: step {a.start_step}: {a.title}"
                + (f" (capture {a.capture})" if a.capture else "")
                + "\n"
            )
    except Exception as e:  # never stop the job for the watcher
        watcher.failed = True
        stream.write(
            f"\nperfkit: the watcher stopped ({type(e).__name__}: {e}); the job goes on, its tables are kept\n"
        )


HUNG_EXIT = 124
"""perfkit profile's exit code when it stopped a hung job (as timeout(1) does)."""


class HangWatch:
    """Reads the ranks' hang records from the launcher's side: once one rank wrote one, the others
    get a grace period to write theirs (each rank's watchdog fires on its own clock), then the job
    is to be stopped."""

    def __init__(self, run: Run, timeout: float) -> None:
        self.run = run
        self.grace = min(15.0, max(3.0, timeout))
        self.first: float | None = None

    def should_stop(self) -> bool:
        records = self.run.layout.hang_records()
        if not records:
            return False
        now = time.monotonic()
        if self.first is None:
            self.first = now
        return len(records) >= len(self.run.ranks()) or now - self.first >= self.grace

    def said(self) -> str:
        ranks = [int(p.parent.name.removeprefix("rank")) for p in self.run.layout.hang_records()]
        return f"hang records from rank(s) {', '.join(map(str, sorted(ranks)))}"
