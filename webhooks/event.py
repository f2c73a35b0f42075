"""A delivery as the event concerns see it, the rules they apply, and the fields intents share."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


class PayloadError(ValueError):
    """A signed payload lacks a field its event must have; the delivery is answered with 400."""


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
