"""The collector interface and the registry of collectors by name.

A collector is one module in ``perfkit.collectors.signals`` defining one ``@register``-ed
``Collector`` subclass whose ``name`` is the module's name. Beside what it does in a rank (start,
per step, stop) it declares what the rest of perfkit needs to know of it, read from the registry:

- ``tables``: the tables it writes (their schemas; the run model loads every declared table);
- ``fold``: how its rows fold into its metrics (analysis.json's ``signals[name]``, which rules read);
- ``title``, ``order`` and ``charts``: its report section (per-step charts of its columns).

A signal module imports no torch when it is loaded (a test checks): the analysis and the report read
these declarations without it, and a rank imports torch when it starts the collector. ``known()``
lists the names without importing any module (the CLI checks ``--collect`` against them).
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from perfkit.errors import ConfigError
from perfkit.tables import Table

if TYPE_CHECKING:
    import pandas as pd
    from perfkit.collectors.probe import Probe


@dataclass(frozen=True)
class Chart:
    """One chart of a collector's report section: a column of its table, one line per rank over the
    steps."""

    column: str
    title: str
    unit: str = "ms"
    scale: float = 1e3
    """Multiplies the column's values (seconds shown as ms by default)."""
    table: str = ""
    """The table it reads; empty: the collector's first."""


class Collector:
    """One signal. start / per-step / stop; any exception disables it, never the training.

    Subclasses set ``name``; ``available()`` says why it cannot run here (or None)."""

    name: ClassVar[str] = ""
    tables: ClassVar[tuple[Table, ...]] = ()
    """The tables this collector writes (``perfkit.tables.Table``: declared here or there)."""
    title: ClassVar[str] = ""
    """Its report section's heading; empty: the report shows it elsewhere (or not at all)."""
    order: ClassVar[float] = 200.0
    """Its section's place on the page (reports.sections: lower first)."""
    charts: ClassVar[tuple[Chart, ...]] = ()
    enabled: bool = True

    @classmethod
    def fold(cls, frames: Mapping[str, pd.DataFrame], steps: pd.DataFrame) -> Any:
        """Its rows (every rank's, ``frames[table]`` with a ``rank`` column) folded into a metrics
        dataclass of its own, or None; ``steps``: the run's steps after the warm-up, to fold over
        the same steps as the other metrics. Runs in the analysis: pandas, no torch."""
        return None

    def available(self, probe: Probe) -> str | None:
        return None

    def start(self, probe: Probe) -> None:
        pass

    def step_begin(self, probe: Probe, step: int) -> None:
        pass

    def step_end(self, probe: Probe, step: int) -> None:
        pass

    def step_timed(self, probe: Probe, row: dict[str, Any]) -> None:
        """A finished step's row of timings, once they are known (on GPU, CUDA events are read a
        step or more after ``step_end``; all are at the stop)."""

    def stop(self, probe: Probe) -> None:
        pass

    def state(self) -> dict[str, Any]:
        """Keys this collector adds to its rank's probe.json at each write (what the rank is in now:
        the comms collector's collectives in flight)."""
        return {}


REGISTRY: dict[str, type[Collector]] = {}


def register(cls: type[Collector]) -> type[Collector]:
    module = cls.__module__.rsplit(".", 1)[-1]
    if cls.name != module:
        raise TypeError(
            f"collector {cls.__name__} is named {cls.name!r} but lives in {module}.py; name it {module!r}"
        )
    REGISTRY[cls.name] = cls
    return cls


def known() -> list[str]:
    """Every collector's name, in the order they start (steps first: the others' rows follow its
    step boundaries), without importing any of them."""
    import perfkit.collectors.signals as signals

    names = sorted(m.name for m in pkgutil.iter_modules(signals.__path__) if not m.name.startswith("_"))
    return sorted(names, key=lambda n: n != "steps")


def load(name: str) -> type[Collector]:
    """The collector class of that name (imports its module, and torch)."""
    if name not in REGISTRY:
        if name not in known():
            raise ConfigError(f"unknown collector {name!r}; choose from {', '.join(known())}")
        importlib.import_module(f"perfkit.collectors.signals.{name}")
    return REGISTRY[name]


def declared() -> list[type[Collector]]:
    """Every collector class, in start order (imports every signal module: no torch)."""
    return [load(n) for n in known()]


def tables() -> dict[str, Table]:
    """Every table a collector declares, by name."""
    return {t.name: t for c in declared() for t in c.tables}


def parse_collect(spec: str) -> list[str]:
    """``steps,comms`` (or ``all``) to a list of known names; an unknown one names the known ones."""
    names = known()
    chosen = names if spec.strip() in ("", "all") else [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [n for n in chosen if n not in names]
    if unknown:
        raise ConfigError(
            f"unknown collector {unknown[0]!r} in --collect; choose from {', '.join(names)} or all"
        )
    return chosen
