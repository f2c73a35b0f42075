"""Signing in with GitHub (the OAuth web flow with the App's client id and secret), and what a
signed-in person may see and do, asked of GitHub with their own token and cached briefly.

The session cookie is Flask's (signed, HTTP-only); the person's GitHub token in it is
encrypted as well, so the cookie gives away nothing but who they are.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import urlencode, urlsplit

import requests
from cryptography.fernet import Fernet, InvalidToken
from flask import Blueprint, Flask, abort, current_app, redirect, request, session, url_for
from werkzeug.wrappers import Response as BaseResponse

from bot.settings import PERMISSION_LEVELS, Settings

# How long GitHub's answer about a person's access to a repository is trusted.
ACCESS_CACHE_SECONDS = 60.0
HTTP_TIMEOUT_SECONDS = 10
EXTENSION = "trimo.signin"
SIGN_IN_FAILED = "GitHub did not sign you in ({error}); try again"

bp = Blueprint("signin", __name__)


@dataclass
class GitHubSignIn:
    """The sign-in flow and the per-person access cache of one Trimo."""

    settings: Settings
    secret_key: bytes
    cache_seconds: float = ACCESS_CACHE_SECONDS
    _cache: dict[tuple[str, str], tuple[float, str]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        digest = hashlib.sha256(self.secret_key + b"trimo-ui-user-token").digest()
        self._fernet = Fernet(base64.urlsafe_b64encode(digest))

    def seal(self, token: str) -> str:
        return self._fernet.encrypt(token.encode()).decode()

    def unseal(self, sealed: str) -> str | None:
        try:
            return self._fernet.decrypt(sealed.encode()).decode()
        except InvalidToken:
            return None

    def permission(self, login: str, token: str, repo: str) -> str:
        """The person's role on `repo` as GitHub tells their token; "none" when GitHub shows
        them no such repository."""
        key = (login, repo)
        with self._lock:
            cached = self._cache.get(key)
            if cached is not None and time.monotonic() - cached[0] < self.cache_seconds:
                return cached[1]
        role = self._ask(token, repo)
        with self._lock:
            self._cache[key] = (time.monotonic(), role)
        return role

    def _ask(self, token: str, repo: str) -> str:
        if "/" not in repo or repo.startswith("/"):
            return "none"  # a local repository's path: nothing GitHub can vouch for
        response = requests.get(
            f"{self.settings.api_url}/repos/{repo}",
            headers={
                "Authorization": f"Bearer {token}",
                "Accept": "application/vnd.github+json",
                "X-GitHub-Api-Version": "2022-11-28",
            },
            timeout=HTTP_TIMEOUT_SECONDS,
        )
        if response.status_code != 200:
            return "none"
        granted = response.json().get("permissions") or {}
        for role, flag in (
            ("admin", "admin"),
            ("maintain", "maintain"),
            ("write", "push"),
            ("triage", "triage"),
            ("read", "pull"),
        ):
            if granted.get(flag):
                return role
        return "read"  # a public repository shown without permissions: anyone may read it


class SignedInAccess:
    """The person of the current request, by the session cookie."""

    def __init__(self, flow: GitHubSignIn) -> None:
        self.flow = flow
        self._login = session.get("login")
        sealed = session.get("token")
        self._token = flow.unseal(sealed) if isinstance(sealed, str) else None

    def user(self) -> str | None:
        return self._login if self._token else None

    def _role(self, repo: str) -> str:
        if not self._login or not self._token:
            return "none"
        return self.flow.permission(self._login, self._token, repo)

    def can_read(self, repo: str) -> bool:
        return self._role(repo) in PERMISSION_LEVELS

    def can_act(self, repo: str) -> bool:
        return self.flow.settings.allows(self._role(repo))


def flow_of(app: Flask) -> GitHubSignIn:
    flow: GitHubSignIn = app.extensions[EXTENSION]
    return flow


def init_signin(app: Flask, settings: Settings) -> GitHubSignIn:
    flow = GitHubSignIn(settings, bytes(app.config["SECRET_KEY"]))
    app.extensions[EXTENSION] = flow
    app.register_blueprint(bp)

    @app.before_request
    def _require_sign_in() -> BaseResponse | None:
        endpoint = request.endpoint or ""
        if endpoint.startswith(("signin.", "github.")) or endpoint == "ui.static":
            return None
        if not endpoint.startswith("ui."):
            return None
        if session.get("login") and session.get("token"):
            return None
        return redirect(url_for("signin.start", next=request.full_path.rstrip("?")))

    return flow


def _safe_next(target: str | None) -> str:
    # Only a path on this site: a sign-in must not send anyone elsewhere.
    if not target or not target.startswith("/") or target.startswith("//"):
        return "/runs"
    parts = urlsplit(target)
    return target if not parts.scheme and not parts.netloc else "/runs"


def _callback_url() -> str:
    settings = flow_of(current_app).settings
    path = url_for("signin.callback")
    return (
        f"{settings.public_url}{path}"
        if settings.public_url
        else request.host_url.rstrip("/") + path
    )


@bp.get("/signin")
def start() -> BaseResponse:
    settings = flow_of(current_app).settings
    state = secrets.token_urlsafe(24)
    session["oauth_state"] = state
    session["after_signin"] = _safe_next(request.args.get("next"))
    params = {
        "client_id": settings.client_id or "",
        "redirect_uri": _callback_url(),
        "state": state,
        "allow_signup": "false",
    }
    return redirect(f"{settings.web_url}/login/oauth/authorize?{urlencode(params)}")


@bp.get("/signin/callback")
def callback() -> BaseResponse:
    flow = flow_of(current_app)
    settings = flow.settings
    expected = session.pop("oauth_state", None)
    if not expected or not secrets.compare_digest(str(expected), request.args.get("state", "")):
        abort(400, "the sign-in expired or did not start here; sign in again")
    code = request.args.get("code")
    if not code:
        abort(400, SIGN_IN_FAILED.format(error=request.args.get("error", "no code")))
    secret = settings.client_secret.get_secret_value() if settings.client_secret else ""
    answer = requests.post(
        f"{settings.web_url}/login/oauth/access_token",
        data={
            "client_id": settings.client_id or "",
            "client_secret": secret,
            "code": code,
            "redirect_uri": _callback_url(),
        },
        headers={"Accept": "application/json"},
        timeout=HTTP_TIMEOUT_SECONDS,
    ).json()
    token = answer.get("access_token")
    if not token:
        abort(400, SIGN_IN_FAILED.format(error=answer.get("error", "no token")))
    user = requests.get(
        f"{settings.api_url}/user",
        headers={"Authorization": f"Bearer {token}", "Accept": "application/vnd.github+json"},
        timeout=HTTP_TIMEOUT_SECONDS,
    )
    if user.status_code != 200:
        abort(400, SIGN_IN_FAILED.format(error=f"GET /user answered {user.status_code}"))
    after = session.pop("after_signin", "/runs")
    session.clear()
    session["login"] = str(user.json()["login"])
    session["token"] = flow.seal(str(token))
    return redirect(_safe_next(after))


@bp.post("/signout")
def signout() -> BaseResponse:
    session.clear()
    return redirect(url_for("ui.runs"))
