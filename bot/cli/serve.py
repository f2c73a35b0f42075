"""`trimo serve` and `trimo worker`: the GitHub App's receiver and the workers that run its work."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from bot.cli.common import open_app, settings_option
from bot.engine import RunContext
from bot.errors import SettingsError
from bot.settings import Settings
from bot.states import PipelineKind
from bot.store import DELIVERY_KEEP, Run, Store
from bot.supervisor import WorkerSupervisor
from bot.worker import CHECKPOINT_SECONDS
from bot.workspace import Remote

if TYPE_CHECKING:
    from bot.github.auth import AppAuth
    from bot.github.service import GitHubService

# The GitHub and HTTP stacks are imported by the commands that use them, so that every other
# `trimo` command starts without them. One HTTP process is the fastest on a small machine
# (bench/README.md); webhooks.server.DEFAULT_WORKERS says the same.
DEFAULT_HTTP_WORKERS = 1

log = logging.getLogger(__name__)
DELIVERY_POLL_SECONDS = 0.5
# Deliveries processed longer ago than DELIVERY_KEEP are forgotten this often.
DELIVERY_PRUNE_SECONDS = 3600


def _auth(settings: Settings) -> AppAuth:
    from bot.github.auth import AppAuth

    pem = settings.private_key_pem()
    assert settings.app_id is not None and pem is not None  # require_github() checked both
    return AppAuth(settings.app_id, pem, settings.api_url)


def run_worker(settings_path: Path | None, stop: threading.Event, **overrides: Any) -> None:
    """A worker until `stop`: `overrides` (given flags) win over the settings."""
    from bot.github.service import GitHubService
    from bot.health import StatusWriter
    from bot.worker import WorkerPool

    app = open_app(settings_path, need_engine=True, **overrides)
    settings = app.settings
    service: GitHubService | None = None
    if settings.app_id is not None:
        try:
            settings.require_github(webhooks=False)
        except SettingsError as exc:
            raise click.ClickException(str(exc)) from exc
        service = GitHubService(settings, app.store, _auth(settings))

    def context_for(run: Run) -> RunContext:
        pipeline = app.store.get_pipeline(run.pipeline_id)
        if pipeline.kind == PipelineKind.LOCAL or service is None:
            return RunContext(remote=Remote(pipeline.repo))
        return service.context_for(run)

    def observer_for(run: Run) -> Any:
        pipeline = app.store.get_pipeline(run.pipeline_id)
        if pipeline.kind == PipelineKind.LOCAL or service is None:
            return None
        return service.observer_for(run)

    engine = app.engine()
    pool = WorkerPool(engine, app.store, context_for, observer_for, size=settings.workers)
    status = StatusWriter(settings.data_dir, engine.owner, engine.runtime.problem).start()
    threads = [threading.Thread(target=pool.run_forever, name="trimo-runs", daemon=True)]
    if service is not None:
        threads.append(
            threading.Thread(
                target=_deliveries, args=(service, stop), name="trimo-deliveries", daemon=True
            )
        )
        # Reports GitHub did not take at once, and final reports of runs finished elsewhere.
        threads.append(
            threading.Thread(
                target=service.sender.run_forever,
                args=(stop, service.reports.sweep),
                name="trimo-reports",
                daemon=True,
            )
        )
    for t in threads:
        t.start()
    click.echo(
        f"trimo worker {engine.owner}: {settings.workers} run slot(s) on the Docker engine at "
        f"{engine.runtime.url}, data in {settings.data_dir}",
        err=True,
    )
    stop.wait()
    status.stop()
    requeued = pool.drain(settings.drain_grace)
    click.echo(
        "trimo worker: drained"
        + (f"; run(s) {', '.join(map(str, requeued))} requeued" if requeued else ""),
        err=True,
    )


def _deliveries(service: GitHubService, stop: threading.Event) -> None:
    pruned_at = 0.0
    while not stop.is_set():
        try:
            if time.monotonic() - pruned_at > DELIVERY_PRUNE_SECONDS:
                pruned_at = time.monotonic()
                if pruned := service.store.prune_deliveries():
                    log.info("forgot %d deliveries processed over %s ago", pruned, DELIVERY_KEEP)
            if service.process_pending() == 0:
                stop.wait(DELIVERY_POLL_SECONDS)
        except Exception:
            log.exception("processing deliveries failed; retrying")
            stop.wait(5)


@click.command("worker")
@settings_option
@click.option(
    "--docker-url",
    help="The Docker engine this worker runs its runs on (unix:///…, tcp://host:2376, ssh://…), "
    "over TRIMO_DOCKER_URL (default: DOCKER_HOST, else the local socket). One worker per engine: "
    "workers on several engines or hosts share runs through one PostgreSQL (TRIMO_DATABASE_URL).",
)
@click.option(
    "--workers",
    type=click.IntRange(1, 64),
    help="Runs this worker executes at once (its run slots), over TRIMO_WORKERS (default 2); "
    "it claims a queued run only while a slot is free.",
)
def worker(settings_path: Path | None, docker_url: str | None, workers: int | None) -> None:
    """Run workers only: claim queued runs and webhook deliveries from the store."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    flags = {
        name: value
        for name, value in (("docker_url", docker_url), ("workers", workers))
        if value is not None
    }
    run_worker(settings_path, stop, **flags)


