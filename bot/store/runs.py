"""The run queue: runs created, claimed by one worker, moved through their states, cancelled."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select, update

from bot.errors import NoSuchRunError
from bot.states import FINISHED, RunMode, RunState
from bot.store.base import NO_SUCH_RUN, StoreBase, check_fields, utcnow
from bot.store.events import _event_row
from bot.store.models import Run, run_of
from bot.store.records import PipelineRecord, RunRecord

# The fields `update_run` and `set_state` may set: every column but the run's identity.
_RUN_FIELDS = {c.key for c in RunRecord.__table__.columns} - {"id", "pipeline_id", "created_at"}


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
    ) -> Run:
        """A new queued run; it appears in the queue when this returns."""
        row = RunRecord(
            pipeline_id=pipeline_id,
            state=str(RunState.QUEUED),
            mode=str(mode),
            trigger=trigger,
            sender=sender,
            task=task,
            instructions=instructions,
            agent_command=agent_command,
            head_sha=head_sha,
            cancel_requested=False,
            created_at=utcnow(),
        )
        with self._write() as s:
            s.add(row)
            s.flush()
            s.add(_event_row(row.id, "state", str(RunState.QUEUED), {"trigger": trigger}))
            return run_of(row)

    def claim_run(self, worker_id: str, run_id: int | None = None) -> Run | None:
        """Move the oldest queued run (or run `run_id`) to preparing for this worker.

        Atomic: of several concurrent claimers exactly one gets a given run; None when nothing
        (or not that run) is queued.
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
                        heartbeat_at=now,
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

    def stale_runs(self, older_than: timedelta) -> list[Run]:
        """Runs owned by a worker whose last heartbeat is older than `older_than` (dead worker)."""
        cutoff = utcnow() - older_than
        stmt = (
            select(RunRecord)
            .where(
                RunRecord.state.not_in([str(x) for x in FINISHED | {RunState.QUEUED}]),
                RunRecord.heartbeat_at < cutoff,
            )
            .order_by(RunRecord.id)
        )
        with self._read() as s:
            return [run_of(r) for r in s.scalars(stmt)]

    def queued_count(self) -> int:
        with self._read() as s:
            stmt = select(func.count()).where(RunRecord.state == str(RunState.QUEUED))
            return int(s.execute(stmt).scalar_one())

    def set_state(
        self, run_id: int, state: RunState, *, reason: str | None = None, **fields: Any
    ) -> Run:
        """Move a run to `state` (with optional other fields) and record a "state" event.

        A finished run stays as it is (the first final state wins, e.g. cancel vs. success);
        the returned snapshot shows which state the run is really in.
        """
        values = _run_values(fields)
        values["state"] = str(state)
        if reason is not None:
            values["reason"] = reason
        if state in FINISHED:
            values.setdefault("finished_at", utcnow())
        with self._write() as s:
            result = s.execute(
                update(RunRecord)
                .where(RunRecord.id == run_id, RunRecord.state.not_in([str(x) for x in FINISHED]))
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

    def request_cancel(self, run_id: int, reason: str) -> bool:
        """Ask the run's worker to stop it; False when the run has already finished."""
        with self._write() as s:
            result = s.execute(
                update(RunRecord)
                .where(RunRecord.id == run_id, RunRecord.state.not_in([str(x) for x in FINISHED]))
                .values(cancel_requested=True, cancel_reason=reason)
            )
            if result.rowcount == 1:  # type: ignore[attr-defined]
                s.add(_event_row(run_id, "event", "cancel requested", {"reason": reason}))
                return True
            if s.get(RunRecord, run_id) is None:
                raise NoSuchRunError(NO_SUCH_RUN.format(run_id=run_id))
            return False

    def heartbeat(self, run_id: int) -> None:
        with self._write() as s:
            s.execute(update(RunRecord).where(RunRecord.id == run_id).values(heartbeat_at=utcnow()))


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
