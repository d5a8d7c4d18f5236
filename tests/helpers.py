"""Shared by the tests that run perfkit as a user would, in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

BIN = Path(sys.executable).parent


def user_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a user whose virtual environment is active (torchrun on PATH)."""
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", **(extra or {})}


def run_perfkit(
    *args: str, env: dict[str, str] | None = None, timeout: int = 300
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "perfkit", *args],
        capture_output=True,
        text=True,
        env=user_env(env),
        timeout=timeout,
    )
