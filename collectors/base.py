"""The collector interface and the registry of collectors by name."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from perfkit.errors import ConfigError

if TYPE_CHECKING:
    from perfkit.collectors.probe import Probe


class Collector:
    """One signal. start / per-step / stop; any exception disables it, never the training.

    Subclasses set ``name``; ``available()`` says why it cannot run here (or None)."""

    name: ClassVar[str] = ""
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
DEFAULT = ("steps", "comms", "memory", "io", "nvml", "kernels")


def register(cls: type[Collector]) -> type[Collector]:
    REGISTRY[cls.name] = cls
    return cls


def parse_collect(spec: str) -> list[str]:
    """``steps,comms`` (or ``all``) to a list of known names; an unknown one names the known ones."""
    names = (
        list(DEFAULT) if spec.strip() in ("", "all") else [s.strip() for s in spec.split(",") if s.strip()]
    )
    unknown = [n for n in names if n not in DEFAULT]
    if unknown:
        raise ConfigError(
            f"unknown collector {unknown[0]!r} in --collect; choose from {', '.join(DEFAULT)} or all"
        )
    return names
