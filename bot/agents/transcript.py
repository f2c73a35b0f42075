"""A coding agent's transcript: the steps it took, in Trimo's words, from any CLI's event stream."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

MAX_TEXT = 2000


@dataclass(frozen=True)
class Step:
    """One thing the agent did: said something, called a tool, finished or hit an error.

    `kind` is "message", "tool", "result" or "error". A tool step has `action` ("read", "edit",
    "run" or "other"), its `tool` name, its `target` (the path or the command) and, for commands,
    the `exit_code`.
    """

    kind: str
    text: str = ""
    tool: str | None = None
    action: str | None = None
    target: str | None = None
    exit_code: int | None = None
    ok: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        """The step as one readable line (what `trimo runs logs` prints)."""
        if self.kind == "message":
            return f"agent: {_one_line(self.text)}"
        if self.kind == "error":
            return f"error: {_one_line(self.text)}"
        if self.kind == "result":
            return f"finished: {_one_line(self.text)}"
        verb = {"read": "read", "edit": "edited", "run": "ran"}.get(self.action or "", "used")
        what = f"`{_one_line(self.target or '', 160)}`" if self.action == "run" else self.target
        line = f"{verb} {what}" if what else f"used {self.tool}"
        if self.action not in ("read", "edit", "run") and self.tool:
            line = f"{self.tool}: {_one_line(self.target or '', 160)}"
        if self.exit_code is not None:
            line += f" → exit {self.exit_code}"
        elif not self.ok:
            line += " → failed"
        return line

    def data(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if v not in (None, "", {})}
        if "text" in out:
            out["text"] = str(out["text"])[:MAX_TEXT]
        return out


class Parser(Protocol):
    """Turns a CLI's output lines into steps; a line that is not part of its stream gives None."""

    def feed(self, line: str) -> list[Step] | None: ...


def json_event(line: str) -> dict[str, Any] | None:
    """One JSON-lines event with a string `type` (Claude Code's and Codex's streams), or None for
    a line that is not one (the CLI's other output)."""
    if not line.startswith("{"):
        return None
    try:
        event = json.loads(line)
    except ValueError:
        return None
    if not isinstance(event, dict) or not isinstance(event.get("type"), str):
        return None
    return event


def _one_line(text: str, limit: int = 300) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def classify_command(command: str) -> tuple[str, str]:
    """What a shell command does, roughly, and to what: `cat FILE` reads it, `sed -i … FILE`
    edits it, anything else runs (its target is the command itself)."""
    words = command.split()
    if words and words[0] in ("cat", "head", "tail", "less", "nl") and 2 <= len(words) <= 3:
        return "read", words[-1]
    in_place = len(words) >= 3 and words[0] in ("sed", "perl") and words[1] in ("-i", "-pi")
    if in_place and not any(ch in command for ch in "|;&>"):
        return "edit", words[-1]
    return "run", command
