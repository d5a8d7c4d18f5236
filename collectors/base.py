"""The collector interface and the registry of collectors by name.

A collector is one module in ``perfkit.collectors.signals`` defining one ``@register``-ed
``Collector`` subclass whose ``name`` is the module's name and whose ``tables`` are the tables it
writes (declared in ``perfkit.tables``). The names are known without importing torch (``known()``:
the CLI checks ``--collect`` against them); a rank imports a collector's module when it starts it.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import TYPE_CHECKING, ClassVar

from perfkit.errors import ConfigError
from perfkit.tables import Table

if TYPE_CHECKING:
    from perfkit.collectors.probe import Probe


class Collector:
    """One signal. start / per-step / stop; any exception disables it, never the training.

    Subclasses set ``name``; ``available()`` says why it cannot run here (or None)."""

    name: ClassVar[str] = ""
    tables: ClassVar[tuple[Table, ...]] = ()
    """The tables this collector writes (their schemas live in perfkit.tables)."""
    enabled: bool = True

    def available(self, probe: Probe) -> str | None:
        return None

    def start(self, probe: Probe) -> None:
        pass

    def step_begin(self, probe: Probe, step: int) -> None:
        pass

    def step_end(self, probe: Probe, step: int) -> None:
        pass

    def stop(self, probe: Probe) -> None:
        pass


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
