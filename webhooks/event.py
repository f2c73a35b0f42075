"""A delivery as the event concerns see it, the rules they apply, and the fields intents share."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pydantic_core import ErrorDetails

from bot.intents import CancelIntent, CancelReason
from bot.states import PipelineKind

# How many of pydantic's errors a PayloadError names; a long list of bad items says no more.
MAX_SHAPE_ERRORS = 3


class PayloadError(ValueError):
    """A signed payload lacks a field its event must have; the delivery is answered with 400."""


def shape_detail(errors: Sequence[ErrorDetails]) -> str:
    """pydantic's errors as "issue.number: Field required", the first few of them."""
    parts = [f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors[:MAX_SHAPE_ERRORS]]
    if len(errors) > MAX_SHAPE_ERRORS:
        parts.append(f"and {len(errors) - MAX_SHAPE_ERRORS} more")
    return "; ".join(parts)


@dataclass(frozen=True, slots=True)
class Rules:
    """What the server settings decide about deliveries."""

    trigger_label: str = "trimo"
    # Trimo's own GitHub App id; when None, Trimo's check runs are recognised by name.
    app_id: int | None = None
    check_run_name: str = "trimo"


@dataclass(frozen=True, slots=True)
class Delivery:
    """One webhook delivery: headers that matter and the parsed payload."""

    event: str
    action: str | None
    delivery_id: str
    payload: dict[str, Any]

    def origin(self) -> dict[str, Any]:
        """The fields every intent carries: installation, sender and delivery."""
        sender = self.payload.get("sender") or {}
        installation = self.payload.get("installation") or {}
        return {
            "installation_id": installation.get("id"),
            "sender": sender.get("login", ""),
            "sender_type": sender.get("type", "User"),
            "delivery_id": self.delivery_id,
        }

    def repo(self) -> str:
        """The repository's "owner/name"."""
        return str(self.payload["repository"]["full_name"])

    def sent_by_bot(self) -> bool:
        """Whether a bot (Trimo included) sent this; bots' comments are never commands."""
        sender = self.payload.get("sender") or {}
        return sender.get("type") == "Bot" or str(sender.get("login", "")).endswith("[bot]")


def same_label(label: Any, name: str) -> bool:
    """Whether the delivery's label is `name`; GitHub label names ignore case."""
    return isinstance(label, dict) and str(label.get("name", "")).casefold() == name.casefold()


def cancel_intent(
    delivery: Delivery, kind: PipelineKind, subject: str, reason: CancelReason
) -> CancelIntent:
    """Cancel the live run of the issue or pull request under `payload[subject]`."""
    return CancelIntent(
        **delivery.origin(),
        repo=delivery.repo(),
        kind=kind,
        number=delivery.payload[subject]["number"],
        reason=reason,
    )
