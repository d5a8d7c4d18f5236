"""The ``perfkit`` command. Thin: parse, build a config, call the library.

Nothing here imports torch at module level, so ``perfkit --help`` starts in a fraction of a second.
Errors a user can cause reach them as one line and an exit code, never a traceback.
"""

from __future__ import annotations

import json
import sys
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


_config_options = [
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
        default=1,
        show_default=True,
        help="Ranks to start on this node (one GPU each on GPU).",
    ),
]


def config_options(f: Any) -> Any:
    for option in reversed(_config_options):
        f = option(f)
    return f


@cli.command(context_settings=CONTEXT)
@config_options
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


@cli.command(context_settings=CONTEXT)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    help="Run directory to write (default runs/<time>-demo).",
)
@click.option("--nproc", type=click.IntRange(min=1), default=2, show_default=True, help="Ranks to start.")
def demo(out: Path | None, nproc: int) -> None:
    """The main job on its embedded default: run the bundled trainer (tiny-cpu) on NPROC ranks into
    a run directory and print where everything is."""
    from perfkit.envinfo import environment
    from perfkit.launch import run_command, trainer_command
    from perfkit.run import Run, default_run_path
    from perfkit.trainer.config import load_config, resolve_layout

    cfg = load_config("tiny-cpu")
    resolve_layout(cfg, nproc)
    run = Run.create(
        out or default_run_path("demo"),
        command=sys.argv,
        world_size=nproc,
        config=cfg.to_dict(),
        env=environment(),
    )
    log = run.path / "train_log.jsonl"
    click.echo(f"perfkit demo: training the reference GPT (tiny-cpu) on {nproc} CPU ranks into {run.path}")
    rc = run_command(trainer_command(nproc, "tiny-cpu", [], log), nproc)
    run.finish("complete" if rc == 0 else "failed", rc)
    records = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    click.echo("")
    click.echo(f"run directory:  {run.path}")
    click.echo(f"  manifest:     {run.manifest_path}  (status {run.manifest.status})")
    if records:
        first, last = records[0], records[-1]
        click.echo(
            f"  step log:     {log}  ({len(records)} steps, loss {first['loss']:.3f} -> {last['loss']:.3f})"
        )
    click.echo(
        "not built yet: the collectors (per-rank kernels, collectives, memory, I/O, NVML), "
        "perfkit analyze and the HTML report; this demo shows only the trainer's own step log."
    )
    sys.exit(rc)


_NOT_BUILT = {
    "profile": "Run a training command with collectors attached and write a run directory.",
    "analyze": "Turn a run directory or Kineto traces into metrics and ranked diagnoses.",
    "report": "Write a self-contained HTML report for a run directory.",
    "optimize": "Apply remedies for a run's findings, re-run, and keep what measurably helps.",
    "sweep": "Benchmark the trainer over a set of parallel configurations.",
    "compare": "Compare two runs and fail when step time regresses.",
}


def _not_built_command(name: str, summary: str) -> click.Command:
    def callback(**_: Any) -> None:
        click.echo(
            f"perfkit {name} is not built yet; today `perfkit train` and `perfkit demo` work.", err=True
        )
        sys.exit(2)

    return click.Command(
        name,
        callback=callback,
        help=f"{summary}\n\nNot built yet: running it exits 2.",
        short_help=f"{summary} (not built yet)",
        params=[click.Argument(["args"], nargs=-1, type=click.UNPROCESSED)],
        context_settings={**CONTEXT, "ignore_unknown_options": True, "allow_extra_args": True},
    )


for _name, _summary in _NOT_BUILT.items():
    cli.add_command(_not_built_command(_name, _summary))


def main() -> None:
    cli(prog_name="perfkit")
