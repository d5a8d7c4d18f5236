"""The ``perfkit`` command. Thin: parse, build a config, call the library.

Nothing here imports torch at module level, so ``perfkit --help`` starts in a fraction of a second.
Errors a user can cause reach them as one line and an exit code, never a traceback.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from perfkit import __version__
from perfkit.errors import PerfkitError
from perfkit.progress import Progress

if TYPE_CHECKING:
    from perfkit.analyzers.analyze import Analysis

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class FiniteRange(click.FloatRange):
    """click.FloatRange that refuses NaN and the infinities (``--fail-above nan`` would switch a
    CI gate off: every comparison with NaN is false)."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        result = super().convert(value, param, ctx)
        if not math.isfinite(result):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return result


class ByteSize(click.ParamType):
    """A size in bytes: 40GiB, 512MiB, 2.5GB or a plain number of bytes."""

    name = "size"
    _UNITS = {
        "": 1,
        "b": 1,
        "kb": 1e3,
        "mb": 1e6,
        "gb": 1e9,
        "tb": 1e12,
        "kib": 2**10,
        "mib": 2**20,
        "gib": 2**30,
        "tib": 2**40,
    }

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, float):
            return value
        text = str(value).strip().lower().replace(" ", "")
        number = text.rstrip("abcdefghijklmnopqrstuvwxyz")
        unit = text[len(number) :]
        try:
            size = float(number) * self._UNITS[unit]
        except (ValueError, KeyError):
            self.fail(f"{value!r} is not a size; write e.g. 40GiB, 512MiB or 2.5GB", param, ctx)
        if not math.isfinite(size) or size <= 0:
            self.fail(f"{value!r} must be a positive size", param, ctx)
        return size


