"""A run's deadline and its cancel, enforced by a loop that outlives a failing store.

The loop is the only thing that stops a container whose agent never ends, so nothing the store
or the engine raises may end it: a failed read is one log line and a retry with backoff, and the
deadline is kept on the clock meanwhile, so a store that is down delays a cancel, never a timeout.
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


def _describe(exc: BaseException) -> str:
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
        self.deadline = time.monotonic() + self.timeout

    def start(self, finished: threading.Event) -> threading.Thread:
        thread = threading.Thread(
            target=self.run, args=(finished,), name=f"run-{self.run_id}-watchdog", daemon=True
        )
        thread.start()
        return thread

    def run(self, finished: threading.Event) -> None:
        """Until `finished` is set: never raises, whatever `check` and `stop` do."""
        reason: RunState | None = None
        failures = 0
        wait = self.poll_seconds
        while True:
            left = self.deadline - time.monotonic()
            if reason is None and finished.wait(max(0.0, min(wait, left))):
                return
            if reason is None and time.monotonic() >= self.deadline:
                reason = RunState.TIMED_OUT
            if reason is None:
                try:
                    reason = self.check()
                except Exception as exc:  # noqa: BLE001 - the loop must outlive any failure
                    failures += 1
                    wait = self._backoff(failures)
                    log.warning(
                        CANCEL_UNREAD.format(run_id=self.run_id, error=_describe(exc), wait=wait)
                    )
                    continue
                if failures:
                    log.info(STORE_BACK.format(run_id=self.run_id, failures=failures))
                    failures = 0
                wait = self.poll_seconds
                if reason is None:
                    continue
            try:
                self.stop(reason)
                return
            except Exception as exc:  # noqa: BLE001 - a stop that failed is tried again
                failures += 1
                wait = self._backoff(failures)
                log.warning(STOP_FAILED.format(run_id=self.run_id, error=_describe(exc), wait=wait))
                if finished.wait(wait):
                    return

    def _backoff(self, failures: int) -> float:
        return float(min(self.poll_seconds * 2**failures, self.backoff_max))
