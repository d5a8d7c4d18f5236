"""What a run ran on, for the manifest: versions and hardware, without importing torch."""

from __future__ import annotations

import os
import platform
import socket
from importlib import metadata
from typing import Any


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _host_memory() -> int | None:
    """Physical memory of this host, the capacity a CPU run's peak RSS is measured against."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return None


def environment() -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "host": socket.gethostname(),
        "cpu_count": os.cpu_count(),
        "host_memory_bytes": _host_memory(),
        "torch": _version("torch"),
        "perfkit": _version("perfkit"),
        "gpus": [],
    }
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            info["driver"] = pynvml.nvmlSystemGetDriverVersion()
            for i in range(pynvml.nvmlDeviceGetCount()):
                info["gpus"].append(pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(i)))
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no NVIDIA driver here: a CPU run
        pass
    return info
