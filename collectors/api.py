"""The explicit API for scripts that mark their own steps::

    import perfkit
    with perfkit.profile("runs/mine", profile_steps=(5, 7)):
        for batch in loader:
            with perfkit.phase("forward"):
                loss = model(batch)
            ...
            perfkit.step(tokens=batch.numel(), loss=loss)

Under ``perfkit profile`` the run directory and options come from the command line instead and
``out`` is ignored.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from perfkit.collectors.base import parse_collect
from perfkit.collectors.probe import Probe, ProbeOptions, probe_from_env, rank_from_env

from perfkit.errors import ConfigError


@contextlib.contextmanager
def profile(
    out: str | Path | None = None,
    *,
    collect: str = "all",
    profile_steps: tuple[int, int] | None = None,
    nvml_hz: float = 10.0,
    memory_history: tuple[int, int] | None = None,
) -> Iterator[Probe]:
    from perfkit.run import Run, default_run_path

    probe = probe_from_env()
    run: Run | None = None
    if probe is None:
        rank, world, local = rank_from_env()
        if out is None:
            if world > 1:
                raise ConfigError(
                    "perfkit.profile() on several ranks needs out=...: every rank must write one run directory"
                )
            out = default_run_path(Path(sys.argv[0]).stem or "script")
        if rank == 0:
            run = Run.create(out, command=list(getattr(sys, "orig_argv", sys.argv)), world_size=world)
        options = ProbeOptions(
            collect=parse_collect(collect),
            profile_steps=profile_steps,
            nvml_hz=nvml_hz,
            memory_history=memory_history,
        )
        import perfkit.collectors.registry  # noqa: F401 - registers the collectors

        if "comms" in options.collect:
            from perfkit.collectors.comms import patch_all

            patch_all()
        probe = Probe(Path(out), rank, world, local, options)
    probe.set_manual()
    probe.start()
    outcome = "failed"
    try:
        yield probe
        outcome = "complete"
    except KeyboardInterrupt:
        outcome = "interrupted"
        raise
    finally:
        probe.stop(outcome)
        if run is not None:
            run.manifest.collectors = {}
            run.finish(outcome, 0 if outcome == "complete" else 1)  # type: ignore[arg-type]


def step(tokens: int | None = None, loss: Any = None) -> None:
    """End the current step (tokens this rank processed, the loss as a float or tensor)."""
    probe = Probe.current
    if probe is not None:
        probe.set_manual()
        probe.end_step(tokens=tokens, loss=loss)


def phase(name: str) -> contextlib.AbstractContextManager[None]:
    """Time a phase of the step: data_wait, forward, backward, optimizer, or a name of your own."""
    probe = Probe.current
    if probe is None or probe._stopped:
        return contextlib.nullcontext()
    probe.set_manual()
    return probe.phase(name)
