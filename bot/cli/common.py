"""What every store-using `trimo` command opens first: settings, store, engine, and the reaper."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import docker

from bot.engine import Engine
from bot.errors import SettingsError
from bot.runtime import DEFAULT_DOCKER_URL, DockerRuntime, engine_client
from bot.secrets import LocalSecrets, ServerSecrets
from bot.settings import Settings
from bot.store import Store
from bot.worker import reap, worker_id
from bot.workspace import Workspace

settings_option = click.option(
    "--settings",
    "settings_path",
    default=None,
    type=click.Path(path_type=Path),
    help="Settings file (TOML); TRIMO_* environment variables override it.",
)
NO_ENGINE = (
    "no Docker engine answers at {url} ({detail}); start dockerd there, or point "
    "--docker-url / TRIMO_DOCKER_URL / DOCKER_HOST at one"
)


@dataclass
class App:
    settings: Settings
    store: Store
    runtime: DockerRuntime | None

    def engine(self, *, local: bool = False) -> Engine:
        """The run engine; `local` (`trimo run`) lets secrets come from the user's environment
        too, where the server grants them to repositories by name only."""
        secrets = LocalSecrets(self.settings) if local else ServerSecrets(self.settings)
        return Engine(
            store=self.store,
            workspace=Workspace(self.settings.data_dir),
            runtime=self.require_runtime(),
            owner=worker_id(),
            secrets=secrets,
            default_timeout=self.settings.default_timeout,
            image_build_timeout=self.settings.image_build_timeout,
            lease=self.settings.lease_terms(),
            extra_ca_certs=self.settings.extra_ca_certs,
            network_limits=self.settings.network_limits(),
            models=self.settings.model_policy(),
        )

    def require_runtime(self) -> DockerRuntime:
        if self.runtime is None:
            self.runtime = open_runtime(self.settings)
        return self.runtime


def open_runtime(settings: Settings) -> DockerRuntime:
    try:
        client = engine_client(settings.docker_url, timeout=600)
        client.ping()
    except docker.errors.DockerException as exc:
        url = settings.docker_url or os.environ.get("DOCKER_HOST") or DEFAULT_DOCKER_URL
        raise click.ClickException(NO_ENGINE.format(url=url, detail=exc)) from exc
    return DockerRuntime(client, url=settings.docker_url)


def open_app(settings_path: Path | None = None, need_engine: bool = False, **overrides: Any) -> App:
    """Settings (`overrides` over them, as given flags), store and (if it answers) the engine;
    leftovers of dead runs are reaped first."""
    try:
        settings = Settings.load(settings_path, **overrides)
    except SettingsError as exc:
        raise click.ClickException(str(exc)) from exc
    store = Store(settings.database_url)
    runtime: DockerRuntime | None
    if need_engine:
        runtime = open_runtime(settings)
    else:
        try:
            runtime = open_runtime(settings)
        except click.ClickException:
            runtime = None
    # A command ends only this host's dead runs: another host's worker may just be slow to
    # renew, and only the workers (`trimo worker`) judge those.
    for line in reap(store, runtime):
        click.echo(f"trimo: {line}", err=True)
    return App(settings, store, runtime)


def reap_quietly() -> None:
    """The reaper, for commands that need no store themselves: any `trimo` command finishes
    what a killed one left. Without valid settings or an engine there is nothing to do here."""
    try:
        settings = Settings.load()
        store = Store(settings.database_url)
    except Exception:  # noqa: BLE001 - the command itself reports bad settings if it needs them
        return
    try:
        runtime = open_runtime(settings)
    except click.ClickException:
        runtime = None
    try:
        for line in reap(store, runtime):
            click.echo(f"trimo: {line}", err=True)
    finally:
        store.close()
