"""Start the reference trainer under torchrun (torch.distributed's own launcher).

Torch-free: ``perfkit train`` validates the configuration and builds the command before any
process starts, so a bad configuration costs no torch import and no rank start-up.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from perfkit.errors import ConfigError
from perfkit.trainer.config import TrainConfig


def visible_gpus() -> int:
    """How many NVIDIA GPUs this process may use, without importing torch (0 when none or no driver)."""
    cvd = os.environ.get("CUDA_VISIBLE_DEVICES")
    if cvd is not None:
        return len([d for d in cvd.split(",") if d.strip() and d.strip() != "-1"])
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return int(pynvml.nvmlDeviceGetCount())
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no driver, no library, no GPU: all mean zero GPUs here
        return 0


def check_devices(cfg: TrainConfig, nproc: int) -> None:
    if cfg.device == "cuda":
        gpus = visible_gpus()
        if gpus == 0:
            raise ConfigError("device=cuda but no NVIDIA GPU is visible; use --set device=cpu")
        if nproc > gpus:
            raise ConfigError(
                f"--nproc {nproc} needs one GPU per rank but {gpus} are visible; use --nproc {gpus} or fewer"
            )


@dataclass(frozen=True)
class Nodes:
    """Where the ranks run: this node alone (torchrun --standalone), or several nodes meeting at a
    rendezvous endpoint (torchrun's c10d rendezvous; the same command runs on every node)."""

    count: int = 1
    endpoint: str = ""
    """HOST:PORT of the rendezvous (a node's address that every node reaches)."""

    @property
    def single(self) -> bool:
        return self.count == 1 and not self.endpoint

    def torchrun_args(self, run_id: str) -> list[str]:
        """``run_id`` must be the same on every node for one run and differ between runs."""
        if self.single:
            return ["--standalone"]
        return [
            f"--nnodes={self.count}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={self.endpoint}",
            f"--rdzv-id={run_id}",
        ]


ONE_NODE = Nodes()


def trainer_command(
    nproc: int,
    config: str,
    overrides: tuple[str, ...] | list[str],
    log_json: Path | None,
    nodes: Nodes = ONE_NODE,
    run_id: str = "perfkit",
) -> list[str]:
    """argv that runs the trainer: alone for one rank, else under torchrun (``nproc`` ranks a node)."""
    args = ["-m", "perfkit.trainer", "--config", config]
    for item in overrides:
        args += ["--set", item]
    if log_json is not None:
        args += ["--log-json", str(log_json)]
    if nproc == 1 and nodes.single:
        return [sys.executable, *args]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        *nodes.torchrun_args(run_id),
        f"--nproc_per_node={nproc}",
        *args,
    ]


def trainer_env(nproc: int) -> dict[str, str]:
    """This process's environment for ``nproc`` trainer ranks: torchrun would set 1 thread per rank
    and print a banner about it; share the cores instead (unless the user chose)."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // max(1, nproc))))
    return env


def exit_code(returncode: int) -> int:
    """A child's return code as a shell reports it: killed by signal N is 128 + N (SIGSEGV: 139)."""
    return 128 - returncode if returncode < 0 else returncode


def run_command(argv: list[str], nproc: int) -> int:
    """Run argv to its end and return its exit code; Ctrl-C is passed on and waited for."""
    proc = subprocess.Popen(dies_with_perfkit(argv), env=trainer_env(nproc))
    try:
        return exit_code(proc.wait())
    except KeyboardInterrupt:
        proc.send_signal(signal.SIGINT)
        return exit_code(proc.wait())


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (Linux /proc): torchrun may start its ranks in sessions of their
    own, out of reach of a signal to its process group."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def stop_job(proc: subprocess.Popen[Any], to_job: Callable[[int], None], grace: float = 10.0) -> int:
    """SIGTERM to the job (its process group and every process below it), SIGKILL to whatever is
    left after ``grace`` seconds: a rank blocked inside a collective never runs its Python signal
    handler. No rank is left behind."""
    below = descendants(proc.pid)
    to_job(signal.SIGTERM)
    for pid in below:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGTERM)
    try:
        rc = proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        to_job(signal.SIGKILL)
        rc = proc.wait()
    deadline = time.monotonic() + grace
    for pid in below:
        while time.monotonic() < deadline and _alive(pid):
            time.sleep(0.1)
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
    end = time.monotonic() + 5
    while time.monotonic() < end and any(_alive(pid) for pid in below):
        time.sleep(0.05)
    return rc


def _alive(pid: int) -> bool:
    """Running (a zombie, dead and waiting to be reaped, is not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


_TRAMPOLINE = """
import ctypes, os, signal, sys
try:
    ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG; kept across exec
except AttributeError:
    pass  # not Linux
if os.getppid() != int(sys.argv[1]):
    sys.exit(143)  # perfkit ended before this line
try:
    os.execvp(sys.argv[2], sys.argv[2:])
except OSError as e:
    sys.exit(f"perfkit: cannot start {sys.argv[2]!r}: {e.strerror}")
"""


def dies_with_perfkit(argv: list[str]) -> list[str]:
    """argv run so that it gets SIGTERM when this perfkit process ends, however it ends (Linux's
    parent-death signal, set by a small Python that then execs argv): a killed perfkit leaves no
    training job behind; torchrun passes SIGTERM on to its ranks. Not a ``preexec_fn``: with one,
    Python runs its at-fork handlers in perfkit, and a Ctrl-C landing in one is ignored."""
    return [sys.executable, "-c", _TRAMPOLINE, str(os.getpid()), *argv]
