"""The outbox: every write to GitHub, stored before it is sent (the sender: bot/github/outbox.py).

A report has an id that names what it is (`run:7:comment`, `delivery:<id>:1`), a lane (the run,
or the issue a command answered) and an order key within it. Sending takes the head of a lane
under a lease, so of several workers one sends it, and a lane goes out in order: a later report
of a run never overtakes an earlier one that waits for its retry. Reports of the same id
coalesce: an edit stored while an earlier version waits replaces it (the latest body wins) and
takes its place at the end of the lane. A report is sent until GitHub takes it; only an answer
that no retry can change (a 404, a 422) marks it failed, with the reason.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    and_,
    exists,
    func,
    or_,
    select,
    update,
)
from sqlalchemy.orm import Mapped, Session, aliased, mapped_column

from bot.states import FINISHED
from bot.store.base import StoreBase, utcnow
from bot.store.records import Base, RunRecord, UTCDateTime

# The kind of report that is never updated again once its final version was sent.
SEALED_WHEN_FINAL = "check_run"


class ReportState(StrEnum):
    PENDING = "pending"
    SENT = "sent"
    FAILED = "failed"


class OutboxRecord(Base):
    __tablename__ = "outbox"
    __table_args__ = (
        Index("ix_outbox_state_lane_seq", "state", "lane", "seq"),
        Index("ix_outbox_run_id", "run_id"),
    )

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    report_id: Mapped[str] = mapped_column(String(200), unique=True)
    lane: Mapped[str] = mapped_column(String(200))
    seq: Mapped[int] = mapped_column(BigInteger)
    run_id: Mapped[int | None] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    installation_id: Mapped[int] = mapped_column(BigInteger)
    repo: Mapped[str] = mapped_column(String(200))
    kind: Mapped[str] = mapped_column(String(32))
    payload: Mapped[str] = mapped_column(Text)
    final: Mapped[bool] = mapped_column(Boolean, default=False)
    state: Mapped[str] = mapped_column(String(16))
    version: Mapped[int] = mapped_column(Integer, default=1)
    github_id: Mapped[int | None] = mapped_column(BigInteger)
    github_url: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    lease_owner: Mapped[str | None] = mapped_column(String(200))
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


@dataclass(frozen=True)
class Report:
    """A write to GitHub as it is stored: what to send, where it belongs, and its identity.

    `coalesce`: a report of the same id stored later replaces this one until it is sent (the
    tracking comment, the check run); otherwise the first one stored is the one sent (a reply, a
    reaction, a pull request). `final`: the last version of a coalescing report, after which
    nothing of that id is sent again (a completed check run is left alone)."""

    report_id: str
    lane: str
    kind: str
    installation_id: int
    repo: str
    payload: dict[str, Any]
    run_id: int | None = None
    coalesce: bool = False
    final: bool = False
    not_before: datetime | None = None


@dataclass(frozen=True)
class OutboxEntry:
    """A stored report, as a sender took it (or as `trimo` lists it)."""

    id: int
    report_id: str
    lane: str
    seq: int
    kind: str
    installation_id: int
    repo: str
    run_id: int | None
    payload: dict[str, Any]
    final: bool
    state: ReportState
    version: int
    github_id: int | None
    github_url: str | None
    attempts: int
    next_attempt_at: datetime | None
    last_error: str | None
    created_at: datetime
    sent_at: datetime | None


class Outbox:
    """The outbox's table, on the run store's database."""

    def __init__(self, store: StoreBase) -> None:
        self.store = store

    def put(self, report: Report) -> bool:
        """Store a report; False when it changes nothing (already stored, or final and sent)."""
        return self.put_all([report])[0]

    def put_all(self, reports: Iterable[Report]) -> list[bool]:
        """Store several reports at once (a run's comment and check runs: a sender sees all of
        them or none); for each, whether it changed anything."""
        now = utcnow()
        with self.store._write() as s:
            return [self._put(s, report, now) for report in reports]

    def _put(self, s: Session, report: Report, now: datetime) -> bool:
        payload = json.dumps(report.payload, sort_keys=True)
        row = s.execute(
            select(OutboxRecord).where(OutboxRecord.report_id == report.report_id).with_for_update()
        ).scalar_one_or_none()
        seq = int(s.execute(select(func.coalesce(func.max(OutboxRecord.seq), 0))).scalar_one())
        if row is None:
            s.add(
                OutboxRecord(
                    report_id=report.report_id,
                    lane=report.lane,
                    seq=seq + 1,
                    run_id=report.run_id,
                    installation_id=report.installation_id,
                    repo=report.repo,
                    kind=report.kind,
                    payload=payload,
                    final=report.final,
                    state=str(ReportState.PENDING),
                    version=1,
                    attempts=0,
                    next_attempt_at=report.not_before,
                    created_at=now,
                    updated_at=now,
                )
            )
            return True
        if not report.coalesce or row.payload == payload:
            return False
        if row.final and not report.final:
            return False  # a straggling live edit after the last version: older news
        if row.final and row.state == ReportState.SENT and row.kind == SEALED_WHEN_FINAL:
            # GitHub appends a check run's annotations on every update: once completed, it
            # is left alone.
            return False
        row.payload = payload
        row.final = report.final
        row.version += 1
        row.seq = seq + 1
        row.updated_at = now
        row.state = str(ReportState.PENDING)
        waiting = row.next_attempt_at is not None and row.next_attempt_at > now
        if not waiting:
            # A retry's wait is kept (GitHub's rate limit, a backoff): the new version goes
            # when the old one would have.
            row.next_attempt_at = report.not_before
        return True

    def take(self, owner: str, lease: timedelta, lane: str | None = None) -> OutboxEntry | None:
        """The first due report at the head of a lane (of `lane`, or any), leased to `owner`.

        A lane whose head waits for its retry, or has a report in flight, gives nothing: its
        reports go out in order or not at all."""
        now = utcnow()
        due = or_(OutboxRecord.next_attempt_at.is_(None), OutboxRecord.next_attempt_at <= now)
        other = aliased(OutboxRecord)
        in_flight = exists().where(
            other.lane == OutboxRecord.lane,
            other.state == str(ReportState.PENDING),
            other.lease_until > now,
        )
        heads = (
            select(OutboxRecord.lane, func.min(OutboxRecord.seq).label("seq"))
            .where(OutboxRecord.state == str(ReportState.PENDING))
            .group_by(OutboxRecord.lane)
        )
        if lane is not None:
            heads = heads.where(OutboxRecord.lane == lane)
        head = heads.subquery()
        # Looked for in a read first: most looks find nothing, and on SQLite a write
        # transaction holds the database's one write lock.
        with self.store._read() as s:
            found = s.execute(
                select(OutboxRecord.id)
                .join(head, and_(OutboxRecord.lane == head.c.lane, OutboxRecord.seq == head.c.seq))
                .where(
                    OutboxRecord.state == str(ReportState.PENDING),
                    due,
                    ~in_flight,
                )
                .order_by(OutboxRecord.seq, OutboxRecord.id)
                .limit(20)
            ).scalars()
            candidates = list(found)
        if not candidates:
            return None
        with self.store._write() as s:
            for candidate in candidates:
                taken = s.execute(
                    update(OutboxRecord)
                    .where(
                        OutboxRecord.id == candidate,
                        OutboxRecord.state == str(ReportState.PENDING),
                        or_(OutboxRecord.lease_until.is_(None), OutboxRecord.lease_until <= now),
                        # Another sender may have taken one of this lane since the read.
                        ~in_flight,
                    )
                    .values(
                        lease_owner=owner,
                        lease_until=now + lease,
                        attempts=OutboxRecord.attempts + 1,
                    )
                    .execution_options(synchronize_session=False)
                )
                if taken.rowcount == 1:  # type: ignore[attr-defined]
                    return _entry(s.get_one(OutboxRecord, candidate, populate_existing=True))
        return None

    def renew(self, owner: str, ids: Iterable[int], lease: timedelta) -> int:
        """Extend `owner`'s leases on these reports, which it is sending; returns how many it
        still held."""
        ids = list(ids)
        if not ids:
            return 0
        with self.store._write() as s:
            result = s.execute(
                update(OutboxRecord)
                .where(
                    OutboxRecord.id.in_(ids),
                    OutboxRecord.lease_owner == owner,
                    OutboxRecord.state == str(ReportState.PENDING),
                )
                .values(lease_until=utcnow() + lease)
                .execution_options(synchronize_session=False)
            )
            return int(result.rowcount)  # type: ignore[attr-defined]

    def sent(self, entry: OutboxEntry, github_id: int | None, url: str | None = None) -> None:
        """GitHub took `entry`; a newer version stored meanwhile stays pending (it goes next)."""
        now = utcnow()
        with self.store._write() as s:
            row = s.get(OutboxRecord, entry.id, with_for_update=True)
            if row is None:
                return
            if github_id is not None:
                row.github_id = github_id
            if url is not None:
                row.github_url = url
            row.lease_owner = None
            row.lease_until = None
            row.last_error = None
            row.sent_at = now
            if row.version == entry.version:
                row.state = str(ReportState.SENT)
                row.attempts = 0
                row.next_attempt_at = None

    def found(self, entry: OutboxEntry, github_id: int, url: str | None = None) -> None:
        """Keep what an earlier attempt of `entry` made, before the rest of it is sent."""
        with self.store._write() as s:
            s.execute(
                update(OutboxRecord)
                .where(OutboxRecord.id == entry.id)
                .values(github_id=github_id, github_url=url)
            )

    def retry_later(self, entry: OutboxEntry, error: str, wait: float) -> None:
        with self.store._write() as s:
            s.execute(
                update(OutboxRecord)
                .where(OutboxRecord.id == entry.id)
                .values(
                    lease_owner=None,
                    lease_until=None,
                    last_error=error,
                    next_attempt_at=utcnow() + timedelta(seconds=wait),
                    updated_at=utcnow(),
                )
            )

    def fail(self, entry: OutboxEntry, error: str) -> None:
        with self.store._write() as s:
            s.execute(
                update(OutboxRecord)
                .where(OutboxRecord.id == entry.id, OutboxRecord.version == entry.version)
                .values(
                    state=str(ReportState.FAILED),
                    lease_owner=None,
                    lease_until=None,
                    last_error=error,
                    updated_at=utcnow(),
                )
            )
            # A newer version stored while this one was sent gets its own chance.
            s.execute(
                update(OutboxRecord)
                .where(OutboxRecord.id == entry.id, OutboxRecord.version != entry.version)
                .values(lease_owner=None, lease_until=None, last_error=error)
            )

    def get(self, report_id: str) -> OutboxEntry | None:
        with self.store._read() as s:
            row = s.execute(
                select(OutboxRecord).where(OutboxRecord.report_id == report_id)
            ).scalar_one_or_none()
            return _entry(row) if row else None

    def entries(
        self, *, run_id: int | None = None, states: Iterable[ReportState] | None = None
    ) -> list[OutboxEntry]:
        stmt = select(OutboxRecord).order_by(OutboxRecord.seq, OutboxRecord.id)
        if run_id is not None:
            stmt = stmt.where(OutboxRecord.run_id == run_id)
        if states is not None:
            stmt = stmt.where(OutboxRecord.state.in_([str(x) for x in states]))
        with self.store._read() as s:
            return [_entry(r) for r in s.scalars(stmt)]

    def next_due(self) -> datetime | None:
        """When the earliest waiting report is due (None: nothing waits)."""
        with self.store._read() as s:
            return s.execute(
                select(func.min(OutboxRecord.next_attempt_at)).where(
                    OutboxRecord.state == str(ReportState.PENDING)
                )
            ).scalar_one_or_none()

    def counts(self) -> dict[str, int]:
        """Reports by state, and `retrying`: pending ones whose last attempt failed."""
        with self.store._read() as s:
            by_state = {
                str(state): int(n)
                for state, n in s.execute(
                    select(OutboxRecord.state, func.count()).group_by(OutboxRecord.state)
                )
            }
            retrying = s.execute(
                select(func.count()).where(
                    OutboxRecord.state == str(ReportState.PENDING),
                    OutboxRecord.last_error.is_not(None),
                )
            ).scalar_one()
        return {str(state): by_state.get(str(state), 0) for state in ReportState} | {
            "retrying": int(retrying)
        }

    def runs_without_final(self, kind: str) -> list[int]:
        """Finished runs with a report of `kind` stored whose last version never was."""
        with self.store._read() as s:
            return [
                run_id
                for run_id in s.scalars(
                    select(RunRecord.id)
                    .join(OutboxRecord, RunRecord.id == OutboxRecord.run_id)
                    .where(
                        OutboxRecord.kind == kind,
                        OutboxRecord.final.is_(False),
                        RunRecord.state.in_([str(x) for x in FINISHED]),
                    )
                    .order_by(OutboxRecord.run_id)
                )
            ]


def _entry(row: OutboxRecord) -> OutboxEntry:
    return OutboxEntry(
        id=row.id,
        report_id=row.report_id,
        lane=row.lane,
        seq=row.seq,
        kind=row.kind,
        installation_id=row.installation_id,
        repo=row.repo,
        run_id=row.run_id,
        payload=json.loads(row.payload),
        final=row.final,
        state=ReportState(row.state),
        version=row.version,
        github_id=row.github_id,
        github_url=row.github_url,
        attempts=row.attempts,
        next_attempt_at=row.next_attempt_at,
        last_error=row.last_error,
        created_at=row.created_at,
        sent_at=row.sent_at,
    )
