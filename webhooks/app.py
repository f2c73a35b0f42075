"""The receiver's web app: `create_app(settings, store)`, the Flask app GitHub delivers to.

`POST /webhooks/github` is answered by a thin WSGI layer in front of Flask (webhooks/receiver.py
does the work), because Flask's request context costs more than the receiving itself; every other
request (`GET /healthz`, a wrong method or path) goes through Flask. Nothing is read from the
environment here: settings come in as an object.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from typing import Any

from flask import Blueprint, Flask, Response, current_app
from werkzeug.exceptions import HTTPException

from webhooks.receiver import DeliveryStore, Receiver, Reply, WebhookSettings

log = logging.getLogger(__name__)

WEBHOOK_PATH = "/webhooks/github"
INTERNAL_ERROR = "internal error; see Trimo's log"
_EXTENSION = "trimo.receiver"
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
    if not receiver_of(current_app).store_reachable():
        return _json(503, {"status": "store unreachable"})
    return _json(200, {"status": "ok"})


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

    def __init__(self, receiver: Receiver, flask_app: WSGIApp) -> None:
        self.receiver = receiver
        self.flask_app = flask_app

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
        return _send(start_response, answer)


def _send(
    start_response: StartResponse, answer: Reply, extra: list[tuple[str, str]] | None = None
) -> list[bytes]:
    status, body = answer
    headers = [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
    start_response(_STATUS.get(status) or f"{status} Error", headers + (extra or []))
    return [body]


def create_app(
    settings: WebhookSettings, store: DeliveryStore, *, max_body: int | None = None
) -> Flask:
    """The receiver app for `settings`, recording deliveries in `store`.

    `max_body` overrides the 25 MB body limit (GitHub's own cap on payloads).
    """
    app = Flask(__name__)
    receiver = Receiver(settings, store, max_body)
    app.config["MAX_CONTENT_LENGTH"] = receiver.max_body
    app.extensions[_EXTENSION] = receiver
    app.register_blueprint(bp)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(Exception, _unexpected)
    app.wsgi_app = WebhookFront(receiver, app.wsgi_app)  # type: ignore[method-assign]
    return app
