"""perfkit: profiling and bottleneck analysis for distributed PyTorch training.

Importing this package is cheap: it does not import torch. The public step API below imports the
collectors (and torch) when first called; see ``perfkit.collectors.api``.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "attach",
    "describe",
    "phase",
    "probe_links",
    "probing",
    "profile",
    "record_read",
    "step",
]


def profile(out: Any = None, **options: Any) -> Any:
    """Context manager that collects this rank's steps, collectives, memory, I/O and NVML samples
    into a run directory (see ``perfkit.collectors.api.profile``)."""
    from perfkit.collectors.api import profile as _profile

    return _profile(out, **options)


def attach(start_step: int = 0) -> Any:
    """Context manager that profiles this process only when it runs under ``perfkit profile``."""
    from perfkit.collectors.api import attach as _attach

    return _attach(start_step)


def step(tokens: int | None = None, loss: Any = None) -> None:
    """End the current step and begin the next one."""
    from perfkit.collectors.api import step as _step

    _step(tokens, loss)


def phase(name: str) -> Any:
    """Context manager timing one phase of the current step."""
    from perfkit.collectors.api import phase as _phase

    return _phase(name)


def describe(**facts: Any) -> None:
    """Tell the analysis what a trace cannot show: flops_per_token, parameters, layout."""
    from perfkit.collectors.api import describe as _describe

    _describe(**facts)


def probe_links(group: Any = None) -> bool:
    """At the end of training, on every rank: measure the link (a few all-reduces, nothing else
    running) for the analysis. Does nothing unless profiled with the comms collector."""
    from perfkit.collectors.api import probe_links as _probe_links

    return _probe_links(group)


def probing() -> Any:
    """A context: the collectives inside are the script measuring itself after its steps (the
    bundled trainer timing what other layouts would cost), recorded apart from the job's own."""
    from perfkit.collectors.api import probing as _probing

    return _probing()


def record_read(nbytes: int, seconds: float, start_ns: int, path: str, step: int | None = None) -> None:
    """Tell perfkit of a read the script times itself (a memory-mapped dataset, which no file hook
    sees): bytes, how long it took, when it began (time.time_ns()), and the step it feeds. A no-op
    unless profiled; safe in DataLoader workers."""
    from perfkit.collectors.signals.io import record_read as _record_read

    _record_read(nbytes, seconds, start_ns, path, step)
