"""`trimo ui`: the run pages of this machine's runs, on 127.0.0.1, with nobody to sign in."""

from __future__ import annotations

from pathlib import Path

import click

from bot.cli.common import settings_option
from bot.errors import SettingsError
from bot.settings import Settings
from bot.store import Store

DEFAULT_UI_PORT = 8001


@click.command("ui")
@settings_option
@click.option("--port", default=DEFAULT_UI_PORT, show_default=True, help="Port on 127.0.0.1.")
def ui(settings_path: Path | None, port: int) -> None:
    """The run pages for local runs (`trimo run`), on http://127.0.0.1:PORT/runs."""
    from ui.app import HTTP_THREADS, create_app
    from webhooks.server import serve as serve_http

    try:
        settings = Settings.load(settings_path)
    except SettingsError as exc:
        raise click.ClickException(str(exc)) from exc
    store = Store(settings.database_url)
    app = create_app(settings, store)
    # Nobody signs in here, so the pages are for this machine alone.
    click.echo(f"trimo ui: http://127.0.0.1:{port}/runs", err=True)
    serve_http(app, "127.0.0.1", port, threads=HTTP_THREADS, after_fork=store.after_fork)
