"""The run pages' Flask wiring: `init_app` adds them to an app, `create_app` makes one."""

from __future__ import annotations

import os
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from flask import Flask
from flask_wtf.csrf import CSRFProtect

from bot.settings import Settings
from bot.store import Store
from ui.access import Access, LocalAccess, NoAccess
from ui.follow import LogHub

EXTENSION = "trimo.ui"
SECRET_FILE = "ui-secret-key"
# The HTTP server's threads (webhooks.server, trimo serve and trimo ui): a live-log stream holds
# one while it lasts, waiting, not computing. Measured in bench/ui_follow.py.
HTTP_THREADS = 64
MAX_STREAMS = HTTP_THREADS - 8


@dataclass
class UI:
    """What the pages need: settings, the store, the live-log hub and who is asking."""

    settings: Settings
    store: Store
    access: Callable[[], Access]
    hub: LogHub = field(init=False)
    # A live-log stream ends after this long; the browser reconnects with Last-Event-ID, so
    # no stream holds a server thread for ever.
    stream_seconds: float = 30.0
    # Each stream holds one of the HTTP server's threads while it lasts: past this many, a
    # browser is told to come back in a few seconds, so pages and webhooks still get threads.
    max_streams: int = MAX_STREAMS
    streams: threading.BoundedSemaphore = field(init=False)

    def __post_init__(self) -> None:
        self.hub = LogHub(self.store)
        self.streams = threading.BoundedSemaphore(self.max_streams)


def secret_key(data_dir: Path) -> bytes:
    """The key that signs session cookies and CSRF tokens, kept in the data directory (0600)
    so sessions survive a restart."""
    path = data_dir / SECRET_FILE
    try:
        return path.read_bytes()
    except FileNotFoundError:
        pass
    data_dir.mkdir(parents=True, exist_ok=True)
    key = secrets.token_hex(32).encode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key)
    return key


def init_app(app: Flask, settings: Settings, store: Store, *, local: bool = False) -> UI:
    """Add the run pages to `app`.

    `local` (`trimo ui` on 127.0.0.1): everyone who reaches them may see and act. Otherwise
    people sign in with GitHub (the App's client id and secret) and see the runs of the
    repositories they can read; without those settings nobody sees any run.
    """
    from ui.views import bp

    if not app.config.get("SECRET_KEY"):
        app.config["SECRET_KEY"] = secret_key(settings.data_dir)
    app.config.update(
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        SESSION_COOKIE_SECURE=bool(settings.public_url and settings.public_url.startswith("https")),
        WTF_CSRF_TIME_LIMIT=None,
    )
    access: Callable[[], Access]
    if local:
        access = LocalAccess
    elif settings.client_id and settings.client_secret:
        from ui.signin import SignedInAccess, init_signin

        flow = init_signin(app, settings)

        def access() -> Access:
            return SignedInAccess(flow)
    else:
        access = NoAccess
    ui = UI(settings, store, access)
    app.extensions[EXTENSION] = ui
    CSRFProtect(app)
    app.register_blueprint(bp)
    return ui


def create_app(settings: Settings, store: Store) -> Flask:
    """The run pages alone, for `trimo ui` on this machine: nobody signs in."""
    app = Flask(__name__)
    init_app(app, settings, store, local=True)
    return app
