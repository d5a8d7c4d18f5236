"""Sharded checkpoints with torch.distributed.checkpoint (DCP), one folder per saved step.

``<dir>/step-00000010/`` holds each rank's shards; DCP writes ``.metadata`` last, after every rank
wrote its part, so a folder without it is an interrupted save and is never resumed from.
ZeroRedundancyOptimizer has no DCP state-dict support: with ``parallel.zero=1`` each rank also
writes its optimizer shard to ``zero1-rank<N>.pt`` (resumable on the same layout only).
"""

from __future__ import annotations

import re
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.optim import ZeroRedundancyOptimizer

_STEP_DIR = re.compile(r"^step-(\d+)$")


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:08d}"


def latest_step(root: Path) -> int | None:
    """The newest step whose checkpoint is complete, or None."""
    if not root.is_dir():
        return None
    done = [
        int(m.group(1))
        for p in root.iterdir()
        if (m := _STEP_DIR.match(p.name)) and (p / ".metadata").exists()
    ]
    return max(done, default=None)


class Checkpointer:
    """Saves and loads this rank's parts (the model, or its pipeline stages) and their optimizers.

    Model and optimizer state are keyed by parameter name (the optimizer's flattened), so the union
    over parts and ranks names every tensor once and DCP can reshard across data/tensor layouts."""

    def __init__(
        self, root: Path, parts: list[nn.Module], optimizers: list[torch.optim.Optimizer], async_save: bool
    ) -> None:
        self.root = root
        self.parts = parts
        self.optimizers = optimizers
        self.zero1 = any(isinstance(o, ZeroRedundancyOptimizer) for o in optimizers)
        self.async_save = async_save
        self._pending: Future[Any] | None = None
        # Background saves coordinate on their own gloo group so they never interleave with the
        # training step's collectives on the default group.
        self._group = dist.new_group(backend="gloo") if async_save else None

    def _state(self) -> dict[str, Any]:
        model: dict[str, Any] = {}
        optim: dict[str, Any] = {}
        for part, opt in zip(self.parts, self.optimizers):
            model.update(get_model_state_dict(part))
            if not self.zero1:
                optim.update(get_optimizer_state_dict(part, opt, options=_FLAT))
        return {"model": model, "optim": optim} if optim else {"model": model}

    def _zero1_file(self, path: Path, i: int) -> Path:
        return path / f"zero1-rank{dist.get_rank()}-part{i}.pt"

    def save(self, step: int) -> None:
        self.wait()
        path = step_dir(self.root, step)
        if self.zero1:
            path.mkdir(parents=True, exist_ok=True)
            for i, opt in enumerate(self.optimizers):
                torch.save(opt.optim.state_dict(), self._zero1_file(path, i))  # type: ignore[attr-defined]
        if self.async_save:
            self._pending = dcp.async_save(self._state(), checkpoint_id=str(path), process_group=self._group)  # type: ignore[assignment]
        else:
            dcp.save(self._state(), checkpoint_id=str(path))

    def wait(self) -> None:
        if self._pending is not None:
            self._pending.result()
            self._pending = None

    def load(self, step: int) -> None:
        path = step_dir(self.root, step)
        state = self._state()
        dcp.load(state, checkpoint_id=str(path))
        for i, (part, opt) in enumerate(zip(self.parts, self.optimizers)):
            set_model_state_dict(part, state["model"], options=StateDictOptions(strict=False))
            if self.zero1:
                opt.optim.load_state_dict(torch.load(self._zero1_file(path, i), weights_only=True))  # type: ignore[attr-defined]
            else:
                set_optimizer_state_dict(part, opt, state["optim"], options=_FLAT)


_FLAT = StateDictOptions(flatten_optimizer_state_dict=True)
