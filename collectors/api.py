"""The public API for scripts that mark their own steps::

    import perfkit
    with perfkit.profile("runs/mine", profile_steps=(5, 7)):
        for batch in loader:
            with perfkit.phase("forward"):
                loss = model(batch)
            ...
            perfkit.step(tokens=batch.numel(), loss=loss)

A step runs from the previous ``step()`` (or the start of profiling) to the next ``step()``.
Under ``perfkit profile`` the run directory and options come from the command line instead and
``out`` and the options are ignored. ``attach()`` is for code that should be profiled only when
run under ``perfkit profile`` (the bundled trainer): it does nothing otherwise.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from perfkit.collectors.options import CollectOptions, watching
from perfkit.collectors.probe import Probe, probe_from_env, rank_from_env

from perfkit.errors import ConfigError


def _patch_comms(options: CollectOptions) -> None:
    if "comms" in options.collect:
        from perfkit.collectors.collectives import patch_all

        patch_all()


@contextlib.contextmanager
def _session(probe: Probe, start_step: int, run: Any = None) -> Iterator[Probe]:
    """Start the probe and the first step; at the end stop it with the outcome, and finish ``run``
    (the run directory this process made, if any) with it."""
    probe.set_manual()
    probe.start()
    if probe.step < start_step:
        probe.step = start_step  # a resumed run numbers its steps on from the checkpoint
    probe.begin_step()
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
            run.merge_rank_reports()
            run.finish(outcome, 0 if outcome == "complete" else 1)


@contextlib.contextmanager
def profile(out: str | Path | None = None, *, start_step: int = 0, **options: Any) -> Iterator[Probe]:
    """Collect this rank's steps, collectives, memory, I/O and NVML samples into a run directory.
    ``options`` are the fields of ``CollectOptions`` (collect="steps,comms", profile_steps=(5, 7), ...)."""
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
        if isinstance(options.get("collect"), str):
            options["collect"] = CollectOptions.from_text({"collect": options["collect"]}).collect
        try:
            opts = CollectOptions(**watching(options))
        except TypeError as e:
            raise ConfigError(
                f"perfkit.profile(): {e}; the options are {', '.join(CollectOptions.__annotations__)}"
            ) from None
        if rank == 0:
            run = Run.create(
                out,
                command=list(getattr(sys, "orig_argv", sys.argv)),
                world_size=world,
                rank_folders_ok=world > 1,
            )
        _patch_comms(opts)
        probe = Probe(Path(out), rank, world, local, opts)
    with _session(probe, start_step, run):
        yield probe


@contextlib.contextmanager
def attach(start_step: int = 0) -> Iterator[Probe | None]:
    """Profile this process if it runs under ``perfkit profile``; otherwise do nothing."""
    probe = probe_from_env()
    if probe is None:
        yield None
        return
    with _session(probe, start_step):
        yield probe


def step(tokens: int | None = None, loss: Any = None) -> None:
    """End the current step (tokens this rank processed, the loss as a float or tensor) and begin
    the next one."""
    probe = Probe.current
    if probe is not None and not probe._stopped:
        probe.set_manual()
        if probe.step == 0 and not probe._in_step:
            # Nothing began a step before (no perfkit.profile() or attach(), no hook fired): this
            # call has no start to measure from, so it begins the first step instead of recording
            # a step of no length.
            probe.begin_step()
            return
        probe.end_step(tokens=tokens, loss=loss)
        probe.begin_step()


def probe_links(group: Any = None) -> bool:
    """At the end of training, on every rank: all-reduce a few message sizes with nothing else
    running, so the analysis knows the link's latency and bandwidth (``perfkit whatif`` and the
    sweep's predictions fit their collectives to it). Does nothing unless the comms collector runs,
    or under ``perfkit profile --no-probe``."""
    if Probe.current is None or Probe.current._stopped or Probe.current.options.no_probe:
        return False
    from perfkit.collectors.collectives import probe_links as _probe_links

    return _probe_links(group)


def probing() -> contextlib.AbstractContextManager[None]:
    """Collectives inside are the workload measuring itself after its steps (the bundled trainer
    timing what other layouts would cost here): recorded with source "probe-costs", which the
    analysis keeps out of the job's collectives as it does the link probe's."""
    if Probe.current is None or Probe.current._stopped:
        return contextlib.nullcontext()
    from perfkit.collectors.collectives import probe_source

    return probe_source("probe-costs")


def phase(name: str) -> contextlib.AbstractContextManager[None]:
    """Time a phase of the step: data_wait, forward, backward, optimizer, or a name of your own."""
    probe = Probe.current
    if probe is None or probe._stopped:
        return contextlib.nullcontext()
    probe.set_manual()
    return probe.phase(name)


def describe(**facts: Any) -> None:
    """Tell the analysis what it cannot see in a trace: ``flops_per_token`` (for MFU), ``parameters``,
    ``layout`` ({"dp": 2, "tp": 1, "pp": 1}: tokens are counted once per data-parallel replica)."""
    probe = Probe.current
    if probe is not None:
        probe.describe(**facts)
