"""Delivery dispatch: stored deliveries acted on in parallel across installations.

Each installation has its own lane: its deliveries are handled one after another, in the order
they arrived, while other installations' lanes go on at the same time. So a flood of commands on
one installation, or its rate limit, never delays another's answers and reports; the client's
write gate keeps the writes to each installation one at a time.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from bot.errors import TrimoError
from bot.github.outbox import delivery_reports
from bot.intents import Intent, intents_from
from bot.logs import about_delivery
from bot.store import Delivery, Store

log = logging.getLogger(__name__)


def lane_of(delivery: Delivery) -> str:
    """The lane a delivery goes to: its installation, else its repository's owner."""
    for intent in delivery.intents:
        if isinstance(intent, dict):
            if intent.get("installation_id"):
                return f"installation:{intent['installation_id']}"
            if intent.get("repo"):
                return f"owner:{str(intent['repo']).split('/', 1)[0].lower()}"
    return "none"


class _Lane:
    """One installation's deliveries, handled in order by a thread that lives while there are."""

    def __init__(self, name: str, work: Callable[[Delivery], None]) -> None:
        self.name = name
        self._work = work
        self._queue: deque[Delivery] = deque()
        self._lock = threading.Lock()
        self._running = False

    def put(self, delivery: Delivery) -> None:
        with self._lock:
            self._queue.append(delivery)
            if self._running:
                return
            self._running = True
        threading.Thread(target=self._drain, name=f"trimo-{self.name}", daemon=True).start()

    def busy(self) -> bool:
        with self._lock:
            return self._running

    def _drain(self) -> None:
        while True:
            with self._lock:
                if not self._queue:
                    self._running = False
                    return
                delivery = self._queue.popleft()
            self._work(delivery)


class DeliveryLanes:
    """Claims stored deliveries and hands each to its installation's lane."""

    def __init__(self, store: Store, handle: Callable[[Intent], Any]) -> None:
        self.store = store
        self._handle = handle
        self._lanes: dict[str, _Lane] = {}
        self._lock = threading.Lock()

    def process_pending(self) -> int:
        """Claim every stored delivery not yet processed; returns how many were handed out.

        Returns without waiting for them: each lane finishes its own (see `idle`).
        """
        handed = 0
        while (delivery := self.store.claim_delivery()) is not None:
            self._lane(lane_of(delivery)).put(delivery)
            handed += 1
        return handed

    def idle(self) -> bool:
        """Whether every delivery handed out so far was processed."""
        with self._lock:
            lanes = list(self._lanes.values())
        return not any(lane.busy() for lane in lanes)

    def wait_idle(self, timeout: float) -> bool:
        """Wait until every delivery handed out was processed; False if `timeout` passed first."""
        deadline = time.monotonic() + timeout
        while not self.idle():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)
        return True

    def process(self, delivery: Delivery) -> None:
        """Act on one delivery's intents, then mark it processed (with the error, if any)."""
        error = None
        with about_delivery(delivery.delivery_id), delivery_reports():
            try:
                for intent in intents_from(delivery.intents):
                    self._handle(intent)
            except TrimoError as exc:
                # Said on purpose (GitHub refused, not one of Trimo's check runs): the reason
                # is enough.
                log.warning("delivery %s failed: %s", delivery.delivery_id, exc)
                error = f"{type(exc).__name__}: {exc}"
            except Exception as exc:
                log.exception("delivery %s failed", delivery.delivery_id)
                error = f"{type(exc).__name__}: {exc}"
        self.store.finish_delivery(delivery.delivery_id, error)

    def _lane(self, name: str) -> _Lane:
        with self._lock:
            if name not in self._lanes:
                self._lanes[name] = _Lane(name, self.process)
            return self._lanes[name]
