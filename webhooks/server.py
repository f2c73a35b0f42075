"""Serve the receiver on Granian (HTTP in Rust, the app through WSGI), Trimo's production server.

Measured against gunicorn (sync, gthread, gevent workers) with bench/webhook_ingest.py on 2 cores:
Granian's own cost is about 20 µs of CPU per request where gunicorn's is 150-200 µs, so the
receiver's work (verify, parse, route, commit) is nearly all that is left; see bench/README.md.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable
from typing import Any

from flask import Flask
from granian.constants import HTTPModes, Interfaces
from granian.log import LogLevels
from granian.server.mp import MPServer

from webhooks.app import receiver_of

# Measured with bench/webhook_ingest.py on 2 cores: see bench/README.md. One process answering
# one request at a time is the cheapest there: a second process competes for the same cores
# (and SQLite's write lock), more Python threads only trade the GIL back and forth.
DEFAULT_WORKERS = 1
DEFAULT_THREADS = 1
# Requests a worker holds at once (the rest wait in the kernel's accept queue); GitHub sends
# deliveries one per connection, so this bounds memory, not throughput.
BACKPRESSURE = 256
# GitHub waits 10 s for an answer; a request is never near that.
KILL_TIMEOUT_SECONDS = 10


def granian(
    host: str,
    port: int,
    workers: int = DEFAULT_WORKERS,
    threads: int = DEFAULT_THREADS,
    *,
    access_log: bool = False,
) -> MPServer:
    """The Granian server for the receiver, not yet serving."""
    return MPServer(
        # Only names the processes: the app object itself is handed to the workers by `serve`.
        "webhooks.app:create_app",
        address=host,
        port=port,
        interface=Interfaces.WSGI,
        workers=workers,
        blocking_threads=threads,
        backpressure=BACKPRESSURE,
        # GitHub delivers over HTTP/1.1; nothing here needs HTTP/2.
        http=HTTPModes.http1,
        log_level=LogLevels.warning,
        log_access=access_log,
        respawn_failed_workers=True,
        workers_kill_timeout=KILL_TIMEOUT_SECONDS,
    )


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
    after_fork: Callable[[], None] | None = None,
) -> None:
    """Serve `app` until stopped (SIGTERM / SIGINT); blocks.

    The app is built before the workers fork, so they share it; `on_starting` runs once in this
    process after the socket is bound and before the workers start, `on_exit` once after they
    stopped. Each worker forgets the store connections it inherited and opens its own (SQLite
    connections must not cross fork).
    """
    # The workers must inherit `app`; with "spawn" (or "forkserver", the default from Python
    # 3.14) Granian would have to pickle it. This process only serves, so the choice is ours.
    if multiprocessing.get_start_method(allow_none=True) != "fork":
        multiprocessing.set_start_method("fork", force=True)
    server = granian(host, port, workers, threads, access_log=access_log)
    if on_starting is not None:
        server.on_startup(lambda: on_starting(server))
    if on_exit is not None:
        server.on_shutdown(lambda: on_exit(server))

    def load(_target: str) -> Flask:
        # Runs in each worker, just after fork.
        if after_fork is not None:
            after_fork()
        else:
            receiver_of(app).after_fork()
        return app

    server.serve(target_loader=load)
