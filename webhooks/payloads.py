"""The fields of GitHub's payloads that Trimo reads, and `decode`, which reads only those.

A payload is ~10 KB of JSON of which the event concerns read a few dozen fields. Building the whole
document as Python objects costs 14 µs on the benchmark's issues.labeled delivery; validating it
against a TypedDict that declares only the fields read costs about 6 µs: pydantic's parser (in
Rust) still checks that all of it is JSON, but builds nothing for the keys not declared here. The
result is a plain dict, so the concerns read it as before — but it holds only what is declared
here: a concern that reads another field must declare it here too.

Optionality follows how the concerns read a field: `payload["x"]` is required, `payload.get("x")`
is `NotRequired`, and `payload.get("x") or ...` also accepts null (GitHub sends null for an issue
without a body, or for the head repository of a PR whose fork was deleted). Types are checked in
pydantic's lax mode, as the intent models check them ("2" for a number is 2).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from typing import Annotated, Any, NotRequired

from pydantic import Field, StringConstraints, TypeAdapter, ValidationError
from pydantic_core import ErrorDetails
from typing_extensions import TypedDict  # pydantic needs this one before Python 3.12

from webhooks.event import PayloadError, shape_detail
from webhooks.router import PAYLOAD_SHAPE, handles

# The store's column size; GitHub's actions are short words.
MAX_ACTION = 64
# JSON may spell a lone UTF-16 surrogate ("\ud800"); UTF-8 cannot hold one, so neither the store
# nor GitHub's API can take it. json.loads combines a valid pair into one character, so any
# surrogate left in a decoded string is a lone one.
_SURROGATE = re.compile("[\ud800-\udfff]")
REPLACEMENT = "\ufffd"


class NotAJsonObject(ValueError):
    """The body is not JSON (as `json.loads` sees it), or is JSON but not an object."""


# --- the parts -----------------------------------------------------------------------------------


# What GitHub sends, bounded by the store's columns, so that what passes here can be stored on
# PostgreSQL as on SQLite (a SQLite INTEGER is 64 bits, PostgreSQL's pipeline number 32).
# GitHub's ids and numbers are positive; a login is at most 39 characters, a commit id 40 hex
# digits (64 in a SHA-256 repository).
Id = Annotated[int, Field(gt=0, lt=2**63)]
Number = Annotated[int, Field(gt=0, lt=2**31)]
Login = Annotated[str, StringConstraints(max_length=100)]
Sha = Annotated[str, StringConstraints(max_length=64)]
Ref = Annotated[str, StringConstraints(max_length=255)]
# "owner/name", as GitHub (and GitHub Enterprise Server, whose logins may hold "_") spells it:
# the worker splits it at "/" and puts it in API paths.
FullName = Annotated[str, StringConstraints(pattern=r"^[\w.-]+/[\w.-]+$", max_length=200)]


class User(TypedDict):
    login: NotRequired[Login]
    type: NotRequired[str]  # "User", "Bot", "Organization"


class Repository(TypedDict):
    full_name: FullName


class ForkRepository(TypedDict):
    full_name: NotRequired[FullName | None]


class InstallationRef(TypedDict):
    """The installation a repository's event came through: only its id."""

    id: NotRequired[Id | None]


class Account(TypedDict):
    login: Login


class Installation(TypedDict):
    """The installation an `installation` or `installation_repositories` event is about."""

    id: Id
    account: Account


class Label(TypedDict):
    name: NotRequired[str]


class Issue(TypedDict):
    number: Number
    title: NotRequired[str | None]
    body: NotRequired[str | None]
    # Only whether it is there and not null is read: the issue is then a pull request.
    pull_request: NotRequired[Any]


class Head(TypedDict):
    sha: Sha
    ref: Ref
    repo: NotRequired[ForkRepository | None]  # null once the fork is deleted


class Base(TypedDict):
    repo: Repository


class PullRequest(TypedDict):
    number: Number
    title: NotRequired[str | None]
    body: NotRequired[str | None]
    head: Head
    base: Base


class Comment(TypedDict):
    id: Id
    body: NotRequired[str | None]


class App(TypedDict):
    id: NotRequired[Id | None]


class BranchRef(TypedDict):
    ref: Ref


class CheckRunPull(TypedDict):
    number: Number
    head: BranchRef


class CheckRun(TypedDict):
    id: Id
    head_sha: Sha
    name: NotRequired[str | None]
    app: NotRequired[App | None]
    pull_requests: NotRequired[list[CheckRunPull] | None]


# --- the events ----------------------------------------------------------------------------------


class AnyEvent(TypedDict):
    """An event Trimo only acknowledges; `action` is checked by the receiver (any JSON value)."""

    action: NotRequired[Any]


class PingEvent(AnyEvent):
    zen: NotRequired[Any]


class _SentEvent(AnyEvent):
    sender: NotRequired[User | None]


class _RepositoryEvent(_SentEvent):
    installation: NotRequired[InstallationRef | None]
    repository: Repository


