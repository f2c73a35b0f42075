"""Claude Code's `--output-format stream-json` lines → transcript steps."""

from __future__ import annotations

import json
import re
from typing import Any

from bot.agents.transcript import Step, json_event

_EXIT = re.compile(r"Exit code (\d+)")
_ACTIONS = {
    "Read": "read",
    "Edit": "edit",
    "MultiEdit": "edit",
    "Write": "edit",
    "Bash": "run",
    "NotebookEdit": "edit",
}


class ClaudeCodeParser:
    def __init__(self) -> None:
        self.calls: dict[str, tuple[str, dict[str, Any]]] = {}

    def feed(self, line: str) -> list[Step] | None:
        event = json_event(line)
        if event is None:
            return None
        kind = event["type"]
        if kind == "assistant":
            return self._assistant(event.get("message") or {})
        if kind == "user":
            return self._results(event.get("message") or {})
        if kind == "result":
            return [self._result(event)]
        if kind == "system":
            return []
        return None

    def _assistant(self, message: dict[str, Any]) -> list[Step]:
        steps = []
        for block in message.get("content") or []:
            if not isinstance(block, dict):
                continue
            if block.get("type") == "text" and str(block.get("text", "")).strip():
                steps.append(Step("message", text=str(block["text"])))
            elif block.get("type") == "tool_use":
                self.calls[str(block.get("id"))] = (
                    str(block.get("name")),
                    block.get("input") or {},
                )
        return steps

    def _results(self, message: dict[str, Any]) -> list[Step]:
        steps = []
        content = message.get("content")
        for block in content if isinstance(content, list) else []:
            if not isinstance(block, dict) or block.get("type") != "tool_result":
                continue
            name, args = self.calls.pop(str(block.get("tool_use_id")), ("tool", {}))
            error = bool(block.get("is_error"))
            text = _text(block.get("content"))
            action = _ACTIONS.get(name, "other")
            target = args.get("file_path") or args.get("command") or args.get("pattern")
            if target is None and args:
                target = json.dumps(args)[:300]
            exit_code = None
            if action == "run":
                match = _EXIT.search(text) if error else None
                exit_code = int(match.group(1)) if match else (1 if error else 0)
            steps.append(
                Step(
                    "tool",
                    tool=name,
                    action=action,
                    target=str(target or ""),
                    exit_code=exit_code,
                    ok=not error,
                    text=text[:2000],
                )
            )
        return steps

    def _result(self, event: dict[str, Any]) -> Step:
        usage = event.get("usage") or {}
        extra = {
            "turns": event.get("num_turns"),
            "cost_usd": event.get("total_cost_usd"),
            "input_tokens": usage.get("input_tokens"),
            "output_tokens": usage.get("output_tokens"),
        }
        ok = not event.get("is_error") and event.get("subtype") == "success"
        text = str(event.get("result") or event.get("subtype") or "")
        return Step(
            "result" if ok else "error",
            text=text,
            ok=ok,
            extra={k: v for k, v in extra.items() if v is not None},
        )


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(str(c.get("text", "")) for c in content if isinstance(c, dict))
    return ""
