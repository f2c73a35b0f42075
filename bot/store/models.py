"""What the store hands out: frozen snapshots of pipelines, runs, events, deliveries.

Each field of `Run` and `Pipeline` is declared twice: as a column in `bot.store.records` and
as a field here. The conversion from record to snapshot is derived from those declarations
(`run_of`, `pipeline_of` iterate this module's dataclass fields), so a new field needs exactly
those two lines; a field declared in one place only is refused when this module is imported.
Fields whose column differs are listed once below: JSON columns (`failures` in `failures_json`)
and values with a type of their own (`state` as a `RunState`).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any, TypeVar

from sqlalchemy.orm import DeclarativeBase

from bot.states import FINISHED, PipelineKind, RunMode, RunState
from bot.store.records import PipelineRecord, RunRecord


@dataclass(frozen=True)
class Pipeline:
    """One branch: an issue's, a pull request's, or a local repository's."""

    id: int
    repo: str
    key: str
    kind: PipelineKind
    branch: str
    title: str
    number: int | None
    installation_id: int | None
    head_repo: str | None
    pr_number: int | None
    approved_sha: str | None
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True)
class Run:
    """One attempt on a pipeline, as stored when it was read."""

    id: int
    pipeline_id: int
    state: RunState
    mode: RunMode
    trigger: str
    sender: str | None
    task: str
    instructions: str | None
    agent_command: str | None
    worker_id: str | None
    container_id: str | None
    image_tag: str | None
    base_sha: str | None
    head_sha: str | None
    commits: int | None
    tests_passed: int | None
    tests_failed: int | None
    tests_skipped: int | None
    tests_errors: int | None
    failures: list[dict[str, Any]]
    summary: str | None
    report: dict[str, Any] | None
    reason: str | None
    error: str | None
    cancel_requested: bool
    cancel_reason: str | None
    superseded_by: int | None
    comment_id: int | None
    check_run_id: int | None
    pr_number: int | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    lease_host: str | None
    lease_expires_at: datetime | None
    engine_id: str | None

    @property
    def finished(self) -> bool:
        return self.state in FINISHED

    @property
    def tests_exit_code(self) -> int | None:
        """The test command's exit code when a test phase ran (its report may be missing)."""
        tests = (self.report or {}).get("tests")
        code = tests.get("exit_code") if isinstance(tests, dict) else None
        return code if isinstance(code, int) else None

    @property
    def usage(self) -> dict[str, Any] | None:
        """Model usage as the run's gateway metered it: tokens in and out, dollars, calls."""
        usage = (self.report or {}).get("usage")
        return usage if isinstance(usage, dict) else None


@dataclass(frozen=True)
class RunEventRow:
    id: int
    run_id: int
    kind: str
    message: str
    data: dict[str, Any] | None
    created_at: datetime


@dataclass(frozen=True)
class Delivery:
    """A webhook delivery waiting to be acted on; `intents` is the parsed JSON array."""

    delivery_id: str
    event: str
    action: str | None
    intents: list[Any]
    received_at: datetime
    previous_error: str | None = None  # set when an earlier attempt failed
    attempts: int = 1  # this one included


class DeliveryState(StrEnum):
    PENDING = "pending"  # not yet processed (waiting, being processed, or waiting to retry)
    RETRYING = "retrying"  # pending, after an attempt that failed
    PROCESSED = "processed"
    FAILED = "failed"  # processed, and it failed for good (`trimo deliveries retry` retries it)


@dataclass(frozen=True)
class DeliveryInfo:
    """A stored delivery as `trimo deliveries ls` shows it."""

    id: int
    delivery_id: str
    event: str
    action: str | None
    state: DeliveryState
    attempts: int
    received_at: datetime
    processed_at: datetime | None
    next_attempt_at: datetime | None
    lease_owner: str | None
    lease_until: datetime | None
    error: str | None


@dataclass(frozen=True)
class Installation:
    id: int
    account: str
    repos: list[str] | None  # None: every repository of the account


# Dataclass fields kept in a JSON column: field -> (column, value when the column is empty).
_RUN_JSON: dict[str, tuple[str, Any]] = {
    "failures": ("failures_json", []),
    "report": ("report_json", None),
}
# Columns read as a type of their own.
_RUN_TYPES: dict[str, Callable[[Any], Any]] = {
    "state": RunState,
    "mode": RunMode,
    "cancel_requested": bool,
}
_PIPELINE_TYPES: dict[str, Callable[[Any], Any]] = {"kind": PipelineKind}

_Snapshot = TypeVar("_Snapshot")


def _reader(
    model: type[_Snapshot],
    record: type[DeclarativeBase],
    types: dict[str, Callable[[Any], Any]],
    json_fields: dict[str, tuple[str, Any]],
) -> Callable[[Any], _Snapshot]:
    """The record -> snapshot conversion of `model`, checked once against the record's columns."""
    columns = {c.key for c in record.__table__.columns}
    names = [f.name for f in dataclasses.fields(model)]  # type: ignore[arg-type]
    stored = {json_fields[n][0] if n in json_fields else n for n in names}
    if stored != columns:
        raise TypeError(
            f"{model.__name__} and {record.__name__} disagree: fields without a column "
            f"{sorted(stored - columns)}, columns without a field {sorted(columns - stored)}"
        )

    def read(row: Any) -> _Snapshot:
        values: dict[str, Any] = {}
        for name in names:
            if name in json_fields:
                column, empty = json_fields[name]
                raw = getattr(row, column)
                values[name] = json.loads(raw) if raw else empty
            else:
                value = getattr(row, name)
                convert = types.get(name)
                values[name] = convert(value) if convert is not None else value
        return model(**values)

    return read


run_of: Callable[[RunRecord], Run] = _reader(Run, RunRecord, _RUN_TYPES, _RUN_JSON)
pipeline_of: Callable[[PipelineRecord], Pipeline] = _reader(
    Pipeline, PipelineRecord, _PIPELINE_TYPES, {}
)