class _Group(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except PerfkitError as e:
            click.echo(f"Error: {e}", err=True)
            ctx.exit(e.exit_code)
        except BrokenPipeError:  # perfkit ... | head: the reader has what it wanted
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            ctx.exit(1)
        except OSError as e:  # a place perfkit cannot write or read: what and where, never a traceback
            click.echo(f"Error: {os_error_line(e)}", err=True)
            ctx.exit(1)


def os_error_line(e: OSError) -> str:
    """One line for a failed file operation: what failed, on which path, and what to do."""
    where = f" ({e.filename})" if e.filename else ""
    what = e.strerror or str(e)
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"{what}{where}: the disk is full; free space or write elsewhere with --out"
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"{what}{where}: choose a place you can write with --out"
    if e.errno in (errno.ENOTDIR, errno.EEXIST, errno.EISDIR):
        return f"{what}{where}: a file or folder is in the way; choose another path"
    return f"{what}{where}"


@click.group(cls=_Group, context_settings=CONTEXT)
@click.version_option(__version__, "-V", "--version", prog_name="perfkit")
def cli() -> None:
    """perfkit: why is this distributed training run slower than it should be, and what to change.

    \b
    Start here:   perfkit demo            (profile the bundled trainer, print where output is)
    Train:        perfkit train --nproc 2 --config tiny-cpu --set parallel.tp=2
    """


def config_options() -> Any:
    """--config, --set and --nproc, as every command that runs the bundled trainer takes them."""
    options = [
        click.option(
            "--config",
            "config_name",
            default="tiny-cpu",
            show_default=True,
            help="A shipped config (tiny-cpu, gpt2-small-gpu) or a TOML file.",
        ),
        click.option(
            "--set",
            "overrides",
            multiple=True,
            metavar="KEY=VALUE",
            help="Override a config key, e.g. --set parallel.tp=2 (repeatable).",
        ),
        click.option(
            "--nproc",
            type=click.IntRange(min=1),
            default=2,
            show_default=True,
            help="Ranks to start on this node (one GPU each on GPU).",
        ),
    ]

    def decorate(f: Any) -> Any:
        for option in reversed(options):
            f = option(f)
        return f

    return decorate


def collect_options() -> Any:
    """The collectors' options (perfkit.collectors.options.CollectOptions), one click option each,
    passed on as text for CollectOptions.from_text to parse."""
    from perfkit.collectors.options import cli_fields

    def decorate(f: Any) -> Any:
        for name, flag, help, default, metavar in reversed(cli_fields()):
            if metavar == "FLAG":
                f = click.option(flag, name, flag_value="1", default=None, help=help)(f)
                continue
            f = click.option(flag, name, default=None, metavar=metavar, help=f"{help}  [default: {default}]")(
                f
            )
        return f

    return decorate


@cli.command(context_settings=CONTEXT)
@config_options()
@click.option(
    "--log-json",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Append one JSON object per logged step (step, loss, tokens, step_time_s, ...).",
)
def train(config_name: str, overrides: tuple[str, ...], nproc: int, log_json: Path | None) -> None:
    """Train the bundled reference GPT under torchrun (gloo on CPU, NCCL on GPU).

    The configuration is checked before any process starts; an invalid one exits 2 with the fix.
    """
    from perfkit.launch import check_devices, run_command, trainer_command
    from perfkit.trainer.config import load_config, resolve_layout

    cfg = load_config(config_name, overrides)
    resolve_layout(cfg, nproc)
    check_devices(cfg, nproc)
    sys.exit(run_command(trainer_command(nproc, config_name, overrides, log_json), nproc))


_PROFILE_HELP = """Run a training command with collectors attached; write a run directory.

\b
COMMAND is the bundled trainer or any command, after --:
  perfkit profile                                   the trainer, tiny-cpu, 2 ranks
  perfkit profile --nproc 4 -- reference --config tiny-cpu --set parallel.tp=2
  perfkit profile --set parallel.tp=2          (the same: the bundled trainer, changed)
  perfkit profile -- python train.py --lr 3e-4
  perfkit profile -- torchrun --nproc_per_node 4 train.py

An unmodified script needs no change: each rank process attaches the collectors itself and finds
its steps from optimizer-step hooks. Exits with the command's exit code.
"""


@cli.command(
    help=_PROFILE_HELP,
    short_help="Run a training command with collectors attached; write a run directory.",
    context_settings={**CONTEXT, "ignore_unknown_options": True, "allow_interspersed_args": False},
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    help="Run directory (default runs/<time>-<name>).",
)
@click.option("--name", help="Run name (default: the script's or config's name).")
@collect_options()
@click.option(
    "--nproc", type=click.IntRange(min=1), default=2, show_default=True, help="Ranks for the bundled trainer."
)
@click.option("--config", "config_name", help="The bundled trainer's config (as perfkit train takes it).")
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="Change the bundled trainer's config, e.g. --set parallel.tp=2 (repeatable).",
)
@click.option("--report", "with_report", is_flag=True, help="Then analyze the run and write its HTML report.")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def profile(
    out: Path | None,
    name: str | None,
    nproc: int,
    config_name: str | None,
    overrides: tuple[str, ...],
    with_report: bool,
    command: tuple[str, ...],
    **collect: str | None,
) -> None:
    from perfkit.collectors.options import CollectOptions
    from perfkit.profile import ProfileRequest, reference_request
    from perfkit.run import default_run_path

    argv = list(command) or ["reference"]
    if argv[0].startswith("-"):
        raise click.UsageError(
            f"no such option: {argv[0]}; the command to profile goes after -- (perfkit profile -- python "
            "train.py), the bundled trainer's --config and --set may go right here"
        )
    if (config_name or overrides) and argv[0] != "reference":
        raise click.UsageError(
            "--config and --set change the bundled trainer; pass your own script's options after -- instead"
        )
    options = CollectOptions.from_text(collect)
    if argv[0] == "reference":
        inner_config, inner = _reference_args(argv[1:])
        config_name, overrides = config_name or inner_config, (*overrides, *inner)
        name = name or Path(config_name).stem
        req = reference_request(config_name, overrides, nproc, out or default_run_path(name), name, options)
    else:
        name = name or Path(next((a for a in argv if a.endswith(".py")), argv[0])).stem
        req = ProfileRequest(command=argv, out=out or default_run_path(name), name=name, options=options)
    rc = _run_and_summarize(req, next_step=not with_report)
    if with_report:
        _analyze_and_report(req.out)
    sys.exit(rc)


