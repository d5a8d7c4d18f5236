"""perfkit: profiling and bottleneck analysis for distributed PyTorch training.

Importing this package is cheap: it does not import torch. ``profile``, ``step`` and ``phase``
import the collectors (and torch) when first called.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["__version__", "phase", "profile", "step"]


def profile(out: Any = None, **options: Any) -> Any:
    """Context manager that collects this rank's steps, collectives, memory, I/O and NVML samples
    into a run directory (see ``perfkit.collectors.api.profile``)."""
    from perfkit.collectors.api import profile as _profile

    return _profile(out, **options)


def step(tokens: int | None = None, loss: Any = None) -> None:
    """Mark the end of a training step."""
    from perfkit.collectors.api import step as _step

    _step(tokens, loss)


def phase(name: str) -> Any:
    """Context manager timing one phase of the current step."""
    from perfkit.collectors.api import phase as _phase

    return _phase(name)
