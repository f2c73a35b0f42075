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
import uuid
from collections import deque
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from bot.errors import TrimoError
from bot.github.client import GitHubWriteError
from bot.github.outbox import delivery_reports
from bot.intents import Intent, intents_from
from bot.logs import about_delivery
from bot.store import DELIVERY_LEASE, Delivery, Store

log = logging.getLogger(__name__)

GAVE_UP = "gave up after {attempts} attempts; the last failed with {error}"


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
    """Claims stored deliveries under a lease and hands each to its installation's lane.

    A lease is held from the claim until the delivery is finished and renewed meanwhile (every
    third of its length), so no other worker takes a delivery that is waiting in a lane or being
    processed, and one whose worker died is taken again once its lease expired. Processing that
    fails is tried again after `backoff` seconds, doubling, `attempts` times in all; then the
    delivery is marked failed with its reason (`trimo deliveries retry` tries it again)."""

    def __init__(
        self,
        store: Store,
        handle: Callable[[Intent], Any],
        *,
        owner: str = "",
        attempts: int = 5,
        backoff: float = 5.0,
        lease: float = DELIVERY_LEASE.total_seconds(),
    ) -> None:
        self.store = store
        self._handle = handle
        self.owner = owner or f"deliveries-{uuid.uuid4().hex[:12]}"
        self.attempts = attempts
        self.backoff = backoff
        self.lease = timedelta(seconds=lease)
        self._lanes: dict[str, _Lane] = {}
        self._lock = threading.Lock()
        self._held: set[str] = set()
        self._renewer: threading.Thread | None = None

    def process_pending(self) -> int:
        """Claim every stored delivery that is due; returns how many were handed out.

        Returns without waiting for them: each lane finishes its own (see `idle`).
        """
        handed = 0
        while (delivery := self.store.claim_delivery(self.owner, self.lease)) is not None:
            with self._lock:
                self._held.add(delivery.delivery_id)
                self._start_renewer()
            self._lane(lane_of(delivery)).put(delivery)
            handed += 1
        return handed

    def held(self) -> set[str]:
        """The deliveries this worker holds now (claimed, not yet finished)."""
        with self._lock:
            return set(self._held)

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
        """Act on one delivery's intents, then mark it processed, or retry it later."""
        error, retry = None, False
        with about_delivery(delivery.delivery_id), delivery_reports():
            try:
                for intent in intents_from(delivery.intents):
                    self._handle(intent)
            except GitHubWriteError as exc:
                # GitHub kept failing (5xx, rate limits): it will take it later.
                log.warning("delivery %s failed: %s", delivery.delivery_id, exc)
                error, retry = f"{type(exc).__name__}: {exc}", True
            except TrimoError as exc:
                # Said on purpose (GitHub refused, not one of Trimo's check runs): the reason
                # is enough, and trying again would only say it again.
                log.warning("delivery %s failed: %s", delivery.delivery_id, exc)
                error = f"{type(exc).__name__}: {exc}"
            except Exception as exc:
                # The store, the network, a bug: another attempt may well succeed.
                log.exception("delivery %s failed", delivery.delivery_id)
                error, retry = f"{type(exc).__name__}: {exc}", True
        self._settle(delivery, error, retry)

    def _settle(self, delivery: Delivery, error: str | None, retry: bool) -> None:
        """Record how processing went; the store may be away for a moment (a restart), so this
        is tried until it works or the lease is lost (then the next holder decides)."""
        wait = 0.1
        deadline = time.monotonic() + self.lease.total_seconds()
        while True:
            try:
                if error is not None and retry and delivery.attempts < self.attempts:
                    later = timedelta(seconds=self.backoff * 2 ** (delivery.attempts - 1))
                    log.info(
                        "delivery %s: attempt %d of %d failed; again in %s",
                        delivery.delivery_id,
                        delivery.attempts,
                        self.attempts,
                        later,
                    )
                    self.store.retry_delivery_later(delivery.delivery_id, error, later, self.owner)
                else:
                    if error is not None and retry:
                        error = GAVE_UP.format(attempts=delivery.attempts, error=error)
                    self.store.finish_delivery(delivery.delivery_id, error, self.owner)
                break
            except Exception:
                if time.monotonic() + wait > deadline:
                    log.exception(
                        "delivery %s: its outcome could not be stored", delivery.delivery_id
                    )
                    break
                log.warning("delivery %s: the store did not answer; retrying", delivery.delivery_id)
                time.sleep(wait)
                wait = min(wait * 2, 5.0)
        with self._lock:
            self._held.discard(delivery.delivery_id)

    def _start_renewer(self) -> None:
        # Called with self._lock held.
        if self._renewer is not None and self._renewer.is_alive():
            return
        self._renewer = threading.Thread(
            target=self._renew_forever, name="trimo-delivery-leases", daemon=True
        )
        self._renewer.start()

    def _renew_forever(self) -> None:
        every = self.lease.total_seconds() / 3
        while True:
            time.sleep(every)
            held = self.held()
            if not held:
                with self._lock:
                    if not self._held:
                        self._renewer = None
                        return
                continue
            try:
                self.store.renew_delivery_leases(self.owner, held, self.lease)
            except Exception:
                log.warning("delivery leases could not be renewed; trying again", exc_info=True)

    def _lane(self, name: str) -> _Lane:
        with self._lock:
            if name not in self._lanes:
                self._lanes[name] = _Lane(name, self.process)
            return self._lanes[name]
