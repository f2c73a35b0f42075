"""Run leases: a worker holds each run it executes under a lease its own process renews.

The lease is in the runs table: its owner (the worker id, `bot.worker.worker_id`), the host and
the time it ends. A thread of the worker process (`LeaseKeeper`) pushes that time forward every
few seconds for every run the process executes, whatever the run is doing: preparing its
workspace, building its image, running the agent, publishing. So a run is judged by whether
its worker process lives, not by its container (which exists for only part of a run) nor by how
long a phase takes. A run whose lease ran out is dead once its worker is shown gone: on another
host the expiry is the proof; on this host the owner's pid must be gone too (`lease_dead`).
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bot.store import Run, Store

log = logging.getLogger(__name__)

RENEW_FAILED = "renewing the leases of runs %s failed; retrying in %.1f s"
LEASE_LOST = (
    "run %s: its lease was lost (another worker judged it dead after %s without renewal); "
    "stopping it"
)


@dataclass(frozen=True)
class LeaseTerms:
    """How long a lease lasts without renewal, and how often its worker renews it."""

    length: timedelta = timedelta(seconds=30)
    renew_every: timedelta = timedelta(seconds=5)

    def __post_init__(self) -> None:
        if self.renew_every * 2 > self.length:
            raise ValueError(
                f"a lease of {self.length} renewed every {self.renew_every} lapses after one "
                "late renewal; renew at least twice per lease"
            )


class LeaseKeeper:
    """Renews, from one thread of this process, the leases of the runs it `hold`s."""

    def __init__(self, store: Store, owner: str, terms: LeaseTerms) -> None:
        self.store = store
        self.owner = owner
        self.terms = terms
        self._held: dict[int, Callable[[], None]] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    @contextmanager
    def hold(self, run_id: int, on_lost: Callable[[], None]) -> Iterator[None]:
        """Keep the lease on `run_id` while the block runs; `on_lost` is called (from the
        keeper's thread, once) if the store says the lease is no longer this worker's."""
        with self._lock:
            self._held[run_id] = on_lost
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="trimo-leases", daemon=True)
                self._thread.start()
        try:
            yield
        finally:
            with self._lock:
                self._held.pop(run_id, None)

    def held(self) -> set[int]:
        with self._lock:
            return set(self._held)

    def _run(self) -> None:
        period = self.terms.renew_every.total_seconds()
        delay = period
        while True:
            self._wake.wait(delay)
            with self._lock:
                if not self._held:
                    self._thread = None
                    return
                ids = set(self._held)
            try:
                kept = self.store.renew_leases(self.owner, ids, self.terms.length)
            except Exception:
                # Sooner than the period: the lease is running out meanwhile.
                delay = max(period / 4, 0.1)
                log.warning(RENEW_FAILED, sorted(ids), delay, exc_info=True)
                continue
            delay = period
            for run_id in sorted(ids - kept):
                with self._lock:
                    on_lost = self._held.pop(run_id, None)
                if on_lost is not None:
                    log.warning(LEASE_LOST, run_id, self.terms.length)
                    # Stopping a container takes seconds: the other runs' leases go on meanwhile.
                    threading.Thread(
                        target=on_lost, name=f"run-{run_id}-lease-lost", daemon=True
                    ).start()


def lease_dead(run: Run, alive: Callable[[str], bool | None], host: str | None = None) -> bool:
    """Whether `run`'s worker is gone, for a run whose lease has expired: on another host the
    expiry says so; on this host its process must be gone too (a worker paused longer than its
    lease, e.g. a stopped VM, is not dead). `alive(owner)` checks a local worker id."""
    here = host or socket.gethostname()
    if run.lease_host != here or not run.worker_id:
        return True
    return alive(run.worker_id) is not True
