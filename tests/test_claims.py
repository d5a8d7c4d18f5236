"""The README's claims table: every test or bench it names exists, and every bold figure of the README
appears in it (a figure with nothing behind it had been easy to write)."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()


def _table() -> list[list[str]]:
    section = README.split("## Claims and what backs them", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| ---")]
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows[1:]]


def test_every_backing_named_exists() -> None:
    rows = _table()
    assert len(rows) >= 15
    for claim, _, backed in rows:
        refs = re.findall(r"`([^`]+)`", backed)
        assert refs, f"{claim}: backed by nothing"
        for ref in refs:
            path, _, name = ref.partition("::")
            assert (REPO / path).is_file(), f"{claim}: {path} does not exist"
            if name:
                assert re.search(rf"^def {re.escape(name)}\(", (REPO / path).read_text(), re.M), (
                    f"{claim}: {path} has no test {name}"
                )


def test_every_bold_figure_is_in_the_table() -> None:
    figures = {
        " ".join(m.split())
        for m in re.findall(r"\*\*([^*]+)\*\*", README.split("## Claims and what backs them")[0])
    }
    figures = {f for f in figures if re.search(r"\d", f) or f in ("agree exactly", "As a user runs it")}
    listed = " ".join(cell for row in _table() for cell in row[1:2])
    missing = sorted(f for f in figures if f"**{f}**" not in listed)
    assert not missing, f"bold figures with no row in the claims table: {missing}"
