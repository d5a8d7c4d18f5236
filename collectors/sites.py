"""Where an unmodified script builds its DataLoader and its optimizer (file and line), with the
settings a remedy would change: so a fix for that script says where to make it. Recorded into the
run's manifest (``model.call_sites``) through ``Probe.describe``; the first of each kind counts."""

from __future__ import annotations

import functools
import traceback
from typing import Any

from perfkit.collectors.probe import Probe

from perfkit.frames import user_frame

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
