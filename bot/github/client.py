"""Trimo's GitHub API client: PyGithub underneath, Trimo's write policy on top (docs/DESIGN.md §5).

Writes to one installation go one at a time, `write_interval` apart. A 403/429 rate limit waits
as long as GitHub says (`retry-after`, else `x-ratelimit-reset`, else at least a minute, doubling);
a 5xx or a dropped connection is retried with exponential backoff, and a create that may have
happened anyway is looked up before it is sent again. A write that still fails raises; none is
dropped silently.
"""

from __future__ import annotations

import base64
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar
from urllib.parse import quote

import github
import requests
from github.GithubException import GithubException

from bot.errors import TrimoError
from bot.github.auth import AppAuth

log = logging.getLogger(__name__)

ANNOTATIONS_PER_REQUEST = 50
RATE_LIMIT_FLOOR = 60.0
ROLES = frozenset({"admin", "maintain", "write", "triage", "read", "none"})
MARKER = re.compile(r"<!-- trimo:[^>]*-->")

REQUEST_FAILED = "GitHub answered {verb} {path} with HTTP {status}: {message}"
GAVE_UP = (
    "GitHub did not accept {verb} {path} after {attempts} attempts (last: {last}); "
    "nothing was dropped: the caller must retry later"
)
WAITING = "%s %s: %s, waiting %.1f s before attempt %d of %d"

T = TypeVar("T")


class GitHubError(TrimoError):
    """GitHub refused a request; `status` is the HTTP status (0 for a connection failure)."""

    def __init__(self, message: str, status: int = 0) -> None:
        self.status = status
        super().__init__(message)


class GitHubWriteError(GitHubError):
    """A request kept failing with rate limits or server errors; it was not dropped: retry it.

    `retry_after` is how long GitHub asked to wait (`retry-after`, `x-ratelimit-reset`), or the
    backoff the client would have waited before its next attempt."""

    def __init__(self, message: str, status: int = 0, retry_after: float | None = None) -> None:
        self.retry_after = retry_after
        super().__init__(message, status)


@dataclass(frozen=True)
class RepoInfo:
    full_name: str
    default_branch: str
    clone_url: str
    private: bool


@dataclass(frozen=True)
class Comment:
    id: int
    body: str
    user: str
    user_type: str
    html_url: str


@dataclass(frozen=True)
class PullInfo:
    number: int
    url: str
    state: str
    draft: bool
    head_sha: str
    head_ref: str
    head_repo: str  # "owner/name"; differs from the base repository for a fork
    base_ref: str
    head_clone_url: str = ""  # the head repository's git URL; "" once the fork is deleted
    # Whether the author lets maintainers (and Apps acting for them) push to the head branch.
    maintainer_can_modify: bool = False


class CallStats:
    """How many calls this process made to GitHub, by verb and outcome, and the rate limit
    GitHub said was left (what /metrics shows, through the worker's status file)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.calls: dict[tuple[str, str], int] = {}
        self.rate_limit_remaining: int | None = None

    def record(self, verb: str, outcome: str, headers: Mapping[str, Any] | None) -> None:
        with self._lock:
            self.calls[(verb, outcome)] = self.calls.get((verb, outcome), 0) + 1
            left = {k.lower(): v for k, v in (headers or {}).items()}.get("x-ratelimit-remaining")
            if left is not None and str(left).isdigit():
                self.rate_limit_remaining = int(left)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "calls": [[verb, outcome, n] for (verb, outcome), n in sorted(self.calls.items())],
                "rate_limit_remaining": self.rate_limit_remaining,
            }


CALLS = CallStats()


class _WriteGate:
    """Serializes and spaces the writes of one installation, across every client instance."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.last_write = float("-inf")


_GATES: dict[str, _WriteGate] = {}
_GATES_LOCK = threading.Lock()


def _gate(key: str) -> _WriteGate:
    with _GATES_LOCK:
        return _GATES.setdefault(key, _WriteGate())


class _InstallationAuth(github.Auth.Auth):
    """Asks the token source on every request, so a renewed token is picked up."""

    def __init__(self, token: Callable[[], str]) -> None:
        self._source = token

    @property
    def token_type(self) -> str:
        return "token"

    @property
    def token(self) -> str:
        return self._source()


