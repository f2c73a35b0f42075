"""The receiver's web app: `create_app(settings, store)`, the Flask app GitHub delivers to.

`POST /webhooks/github` is answered by a thin WSGI layer in front of Flask (webhooks/receiver.py
does the work), because Flask's request context costs more than the receiving itself; every other
request (`GET /healthz`, a wrong method or path) goes through Flask. Nothing is read from the
environment here: settings come in as an object.
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Callable, Iterable
from typing import Any

from flask import Blueprint, Flask, Response, current_app, request
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
from prometheus_client.registry import Collector
from werkzeug.exceptions import HTTPException

from webhooks.receiver import DUPLICATE, DeliveryStore, Receiver, Reply, WebhookSettings

log = logging.getLogger(__name__)

WEBHOOK_PATH = "/webhooks/github"
INTERNAL_ERROR = "internal error; see Trimo's log"
_EXTENSION = "trimo.receiver"
_REGISTRY = "trimo.metrics"
_WORKERS = "trimo.workers"
LOOPBACK = frozenset({"127.0.0.1", "::1"})
_OUTCOMES = {
    202: "queued",
    400: "bad_request",
    401: "bad_signature",
    413: "too_large",
    415: "bad_content_type",
    503: "store_down",
}
_STATUS = {
    200: "200 OK",
    202: "202 Accepted",
    400: "400 Bad Request",
    401: "401 Unauthorized",
    413: "413 Content Too Large",
    415: "415 Unsupported Media Type",
    500: "500 Internal Server Error",
    503: "503 Service Unavailable",
}
_METHOD_NOT_ALLOWED = b'{"error": "only POST is accepted here"}'

StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]

bp = Blueprint("github", __name__)


def receiver_of(app: Flask) -> Receiver:
    """The receiver `create_app` attached to `app`."""
    receiver: Receiver = app.extensions[_EXTENSION]
    return receiver


@bp.get("/healthz")
def healthz() -> Response:
    """The store answers; and, where workers are expected, one reported lately and reaches
    its Docker engine."""
    if not receiver_of(current_app).store_reachable():
        return _json(503, {"status": "store unreachable"})
    workers: Callable[[], list[dict[str, Any]]] | None = current_app.extensions.get(_WORKERS)
    if workers is None:
        return _json(200, {"status": "ok"})
    alive = workers()
    report = [
        {
            "worker": w.get("worker"),
            "engine": w.get("engine"),
            "engine_error": w.get("engine_error"),
        }
        for w in alive
    ]
    if not alive:
        return _json(503, {"status": "no worker reported in the last 30 s", "workers": []})
    if not any(w.get("engine") for w in alive):
        return _json(503, {"status": "no worker reaches its Docker engine", "workers": report})
    return _json(200, {"status": "ok", "workers": report})


@bp.get("/metrics")
def metrics() -> Response:
    """Prometheus' text format. Repository names are in it: with TRIMO_METRICS_TOKEN unset
    only this machine may scrape."""
    token: str | None = current_app.config.get("TRIMO_METRICS_TOKEN")
    if token:
        given = request.headers.get("Authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            return _json(401, {"error": "send Authorization: Bearer <TRIMO_METRICS_TOKEN>"})
    elif request.remote_addr not in LOOPBACK:
        return _json(403, {"error": "set TRIMO_METRICS_TOKEN to scrape from another machine"})
    registry: CollectorRegistry = current_app.extensions[_REGISTRY]
    return Response(generate_latest(registry), mimetype=CONTENT_TYPE_LATEST)


def _json(status: int, body: dict[str, Any]) -> Response:
    return Response(json.dumps(body), status=status, mimetype="application/json")


def _http_error(exc: HTTPException) -> Response:
    # Werkzeug's own rejections (404, 405, ...) answer in JSON like the receiver's.
    return _json(exc.code or 500, {"error": exc.description or exc.name})


def _unexpected(exc: Exception) -> Response:
    log.exception("unexpected error")
    return _json(500, {"error": INTERNAL_ERROR})


class WebhookFront:
    """WSGI middleware answering deliveries on WEBHOOK_PATH; everything else goes to Flask."""

    def __init__(self, receiver: Receiver, flask_app: WSGIApp, deliveries: Counter) -> None:
        self.receiver = receiver
        self.flask_app = flask_app
        self.deliveries = deliveries

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        if environ.get("PATH_INFO") != WEBHOOK_PATH:
            return self.flask_app(environ, start_response)
        if environ.get("REQUEST_METHOD") != "POST":
            return _send(start_response, (405, _METHOD_NOT_ALLOWED), [("Allow", "POST")])
        try:
            answer = self.receiver.receive(environ)
        except Exception:
            # No input should get here; the log has the trace, the sender only a short answer.
            log.exception("unexpected error while receiving a delivery")
            answer = 500, json.dumps({"error": INTERNAL_ERROR}).encode()
        self.deliveries.labels(*_outcome(environ, answer)).inc()
        return _send(start_response, answer)


def _outcome(environ: dict[str, Any], answer: Reply) -> tuple[str, str]:
    """(event, outcome) of a delivery; the event only when the signature held, so that
    unsigned requests cannot make up label values."""
    status, body = answer
    outcome = _OUTCOMES.get(status, "error")
    if status == 200:
        outcome = "duplicate" if body == DUPLICATE[1] else "ignored"
    event = str(environ.get("HTTP_X_GITHUB_EVENT", ""))[:64] if status in (200, 202) else ""
    return event or "unverified", outcome


def _send(
    start_response: StartResponse, answer: Reply, extra: list[tuple[str, str]] | None = None
) -> list[bytes]:
    status, body = answer
    headers = [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
    start_response(_STATUS.get(status) or f"{status} Error", headers + (extra or []))
    return [body]


def create_app(
    settings: WebhookSettings,
    store: DeliveryStore,
    *,
    max_body: int | None = None,
    metrics: Collector | None = None,
    workers: Callable[[], list[dict[str, Any]]] | None = None,
    metrics_token: str | None = None,
) -> Flask:
    """The receiver app for `settings`, recording deliveries in `store`.

    `max_body` overrides the 25 MB body limit (GitHub's own cap on payloads). `metrics` is
    added to /metrics beside the deliveries; with `workers` (the fresh workers' statuses)
    /healthz asks for a live worker that reaches its engine.
    """
    app = Flask(__name__)
    receiver = Receiver(settings, store, max_body)
    app.config["MAX_CONTENT_LENGTH"] = receiver.max_body
    app.config["TRIMO_METRICS_TOKEN"] = metrics_token
    app.extensions[_EXTENSION] = receiver
    registry = CollectorRegistry()
    deliveries = Counter(
        "trimo_deliveries",
        "Webhook deliveries received, by event and outcome",
        ["event", "outcome"],
        registry=registry,
    )
    if metrics is not None:
        registry.register(metrics)
    app.extensions[_REGISTRY] = registry
    if workers is not None:
        app.extensions[_WORKERS] = workers
    app.register_blueprint(bp)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(Exception, _unexpected)
    app.wsgi_app = WebhookFront(receiver, app.wsgi_app, deliveries)  # type: ignore[method-assign]
    return app
