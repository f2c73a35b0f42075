"""Issues: the trigger label starts a run; removing it or closing the issue cancels it."""

from __future__ import annotations

from bot.intents import CancelIntent, CancelReason, Intent, RunIntent
from bot.states import PipelineKind
from webhooks.event import Delivery, Rules, same_label


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
    return [_cancel(delivery, "unlabeled")]


def closed(delivery: Delivery, rules: Rules) -> list[Intent]:
    return [_cancel(delivery, "closed")]


def _cancel(delivery: Delivery, reason: CancelReason) -> CancelIntent:
    return CancelIntent(
        **delivery.origin(),
        repo=delivery.repo(),
        kind=PipelineKind.ISSUE,
        number=delivery.payload["issue"]["number"],
        reason=reason,
    )
