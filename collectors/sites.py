"""Where an unmodified script builds its DataLoader and its optimizer (file and line), with the
settings a remedy would change: so a fix for that script says where to make it. Recorded into the
run's manifest (``model.call_sites``) through ``Probe.describe``; the first of each kind counts.

Also: the framework that drives the loop (from the first optimizer step's stack), and who reads
tensors back to the host inside the steps (``.item()``, ``.tolist()``, ``int()``/``float()``/
``bool()`` of a tensor, a tensor used as an index): counted by caller, so the fix for per-step syncs
goes to the line (or the library setting) that makes them, not to a loss print that may not exist."""

from __future__ import annotations

import functools
import sys
import traceback
from typing import Any

from perfkit.collectors.probe import Probe

from perfkit.frames import caller_chain, framework_of, is_trainer, live_frames, package_of, user_frame

_patched = False


def _site() -> str:
    return user_frame(
        {"file": f.filename, "line": f.lineno, "function": f.name} for f in traceback.extract_stack()[:-2]
    )


def install(probe: Probe) -> None:
    global _patched
    if _patched:
        return
    _patched = True
    import torch
    from torch.utils.data import DataLoader

    sites: dict[str, dict[str, Any]] = {}

    def note(kind: str, **settings: Any) -> None:
        if kind not in sites:
            where = _site()
            if where:
                sites[kind] = {"at": where, **settings}
                probe.describe(call_sites=dict(sites))

    original_loader = DataLoader.__init__

    @functools.wraps(original_loader)
    def loader_init(self: Any, *args: Any, **kwargs: Any) -> None:
        original_loader(self, *args, **kwargs)
        try:
            note("dataloader", num_workers=self.num_workers, pin_memory=bool(self.pin_memory))
        except Exception:  # never stop the user's program
            pass

    original_optimizer = torch.optim.Optimizer.__init__

    @functools.wraps(original_optimizer)
    def optimizer_init(self: Any, *args: Any, **kwargs: Any) -> None:
        original_optimizer(self, *args, **kwargs)
        try:
            d = getattr(self, "defaults", {}) or {}
            note(
                "optimizer",
                type=type(self).__name__,
                module=type(self).__module__,
                fused=d.get("fused"),
                foreach=d.get("foreach"),
                can_fuse="fused" in d,  # the class takes fused= (torch.optim's Adam, AdamW, SGD, Adagrad)
                can_foreach="foreach" in d,
            )
        except Exception:
            pass

    DataLoader.__init__ = loader_init  # type: ignore[method-assign]
    torch.optim.Optimizer.__init__ = optimizer_init  # type: ignore[method-assign]

    from torch.optim.optimizer import register_optimizer_step_pre_hook

    def first_step(opt: Any, args: Any, kwargs: Any) -> None:
        """The training framework that drives the loop, from the first optimizer step's stack: its
        fixes are worded in its own terms (TrainingArguments fields, Trainer arguments)."""
        if done:  # (removing the hook here would change torch's hook dict while it iterates it)
            return
        done.append(True)
        try:
            name = framework_of(reversed(live_frames(sys._getframe(1))))  # no source lines read
            if name:
                probe.describe(framework={"name": name, "version": _version(name), "at": _site()})
        except Exception:
            pass

    done: list[bool] = []
    register_optimizer_step_pre_hook(first_step)
    _count_syncs(probe, torch, sites)


_SYNCS = ("item", "tolist", "__int__", "__float__", "__bool__", "__index__")
"""Tensor methods that read a value back to the host (on a GPU: wait for it)."""


def _count_syncs(probe: Probe, torch: Any, sites: dict[str, dict[str, Any]]) -> None:
    """Count host reads of tensors inside the steps by the line that made them (the caller chain is
    worked out once per line). The optimizer's own reads (its step counters) are its business, as in
    the trace's count."""
    is_compiling = torch.compiler.is_compiling
    counts: dict[str, int] = {}
    library: dict[str, str] = {}
    user: dict[str, str] = {}
    chains: dict[tuple[Any, int], str | None] = {}

    def chain_of(frame: Any) -> str | None:
        frames = live_frames(frame)
        inner = frames[0]["file"]
        if "/torch/optim/" in inner or (package_of(inner) == "perfkit" and not is_trainer(inner)):
            return None
        chain = caller_chain(reversed(frames), depth=2)
        if chain:
            # the package of the innermost frame outside torch ('' for the user's own code), and the
            # user's own line the call came through
            packages = ("" if is_trainer(x["file"]) else package_of(x["file"]) for x in frames)
            library[chain] = next((p for p in packages if p not in ("torch", "perfkit")), "")
            user[chain] = user_frame(reversed(frames))
        return chain or None

    def counted(original: Any) -> Any:
        @functools.wraps(original)
        def read(self: Any, *args: Any, **kwargs: Any) -> Any:
            # (under torch.compile's tracing the frame walk would break the graph: leave it alone)
            if probe._in_step and not probe._stopped and not is_compiling():
                try:
                    frame = sys._getframe(1)
                    key = (frame.f_code, frame.f_lineno)
                    if key not in chains:
                        chains[key] = chain_of(frame)
                    where = chains[key]
                    if where:
                        counts[where] = counts.get(where, 0) + 1
                except Exception:
                    pass
            return original(self, *args, **kwargs)

        return read

    for name in _SYNCS:
        original = getattr(torch.Tensor, name, None)
        if original is not None:
            setattr(torch.Tensor, name, counted(original))

    def report() -> None:
        if counts and probe.step:
            top = [
                {
                    "at": where,
                    "per_step": round(n / probe.step, 2),
                    "library": library.get(where, ""),
                    "user_at": user.get(where, ""),
                }
                for where, n in sorted(counts.items(), key=lambda kv: -kv[1])[:8]
            ]
            sites["sync"] = top[0]  # the fix goes to the line that reads the most
            probe.describe(call_sites=dict(sites), host_syncs=top)

    probe.at_stop.append(report)


def _version(framework: str) -> str | None:
    for module in {"lightning": ("pytorch_lightning", "lightning")}.get(framework, (framework,)):
        version = getattr(sys.modules.get(module), "__version__", None)
        if version:
            return str(version)
    return None
