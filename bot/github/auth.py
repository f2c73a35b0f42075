"""GitHub App authentication: the App's JWT and cached, narrowed installation tokens."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import jwt
import requests

from bot.errors import TrimoError

log = logging.getLogger(__name__)

API_VERSION = "2022-11-28"
# GitHub accepts at most 10 minutes; iat in the past absorbs clock drift between us and GitHub.
JWT_BACKDATE = 60
JWT_LIFETIME = 9 * 60
# A token with less left than this is renewed before a push or a write, so none starts with a
# token about to die (a push of a large result can take minutes).
RENEW_BEFORE = 10 * 60
TIMEOUT = 30

# What a run needs: push the branch, open the PR, comment, report the check run.
RUN_PERMISSIONS: Mapping[str, str] = {
    "contents": "write",
    "pull_requests": "write",
    "issues": "write",
    "checks": "write",
    "metadata": "read",
}

BAD_KEY = (
    "the GitHub App private key could not sign a JWT ({error}): set TRIMO_GITHUB_PRIVATE_KEY "
    "to the PEM file GitHub generated for the App"
)
INSTALLATION_REFUSED = (
    "GitHub refused an installation token for installation {installation} (repository "
    "{repository}): HTTP {status} {message}. {hint}"
)
HINTS = {
    401: "Check that TRIMO_GITHUB_APP_ID and the private key belong to the same App.",
    403: "The App may be suspended on that account.",
    404: "The App is not installed there any more, or the installation id is wrong.",
    422: "The repository is not part of the installation, or the App lacks a permission asked "
    "for: compare config/github-app-manifest.json with the App's settings.",
}
NO_INSTALLATION = (
    "the Trimo App is not installed on {owner}/{repo} (HTTP {status}): install it on the "
    "repository, or check the App id"
)


class GitHubAuthError(TrimoError):
    """GitHub refused the App's credentials; the message says which setting to check."""


@dataclass(frozen=True)
class _Token:
    value: str
    expires_at: float

    def __repr__(self) -> str:
        # A token never reaches a log, not even through a repr in a traceback.
        return f"_Token(expires_at={self.expires_at})"


class AppAuth:
    """Signs App JWTs and hands out installation tokens, cached until 10 minutes before expiry."""

    def __init__(
        self,
        app_id: int | str,
        private_key: str,
        api_url: str = "https://api.github.com",
        session: requests.Session | None = None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.app_id = str(app_id)
        self._private_key = private_key
        self.api_url = api_url.rstrip("/")
        self._session = session or requests.Session()
        self._clock = clock
        self._tokens: dict[tuple[int, str | None, tuple[tuple[str, str], ...]], _Token] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"AppAuth(app_id={self.app_id}, api_url={self.api_url!r})"

    def app_jwt(self) -> str:
        now = int(self._clock())
        claims = {"iat": now - JWT_BACKDATE, "exp": now + JWT_LIFETIME, "iss": self.app_id}
        try:
            return jwt.encode(claims, self._private_key, algorithm="RS256")
        except (ValueError, TypeError, jwt.PyJWTError) as error:
            raise GitHubAuthError(BAD_KEY.format(error=type(error).__name__)) from None

    def installation_token(
        self,
        installation_id: int,
        repository: str | None = None,
        permissions: Mapping[str, str] | None = None,
        *,
        renew: bool = False,
    ) -> str:
        """A token for one installation, narrowed to `repository` ("name" or "owner/name").

        `renew`: a new one even if the cached one looks valid (GitHub just refused it).
        """
        name = repository.rsplit("/", 1)[-1] if repository else None
        wanted = dict(RUN_PERMISSIONS if permissions is None else permissions)
        key = (installation_id, name, tuple(sorted(wanted.items())))
        with self._lock:
            cached = self._tokens.get(key)
            if (
                not renew
                and cached is not None
                and cached.expires_at - self._clock() > RENEW_BEFORE
            ):
                return cached.value
            token = self._request_token(installation_id, name, wanted)
            self._tokens[key] = token
            return token.value

    def repo_installation(self, owner: str, repo: str) -> int:
        """The installation id for a repository, for payloads that do not carry one."""
        response = self._session.get(
            f"{self.api_url}/repos/{owner}/{repo}/installation",
            headers=self._headers(),
            timeout=TIMEOUT,
        )
        if response.status_code != 200:
            raise GitHubAuthError(
                NO_INSTALLATION.format(owner=owner, repo=repo, status=response.status_code)
            )
        return int(response.json()["id"])

    def _headers(self) -> dict[str, str]:
        return {
            "Authorization": f"Bearer {self.app_jwt()}",
            "Accept": "application/vnd.github+json",
            "X-GitHub-Api-Version": API_VERSION,
        }

    def _request_token(
        self, installation_id: int, name: str | None, permissions: dict[str, str]
    ) -> _Token:
        body: dict[str, Any] = {"permissions": permissions}
        if name is not None:
            body["repositories"] = [name]
        response = self._session.post(
            f"{self.api_url}/app/installations/{installation_id}/access_tokens",
            json=body,
            headers=self._headers(),
            timeout=TIMEOUT,
        )
        if response.status_code != 201:
            raise GitHubAuthError(
                INSTALLATION_REFUSED.format(
                    installation=installation_id,
                    repository=name or "(all)",
                    status=response.status_code,
                    message=_message(response),
                    hint=HINTS.get(response.status_code, ""),
                ).strip()
            )
        data = response.json()
        expires_at = datetime.fromisoformat(str(data["expires_at"]).replace("Z", "+00:00"))
        log.info(
            "installation token for installation %s (repository %s) valid until %s",
            installation_id,
            name or "(all)",
            data["expires_at"],
        )
        return _Token(str(data["token"]), expires_at.timestamp())


def _message(response: requests.Response) -> str:
    try:
        return str(response.json().get("message", ""))
    except ValueError:
        return response.text[:200]
