"""The ``perfkit`` command. Thin: parse, build a config, call the library.

Nothing here imports torch at module level, so ``perfkit --help`` starts in a fraction of a second.
Errors a user can cause reach them as one line and an exit code, never a traceback.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from perfkit import __version__
from perfkit.errors import PerfkitError

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class _Group(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except PerfkitError as e:
            click.echo(f"Error: {e}", err=True)
            ctx.exit(e.exit_code)


@click.group(cls=_Group, context_settings=CONTEXT)
@click.version_option(__version__, "-V", "--version", prog_name="perfkit")
def cli() -> None:
    """perfkit: why is this distributed training run slower than it should be, and what to change.

    \b
    Start here:   perfkit demo            (profile the bundled trainer, print where output is)
    Train:        perfkit train --nproc 2 --config tiny-cpu --set parallel.tp=2
    """


def config_options(nproc_default: int = 1) -> Any:
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
            default=nproc_default,
            show_default=True,
            help="Ranks to start on this node (one GPU each on GPU).",
        ),
    ]

    def decorate(f: Any) -> Any:
        for option in reversed(options):
            f = option(f)
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
@click.option(
    "--collect",
    default="all",
    show_default=True,
    help="Collectors: steps,kernels,comms,memory,io,nvml or all.",
)
@click.option(
    "--profile-steps", default="5-7", show_default=True, help="Kernel-trace window (1-based steps), or none."
)
@click.option(
    "--nvml-hz",
    type=click.FloatRange(min=0.1, max=1000),
    default=10.0,
    show_default=True,
    help="NVML samples per second.",
)
@click.option(
    "--memory-history", default=None, help="Record a CUDA allocator history over these steps, e.g. 3-4."
)
@click.option(
    "--memory-history-entries",
    type=click.IntRange(min=1),
    default=100_000,
    show_default=True,
    help="Cap on allocator history entries.",
)
@click.option(
    "--nproc", type=click.IntRange(min=1), default=2, show_default=True, help="Ranks for the bundled trainer."
)
@click.option("--report", "with_report", is_flag=True, help="Then analyze the run and write its HTML report.")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def profile(
    out: Path | None,
    name: str | None,
    collect: str,
    profile_steps: str,
    nvml_hz: float,
    memory_history: str | None,
    memory_history_entries: int,
    nproc: int,
    with_report: bool,
    command: tuple[str, ...],
) -> None:
    from perfkit.collectors.base import parse_collect
    from perfkit.profile import ProfileRequest, parse_window, reference_request
    from perfkit.run import default_run_path

    argv = list(command) or ["reference"]
    options: dict[str, Any] = {
        "collect": parse_collect(collect),
        "profile_steps": None if profile_steps == "none" else parse_window(profile_steps, "--profile-steps"),
        "nvml_hz": nvml_hz,
        "memory_history": parse_window(memory_history, "--memory-history"),
        "memory_history_entries": memory_history_entries,
    }
    if argv[0] == "reference":
        config_name, overrides = _reference_args(argv[1:])
        name = name or Path(config_name).stem
        req = reference_request(config_name, overrides, nproc, out or default_run_path(name), name, **options)
    else:
        name = name or Path(next((a for a in argv if a.endswith(".py")), argv[0])).stem
        req = ProfileRequest(command=argv, out=out or default_run_path(name), name=name, **options)
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
    from perfkit.tables import STEPS, TABLES, read_table

    check_command(req.command)
    click.echo(f"perfkit: profiling {' '.join(req.command)}", err=True)
    click.echo(f"perfkit: run directory {req.out}", err=True)
    run, rc = run_profile(req)
    m = run.manifest
    click.echo("")
    click.echo(f"run directory:  {run.path}  (status {m.status}, exit code {rc}, {m.world_size} rank(s))")
    for rank in run.ranks():
        d = run.path / f"rank{rank}"
        counts = []
        for table in TABLES.values():
            files = [table.file(d), *d.glob(f"{table.name}.w*.jsonl")]
            n = sum(f.read_bytes().count(b"\n") for f in files if f.exists())
            if n:
                counts.append(f"{table.name} {n}")
        if (d / "trace.json.gz").exists():
            counts.append(f"trace.json.gz {(d / 'trace.json.gz').stat().st_size / 1e6:.1f} MB")
        click.echo(f"  rank{rank}/  " + (", ".join(counts) or "no data"))
    shares = []
    for rank in run.ranks():
        path = STEPS.file(run.path / f"rank{rank}")
        if path.exists():
            steps, _ = read_table(path, STEPS)
            if "perfkit_s" in steps and steps["perfkit_s"].notna().any():
                shares.append(float((steps["perfkit_s"] / steps["step_time_s"]).median()))
    if shares:
        click.echo(
            f"  perfkit's own CPU time: {max(shares):.2%} of the median step (busiest rank; trace export aside)"
        )
    for cname, state in sorted(m.collectors.items()):
        if state.status != "ok":
            click.echo(f"  collector {cname}: {state.status} ({state.reason})")
    if next_step:
        click.echo(f"next: perfkit analyze {run.path}")
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
    from perfkit.analyzers.analyze import analyze as run_analysis
    from perfkit.reports.html import write_report
    from perfkit.run import write_json_atomic

    click.echo("")
    result = run_analysis(run)
    write_json_atomic(run / "analysis.json", result.to_json())
    click.echo(_analysis_summary(result, run / "analysis.json"))
    page = write_report(result, run / "report" / "index.html")
    click.echo(f"report: {page.resolve()}  (open it in a browser; it works offline)")


@cli.command(context_settings=CONTEXT)
@click.argument("source", type=click.Path(path_type=Path))
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder for analysis.json (default: beside the input; required when it is read-only).",
)
@click.option("--json", "as_json", is_flag=True, help="Print analysis.json to stdout instead of the summary.")
@click.option("--peak-tflops", type=click.FloatRange(min=0.001), help="Peak TFLOP/s per GPU for MFU.")
@click.option(
    "--jobs", type=click.IntRange(min=1), help="Processes that parse traces (default: one per core)."
)
@click.option("--report", "with_report", is_flag=True, help="Also write the HTML report (report/index.html).")
def analyze(
    source: Path,
    out: Path | None,
    as_json: bool,
    peak_tflops: float | None,
    jobs: int | None,
    with_report: bool,
) -> None:
    """Find why a run is slow: metrics and ranked findings for a run directory, one Kineto trace,
    or a folder of per-rank traces. Writes analysis.json."""
    import json as jsonlib

    from perfkit.analyzers.analyze import analyze as run_analysis
    from perfkit.analyzers.analyze import output_path
    from perfkit.run import write_json_atomic

    target = output_path(source, out)
    result = run_analysis(source, peak_tflops=peak_tflops, jobs=jobs)
    data = result.to_json()
    write_json_atomic(target, data)
    if as_json:
        click.echo(jsonlib.dumps(data, indent=1, default=str))
    else:
        click.echo(_analysis_summary(result, target))
    if with_report:
        from perfkit.reports.html import write_report

        page = write_report(result, target.parent / "report" / "index.html")
        click.echo(f"report: {page}", err=as_json)


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
    from perfkit.analyzers.analyze import analyze as run_analysis
    from perfkit.analyzers.analyze import output_path
    from perfkit.reports.html import write_report

    target = out or output_path(run, None).parent / "report" / "index.html"
    click.echo(write_report(run_analysis(run), target))


def _analysis_summary(result: Any, target: Path) -> str:
    m = result.metrics
    lines = [
        f"perfkit analyze: {result.source}  ({len(result.ranks)} rank(s){', PARTIAL' if result.partial else ''})"
    ]
    for p in result.problems:
        lines.append(f"  problem: {p}")
    steps = m.get("steps", {})
    if steps:
        line = f"  step time {steps['step_time_ms']:.1f} ms (median)"
        if "tokens_per_s" in steps:
            line += f", {steps['tokens_per_s']:,.0f} tokens/s"
        mfu = m.get("throughput", {}).get("mfu")
        if mfu is not None:
            line += f", MFU {mfu:.1%}"
        lines.append(line)
    for rank, t in sorted(m.get("trace", {}).items(), key=lambda kv: int(kv[0]))[:8]:
        b = t["temporal_breakdown"]
        if b:
            lines.append(
                f"  rank {rank}: GPU compute {b['compute_pct']:.0f}%, communication {b['communication_pct']:.0f}%, "
                f"memory {b['memory_pct']:.0f}%, idle {b['idle_pct']:.0f}%"
            )
    if not result.findings:
        lines.append("  no findings: nothing stands out")
    for i, f in enumerate(result.findings, 1):
        saving = f" (~{f.saving_ms_per_step:.1f} ms/step)" if f.saving_ms_per_step else ""
        ranks = f" ranks {','.join(map(str, f.ranks[:8]))}" if f.ranks else ""
        lines.append(f"{i:>2}. [{f.severity}] {f.title}{saving}{ranks}")
        change = " ".join(
            f"--set {k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in f.remedy.change.items()
        )
        lines.append(f"      fix: {f.remedy.description}" + (f"  ({change})" if change else ""))
    lines.append(f"wrote {target}")
    if m.get("config") and any(f.remedy.change for f in result.findings):  # a run of the bundled trainer
        lines.append(
            f"next: perfkit optimize {result.source}  (tries these fixes, keeps what measurably helps)"
        )
    return "\n".join(lines)


@cli.command(context_settings=CONTEXT)
@click.argument("run_a", type=click.Path(path_type=Path))
@click.argument("run_b", type=click.Path(path_type=Path))
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Comparison page to write (default RUN_B/report/compare.html).",
)
@click.option(
    "--fail-above",
    type=click.FloatRange(min=0),
    metavar="PCT",
    help="Exit 1 when B's median step time is more than PCT percent above A's.",
)
def compare(run_a: Path, run_b: Path, out: Path | None, fail_above: float | None) -> None:
    """Compare run B against run A (runs or traces): metric deltas, findings that appeared or went
    away. With --fail-above it gates CI on step-time regressions."""
    from perfkit.analyzers.analyze import analyze as run_analysis
    from perfkit.analyzers.analyze import output_path
    from perfkit.reports.compare import compare as compare_runs
    from perfkit.reports.compare import write

    c = compare_runs(run_analysis(run_a), run_analysis(run_b))
    for r in c.rows:
        if r["a"] is None and r["b"] is None:
            continue
        delta = f"{100 * r['delta']:+.1f}%" if r["delta"] is not None else ""
        flag = "  worse" if r["worse"] else ""
        a = "-" if r["a"] is None else f"{r['a']:,.4g}"
        b = "-" if r["b"] is None else f"{r['b']:,.4g}"
        click.echo(f"  {r['name']:<28} {a:>12} -> {b:>12} {delta:>8}{flag}")
    for f in c.appeared:
        click.echo(f"  appeared: [{f.severity}] {f.title}")
    for f in c.resolved:
        click.echo(f"  went away: [{f.severity}] {f.title}")
    page = write(c, out or output_path(run_b, None).parent / "report" / "compare.html")
    click.echo(f"wrote {page}")
    change = c.step_change
    if fail_above is not None:
        if change is None:
            raise click.ClickException(
                "no step times to compare (run perfkit profile with the steps collector)"
            )
        if change * 100 > fail_above:
            raise click.ClickException(
                f"step time regressed {change:+.1%} (B vs A), more than --fail-above {fail_above:g}%"
            )


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
    path, notes = write_merged(r, out or r.path / "trace" / "merged.json.gz")
    for n in notes:
        click.echo(f"skipped: {n}", err=True)
    click.echo(path)


def _progress(line: str) -> None:
    click.echo(f"perfkit: {line}", err=True)


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
@config_options(nproc_default=2)
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
    "--out", type=click.Path(file_okay=False, path_type=Path), help="Folder (default runs/<time>-sweep)."
)
def sweep(
    config_name: str,
    overrides: tuple[str, ...],
    nproc: int,
    layouts: tuple[str, ...],
    steps: int,
    repeats: int,
    out: Path | None,
) -> None:
    """Benchmark the reference trainer over parallel layouts, side by side.

    Plain runs (no collectors), interleaved round-robin so a shared machine's drift falls on every
    layout alike. Writes sweep.json and sweep.html; layouts that cannot run are listed with why.
    """
    from perfkit.reports.trials import write
    from perfkit.run import default_run_path
    from perfkit.sweep import run_sweep

    folder = out or default_run_path("sweep")
    with _partial_on_interrupt(folder / "sweep.json"):
        result = run_sweep(
            config_name, nproc, [*overrides, f"steps={steps}"], layouts, repeats, folder, progress=_progress
        )
    data = result.to_json()
    click.echo(f"perfkit sweep: {config_name} on {nproc} rank(s), {repeats} run(s) each, {steps} steps")
    click.echo(
        f"{'#':>3}  {'layout':<28} {'ms/step':>9} {'tokens/s':>10} {'vs best':>8} {'peak MiB':>9}  runs"
    )
    for i, c in enumerate(data["candidates"], 1):
        if c["step_ms"]:
            runs = ", ".join(f"{r['step_ms']:.1f}" if r["ok"] else "failed" for r in c["runs"])
            mem = f"{c['peak_memory_bytes'] / 2**20:>9,.0f}" if c["peak_memory_bytes"] else f"{'–':>9}"
            mfu = f"  MFU {c['mfu']:.1%}" if c["mfu"] is not None else ""
            click.echo(
                f"{i:>3}  {c['label']:<28} {c['step_ms']:>9.2f} {c['tokens_per_s']:>10,.0f} {c['vs_best']:>7.2f}x {mem}  {runs}{mfu}"
            )
        else:
            why = f"skipped: {c['skipped']}" if c["skipped"] else f"failed: {c['runs'][-1]['error']}"
            click.echo(f"{i:>3}  {c['label']:<28} {why}")
    page = write(data, folder / "sweep.html")
    click.echo(f"wrote {folder / 'sweep.json'}")
    click.echo(f"report: {page.resolve()}")


@cli.command(context_settings=CONTEXT)
@click.argument("run", required=False, type=click.Path(path_type=Path))
@config_options(nproc_default=2)
@click.option(
    "--steps", type=click.IntRange(min=2), default=30, show_default=True, help="Steps per timing run."
)
@click.option(
    "--repeats", type=click.IntRange(min=1), default=3, show_default=True, help="Run pairs per trial."
)
@click.option(
    "--min-gain",
    type=click.FloatRange(min=0, max=90),
    default=3.0,
    show_default=True,
    help="Percent a change must save to be kept.",
)
@click.option(
    "--max-trials", type=click.IntRange(min=1), default=5, show_default=True, help="Remedies to try."
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
    no_verify: bool,
    out: Path | None,
) -> None:
    """Apply the fixes of a run's findings to the reference trainer; keep what measurably helps.

    \b
    perfkit optimize                         profile tiny-cpu on 2 ranks, then tune it
    perfkit optimize runs/<time>-tiny-cpu    start from a profiled run of the trainer

    Each remedy is tried against the configuration so far in alternating plain runs; it is kept
    only if every pair agrees it is faster by at least --min-gain percent and the loss is not
    worse. Writes optimize.json and optimize.html, and profiles the final configuration.
    """
    from perfkit.analyzers.analyze import analyze as run_analysis
    from perfkit.optimize import run_optimize
    from perfkit.reports.compare import compare as compare_runs
    from perfkit.reports.compare import write as write_compare
    from perfkit.reports.html import write_report
    from perfkit.reports.trials import write
    from perfkit.run import default_run_path, write_json_atomic

    folder = out or default_run_path("optimize")
    with _partial_on_interrupt(folder / "optimize.json"):
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
            verify=not no_verify,
            progress=_progress,
        )
    data = opt.to_json()
    click.echo(f"perfkit optimize: {len(opt.trials)} remedy(ies) from {opt.baseline_run}")
    if not opt.trials:
        click.echo("  no finding of the baseline has a config change to try")
    for t in data["trials"]:
        verdict = "KEPT   " if t["kept"] else ("skipped" if t["skipped"] else "dropped")
        click.echo(f"  {verdict} {' '.join(t['change']):<44} {t['reason']}")
    if opt.kept:
        speed = f"{opt.speedup:.2f}x the throughput of the original" if opt.speedup else "not measured"
        click.echo(f"kept: {' '.join('--set ' + k for k in opt.kept)}  ({speed}, side by side)")
        final = {o.split("=", 1)[0]: o for o in [*opt.base_overrides, *opt.kept]}  # a key's last value wins
        sets = "".join(f" --set {o}" for o in final.values())
        click.echo(f"train with: perfkit train --config {opt.config} --nproc {opt.nproc}{sets}")
    else:
        click.echo("nothing measurably helped; the configuration stays as it was")
    if opt.final_run is not None:
        before, after = opt.baseline_analysis or run_analysis(opt.baseline_run), run_analysis(opt.final_run)
        for result, path in ((before, opt.baseline_run), (after, opt.final_run)):
            if path.is_relative_to(folder):  # a run given by the user is left as it is
                write_json_atomic(path / "analysis.json", result.to_json())
                write_report(result, path / "report" / "index.html")
        comparison = compare_runs(before, after)
        page_c = write_compare(comparison, opt.final_run / "report" / "compare.html")
        gone = [f.title for f in comparison.resolved]
        click.echo(f"findings gone after: {'; '.join(gone) if gone else 'none'}")
        click.echo(f"comparison: {page_c.resolve()}")
    page = write(data, folder / "optimize.html")
    click.echo(f"wrote {folder / 'optimize.json'}")
    click.echo(f"report: {page.resolve()}")


def main() -> None:
    cli(prog_name="perfkit")
