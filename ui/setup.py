"""Creating the GitHub App from the page (GitHub's manifest flow, as Probot does it): a fresh
`trimo serve` without App settings shows a "Create GitHub App" button; GitHub sends the person
back with a code, which is exchanged for the App's id, key, webhook secret and OAuth client,
written to the data directory for the next start."""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any

import requests
from flask import Blueprint, Flask, abort, current_app, render_template, request, session
from werkzeug.wrappers import Response as BaseResponse

from bot.settings import Settings, write_app_file

# The repository's config/github-app-manifest.json; an installed server names its copy with
# TRIMO_APP_MANIFEST (the server image does).
MANIFEST = Path(__file__).resolve().parents[1] / "config" / "github-app-manifest.json"
MANIFEST_ENV = "TRIMO_APP_MANIFEST"
EXTENSION = "trimo.setup"
HTTP_TIMEOUT_SECONDS = 15
EXCHANGE_FAILED = (
    "GitHub did not convert the code into an App (HTTP {status}: {message}); the code is valid "
    "for an hour and only once: start again from the button"
)

bp = Blueprint("setup", __name__, template_folder="templates")


def _settings() -> Settings:
    settings: Settings = current_app.extensions[EXTENSION]
    return settings


def _base() -> str:
    return _settings().public_url or request.host_url.rstrip("/")


def manifest(base: str) -> dict[str, Any]:
    """config/github-app-manifest.json, pointed at this Trimo."""
    path = Path(os.environ.get(MANIFEST_ENV) or MANIFEST)
    data: dict[str, Any] = json.loads(path.read_text())
    data["url"] = base
    data["hook_attributes"] = dict(data.get("hook_attributes", {}), url=f"{base}/webhooks/github")
    data["redirect_url"] = f"{base}/setup/github/done"
    data["callback_urls"] = [f"{base}/signin/callback"]
    return data


@bp.get("/")
def start() -> str:
    state = secrets.token_urlsafe(24)
    session["manifest_state"] = state
    owner = request.args.get("org", "").strip()
    where = f"/organizations/{owner}/settings/apps/new" if owner else "/settings/apps/new"
    return render_template(
        "setup.html",
        action=f"{_settings().web_url}{where}?state={state}",
        manifest=json.dumps(manifest(_base())),
        org=owner,
    )


@bp.get("/setup/github/done")
def done() -> str | BaseResponse:
    settings = _settings()
    expected = session.pop("manifest_state", None)
    if not expected or not secrets.compare_digest(str(expected), request.args.get("state", "")):
        abort(400, "this App creation did not start here; start again from the button")
    code = request.args.get("code", "")
    if not code.replace("-", "").replace("_", "").isalnum():
        abort(400, "GitHub sent no code back")
    answer = requests.post(
        f"{settings.api_url}/app-manifests/{code}/conversions",
        headers={"Accept": "application/vnd.github+json", "X-GitHub-Api-Version": "2022-11-28"},
        timeout=HTTP_TIMEOUT_SECONDS,
    )
    if answer.status_code != 201:
        message = answer.json().get("message", "") if answer.content else ""
        abort(502, EXCHANGE_FAILED.format(status=answer.status_code, message=message))
    app = answer.json()
    path = write_app_file(
        settings.data_dir,
        {
            "app_id": int(app["id"]),
            "private_key": str(app["pem"]),
            "webhook_secrets": [str(app["webhook_secret"])],
            "client_id": str(app["client_id"]),
            "client_secret": str(app["client_secret"]),
        },
    )
    return render_template("setup_done.html", app=app, path=path)


def create_setup_app(settings: Settings) -> Flask:
    """What a fresh `trimo serve` serves until the App exists."""
    from ui.app import secret_key

    app = Flask(__name__)
    app.config["SECRET_KEY"] = secret_key(settings.data_dir)
    app.config.update(SESSION_COOKIE_HTTPONLY=True, SESSION_COOKIE_SAMESITE="Lax")
    app.extensions[EXTENSION] = settings
    app.register_blueprint(bp)
    return app
