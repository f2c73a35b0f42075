"""Pull requests: the trigger label starts a run; unlabeling or closing cancels it."""

from __future__ import annotations

from typing import Any

from bot.intents import Intent, RunIntent
from bot.states import PipelineKind
from webhooks.event import Delivery, Rules, cancel_intent, same_label


def head_fields(pull: dict[str, Any]) -> dict[str, Any]:
    """The head commit, branch and repository of a pull request, and whether it is a fork.

    A deleted fork leaves `head.repo` null: the PR is then treated as a fork.
    """
    head = pull["head"]
    head_repo = (head.get("repo") or {}).get("full_name")
    base_repo = pull["base"]["repo"]["full_name"]
    return {
        "head_sha": head["sha"],
        "head_ref": head["ref"],
        "head_repo": head_repo,
        "is_fork": head_repo != base_repo,
    }


def labeled(delivery: Delivery, rules: Rules) -> list[Intent]:
    payload = delivery.payload
    if not same_label(payload.get("label"), rules.trigger_label):
        return []
    pull = payload["pull_request"]
    return [
        RunIntent(
            **delivery.origin(),
            repo=delivery.repo(),
            kind=PipelineKind.PULL,
            number=pull["number"],
            title=pull.get("title") or "",
            body=pull.get("body") or "",
            trigger="label",
            **head_fields(pull),
        )
    ]


def unlabeled(delivery: Delivery, rules: Rules) -> list[Intent]:
    if not same_label(delivery.payload.get("label"), rules.trigger_label):
        return []
    return [cancel_intent(delivery, PipelineKind.PULL, "pull_request", "unlabeled")]


def closed(delivery: Delivery, rules: Rules) -> list[Intent]:
    return [cancel_intent(delivery, PipelineKind.PULL, "pull_request", "closed")]


def synchronize(delivery: Delivery, rules: Rules) -> list[Intent]:
    # New commits do not start a run by themselves; a fork's approval, bound to the old head,
    # lapses on its own because the worker compares head commits.
    return []
