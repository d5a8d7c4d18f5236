"""Start the reference trainer under torchrun (torch.distributed's own launcher).

Torch-free: ``perfkit train`` validates the configuration and builds the command before any
process starts, so a bad configuration costs no torch import and no rank start-up.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

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
    proc = subprocess.Popen(argv, env=trainer_env(nproc))
    try:
        return exit_code(proc.wait())
    except KeyboardInterrupt:
        proc.send_signal(signal.SIGINT)
        return exit_code(proc.wait())
