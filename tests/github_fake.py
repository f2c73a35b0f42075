"""The one fake GitHub every test uses: REST state behind `responses`, each request checked
against GitHub's OpenAPI description (tests/fixtures/github/openapi-subset.json).

Use the `fake_github` fixture (or `with FakeGitHub(...) as fake:`). Set up what the test needs
(`add_repo`, `add_issue`, `add_pull`, `set_permission`, `issue_token`), run Trimo's code, then
assert on what GitHub received (`fake.requests`, `fake.comments`, `fake.check_runs`, ...).
Requests the spec rejects, and operations outside the subset, end up in `fake.violations` and
fail the test when the fake closes.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cache
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlencode, urlsplit

import jwt
import pytest
import requests
import responses
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from openapi_core import OpenAPI
from openapi_core.datatypes import RequestParameters
from werkzeug.datastructures import Headers, ImmutableMultiDict
from werkzeug.serving import make_server

from tests.conftest import GITHUB_FIXTURES

SPEC_SERVER = "https://api.github.com"
BOT_LOGIN = "trimo[bot]"
APP_ID = 424242
APP_SLUG = "trimo"
DEFAULT_INSTALLATION = 1
PAGE_SIZE = 30
RATE_LIMIT = 5000
COMMENT_MAX = 65536
CHECK_TEXT_MAX = 65535
ANNOTATIONS_PER_REQUEST = 50

UNKNOWN_OPERATION = "{method} {path}: not an operation of openapi-subset.json (see its x-subset)"
SCHEMA_VIOLATION = "{method} {path}: {error}"
STRAY_REQUEST = "{method} {url}: sent to api.github.com while the fake serves another GitHub"

Json = dict[str, Any]
Reply = tuple[int, dict[str, str], str]


@cache
def _spec() -> OpenAPI:
    # Loading the description takes a quarter of a second: once per test session is enough.
    path = GITHUB_FIXTURES / "openapi-subset.json"
    return OpenAPI.from_dict(json.loads(path.read_text()))


@cache
def app_private_key() -> str:
    """An RSA key (PEM) for the fake App; the fake verifies App JWTs with its public half."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


