"""The delivery inbox: webhook deliveries recorded by the receiver, claimed by the worker."""

from __future__ import annotations

import json
from datetime import timedelta

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from bot.store.base import StoreBase, utcnow
from bot.store.models import Delivery
from bot.store.records import DeliveryRecord
from bot.store.sqlite import _DELIVERY_WRITER_LOCK, _DeliveryWriter

# A delivery taken by a process that died is handed out again after this long.
DELIVERY_RETAKE_AFTER = timedelta(minutes=10)
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

    def claim_delivery(self) -> Delivery | None:
        """The oldest delivery not yet processed, marked taken so no one else gets it."""
        now = utcnow()
        retake = now - DELIVERY_RETAKE_AFTER
        for _ in range(5):
            with self._write() as s:
                start = self._advance_pending_from(s)
                target = s.execute(
                    select(DeliveryRecord.id)
                    .where(
                        DeliveryRecord.id >= start,
                        DeliveryRecord.processed_at.is_(None),
                        (DeliveryRecord.taken_at.is_(None)) | (DeliveryRecord.taken_at < retake),
                    )
                    .order_by(DeliveryRecord.id)
                    .limit(1)
                    .with_for_update(skip_locked=True)
                ).scalar_one_or_none()
                if target is None:
                    return None
                result = s.execute(
                    update(DeliveryRecord)
                    .where(
                        DeliveryRecord.id == target,
                        DeliveryRecord.processed_at.is_(None),
                        (DeliveryRecord.taken_at.is_(None)) | (DeliveryRecord.taken_at < retake),
                    )
                    .values(taken_at=now)
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
                    )
        return None

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

    def finish_delivery(self, delivery_id: str, error: str | None = None) -> None:
        with self._write() as s:
            s.execute(
                update(DeliveryRecord)
                .where(DeliveryRecord.delivery_id == delivery_id)
                .values(processed_at=utcnow(), error=error)
            )

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
