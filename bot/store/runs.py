"""The run queue: runs created, claimed by one worker, moved through their states, cancelled."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, Interval, func, literal, or_, select, update
from sqlalchemy.orm import Session

from bot.errors import NoSuchRunError
from bot.states import ACTIVE, FINISHED, RunMode, RunState
from bot.store.base import NO_SUCH_RUN, StoreBase, check_fields, utcnow
from bot.store.events import _event_row
from bot.store.models import Run, run_of
from bot.store.records import DeliveryRunRecord, PipelineRecord, RunRecord, UTCDateTime

# The fields `update_run` and `set_state` may set: not the run's identity, nor its state and
# lease, which change only by compare-and-set (`set_state`, `claim_run`, `renew_leases`).
_RUN_FIELDS = {c.key for c in RunRecord.__table__.columns} - {
    "id",
    "pipeline_id",
    "created_at",
    "state",
    "worker_id",
    "lease_host",
    "lease_expires_at",
    "engine_id",
}
_ACTIVE = [str(x) for x in ACTIVE]
# How long a claimed run is held unless its worker renews the lease (`Settings.lease_seconds`).
DEFAULT_LEASE = timedelta(seconds=30)


class RunQueue(StoreBase):
    """Runs: the queue workers claim from, and each run's state and results."""

    def create_run(
        self,
        pipeline_id: int,
        *,
        trigger: str,
        task: str,
        mode: RunMode = RunMode.AGENT,
        sender: str | None = None,
        instructions: str | None = None,
        agent_command: str | None = None,
        head_sha: str | None = None,
        delivery_key: str | None = None,
        refused: str | None = None,
    ) -> Run:
        """A new run, queued (it appears in the queue when this returns) unless `refused`.

        With `delivery_key` (the delivery being processed, see bot/github/outbox.py report_key)
        the run is remembered as that delivery's in the same transaction: processing the
        delivery again, after a failure at any point, finds it and queues no second run.

        With `refused` (why the sender may not start it) the run is recorded as asked for and
        rejected in the same transaction, so no worker can ever claim it."""
        now = utcnow()
        rejected = refused is not None
        row = RunRecord(
            pipeline_id=pipeline_id,
            state=str(RunState.REJECTED if rejected else RunState.QUEUED),
            reason=refused,
            finished_at=now if rejected else None,
            mode=str(mode),
            trigger=trigger,
            sender=sender,
            task=task,
            instructions=instructions,
            agent_command=agent_command,
            head_sha=head_sha,
            cancel_requested=False,
            created_at=now,
        )
        with self._write() as s:
            s.add(row)
            s.flush()
            s.add(_event_row(row.id, "state", str(RunState.QUEUED), {"trigger": trigger}))
            if rejected:
                s.add(_event_row(row.id, "state", str(RunState.REJECTED), {"reason": refused}))
            if delivery_key is not None:
                s.add(DeliveryRunRecord(key=delivery_key, run_id=row.id))
            return run_of(row)

    def claim_run(
        self,
        worker_id: str,
        run_id: int | None = None,
        *,
        host: str | None = None,
        engine_id: str | None = None,
        lease: timedelta = DEFAULT_LEASE,
    ) -> Run | None:
        """Move the oldest queued run (or run `run_id`) to preparing, held by `worker_id`.

        Atomic: of several concurrent claimers exactly one gets a given run, and a cancel of
        the queued run (`cancel_run`) and a claim never both win; None when nothing (or not
        that run) is queued. The run is held under a lease of `lease` from now, on `host`, its
        containers on the Docker engine `engine_id`: its worker renews it (`renew_leases`).
        """
        now = utcnow()
        for _ in range(5):
            with self._write() as s:
                if run_id is None:
                    candidate = (
                        select(RunRecord.id)
                        .where(RunRecord.state == str(RunState.QUEUED))
                        .order_by(RunRecord.id)
                        .limit(1)
                        .with_for_update(skip_locked=True)
                    )
                    target = s.execute(candidate).scalar_one_or_none()
                    if target is None:
                        return None
                else:
                    target = run_id
                result = s.execute(
                    update(RunRecord)
                    .where(RunRecord.id == target, RunRecord.state == str(RunState.QUEUED))
                    .values(
                        state=str(RunState.PREPARING),
                        worker_id=worker_id,
                        started_at=now,
                        lease_host=host,
                        lease_expires_at=self._clock(lease),
                        engine_id=engine_id,
                    )
                    .execution_options(synchronize_session=False)
                )
                if result.rowcount == 1:  # type: ignore[attr-defined]
                    s.add(
                        _event_row(target, "state", str(RunState.PREPARING), {"worker": worker_id})
                    )
                    row = s.get_one(RunRecord, target, populate_existing=True)
                    return run_of(row)
                if run_id is not None:
                    return None
            # Another claimer took our candidate between the select and the update; try the next.
        return None

    def renew_leases(self, worker_id: str, run_ids: Iterable[int], lease: timedelta) -> set[int]:
        """Push the leases `worker_id` holds on `run_ids` to `lease` from now; returns the ids
        still held (a run that finished, or that the reaper took, is not renewed)."""
        ids = list(run_ids)
        if not ids:
            return set()
        stmt = (
            update(RunRecord)
            .where(
                RunRecord.id.in_(ids),
                RunRecord.worker_id == worker_id,
                RunRecord.state.in_(_ACTIVE),
            )
            .values(lease_expires_at=self._clock(lease))
            .returning(RunRecord.id)
        )
        with self._write() as s:
            return set(s.execute(stmt).scalars())

    def expired_runs(self) -> list[Run]:
        """Runs a worker holds whose lease has run out (its worker may be dead), oldest first."""
        stmt = (
            select(RunRecord)
            .where(RunRecord.state.in_(_ACTIVE), self._lease_expired())
            .order_by(RunRecord.id)
        )
        with self._read() as s:
            return [run_of(r) for r in s.scalars(stmt)]

    def reap_run(self, run_id: int, reason: str) -> bool:
        """End a run whose lease expired as `error` with `reason`; False (and nothing changed)
        when it finished meanwhile or its worker renewed the lease after all."""
        with self._write() as s:
            result = s.execute(
                update(RunRecord)
                .where(RunRecord.id == run_id, RunRecord.state.in_(_ACTIVE), self._lease_expired())
                .values(state=str(RunState.ERROR), reason=reason, finished_at=utcnow())
                .execution_options(synchronize_session=False)
            )
            if result.rowcount != 1:  # type: ignore[attr-defined]
                return False
            s.add(_event_row(run_id, "state", str(RunState.ERROR), {"reason": reason}))
            return True

    def _clock(self, plus: timedelta = timedelta(0)) -> ColumnElement[datetime]:
        """Now (+ `plus`) by the database's clock on PostgreSQL, which every host shares, so
        a lease means the same on hosts whose clocks differ; SQLite is on one host only."""
        if self.dialect_name == "postgresql":
            return func.now(type_=UTCDateTime()) + literal(plus, Interval())
        return literal(utcnow() + plus, UTCDateTime())

    def _lease_expired(self) -> ColumnElement[bool]:
        # No lease at all: claimed by a Trimo without leases and never renewed since.
        return or_(RunRecord.lease_expires_at.is_(None), RunRecord.lease_expires_at < self._clock())

    def get_run(self, run_id: int) -> Run:
        with self._read() as s:
            row = s.get(RunRecord, run_id)
            if row is None:
                raise NoSuchRunError(NO_SUCH_RUN.format(run_id=run_id))
            return run_of(row)

    def list_runs(
        self,
        limit: int = 20,
        pipeline_id: int | None = None,
        *,
        repo: str | None = None,
        states: Iterable[RunState] | None = None,
        before_id: int | None = None,
    ) -> list[Run]:
        """Newest first; `before_id` pages back from a run id (exclusive)."""
        stmt = select(RunRecord).order_by(RunRecord.id.desc()).limit(limit)
        if pipeline_id is not None:
            stmt = stmt.where(RunRecord.pipeline_id == pipeline_id)
        if repo is not None:
            repo_pipelines = select(PipelineRecord.id).where(PipelineRecord.repo == repo)
            stmt = stmt.where(RunRecord.pipeline_id.in_(repo_pipelines))
        if states is not None:
            stmt = stmt.where(RunRecord.state.in_([str(x) for x in states]))
        if before_id is not None:
            stmt = stmt.where(RunRecord.id < before_id)
        with self._read() as s:
            return [run_of(r) for r in s.scalars(stmt)]

    def run_counts(self) -> dict[tuple[str, str], int]:
        """How many runs each repository has in each state: {(repo, state): count}."""
        stmt = (
            select(PipelineRecord.repo, RunRecord.state, func.count())
            .join(PipelineRecord, PipelineRecord.id == RunRecord.pipeline_id)
            .group_by(PipelineRecord.repo, RunRecord.state)
        )
        with self._read() as s:
            return {(repo, state): int(n) for repo, state, n in s.execute(stmt)}

    def live_runs(self, pipeline_id: int | None = None) -> list[Run]:
        """Runs not yet finished, oldest first."""
        stmt = (
            select(RunRecord)
            .where(RunRecord.state.not_in([str(x) for x in FINISHED]))
            .order_by(RunRecord.id)
        )
        if pipeline_id is not None:
            stmt = stmt.where(RunRecord.pipeline_id == pipeline_id)
        with self._read() as s:
            return [run_of(r) for r in s.scalars(stmt)]

    def queued_count(self) -> int:
        with self._read() as s:
            stmt = select(func.count()).where(RunRecord.state == str(RunState.QUEUED))
            return int(s.execute(stmt).scalar_one())

    def set_state(
        self,
        run_id: int,
        state: RunState,
        *,
        expect: RunState | Iterable[RunState],
        owner: str | None = None,
        reason: str | None = None,
        **fields: Any,
    ) -> Run:
        """Move a run from one of the `expect`ed states to `state` (with optional other
        fields) and record a "state" event; compare-and-set: one UPDATE whose WHERE names the
        expected states (and, given `owner`, the worker that must hold the run).

        A run in another state is left as it is: a finished run stays finished (the first
        final state wins, e.g. cancel vs. success), and a run another worker has taken is not
        moved by the one that lost it. The returned snapshot shows the state the run is in.
        Back to queued, the run is no longer held by anyone.
        """
        expected = {expect} if isinstance(expect, RunState) else set(expect)
        if not expected or expected & FINISHED:
            raise ValueError(f"set_state expects live states, not {sorted(expected)}")
        values = _run_values(fields)
        values["state"] = str(state)
        if reason is not None:
            values["reason"] = reason
        if state in FINISHED:
            values.setdefault("finished_at", utcnow())
        if state == RunState.QUEUED:
            values.update(worker_id=None, lease_host=None, lease_expires_at=None, engine_id=None)
        where = [RunRecord.id == run_id, RunRecord.state.in_([str(x) for x in expected])]
        if owner is not None:
            where.append(RunRecord.worker_id == owner)
        with self._write() as s:
            result = s.execute(
                update(RunRecord)
                .where(*where)
                .values(values)
                .execution_options(synchronize_session=False)
            )
            if result.rowcount == 1:  # type: ignore[attr-defined]
                data = {"reason": reason} if reason else None
                s.add(_event_row(run_id, "state", str(state), data))
            row = s.get(RunRecord, run_id, populate_existing=True)
            if row is None:
                raise NoSuchRunError(NO_SUCH_RUN.format(run_id=run_id))
            return run_of(row)

    def update_run(self, run_id: int, **fields: Any) -> None:
        """Set free fields; `failures` (list of dicts) and `report` (dict) are stored as JSON."""
        values = _run_values(fields)
        if not values:
            return
        with self._write() as s:
            result = s.execute(update(RunRecord).where(RunRecord.id == run_id).values(values))
            if result.rowcount == 0:  # type: ignore[attr-defined]
                raise NoSuchRunError(NO_SUCH_RUN.format(run_id=run_id))

    def merge_report(self, run_id: int, **parts: Any) -> None:
        """Set keys of the run's report (e.g. `usage`, `commits`), keeping the others."""
        with self._write() as s:
            row = s.get(RunRecord, run_id)
            if row is None:
                raise NoSuchRunError(NO_SUCH_RUN.format(run_id=run_id))
            report = json.loads(row.report_json) if row.report_json else {}
            report.update(parts)
            row.report_json = json.dumps(report)

    def model_usd_since(self, installation_id: int | None, since: datetime) -> float:
        """Dollars spent on model calls by the runs of one installation (None: local runs) since
        `since`, as their gateways metered them."""
        installation = (
            PipelineRecord.installation_id.is_(None)
            if installation_id is None
            else PipelineRecord.installation_id == installation_id
        )
        stmt = (
            select(RunRecord.report_json)
            .join(PipelineRecord, PipelineRecord.id == RunRecord.pipeline_id)
            .where(installation, RunRecord.created_at >= since, RunRecord.report_json.is_not(None))
        )
        total = 0.0
        with self._read() as s:
            for (raw,) in s.execute(stmt):
                usage = (json.loads(raw or "{}") or {}).get("usage") or {}
                total += float(usage.get("usd") or 0.0)
        return total

    def cancel_run(self, run_id: int, reason: str) -> tuple[Run, bool]:
        """Stop a run: a queued one ends `cancelled` now; one a worker holds is asked to stop
        (its worker pushes the work so far, then ends it). Never both: this and a worker's
        claim are compare-and-set on `queued`, so exactly one of them wins. Returns the run as
        it is now, and whether it was cancelled here, before any worker took it."""
        with self._write() as s:
            result = s.execute(
                update(RunRecord)
                .where(RunRecord.id == run_id, RunRecord.state == str(RunState.QUEUED))
                .values(state=str(RunState.CANCELLED), reason=reason, finished_at=utcnow())
                .execution_options(synchronize_session=False)
            )
            cancelled = result.rowcount == 1  # type: ignore[attr-defined]
            if cancelled:
                s.add(_event_row(run_id, "state", str(RunState.CANCELLED), {"reason": reason}))
            else:
                self._request_cancel(s, run_id, reason)
            row = s.get(RunRecord, run_id, populate_existing=True)
            if row is None:
                raise NoSuchRunError(NO_SUCH_RUN.format(run_id=run_id))
            return run_of(row), cancelled

    def request_cancel(self, run_id: int, reason: str) -> bool:
        """Ask the run's worker to stop it; False when the run has already finished."""
        with self._write() as s:
            if self._request_cancel(s, run_id, reason):
                return True
            if s.get(RunRecord, run_id) is None:
                raise NoSuchRunError(NO_SUCH_RUN.format(run_id=run_id))
            return False

    def _request_cancel(self, s: Session, run_id: int, reason: str) -> bool:
        result = s.execute(
            update(RunRecord)
            .where(RunRecord.id == run_id, RunRecord.state.not_in([str(x) for x in FINISHED]))
            .values(cancel_requested=True, cancel_reason=reason)
            .execution_options(synchronize_session=False)
        )
        if result.rowcount != 1:  # type: ignore[attr-defined]
            return False
        s.add(_event_row(run_id, "event", "cancel requested", {"reason": reason}))
        return True


def _run_values(fields: Mapping[str, Any]) -> dict[str, Any]:
    values = dict(fields)
    if "failures" in values:
        values["failures_json"] = json.dumps(values.pop("failures"))
    if "report" in values:
        report = values.pop("report")
        values["report_json"] = json.dumps(report) if report is not None else None
    for key in ("state", "mode"):
        if key in values:
            values[key] = str(values[key])
    check_fields("runs", values, _RUN_FIELDS)
    return values
