"""Step boundaries and phases for an unmodified script, found from hooks alone (auto mode).

- a step ends after the optimizer steps (global optimizer-step hooks); with several optimizers it
  ends at the first activity after every optimizer that has stepped so far in the run stepped
  again, so all their time counts to the step, even where forward passes come between them (a
  GAN's discriminator and generator; a critic stepping 5 times a generator step). An optimizer
  gone (garbage) no longer counts; one left unused while another steps 8 times is dropped;
- data wait: time inside a DataLoader iterator's ``__next__``;
- forward: from the outermost module's forward start to its end. In the first step global module
  hooks find the outermost modules; then only those keep hooks (so later steps pay for two hooks,
  not one per module);
- backward: time inside ``Tensor.backward`` / ``torch.autograd.backward``; the scalars it starts
  from, summed over the step's backward calls, are the step's loss: with gradient accumulation each
  micro-batch's loss is scaled by 1/k before its backward (Hugging Face, Accelerate, Lightning,
  nanoGPT), so the sum is the mean loss the framework logs, not the last micro-batch's share;
- tokens: the element count of the outermost module's token ids: an integer 2-D first argument, the
  keyword ``input_ids`` (Hugging Face models are called with keywords) or the first tensor of a batch
  passed whole (Lightning), summed over the step's forward passes with gradients on (an evaluation
  pass under ``no_grad`` trains no token).

All hooks go quiet when the script marks steps itself (``perfkit.step()``: manual mode).
"""

from __future__ import annotations

import contextlib
import functools
import time
import weakref
from typing import Any

import torch
from perfkit.collectors.probe import Probe
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from torch.utils.data import dataloader

STALE_AFTER = 8
"""Calls of one optimizer within a step after which those that did not step are no longer awaited."""


