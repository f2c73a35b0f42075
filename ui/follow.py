"""Following a run's log live: one poller per followed run, shared by all who follow it.

Each follower of a run would otherwise query the store several times a second; fifty of them
would compete with the run's own log writes. One thread per run polls, keeps the newest rows
in memory and wakes every follower; a follower further back (a reconnect with an old
Last-Event-ID) reads the store itself until it catches up with the shared rows.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

from bot.errors import NoSuchRunError
from bot.store import RunEventRow, Store

POLL_SECONDS = 0.2
KEEP_ROWS = 5000
PAGE_ROWS = 1000
# A feed nobody follows any more stops after this long.
IDLE_SECONDS = 10.0


@dataclass
class _Feed:
    run_id: int
    base: int  # every row with an id above this one is in `rows` or still to come
    rows: deque[RunEventRow] = field(default_factory=lambda: deque(maxlen=KEEP_ROWS))
    finished: bool = False
    followers: int = 0
    idle_since: float = field(default_factory=time.monotonic)
    cond: threading.Condition = field(default_factory=threading.Condition)

    @property
    def last(self) -> int:
        return self.rows[-1].id if self.rows else self.base


class LogHub:
    """Live feeds of runs' events (log lines, states, any other kind), by run id."""

    def __init__(self, store: Store, poll_seconds: float = POLL_SECONDS) -> None:
        self.store = store
        self.poll_seconds = poll_seconds
        self._feeds: dict[int, _Feed] = {}
        self._lock = threading.Lock()

    def follow(
        self, run_id: int, after: int, *, max_seconds: float, keepalive: float = 10.0
    ) -> Iterator[list[RunEventRow]]:
        """Rows of `run_id` with ids above `after`, in batches as they are added, until the run
        finished and every row was given, or `max_seconds` passed. An empty batch means "still
        here, nothing new" (every `keepalive` seconds)."""
        feed = self._join(run_id, after)
        cursor = after
        deadline = time.monotonic() + max_seconds
        quiet_since = time.monotonic()
        try:
            while True:
                if cursor < feed.base:
                    # Behind what the feed keeps: read the store up to where the feed begins.
                    page = self.store.events(run_id, after_id=cursor, limit=PAGE_ROWS)
                    page = [r for r in page if r.id <= feed.base]
                    if page:
                        yield page
                        cursor = page[-1].id
                        continue
                    cursor = feed.base
                with feed.cond:
                    fresh = [r for r in feed.rows if r.id > cursor]
                    done = feed.finished and not fresh and cursor >= feed.last
                    if not fresh and not done:
                        left = deadline - time.monotonic()
                        if left <= 0:
                            return
                        feed.cond.wait(min(left, keepalive))
                        fresh = [r for r in feed.rows if r.id > cursor]
                if done:
                    return
                if fresh and fresh[0].id > cursor and cursor < feed.base:
                    continue  # the feed moved past us while we waited: catch up from the store
                if fresh:
                    yield fresh
                    cursor = fresh[-1].id
                    quiet_since = time.monotonic()
                elif time.monotonic() - quiet_since >= keepalive:
                    quiet_since = time.monotonic()
                    yield []
                if time.monotonic() >= deadline:
                    return
        finally:
            self._leave(feed)

    def followers(self, run_id: int) -> int:
        with self._lock:
            feed = self._feeds.get(run_id)
            return feed.followers if feed else 0

    def _join(self, run_id: int, after: int) -> _Feed:
        with self._lock:
            feed = self._feeds.get(run_id)
            if feed is None:
                feed = _Feed(run_id, base=after)
                self._feeds[run_id] = feed
                threading.Thread(
                    target=self._poll, args=(feed,), name=f"trimo-follow-{run_id}", daemon=True
                ).start()
            feed.followers += 1
            return feed

    def _leave(self, feed: _Feed) -> None:
        with self._lock:
            feed.followers -= 1
            if feed.followers == 0:
                feed.idle_since = time.monotonic()

    def _poll(self, feed: _Feed) -> None:
        while True:
            with self._lock:
                if feed.followers == 0 and time.monotonic() - feed.idle_since > IDLE_SECONDS:
                    del self._feeds[feed.run_id]
                    return
            rows = self.store.events(feed.run_id, after_id=feed.last, limit=PAGE_ROWS)
            finished = False
            if not rows:
                try:
                    finished = self.store.get_run(feed.run_id).finished
                except NoSuchRunError:
                    finished = True
                if finished:
                    # Rows written between the read above and the state read.
                    rows = self.store.events(feed.run_id, after_id=feed.last, limit=PAGE_ROWS)
            with feed.cond:
                for row in rows:
                    if len(feed.rows) == feed.rows.maxlen:
                        feed.base = feed.rows[0].id
                    feed.rows.append(row)
                feed.finished = finished and not rows
                if rows or feed.finished:
                    feed.cond.notify_all()
            if len(rows) < PAGE_ROWS:
                time.sleep(self.poll_seconds)