def _reference_args(args: list[str]) -> tuple[str, tuple[str, ...]]:
    """--config and --set of ``perfkit profile -- reference ...``, read as the trainer reads them."""
    from perfkit.trainer.cli import main as trainer_main

    with trainer_main.make_context("reference", list(args)) as ctx:
        return ctx.params["config_name"], ctx.params["overrides"]


def _run_and_summarize(req: Any, next_step: bool = True) -> int:
    from perfkit.profile import check_command, run_profile
    from perfkit.reports.text import command_line, profile_summary

    check_command(req.command)
    click.echo(f"perfkit: profiling {command_line(req.command)}", err=True)
    click.echo(f"perfkit: run directory {req.out}", err=True)
    run, rc = run_profile(req)
    click.echo(profile_summary(run, rc, next_step))
    return rc


@cli.command(context_settings=CONTEXT)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    help="Run directory (default runs/<time>-demo).",
)
@click.option("--nproc", type=click.IntRange(min=1), default=2, show_default=True, help="Ranks to start.")
def demo(out: Path | None, nproc: int) -> None:
    """The main job on its embedded default: profile the bundled trainer (tiny-cpu) on NPROC CPU
    ranks with every collector, and print where everything is."""
    from perfkit.profile import reference_request
    from perfkit.run import default_run_path

    target = out or default_run_path("demo")
    req = reference_request("tiny-cpu", [], nproc, target, "demo")
    rc = _run_and_summarize(req, next_step=False)
    _analyze_and_report(target)
    sys.exit(rc)


def _analyze_and_report(run: Path) -> None:
    """analysis.json and report/index.html for a finished run, with the summary and the path."""
    from perfkit.reports.publish import publish
    from perfkit.reports.text import analysis_summary

    click.echo("")
    done = publish(run)
    click.echo(analysis_summary(done.analysis, done.json_path or run))
    click.echo(
        f"report: {done.report_path.resolve() if done.report_path else '-'}  (open it in a browser; it works offline)"
    )


@cli.command(context_settings=CONTEXT)
@click.argument("source", type=click.Path(path_type=Path))
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder for analysis.json (default: beside the input; required when it is read-only).",
)
@click.option("--json", "as_json", is_flag=True, help="Print analysis.json to stdout instead of the summary.")
@click.option("--peak-tflops", type=FiniteRange(min=0.001), help="Peak TFLOP/s per GPU for MFU.")
@click.option(
    "--jobs", type=click.IntRange(min=1), help="Processes that parse traces (default: one per core)."
)
@click.option(
    "--scheduler",
    metavar="tcp://HOST:PORT",
    help="Parse the traces on this Dask cluster's workers (traces on a shared filesystem; "
    "pip install 'perfkit[dask]').",
)
@click.option("--report", "with_report", is_flag=True, help="Also write the HTML report (report/index.html).")
def analyze(
    source: Path,
    out: Path | None,
    as_json: bool,
    peak_tflops: float | None,
    jobs: int | None,
    scheduler: str | None,
    with_report: bool,
) -> None:
    """Find why a run is slow: metrics and ranked findings for a run directory, one Kineto trace,
    or a folder of per-rank traces. Writes analysis.json."""
    import json as jsonlib

    from perfkit.reports.publish import publish
    from perfkit.reports.text import analysis_summary

    done = publish(
        source, out=out, report=with_report, peak_tflops=peak_tflops, jobs=jobs, scheduler=scheduler
    )
    assert done.json_path is not None
    if as_json:
        click.echo(jsonlib.dumps(done.analysis.to_json(), indent=1))
    else:
        click.echo(analysis_summary(done.analysis, done.json_path))
    if done.report_path is not None:
        click.echo(f"report: {done.report_path}", err=as_json)