class AutoSteps:
    def __init__(self, probe: Probe) -> None:
        self.probe = probe
        self.opt_start: dict[int, Any] = {}
        self.pending_end: Any = None
        self.seen: weakref.WeakSet[torch.optim.Optimizer] = weakref.WeakSet()  # stepped in the run
        self.calls: dict[int, int] = {}  # optimizer id -> its step() calls since the step began
        self.depth = 0
        self.forward_start: Any = None
        self.in_backward = False
        self.losses: list[Any] = []
        self.scaled: tuple[Any, Any] | None = None  # (weakref to GradScaler.scale's output, its input)
        self.roots: set[int] = set()
        self.root_modules: list[nn.Module] = []
        self.global_handles: list[Any] = []
        self.handles: list[Any] = []  # optimizer hooks, the outermost modules' hooks

    @property
    def active(self) -> bool:
        return not self.probe.manual and not self.probe._stopped

    def activity(self) -> None:
        """Something of a new step happens: close the previous one if its optimizers finished."""
        if self.pending_end is not None and all(id(o) in self.calls for o in self.seen):
            end, self.pending_end = self.pending_end, None
            self.calls = {}
            self.probe.end_step(loss=self._take_loss(), end_mark=end)
            if self.global_handles:  # the first step found the outermost modules
                self._narrow_forward_hooks()
        self.probe.begin_step()

    def _take_loss(self) -> Any:
        losses, self.losses = self.losses, []
        if len(losses) <= 1:
            return losses[0] if losses else None
        with torch.no_grad():
            return torch.stack([x.float().reshape(()) for x in losses]).sum()

    # optimizer
    def opt_pre(self, opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self.active:
            if self.pending_end is not None:  # another optimizer of the same step
                self.pending_end = None
            self.probe.begin_step()
            self.opt_start[id(opt)] = self.probe.mark()

    def opt_post(self, opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self.active and id(opt) in self.opt_start:
            self.probe.add_phase("optimizer", self.opt_start.pop(id(opt)))
            self.pending_end = self.probe.mark()
            self.seen.add(opt)
            self.calls[id(opt)] = self.calls.get(id(opt), 0) + 1
            if self.calls[id(opt)] > STALE_AFTER:  # the others no longer step: stop waiting for them
                for other in list(self.seen):
                    if id(other) not in self.calls:
                        self.seen.discard(other)

    # forward
    def fwd_pre(self, module: nn.Module, args: Any) -> None:
        if not self.active or self.in_backward:
            return
        if self.depth == 0:
            self.activity()
            self.forward_start = self.probe.mark()
            if self.global_handles:
                if id(module) not in self.roots:
                    self.roots.add(id(module))
                    self.root_modules.append(module)
        self.depth += 1

    def fwd_post(self, module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        """(Tokens are read here: only post hooks see keyword arguments when registered globally.)"""
        if not self.active or self.in_backward:
            return
        self.depth = max(0, self.depth - 1)
        if self.depth == 0 and self.forward_start is not None:
            self.probe.add_phase("forward", self.forward_start)
            self.forward_start = None
            if torch.is_grad_enabled():
                n = _token_count(args, kwargs)
                if n:
                    self.probe.add_tokens(n)

    def _narrow_forward_hooks(self) -> None:
        for h in self.global_handles:
            h.remove()
        self.global_handles = []
        for m in self.root_modules:
            self.handles.append(m.register_forward_pre_hook(self.fwd_pre))
            # with kwargs: a model called as model(input_ids=..., labels=...) shows its tokens
            self.handles.append(m.register_forward_hook(self.fwd_post, with_kwargs=True))

    def remove_hooks(self) -> None:
        """Take the optimizer and module hooks off (manual mode needs none of them)."""
        for h in self.global_handles + self.handles:
            h.remove()
        self.global_handles, self.handles = [], []

    def install(self) -> None:
        self.handles = [
            register_optimizer_step_pre_hook(self.opt_pre),
            register_optimizer_step_post_hook(self.opt_post),
        ]
        self.global_handles = [
            nn.modules.module.register_module_forward_pre_hook(self.fwd_pre),
            nn.modules.module.register_module_forward_hook(self.fwd_post, with_kwargs=True),
        ]
        auto = self

        original_next = dataloader._BaseDataLoaderIter.__next__

        @functools.wraps(original_next)
        def next_(self: Any) -> Any:
            if not auto.active:
                return original_next(self)
            auto.activity()
            t0 = time.perf_counter()
            try:
                return original_next(self)
            finally:
                auto.probe.add_data_wait(time.perf_counter() - t0)

        dataloader._BaseDataLoaderIter.__next__ = next_  # type: ignore[method-assign]

        def timed_backward(fn: Any) -> Any:
            @functools.wraps(fn)
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                if not auto.active or auto.in_backward:
                    return fn(*args, **kwargs)
                auto.activity()
                first = args[0] if args else kwargs.get("tensors")
                if isinstance(first, torch.Tensor) and first.numel() == 1:
                    scaled = auto.scaled
                    if scaled is not None and scaled[0]() is first:  # GradScaler's loss x scale
                        first = scaled[1]
                    auto.losses.append(first.detach())
                auto.in_backward = True
                start = auto.probe.mark()
                try:
                    return fn(*args, **kwargs)
                finally:
                    auto.in_backward = False
                    auto.probe.add_phase("backward", start)

            return wrapper

        original_scale = torch.amp.GradScaler.scale

        @functools.wraps(original_scale)
        def scale(self: Any, outputs: Any) -> Any:
            """Mixed precision's scaled loss (loss x 65536 in fp16) is what backward starts from: the
            step's loss is the one before the scale."""
            out = original_scale(self, outputs)
            if (
                auto.active
                and isinstance(outputs, torch.Tensor)
                and outputs.numel() == 1
                and out is not outputs
            ):
                with contextlib.suppress(TypeError):
                    auto.scaled = (weakref.ref(out), outputs.detach())
            return out

        torch.amp.GradScaler.scale = scale  # type: ignore[method-assign]
        torch.Tensor.backward = timed_backward(torch.Tensor.backward)  # type: ignore[method-assign]
        torch.autograd.backward = timed_backward(torch.autograd.backward)

    def finish(self) -> None:
        if self.pending_end is not None and not self.probe._stopped:
            end, self.pending_end = self.pending_end, None
            self.probe.end_step(loss=self._take_loss(), end_mark=end)


def _token_count(args: Any, kwargs: Any) -> int:
    """Token ids in a forward call: an integer 2-D first argument, ``input_ids=``, or the first such
    tensor inside a batch passed whole (a tuple ``(x, y)`` or a dict with ``input_ids``, as Lightning
    hands its module the batch)."""
    x = args[0] if args else None
    if not isinstance(x, torch.Tensor) and kwargs:
        x = kwargs.get("input_ids", x)
    if isinstance(x, dict):
        x = x.get("input_ids", next(iter(x.values()), None))
    elif isinstance(x, list | tuple) and x:
        x = x[0]
    if isinstance(x, torch.Tensor) and x.dim() == 2 and not x.is_floating_point() and x.dtype != torch.bool:
        return x.numel()
    return 0


def install(probe: Probe) -> AutoSteps:
    auto = AutoSteps(probe)
    auto.install()
    return auto
