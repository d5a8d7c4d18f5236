"""The collectors' options, their defaults, and their round trip through the environment: the one
home for them. Torch-free: ``perfkit profile`` builds them in the parent process, passes them to
every rank as ``PERFKIT_*`` variables, and each rank's Probe reads them back; ``perfkit.profile()``
takes the same fields as keyword arguments, and the CLI's options are made from the fields below.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from perfkit.collectors.base import REGISTRY, known, parse_collect

from perfkit.errors import ConfigError

Window = tuple[int, int]


def parse_window(text: str | None, what: str) -> Window | None:
    """``5-7`` or ``5`` to (first, last), 1-based inclusive; ``none`` or empty to None."""
    if not text or text.strip().lower() == "none":
        return None
    a, _, b = text.partition("-")
    try:
        first, last = int(a), int(b or a)
    except ValueError:
        raise ConfigError(f"{what} {text!r} is not a step range; write e.g. 5-7") from None
    if first < 1 or last < first:
        raise ConfigError(f"{what} {text!r} must be FIRST-LAST with 1 <= FIRST <= LAST")
    return first, last


def format_window(window: Window | None) -> str:
    return "none" if window is None else f"{window[0]}-{window[1]}"


def _positive_float(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"{what} {text!r} is not a number") from None
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{what} must be a positive finite number, not {text!r}")
    return value


def _positive_int(text: str, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ConfigError(f"{what} {text!r} is not a whole number") from None
    if value < 1:
        raise ConfigError(f"{what} must be at least 1, not {text!r}")
    return value


def parse_ranks(text: str, what: str) -> str:
    """``all``, ranks and ranges (``0,7,16-31``), or ``sample:N`` (N ranks spread evenly, rank 0
    first); checked here, resolved against the world size by ``rank_selected``."""
    spec = text.strip().replace(" ", "")
    if spec == "all":
        return spec
    try:
        if spec.startswith("sample:"):
            if int(spec.removeprefix("sample:")) < 1:
                raise ValueError
            return spec
        for part in spec.split(","):
            lo, _, hi = part.partition("-")
            if int(lo) < 0 or (hi and int(hi) < int(lo)):
                raise ValueError
    except ValueError:
        raise ConfigError(
            f"{what} {text!r}: give all, ranks and ranges (0,7,16-31) or sample:N (N ranks spread evenly)"
        ) from None
    return spec


def rank_selected(spec: str, rank: int, world_size: int) -> bool:
    """Whether ``rank`` of ``world_size`` is one of ``spec`` (as ``parse_ranks`` checked it)."""
    if spec == "all":
        return True
    if spec.startswith("sample:"):
        n = min(world_size, int(spec.removeprefix("sample:")))
        return rank in {round(i * world_size / n) for i in range(n)}
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        if int(lo) <= rank <= int(hi or lo):
            return True
    return False


def _option(
    default: Any,
    *,
    flag: str,
    env: str,
    help: str,
    parse: Callable[[str, str], Any],
    format: Callable[[Any], str] = str,
    default_factory: Callable[[], Any] | None = None,
) -> Any:
    meta = {"flag": flag, "env": env, "help": help, "parse": parse, "format": format}
    if default_factory is not None:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(kw_only=True)
class CollectOptions:
    collect: list[str] = _option(
        None,
        flag="--collect",
        env="PERFKIT_COLLECT",
        help=f"Collectors, comma-separated ({','.join(known())}), or all",
        parse=lambda text, what: parse_collect(text),
        format=",".join,
        default_factory=known,
    )
    """Collectors to run, by name."""
    profile_steps: Window | None = _option(
        (5, 7),
        flag="--profile-steps",
        env="PERFKIT_PROFILE_STEPS",
        help="Kernel-trace window (1-based steps, e.g. 5-7), or none",
        parse=parse_window,
        format=format_window,
    )
    """Kernel-trace window, first and last step (1-based, inclusive); None: no trace."""
    trace_ranks: str = _option(
        "all",
        flag="--trace-ranks",
        env="PERFKIT_TRACE_RANKS",
        help="Ranks that write a kernel trace: all, ranks and ranges (0,7,16-31) or sample:N; "
        "the cheap tables stay on every rank",
        parse=parse_ranks,
    )
    """Which ranks write a kernel trace (at hundreds of ranks, a few traces tell the story)."""
    nvml_hz: float = _option(
        10.0, flag="--nvml-hz", env="PERFKIT_NVML_HZ", help="NVML samples per second", parse=_positive_float
    )
    """NVML samples per second."""
    memory_history: Window | None = _option(
        None,
        flag="--memory-history",
        env="PERFKIT_MEMORY_HISTORY",
        help="Record a CUDA allocator history over these steps, e.g. 3-4",
        parse=parse_window,
        format=format_window,
    )
    """Steps over which to record a CUDA allocator history snapshot; None: none."""
    memory_history_entries: int = _option(
        100_000,
        flag="--memory-history-entries",
        env="PERFKIT_MEMORY_HISTORY_ENTRIES",
        help="Cap on allocator history entries",
        parse=_positive_int,
    )
    """Cap on allocator history entries."""
    hang_timeout: float = _option(
        600.0,
        flag="--hang-timeout",
        env="PERFKIT_HANG_TIMEOUT",
        help="Seconds without a step or collective progressing before the ranks write hang records "
        "and the job is stopped; 0: off",
        parse=lambda text, what: 0.0 if text.strip() in ("0", "0.0") else _positive_float(text, what),
    )
    """No step and no collective progress for this long: a hang (10 minutes never fires on a healthy
    job); 0 turns the watchdog off."""

    def __post_init__(self) -> None:
        if self.nvml_hz > 1000 or self.nvml_hz < 0.1:
            raise ConfigError(f"--nvml-hz {self.nvml_hz:g} is out of range; choose 0.1 to 1000")
        for name in self.collect:
            if name not in known() and name not in REGISTRY:  # REGISTRY: a collector added at run time
                raise ConfigError(f"unknown collector {name!r}; choose from {', '.join(known())}")

    def to_env(self) -> dict[str, str]:
        """The ``PERFKIT_*`` variables that carry these options to every rank."""
        return {
            f.metadata["env"]: f.metadata["format"](getattr(self, f.name)) for f in dataclasses.fields(self)
        }

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> CollectOptions:
        """The options ``to_env`` wrote (the defaults for variables that are not set)."""
        env = os.environ if env is None else env
        kwargs = {
            f.name: f.metadata["parse"](env[f.metadata["env"]], f.metadata["env"])
            for f in dataclasses.fields(cls)
            if f.metadata["env"] in env
        }
        return cls(**kwargs)

    @classmethod
    def from_text(cls, values: Mapping[str, str | None]) -> CollectOptions:
        """Options from the command line's text (field name -> text); None keeps the default."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        kwargs = {
            name: fields[name].metadata["parse"](text, fields[name].metadata["flag"])
            for name, text in values.items()
            if text is not None
        }
        return cls(**kwargs)


_METAVARS = {"int": "INTEGER", "float": "NUMBER"}
"""How --help names an option's value by the field's type (the rest are text: lists, ranges, none)."""


def cli_fields() -> list[tuple[str, str, str, str, str]]:
    """(field name, flag, help, default as text, metavar) for each option, for the CLI to make its
    options from."""
    out = []
    defaults = CollectOptions()
    for f in dataclasses.fields(CollectOptions):
        default = "all" if f.name == "collect" else f.metadata["format"](getattr(defaults, f.name))
        metavar = _METAVARS.get(str(f.type).split("|")[0].strip(), "TEXT")
        out.append((f.name, f.metadata["flag"], f.metadata["help"], default, metavar))
    return out