@cli.command(context_settings=CONTEXT)
@click.argument("run", type=click.Path(path_type=Path))
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="HTML file to write (default RUN/report/index.html).",
)
def report(run: Path, out: Path | None) -> None:
    """Write a self-contained HTML report (opens offline from file://) for a run directory, a
    trace or a folder of traces, and print its path."""
    from perfkit.reports.publish import publish

    click.echo(publish(run, write_json=False, report=out or True).report_path)


@cli.command(context_settings=CONTEXT)
@click.argument("run_a", type=click.Path(path_type=Path))
@click.argument("run_b", type=click.Path(path_type=Path))
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Comparison page to write (default RUN_B/report/compare.html when B is a run directory; "
    "for traces, none unless given).",
)
@click.option(
    "--fail-above",
    type=FiniteRange(min=0),
    metavar="PCT",
    help="Exit 1 when B's median step time is more than PCT percent above A's.",
)
def compare(run_a: Path, run_b: Path, out: Path | None, fail_above: float | None) -> None:
    """Compare run B against run A (runs or traces): metric deltas, findings that appeared or went
    away. With --fail-above it gates CI on step-time regressions."""
    from perfkit.analyzers.analyze import analyze
    from perfkit.analyzers.analyze import compare as compare_runs
    from perfkit.reports.compare import write
    from perfkit.reports.text import comparison_summary

    c = compare_runs(analyze(run_a), analyze(run_b))
    click.echo(comparison_summary(c))
    if out is None and c.b.layout.is_run():  # perfkit made that folder: its report/ is ours to write
        out = c.b.layout.compare_page
    if out is not None:
        click.echo(f"wrote {write(c, out)}")
    else:  # never write beside a trace perfkit did not make
        click.echo("no page written for traces: pass --out FILE.html to write the comparison page")
    change = c.step_change
    if fail_above is not None:
        broken = _not_comparable(c.a, "A") or _not_comparable(c.b, "B")
        if broken:  # a gate must not pass a run that failed or lost ranks: its steps say nothing
            raise click.ClickException(broken)
        if change is None:
            raise click.ClickException(
                "no step times to compare (run perfkit profile with the steps collector)"
            )
        if change * 100 > fail_above:
            raise click.ClickException(
                f"step time regressed {change:+.1%} (B vs A), more than --fail-above {fail_above:g}%"
            )


def _not_comparable(a: Analysis, which: str) -> str:
    """Why a run cannot pass a CI gate ('' when it can): it did not complete, or ranks are missing."""
    run = a.metrics.run
    if run is not None and run.status != "complete":
        return f"run {which} ({a.source}) is {run.status}, not complete: its step times gate nothing"
    if run is not None and run.world_size and len(a.ranks) < run.world_size:
        return (
            f"run {which} ({a.source}) has {len(a.ranks)} of its {run.world_size} ranks: its step times gate "
            "nothing"
        )
    return ""


@cli.command(context_settings=CONTEXT)
@click.argument("run", type=click.Path(path_type=Path))
@click.option("--once", is_flag=True, help="Print the view once and exit (no live display).")
@click.option(
    "--interval", type=FiniteRange(min=0.2), default=1.0, show_default=True, help="Seconds between refreshes."
)
def top(run: Path, once: bool, interval: float) -> None:
    """A running job's ranks, step time, phases, memory and anomalies, refreshed from its run
    directory (a job profiled with --watch shows its watcher's view; any other, what its tables say).
    Ctrl-C leaves."""
    from perfkit.run import RunLayout
    from perfkit.watch import TopView

    if not RunLayout(run).is_run():
        raise click.UsageError(
            f"{run} is not a run directory (no manifest.json); give the one perfkit profile printed"
        )
    view = TopView(run)
    if once:
        from rich.console import Console

        Console().print(view.render())
        return
    from rich.live import Live

    with contextlib.suppress(KeyboardInterrupt), Live(view.render(), refresh_per_second=4) as live:
        while True:
            time.sleep(interval)
            live.update(view.render())


