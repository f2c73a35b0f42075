"""Comments on issues and pull requests: `/trimo` commands become intents.

Rules: comments sent by bots (Trimo included) are ignored. A comment yields at most one run
(`run`, `retry`, `test`): when it holds several, the last one wins, because a person who corrects
themselves further down means the later line. Every other verb yields its intent once, at its first
occurrence (`help` and unknown verbs count as one); intents keep the order of the comment.
"""

from __future__ import annotations

from typing import Any

from bot.commands import RUN_VERBS, Command, Verb, parse_commands
from bot.intents import (
    ApproveIntent,
    CancelIntent,
    CommentKind,
    HelpIntent,
    Intent,
    RunIntent,
    StatusIntent,
)
from bot.states import PipelineKind, RunMode
from webhooks.event import Delivery, Rules
from webhooks.pull_request import head_fields


def issue_comment_created(delivery: Delivery, rules: Rules) -> list[Intent]:
    """A comment on an issue, or on a PR's conversation (the issue has a `pull_request` key)."""
    payload = delivery.payload
    issue = payload["issue"]
    kind = PipelineKind.PULL if issue.get("pull_request") else PipelineKind.ISSUE
    # The PR's head is not in this payload: the worker fetches it (RunIntent leaves it None).
    return _intents(delivery, payload["comment"], "issue", kind=kind, thread=issue, head={})


def review_comment_created(delivery: Delivery, rules: Rules) -> list[Intent]:
    """A comment on a line of a pull request's diff."""
    pull = delivery.payload["pull_request"]
    return _intents(
        delivery,
        delivery.payload["comment"],
        "review",
        kind=PipelineKind.PULL,
        thread=pull,
        head=head_fields(pull),
    )


def _intents(
    delivery: Delivery,
    comment: dict[str, Any],
    comment_kind: CommentKind,
    *,
    kind: PipelineKind,
    thread: dict[str, Any],
    head: dict[str, Any],
) -> list[Intent]:
    if delivery.sent_by_bot():
        return []
    commands = parse_commands(comment.get("body") or "")
    if not commands:
        return []
    common: dict[str, Any] = {
        **delivery.origin(),
        "repo": delivery.repo(),
        "kind": kind,
        "number": thread["number"],
        "comment_id": comment["id"],
        "comment_kind": comment_kind,
    }
    last_run = max((i for i, c in enumerate(commands) if c.verb in RUN_VERBS), default=None)
    intents: list[Intent] = []
    seen: set[Verb] = set()
    for index, command in enumerate(commands):
        if command.verb in RUN_VERBS:
            if index == last_run:
                intents.append(_run(command, common, thread, head, kind))
            continue
        # `help` and unknown verbs share one answer: the help text.
        key = Verb.HELP if command.verb is Verb.UNKNOWN else command.verb
        if key not in seen:
            seen.add(key)
            intents.append(_answer(command, common))
    return intents


def _run(
    command: Command,
    common: dict[str, Any],
    thread: dict[str, Any],
    head: dict[str, Any],
    kind: PipelineKind,
) -> RunIntent:
    return RunIntent(
        **common,
        **head,
        title=thread.get("title") or "",
        body=thread.get("body") or "",
        trigger="command",
        instructions=command.arg if command.verb is Verb.RUN else None,
        mode=RunMode.TESTS if command.verb is Verb.TEST else RunMode.AGENT,
        retry=command.verb is Verb.RETRY,
        # An issue has no head; for a PR the comment payload may not say (None: look it up).
        **({"is_fork": False} if kind is PipelineKind.ISSUE else {}),
    )


def _answer(command: Command, common: dict[str, Any]) -> Intent:
    if command.verb is Verb.STOP:
        return CancelIntent(**common, reason="command")
    if command.verb is Verb.STATUS:
        return StatusIntent(**common)
    if command.verb is Verb.APPROVE:
        # On an issue there is nothing to approve; the worker answers so.
        return ApproveIntent(**common)
    if command.verb is Verb.UNKNOWN:
        return HelpIntent(**common, unknown=command.arg, suggestion=command.suggestion)
    return HelpIntent(**common)