def _public_key(private_pem: str) -> str:
    key = serialization.load_pem_private_key(private_pem.encode(), password=None)
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(int(epoch), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def fake_sha(seed: str) -> str:
    """A stable 40-hex commit id for a branch or ref the test did not give one."""
    return hashlib.sha1(seed.encode(), usedforsecurity=False).hexdigest()


@dataclass(frozen=True)
class RecordedRequest:
    """One request as GitHub received it; `path` is relative to the API root."""

    method: str
    path: str
    query: dict[str, list[str]]
    json: Any
    headers: dict[str, str]
    at: float  # time.monotonic() on arrival


@dataclass
class _Failure:
    method: str
    path: re.Pattern[str]
    status: int
    headers: dict[str, str]
    body: Any
    times: int
    apply: bool


class _SpecRequest:
    """A recorded request as openapi-core sees it: rebased onto the spec's server."""

    def __init__(self, req: requests.PreparedRequest, path: str) -> None:
        self.host_url = SPEC_SERVER
        # `{path}` in contents/{path} is one template segment: GitHub accepts slashes there.
        match = re.fullmatch(r"(/repos/[^/]+/[^/]+/contents/)(.+)", path)
        self.path = match.group(1) + quote(match.group(2), safe="") if match else path
        self.method = (req.method or "get").lower()
        query = urlsplit(req.url or "").query
        self.parameters = RequestParameters(
            query=ImmutableMultiDict(parse_qs(query, keep_blank_values=True)),
            header=Headers(dict(req.headers)),
            cookie=ImmutableMultiDict(),
        )
        raw = req.body
        self.body = raw.encode() if isinstance(raw, str) else raw
        self.content_type = str(req.headers.get("Content-Type") or "application/json").lower()


class FakeGitHub:
    """GitHub's REST API for one App, at `base_url` (api.github.com or a GHES `/api/v3` root)."""

    def __init__(
        self,
        base_url: str = SPEC_SERVER,
        validate: bool = True,
        *,
        check_auth: bool = True,
        app_id: int = APP_ID,
        clock: Callable[[], float] = time.time,
        token_lifetime: float = 3600.0,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        parts = urlsplit(self.base_url)
        self.web_url = (
            "https://github.com"
            if parts.netloc == "api.github.com"
            else f"{parts.scheme}://{parts.netloc}"
        )
        self._prefix = parts.path  # "" for api.github.com, "/api/v3" for GHES
        self.validate = validate
        self.check_auth = check_auth
        self.app_id = app_id
        self.private_key = app_private_key()
        self._public_key = _public_key(self.private_key)
        self.clock = clock
        # GitHub's installation tokens last an hour; a test of renewal hands out shorter ones.
        self.token_lifetime = token_lifetime

        self.requests: list[RecordedRequest] = []
        # The requests answered with a failure of `fail_next`, and the status they got.
        self.failed: list[tuple[RecordedRequest, int]] = []
        self.violations: list[str] = []
        self.repos: dict[str, Json] = {}
        self.issues: dict[tuple[str, int], Json] = {}
        self.comments: dict[int, Json] = {}
        # Every body a comment had, in the order GitHub took them (the first is its create).
        self.comment_history: dict[int, list[str]] = {}
        self.review_comments: dict[int, Json] = {}
        self.reactions: list[Json] = []
        self.pulls: dict[tuple[str, int], Json] = {}
        self.check_runs: dict[int, Json] = {}
        # Every create/update body a check run received, in order.
        self.check_run_history: dict[int, list[Json]] = {}
        self.statuses: dict[tuple[str, str], list[Json]] = {}
        self.permissions: dict[tuple[str | None, str], str] = {}
        self.tokens: dict[str, Json] = {}
        self.token_requests: list[Json] = []
        self.labels: dict[tuple[str, int], list[str]] = {}
        # The OAuth web flow of github.com (not part of the REST description): the App's
        # client credentials, who the browser is signed in to GitHub as, codes handed out.
        self.oauth_clients: dict[str, str] = {}
        self.signed_in: str | None = None
        self._oauth_codes: dict[str, tuple[str, str, str]] = {}
        # The manifest flow: manifests posted to /settings/apps/new, by the code handed back;
        # the Apps made from them (conversions), as GitHub answered.
        self._manifests: dict[str, Json] = {}
        self.created_apps: list[Json] = []

        self._ids = itertools.count(1_000_001)
        self._lock = threading.RLock()
        self._failures: list[_Failure] = []
        self._remaining = RATE_LIMIT
        self._mock = responses.RequestsMock(assert_all_requests_are_fired=False)
        self._routes = [
            (method, re.compile(_template_regex(template)), getattr(self, handler))
            for method, template, handler in _ROUTES
        ]
        # PyGithub spells out the default port (https://api.github.com:443/...).
        port = {"https": "443", "http": "80"}.get(parts.scheme, "")
        any_url = re.compile(
            re.escape(f"{parts.scheme}://{parts.netloc}")
            + (f"(:{port})?" if port and not parts.port else "")
            + re.escape(self._prefix)
            + r"(/.*)?$"
        )
        for method in ("GET", "POST", "PATCH", "PUT", "DELETE"):
            self._mock.add_callback(method, any_url, callback=self._handle)
        web = urlsplit(self.web_url)
        oauth_url = re.compile(
            re.escape(f"{web.scheme}://{web.netloc}")
            + r"(:443)?/login/oauth/(authorize|access_token)"
            r"(\?.*)?$"
        )
        for method in ("GET", "POST"):
            self._mock.add_callback(method, oauth_url, callback=self._handle_web)
            if parts.netloc != urlsplit(SPEC_SERVER).netloc:
                # Faking a GitHub Enterprise Server: nothing may go to api.github.com.
                stray = re.compile(re.escape(SPEC_SERVER) + r"(:443)?(/.*)?$")
                self._mock.add_callback(method, stray, callback=self._stray)
        # Only GitHub is faked: the Docker engine's socket and servers on this machine are real.
        for prefix in ("http+docker://", "http://127.0.0.1", "http://localhost"):
            self._mock.add_passthru(prefix)

    # ---- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> FakeGitHub:
        self._mock.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._mock.stop()
        self._mock.reset()
        if self.violations and exc[0] is None:
            raise AssertionError(
                "requests GitHub's OpenAPI description rejects:\n  " + "\n  ".join(self.violations)
            )

    # ---- set-up helpers ----------------------------------------------------------------------

    def add_repo(
        self,
        full_name: str,
        *,
        default_branch: str = "main",
        private: bool = False,
        installation_id: int = DEFAULT_INSTALLATION,
        files: dict[str, bytes | str] | None = None,
        branches: dict[str, str] | None = None,
    ) -> Json:
        owner, name = full_name.split("/")
        repo = {
            "id": next(self._ids),
            "node_id": f"R_{name}",
            "name": name,
            "full_name": full_name,
            "owner": self._user(owner, "Organization"),
            "private": private,
            "visibility": "private" if private else "public",
            "fork": False,
            "default_branch": default_branch,
            "url": f"{self.base_url}/repos/{full_name}",
            "html_url": f"{self.web_url}/{full_name}",
            "clone_url": f"{self.web_url}/{full_name}.git",
            "git_url": f"git://{urlsplit(self.web_url).netloc}/{full_name}.git",
            "ssh_url": f"git@{urlsplit(self.web_url).netloc}:{full_name}.git",
            "archived": False,
            "disabled": False,
            "permissions": {"admin": False, "push": True, "pull": True},
        }
        self.repos[full_name] = {
            "json": repo,
            "installation_id": installation_id,
            "branches": {default_branch: fake_sha(f"{full_name}:{default_branch}")}
            | (branches or {}),
            "files": {k: v.encode() if isinstance(v, str) else v for k, v in (files or {}).items()},
            "next_number": 1,
        }
        return repo

    def add_issue(
        self, full_name: str, *, title: str = "An issue", body: str = "", user: str = "octocat"
    ) -> Json:
        with self._lock:
            number = self._next_number(full_name)
            issue = self._issue_json(full_name, number, title, body, self._user(user))
            self.issues[(full_name, number)] = issue
            return issue

    def add_comment(self, full_name: str, number: int, body: str, *, user: str = "octocat") -> Json:
        """A comment someone else wrote (Trimo's own comments arrive through the API)."""
        with self._lock:
            return self._new_comment(full_name, number, body, self._user(user))

    def add_pull(
        self,
        full_name: str,
        *,
        head: str,
        base: str | None = None,
        head_repo: str | None = None,
        head_sha: str | None = None,
        title: str = "A change",
        body: str = "",
        user: str = "octocat",
        draft: bool = False,
        maintainer_can_modify: bool = False,
    ) -> Json:
        """An open pull request; `head_repo` other than `full_name` makes it a fork's, and
        `maintainer_can_modify` says whether its author allows edits from maintainers."""
        with self._lock:
            pull = self._new_pull(
                full_name,
                head,
                base,
                head_repo=head_repo or full_name,
                head_sha=head_sha,
                title=title,
                body=body,
                user=self._user(user),
                draft=draft,
            )
            pull["maintainer_can_modify"] = maintainer_can_modify
            return pull

    def add_review_comment(
        self, full_name: str, number: int, body: str, *, user: str = "octocat"
    ) -> Json:
        with self._lock:
            cid = next(self._ids)
            comment = {
                "id": cid,
                "body": body,
                "user": self._user(user),
                "pull_request_url": f"{self.base_url}/repos/{full_name}/pulls/{number}",
                "html_url": f"{self.web_url}/{full_name}/pull/{number}#discussion_r{cid}",
                "url": f"{self.base_url}/repos/{full_name}/pulls/comments/{cid}",
                "in_reply_to_id": None,
                "_repo": full_name,
                "_number": number,
            }
            self.review_comments[cid] = comment
            return comment

    def set_permission(self, user: str, permission: str, *, repo: str | None = None) -> None:
        """`permission` is the exact role: admin, maintain, write, triage, read or none."""
        self.permissions[(repo, user)] = permission

    def set_file(self, full_name: str, path: str, content: bytes | str) -> None:
        self.repos[full_name]["files"][path] = (
            content.encode() if isinstance(content, str) else content
        )

    def issue_token(
        self, installation_id: int = DEFAULT_INSTALLATION, repositories: list[str] | None = None
    ) -> str:
        """An installation token as if the App had asked for one (for tests that skip AppAuth)."""
        with self._lock:
            return str(self._new_token(installation_id, repositories, None)["token"])

    def fail_next(
        self,
        method: str,
        path_regex: str,
        status: int,
        *,
        headers: dict[str, str] | None = None,
        times: int = 1,
        body: Any = None,
        apply: bool = False,
    ) -> None:
        """Answer the next `times` matching requests with `status`.

        `path_regex` is searched in the path relative to the API root. With `apply=True` the
        request still takes effect before the failure is returned: a 502 after GitHub did the work.
        """
        self._failures.append(
            _Failure(
                method.upper(), re.compile(path_regex), status, headers or {}, body, times, apply
            )
        )

    # ---- queries for assertions --------------------------------------------------------------

    def add_oauth_client(self, client_id: str, client_secret: str) -> None:
        """The App's OAuth client id and secret, as GitHub shows them on the App's page."""
        self.oauth_clients[client_id] = client_secret

    def user_token(self, login: str) -> str:
        """A user-to-server token of `login`, as the OAuth flow would give one."""
        with self._lock:
            return self._new_user_token(login)

    def wsgi(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        """This fake as a WSGI app, for a real HTTP server that a browser or another process
        reaches (`served_fake`); the same state answers as through `responses`."""
        length = int(environ.get("CONTENT_LENGTH") or 0)
        body = environ["wsgi.input"].read(length) if length else None
        headers = {
            key[5:].replace("_", "-").title(): value
            for key, value in environ.items()
            if key.startswith("HTTP_")
        }
        if environ.get("CONTENT_TYPE"):
            headers["Content-Type"] = environ["CONTENT_TYPE"]
        query = environ.get("QUERY_STRING", "")
        url = f"{self.web_url}{environ.get('PATH_INFO', '/')}" + (f"?{query}" if query else "")
        req = requests.Request(environ["REQUEST_METHOD"], url, headers=headers, data=body)
        prepared = req.prepare()
        path = environ.get("PATH_INFO", "/")
        if path.startswith("/login/oauth/") or path.endswith("/settings/apps/new"):
            status, reply_headers, text = self._handle_web(prepared)
        elif path.startswith(self._prefix + "/"):
            status, reply_headers, text = self._handle(prepared)
        else:  # e.g. a browser's /favicon.ico
            status, reply_headers, text = 404, {"content-type": "text/plain"}, "Not Found"
        start_response(f"{status} {_REASONS.get(status, 'OK')}", list(reply_headers.items()))
        return [text.encode()]

    def requests_to(self, method: str, path_regex: str) -> list[RecordedRequest]:
        pattern = re.compile(path_regex)
        return [r for r in self.requests if r.method == method.upper() and pattern.search(r.path)]

    def comments_on(self, full_name: str, number: int) -> list[Json]:
        return [
            c for c in self.comments.values() if c["_repo"] == full_name and c["_number"] == number
        ]

    def token_valid(self, token: str) -> bool:
        """Whether `token` is an installation token GitHub would still accept (git over HTTP)."""
        with self._lock:
            record = self.tokens.get(token)
            return record is not None and record["_expires"] > self.clock()

    def writes(self) -> list[RecordedRequest]:
        return [r for r in self.requests if r.method != "GET"]

    # ---- dispatch ----------------------------------------------------------------------------

    def _handle(self, req: requests.PreparedRequest) -> Reply:
        split = urlsplit(req.url or "")
        raw_path = split.path[len(self._prefix) :] or "/"
        path = unquote(raw_path)
        query = parse_qs(split.query, keep_blank_values=True)
        raw = req.body.decode() if isinstance(req.body, bytes) else req.body
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = raw
        method = (req.method or "GET").upper()
        with self._lock:
            recorded = RecordedRequest(
                method, path, query, body, dict(req.headers), time.monotonic()
            )
            self.requests.append(recorded)
            outside = self._as_user(req, method, path) or self._manifest_conversion(method, path)
            if outside is not None:
                return outside
            if self.validate:
                self._validate(req, method, raw_path)
            failure = self._take_failure(method, path)
            if failure is not None:
                self.failed.append((recorded, failure.status))
            if failure is not None and not failure.apply:
                return self._failure_reply(failure)
            reply = self._route(req, method, raw_path, query, body)
            if failure is not None:
                return self._failure_reply(failure)
            return reply

    # ---- the OAuth web flow and user tokens (docs.github.com: "Authorizing OAuth apps",
    # "Generating a user access token for a GitHub App"), outside the REST description ----

    def _handle_web(self, req: requests.PreparedRequest) -> Reply:
        split = urlsplit(req.url or "")
        query = {k: v[0] for k, v in parse_qs(split.query).items()}
        raw = req.body.decode() if isinstance(req.body, bytes) else (req.body or "")
        with self._lock:
            self.requests.append(
                RecordedRequest(
                    (req.method or "GET").upper(),
                    split.path,
                    parse_qs(split.query),
                    raw,
                    dict(req.headers),
                    time.monotonic(),
                )
            )
            if split.path.endswith("/settings/apps/new") and req.method == "POST":
                form = {k: v[0] for k, v in parse_qs(raw).items()}
                return self._new_app_from_manifest(query, form)
            if split.path.endswith("/authorize") and req.method == "GET":
                return self._oauth_authorize(query)
            if split.path.endswith("/access_token") and req.method == "POST":
                form = {k: v[0] for k, v in parse_qs(raw).items()} if raw else {}
                if raw.startswith("{"):
                    form = json.loads(raw)
                return self._oauth_access_token(query | form)
            return 404, {"content-type": "text/plain"}, "Not Found"

    def _new_app_from_manifest(self, query: dict[str, str], form: dict[str, str]) -> Reply:
        """The person confirmed the App on GitHub's page: back to its redirect_url with a code
        ("Registering a GitHub App from a manifest")."""
        try:
            manifest = json.loads(form.get("manifest", ""))
        except ValueError:
            return 422, {"content-type": "text/html"}, "<h1>Invalid manifest</h1>"
        if not isinstance(manifest, dict) or not manifest.get("redirect_url"):
            return 422, {"content-type": "text/html"}, "<h1>Invalid manifest</h1>"
        code = secrets.token_hex(10)
        self._manifests[code] = manifest
        params = {"code": code} | ({"state": query["state"]} if "state" in query else {})
        return 302, {"location": f"{manifest['redirect_url']}?{urlencode(params)}"}, ""

    def _manifest_conversion(self, method: str, path: str) -> Reply | None:
        """POST /app-manifests/{code}/conversions: the App's credentials, once per code."""
        match = re.fullmatch(r"/app-manifests/([^/]+)/conversions", path)
        if method != "POST" or match is None:
            return None
        manifest = self._manifests.pop(match.group(1), None)
        if manifest is None:
            return self._reply(404, {"message": "Not Found"})
        client_id, client_secret = "Iv1." + secrets.token_hex(8), secrets.token_hex(20)
        self.add_oauth_client(client_id, client_secret)
        app = {
            "id": self.app_id,
            "slug": APP_SLUG,
            "node_id": "A_trimo",
            "name": manifest.get("name", "Trimo"),
            "owner": self._user("octo", "Organization"),
            "html_url": f"{self.web_url}/apps/{APP_SLUG}",
            "external_url": manifest.get("url"),
            "permissions": manifest.get("default_permissions", {}),
            "events": manifest.get("default_events", []),
            "client_id": client_id,
            "client_secret": client_secret,
            "webhook_secret": secrets.token_hex(20),
            "pem": self.private_key,
        }
        self.created_apps.append(app | {"manifest": manifest})
        return self._reply(201, app)

    def _oauth_authorize(self, query: dict[str, str]) -> Reply:
        client_id, redirect = query.get("client_id", ""), query.get("redirect_uri", "")
        if client_id not in self.oauth_clients or not redirect:
            return 404, {"content-type": "text/html"}, "<h1>404: unknown application</h1>"
        if self.signed_in is None:
            return 200, {"content-type": "text/html"}, "<h1>Sign in to GitHub</h1>"
        code = secrets.token_hex(10)
        self._oauth_codes[code] = (client_id, self.signed_in, redirect)
        params = {"code": code} | ({"state": query["state"]} if "state" in query else {})
        sep = "&" if "?" in redirect else "?"
        return 302, {"location": f"{redirect}{sep}{urlencode(params)}"}, ""

    def _oauth_access_token(self, form: dict[str, str]) -> Reply:
        headers = {"content-type": "application/json; charset=utf-8"}
        client_id, code = form.get("client_id", ""), form.get("code", "")
        if self.oauth_clients.get(client_id) != form.get("client_secret"):
            error = {"error": "incorrect_client_credentials"}
            return 200, headers, json.dumps(error)
        issued = self._oauth_codes.pop(code, None)
        if issued is None or issued[0] != client_id:
            return 200, headers, json.dumps({"error": "bad_verification_code"})
        if form.get("redirect_uri") and form["redirect_uri"] != issued[2]:
            return 200, headers, json.dumps({"error": "redirect_uri_mismatch"})
        token = self._new_user_token(issued[1])
        answer = {
            "access_token": token,
            "token_type": "bearer",
            "scope": "",
            "expires_in": 28800,
            "refresh_token": "ghr_" + secrets.token_hex(20),
            "refresh_token_expires_in": 15897600,
        }
        return 200, headers, json.dumps(answer)

    def _new_user_token(self, login: str) -> str:
        token = "ghu_" + secrets.token_hex(18)
        self.tokens[token] = {
            "token": token,
            "_user": login,
            "_installation": None,
            "_repositories": None,
            "_expires": self.clock() + 28800,
        }
        return token

    def _as_user(self, req: requests.PreparedRequest, method: str, path: str) -> Reply | None:
        """GET /user and GET /repos/{owner}/{repo} with a user's token; None for other calls."""
        _, _, credential = (req.headers.get("Authorization") or "").partition(" ")
        token = self.tokens.get(credential)
        if token is None or "_user" not in token or method != "GET":
            return None
        login = str(token["_user"])
        if token["_expires"] <= self.clock():
            return self._reply(401, {"message": "Bad credentials"})
        if path == "/user":
            return self._reply(200, self._user(login) | {"name": login, "email": None})
        match = re.fullmatch(r"/repos/([^/]+)/([^/]+)", path)
        if match is None:
            return None
        full_name = f"{match.group(1)}/{match.group(2)}"
        stored = self.repos.get(full_name)
        role = self.permissions.get((full_name, login), self.permissions.get((None, login)))
        role = role or "none"
        # A user's token sees what the person can see (a public repository, or a private one
        # they were given a role on), and only where the App is installed.
        if stored is None or (stored["json"]["private"] and role == "none"):
            return self._not_found()
        order = ["none", "read", "triage", "write", "maintain", "admin"]
        level = order.index(role) if role in order else 0
        permissions = {
            "pull": level >= 1 or not stored["json"]["private"],
            "triage": level >= 2,
            "push": level >= 3,
            "maintain": level >= 4,
            "admin": level >= 5,
        }
        return self._reply(200, stored["json"] | {"permissions": permissions})

    def _stray(self, req: requests.PreparedRequest) -> Reply:
        with self._lock:
            self.violations.append(STRAY_REQUEST.format(method=req.method, url=req.url))
        return 502, {}, json.dumps({"message": "not the GitHub this fake serves"})

    def _route(
        self,
        req: requests.PreparedRequest,
        method: str,
        path: str,
        query: dict[str, list[str]],
        body: Any,
    ) -> Reply:
        for route_method, pattern, handler in self._routes:
            match = pattern.fullmatch(path)
            if route_method == method and match:
                args = {k: unquote(v) for k, v in match.groupdict().items()}
                auth = self._authorize(req, handler.__name__, args)
                if auth is not None:
                    return auth
                result: Reply = handler(args, query, body)
                return result
        return self._not_found()

    def _validate(self, req: requests.PreparedRequest, method: str, path: str) -> None:
        errors = list(_spec().iter_request_errors(_SpecRequest(req, path)))
        for error in errors:
            if type(error).__name__ in {"PathNotFound", "OperationNotFound"}:
                self.violations.append(UNKNOWN_OPERATION.format(method=method, path=path))
                continue
            cause = error.__cause__
            detail = "; ".join(str(e.message) for e in getattr(cause, "schema_errors", ()) or ())
            text = f"{error}" + (f" ({detail})" if detail else "")
            self.violations.append(SCHEMA_VIOLATION.format(method=method, path=path, error=text))

    def _take_failure(self, method: str, path: str) -> _Failure | None:
        for failure in self._failures:
            if failure.method == method and failure.path.search(path):
                failure.times -= 1
                if failure.times <= 0:
                    self._failures.remove(failure)
                return failure
        return None

    def _failure_reply(self, failure: _Failure) -> Reply:
        body = failure.body
        if body is None:
            body = {"message": _REASONS.get(failure.status, "Error")}
        status, headers, text = self._reply(failure.status, body)
        return status, headers | failure.headers, text

    def _reply(self, status: int, body: Any = None, extra: dict[str, str] | None = None) -> Reply:
        self._remaining = max(self._remaining - 1, 0)
        headers = {
            "content-type": "application/json; charset=utf-8",
            "x-github-api-version-selected": "2022-11-28",
            "x-github-request-id": secrets.token_hex(8).upper(),
            "x-ratelimit-limit": str(RATE_LIMIT),
            "x-ratelimit-remaining": str(self._remaining),
            "x-ratelimit-reset": str(int(self.clock()) + 3600),
            "x-ratelimit-used": str(RATE_LIMIT - self._remaining),
            "x-ratelimit-resource": "core",
        } | (extra or {})
        if isinstance(body, dict) and status >= 400:
            body.setdefault("documentation_url", "https://docs.github.com/rest")
            body.setdefault("status", str(status))
        return status, headers, "" if body is None else json.dumps(body)

    def _not_found(self) -> Reply:
        return self._reply(404, {"message": "Not Found"})

    def _authorize(
        self, req: requests.PreparedRequest, handler: str, args: dict[str, str]
    ) -> Reply | None:
        if not self.check_auth:
            return None
        scheme, _, credential = (req.headers.get("Authorization") or "").partition(" ")
        if handler in _JWT_HANDLERS:
            try:
                claims = jwt.decode(
                    credential,
                    self._public_key,
                    algorithms=["RS256"],
                    options={"verify_iat": False},
                    leeway=0,
                )
            except jwt.PyJWTError as error:
                return self._reply(
                    401, {"message": f"A JSON web token could not be decoded: {error}"}
                )
            if str(claims.get("iss")) != str(self.app_id) or claims["exp"] - claims["iat"] > 660:
                return self._reply(
                    401,
                    {
                        "message": "'Expiration time' claim ('exp') is too far "
                        "in the future, or 'iss' is not the App"
                    },
                )
            return None
        token = self.tokens.get(credential)
        if scheme.lower() not in {"token", "bearer"} or token is None:
            return self._reply(401, {"message": "Bad credentials"})
        if token["_expires"] <= self.clock():
            return self._reply(401, {"message": "Bad credentials"})
        repo = f"{args['owner']}/{args['repo']}" if "owner" in args else None
        if repo is not None and repo in self.repos:
            narrowed = token["_repositories"]
            if self.repos[repo]["installation_id"] != token["_installation"] or (
                narrowed is not None and args["repo"] not in narrowed
            ):
                return self._not_found()
        return None

    # ---- state helpers -----------------------------------------------------------------------

    def _user(self, login: str, kind: str | None = None) -> Json:
        kind = kind or ("Bot" if login.endswith("[bot]") else "User")
        url = f"{self.base_url}/users/{quote(login)}"
        return {
            "login": login,
            "id": int(hashlib.sha1(login.encode(), usedforsecurity=False).hexdigest()[:7], 16),
            "node_id": f"U_{login}",
            "type": kind,
            "site_admin": False,
            "url": url,
            "html_url": f"{self.web_url}/{quote(login)}",
            "avatar_url": f"{self.web_url}/avatars/{quote(login)}",
            "gravatar_id": "",
            "events_url": f"{url}/events{{/privacy}}",
            "followers_url": f"{url}/followers",
            "following_url": f"{url}/following{{/other_user}}",
            "gists_url": f"{url}/gists{{/gist_id}}",
            "organizations_url": f"{url}/orgs",
            "received_events_url": f"{url}/received_events",
            "repos_url": f"{url}/repos",
            "starred_url": f"{url}/starred{{/owner}}{{/repo}}",
            "subscriptions_url": f"{url}/subscriptions",
        }

    def _repo(self, args: dict[str, str]) -> Json | None:
        return self.repos.get(f"{args['owner']}/{args['repo']}")

    def _next_number(self, full_name: str) -> int:
        state = self.repos[full_name]
        number = int(state["next_number"])
        state["next_number"] = number + 1
        return number

    def _issue_json(self, full_name: str, number: int, title: str, body: str, user: Json) -> Json:
        now = _iso(self.clock())
        api = f"{self.base_url}/repos/{full_name}/issues/{number}"
        return {
            "id": next(self._ids),
            "node_id": f"I_{number}",
            "number": number,
            "title": title,
            "body": body,
            "user": user,
            "state": "open",
            "labels": [],
            "assignees": [],
            "locked": False,
            "comments": 0,
            "created_at": now,
            "updated_at": now,
            "closed_at": None,
            "author_association": "MEMBER",
            "url": api,
            "repository_url": f"{self.base_url}/repos/{full_name}",
            "labels_url": f"{api}/labels{{/name}}",
            "comments_url": f"{api}/comments",
            "events_url": f"{api}/events",
            "html_url": f"{self.web_url}/{full_name}/issues/{number}",
        }

    def _new_comment(self, full_name: str, number: int, body: str, user: Json) -> Json:
        cid = next(self._ids)
        now = _iso(self.clock())
        kind = "pull" if (full_name, number) in self.pulls else "issues"
        comment = {
            "id": cid,
            "node_id": f"IC_{cid}",
            "url": f"{self.base_url}/repos/{full_name}/issues/comments/{cid}",
            "html_url": f"{self.web_url}/{full_name}/{kind}/{number}#issuecomment-{cid}",
            "issue_url": f"{self.base_url}/repos/{full_name}/issues/{number}",
            "body": body,
            "user": user,
            "created_at": now,
            "updated_at": now,
            "author_association": "NONE" if user["type"] == "Bot" else "MEMBER",
            "_repo": full_name,
            "_number": number,
        }
        self.comments[cid] = comment
        self.comment_history[cid] = [body]
        self.issues[(full_name, number)]["comments"] += 1
        return comment

    def _new_pull(
        self,
        full_name: str,
        head: str,
        base: str | None,
        *,
        head_repo: str,
        head_sha: str | None,
        title: str,
        body: str,
        user: Json,
        draft: bool,
    ) -> Json:
        number = self._next_number(full_name)
        state = self.repos[full_name]
        base = base or str(state["json"]["default_branch"])
        issue = self._issue_json(full_name, number, title, body, user)
        api = f"{self.base_url}/repos/{full_name}/pulls/{number}"
        head_json = (
            self.repos[head_repo]["json"]
            if head_repo in self.repos
            else {
                "full_name": head_repo,
                "name": head_repo.split("/")[1],
                "fork": True,
                "owner": self._user(head_repo.split("/", maxsplit=1)[0]),
                "clone_url": f"{self.web_url}/{head_repo}.git",
            }
        )
        pull = issue | {
            "url": api,
            "html_url": f"{self.web_url}/{full_name}/pull/{number}",
            "issue_url": issue["url"],
            "diff_url": f"{self.web_url}/{full_name}/pull/{number}.diff",
            "patch_url": f"{self.web_url}/{full_name}/pull/{number}.patch",
            "commits_url": f"{api}/commits",
            "review_comments_url": f"{api}/comments",
            "review_comment_url": f"{self.base_url}/repos/{full_name}/pulls/comments{{/number}}",
            "statuses_url": f"{self.base_url}/repos/{full_name}/statuses/{head_sha}",
            "draft": draft,
            "maintainer_can_modify": False,
            "merged": False,
            "merged_at": None,
            "merge_commit_sha": None,
            "head": {
                "label": f"{head_repo.split('/', maxsplit=1)[0]}:{head}",
                "ref": head,
                "sha": head_sha or state["branches"].get(head) or fake_sha(f"{head_repo}:{head}"),
                "user": head_json["owner"],
                "repo": head_json,
            },
            "base": {
                "label": f"{full_name.split('/', maxsplit=1)[0]}:{base}",
                "ref": base,
                "sha": state["branches"].get(base) or fake_sha(f"{full_name}:{base}"),
                "user": state["json"]["owner"],
                "repo": state["json"],
            },
        }
        self.pulls[(full_name, number)] = pull
        self.issues[(full_name, number)] = issue | {
            "pull_request": {"url": api, "html_url": pull["html_url"]}
        }
        return pull

    def _new_token(
        self, installation_id: int, repositories: list[str] | None, permissions: Json | None
    ) -> Json:
        expires = self.clock() + self.token_lifetime
        token = "ghs_" + secrets.token_urlsafe(27).replace("-", "a").replace("_", "b")[:36]
        record = {
            "token": token,
            "expires_at": _iso(expires),
            "permissions": permissions or {"contents": "write", "metadata": "read"},
            "repository_selection": "selected" if repositories else "all",
            "_installation": installation_id,
            "_repositories": repositories,
            "_expires": expires,
        }
        self.tokens[token] = record
        return record

    def _page(self, items: list[Any], query: dict[str, list[str]], path: str) -> Reply:
        per_page = int(query.get("per_page", [PAGE_SIZE])[0])
        page = int(query.get("page", ["1"])[0])
        chunk = items[(page - 1) * per_page : page * per_page]
        links = []
        if page * per_page < len(items):
            params = {k: v[0] for k, v in query.items()} | {"page": str(page + 1)}
            links.append(f'<{self.base_url}{path}?{urlencode(params)}>; rel="next"')
        return self._reply(200, chunk, {"link": ", ".join(links)} if links else None)

    # ---- handlers: apps ----------------------------------------------------------------------

    def _create_token(self, args: dict[str, str], query: Any, body: Any) -> Reply:
        installation_id = int(args["installation_id"])
        body = body or {}
        names = body.get("repositories")
        for name in names or []:
            owned = [s for s in self.repos.values() if s["json"]["name"] == name]
            if not any(s["installation_id"] == installation_id for s in owned):
                return self._reply(
                    422,
                    {
                        "message": f"There is at least one repository that "
                        f"does not exist or is not accessible to the "
                        f"parent installation: {name}"
                    },
                )
        self.token_requests.append({"installation_id": installation_id} | body)
        record = self._new_token(installation_id, names, body.get("permissions"))
        public = {k: v for k, v in record.items() if not k.startswith("_")}
        return self._reply(201, public)

    def _installation_json(self, installation_id: int, owner: str) -> Json:
        return {
            "id": installation_id,
            "app_id": self.app_id,
            "app_slug": APP_SLUG,
            "account": self._user(owner, "Organization"),
            "target_type": "Organization",
            "repository_selection": "selected",
            "access_tokens_url": (
                f"{self.base_url}/app/installations/{installation_id}/access_tokens"
            ),
            "permissions": {
                "contents": "write",
                "issues": "write",
                "pull_requests": "write",
                "checks": "write",
                "metadata": "read",
            },
            "events": ["issues", "issue_comment", "pull_request"],
        }

    def _repo_installation(self, args: dict[str, str], query: Any, body: Any) -> Reply:
        repo = self._repo(args)
        if repo is None:
            return self._not_found()
        return self._reply(200, self._installation_json(repo["installation_id"], args["owner"]))

    def _get_app(self, args: dict[str, str], query: Any, body: Any) -> Reply:
        return self._reply(
            200,
            {
                "id": self.app_id,
                "slug": APP_SLUG,
                "name": "Trimo",
                "node_id": "A_trimo",
                "owner": self._user("trimo-org", "Organization"),
                "description": "",
                "external_url": "https://trimo.example.test",
                "html_url": f"{self.web_url}/apps/trimo",
                "created_at": _iso(0),
                "updated_at": _iso(0),
                "permissions": {"contents": "write", "metadata": "read"},
                "events": [],
            },
        )

    def _installation_repos(self, args: dict[str, str], query: Any, body: Any) -> Reply:
        # _authorize has checked the token; the query string holds no token, so find it again.
        token = self.tokens[self._last_credential()]
        repos = [
            s["json"]
            for s in self.repos.values()
            if s["installation_id"] == token["_installation"]
            and (token["_repositories"] is None or s["json"]["name"] in token["_repositories"])
        ]
        return self._reply(200, {"total_count": len(repos), "repositories": repos})

    def _last_credential(self) -> str:
        return self.requests[-1].headers.get("Authorization", " ").partition(" ")[2]

    def _rate_limit(self, args: dict[str, str], query: Any, body: Any) -> Reply:
        rate = {
            "limit": RATE_LIMIT,
            "remaining": self._remaining,
            "used": RATE_LIMIT - self._remaining,
            "reset": int(self.clock()) + 3600,
        }
        search = {"limit": 30, "remaining": 30, "used": 0, "reset": int(self.clock()) + 60}
        return self._reply(200, {"resources": {"core": rate, "search": search}, "rate": rate})

    # ---- handlers: repository ----------------------------------------------------------------

    def _get_repo(self, args: dict[str, str], query: Any, body: Any) -> Reply:
        repo = self._repo(args)
        return self._reply(200, repo["json"]) if repo else self._not_found()

    def _get_branch(self, args: dict[str, str], query: Any, body: Any) -> Reply:
        repo = self._repo(args)
        sha = repo["branches"].get(args["branch"]) if repo else None
        if repo is None or sha is None:
            return self._reply(404, {"message": "Branch not found"})
        url = f"{repo['json']['url']}/branches/{args['branch']}"
        return self._reply(
            200,
            {
                "name": args["branch"],
                "protected": False,
                "protection_url": f"{url}/protection",
                "commit": {"sha": sha, "url": f"{repo['json']['url']}/commits/{sha}"},
                "_links": {
                    "self": url,
                    "html": f"{repo['json']['html_url']}/tree/{args['branch']}",
                },
            },
        )

    def _get_content(self, args: dict[str, str], query: dict[str, list[str]], body: Any) -> Reply:
        repo = self._repo(args)
        path = args["path"]
        data = repo["files"].get(path) if repo else None
        if repo is None or data is None:
            return self._not_found()
        encoded = base64.encodebytes(data).decode()  # GitHub wraps at 60/76 columns too
        blob = hashlib.sha1(b"blob %d\0" % len(data) + data, usedforsecurity=False).hexdigest()
        url = f"{repo['json']['url']}/contents/{path}"
        ref = query.get("ref", [repo["json"]["default_branch"]])[0]
        html = f"{repo['json']['html_url']}/blob/{ref}/{path}"
        git = f"{repo['json']['url']}/git/blobs/{blob}"
        return self._reply(
            200,
            {
                "type": "file",
                "encoding": "base64",
                "content": encoded,
                "size": len(data),
                "name": path.rsplit("/", 1)[-1],
                "path": path,
                "sha": blob,
                "url": url,
                "html_url": html,
                "git_url": git,
                "download_url": None,
                "_links": {"self": url, "git": git, "html": html},
            },
        )

    def _permission(self, args: dict[str, str], query: Any, body: Any) -> Reply:
        user = args["username"]
        repo = f"{args['owner']}/{args['repo']}"
        role = self.permissions.get((repo, user), self.permissions.get((None, user)))
        if role is None or self._repo(args) is None:
            return self._reply(404, {"message": f"{user} is not a user"})
        # `permission` is the legacy field: maintain reads as write, triage as read.
        legacy = {"maintain": "write", "triage": "read"}.get(role, role)
        return self._reply(
            200,
            {
                "permission": legacy,
                "role_name": role,
                "user": self._user(user) | {"role_name": role},
            },
        )

    def _create_status(self, args: dict[str, str], query: Any, body: Any) -> Reply:
        repo = f"{args['owner']}/{args['repo']}"
        status = {
            "id": next(self._ids),
            "node_id": "S",
            "state": body["state"],
            "context": body.get("context", "default"),
            "description": body.get("description"),
            "target_url": body.get("target_url"),
            "creator": self._user(BOT_LOGIN),
            "url": f"{self.base_url}/repos/{repo}/statuses/{args['sha']}",
            "avatar_url": None,
            "created_at": _iso(self.clock()),
            "updated_at": _iso(self.clock()),
        }
        self.statuses.setdefault((repo, args["sha"]), []).append(status)
        return self._reply(201, status)

    def _combined_status(self, args: dict[str, str], query: Any, body: Any) -> Reply:
        repo = f"{args['owner']}/{args['repo']}"
        latest: dict[str, Json] = {}
        for status in self.statuses.get((repo, args["ref"]), []):
            latest[status["context"]] = status
        states = {s["state"] for s in latest.values()}
        state = next((s for s in ("failure", "error", "pending") if s in states), "success")
        if not latest:
            state = "pending"
        return self._reply(
            200,
            {
                "state": state,
                "statuses": list(latest.values()),
                "sha": args["ref"],
                "total_count": len(latest),
                "repository": self.repos[repo]["json"],
                "commit_url": f"{self.base_url}/repos/{repo}/commits/{args['ref']}",
                "url": f"{self.base_url}/repos/{repo}/commits/{args['ref']}/status",
            },
        )

    # ---- handlers: issues and comments -------------------------------------------------------

    def _get_issue(self, args: dict[str, str], query: Any, body: Any) -> Reply:
        issue = self.issues.get((f"{args['owner']}/{args['repo']}", int(args["issue_number"])))
        return self._reply(200, issue) if issue else self._not_found()

    def _create_issue(self, args: dict[str, str], query: Any, body: Any) -> Reply:
        repo = f"{args['owner']}/{args['repo']}"
        if repo not in self.repos:
            return self._not_found()
        number = self._next_number(repo)
        issue = self._issue_json(
            repo, number, str(body["title"]), body.get("body") or "", self._user(BOT_LOGIN)
        )
        self.issues[(repo, number)] = issue
        return self._reply(201, issue)

    def _list_comments(self, args: dict[str, str], query: dict[str, list[str]], body: Any) -> Reply:
        repo, number = f"{args['owner']}/{args['repo']}", int(args["issue_number"])
        if (repo, number) not in self.issues:
            return self._not_found()
        items = [_public(c) for c in self.comments_on(repo, number)]
        return self._page(items, query, f"/repos/{repo}/issues/{number}/comments")

    def _create_comment(self, args: dict[str, str], query: Any, body: Any) -> Reply:
        repo, number = f"{args['owner']}/{args['repo']}", int(args["issue_number"])
        if (repo, number) not in self.issues:
            return self._not_found()
        text = body.get("body") if isinstance(body, dict) else None
        if not isinstance(text, str) or len(text) > COMMENT_MAX:
            return self._comment_too_long()
        return self._reply(
            201, _public(self._new_comment(repo, number, text, self._user(BOT_LOGIN)))
        )

    def _comment_too_long(self) -> Reply:
        error = {
            "resource": "IssueComment",
            "code": "custom",
            "field": "body",
            "message": f"body is too long (maximum is {COMMENT_MAX} characters)",
        }
        return self._reply(422, {"message": "Validation Failed", "errors": [error]})

    def _comment(self, args: dict[str, str]) -> Json | None:
        comment = self.comments.get(int(args["comment_id"]))
        if comment is None or comment["_repo"] != f"{args['owner']}/{args['repo']}":
            return None
        return comment

    def _get_comment(self, args: dict[str, str], query: Any, body: Any) -> Reply:
        comment = self._comment(args)
        return (
            self._reply(200, _public(comment))
            if comment
            else self._reply(404, {"message": "Not Found"})
        )

    def _update_comment(self, args: dict[str, str], query: Any, body: Any) -> Reply:
        comment = self._comment(args)
        if comment is None:
            return self._not_found()
        if len(body["body"]) > COMMENT_MAX:
            return self._comment_too_long()
        comment["body"] = body["body"]
        comment["updated_at"] = _iso(self.clock())
        self.comment_history.setdefault(comment["id"], []).append(body["body"])
        return self._reply(200, _public(comment))

    def _delete_comment(self, args: dict[str, str], query: Any, body: Any) -> Reply:
        comment = self._comment(args)
        if comment is None:
            return self._not_found()
        del self.comments[comment["id"]]
        return self._reply(204)

    def _react(self, target: str, target_id: int, content: str) -> Reply:
        user = self._user(BOT_LOGIN)
        for reaction in self.reactions:
            if (reaction["_target"], reaction["_target_id"], reaction["content"]) == (
                target,
                target_id,
                content,
            ):
                return self._reply(200, _public(reaction))
        reaction = {
            "id": next(self._ids),
            "node_id": "RE",
            "user": user,
            "content": content,
            "created_at": _iso(self.clock()),
            "_target": target,
            "_target_id": target_id,
        }
        self.reactions.append(reaction)
        return self._reply(201, _public(reaction))

    def _react_comment(self, args: dict[str, str], query: Any, body: Any) -> Reply:
        if self._comment(args) is None:
            return self._not_found()
        return self._react("issue_comment", int(args["comment_id"]), body["content"])

    def _react_issue(self, args: dict[str, str], query: Any, body: Any) -> Reply:
        if (f"{args['owner']}/{args['repo']}", int(args["issue_number"])) not in self.issues:
            return self._not_found()
        return self._react("issue", int(args["issue_number"]), body["content"])

    def _react_review_comment(self, args: dict[str, str], query: Any, body: Any) -> Reply:
        if int(args["comment_id"]) not in self.review_comments:
            return self._not_found()
        return self._react("review_comment", int(args["comment_id"]), body["content"])

    def _reply_review_comment(self, args: dict[str, str], query: Any, body: Any) -> Reply:
        parent = self.review_comments.get(int(args["comment_id"]))
        repo, number = f"{args['owner']}/{args['repo']}", int(args["pull_number"])
        if parent is None or parent["_number"] != number:
            return self._not_found()
        reply = self.add_review_comment(repo, number, body["body"], user=BOT_LOGIN)
        reply["in_reply_to_id"] = parent["id"]
        return self._reply(201, _public(reply))

    def _add_labels(self, args: dict[str, str], query: Any, body: Any) -> Reply:
        key = (f"{args['owner']}/{args['repo']}", int(args["issue_number"]))
        names = body.get("labels", []) if isinstance(body, dict) else body
        current = self.labels.setdefault(key, [])
        current.extend(n for n in names if n not in current)
        return self._reply(
            200,
            [
                {
                    "id": i,
                    "name": n,
                    "color": "ededed",
                    "default": False,
                    "node_id": "L",
                    "url": "",
                    "description": None,
                }
                for i, n in enumerate(current)
            ],
        )

    def _remove_label(self, args: dict[str, str], query: Any, body: Any) -> Reply:
        key = (f"{args['owner']}/{args['repo']}", int(args["issue_number"]))
        current = self.labels.get(key, [])
        if args["name"] not in current:
            return self._reply(404, {"message": "Label does not exist"})
        current.remove(args["name"])
        return self._reply(200, [{"name": n} for n in current])

    # ---- handlers: pull requests -------------------------------------------------------------

    def _get_pull(self, args: dict[str, str], query: Any, body: Any) -> Reply:
        pull = self.pulls.get((f"{args['owner']}/{args['repo']}", int(args["pull_number"])))
        return self._reply(200, pull) if pull else self._not_found()

    def _list_pulls(self, args: dict[str, str], query: dict[str, list[str]], body: Any) -> Reply:
        repo = f"{args['owner']}/{args['repo']}"
        state = query.get("state", ["open"])[0]
        head = query.get("head", [None])[0]
        base = query.get("base", [None])[0]
        items = [
            p
            for (r, _), p in sorted(self.pulls.items(), key=lambda kv: -kv[0][1])
            if r == repo
            and state in ("all", p["state"])
            and (head is None or p["head"]["label"] == head)
            and (base is None or p["base"]["ref"] == base)
        ]
        return self._page(items, query, f"/repos/{repo}/pulls")

    def _create_pull(self, args: dict[str, str], query: Any, body: Any) -> Reply:
        repo = f"{args['owner']}/{args['repo']}"
        if repo not in self.repos:
            return self._not_found()
        head_owner, _, head = str(body["head"]).rpartition(":")
        head_repo = f"{head_owner or args['owner']}/{args['repo']}"
        for (r, _), p in self.pulls.items():
            if (
                r == repo
                and p["state"] == "open"
                and p["head"]["ref"] == head
                and p["base"]["ref"] == body["base"]
            ):
                return self._reply(
                    422,
                    {
                        "message": "Validation Failed",
                        "errors": [
                            {
                                "resource": "PullRequest",
                                "code": "custom",
                                "message": "A pull request already exists for "
                                f"{p['head']['label']}.",
                            }
                        ],
                    },
                )
        pull = self._new_pull(
            repo,
            head,
            body["base"],
            head_repo=head_repo,
            head_sha=None,
            title=body.get("title", ""),
            body=body.get("body") or "",
            user=self._user(BOT_LOGIN),
            draft=bool(body.get("draft", False)),
        )
        return self._reply(201, pull)

    def _update_pull(self, args: dict[str, str], query: Any, body: Any) -> Reply:
        pull = self.pulls.get((f"{args['owner']}/{args['repo']}", int(args["pull_number"])))
        if pull is None:
            return self._not_found()
        for key in ("title", "body", "state"):
            if key in body:
                pull[key] = body[key]
        if "base" in body:
            pull["base"]["ref"] = body["base"]
        return self._reply(200, pull)

    # ---- handlers: check runs ----------------------------------------------------------------

    def _check_error(self, body: Json) -> str | None:
        output = body.get("output") or {}
        for key in ("summary", "text"):
            if len(output.get(key) or "") > CHECK_TEXT_MAX:
                return f"output.{key} is too long (maximum is {CHECK_TEXT_MAX} characters)"
        if len(output.get("annotations") or []) > ANNOTATIONS_PER_REQUEST:
            return f"only {ANNOTATIONS_PER_REQUEST} annotations are accepted per request"
        if body.get("status") == "completed" and not body.get("conclusion"):
            return "conclusion is required when status is completed"
        if len(body.get("actions") or []) > 3:
            return "at most 3 actions"
        return None

    def _apply_check(self, run: Json, body: Json) -> None:
        for key in (
            "name",
            "details_url",
            "external_id",
            "status",
            "conclusion",
            "started_at",
            "completed_at",
        ):
            if key in body:
                run[key] = body[key]
        if body.get("conclusion"):
            run["status"] = "completed"
            run["completed_at"] = run.get("completed_at") or _iso(self.clock())
        if "output" in body:
            output = dict(body["output"])
            annotations = output.pop("annotations", None) or []
            run["_annotations"].extend(annotations)
            run["output"] = (
                run["output"]
                | output
                | {
                    "annotations_count": len(run["_annotations"]),
                    "annotations_url": f"{run['url']}/annotations",
                }
            )
        self.check_run_history[run["id"]].append(body)

    def _create_check(self, args: dict[str, str], query: Any, body: Any) -> Reply:
        repo = f"{args['owner']}/{args['repo']}"
        error = self._check_error(body)
        if error or repo not in self.repos:
            return self._reply(422 if error else 404, {"message": error or "Not Found"})
        rid = next(self._ids)
        run = {
            "id": rid,
            "node_id": f"CR_{rid}",
            "head_sha": body["head_sha"],
            "name": body["name"],
            "url": f"{self.base_url}/repos/{repo}/check-runs/{rid}",
            "html_url": f"{self.web_url}/{repo}/runs/{rid}",
            "details_url": None,
            "external_id": None,
            "status": "queued",
            "conclusion": None,
            "started_at": _iso(self.clock()),
            "completed_at": None,
            "output": {
                "title": None,
                "summary": None,
                "text": None,
                "annotations_count": 0,
                "annotations_url": "",
            },
            "check_suite": {"id": 1},
            "app": {"id": self.app_id, "slug": APP_SLUG},
            "pull_requests": [],
            "_annotations": [],
            "_repo": repo,
        }
        self.check_runs[rid] = run
        self.check_run_history[rid] = []
        self._apply_check(run, body)
        return self._reply(201, _public(run))

    def _check(self, args: dict[str, str]) -> Json | None:
        run = self.check_runs.get(int(args["check_run_id"]))
        return run if run and run["_repo"] == f"{args['owner']}/{args['repo']}" else None

    def _update_check(self, args: dict[str, str], query: Any, body: Any) -> Reply:
        run = self._check(args)
        if run is None:
            return self._not_found()
        error = self._check_error(body)
        if error:
            return self._reply(422, {"message": error})
        self._apply_check(run, body)
        return self._reply(200, _public(run))

    def _get_check(self, args: dict[str, str], query: Any, body: Any) -> Reply:
        run = self._check(args)
        return self._reply(200, _public(run)) if run else self._not_found()

    def _list_checks(self, args: dict[str, str], query: dict[str, list[str]], body: Any) -> Reply:
        repo = f"{args['owner']}/{args['repo']}"
        name = query.get("check_name", [None])[0]
        status = query.get("status", [None])[0]
        runs = [
            _public(r)
            for r in sorted(self.check_runs.values(), key=lambda r: -int(r["id"]))
            if r["_repo"] == repo
            and r["head_sha"] == args["ref"]
            and name in (None, r["name"])
            and status in (None, r["status"])
        ]
        return self._reply(200, {"total_count": len(runs), "check_runs": runs})


def _public(item: Json) -> Json:
    """What GitHub shows of a stored object: the fake's own bookkeeping keys start with `_`."""
    return {k: v for k, v in item.items() if not k.startswith("_")}


def _template_regex(template: str) -> str:
    def group(match: re.Match[str]) -> str:
        name = match.group(1)
        return f"(?P<{name}>.+)" if name == "path" else f"(?P<{name}>[^/]+)"

    return re.sub(r"\{(\w+)\}", group, template)


_REASONS = {
    403: "You have exceeded a secondary rate limit. Please wait a few minutes before you try "
    "again.",
    429: "API rate limit exceeded",
    500: "Server Error",
    502: "Server Error",
    503: "Service Unavailable",
    504: "We couldn't respond to your request in time.",
}

# The 32 operations of the subset, in the order requests are matched against them.
_ROUTES: list[tuple[str, str, str]] = [
    ("POST", "/app/installations/{installation_id}/access_tokens", "_create_token"),
    ("GET", "/repos/{owner}/{repo}/installation", "_repo_installation"),
    ("GET", "/app", "_get_app"),
    ("GET", "/installation/repositories", "_installation_repos"),
    ("GET", "/rate_limit", "_rate_limit"),
    ("GET", "/repos/{owner}/{repo}", "_get_repo"),
    ("GET", "/repos/{owner}/{repo}/branches/{branch}", "_get_branch"),
    ("GET", "/repos/{owner}/{repo}/contents/{path}", "_get_content"),
    ("GET", "/repos/{owner}/{repo}/collaborators/{username}/permission", "_permission"),
    ("POST", "/repos/{owner}/{repo}/statuses/{sha}", "_create_status"),
    ("GET", "/repos/{owner}/{repo}/commits/{ref}/status", "_combined_status"),
    ("GET", "/repos/{owner}/{repo}/commits/{ref}/check-runs", "_list_checks"),
    ("POST", "/repos/{owner}/{repo}/issues", "_create_issue"),
    ("GET", "/repos/{owner}/{repo}/issues/comments/{comment_id}", "_get_comment"),
    ("PATCH", "/repos/{owner}/{repo}/issues/comments/{comment_id}", "_update_comment"),
    ("DELETE", "/repos/{owner}/{repo}/issues/comments/{comment_id}", "_delete_comment"),
    ("POST", "/repos/{owner}/{repo}/issues/comments/{comment_id}/reactions", "_react_comment"),
    ("GET", "/repos/{owner}/{repo}/issues/{issue_number}", "_get_issue"),
    ("GET", "/repos/{owner}/{repo}/issues/{issue_number}/comments", "_list_comments"),
    ("POST", "/repos/{owner}/{repo}/issues/{issue_number}/comments", "_create_comment"),
    ("POST", "/repos/{owner}/{repo}/issues/{issue_number}/reactions", "_react_issue"),
    ("POST", "/repos/{owner}/{repo}/issues/{issue_number}/labels", "_add_labels"),
    ("DELETE", "/repos/{owner}/{repo}/issues/{issue_number}/labels/{name}", "_remove_label"),
    (
        "POST",
        "/repos/{owner}/{repo}/pulls/comments/{comment_id}/reactions",
        "_react_review_comment",
    ),
    (
        "POST",
        "/repos/{owner}/{repo}/pulls/{pull_number}/comments/{comment_id}/replies",
        "_reply_review_comment",
    ),
    ("GET", "/repos/{owner}/{repo}/pulls", "_list_pulls"),
    ("POST", "/repos/{owner}/{repo}/pulls", "_create_pull"),
    ("GET", "/repos/{owner}/{repo}/pulls/{pull_number}", "_get_pull"),
    ("PATCH", "/repos/{owner}/{repo}/pulls/{pull_number}", "_update_pull"),
    ("POST", "/repos/{owner}/{repo}/check-runs", "_create_check"),
    ("GET", "/repos/{owner}/{repo}/check-runs/{check_run_id}", "_get_check"),
    ("PATCH", "/repos/{owner}/{repo}/check-runs/{check_run_id}", "_update_check"),
]
# Operations GitHub authenticates with the App's JWT rather than an installation token.
_JWT_HANDLERS = frozenset({"_create_token", "_repo_installation", "_get_app"})


@contextmanager
def served_fake(**options: Any) -> Iterator[FakeGitHub]:
    """A fake GitHub Enterprise-style root on a real socket (http://127.0.0.1:<port>, the API
    under /api/v3): for a browser and for other processes, while this process reaches the same
    state through `responses`."""
    server = make_server("127.0.0.1", 0, lambda e, s: [], threaded=True)
    with FakeGitHub(f"http://127.0.0.1:{server.server_port}/api/v3", **options) as fake:
        server.app = fake.wsgi
        thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
        thread.start()
        try:
            yield fake
        finally:
            server.shutdown()
            thread.join(timeout=10)


@pytest.fixture
def fake_github() -> Iterator[FakeGitHub]:
    """A fake api.github.com with one App; violations of the OpenAPI description fail the test."""
    with FakeGitHub() as fake:
        yield fake


__all__ = ["BOT_LOGIN", "FakeGitHub", "RecordedRequest", "fake_github", "served_fake"]
