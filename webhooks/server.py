"""Serve the receiver on gunicorn, Trimo's production WSGI server."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flask import Flask
from gunicorn.app.base import BaseApplication

from webhooks.app import receiver_of

# Measured with bench/webhook_ingest.py on 2 cores: see bench/README.md.
DEFAULT_WORKERS = 2
DEFAULT_THREADS = 1


class _Gunicorn(BaseApplication):  # type: ignore[misc]
    """gunicorn driven from code: options given here, nothing read from argv or a config file."""

    def __init__(self, app: Flask, options: dict[str, Any]) -> None:
        self.application = app
        self.options = options
        super().__init__()

    def load_config(self) -> None:
        for key, value in self.options.items():
            self.cfg.set(key, value)

    def load(self) -> Flask:
        return self.application


def options(
    host: str,
    port: int,
    workers: int = DEFAULT_WORKERS,
    threads: int = DEFAULT_THREADS,
    *,
    on_starting: Callable[[Any], None] | None = None,
    access_log: bool = False,
) -> dict[str, Any]:
    """gunicorn settings for the receiver.

    With `threads` > 1 the gthread worker serves keep-alive connections; with 1, the sync worker
    (one request per connection) costs less per request. The app is loaded before forking, so
    workers share it; each worker must open its own store connections (SQLite connections are
    not shared across fork: the store connects lazily per process).
    """
    opts: dict[str, Any] = {
        "bind": f"{host}:{port}",
        "workers": workers,
        "threads": threads,
        "worker_class": "gthread" if threads > 1 else "sync",
        "preload_app": True,
        # GitHub waits 10 s for an answer; a request is never near that.
        "timeout": 30,
        "graceful_timeout": 10,
        "keepalive": 5,
        "accesslog": "-" if access_log else None,
        "errorlog": "-",
        "loglevel": "warning",
        "proc_name": "trimo-webhooks",
    }
    if on_starting is not None:
        opts["on_starting"] = on_starting
    return opts


def _post_fork(app: Flask) -> Callable[[Any, Any], None]:
    def post_fork(server: Any, worker: Any) -> None:
        receiver_of(app).after_fork()

    return post_fork


def serve(
    app: Flask,
    host: str = "127.0.0.1",
    port: int = 8080,
    workers: int = DEFAULT_WORKERS,
    threads: int = DEFAULT_THREADS,
    *,
    on_starting: Callable[[Any], None] | None = None,
    on_exit: Callable[[Any], None] | None = None,
    access_log: bool = False,
) -> None:
    """Serve `app` until gunicorn is stopped (SIGTERM / SIGINT); blocks."""
    opts = options(host, port, workers, threads, on_starting=on_starting, access_log=access_log)
    opts["post_fork"] = _post_fork(app)
    if on_exit is not None:
        opts["on_exit"] = on_exit
    _Gunicorn(app, opts).run()
