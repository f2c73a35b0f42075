"""Aider's terminal output (`--no-pretty`) → transcript steps.

Aider has no event stream: it edits through SEARCH/REPLACE blocks in the model's reply and says
what it did in plain lines. After a reply ("Tokens: …") it names, one per line, the files the
model asked for, and adds them to the chat (--yes-always): those are the files it read. Its test
command (the layer's test-command) ends with one JSON line giving the exit code.
"""

from __future__ import annotations

import json
import re

from bot.agents.transcript import Step

_APPLIED = re.compile(r"^Applied edit to (\S.*)$")
_TOKENS = re.compile(r"^Tokens: ")
_PATH = re.compile(r"^[\w.-]+(?:/[\w.-]+)*\.\w+$")


class AiderParser:
    def __init__(self) -> None:
        self.after_reply = False

    def feed(self, line: str) -> list[Step] | None:
        text = line.strip()
        if _TOKENS.match(text):
            self.after_reply = True
            return [Step("message", text=text)]
        if self.after_reply and _PATH.match(text):
            return [Step("tool", tool="add", action="read", target=text)]
        if not text or text.startswith(("Add file to the chat?", "Add ", "Warning: ")):
            return None  # blank lines and Aider's own prompts sit between a reply and its files
        self.after_reply = False
        if m := _APPLIED.match(text):
            return [Step("tool", tool="edit", action="edit", target=m.group(1))]
        if text.startswith('{"type": "aider.test"'):
            try:
                event = json.loads(text)
            except ValueError:
                return None
            code = event.get("exit_code")
            return [
                Step(
                    "tool",
                    tool="test",
                    action="run",
                    target=str(event.get("command", "")),
                    exit_code=code if isinstance(code, int) else None,
                    ok=code == 0,
                )
            ]
        return None