class GitHubClient:
    """The GitHub calls Trimo makes, for one installation."""

    def __init__(
        self,
        token: str | Callable[[], str],
        api_url: str = "https://api.github.com",
        *,
        installation: int | str = "default",
        write_interval: float = 1.0,
        max_attempts: int = 6,
        backoff: float = 2.0,
        max_backoff: float = 15 * 60.0,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.time,
    ) -> None:
        source = token if callable(token) else (lambda: token)
        self.api_url = api_url.rstrip("/")
        self._github = github.Github(
            base_url=self.api_url,
            auth=_InstallationAuth(source),
            lazy=True,
            # Spacing and retries are ours: per installation, not per PyGithub instance.
            seconds_between_writes=None,
            seconds_between_requests=None,
            retry=None,
        )
        self._requester = self._github.requester
        self.installation = installation
        self._gate = _gate(f"{self.api_url}#{installation}")
        self.write_interval = write_interval
        self.max_attempts = max_attempts
        self.backoff = backoff
        self.max_backoff = max_backoff
        self._sleep = sleep
        self._clock = clock

    @classmethod
    def for_installation(
        cls, auth: AppAuth, installation_id: int, repository: str | None = None, **options: Any
    ) -> GitHubClient:
        """A client whose token is narrowed to `repository` and renewed by `auth` as needed."""
        return cls(
            lambda: auth.installation_token(installation_id, repository),
            auth.api_url,
            installation=installation_id,
            **options,
        )

    def close(self) -> None:
        self._github.close()

    # ---- repository ----------------------------------------------------------------------

    def get_repo(self, owner: str, repo: str) -> RepoInfo:
        data = self._get(f"/repos/{owner}/{repo}")
        return RepoInfo(
            full_name=data["full_name"],
            default_branch=data["default_branch"],
            clone_url=data["clone_url"],
            private=bool(data["private"]),
        )

    def get_permission(self, owner: str, repo: str, user: str) -> str:
        """The user's role: admin, maintain, write, triage, read or none.

        GitHub's `permission` field folds maintain into write and triage into read; `role_name`
        keeps them apart, but names custom roles too, where `permission` is the safe reading.
        """
        try:
            data = self._get(f"/repos/{owner}/{repo}/collaborators/{quote(user)}/permission")
        except GitHubError as error:
            if error.status == 404:
                return "none"
            raise
        role = str(data.get("role_name") or "")
        return role if role in ROLES else str(data["permission"])

    def get_file(self, owner: str, repo: str, path: str, ref: str | None = None) -> bytes | None:
        """A file's content at `ref` (default branch when None); None when it does not exist."""
        params = {"ref": ref} if ref else None
        try:
            data = self._get(f"/repos/{owner}/{repo}/contents/{quote(path)}", params)
        except GitHubError as error:
            if error.status == 404:
                return None
            raise
        if not isinstance(data, dict) or data.get("type") != "file":
            return None
        return base64.b64decode(data["content"])

    # ---- comments and reactions ------------------------------------------------------------

    def create_comment(self, owner: str, repo: str, number: int, body: str) -> tuple[int, str]:
        """Post a comment; (id, html_url). A body with a Trimo marker is never posted twice."""
        marker = MARKER.search(body)

        def already_posted() -> tuple[int, str] | None:
            if marker is None:
                return None
            return self.find_comment(owner, repo, number, marker.group(0))

        return self._create(
            f"/repos/{owner}/{repo}/issues/{number}/comments",
            {"body": body},
            lambda data: (int(data["id"]), str(data["html_url"])),
            already_posted,
        )

    def update_comment(self, owner: str, repo: str, comment_id: int, body: str) -> None:
        self._write("PATCH", f"/repos/{owner}/{repo}/issues/comments/{comment_id}", {"body": body})

    def list_comments(self, owner: str, repo: str, number: int) -> list[Comment]:
        return [
            Comment(
                id=int(c["id"]),
                body=str(c.get("body") or ""),
                user=str(c["user"]["login"]),
                user_type=str(c["user"].get("type", "User")),
                html_url=str(c["html_url"]),
            )
            for c in self._get_all(f"/repos/{owner}/{repo}/issues/{number}/comments")
        ]

    def add_reaction(
        self,
        owner: str,
        repo: str,
        comment_id: int,
        content: str = "eyes",
        review_comment: bool = False,
    ) -> None:
        kind = "pulls" if review_comment else "issues"
        path = f"/repos/{owner}/{repo}/{kind}/comments/{comment_id}/reactions"
        self._write("POST", path, {"content": content})

    def add_issue_reaction(self, owner: str, repo: str, number: int, content: str = "eyes") -> None:
        path = f"/repos/{owner}/{repo}/issues/{number}/reactions"
        self._write("POST", path, {"content": content})

    def reply_review_comment(
        self, owner: str, repo: str, number: int, comment_id: int, body: str
    ) -> tuple[int, str]:
        path = f"/repos/{owner}/{repo}/pulls/{number}/comments/{comment_id}/replies"
        data = self._write("POST", path, {"body": body})
        return int(data["id"]), str(data["html_url"])

    def add_labels(self, owner: str, repo: str, number: int, labels: list[str]) -> None:
        # PyGithub's add_to_labels sends a bare array; the documented body is an object.
        self._write("POST", f"/repos/{owner}/{repo}/issues/{number}/labels", {"labels": labels})

    def remove_label(self, owner: str, repo: str, number: int, label: str) -> None:
        try:
            self._write("DELETE", f"/repos/{owner}/{repo}/issues/{number}/labels/{quote(label)}")
        except GitHubError as error:
            if error.status != 404:  # already gone is what we wanted
                raise

    # ---- check runs ------------------------------------------------------------------------

    def create_check_run(
        self,
        owner: str,
        repo: str,
        head_sha: str,
        name: str,
        *,
        status: str = "queued",
        conclusion: str | None = None,
        output: Mapping[str, Any] | None = None,
        details_url: str | None = None,
        external_id: str | None = None,
        completed_at: datetime | None = None,
    ) -> int:
        """Create a check run; with `external_id` a retried create finds the first one."""
        first, rest = _split_annotations(output)
        body: dict[str, Any] = {"name": name, "head_sha": head_sha, "status": status}
        if conclusion:
            body["conclusion"] = conclusion
            body["completed_at"] = _timestamp(completed_at or datetime.now(UTC))
        if first is not None:
            body["output"] = first
        if details_url:
            body["details_url"] = details_url
        if external_id:
            body["external_id"] = external_id

        def already_created() -> int | None:
            if not external_id:
                return None
            return self.find_check_run(owner, repo, head_sha, name, external_id)

        check_run_id = self._create(
            f"/repos/{owner}/{repo}/check-runs",
            body,
            lambda data: int(data["id"]),
            already_created,
        )
        for chunk in rest:
            path = f"/repos/{owner}/{repo}/check-runs/{check_run_id}"
            self._write("PATCH", path, {"output": chunk})
        return check_run_id

    def find_check_run(
        self, owner: str, repo: str, head_sha: str, name: str, external_id: str
    ) -> int | None:
        """The id of the check run `name` on `head_sha` that carries `external_id`, if any."""
        data = self._get(
            f"/repos/{owner}/{repo}/commits/{head_sha}/check-runs", {"check_name": name}
        )
        for run in data["check_runs"]:
            if run.get("external_id") == external_id:
                return int(run["id"])
        return None

    def get_check_run(self, owner: str, repo: str, check_run_id: int) -> dict[str, Any]:
        return dict(self._get(f"/repos/{owner}/{repo}/check-runs/{check_run_id}"))

    def get_comment_body(self, owner: str, repo: str, comment_id: int) -> str:
        data = self._get(f"/repos/{owner}/{repo}/issues/comments/{comment_id}")
        return str(data.get("body") or "")

    def find_comment(
        self, owner: str, repo: str, number: int, marker: str
    ) -> tuple[int, str] | None:
        """A comment by a bot on the issue that carries `marker`: (id, html_url)."""
        for comment in self.list_comments(owner, repo, number):
            if comment.user_type == "Bot" and marker in comment.body:
                return comment.id, comment.html_url
        return None

    def update_check_run(
        self,
        owner: str,
        repo: str,
        check_run_id: int,
        *,
        status: str | None = None,
        conclusion: str | None = None,
        output: Mapping[str, Any] | None = None,
        completed_at: datetime | None = None,
        details_url: str | None = None,
    ) -> None:
        """Update a check run; more than 50 annotations go out over several requests, and the
        conclusion goes with the last one."""
        path = f"/repos/{owner}/{repo}/check-runs/{check_run_id}"
        first, rest = _split_annotations(output)
        chunks = [first, *rest]
        for chunk in chunks[:-1]:
            self._write("PATCH", path, {"output": chunk})
        body: dict[str, Any] = {}
        if chunks[-1] is not None:
            body["output"] = chunks[-1]
        if status:
            body["status"] = status
        if conclusion:
            body["conclusion"] = conclusion
            completed_at = completed_at or datetime.now(UTC)
        if completed_at:
            body["completed_at"] = _timestamp(completed_at)
        if details_url:
            body["details_url"] = details_url
        self._write("PATCH", path, body)

    # ---- pull requests ---------------------------------------------------------------------

    def find_pull(self, owner: str, repo: str, head_branch: str) -> tuple[int, str] | None:
        """The open pull request from `owner:head_branch`, if there is one."""
        pulls = self._get(
            f"/repos/{owner}/{repo}/pulls", {"head": f"{owner}:{head_branch}", "state": "open"}
        )
        return (int(pulls[0]["number"]), str(pulls[0]["html_url"])) if pulls else None

    def create_pull(
        self,
        owner: str,
        repo: str,
        *,
        head: str,
        base: str,
        title: str,
        body: str,
        draft: bool = True,
    ) -> tuple[int, str]:
        """Open a pull request from `head` (a branch of this repository); (number, html_url).

        When one is already open for the branch (a retry, a restart), that one is returned.
        """
        path = f"/repos/{owner}/{repo}/pulls"
        payload = {"head": head, "base": base, "title": title, "body": body, "draft": draft}
        try:
            return self._create(
                path,
                payload,
                lambda data: (int(data["number"]), str(data["html_url"])),
                lambda: self.find_pull(owner, repo, head),
            )
        except GitHubError as error:
            existing = self.find_pull(owner, repo, head) if error.status == 422 else None
            if existing is None:
                raise
            return existing

    def get_pull(self, owner: str, repo: str, number: int) -> PullInfo:
        data = self._get(f"/repos/{owner}/{repo}/pulls/{number}")
        head_repo = data["head"].get("repo") or {}
        return PullInfo(
            number=int(data["number"]),
            url=str(data["html_url"]),
            state=str(data["state"]),
            draft=bool(data.get("draft", False)),
            head_sha=str(data["head"]["sha"]),
            head_ref=str(data["head"]["ref"]),
            # A deleted fork leaves `head.repo` null.
            head_repo=str(head_repo.get("full_name") or ""),
            base_ref=str(data["base"]["ref"]),
            head_clone_url=str(head_repo.get("clone_url") or ""),
            maintainer_can_modify=bool(data.get("maintainer_can_modify", False)),
        )

    # ---- the policy ------------------------------------------------------------------------

    def _get(self, path: str, params: Mapping[str, str] | None = None) -> Any:
        return self._attempts("GET", path, None, params)[1]

    def _get_all(self, path: str) -> Iterator[Any]:
        url: str | None = path
        params: Mapping[str, str] | None = {"per_page": "100"}
        while url is not None:
            headers, page = self._attempts("GET", url, None, params)
            yield from page
            url, params = _next_link(headers.get("link", "")), None

    def _write(self, verb: str, path: str, body: Mapping[str, Any] | None = None) -> Any:
        with self._gate.lock:
            return self._attempts(verb, path, body, None, gate=self._gate)[1]

    def _create(
        self,
        path: str,
        body: Mapping[str, Any],
        parse: Callable[[Any], T],
        find: Callable[[], T | None],
    ) -> T:
        """POST, and after a 5xx look with `find` for what the POST may have made anyway."""
        found: list[T] = []

        def recover() -> bool:
            value = find()
            if value is not None:
                found.append(value)
            return value is not None

        with self._gate.lock:
            _, data = self._attempts("POST", path, body, None, recover=recover, gate=self._gate)
        return found[0] if found else parse(data)

    def _attempts(
        self,
        verb: str,
        path: str,
        body: Mapping[str, Any] | None,
        params: Mapping[str, str] | None,
        *,
        recover: Callable[[], bool] | None = None,
        gate: _WriteGate | None = None,
    ) -> tuple[dict[str, Any], Any]:
        last, last_status = "", 0
        wait = 0.0
        rate_limited = 0
        for attempt in range(1, self.max_attempts + 1):
            if gate is not None:
                pause = gate.last_write + self.write_interval - time.monotonic()
                if pause > 0:
                    self._sleep(pause)
            maybe_done = False
            try:
                answer = self._requester.requestJsonAndCheck(
                    verb,
                    path,
                    parameters=dict(params) if params else None,
                    input=dict(body) if body is not None else None,
                )
                CALLS.record(verb, "ok", answer[0])
                return answer
            except GithubException as error:
                headers = {k.lower(): v for k, v in (error.headers or {}).items()}
                CALLS.record(verb, str(error.status), headers)
                message = _error_message(error)
                if _is_rate_limit(error.status, headers, message):
                    rate_limited += 1
                    wait = self._rate_limit_wait(headers, rate_limited)
                elif error.status >= 500:
                    wait, maybe_done = self._backoff_wait(attempt), True
                else:
                    raise GitHubError(
                        REQUEST_FAILED.format(
                            verb=verb, path=path, status=error.status, message=message
                        ),
                        error.status,
                    ) from None
                last, last_status = f"HTTP {error.status} {message}".strip(), error.status
            except requests.RequestException as error:
                CALLS.record(verb, "connection_error", None)
                wait, maybe_done = self._backoff_wait(attempt), True
                last, last_status = type(error).__name__, 0
            finally:
                if gate is not None:
                    gate.last_write = time.monotonic()
            if attempt == self.max_attempts:
                break
            log.warning(WAITING, verb, path, last, wait, attempt + 1, self.max_attempts)
            self._sleep(wait)
            if maybe_done and recover is not None and recover():
                log.info("%s %s had succeeded despite the error; not sent again", verb, path)
                return {}, None
        raise GitHubWriteError(
            GAVE_UP.format(verb=verb, path=path, attempts=self.max_attempts, last=last),
            last_status,
            retry_after=wait,
        )

    def _rate_limit_wait(self, headers: Mapping[str, str], times: int) -> float:
        retry_after = headers.get("retry-after")
        if retry_after and retry_after.strip().isdigit():
            return float(retry_after)
        reset = headers.get("x-ratelimit-reset")
        if headers.get("x-ratelimit-remaining") == "0" and reset and reset.isdigit():
            return max(float(reset) - self._clock(), 0.0) + 1.0
        doubled = RATE_LIMIT_FLOOR * 2.0 ** (times - 1)
        return max(RATE_LIMIT_FLOOR, min(doubled, self.max_backoff))

    def _backoff_wait(self, attempt: int) -> float:
        return float(min(self.backoff * 2 ** (attempt - 1), self.max_backoff))


