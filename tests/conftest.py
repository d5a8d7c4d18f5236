from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Synthetic corpora go to a per-session folder, never the user's cache."""
    os.environ["PERFKIT_CACHE"] = str(tmp_path_factory.mktemp("cache"))


@pytest.fixture
def python() -> str:
    return sys.executable
