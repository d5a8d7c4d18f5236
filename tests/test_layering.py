"""The architecture's import rules and its single homes, checked from the source (architecture.md):
analyzers import neither torch nor the trainer; collectors never import analyzers or reports; reports
never import the collectors' rank side, the trainer or the optimizer; the trainer uses only perfkit's
public API; only the run model spells run-directory paths.

The analysis and the report do read each collector's declarations (its tables, how its rows fold into
metrics, its report section): from ``perfkit.collectors.base`` and the signal modules, which load
without torch (tests/test_collectors_unit.py checks that), and from nothing else of the collectors."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
FOLDERS = {
    "perfkit.analyzers": REPO / "analyzers",
    "perfkit.collectors": REPO / "collectors",
    "perfkit.reports": REPO / "reports",
    "perfkit": REPO / "perfkit",
}


def _modules(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.py") if "site" not in p.parts or p.name != "sitecustomize.py")


def _imports(path: Path) -> set[str]:
    """Every module a file imports, at any depth (lazy imports inside functions count too)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return found


FORBIDDEN = {
    "perfkit.analyzers": (
        "torch",
        "perfkit.trainer",
        "perfkit.collectors",
        "perfkit.reports",
        "perfkit.optimizer",
    ),
    "perfkit.collectors": ("perfkit.analyzers", "perfkit.reports", "perfkit.trainer", "perfkit.optimizer"),
    "perfkit.reports": ("torch", "perfkit.collectors", "perfkit.trainer", "perfkit.optimizer"),
}
DECLARATIONS = ("perfkit.collectors.base", "perfkit.collectors.signals")
"""What the analyzers and the reports may read of the collectors: the registry and its declarations."""


@pytest.mark.parametrize("package", list(FORBIDDEN))
def test_layers_import_only_what_they_may(package: str) -> None:
    bad = []
    for path in _modules(FOLDERS[package]):
        for name in _imports(path):
            if any(name == d or name.startswith(d + ".") for d in DECLARATIONS):
                continue
            if any(name == f or name.startswith(f + ".") for f in FORBIDDEN[package]):
                bad.append(f"{path.relative_to(REPO)} imports {name}")
    assert not bad, "\n".join(bad)


def test_the_trainer_uses_only_perfkits_public_api() -> None:
    """The bundled trainer is a user of perfkit like any script: ``perfkit``'s public step API, its
    errors, its hardware table and its atomic file writes, and nothing of the collectors, the run
    model or the analysis."""
    allowed = ("perfkit", "perfkit.errors", "perfkit.hardware", "perfkit.files")
    bad = []
    for path in _modules(REPO / "perfkit" / "trainer"):
        for name in _imports(path):
            if name.startswith("perfkit.") and not name.startswith("perfkit.trainer"):
                if not any(name == a or name.startswith(a + ".") for a in allowed[1:]) and not (
                    name.count(".") == 1 and name.split(".")[1] in _PUBLIC
                ):
                    bad.append(f"{path.relative_to(REPO)} imports {name}")
    assert not bad, "\n".join(bad)


_PUBLIC = {
    "attach",
    "describe",
    "phase",
    "probe_links",
    "probing",
    "profile",
    "step",
    "record_read",
    "__version__",
}


# Run-directory names that only perfkit/run.py may spell (tables are named by their schema).
_PATH_LITERALS = re.compile(
    r"""["'](manifest\.json|analysis\.json|probe\.json|trace\.json\.gz|train_log\.jsonl|"""
    r"""memory_snapshot\.pickle|oom_snapshot\.pickle|index\.html|compare\.html|merged\.json\.gz|"""
    r"""(steps|comms|io|memory|nvml)\.jsonl)["']|f["']rank\{"""
)


def test_only_the_run_model_spells_run_directory_paths() -> None:
    bad = []
    for folder in FOLDERS.values():
        for path in _modules(folder):
            if path == REPO / "perfkit" / "run.py" or "trainer" in path.parts:
                continue
            for i, line in enumerate(path.read_text().splitlines(), 1):
                code = line.split("#", 1)[0]
                if _PATH_LITERALS.search(code) and not code.strip().startswith(('"""', "'''")):
                    bad.append(f"{path.relative_to(REPO)}:{i}: {line.strip()}")
    assert not bad, "ask perfkit.run.RunLayout for these paths:\n" + "\n".join(bad)
