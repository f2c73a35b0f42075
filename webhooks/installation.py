"""Installations: the App installed, removed, suspended, or given more or fewer repositories."""

from __future__ import annotations

from typing import Any

from bot.intents import InstallationIntent, Intent
from webhooks.event import Delivery, Rules


def installation(delivery: Delivery, rules: Rules) -> list[Intent]:
    """`installation` created/deleted/suspend/unsuspend, with the repositories it lists."""
    return [_intent(delivery, delivery.payload.get("repositories"))]


def repositories_added(delivery: Delivery, rules: Rules) -> list[Intent]:
    return [_intent(delivery, delivery.payload.get("repositories_added"))]


def repositories_removed(delivery: Delivery, rules: Rules) -> list[Intent]:
    return [_intent(delivery, delivery.payload.get("repositories_removed"))]


def _intent(delivery: Delivery, repositories: list[dict[str, Any]] | None) -> InstallationIntent:
    inst = delivery.payload["installation"]
    origin = delivery.origin()
    origin["installation_id"] = inst["id"]
    return InstallationIntent(
        **origin,
        action=delivery.action,
        account=inst["account"]["login"],
        repositories=[r["full_name"] for r in repositories or []],
    )
