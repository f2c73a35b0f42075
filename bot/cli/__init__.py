"""The `trimo` command: one group, one module per family of subcommands."""

from __future__ import annotations

import logging

import click

from bot.cli.deliveries import deliveries
from bot.cli.image import image
from bot.cli.run import demo, run
from bot.cli.runs import runs
from bot.cli.serve import serve, worker
from bot.cli.ui import ui
from bot.logs import configure


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Log debug details to stderr.")
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    default="text",
    envvar="TRIMO_LOG_FORMAT",
    show_default=True,
    help="json: one object per line, with the run and delivery ids (TRIMO_LOG_FORMAT).",
)
def cli(verbose: bool, log_format: str) -> None:
    """Trimo: dispatch coding agents into isolated development containers."""
    configure(logging.DEBUG if verbose else logging.WARNING, log_format)


cli.add_command(image)
cli.add_command(run)
cli.add_command(demo)
cli.add_command(serve)
cli.add_command(worker)
cli.add_command(runs)
cli.add_command(ui)
cli.add_command(deliveries)


def main() -> None:
    cli()
