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


def environment() -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "host": socket.gethostname(),
        "cpu_count": os.cpu_count(),
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
