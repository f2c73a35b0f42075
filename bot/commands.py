"""The `/trimo` comment-command grammar: which lines of a comment are commands, and what they ask.

Rules (docs/DESIGN.md §5):

- A command is a line whose first non-blank text is `/trimo`, followed by the end of the line or
  whitespace (`/trimoo` is not a command). The prefix and the verb are case-insensitive; the
  instructions keep their case.
- Lines inside fenced code blocks (``` or ~~~) and quoted lines (`>`) are never commands, so
  quoting or showing a command does not run it.
- `/trimo` alone means `help`. An unknown verb gives an `unknown` command carrying the word and the
  closest verb, so the answer can say "did you mean ...".
- `run` takes the rest of its line as instructions; when the rest of the line is empty, the
  instructions are the following lines up to the next command line (or the end of the comment).
  Every other verb takes the rest of its line as its argument, or None.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from enum import StrEnum

PREFIX = "/trimo"


class Verb(StrEnum):
    RETRY = "retry"
    RUN = "run"
    STOP = "stop"
    STATUS = "status"
    TEST = "test"
    APPROVE = "approve"
    HELP = "help"
    UNKNOWN = "unknown"


KNOWN_VERBS = tuple(v.value for v in Verb if v is not Verb.UNKNOWN)
# Verbs that start a run; a comment yields at most one of them (see bot/intents docs).
RUN_VERBS = frozenset({Verb.RETRY, Verb.RUN, Verb.TEST})

HELP_TEXT = """\
Trimo understands these commands, one per line, at the start of a line of a comment:

| command | what it does |
| --- | --- |
| `/trimo run <instructions>` | run the agent with extra instructions (or the lines below) |
| `/trimo retry` | run again with the original task |
| `/trimo test` | run only the project's tests, without the agent |
| `/trimo stop` | stop the running run |
| `/trimo status` | show the state of the latest run |
| `/trimo approve` | allow runs on this fork pull request's current head commit |
| `/trimo help` | show this table |

Commands inside code blocks or quotes are ignored. Only people with write access can run commands.
"""


@dataclass(frozen=True, slots=True)
class Command:
    """One command found in a comment."""

    verb: Verb
    arg: str | None = None
    # Only for `unknown`: the closest known verb, if any is close enough.
    suggestion: str | None = None


def suggest(word: str) -> str | None:
    """The known verb closest to `word`, or None when nothing is close."""
    matches = difflib.get_close_matches(word.lower(), KNOWN_VERBS, n=1, cutoff=0.6)
    return matches[0] if matches else None


def _fence_marker(stripped: str) -> str | None:
    """The fence run (``` or ~~~, three or more) opening `stripped`, or None."""
    for char in "`~":
        if stripped.startswith(char * 3):
            return char * (len(stripped) - len(stripped.lstrip(char)))
    return None


def _command_rest(line: str) -> str | None:
    """The text after `/trimo` when `line` is a command line, else None."""
    stripped = line.lstrip()
    if stripped[: len(PREFIX)].lower() != PREFIX:
        return None
    rest = stripped[len(PREFIX) :]
    if rest and not rest[0].isspace():
        return None
    return rest.strip()


class _Lines:
    """Walks a comment's lines, tracking fenced code blocks."""

    def __init__(self, body: str) -> None:
        self.lines = body.replace("\r\n", "\n").replace("\r", "\n").split("\n")
        self.index = 0
        self.fence: str | None = None

    def next(self) -> tuple[str, bool] | None:
        """The next line and whether it may hold a command (outside fences and quotes)."""
        if self.index >= len(self.lines):
            return None
        line = self.lines[self.index]
        self.index += 1
        stripped = line.lstrip()
        marker = _fence_marker(stripped)
        if self.fence is not None:
            # A fence closes with the same character, at least as long, and nothing after it.
            if (
                marker
                and marker[0] == self.fence[0]
                and len(marker) >= len(self.fence)
                and not stripped[len(marker) :].strip()
            ):
                self.fence = None
            return line, False
        if marker:
            self.fence = marker
            return line, False
        return line, not stripped.startswith(">")

    def peek_is_command(self) -> bool:
        """Whether the next line is a command line (as `next` would see it)."""
        if self.index >= len(self.lines) or self.fence is not None:
            return False
        line = self.lines[self.index]
        return not line.lstrip().startswith(">") and _command_rest(line) is not None


def _command(rest: str, lines: _Lines) -> Command:
    parts = rest.split(maxsplit=1)
    if not parts:
        return Command(Verb.HELP)
    word = parts[0]
    arg = parts[1].strip() if len(parts) > 1 else ""
    verb = word.lower()
    if verb not in KNOWN_VERBS:
        return Command(Verb.UNKNOWN, arg=word, suggestion=suggest(word))
    if verb == Verb.RUN and not arg:
        following: list[str] = []
        while not lines.peek_is_command():
            item = lines.next()
            if item is None:
                break
            following.append(item[0])
        arg = "\n".join(following).strip()
    return Command(Verb(verb), arg=arg or None)


def parse_commands(body: str) -> list[Command]:
    """Every command in a comment body, in order."""
    commands: list[Command] = []
    lines = _Lines(body)
    while (item := lines.next()) is not None:
        line, may_command = item
        if not may_command:
            continue
        rest = _command_rest(line)
        if rest is not None:
            commands.append(_command(rest, lines))
    return commands
