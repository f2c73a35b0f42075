"""Receiving one delivery: check the request, verify it, route it, record its intents.

Works on the WSGI environ and answers `(status, JSON bytes)`, without Flask, so the hot path
allocates no request or response objects; webhooks/app.py puts it in front of the Flask app.
The request does no GitHub call and no Docker work (GitHub wants an answer within 10 s).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any, Protocol

from pydantic import SecretStr

from bot.intents import dump_intents
from webhooks.event import Delivery, PayloadError, Rules
from webhooks.payloads import NotAJsonObject, action_of, decode
from webhooks.router import route
from webhooks.signature import secret_bytes, verify

log = logging.getLogger(__name__)

MAX_BODY = 25 * 1024 * 1024  # GitHub caps payloads at 25 MB
# Column sizes in the store; GitHub's values are far shorter (a delivery id is a UUID).
MAX_DELIVERY_ID = 100
MAX_EVENT = 64

NOTHING_TO_VERIFY_WITH = (
    "no webhook secret is configured: set TRIMO_WEBHOOK_SECRET to the webhook secret of the "
    "GitHub App (comma-separate several while rotating)"
)
BAD_CONTENT_TYPE = "Content-Type must be application/json; set the webhook's content type to JSON"
MISSING_HEADERS = "X-GitHub-Event and X-GitHub-Delivery headers are required"
HEADER_TOO_LONG = "X-GitHub-Event or X-GitHub-Delivery is too long"
TOO_LARGE = "the body is larger than {limit} bytes"
BAD_SIGNATURE = (
    "X-Hub-Signature-256 does not match: check that the webhook secret set on GitHub is one of "
    "Trimo's webhook secrets"
)
BAD_JSON = "the body is not a JSON object"
STORE_DOWN = "Trimo could not record the delivery; redeliver it from GitHub once the store is back"
REJECTED = "rejected delivery %r (event %r): %s"

Reply = tuple[int, bytes]
DUPLICATE: Reply = (200, b'{"status": "duplicate"}')
IGNORED: Reply = (200, b'{"status": "ignored"}')


class DeliveryStore(Protocol):
    """What the receiver needs from the store (bot.store.Store provides it)."""

    def record_delivery(
        self, delivery_id: str, event: str, action: str | None, intents: str
    ) -> bool:
        """Record a delivery and its intents durably; False if the delivery id is known."""


class WebhookSettings(Protocol):
    """The server settings the receiver reads (bot.settings.Settings provides them)."""

    @property
    def webhook_secrets(self) -> Sequence[str | SecretStr]: ...
    @property
    def trigger_label(self) -> str: ...
    @property
    def app_id(self) -> int | None: ...


def reply(status: int, body: dict[str, Any]) -> Reply:
    return status, json.dumps(body).encode()


def read_body(environ: dict[str, Any], length: int | None, limit: int) -> bytes | None:
    """The request body, read once; None when it is longer than `limit` bytes.

    Without Content-Length (chunked), the server ends the stream (`wsgi.input_terminated`) and
    reading stops one byte past the limit, so an endless body costs at most `limit` bytes.
    """
    stream = environ["wsgi.input"]
    if length is None and not environ.get("wsgi.input_terminated"):
        return b""
    want = limit + 1 if length is None else length
    parts: list[bytes] = []
    total = 0
    while total < want:
        data = stream.read(min(want - total, 1 << 20))
        if not data:
            break
        parts.append(data)
        total += len(data)
    if total > limit:
        return None
    return parts[0] if len(parts) == 1 else b"".join(parts)


class Receiver:
    """The receiving logic, configured once per app."""

    def __init__(
        self, settings: WebhookSettings, store: DeliveryStore, max_body: int | None = None
    ) -> None:
        self.secrets = secret_bytes(settings.webhook_secrets)
        if not self.secrets:
            raise ValueError(NOTHING_TO_VERIFY_WITH)
        self.rules = Rules(trigger_label=settings.trigger_label, app_id=settings.app_id)
        self.max_body: int = max_body or getattr(settings, "max_body", None) or MAX_BODY
        self.too_large = TOO_LARGE.format(limit=self.max_body)
        self.store = store

    def after_fork(self) -> None:
        """In a forked server worker: forget the store connections inherited from the parent."""
        forget = getattr(self.store, "after_fork", None)
        if forget is not None:
            forget()

    def store_reachable(self) -> bool:
        """Whether the store answers a read (for /healthz)."""
        check = getattr(self.store, "ping", None) or getattr(self.store, "pending_deliveries", None)
        if check is None:
            return True
        try:
            check()
        except Exception:
            log.exception("the store does not answer")
            return False
        return True

    def reject(self, status: int, reason: str, delivery_id: Any, event: Any) -> Reply:
        log.warning(REJECTED, delivery_id, event, reason)
        return reply(status, {"error": reason})

    def receive(self, environ: dict[str, Any]) -> Reply:
        """Answer one POST of a delivery."""
        event = environ.get("HTTP_X_GITHUB_EVENT")
        delivery_id = environ.get("HTTP_X_GITHUB_DELIVERY")
        mimetype = environ.get("CONTENT_TYPE", "").partition(";")[0].strip().lower()
        if mimetype != "application/json":
            return self.reject(415, BAD_CONTENT_TYPE, delivery_id, event)
        if not event or not delivery_id:
            return self.reject(400, MISSING_HEADERS, delivery_id, event)
        if len(event) > MAX_EVENT or len(delivery_id) > MAX_DELIVERY_ID:
            return self.reject(
                400, HEADER_TOO_LONG, delivery_id[:MAX_DELIVERY_ID], event[:MAX_EVENT]
            )
        try:
            length: int | None = int(environ.get("CONTENT_LENGTH") or "")
        except ValueError:
            length = None
        if length is not None and (length > self.max_body or length < 0):
            return self.reject(413, self.too_large, delivery_id, event)
        body = read_body(environ, length, self.max_body)
        if body is None:
            return self.reject(413, self.too_large, delivery_id, event)
        if not verify(self.secrets, body, environ.get("HTTP_X_HUB_SIGNATURE_256")):
            return self.reject(401, BAD_SIGNATURE, delivery_id, event)
        try:
            # Only the fields Trimo reads, checked against the event's schema.
            payload = decode(event, body)
        except NotAJsonObject:
            return self.reject(400, BAD_JSON, delivery_id, event)
        except PayloadError as exc:
            return self.reject(400, str(exc), delivery_id, event)
        if event == "ping":
            return reply(200, {"msg": "pong", "zen": payload.get("zen")})
        action = action_of(payload)
        delivery = Delivery(event, action, delivery_id, payload)
        try:
            intents = route(delivery, self.rules)
        except PayloadError as exc:
            return self.reject(400, str(exc), delivery_id, event)
        try:
            fresh = self.store.record_delivery(delivery_id, event, action, dump_intents(intents))
        except Exception:
            log.exception("could not record delivery %r (event %r)", delivery_id, event)
            return reply(503, {"error": STORE_DOWN})
        if not fresh:
            log.debug("duplicate delivery %r (event %r)", delivery_id, event)
            return DUPLICATE
        if not intents:
            return IGNORED
        return 202, b'{"status": "queued", "intents": %d}' % len(intents)
