"""The two sides of the cancel-vs-claim race, each in a process of its own (spawned).

Each round, both wait at a barrier, then act on the same queued run: one claims it, the other
cancels it. What each saw is sent back for the test to check that exactly one won.
"""

from __future__ import annotations

import threading
from typing import Any

from bot.store import Store


def claimer(url: str, run_ids: list[int], barrier: Any, results: Any) -> None:
    store = Store(url)
    won = []
    try:
        for run_id in run_ids:
            barrier.wait(30)
            won.append(store.claim_run("claimer", run_id) is not None)
    finally:
        store.close()
    results.put(("claimer", won))


def canceller(url: str, run_ids: list[int], barrier: Any, results: Any) -> None:
    store = Store(url)
    won = []
    try:
        for run_id in run_ids:
            barrier.wait(30)
            won.append(store.cancel_run(run_id, "stopped by mona")[1])
    finally:
        store.close()
    results.put(("canceller", won))


def race_in_threads(store: Store, run_ids: list[int]) -> tuple[list[bool], list[bool]]:
    """The same race between two threads of this process (one store, two connections)."""
    barrier = threading.Barrier(2)
    claimed: list[bool] = []
    cancelled: list[bool] = []

    def claim() -> None:
        for run_id in run_ids:
            barrier.wait(30)
            claimed.append(store.claim_run("claimer", run_id) is not None)

    def cancel() -> None:
        for run_id in run_ids:
            barrier.wait(30)
            cancelled.append(store.cancel_run(run_id, "stopped by mona")[1])

    threads = [threading.Thread(target=claim), threading.Thread(target=cancel)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return claimed, cancelled