def _timestamp(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _is_rate_limit(status: int, headers: Mapping[str, str], message: str) -> bool:
    if status == 429:
        return True
    # Other 403s (a missing permission) carry rate-limit headers too, with requests to spare.
    return status == 403 and (
        "retry-after" in headers
        or headers.get("x-ratelimit-remaining") == "0"
        or "rate limit" in message.lower()
    )


def _error_message(error: GithubException) -> str:
    data = error.data
    if isinstance(data, dict):
        return str(data.get("message", ""))
    return str(data or "")


def _next_link(link: str) -> str | None:
    for part in link.split(","):
        match = re.search(r'<([^>]+)>;\s*rel="next"', part)
        if match:
            return match.group(1)
    return None


def _split_annotations(
    output: Mapping[str, Any] | None,
) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """The output with its first 50 annotations, then the rest in chunks of 50 (each chunk
    repeats title and summary, which GitHub requires with every output)."""
    if output is None:
        return None, []
    annotations = list(output.get("annotations") or [])
    head = {k: v for k, v in output.items() if k != "annotations"}
    chunks = [
        annotations[i : i + ANNOTATIONS_PER_REQUEST]
        for i in range(0, len(annotations), ANNOTATIONS_PER_REQUEST)
    ]
    if not chunks:
        return head, []
    first = head | {"annotations": chunks[0]}
    rest = [
        {"title": output["title"], "summary": output["summary"], "annotations": chunk}
        for chunk in chunks[1:]
    ]
    return first, rest