@cli.command(context_settings=CONTEXT)
@click.argument("run", type=click.Path(path_type=Path))
@click.option(
    "--steps", type=click.IntRange(min=1, max=1000), default=5, show_default=True, help="Steps to trace."
)
def capture(run: Path, steps: int) -> None:
    """Ask a running job (perfkit profile --watch) for a trace of its next STEPS steps on every rank;
    the watcher diagnoses it against the job's baseline capture."""
    from perfkit.watch import capture_now

    cid, first = capture_now(run, steps)
    click.echo(f"perfkit: capture {cid} requested: steps {first}-{first + steps - 1} on every rank")
    click.echo(f"  traces: {run}/rank<N>/captures/{cid}.json.gz; its diagnosis: perfkit analyze {run}")


@cli.command("watch", context_settings=CONTEXT)
@click.argument("run", type=click.Path(path_type=Path))
@click.option(
    "--interval", type=FiniteRange(min=0.2), default=1.0, show_default=True, help="Seconds between looks."
)
def watch_command(run: Path, interval: float) -> None:
    """Watch a job that perfkit profile did not start (the script calls perfkit.profile(out=RUN,
    watch=True) under its own launcher): judge its windows, name anomalies as they start, ask its
    ranks for captures, until it ends. A job started with perfkit profile --watch has its own."""
    from perfkit.watch import follow

    found = follow(run, interval, sys.stderr)
    click.echo(f"perfkit watch: the job ended; {found} anomaly(ies). next: perfkit analyze {run}")


@cli.command("export-trace", context_settings=CONTEXT)
@click.argument("run", type=click.Path(path_type=Path))
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="File to write (default RUN/trace/merged.json.gz; .json for uncompressed).",
)
def export_trace(run: Path, out: Path | None) -> None:
    """Write one trace of all ranks (each rank its own process track, with perfkit's steps, phases
    and collectives as extra tracks) that opens in Perfetto (ui.perfetto.dev) and chrome://tracing."""
    from perfkit.reports.perfetto import write_merged
    from perfkit.run import Run

    r = Run.open(run)
    target = out or r.layout.merged_trace
    writable = next((p for p in [target.parent, *target.parent.parents] if p.exists()), Path("."))
    if not os.access(writable, os.W_OK):
        raise PerfkitError(
            f"{target.parent} is not writable; pass --out FILE to write the merged trace elsewhere"
        )
    path, notes = write_merged(r, target)
    for n in notes:
        click.echo(f"skipped: {n}", err=True)
    click.echo(path)


@contextlib.contextmanager
def _partial_on_interrupt(results: Path) -> Iterator[None]:
    """Ctrl-C: one line saying where what was measured so far is kept; exit 130."""
    try:
        yield
    except KeyboardInterrupt:
        kept = f"what was measured so far is in {results}" if results.exists() else "nothing was measured yet"
        click.echo(f"perfkit: interrupted; {kept}", err=True)
        sys.exit(130)


