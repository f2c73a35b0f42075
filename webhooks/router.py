"""The one place that maps an event and action to the concern that turns it into intents."""

from __future__ import annotations

from collections.abc import Callable

from pydantic import ValidationError

from bot.intents import Intent
from webhooks import check_run, comments, installation, issues, pull_request
from webhooks.event import Delivery, PayloadError, Rules, shape_detail

Handler = Callable[[Delivery, Rules], list[Intent]]

HANDLERS: dict[tuple[str, str | None], Handler] = {
    ("issues", "labeled"): issues.labeled,
    ("issues", "unlabeled"): issues.unlabeled,
    ("issues", "closed"): issues.closed,
    ("pull_request", "labeled"): pull_request.labeled,
    ("pull_request", "unlabeled"): pull_request.unlabeled,
    ("pull_request", "closed"): pull_request.closed,
    ("pull_request", "synchronize"): pull_request.synchronize,
    ("issue_comment", "created"): comments.issue_comment_created,
    ("pull_request_review_comment", "created"): comments.review_comment_created,
    ("check_run", "rerequested"): check_run.rerequested,
    ("installation", "created"): installation.installation,
    ("installation", "deleted"): installation.installation,
    ("installation", "suspend"): installation.installation,
    ("installation", "unsuspend"): installation.installation,
    ("installation_repositories", "added"): installation.repositories_added,
    ("installation_repositories", "removed"): installation.repositories_removed,
}

PAYLOAD_SHAPE = "the payload is not a valid {event}.{action} event: {detail}"


def handles(event: str, action: str | None) -> bool:
    """Whether Trimo acts on this event and action (everything else is acknowledged only)."""
    return (event, action) in HANDLERS


def route(delivery: Delivery, rules: Rules) -> list[Intent]:
    """The intents of a delivery; raises PayloadError when a field its event must have is wrong.

    A payload the receiver decoded was checked against its event's schema already (in
    webhooks/payloads.py, which names the field); what is caught here is a safety net for a field
    a schema misses.
    """
    handler = HANDLERS.get((delivery.event, delivery.action))
    if handler is None:
        return []
    try:
        return handler(delivery, rules)
    except KeyError as exc:
        detail = f"missing field {exc}"
    except (TypeError, AttributeError, IndexError) as exc:
        detail = f"a field has the wrong type ({exc})"
    except ValidationError as exc:
        detail = shape_detail(exc.errors(include_url=False, include_input=False))
    raise PayloadError(
        PAYLOAD_SHAPE.format(event=delivery.event, action=delivery.action, detail=detail)
    )
