"""Which frame of a stack is the user's own code: the innermost one that is not the standard
library, an installed package, or perfkit's own wrappers. Torch-free; collectors and analyzers share
it."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

NOT_USER = ("/site-packages/", "/dist-packages/", "/lib/python3", "<frozen", "<string>", "signals/comms.py",
            "collectors/probe.py", "collectors/api.py", "collectors/auto.py", "collectors/sites.py",
            "/threading.py")  # fmt: skip


def user_frame(frames: Iterable[Mapping[str, Any]]) -> str:
    """``file:line function`` of the innermost user frame, or '' (frames innermost last, each with
    file, line and function)."""
    for f in reversed(list(frames)):
        path = str(f.get("file", ""))
        if not any(mark in path for mark in NOT_USER):
            return f"{path}:{f.get('line')} {f.get('function')}"
    return ""
