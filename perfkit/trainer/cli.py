"""The per-rank entry point that torchrun starts (``python -m perfkit.trainer``)."""

from __future__ import annotations

from pathlib import Path

import click

from perfkit.errors import PerfkitError


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--config", "config_name", default="tiny-cpu", show_default=True, help="Shipped config name or TOML path."
)
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override one config key.")
@click.option(
    "--log-json",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Append one JSON object per logged step.",
)
def main(config_name: str, overrides: tuple[str, ...], log_json: Path | None) -> None:
    """Train the reference GPT as one rank of a torchrun job (or alone)."""
    from perfkit.trainer.config import load_config

    try:
        cfg = load_config(config_name, overrides)
        from perfkit.trainer.train import train

        train(cfg, log_json=log_json)
    except PerfkitError as e:
        click.echo(f"error: {e}", err=True)
        raise SystemExit(e.exit_code) from None
