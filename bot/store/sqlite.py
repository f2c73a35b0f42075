"""The delivery inbox's fast path and what SQLite needs around it.

`_DeliveryWriter` is `Store.record_delivery`'s group-commit writer on a raw connection (SQLite
or PostgreSQL); `_Checkpointer` copies SQLite's WAL off the request path; the fork hooks keep
both out of SQLite while a process forks; `configure_sqlite` sets every SQLite connection up.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import weakref
from contextlib import suppress
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, event

from bot.errors import TrimoError

log = logging.getLogger(__name__)

SQLITE_BUSY_TIMEOUT_MS = 30_000
# The delivery writer's WAL checkpoints (see _Checkpointer): how often the thread looks, the
# WAL size (pages) from which it has the WAL restarted, the remainder small enough for the
# writer to finish, and the size at which SQLite checkpoints in the writer whatever happens.
CHECKPOINT_POLL_SECONDS = 0.05
CHECKPOINT_RESTART_PAGES = 1000
CHECKPOINT_REMAINDER_PAGES = 200
CHECKPOINT_BACKSTOP_PAGES = 20_000
# How long a fork waits for the checkpoint thread to finish its pass (one pass takes milliseconds).
CHECKPOINT_JOIN_SECONDS = 30

BATCH_FAILED = "delivery {delivery_id} was not recorded: committing its batch failed"

_DELIVERY_WRITER_LOCK = threading.Lock()
_RECORD_DELIVERY = (
    "INSERT INTO deliveries (delivery_id, event, action, intents, received_at, processed_at) "
    "VALUES ({p}, {p}, {p}, {p}, {p}, {p}) ON CONFLICT (delivery_id) DO NOTHING"
)


def _sqlite_datetime(value: datetime) -> str:
    """A UTC time as SQLAlchemy's DateTime keeps it in SQLite ("%Y-%m-%d %H:%M:%S.%f", no zone:
    UTCDateTime drops it there); isoformat writes it in half the time of strftime."""
    return value.isoformat(" ", "microseconds")[:26]


class _PendingDelivery:
    """One `record_delivery` call waiting for the commit of its batch."""

    __slots__ = ("done", "error", "fresh", "params", "wake")

    def __init__(self, params: tuple[Any, ...]) -> None:
        self.params = params
        self.done = False
        self.fresh = False
        self.error: BaseException | None = None
        # Held from the start: the waiting thread blocks on it until a leader releases it.
        self.wake = threading.Lock()
        self.wake.acquire()


class _DeliveryWriter:
    """`Store.record_delivery`'s writes: one raw DBAPI connection per process, group commit.

    SQLAlchemy's statement building and session cost ten times the INSERT itself, and this runs
    once per webhook request; so the INSERT is a fixed, prepared statement on a raw connection
    (the driver's statement cache on SQLite, a server-side prepared statement on PostgreSQL).

    Concurrent callers share commits: the first caller becomes the leader, takes every
    delivery waiting at that moment, INSERTs them in one transaction and commits; the others
    wait until the commit of the batch holding theirs, then return. So a caller returns only
    once its row is committed, and one commit (one WAL append, or one PostgreSQL flush) serves
    many requests. A lone caller commits alone, with no hand-off to another thread.

    The connection belongs to the process that opened it: a forked child forgets the inherited
    one (SQLite connections must not cross fork) and opens its own. It closes with the engine.
    No fork happens while this process's SQLite is in use by the writer or its checkpoint thread:
    see `_before_fork`.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.sqlite = engine.dialect.name == "sqlite"
        self.sql = _RECORD_DELIVERY.format(p="?" if self.sqlite else "%s")
        self.connect_args = engine.dialect.create_connect_args(engine.url)
        self.forget()
        _DELIVERY_WRITERS.add(self)
        event.listen(engine, "engine_disposed", lambda _engine: self.close())

    def forget(self) -> None:
        """Start afresh without touching the connection (after fork it is the parent's)."""
        self.mutex = threading.Lock()
        # Held while a batch is written; a fork takes it so that no write is under way then.
        self.writing = threading.Lock()
        self.pending: list[_PendingDelivery] = []
        self.leading = False
        self.conn: Any = None
        # The parent's checkpoint thread does not exist in a forked child.
        self.checkpointer: _Checkpointer | None = None

    def close(self) -> None:
        with self.mutex:
            conn, self.conn = self.conn, None
            checkpointer, self.checkpointer = self.checkpointer, None
        if checkpointer is not None:
            checkpointer.close()
        if conn is not None:
            conn.close()

    def record(
        self,
        delivery_id: str,
        event: str,
        action: str | None,
        intents: str,
        received_at: datetime,
        processed_at: datetime | None,
    ) -> bool:
        if self.sqlite:
            stamps: tuple[Any, Any] = (
                _sqlite_datetime(received_at),
                processed_at and _sqlite_datetime(processed_at),
            )
        else:
            stamps = (received_at, processed_at)
        mine = _PendingDelivery((delivery_id, event, action, intents, *stamps))
        with self.mutex:
            self.pending.append(mine)
            lead = not self.leading
            self.leading = True
        if not lead:
            # Woken when a leader has committed our batch, or when we are the next leader.
            mine.wake.acquire()
        if not mine.done:
            self._lead()
            if mine.error is not None:
                raise mine.error
        elif mine.error is not None:
            raise TrimoError(BATCH_FAILED.format(delivery_id=delivery_id)) from mine.error
        return mine.fresh

    def _lead(self) -> None:
        with self.mutex:
            batch, self.pending = self.pending, []
        try:
            with self.writing:
                self._write(batch)
        except BaseException as exc:  # noqa: BLE001 - handed to every caller of the batch
            # Even on KeyboardInterrupt the batch's callers must be woken, or they wait forever.
            for entry in batch:
                entry.error = exc
        with self.mutex:
            following = self.pending[0] if self.pending else None
            self.leading = following is not None
        for entry in batch:
            entry.done = True
            entry.wake.release()
        if following is not None:
            # Leadership passes on: that caller commits whatever has gathered meanwhile.
            following.wake.release()

    def _write(self, batch: list[_PendingDelivery]) -> None:
        conn = self.conn or self._connect()
        checkpointer = self.checkpointer
        if checkpointer is not None:
            checkpointer.writes += 1
            if checkpointer.remainder_left:
                checkpointer.finish(conn)
        try:
            if len(batch) == 1:  # autocommit: the INSERT is its own transaction
                batch[0].fresh = self._insert(conn, batch[0].params)
            elif self.sqlite:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    for entry in batch:
                        entry.fresh = self._insert(conn, entry.params)
                    conn.execute("COMMIT")
                except BaseException:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise
            else:
                with conn.transaction():
                    for entry in batch:
                        entry.fresh = self._insert(conn, entry.params)
        except BaseException:
            for entry in batch:
                entry.fresh = False
            if not self.sqlite:
                # A broken PostgreSQL connection is replaced on the next call.
                self._drop(conn)
            raise

    def _insert(self, conn: Any, params: tuple[Any, ...]) -> bool:
        if self.sqlite:
            return bool(conn.execute(self.sql, params).rowcount == 1)
        return bool(conn.execute(self.sql, params, prepare=True).rowcount == 1)

    def _connect(self) -> Any:
        cargs, cparams = self.connect_args
        if self.sqlite:
            conn = sqlite3.connect(
                str(cargs[0]), isolation_level=None, check_same_thread=False, cached_statements=16
            )
            conn.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
            # Checkpoints are the checkpoint thread's; SQLite's own stays only as a bound.
            conn.execute(f"PRAGMA wal_autocheckpoint = {CHECKPOINT_BACKSTOP_PAGES}")
            self.checkpointer = _Checkpointer(str(cargs[0]))
            # A store dropped without close() must not leave its thread behind.
            weakref.finalize(self, self.checkpointer.stop)
        else:
            conn = self.engine.dialect.loaded_dbapi.connect(*cargs, **cparams)
            conn.autocommit = True
        self.conn = conn
        return conn

    def _drop(self, conn: Any) -> None:
        self.conn = None
        # The error that got us here is the one to report, not a failure to close.
        with suppress(Exception):
            conn.close()


class _Checkpointer:
    """Copies the delivery writer's WAL into the database file from a thread of its own.

    SQLite checkpoints in the connection that commits, once the WAL holds 1000 pages: there,
    every few hundred webhook requests one waited for the copy and two fsyncs (3-13 ms, longer
    as the database grows), about a third of the request thread's time under load. Here a
    thread runs PASSIVE checkpoints, which never block a writer, on a connection of its own
    (sqlite3 releases the GIL meanwhile).

    A WAL only starts over from its beginning when a writer finds every frame copied, which a
    thread copying behind a busy writer never achieves: the WAL would grow without end. So once
    the WAL is past CHECKPOINT_RESTART_PAGES, the thread copies again until what one pass found
    new is at most CHECKPOINT_REMAINDER_PAGES, and then leaves that remainder to the writer
    (`finish`, before its next write): a short wait, and the WAL starts over. SQLite's own
    checkpoint stays enabled at CHECKPOINT_BACKSTOP_PAGES, so the WAL is bounded whatever
    happens to this thread.

    A fork must not find this thread inside SQLite: the child would inherit SQLite's internal
    mutexes locked by a thread it does not have, and hang on its first SQLite call. So the thread
    is stopped before every fork (`pause`) and started again in the parent (`resume`); the child
    starts its own with its first write.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        # Set by the thread, read and cleared by the writer; a stale read only delays a restart.
        self.remainder_left = False
        # Counted by the writer, so an idle thread does not checkpoint a WAL nobody wrote to.
        self.writes = 0
        self.stopping = threading.Event()
        self.stopped = False
        self._start()

    def _start(self) -> None:
        self.thread = threading.Thread(target=self._run, name="trimo-checkpoint", daemon=True)
        self.thread.start()

    def finish(self, conn: sqlite3.Connection) -> None:
        """In the writer: copy the small remainder, so its next write starts the WAL over."""
        self.remainder_left = False
        conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()

    def stop(self) -> None:
        """For good (the store is closed or dropped): the thread ends after its current pass."""
        self.stopped = True
        self.stopping.set()

    def close(self) -> None:
        self.stop()
        if self.thread is not threading.current_thread():
            self.thread.join(timeout=5)

    def pause(self) -> None:
        """Before a fork: end the thread and wait until it has left SQLite."""
        self.stopping.set()
        self.thread.join(timeout=CHECKPOINT_JOIN_SECONDS)
        if self.thread.is_alive():
            log.warning(
                "the checkpoint thread of %s did not stop within %d s; forking anyway",
                self.path,
                CHECKPOINT_JOIN_SECONDS,
            )

    def resume(self) -> None:
        """After a fork, in the parent: a new thread takes over, unless the store was closed."""
        if not self.stopped and not self.thread.is_alive():
            self.stopping.clear()
            self._start()

    def _run(self) -> None:
        try:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error:
            log.exception(
                "the checkpoint thread cannot open %s; SQLite checkpoints alone", self.path
            )
            return
        try:
            conn.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
            conn.execute("PRAGMA synchronous = NORMAL")
            last = seen = 0
            while not self.stopping.wait(CHECKPOINT_POLL_SECONDS):
                if self.writes != seen:
                    seen = self.writes
                    last = self._checkpoint(conn, last)
        except sqlite3.Error:
            log.exception("checkpoint thread stopped; SQLite checkpoints alone")
        finally:
            conn.close()

    def _checkpoint(self, conn: sqlite3.Connection, last: int) -> int:
        """One round of passes; returns the WAL's size in pages at the end."""
        while not self.stopping.is_set():
            busy, size, _copied = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            # The pages written since the previous pass (all of them if the WAL started over).
            new = size - last if size >= last else size
            last = size
            if busy or size < CHECKPOINT_RESTART_PAGES:
                break
            if new <= CHECKPOINT_REMAINDER_PAGES:
                self.remainder_left = True
                break
        return last


_DELIVERY_WRITERS: weakref.WeakSet[_DeliveryWriter] = weakref.WeakSet()
# The writers `_before_fork` holds still, for the hooks after the fork.
_HELD_FOR_FORK: list[_DeliveryWriter] = []


def _before_fork() -> None:
    """No thread of the store is inside SQLite at the fork: every writer's write finishes first
    and none starts, and every checkpoint thread ends (the parent gets it back after)."""
    _DELIVERY_WRITER_LOCK.acquire()  # no writer is made meanwhile
    _HELD_FOR_FORK[:] = list(_DELIVERY_WRITERS)
    for writer in _HELD_FOR_FORK:
        writer.writing.acquire()
        if writer.checkpointer is not None:
            writer.checkpointer.pause()


def _after_fork_in_parent() -> None:
    for writer in _HELD_FOR_FORK:
        if writer.checkpointer is not None:
            writer.checkpointer.resume()
        writer.writing.release()
    _HELD_FOR_FORK.clear()
    _DELIVERY_WRITER_LOCK.release()


def _after_fork_in_child() -> None:
    # The parent's connections are not ours to use or close; the first write opens new ones and
    # starts this process's own checkpoint thread.
    for writer in _HELD_FOR_FORK:
        writer.forget()
    _HELD_FOR_FORK.clear()
    _DELIVERY_WRITER_LOCK.release()


os.register_at_fork(
    before=_before_fork,
    after_in_parent=_after_fork_in_parent,
    after_in_child=_after_fork_in_child,
)


def configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy's "begin" hook below issue BEGIN, so writes can use BEGIN IMMEDIATE.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA journal_mode = WAL")
        # In WAL mode NORMAL survives a process crash; only an OS crash may lose the last commit.
        cursor.execute("PRAGMA synchronous = NORMAL")
        cursor.execute("PRAGMA foreign_keys = ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        mode = conn.get_execution_options().get("trimo_begin", "DEFERRED")
        conn.exec_driver_sql(f"BEGIN {mode}")
