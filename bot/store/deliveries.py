"""The delivery inbox: webhook deliveries recorded by the receiver, claimed by the worker.

A claim leases the delivery to its worker (owner and expiry); the worker renews the lease while
it processes it, and only the holder may finish it or put it off, so an expired lease (its
worker died), never a clock, hands it to another. A failed attempt is kept with its reason and
the time of its retry; a finished one can be queued again by hand (`retry_delivery`)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import timedelta
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from bot.store.base import StoreBase, utcnow
from bot.store.models import Delivery, DeliveryInfo, DeliveryState
from bot.store.records import DeliveryRecord, DeliveryRunRecord
from bot.store.sqlite import _DELIVERY_WRITER_LOCK, _DeliveryWriter

# A delivery is processed under a lease this long, renewed while it is processed; a worker
# that died leaves it to another once the lease has expired.
DELIVERY_LEASE = timedelta(seconds=60)
# How long a processed delivery's id is kept to recognise a redelivery: GitHub redelivers
# (automatically or when asked) within 3 days.
DELIVERY_KEEP = timedelta(days=7)


class Deliveries(StoreBase):
    """Webhook deliveries: recorded once each, claimed by one worker, kept for a while."""

    # Every delivery with a smaller id is processed (see `_advance_pending_from`).
    _pending_from = 0

    # -- webhook deliveries ---------------------------------------------------------------------

    def record_delivery(
        self, delivery_id: str, event: str, action: str | None, intents: str
    ) -> bool:
        """Store a delivery and what it asks for; False when this delivery id was seen before.

        Runs inside the webhook request, so it is one prepared INSERT ... ON CONFLICT DO NOTHING
        on a raw connection of this thread, committed before it returns. A delivery with no
        intents is kept for deduplication but is already processed.
        """
        writer = self.__dict__.get("_delivery_writer")
        if writer is None:
            with _DELIVERY_WRITER_LOCK:
                writer = self.__dict__.get("_delivery_writer")
                if writer is None:
                    writer = self._delivery_writer = _DeliveryWriter(self.engine)
        now = utcnow()
        return writer.record(
            delivery_id, event, action, intents, now, now if intents.strip() == "[]" else None
        )

    def after_fork(self) -> None:
        """In a forked child: forget the parent's connections (never use or close them)."""
        writer = self.__dict__.get("_delivery_writer")
        if writer is not None:
            writer.forget()
        # close=False: the parent still owns those connections; only forget them here.
        self.engine.dispose(close=False)

    def claim_delivery(self, owner: str = "", lease: timedelta = DELIVERY_LEASE) -> Delivery | None:
        """The oldest delivery due for processing, leased to `owner` so no one else takes it.

        Due: not processed, its retry time (if any) reached, and no live lease on it (one whose
        worker died is taken again once its lease has expired)."""
        now = utcnow()
        free = (DeliveryRecord.lease_until.is_(None)) | (DeliveryRecord.lease_until <= now)
        due = (DeliveryRecord.next_attempt_at.is_(None)) | (DeliveryRecord.next_attempt_at <= now)
        for _ in range(5):
            with self._write() as s:
                start = self._advance_pending_from(s)
                target = s.execute(
                    select(DeliveryRecord.id)
                    .where(
                        DeliveryRecord.id >= start,
                        DeliveryRecord.processed_at.is_(None),
                        free,
                        due,
                    )
                    .order_by(DeliveryRecord.id)
                    .limit(1)
                    .with_for_update(skip_locked=True)
                ).scalar_one_or_none()
                if target is None:
                    return None
                result = s.execute(
                    update(DeliveryRecord)
                    .where(DeliveryRecord.id == target, DeliveryRecord.processed_at.is_(None), free)
                    .values(
                        taken_at=func.coalesce(DeliveryRecord.taken_at, now),
                        lease_owner=owner,
                        lease_until=now + lease,
                        attempts=DeliveryRecord.attempts + 1,
                    )
                    .execution_options(synchronize_session=False)
                )
                if result.rowcount == 1:  # type: ignore[attr-defined]
                    row = s.get_one(DeliveryRecord, target, populate_existing=True)
                    return Delivery(
                        delivery_id=row.delivery_id,
                        event=row.event,
                        action=row.action,
                        intents=json.loads(row.intents),
                        received_at=row.received_at,
                        previous_error=row.error,
                        attempts=row.attempts,
                    )
        return None

    def renew_delivery_leases(
        self, owner: str, delivery_ids: Iterable[str], lease: timedelta = DELIVERY_LEASE
    ) -> int:
        """Extend `owner`'s leases on these deliveries; returns how many it still held."""
        ids = list(delivery_ids)
        if not ids:
            return 0
        with self._write() as s:
            result = s.execute(
                update(DeliveryRecord)
                .where(
                    DeliveryRecord.delivery_id.in_(ids),
                    DeliveryRecord.lease_owner == owner,
                    DeliveryRecord.processed_at.is_(None),
                )
                .values(lease_until=utcnow() + lease)
            )
            return int(result.rowcount)  # type: ignore[attr-defined]

    def retry_delivery_later(
        self, delivery_id: str, error: str, wait: timedelta, owner: str | None = None
    ) -> bool:
        """Give up the lease and have the delivery taken again after `wait`, keeping why its
        attempt failed; False when `owner` no longer held it (another worker has it now)."""
        stmt = update(DeliveryRecord).where(
            DeliveryRecord.delivery_id == delivery_id, DeliveryRecord.processed_at.is_(None)
        )
        if owner is not None:
            stmt = stmt.where(DeliveryRecord.lease_owner == owner)
        with self._write() as s:
            result = s.execute(
                stmt.values(
                    error=error, next_attempt_at=utcnow() + wait, lease_owner=None, lease_until=None
                )
            )
            return bool(result.rowcount == 1)  # type: ignore[attr-defined]

    def delivery_run(self, key: str) -> int | None:
        """The run that processing a delivery queued under `key`, if it did."""
        with self._read() as s:
            row = s.get(DeliveryRunRecord, key)
            return row.run_id if row else None

    def get_delivery(self, key: str) -> DeliveryInfo | None:
        """A stored delivery by its delivery id (GitHub's) or its row id."""
        with self._read() as s:
            row = s.execute(_delivery_by(key)).scalar_one_or_none()
            return _delivery_info(row) if row else None

    def retry_delivery(self, key: str) -> DeliveryInfo | None:
        """Queue a processed (or failed) delivery again, by its delivery id or row id; None
        when there is no such delivery or it is not processed yet (it waits already).

        It comes back as the newest row, with its attempts counted afresh: claims find pending
        deliveries by id from the oldest not yet processed (see `_advance_pending_from`), so an
        old row made pending again could be passed over."""
        with self._write() as s:
            row = s.execute(_delivery_by(key)).scalar_one_or_none()
            if row is None or row.processed_at is None:
                return None
            fields = {
                "delivery_id": row.delivery_id,
                "event": row.event,
                "action": row.action,
                "intents": row.intents,
                "received_at": row.received_at,
                "error": row.error,
            }
            # Renamed first, so the fresh row is numbered after it (SQLite numbers a row after
            # the largest id there), then the old one goes.
            row.delivery_id = f"{row.delivery_id[:80]}~retried-{row.id}"
            s.flush()
            fresh = DeliveryRecord(**fields, attempts=0)
            s.add(fresh)
            s.flush()
            s.delete(row)
            return _delivery_info(fresh)

    def list_deliveries(
        self, state: DeliveryState | None = None, limit: int = 50
    ) -> list[DeliveryInfo]:
        """Newest first; `state` narrows to pending, retrying, processed or failed ones."""
        stmt = select(DeliveryRecord).order_by(DeliveryRecord.id.desc()).limit(limit)
        if state is not None:
            stmt = stmt.where(_delivery_state_is(state))
        with self._read() as s:
            return [_delivery_info(r) for r in s.scalars(stmt)]

    def delivery_counts(self) -> dict[DeliveryState, int]:
        """How many stored deliveries are in each state (retrying ones are pending too)."""
        with self._read() as s:
            return {
                state: int(
                    s.execute(select(func.count()).where(_delivery_state_is(state))).scalar_one()
                )
                for state in DeliveryState
            }

    def retried_deliveries(self) -> int:
        """Deliveries processed in the end after more than one attempt."""
        with self._read() as s:
            stmt = select(func.count()).where(
                DeliveryRecord.processed_at.is_not(None),
                DeliveryRecord.error.is_(None),
                DeliveryRecord.attempts > 1,
            )
            return int(s.execute(stmt).scalar_one())

    def _advance_pending_from(self, s: Session) -> int:
        """The smallest id a delivery not yet processed can have; called in a write transaction.

        On SQLite, writers take turns, so ids commit in increasing order: once every delivery
        below an id is processed, none can appear there later, and the claim need not scan
        them again. The first claim in a process scans from the start once. On PostgreSQL, ids
        from a sequence can commit out of order, so it stays 0 and the pending index serves.
        """
        if self.dialect_name != "sqlite":
            return 0
        start = self._pending_from
        first = s.execute(
            select(DeliveryRecord.id)
            .where(DeliveryRecord.id >= start, DeliveryRecord.processed_at.is_(None))
            .order_by(DeliveryRecord.id)
            .limit(1)
        ).scalar_one_or_none()
        if first is None:
            newest = s.execute(select(func.max(DeliveryRecord.id))).scalar_one_or_none()
            first = start if newest is None else max(start, newest + 1)
        # Assigned inside the write transaction, so later claims only ever see it grow.
        self._pending_from = first
        return first

    def finish_delivery(
        self, delivery_id: str, error: str | None = None, owner: str | None = None
    ) -> bool:
        """Mark a delivery processed, or failed for good with `error`; with `owner`, only while
        that worker holds its lease (False: another worker took it over meanwhile)."""
        stmt = update(DeliveryRecord).where(DeliveryRecord.delivery_id == delivery_id)
        if owner is not None:
            stmt = stmt.where(
                DeliveryRecord.lease_owner == owner, DeliveryRecord.processed_at.is_(None)
            )
        with self._write() as s:
            result = s.execute(
                stmt.values(
                    processed_at=utcnow(),
                    error=error,
                    lease_owner=None,
                    lease_until=None,
                    next_attempt_at=None,
                )
            )
            return bool(result.rowcount == 1)  # type: ignore[attr-defined]

    def prune_deliveries(self, older_than: timedelta = DELIVERY_KEEP) -> int:
        """Forget deliveries processed longer ago than `older_than`; returns how many.

        A delivery id is kept as long as GitHub may redeliver it; after that, the row is only
        weight. The newest row always stays: SQLite numbers the next row after the largest id
        there, and claims rely on ids only ever growing.
        """
        cutoff = utcnow() - older_than
        newest = select(func.max(DeliveryRecord.id)).scalar_subquery()
        with self._write() as s:
            result = s.execute(
                delete(DeliveryRecord).where(
                    DeliveryRecord.processed_at < cutoff, DeliveryRecord.id < newest
                )
            )
            return int(result.rowcount)  # type: ignore[attr-defined]

    def pending_deliveries(self) -> int:
        with self._read() as s:
            stmt = select(func.count()).where(
                DeliveryRecord.id >= self._pending_from, DeliveryRecord.processed_at.is_(None)
            )
            return int(s.execute(stmt).scalar_one())


