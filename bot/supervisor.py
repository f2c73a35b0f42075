"""Supervision of `trimo serve`'s worker process: restarted when it dies, drained when asked.

A worker that dies (killed, out of memory, a bug) is started again after a pause that doubles
with each failure in a row, up to BACKOFF_MAX_SECONDS; a worker that stayed up HEALTHY_SECONDS
resets the count. It never gives up: the webhook receiver beside it keeps taking deliveries, so
a server that stopped restarting its worker would accept work it never does; and what kills a
worker in a loop (PostgreSQL or the Docker engine away) usually comes back by itself. Each death
is one log line, and from FAST_FAILURES in a row on the line says to look at the worker's own
output, which is this process's too.

On stop the worker gets SIGTERM and drains (bot/worker.py): this waits for it as long as the
drain may take, then kills it.
"""

from __future__ import annotations

import logging
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence

log = logging.getLogger(__name__)

BACKOFF_FIRST_SECONDS = 1.0
BACKOFF_MAX_SECONDS = 60.0
HEALTHY_SECONDS = 60.0
FAST_FAILURES = 5
DIED = "the worker (pid {pid}) exited with {code} after {uptime:.1f}s; restarting it in {wait:g}s"
DIES_AT_START = (
    "the worker failed {failures} times in a row, each within {healthy:g}s of starting: its "
    "output above says why (try `trimo worker` by hand); still retrying every {wait:g}s at most"
)
KILLED = "the worker (pid {pid}) did not drain within {seconds:g}s: killed"


class WorkerSupervisor:
    """Keeps one worker process running until `stop`."""

    def __init__(
        self,
        argv: Sequence[str],
        env: Mapping[str, str],
        drain_seconds: float,
        *,
        backoff_first: float = BACKOFF_FIRST_SECONDS,
        backoff_max: float = BACKOFF_MAX_SECONDS,
        healthy_seconds: float = HEALTHY_SECONDS,
    ) -> None:
        self.argv = list(argv)
        self.env = dict(env)
        self.drain_seconds = drain_seconds
        self.backoff_first = backoff_first
        self.backoff_max = backoff_max
        self.healthy_seconds = healthy_seconds
        self.restarts = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(
            target=self._supervise, name="trimo-supervisor", daemon=True
        )

    def start(self) -> WorkerSupervisor:
        self._spawn()
        self._thread.start()
        return self

    @property
    def pid(self) -> int | None:
        with self._lock:
            return self._proc.pid if self._proc is not None else None

    def _spawn(self) -> subprocess.Popen[bytes] | None:
        with self._lock:
            if self._stopping.is_set():
                return None
            self._proc = subprocess.Popen(self.argv, env=self.env)
            return self._proc

    def _supervise(self) -> None:
        failures = 0
        while True:
            with self._lock:
                proc = self._proc
            if proc is None:
                return
            started = time.monotonic()
            code = proc.wait()
            if self._stopping.is_set():
                return
            uptime = time.monotonic() - started
            failures = 1 if uptime >= self.healthy_seconds else failures + 1
            wait = min(self.backoff_first * 2 ** (failures - 1), self.backoff_max)
            log.warning(DIED.format(pid=proc.pid, code=code, uptime=uptime, wait=wait))
            if failures >= FAST_FAILURES:
                log.error(
                    DIES_AT_START.format(
                        failures=failures, healthy=self.healthy_seconds, wait=self.backoff_max
                    )
                )
            if self._stopping.wait(wait) or self._spawn() is None:
                return
            self.restarts += 1

    def stop(self) -> int | None:
        """SIGTERM to the worker, then wait for its drain; returns its exit code."""
        with self._lock:
            self._stopping.set()
            proc = self._proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.terminate()
        try:
            code = proc.wait(timeout=self.drain_seconds)
        except subprocess.TimeoutExpired:
            log.error(KILLED.format(pid=proc.pid, seconds=self.drain_seconds))
            proc.kill()
            code = proc.wait()
        self._thread.join(timeout=5)
        return code
