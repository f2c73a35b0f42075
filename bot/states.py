"""Run states and phases: the vocabulary of a run's life (docs/DESIGN.md §4)."""

from __future__ import annotations

from enum import StrEnum


class RunState(StrEnum):
    QUEUED = "queued"
    PREPARING = "preparing"
    BOOTING = "booting"
    AGENT = "agent"
    TESTING = "testing"
    PUBLISHING = "publishing"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    ERROR = "error"
    CANCELLED = "cancelled"
    TIMED_OUT = "timed_out"
    BUDGET_EXCEEDED = "budget_exceeded"  # the model budget was spent; the work so far is pushed
    REJECTED = "rejected"

    @property
    def finished(self) -> bool:
        return self in FINISHED

    @property
    def live(self) -> bool:
        return not self.finished


FINISHED = frozenset(
    {
        RunState.SUCCEEDED,
        RunState.FAILED,
        RunState.ERROR,
        RunState.CANCELLED,
        RunState.TIMED_OUT,
        RunState.BUDGET_EXCEEDED,
        RunState.REJECTED,
    }
)
# The phases a run goes through, in order (what progress displays show).
PHASES = (
    RunState.QUEUED,
    RunState.PREPARING,
    RunState.BOOTING,
    RunState.AGENT,
    RunState.TESTING,
    RunState.PUBLISHING,
)
# States in which a worker owns the run and a container may exist.
ACTIVE = frozenset(
    {
        RunState.PREPARING,
        RunState.BOOTING,
        RunState.AGENT,
        RunState.TESTING,
        RunState.PUBLISHING,
    }
)
# Every state a run can still leave: queued, or held by a worker.
LIVE = frozenset({RunState.QUEUED, *ACTIVE})


class RunMode(StrEnum):
    AGENT = "agent"  # agent, then tests
    TESTS = "tests"  # `/trimo test`: tests only, no agent


class PipelineKind(StrEnum):
    ISSUE = "issue"
    PULL = "pull"
    LOCAL = "local"