class IssuesEvent(_RepositoryEvent):
    issue: Issue
    label: NotRequired[Label | None]


class PullRequestEvent(_RepositoryEvent):
    pull_request: PullRequest
    label: NotRequired[Label | None]


class IssueCommentEvent(_RepositoryEvent):
    issue: Issue
    comment: Comment


class ReviewCommentEvent(_RepositoryEvent):
    pull_request: PullRequest
    comment: Comment


class CheckRunEvent(_RepositoryEvent):
    check_run: CheckRun


class InstallationEvent(_SentEvent):
    installation: Installation
    repositories: NotRequired[list[Repository] | None]


class InstallationRepositoriesEvent(_SentEvent):
    installation: Installation
    repositories_added: NotRequired[list[Repository] | None]
    repositories_removed: NotRequired[list[Repository] | None]


SCHEMAS: dict[str, type[Any]] = {
    "ping": PingEvent,
    "issues": IssuesEvent,
    "pull_request": PullRequestEvent,
    "issue_comment": IssueCommentEvent,
    "pull_request_review_comment": ReviewCommentEvent,
    "check_run": CheckRunEvent,
    "installation": InstallationEvent,
    "installation_repositories": InstallationRepositoriesEvent,
}

# Built once: a TypeAdapter compiles its validator.
_ANY_EVENT: TypeAdapter[Any] = TypeAdapter(AnyEvent)
_ADAPTERS: dict[str, TypeAdapter[Any]] = {
    event: TypeAdapter(schema) for event, schema in SCHEMAS.items()
}


def action_of(payload: Mapping[str, Any]) -> str | None:
    """The payload's action; a longer one is cut to the store's column, a non-string is None."""
    action = payload.get("action")
    return action[:MAX_ACTION] if isinstance(action, str) else None


def decode(event: str, body: bytes) -> dict[str, Any]:
    """The fields of `body` that Trimo reads for `event`, as a dict.

    Raises NotAJsonObject when the body is not a JSON object, and PayloadError naming the field
    when a delivery Trimo acts on lacks a field or has one of the wrong type. A delivery of an
    action Trimo does not act on is only acknowledged, as before, so its shape is not held against
    it.

    A body is JSON exactly when `json.loads` accepts it: pydantic's parser refuses two corner
    cases that `json.loads` accepts (nesting past 200 levels, lone UTF-16 surrogates), so what it
    refuses as JSON is parsed again by `json.loads` and validated from the Python objects. Only
    that path can meet a lone surrogate: there, each one becomes U+FFFD before validation, so
    every string Trimo stores or sends on is valid UTF-8 and the common delivery pays nothing.
    """
    adapter = _ADAPTERS.get(event, _ANY_EVENT)
    try:
        payload: dict[str, Any] = adapter.validate_json(body)
        return payload
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False)
        if not any(e["type"] == "json_invalid" for e in errors):
            return _misshapen(event, errors, lambda: _ANY_EVENT.validate_json(body))
    try:
        document = _without_surrogates(json.loads(body))
    except (ValueError, RecursionError):
        raise NotAJsonObject from None
    try:
        payload = adapter.validate_python(document)
        return payload
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False)
        return _misshapen(event, errors, lambda: _ANY_EVENT.validate_python(document))


def _without_surrogates(document: Any) -> Any:
    """`document` with every lone surrogate in its strings, keys included, replaced by U+FFFD.

    In place, before validation, so each field's rules see the text Trimo keeps; without
    recursion, as `json.loads` may have nested deeper than Python's stack allows.
    """
    if isinstance(document, str):
        return _SURROGATE.sub(REPLACEMENT, document)
    stack: list[Any] = [document]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            for key, value in list(node.items()):
                safe_key = key
                if isinstance(key, str) and _SURROGATE.search(key):
                    del node[key]
                    safe_key = _SURROGATE.sub(REPLACEMENT, key)
                if isinstance(value, str):
                    node[safe_key] = _SURROGATE.sub(REPLACEMENT, value)
                else:
                    node[safe_key] = value
                    if isinstance(value, dict | list):
                        stack.append(value)
        elif isinstance(node, list):
            for index, value in enumerate(node):
                if isinstance(value, str):
                    node[index] = _SURROGATE.sub(REPLACEMENT, value)
                elif isinstance(value, dict | list):
                    stack.append(value)
    return document


def _misshapen(
    event: str, errors: list[ErrorDetails], action_only: Callable[[], dict[str, Any]]
) -> dict[str, Any]:
    """What a JSON document its event's schema refused with `errors` amounts to.

    `action_only` validates the same document as AnyEvent, which only an object passes.
    """
    if any(not e["loc"] for e in errors):
        # The document itself is refused, not one of its fields: it is not an object.
        raise NotAJsonObject
    payload = action_only()
    action = action_of(payload)
    if not handles(event, action):
        return payload
    detail = shape_detail(errors)
    raise PayloadError(PAYLOAD_SHAPE.format(event=event, action=action, detail=detail))