def _delivery_by(key: str) -> Any:
    by_row = DeliveryRecord.id == (int(key) if key.isdigit() else -1)
    return select(DeliveryRecord).where((DeliveryRecord.delivery_id == key) | by_row)


def _delivery_state_is(state: DeliveryState) -> Any:
    pending = DeliveryRecord.processed_at.is_(None)
    if state == DeliveryState.PENDING:
        return pending
    if state == DeliveryState.RETRYING:
        return pending & DeliveryRecord.error.is_not(None)
    if state == DeliveryState.FAILED:
        return DeliveryRecord.processed_at.is_not(None) & DeliveryRecord.error.is_not(None)
    return DeliveryRecord.processed_at.is_not(None) & DeliveryRecord.error.is_(None)


def _delivery_info(row: DeliveryRecord) -> DeliveryInfo:
    if row.processed_at is None:
        state = DeliveryState.RETRYING if row.error else DeliveryState.PENDING
    else:
        state = DeliveryState.FAILED if row.error else DeliveryState.PROCESSED
    return DeliveryInfo(
        id=row.id,
        delivery_id=row.delivery_id,
        event=row.event,
        action=row.action,
        state=state,
        attempts=row.attempts or 0,
        received_at=row.received_at,
        processed_at=row.processed_at,
        next_attempt_at=row.next_attempt_at,
        lease_owner=row.lease_owner,
        lease_until=row.lease_until,
        error=row.error,
    )
