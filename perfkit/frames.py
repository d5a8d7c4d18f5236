"""Which frame of a stack is the user's own code: the innermost one that is not the standard
library, an installed package, or perfkit's own wrappers. Torch-free; collectors and analyzers share
it."""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Iterable, Mapping
from types import FrameType
from typing import Any

NOT_USER = ("/site-packages/", "/dist-packages/", "/lib/python3", "<frozen", "<string>", "collectors/collectives.py",
            "collectors/probe.py", "collectors/api.py", "collectors/auto.py", "collectors/sites.py",
            "/threading.py")  # fmt: skip
_TRAINER = "/perfkit/trainer/"
"""The bundled trainer's folder: a user of perfkit, whose frames are the user's own."""


def user_frame(frames: Iterable[Mapping[str, Any]]) -> str:
    """``file:line function`` of the innermost user frame, or '' (frames innermost last, each with
    file, line and function)."""
    for f in reversed(list(frames)):
        path = str(f.get("file", ""))
        if is_trainer(path) or not any(mark in path for mark in NOT_USER):
            return f"{path}:{f.get('line')} {f.get('function')}"
    return ""


def is_trainer(path: str) -> bool:
    """A file of the bundled trainer, a user of perfkit like any script: its frames are the user's
    own, wherever perfkit is installed (its collectives and host reads had been put down to click,
    which runs its command line)."""
    return _TRAINER in path


# Training frameworks that drive a loop, by a path fragment of their package; the outermost one on
# a stack is the one the user called (the Hugging Face Trainer steps through Accelerate's optimizer).
FRAMEWORKS = (
    ("transformers", ("/transformers/",)),
    ("lightning", ("/pytorch_lightning/", "/lightning/pytorch/", "/lightning/fabric/", "/lightning_fabric/")),
    ("accelerate", ("/accelerate/",)),
    ("deepspeed", ("/deepspeed/",)),
)


def package_of(path: str) -> str:
    """The installed package a file belongs to (``transformers``), ``torch``, or '' for user code."""
    for mark in ("/site-packages/", "/dist-packages/"):
        if mark in path:
            return path.split(mark, 1)[1].split("/", 1)[0].removesuffix(".py")
    return ""


def framework_of(frames: Iterable[Mapping[str, Any]]) -> str:
    """The training framework whose loop made this call (frames innermost last): the outermost
    framework frame on the stack; '' for a plain PyTorch loop."""
    for f in frames:  # outermost first
        path = str(f.get("file", ""))
        for name, marks in FRAMEWORKS:
            if any(m in path for m in marks):
                return name
    return ""


def caller_chain(frames: Iterable[Mapping[str, Any]], depth: int = 3) -> str:
    """Who made a call, innermost first: the innermost frame of each package the stack passes
    through (torch and perfkit left out), up to the user's own code, ``depth`` at most:
    ``accelerate/utils/operations.py:380 _gpu_gather < transformers/trainer.py:5123 get_batch_samples
    < train.py:35 main``."""
    out: list[str] = []
    last = None
    for f in reversed(list(frames)):  # innermost first
        path = str(f.get("file", ""))
        if is_trainer(path):
            out.append(
                f"{_TRAINER.strip('/')}/{path.split(_TRAINER, 1)[1]}:{f.get('line')} {f.get('function')}"
            )
            break
        pkg = package_of(path)
        if pkg in ("torch", "perfkit") or path.startswith(_perfkit_roots()) or path.startswith("<"):
            continue
        if "/lib/python3" in path and not pkg:  # the standard library
            continue
        if pkg == last and pkg:
            continue
        last = pkg
        short = path.split(f"/{pkg}/", 1)[-1] if pkg else path
        out.append(f"{pkg + '/' if pkg else ''}{short}:{f.get('line')} {f.get('function')}")
        if not pkg or len(out) >= depth:
            break
    return " < ".join(out)


@functools.cache
def _perfkit_roots() -> tuple[str, ...]:
    """perfkit's own folders (an editable install maps its role folders from outside perfkit/)."""
    roots = [os.path.dirname(os.path.abspath(__file__)) + os.sep]
    spec = importlib.util.find_spec("perfkit.collectors")
    for loc in (spec.submodule_search_locations or []) if spec else []:
        roots.append(os.path.abspath(loc) + os.sep)
    return tuple(roots)


def live_frames(frame: FrameType | None, limit: int = 80) -> list[dict[str, Any]]:
    """A running stack from ``frame`` outwards (innermost first), as file/line/function records: no
    traceback objects, a few microseconds."""
    frames: list[dict[str, Any]] = []
    while frame is not None and len(frames) < limit:
        frames.append(
            {"file": frame.f_code.co_filename, "line": frame.f_lineno, "function": frame.f_code.co_name}
        )
        frame = frame.f_back
    return frames
