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


def synth_ranks():  # type: ignore[no-untyped-def]
    """bench/synth_ranks.py as a module: N-rank jobs made from a real trace, with planted effects."""
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "bench" / "synth_ranks.py"
    if "synth_ranks" not in sys.modules:
        spec = importlib.util.spec_from_file_location("synth_ranks", path)
        assert spec and spec.loader
        module = importlib.util.module_from_spec(spec)
        sys.modules["synth_ranks"] = module
        spec.loader.exec_module(module)
    return sys.modules["synth_ranks"]
