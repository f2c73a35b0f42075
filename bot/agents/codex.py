"""Codex CLI's `codex exec --json` lines → transcript steps."""

from __future__ import annotations

import re
import shlex
from typing import Any

from bot.agents.transcript import Step, classify_command, json_event

_WRAPPED = re.compile(r"^(?:/bin/|/usr/bin/)?(?:ba)?sh -l?c (.+)$", re.DOTALL)


class CodexParser:
    def feed(self, line: str) -> list[Step] | None:
        event = json_event(line)
        if event is None:
            return None
        kind = event["type"]
        if kind == "item.completed":
            return self._item(event.get("item") or {})
        if kind in ("turn.failed", "error"):
            error = event.get("error")
            message = error.get("message") if isinstance(error, dict) else event.get("message")
            return [Step("error", text=str(message or kind), ok=False)]
        if kind == "turn.completed":
            usage = event.get("usage") or {}
            return [Step("result", text="turn completed", extra=dict(usage))]
        if kind.startswith(("thread.", "turn.", "item.")):
            return []
        return None

    def _item(self, item: dict[str, Any]) -> list[Step]:
        kind = item.get("type")
        if kind == "agent_message":
            return [Step("message", text=str(item.get("text", "")))]
        if kind == "command_execution":
            command = unwrap(str(item.get("command", "")))
            code = item.get("exit_code")
            action, target = classify_command(command)
            return [
                Step(
                    "tool",
                    tool="shell",
                    action=action,
                    target=target,
                    exit_code=code if isinstance(code, int) else None,
                    ok=item.get("status") != "failed",
                    text=str(item.get("aggregated_output", ""))[:2000],
                )
            ]
        if kind == "file_change":
            return [
                Step(
                    "tool",
                    tool="apply_patch",
                    action="edit",
                    target=str(change.get("path")),
                    ok=item.get("status") != "failed",
                )
                for change in item.get("changes") or []
                if isinstance(change, dict)
            ]
        if kind == "error":
            return [Step("error", text=str(item.get("message", "")), ok=False)]
        return []


def unwrap(command: str) -> str:
    """`/bin/bash -lc 'cat x'` → `cat x`: the command the model asked for."""
    match = _WRAPPED.match(command.strip())
    if not match:
        return command
    try:
        parts = shlex.split(match.group(1))
    except ValueError:
        return command
    return parts[0] if len(parts) == 1 else command