@cli.command(context_settings=CONTEXT)
@config_options()
@click.option(
    "--layout",
    "layouts",
    multiple=True,
    metavar="SPEC",
    help="A layout to measure, e.g. tp=2 or pp=2,zero=3 or zero=3,kernels.compile=true (repeatable; "
    "default: every pp x tp x dp split, DDP and FSDP2).",
)
@click.option("--steps", type=click.IntRange(min=2), default=20, show_default=True, help="Steps per run.")
@click.option("--repeats", type=click.IntRange(min=1), default=2, show_default=True, help="Runs per layout.")
@click.option(
    "--basis",
    type=click.Path(path_type=Path),
    help="A profiled run of the trainer to predict from (default: profile the first layout).",
)
@click.option(
    "--top",
    type=click.IntRange(min=1),
    help="Successive halving: short runs for every layout, the faster half again for twice the steps, "
    "until TOP are left for the full runs (default: every layout runs in full).",
)
@click.option(
    "--memory-limit",
    type=ByteSize(),
    metavar="SIZE",
    help="Per-rank memory a layout must be predicted to fit, e.g. 40GiB (default: the GPU's, or the "
    "host's shared by the ranks).",
)
@click.option("--no-predict", is_flag=True, help="Measure every layout without a basis run or predictions.")
@click.option(
    "--nnodes",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Nodes (run the same command on each).",
)
@click.option(
    "--rdzv-endpoint", metavar="HOST:PORT", default="", help="torchrun's rendezvous for --nnodes > 1."
)
@click.option(
    "--out", type=click.Path(file_okay=False, path_type=Path), help="Folder (default runs/<time>-sweep)."
)
def sweep(
    config_name: str,
    overrides: tuple[str, ...],
    nproc: int,
    layouts: tuple[str, ...],
    steps: int,
    repeats: int,
    basis: Path | None,
    top: int | None,
    memory_limit: float | None,
    no_predict: bool,
    nnodes: int,
    rdzv_endpoint: str,
    out: Path | None,
) -> None:
    """Predict, then benchmark the reference trainer over parallel layouts, side by side.

    One profiled run (--basis, or the first layout) predicts each layout's step time and peak
    memory; layouts predicted not to fit are listed, not run; the rest run fastest-predicted first,
    as plain runs (no collectors) interleaved round-robin so a shared machine's drift falls on every
    layout alike. Writes sweep.json (a ledger: the same command in the same --out measures nothing
    twice) and sweep.html, with predicted beside measured.
    """
    from perfkit.errors import ConfigError
    from perfkit.launch import Nodes
    from perfkit.optimizer.sweep import run_sweep
    from perfkit.reports.text import sweep_summary
    from perfkit.run import StudyLayout, default_run_path

    if nnodes > 1 and not rdzv_endpoint:
        raise ConfigError("--nnodes > 1 needs --rdzv-endpoint HOST:PORT, an address every node reaches")
    folder = out or default_run_path("sweep")
    study = StudyLayout(folder, "sweep")
    with _partial_on_interrupt(study.results), Progress() as progress:
        result = run_sweep(
            config_name,
            nproc,
            [*overrides, f"steps={steps}"],
            layouts,
            repeats,
            folder,
            progress=progress,
            basis_run=basis,
            top=top,
            memory_limit=memory_limit,
            nodes=Nodes(nnodes, rdzv_endpoint),
            predict=not no_predict,
        )
    click.echo(sweep_summary(result.to_json(), steps))
    click.echo(f"wrote {study.results}")
    click.echo(f"report: {study.page.resolve()}")


@cli.command(context_settings=CONTEXT)
@click.argument("run", type=click.Path(path_type=Path))
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="A change to the run's configuration, e.g. --set parallel.tp=2 (repeatable).",
)
@click.option("--nproc", type=click.IntRange(min=1), help="Ranks for the change (default: the run's).")
@click.option(
    "--speedup",
    "speedups",
    multiple=True,
    metavar="FAMILY=K",
    help="Kernels (ops) of a family run K times faster, replayed on the traces' critical paths: gemm, "
    "attention, elementwise, normalization, softmax, optimizer, memory, communication, host, or a piece of "
    "a kernel's or op's name (repeatable).",
)
@click.option(
    "--link-bandwidth",
    "link",
    metavar="Nx",
    help="Collectives transfer N times faster, replayed on the traces' critical paths.",
)
def whatif(
    run: Path, overrides: tuple[str, ...], nproc: int | None, speedups: tuple[str, ...], link: str | None
) -> None:
    """Predict a change's step time (and, for a layout, peak memory) from a profiled run, without
    running it.

    With --set: RUN is a profiled run of the reference trainer, and each --set changes its
    configuration (the layout, microbatches, ZeRO stage, checkpointing, precision, ...), predicted
    by the layout model, and where RUN has kernel traces, replayed on its traced steps too. With --speedup or --link-bandwidth: RUN is any profiled run (or trace) with
    kernel traces of 2 steps or more, and the change is replayed on each step's critical path.
    """
    if speedups or link:
        from perfkit.errors import ConfigError
        from perfkit.optimizer.replay import parse_change, replay, replay_lines

        if overrides or nproc:
            raise ConfigError(
                "--speedup and --link-bandwidth replay the run's own traces; ask --set (and --nproc) of the "
                "layout model in a separate perfkit whatif"
            )
        for line in replay_lines(replay(run, parse_change(speedups, link))):
            click.echo(line)
        return
    from perfkit.errors import RunDirError
    from perfkit.optimizer.layoutmodel import basis_from_run, whatif_lines
    from perfkit.optimizer.replay import LayoutReplay

    basis = basis_from_run(run)
    try:
        replayer: Any = LayoutReplay.of(basis).predict
    except RunDirError as e:
        replayer = str(e)
    for line in whatif_lines(basis, list(overrides), nproc or basis.world_size, replayer):
        click.echo(line)


