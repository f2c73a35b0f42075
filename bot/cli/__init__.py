"""The `trimo` command: one group, one module per family of subcommands."""

from __future__ import annotations

import logging
import sys

import click

from bot.cli.image import image
from bot.cli.run import demo, run
from bot.cli.runs import runs
from bot.cli.serve import serve, worker
from bot.cli.ui import ui


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Log debug details to stderr.")
def cli(verbose: bool) -> None:
    """Trimo: dispatch coding agents into isolated development containers."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


cli.add_command(image)
cli.add_command(run)
cli.add_command(demo)
cli.add_command(serve)
cli.add_command(worker)
cli.add_command(runs)
cli.add_command(ui)


def main() -> None:
    cli()
