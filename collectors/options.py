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
WATCH_LEAVES_OUT = ("kernels", "cpu")
"""Collectors --watch leaves off unless --collect names them: the fixed kernel window (watching
captures its own) and the cpu collector (a /proc read a step: ~30 us, 3% of a 1 ms step)."""


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


def _flag(text: str, what: str) -> bool:
    value = text.strip().lower()
    if value not in ("1", "0", "true", "false", "yes", "no", "on", "off", ""):
        raise ConfigError(f"{what} {text!r} is not on or off; write 1 or 0")
    return value in ("1", "true", "yes", "on")


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

    watch: bool = _option(
        False,
        flag="--watch",
        env="PERFKIT_WATCH",
        help="Watch a long job: the cheap collectors for every step within a disk budget, anomalies "
        "found as they start, a trace of the next steps captured on every rank when one does "
        "(and a baseline one early); no fixed kernel-trace window unless --profile-steps is given",
        parse=lambda text, what: _flag(text, what),
        format=lambda on: "1" if on else "0",
    )
    """Watch mode (perfkit.watch): bounded tables, per-window summaries, anomaly captures."""
    watch_budget_mb: float = _option(
        100.0,
        flag="--watch-budget",
        env="PERFKIT_WATCH_BUDGET_MB",
        help="Disk the watched job may use, in MB, all ranks together (tables, summaries, captures)",
        parse=_positive_float,
    )
    """The whole run directory's bound under --watch, shared evenly by the ranks."""
    watch_window: int = _option(
        50,
        flag="--watch-window",
        env="PERFKIT_WATCH_WINDOW",
        help="Steps per summary window under --watch (the detectors judge whole windows)",
        parse=_positive_int,
    )
    """Steps per window: a summary row per rank, and the unit the anomaly detectors judge."""
    capture_steps: int = _option(
        5,
        flag="--capture-steps",
        env="PERFKIT_CAPTURE_STEPS",
        help="Steps each --watch capture traces (the baseline one and one per anomaly)",
        parse=_positive_int,
    )
    """Steps per captured trace under --watch."""
    no_probe: bool = _option(
        False,
        flag="--no-probe",
        env="PERFKIT_NO_PROBE",
        help="Skip what the bundled trainer measures after its last step for whatif and the sweep "
        "(the link probe, and what other layouts cost here beyond their FLOPs: ~5 s on 2 CPU ranks); "
        "their predictions then fit the link to the job's own collectives and leave those costs out",
        parse=lambda text, what: _flag(text, what),
        format=lambda on: "1" if on else "0",
    )
    """No link probe and no layout costs after the steps (``perfkit.probe_links()`` does nothing)."""

    def __post_init__(self) -> None:
        if self.nvml_hz > 1000 or self.nvml_hz < 0.1:
            raise ConfigError(f"--nvml-hz {self.nvml_hz:g} is out of range; choose 0.1 to 1000")
        for name in self.collect:
            if name not in known() and name not in REGISTRY:  # REGISTRY: a collector added at run time
                raise ConfigError(f"unknown collector {name!r}; choose from {', '.join(known())}")

    WATCH_SHARES = {"table": 0.04, "summary": 0.05, "captures": 0.6}
    """A rank's share of the --watch budget for each table file (its older part included: about seven
    tables), its summary table, and all its captured traces; the rest is room for the small files."""

    def watch_bytes(self, world_size: int, part: str) -> int:
        """Bytes of the --watch budget one rank may use for ``part`` (``WATCH_SHARES``); 0: unbounded
        (not watching)."""
        if not self.watch:
            return 0
        return int(self.watch_budget_mb * 1e6 / max(1, world_size) * self.WATCH_SHARES[part])

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
        return cls(**watching(kwargs))


def watching(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Options as given, with watch mode's own defaults where it is on and they are not given: no
    fixed kernel window (watching captures its own) and the cheap collectors only."""
    if kwargs.get("watch"):
        kwargs.setdefault("profile_steps", None)
        kwargs.setdefault("collect", [n for n in known() if n not in WATCH_LEAVES_OUT])
    return kwargs


_METAVARS = {"int": "INTEGER", "float": "NUMBER"}
"""How --help names an option's value by the field's type (the rest are text: lists, ranges, none)."""


def cli_fields() -> list[tuple[str, str, str, str, str]]:
    """(field name, flag, help, default as text, metavar) for each option, for the CLI to make its
    options from; metavar ``FLAG``: an on/off switch that takes no value."""
    out = []
    defaults = CollectOptions()
    for f in dataclasses.fields(CollectOptions):
        default = "all" if f.name == "collect" else f.metadata["format"](getattr(defaults, f.name))
        if str(f.type) == "bool":
            out.append((f.name, f.metadata["flag"], f.metadata["help"], "off", "FLAG"))
            continue
        metavar = _METAVARS.get(str(f.type).split("|")[0].strip(), "TEXT")
        out.append((f.name, f.metadata["flag"], f.metadata["help"], default, metavar))
    return out
