"""Aider's terminal output (`--no-pretty`) → transcript steps.

Aider has no event stream: it edits through SEARCH/REPLACE blocks in the model's reply and says
what it did in plain lines, which are what this parser reads.
"""

from __future__ import annotations

import re

from bot.agents.transcript import Step

_APPLIED = re.compile(r"^Applied edit to (.+)$")
_ADDED = re.compile(r"^Added (.+?) to the chat")
_RUNNING = re.compile(r"^Running (.+)$")
_SUMMARY = re.compile(r"^Tokens: ")


class AiderParser:
    def __init__(self) -> None:
        self.command: str | None = None

    def feed(self, line: str) -> list[Step] | None:
        text = line.strip()
        if m := _APPLIED.match(text):
            return [Step("tool", tool="edit", action="edit", target=m.group(1))]
        if m := _ADDED.match(text):
            return [Step("tool", tool="read", action="read", target=m.group(1))]
        if m := _RUNNING.match(text):
            self.command = m.group(1)
            return [Step("tool", tool="shell", action="run", target=m.group(1))]
        if _SUMMARY.match(text):
            return [Step("result", text=text)]
        return None