@click.command("serve")
@settings_option
@click.option(
    "--http-workers",
    default=DEFAULT_HTTP_WORKERS,
    show_default=True,
    help="Processes answering webhooks (one is fastest on a small machine).",
)
@click.option("--host", help="Address to listen on, over TRIMO_HOST (default 127.0.0.1).")
@click.option(
    "--port",
    type=click.IntRange(1, 65535),
    help="Port to listen on, over TRIMO_PORT (default 8000).",
)
@click.option(
    "--worker/--no-worker",
    "with_worker",
    default=True,
    show_default=True,
    help="Start a worker beside the receiver; --no-worker when `trimo worker`s run elsewhere "
    "on the same database (the receiver then needs no Docker engine).",
)
def serve(
    settings_path: Path | None,
    http_workers: int,
    host: str | None,
    port: int | None,
    with_worker: bool,
) -> None:
    """The GitHub App: the webhook receiver (Granian) and the workers, in one command."""
    from bot.health import read_statuses
    from bot.metrics import RunMetrics
    from ui.app import HTTP_THREADS
    from ui.app import init_app as init_ui
    from webhooks.app import create_app
    from webhooks.server import serve as serve_http

    # Given flags win over the environment and the settings file.
    flags = {name: value for name, value in (("host", host), ("port", port)) if value is not None}
    try:
        settings = Settings.load(settings_path, **flags)
        if not settings.has_app:
            _serve_setup(settings)
            return
        settings.require_github()
    except SettingsError as exc:
        raise click.ClickException(str(exc)) from exc
    store = Store(settings.database_url)
    app = create_app(
        settings,
        store,
        metrics=RunMetrics(store, settings.data_dir),
        workers=lambda: read_statuses(settings.data_dir),
        metrics_token=settings.metrics_token.get_secret_value() if settings.metrics_token else None,
    )
    init_ui(app, settings, store)
    env = dict(os.environ)
    if settings_path is not None:
        env["TRIMO_SETTINGS_FILE"] = str(settings_path)
    # The worker drains on SIGTERM: its grace, then the checkpoints of what still runs.
    supervisor = WorkerSupervisor(
        [sys.executable, "-m", "bot", "worker"],
        env,
        drain_seconds=settings.drain_grace + CHECKPOINT_SECONDS + 30,
    )

    def on_starting(_server: Any) -> None:
        if with_worker:
            supervisor.start()

    def on_exit(_server: Any) -> None:
        supervisor.stop()

    click.echo(
        f"trimo serve: webhooks on http://{settings.host}:{settings.port}/webhooks/github", err=True
    )
    serve_http(
        app,
        settings.host,
        settings.port,
        workers=http_workers,
        threads=HTTP_THREADS,
        on_starting=on_starting,
        on_exit=on_exit,
    )


def _serve_setup(settings: Settings) -> None:
    """No GitHub App yet: serve the page that creates one, until stopped."""
    from ui.setup import create_setup_app
    from webhooks.server import serve as serve_http

    where = settings.public_url or f"http://{settings.host}:{settings.port}"
    click.echo(
        f"trimo serve: no GitHub App is set up; open {where}/ to create one "
        "(or set TRIMO_APP_ID, TRIMO_PRIVATE_KEY_PATH and TRIMO_WEBHOOK_SECRET)",
        err=True,
    )
    serve_http(create_setup_app(settings), settings.host, settings.port, after_fork=lambda: None)
