"""Issues: the trigger label starts a run; removing it or closing the issue cancels it."""

from __future__ import annotations

from bot.intents import Intent, RunIntent
from bot.states import PipelineKind
from webhooks.event import Delivery, Rules, cancel_intent, same_label


def labeled(delivery: Delivery, rules: Rules) -> list[Intent]:
    payload = delivery.payload
    if not same_label(payload.get("label"), rules.trigger_label):
        return []
    issue = payload["issue"]
    return [
        RunIntent(
            **delivery.origin(),
            repo=delivery.repo(),
            kind=PipelineKind.ISSUE,
            number=issue["number"],
            title=issue.get("title") or "",
            body=issue.get("body") or "",
            trigger="label",
            is_fork=False,
        )
    ]


def unlabeled(delivery: Delivery, rules: Rules) -> list[Intent]:
    if not same_label(delivery.payload.get("label"), rules.trigger_label):
        return []
    return [cancel_intent(delivery, PipelineKind.ISSUE, "issue", "unlabeled")]


def closed(delivery: Delivery, rules: Rules) -> list[Intent]:
    return [cancel_intent(delivery, PipelineKind.ISSUE, "issue", "closed")]
