"""Is the worker alive, and does it reach its Docker engine? Each worker process says so in a
status file under `<data_dir>/workers/`, every few seconds; `/healthz` and `/metrics` read them.

A file, not the store, so that a store that is down does not also hide the workers' state.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bot.github.client import CALLS

STATUS_DIR = "workers"
STATUS_SECONDS = 5.0
# A worker whose status is older than this is not alive.
FRESH_SECONDS = 30.0


def status_dir(data_dir: Path) -> Path:
    return data_dir / STATUS_DIR


class StatusWriter:
    """Writes this worker's status file until stopped."""

    def __init__(
        self,
        data_dir: Path,
        worker: str,
        engine_ok: Callable[[], str | None],
        every: float = STATUS_SECONDS,
    ) -> None:
        self.path = status_dir(data_dir) / (re.sub(r"[^A-Za-z0-9._-]", "_", worker) + ".json")
        self.worker = worker
        self.engine_ok = engine_ok  # None when the engine answers, else why not
        self.every = every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="trimo-status", daemon=True)

    def start(self) -> StatusWriter:
        self.write()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.path.unlink(missing_ok=True)

    def write(self) -> None:
        problem = self.engine_ok()
        status = {
            "worker": self.worker,
            "pid": os.getpid(),
            "at": time.time(),
            "engine": problem is None,
            "engine_error": problem,
            "github": CALLS.snapshot(),
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(status))
        tmp.replace(self.path)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            # A full disk must not stop the worker; /healthz will show it as stale.
            with contextlib.suppress(OSError):
                self.write()


def read_statuses(data_dir: Path, fresh: float = FRESH_SECONDS) -> list[dict[str, Any]]:
    """The workers' statuses written within `fresh` seconds."""
    found = []
    now = time.time()
    for path in sorted(status_dir(data_dir).glob("*.json")):
        try:
            status = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if now - float(status.get("at", 0)) <= fresh:
            found.append(status)
    return found
