"""A process that owns a store forks (Granian's workers, their respawns) and no child hangs.

A fork taken while another thread is inside SQLite leaves SQLite's internal mutexes locked in the
child, which then hangs on its first SQLite call. The store's own threads (the delivery writer's
commit, the checkpoint thread) are held still for every fork; this forks while both are busy.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from bot.store import Store, _Checkpointer

FORKS = 200
# A child does one write and one read; far longer than that means it hangs.
CHILD_ALARM_SECONDS = 10


def _child(store: Any, n: int, parent_checkpointer: threading.Thread) -> str:
    """In the forked child: write and read through the store as a Granian worker does; returns
    what went wrong, or "" when nothing did."""
    store.after_fork()
    if store.record_delivery(f"child-{n}", "issues", "labeled", "[]") is not True:
        return "its delivery was not recorded as new"
    own = store._delivery_writer.checkpointer
    if own is None or own.thread is parent_checkpointer or not own.thread.is_alive():
        return "it has no checkpoint thread of its own"
    if store.pending_deliveries() < 1:
        return "it does not see the deliveries"
    return ""


def test_forks_while_the_checkpoint_thread_is_busy_never_leave_a_child_hanging(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The checkpoint thread looks all the time and the WAL crosses its thresholds often, so it is
    # mostly inside a checkpoint; a writer thread keeps it fed.
    monkeypatch.setattr("bot.store.sqlite.CHECKPOINT_POLL_SECONDS", 0.001)
    monkeypatch.setattr("bot.store.sqlite.CHECKPOINT_RESTART_PAGES", 50)
    monkeypatch.setattr("bot.store.sqlite.CHECKPOINT_REMAINDER_PAGES", 10)
    passing = threading.Event()  # set while the checkpoint thread is inside a pass
    passes = [0]
    checkpoint = _Checkpointer._checkpoint

    def counted(self: _Checkpointer, conn: Any, last: int) -> int:
        passing.set()
        try:
            passes[0] += 1
            return checkpoint(self, conn, last)
        finally:
            passing.clear()

    monkeypatch.setattr(_Checkpointer, "_checkpoint", counted)
    intents = json.dumps([{"body": "x" * 1300}])
    store: Any = Store(Store.sqlite_url(tmp_path))
    stop = threading.Event()
    # Set while the parent writes; cleared while a child runs, which would otherwise wait its turn
    # for SQLite's write lock behind a writer that never pauses.
    feeding = threading.Event()
    written = [0]

    def write() -> None:
        while feeding.wait() and not stop.is_set():
            store.record_delivery(f"parent-{written[0]}", "issues", "labeled", intents)
            written[0] += 1

    writer = threading.Thread(target=write, name="test-writer", daemon=True)
    failures: list[str] = []
    busy_at_fork = 0
    started = time.monotonic()
    try:
        store.record_delivery("first", "issues", "labeled", intents)
        first_thread = store._delivery_writer.checkpointer.thread
        writer.start()
        for n in range(FORKS):
            feeding.set()
            # Forked once the writer is going and the checkpoint thread has work in hand.
            deadline, goal = time.monotonic() + 10, passes[0] + 2
            while passes[0] < goal and time.monotonic() < deadline:
                time.sleep(0.001)
            parent_thread = store._delivery_writer.checkpointer.thread
            busy_at_fork += passing.is_set()
            read_end, write_end = os.pipe()
            pid = os.fork()
            if pid == 0:
                # Bounded whatever happens: a child stuck in SQLite dies of SIGALRM (the kernel's
                # default action, not pytest-timeout's handler, which a stuck child cannot run).
                signal.signal(signal.SIGALRM, signal.SIG_DFL)
                signal.alarm(CHILD_ALARM_SECONDS)
                wrong = "it raised"
                try:
                    wrong = _child(store, n, parent_thread)
                except BaseException as exc:  # noqa: BLE001 - reported to the parent
                    wrong = f"it raised {exc!r}"
                finally:
                    os.write(write_end, wrong.encode()[:500])
                    os._exit(0)
            os.close(write_end)
            feeding.clear()
            _, status = os.waitpid(pid, 0)
            with os.fdopen(read_end, "rb") as answer:
                wrong = answer.read().decode()
            if os.waitstatus_to_exitcode(status) == -signal.SIGALRM:
                wrong = f"it hung, killed by its {CHILD_ALARM_SECONDS} s alarm"
            if wrong:
                failures.append(f"child {n}: {wrong}")
                break  # one is enough to fail; do not wait out 200 alarms
        elapsed = time.monotonic() - started
    finally:
        stop.set()
        feeding.set()
        writer.join(timeout=30)
    try:
        assert not failures, failures
        # The parent's checkpoint thread came back after the forks (a new one: threads do not
        # restart) and the parent's writes went on.
        after = store._delivery_writer.checkpointer.thread
        assert after.is_alive() and after is not first_thread
        assert store.record_delivery("last", "issues", "labeled", "[]") is True
        with store.engine.connect() as conn:
            children = conn.exec_driver_sql(
                "SELECT count(*) FROM deliveries WHERE delivery_id LIKE 'child-%'"
            ).scalar()
        assert children == FORKS
        assert written[0] > FORKS
        print(
            f"{FORKS} forks in {elapsed:.1f} s, {busy_at_fork} of them with a checkpoint pass "
            f"under way just before; {passes[0]} passes, {written[0]} parent writes"
        )
    finally:
        store.close()
