"""`trimo deliveries`: the webhook deliveries Trimo received, and retrying the failed ones."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import click

from bot.cli.common import open_app, settings_option
from bot.store import DeliveryInfo, DeliveryState

NO_SUCH_DELIVERY = "no delivery {key}: `trimo deliveries ls` lists them"
BEING_PROCESSED = "delivery {key} is being processed by {owner} (lease until {until}); not retried"
WAITING = "delivery {key} is not processed yet (attempt {attempts}); it is tried again {when}"
RETRIED = "delivery {key} ({event}) queued again; a worker takes it within a second or two"


def _when(moment: datetime | None) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC") if moment else "-"


def _row(info: DeliveryInfo) -> dict[str, object]:
    return {
        "id": info.id,
        "delivery_id": info.delivery_id,
        "event": info.event,
        "action": info.action,
        "state": info.state.value,
        "attempts": info.attempts,
        "received_at": info.received_at.isoformat(),
        "processed_at": info.processed_at.isoformat() if info.processed_at else None,
        "next_attempt_at": info.next_attempt_at.isoformat() if info.next_attempt_at else None,
        "lease_owner": info.lease_owner,
        "lease_until": info.lease_until.isoformat() if info.lease_until else None,
        "error": info.error,
    }


@click.group("deliveries")
def deliveries() -> None:
    """List webhook deliveries and retry those that failed."""


@deliveries.command("ls")
@click.option(
    "--state",
    type=click.Choice([s.value for s in DeliveryState]),
    help="Only deliveries in this state (retrying ones are pending too).",
)
@click.option("-n", "--limit", default=20, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@settings_option
def ls(state: str | None, limit: int, as_json: bool, settings_path: Path | None) -> None:
    """The latest deliveries, with their state, attempts and why the last one failed."""
    app = open_app(settings_path)
    rows = app.store.list_deliveries(DeliveryState(state) if state else None, limit)
    if as_json:
        for info in rows:
            click.echo(json.dumps(_row(info)))
        return
    counts = app.store.delivery_counts()
    retrying = counts[DeliveryState.RETRYING]
    click.echo(
        f"{counts[DeliveryState.PENDING] - retrying} waiting · {retrying} retrying · "
        f"{counts[DeliveryState.FAILED]} failed · {counts[DeliveryState.PROCESSED]} processed "
        f"({app.store.retried_deliveries()} after a retry)"
    )
    if not rows:
        click.echo("no deliveries" + (f" {state}" if state else ""))
        return
    click.echo(f"{'ID':>6}  {'DELIVERY':<38} {'EVENT':<24} {'STATE':<10} {'TRIES':>5}  WHEN / WHY")
    for info in rows:
        event = f"{info.event}.{info.action}" if info.action else info.event
        if info.state in (DeliveryState.FAILED, DeliveryState.RETRYING):
            detail = info.error or ""
            if info.state == DeliveryState.RETRYING:
                detail = f"again at {_when(info.next_attempt_at)}: {detail}"
        elif info.lease_owner and info.state == DeliveryState.PENDING:
            detail = f"processing on {info.lease_owner}"
        else:
            detail = _when(info.processed_at or info.received_at)
        click.echo(
            f"{info.id:>6}  {info.delivery_id[:38]:<38} {event[:24]:<24} "
            f"{info.state.value:<10} {info.attempts:>5}  {detail}"
        )


@deliveries.command("retry")
@click.argument("delivery")
@settings_option
def retry(delivery: str, settings_path: Path | None) -> None:
    """Process DELIVERY (its X-GitHub-Delivery id, or the ID `ls` shows) again."""
    app = open_app(settings_path)
    info = app.store.get_delivery(delivery)
    if info is None:
        raise click.ClickException(NO_SUCH_DELIVERY.format(key=delivery))
    if info.processed_at is None:
        if info.lease_owner and info.lease_until and info.lease_until > datetime.now(UTC):
            raise click.ClickException(
                BEING_PROCESSED.format(
                    key=delivery, owner=info.lease_owner, until=_when(info.lease_until)
                )
            )
        when = (
            f"at {_when(info.next_attempt_at)}"
            if info.next_attempt_at
            else "as soon as a worker is free"
        )
        raise click.ClickException(WAITING.format(key=delivery, attempts=info.attempts, when=when))
    fresh = app.store.retry_delivery(delivery)
    if fresh is None:  # processed and queued again by someone else in between
        raise click.ClickException(WAITING.format(key=delivery, attempts=0, when="soon"))
    click.echo(RETRIED.format(key=fresh.delivery_id, event=fresh.event))
