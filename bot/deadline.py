"""A run's deadline and its cancel, enforced by loops that outlive a failing store.

They are what stops a container whose agent never ends, so nothing the store or the engine raises
may end them: a failed read is one log line and a retry with backoff. The deadline has a thread
of its own that asks the store nothing, so a store that is down (or a read that hangs) delays a
cancel, never a timeout.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from bot.states import RunState

log = logging.getLogger(__name__)

POLL_SECONDS = 1.0
# The longest wait between two tries while the store (or the engine) fails.
BACKOFF_MAX_SECONDS = 15.0
CANCEL_UNREAD = (
    "run {run_id}: could not read whether it was cancelled ({error}); retry in {wait:.0f}s"
)
STOP_FAILED = "run {run_id}: could not stop its container ({error}); retry in {wait:.0f}s"
STORE_BACK = "run {run_id}: the store answers again after {failures} failed read(s)"

# What the loop asks each turn: the reason to stop now (e.g. CANCELLED), or None to go on.
Check = Callable[[], RunState | None]
Stop = Callable[[RunState], None]


def describe_error(exc: BaseException) -> str:
    """An error on one log line: its type and the first line of its message."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__


@dataclass
class Watchdog:
    """Calls `stop(TIMED_OUT)` at the deadline, or `stop(reason)` once `check` names one."""

    run_id: int
    timeout: float
    check: Check
    stop: Stop
    poll_seconds: float = POLL_SECONDS
    backoff_max: float = BACKOFF_MAX_SECONDS

    def __post_init__(self) -> None:
        self.deadline = time.monotonic() + self.timeout  # counted again from `start`

    def start(self, finished: threading.Event) -> None:
        """Two threads until `finished` is set: the deadline's own, so a store read that hangs
        cannot hold it up, and the one that polls `check`. Neither raises."""
        self.deadline = time.monotonic() + self.timeout
        for name, target in (("deadline", self._at_deadline), ("cancel", self._poll)):
            threading.Thread(
                target=target, args=(finished,), name=f"run-{self.run_id}-{name}", daemon=True
            ).start()

    def _at_deadline(self, finished: threading.Event) -> None:
        if not finished.wait(max(0.0, self.deadline - time.monotonic())):
            self._stop(RunState.TIMED_OUT, finished)

    def _poll(self, finished: threading.Event) -> None:
        failures = 0
        wait = self.poll_seconds
        while not finished.wait(wait) and time.monotonic() < self.deadline:
            try:
                reason = self.check()
            except Exception as exc:  # noqa: BLE001 - the loop must outlive any failure
                failures += 1
                wait = self._backoff(failures)
                log.warning(
                    CANCEL_UNREAD.format(run_id=self.run_id, error=describe_error(exc), wait=wait)
                )
                continue
            if failures:
                log.warning(STORE_BACK.format(run_id=self.run_id, failures=failures))
                failures = 0
            wait = self.poll_seconds
            if reason is not None:
                self._stop(reason, finished)
                return

    def _stop(self, reason: RunState, finished: threading.Event) -> None:
        failures = 0
        while True:
            try:
                self.stop(reason)
                return
            except Exception as exc:  # noqa: BLE001 - a stop that failed is tried again
                failures += 1
                wait = self._backoff(failures)
                log.warning(
                    STOP_FAILED.format(run_id=self.run_id, error=describe_error(exc), wait=wait)
                )
                if finished.wait(wait):
                    return

    def _backoff(self, failures: int) -> float:
        return float(min(self.poll_seconds * 2**failures, self.backoff_max))
