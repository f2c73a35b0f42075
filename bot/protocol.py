"""The container protocol: what the daemon puts in, what the runner prints and hands back.

The runner inside `trimo/base:bookworm` (images/base/trimo-runner) speaks this protocol; it cannot
import this module, so tests/test_protocol.py checks that both sides agree on every constant.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

# Every event is one stdout line: this prefix, one space, one JSON object.
EVENT_PREFIX = "::trimo::"

WORKSPACE = "/workspace"
IN_DIR = "/trimo/in"
# Root's: every file below has a known writer. The runner writes the bundle in OUT_DIR itself,
# the agent writes in AGENT_OUT_DIR (its summary), and TESTS_OUT_DIR is made when the test phase
# starts, after the agent's processes are stopped: the only place test reports are read from.
OUT_DIR = "/trimo/out"
AGENT_OUT_DIR = f"{OUT_DIR}/agent"
TESTS_OUT_DIR = f"{OUT_DIR}/tests"
TASK_FILE = f"{IN_DIR}/task.md"
RUN_FILE = f"{IN_DIR}/run.json"
BUNDLE_NAME = "result.bundle"
SUMMARY_NAME = "summary.md"
AGENT_UID = 1000


class ExitCode(IntEnum):
    SUCCESS = 0
    TESTS_FAILED = 1
    AGENT_FAILED = 2
    PREBOOT_FAILED = 3
    RUNNER_ERROR = 4
    STOPPED = 5  # SIGTERM: work so far checkpointed and handed back


@dataclass(frozen=True)
class Event:
    """One parsed event line. `data` is the whole JSON object, `kind` its "event" member."""

    kind: str
    data: dict[str, Any] = field(default_factory=dict)


def parse_line(line: str) -> Event | None:
    """The event on this stdout line, or None when it is a plain log line (or a broken event)."""
    if not line.startswith(EVENT_PREFIX):
        return None
    try:
        data = json.loads(line[len(EVENT_PREFIX) :])
    except ValueError:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("event"), str):
        return None
    return Event(kind=data["event"], data=data)


def format_event(kind: str, **data: Any) -> str:
    return f"{EVENT_PREFIX} {json.dumps({'event': kind, **data}, separators=(',', ':'))}"
