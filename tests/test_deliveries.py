"""The delivery inbox: failed processing retried with backoff up to a limit, then marked failed;
leases keep two workers from processing one delivery; `trimo deliveries` lists and retries."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from bot.errors import TrimoError
from bot.github.deliveries import DeliveryLanes
from bot.store import DeliveryState, Store


def wait_for(condition: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"not reached within {timeout} s: {what}")


def _intents(name: str) -> str:
    intent = {
        "type": "help",
        "repo": "octo/hello",
        "number": 1,
        "sender": name,
        "sender_type": "User",
        "installation_id": 1,
        "delivery_id": f"d-{name}",
    }
    return json.dumps([intent])


@pytest.fixture
def store(store_url: str) -> Iterator[Store]:
    with Store(store_url) as opened:
        yield opened


class Handler:
    """Counts each delivery's attempts; fails as told."""

    def __init__(
        self, failures: dict[str, int], refuse: frozenset[str] = frozenset(), slow: float = 0
    ) -> None:
        self.failures = failures
        self.refuse = refuse
        self.slow = slow
        self.calls: Counter[str] = Counter()
        self.done: Counter[str] = Counter()
        self.lock = threading.Lock()

    def __call__(self, intent: Any) -> None:
        name = intent.sender
        with self.lock:
            self.calls[name] += 1
            calls = self.calls[name]
        time.sleep(self.slow)
        if name in self.refuse:
            raise TrimoError(f"{name} may not command Trimo")
        if calls <= self.failures.get(name, 0):
            raise ConnectionError(f"the store did not answer ({name}, attempt {calls})")
        with self.lock:
            self.done[name] += 1


def _drain(lanes: list[DeliveryLanes], until: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not until():
        for worker in lanes:
            worker.process_pending()
        time.sleep(0.05)
    for worker in lanes:
        assert worker.wait_idle(10)


def test_failed_processing_is_retried_with_backoff_then_marked_failed(store: Store) -> None:
    handler = Handler({"flaky": 2, "broken": 99}, refuse=frozenset({"refused"}))
    lanes = DeliveryLanes(store, handler, owner="worker-a", attempts=3, backoff=0.2, lease=5)
    for name in ("flaky", "broken", "refused", "fine"):
        store.record_delivery(f"d-{name}", "issue_comment", "created", _intents(name))

    def settled() -> bool:
        return store.delivery_counts()[DeliveryState.PENDING] == 0

    started = time.monotonic()
    _drain([lanes], settled, 20)
    took = time.monotonic() - started
    infos = {i.delivery_id: i for i in store.list_deliveries()}
    assert handler.done == Counter({"flaky": 1, "fine": 1})
    assert infos["d-flaky"].state == DeliveryState.PROCESSED and infos["d-flaky"].attempts == 3
    assert infos["d-fine"].state == DeliveryState.PROCESSED and infos["d-fine"].attempts == 1
    # Three attempts in all, then failed with the last reason.
    assert handler.calls["broken"] == 3
    broken = infos["d-broken"]
    assert broken.state == DeliveryState.FAILED
    assert broken.error and "gave up after 3 attempts" in broken.error
    assert "the store did not answer (broken, attempt 3)" in broken.error
    # A refusal said on purpose is not tried again.
    assert handler.calls["refused"] == 1
    assert infos["d-refused"].state == DeliveryState.FAILED
    assert "may not command Trimo" in (infos["d-refused"].error or "")
    # Backoff: 0.2 s, then 0.4 s before the third attempt.
    assert took >= 0.6
    assert store.retried_deliveries() == 1


def test_a_leased_delivery_is_processed_by_one_worker_only(store: Store) -> None:
    # Processing takes longer than the lease: renewal keeps it from the other worker.
    handler = Handler({}, slow=2.5)
    workers = [
        DeliveryLanes(store, handler, owner=f"worker-{n}", attempts=3, backoff=0.1, lease=1)
        for n in "ab"
    ]
    for n in range(4):
        store.record_delivery(f"d-{n}", "issue_comment", "created", _intents(f"s{n}"))

    def settled() -> bool:
        return store.delivery_counts()[DeliveryState.PENDING] == 0

    _drain(workers, settled, 30)
    assert handler.calls == Counter({f"s{n}": 1 for n in range(4)})
    assert all(i.attempts == 1 for i in store.list_deliveries())


def test_trimo_deliveries_lists_and_retries_a_failed_one(store_url: str, tmp_path: Path) -> None:
    with Store(store_url) as store:
        store.record_delivery("d-failed-1", "issues", "labeled", _intents("x"))
        claimed = store.claim_delivery("w")
        assert claimed is not None
        store.finish_delivery("d-failed-1", "gave up after 5 attempts; HTTP 502", owner="w")
    env = os.environ | {
        "TRIMO_DATA_DIR": str(tmp_path / "data"),
        "TRIMO_DATABASE_URL": store_url,
        # No engine: these commands need none, and must not reap anyone's containers.
        "DOCKER_HOST": f"unix://{tmp_path}/no-engine.sock",
    }

    def trimo(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "bot", "deliveries", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    listed = trimo("ls", "--state", "failed")
    assert listed.returncode == 0, listed.stderr
    assert "1 failed" in listed.stdout
    assert "d-failed-1" in listed.stdout and "gave up after 5 attempts; HTTP 502" in listed.stdout
    retried = trimo("retry", "d-failed-1")
    assert retried.returncode == 0, retried.stderr
    assert "queued again" in retried.stdout
    again = trimo("retry", "d-failed-1")
    assert again.returncode != 0 and "not processed yet" in again.stderr
    missing = trimo("retry", "no-such-delivery")
    assert missing.returncode != 0 and "trimo deliveries ls" in missing.stderr
    with Store(store_url) as store:
        delivery = store.claim_delivery("w")
        assert delivery is not None and delivery.delivery_id == "d-failed-1"
        assert delivery.previous_error == "gave up after 5 attempts; HTTP 502"
