"""A run's events and log lines, in the order they were added."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from sqlalchemy import func, insert, select

from bot.store.base import StoreBase, utcnow
from bot.store.models import RunEventRow
from bot.store.records import EventRecord


class Events(StoreBase):
    """Run events ("state", "event", "log", ...), read by the CLI, the UI and the reporter."""

    def add_event(
        self, run_id: int, kind: str, message: str = "", data: Mapping[str, Any] | None = None
    ) -> None:
        with self._write() as s:
            s.execute(insert(EventRecord).values(_event_values(run_id, kind, message, data)))

    def add_logs(self, run_id: int, lines: list[str]) -> None:
        """Many log lines in one transaction, kept in the given order."""
        if not lines:
            return
        rows = [_event_values(run_id, "log", line, None) for line in lines]
        with self._write() as s:
            s.execute(insert(EventRecord), rows)

    def events(
        self,
        run_id: int,
        after_id: int = 0,
        kinds: Iterable[str] | None = None,
        limit: int | None = None,
        *,
        without: Iterable[str] | None = None,
    ) -> list[RunEventRow]:
        """Events of a run with id > after_id, in the order they were added; `kinds` keeps
        only those kinds, `without` leaves those out."""
        stmt = (
            select(EventRecord)
            .where(EventRecord.run_id == run_id, EventRecord.id > after_id)
            .order_by(EventRecord.id)
        )
        if kinds is not None:
            stmt = stmt.where(EventRecord.kind.in_(list(kinds)))
        if without is not None:
            stmt = stmt.where(EventRecord.kind.not_in(list(without)))
        if limit is not None:
            stmt = stmt.limit(limit)
        with self._read() as s:
            return [_event(r) for r in s.scalars(stmt)]

    def log_tail(self, run_id: int, limit: int) -> tuple[list[RunEventRow], int]:
        """The last `limit` log lines of a run, oldest first, and how many lines it has."""
        stmt = (
            select(EventRecord)
            .where(EventRecord.run_id == run_id, EventRecord.kind == "log")
            .order_by(EventRecord.id.desc())
            .limit(limit)
        )
        count = select(func.count()).where(EventRecord.run_id == run_id, EventRecord.kind == "log")
        with self._read() as s:
            rows = [_event(r) for r in s.scalars(stmt)]
            total = int(s.execute(count).scalar_one())
        rows.reverse()
        return rows, total

    def events_since(self, after_id: int, kinds: Iterable[str], limit: int) -> list[RunEventRow]:
        """Events of every run with id > after_id and one of `kinds`, oldest first."""
        stmt = (
            select(EventRecord)
            .where(EventRecord.id > after_id, EventRecord.kind.in_(list(kinds)))
            .order_by(EventRecord.id)
            .limit(limit)
        )
        with self._read() as s:
            return [_event(r) for r in s.scalars(stmt)]

    def last_event_id(self) -> int:
        """The newest event id of any run (0 when there is none)."""
        with self._read() as s:
            return int(s.execute(select(func.max(EventRecord.id))).scalar_one() or 0)


def _event_values(
    run_id: int, kind: str, message: str, data: Mapping[str, Any] | None
) -> dict[str, Any]:
    return {
        "run_id": run_id,
        "kind": kind,
        "message": message,
        "data_json": json.dumps(data) if data is not None else None,
        "created_at": utcnow(),
    }


def _event_row(run_id: int, kind: str, message: str, data: Mapping[str, Any] | None) -> EventRecord:
    return EventRecord(**_event_values(run_id, kind, message, data))


def _event(row: EventRecord) -> RunEventRow:
    return RunEventRow(
        id=row.id,
        run_id=row.run_id,
        kind=row.kind,
        message=row.message,
        data=json.loads(row.data_json) if row.data_json else None,
        created_at=row.created_at,
    )
