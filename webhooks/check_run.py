"""Check runs: "Re-run" on one of Trimo's check runs starts the run again."""

from __future__ import annotations

from typing import Any

from bot.intents import Intent, RunIntent
from bot.states import PipelineKind
from webhooks.event import Delivery, Rules


def is_trimos(check_run: dict[str, Any], rules: Rules) -> bool:
    """Whether the check run belongs to Trimo's App: by App id, or by name if no id is set."""
    if rules.app_id is not None:
        return (check_run.get("app") or {}).get("id") == rules.app_id
    return check_run.get("name") == rules.check_run_name


def rerequested(delivery: Delivery, rules: Rules) -> list[Intent]:
    check_run = delivery.payload["check_run"]
    if not is_trimos(check_run, rules):
        return []
    # GitHub lists only the PRs whose head is in this repository; the worker maps the check run
    # to its pipeline by id in any case, the PR number is a hint for answering.
    pulls = check_run.get("pull_requests") or []
    first = pulls[0] if pulls else None
    return [
        RunIntent(
            **delivery.origin(),
            repo=delivery.repo(),
            kind=PipelineKind.PULL if first else None,
            number=first["number"] if first else None,
            trigger="check_run",
            retry=True,
            head_sha=check_run["head_sha"],
            head_ref=first["head"]["ref"] if first else None,
            check_run_id=check_run["id"],
        )
    ]