@cli.command(context_settings=CONTEXT)
@click.argument("run", required=False, type=click.Path(path_type=Path))
@config_options()
@click.option(
    "--steps", type=click.IntRange(min=2), default=30, show_default=True, help="Steps per timing run."
)
@click.option(
    "--repeats", type=click.IntRange(min=1), default=3, show_default=True, help="Run pairs per trial."
)
@click.option(
    "--min-gain",
    type=FiniteRange(min=0, max=90),
    default=3.0,
    show_default=True,
    help="Percent a change must save to be kept.",
)
@click.option(
    "--max-trials",
    type=click.IntRange(min=1),
    default=8,
    show_default=True,
    help="Remedies to try, all rounds.",
)
@click.option(
    "--max-repeats",
    type=click.IntRange(min=2),
    help="Most run pairs per trial while its interval straddles the bar (default 4 x --repeats; at least 2: "
    "one pair gives no interval to decide by).",
)
@click.option(
    "--max-rounds", type=click.IntRange(min=1), default=4, show_default=True, help="Profile-and-try rounds."
)
@click.option(
    "--budget",
    type=FiniteRange(min=0.1),
    metavar="MINUTES",
    help="Start no run of a trial after this long (the final side-by-side runs and profile follow).",
)
@click.option("--no-verify", is_flag=True, help="Skip the final profiled run of the optimized configuration.")
@click.option(
    "--out", type=click.Path(file_okay=False, path_type=Path), help="Folder (default runs/<time>-optimize)."
)
def optimize(
    run: Path | None,
    config_name: str,
    overrides: tuple[str, ...],
    nproc: int,
    steps: int,
    repeats: int,
    min_gain: float,
    max_trials: int,
    max_repeats: int | None,
    max_rounds: int,
    budget: float | None,
    no_verify: bool,
    out: Path | None,
) -> None:
    """Apply the fixes of a run's findings to the reference trainer; keep what measurably helps.

    \b
    perfkit optimize                         profile tiny-cpu on 2 ranks, then tune it
    perfkit optimize runs/<time>-tiny-cpu    start from a profiled run of the trainer

    Every remedy's own change is screened against the configuration so far in one group of
    interleaved plain runs; it passes only if the 95% interval of its step-time ratio is wholly past
    --min-gain and the loss is not worse. What passed runs together and is kept when no slower than
    the best alone; the new configuration is profiled again, and its findings make the next round.
    With the budget left, the second-order choices (other bucket sizes, optimizer implementations)
    are refined last. Each phase's plan and minutes are printed first; --budget is a hard limit.
    Writes optimize.json and optimize.html.
    """
    from perfkit.optimizer.optimize import run_optimize
    from perfkit.reports.text import optimize_summary
    from perfkit.run import StudyLayout, default_run_path

    folder = out or default_run_path("optimize")
    study = StudyLayout(folder, "optimize")
    with _partial_on_interrupt(study.results), Progress() as progress:
        opt = run_optimize(
            config=config_name,
            nproc=nproc,
            overrides=overrides,
            out=folder,
            run=run,
            steps=steps,
            repeats=repeats,
            min_gain=min_gain / 100,
            max_trials=max_trials,
            max_repeats=max_repeats,
            max_rounds=max_rounds,
            budget_s=budget * 60 if budget else None,
            verify=not no_verify,
            progress=progress,
        )
    click.echo(optimize_summary(opt.to_json()))
    click.echo(f"wrote {study.results}")
    click.echo(f"report: {study.page.resolve()}")


def main() -> None:
    cli(prog_name="perfkit")
