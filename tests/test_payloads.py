"""Decoding payloads to the fields Trimo reads: the same intents as the whole document, and clear
answers for bodies of the wrong shape (no I/O; deliveries go through the WSGI app in process)."""

from __future__ import annotations

import copy
import json
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient

from bot.intents import load_intents
from tests.conftest import GITHUB_FIXTURES, webhook_payloads
from tests.test_receiver import SECRET, MemoryStore, make_settings
from webhooks.app import create_app
from webhooks.event import Delivery, PayloadError, Rules
from webhooks.payloads import NotAJsonObject, action_of, decode
from webhooks.router import route
from webhooks.signature import sign

PAYLOADS = webhook_payloads()
RULES = [
    Rules(),
    Rules(trigger_label="BUG"),
    Rules(trigger_label="bug", app_id=2),
    Rules(trigger_label="bug", app_id=5),
]
COMMANDS = "/trimo run add a test\n/trimo status\n/trimo approve\n/trimo stop\n/trimo frobnicate"


def event_of(path: Path) -> str:
    return path.name.split(".", maxsplit=1)[0]


def real(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((GITHUB_FIXTURES / "webhooks" / name).read_bytes())
    return data


def variants() -> Iterator[tuple[str, str, dict[str, Any]]]:
    """Real payloads changed the way GitHub's differ: commands, a PR conversation, a deleted fork,
    a bot sender, a check run listing its PR, null fields."""
    comment = real("issue_comment.created.json")
    comment["comment"]["body"] = COMMANDS
    yield "issue_comment.commands", "issue_comment", comment
    # GitHub sends a comment on a PR's conversation as issue_comment whose issue has a
    # `pull_request` member (none of the real examples has one).
    on_pull = copy.deepcopy(comment)
    on_pull["issue"]["pull_request"] = {"url": "https://api.github.com/repos/o/r/pulls/1"}
    yield "issue_comment.on_pull", "issue_comment", on_pull
    by_bot = copy.deepcopy(comment)
    by_bot["sender"]["type"] = "Bot"
    yield "issue_comment.by_bot", "issue_comment", by_bot
    review = real("pull_request_review_comment.created.json")
    review["comment"]["body"] = COMMANDS
    review["pull_request"]["body"] = None
    yield "review_comment.commands", "pull_request_review_comment", review
    fork_gone = real("pull_request.labeled.json")
    fork_gone["pull_request"]["head"]["repo"] = None
    yield "pull_request.fork_gone", "pull_request", fork_gone
    no_body = real("issues.labeled.json")
    no_body["issue"]["body"] = None
    no_body["sender"] = None
    yield "issues.no_body", "issues", no_body
    unlabeled = real("issues.labeled.json")
    unlabeled["action"] = "unlabeled"
    yield "issues.unlabeled", "issues", unlabeled
    check_run = real("check_run.rerequested.json")
    check_run["check_run"]["pull_requests"] = [{"number": 2, "head": {"ref": "fix", "sha": "ab"}}]
    check_run["check_run"]["app"] = None
    yield "check_run.with_pull", "check_run", check_run
    removed = real("installation_repositories.added.json")
    removed["action"] = "removed"
    removed["repositories_removed"] = removed.pop("repositories_added")
    yield "installation_repositories.removed", "installation_repositories", removed


CASES = [(p.stem, event_of(p), p.read_bytes()) for p in PAYLOADS] + [
    (name, event, json.dumps(payload).encode()) for name, event, payload in variants()
]


@pytest.mark.parametrize(("name", "event", "body"), CASES, ids=[c[0] for c in CASES])
def test_decoded_payloads_give_the_intents_of_the_whole_document(
    name: str, event: str, body: bytes
) -> None:
    whole = json.loads(body)
    decoded = decode(event, body)
    assert action_of(decoded) == action_of(whole)
    for rules in RULES:
        expected = route(Delivery(event, action_of(whole), "d-1", whole), rules)
        assert route(Delivery(event, action_of(decoded), "d-1", decoded), rules) == expected


def test_the_payloads_compared_have_intents_of_every_kind() -> None:
    # The comparison above means something only if the payloads start runs, cancels and the rest.
    kinds = set()
    for _, event, body in CASES:
        whole = json.loads(body)
        for rules in RULES:
            kinds |= {i.type for i in route(Delivery(event, action_of(whole), "d", whole), rules)}
    assert kinds == {"run", "cancel", "status", "approve", "help", "installation"}


# --- what GitHub's deliveries get back ------------------------------------------------------------


@pytest.fixture
def client() -> Iterator[tuple[FlaskClient, MemoryStore]]:
    store = MemoryStore()
    app = create_app(make_settings(trigger_label="bug"), store)
    yield app.test_client(), store


def post(client: tuple[FlaskClient, MemoryStore], event: str, body: bytes | dict[str, Any]) -> Any:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {
        "X-GitHub-Event": event,
        "X-GitHub-Delivery": str(uuid.uuid4()),
        "X-Hub-Signature-256": sign(SECRET.encode(), raw),
    }
    return client[0].post(
        "/webhooks/github", data=raw, headers=headers, content_type="application/json"
    )


@pytest.mark.parametrize("path", PAYLOADS, ids=lambda p: p.stem)
def test_every_real_payload_is_answered_as_before(client: Any, path: Path) -> None:
    reply = post(client, event_of(path), path.read_bytes())
    expected = {
        "issues.labeled": 202,
        "pull_request.labeled": 202,
        "pull_request.closed": 202,
        "check_run.rerequested": 202,
        "installation.created": 202,
        "installation.deleted": 202,
        "installation_repositories.added": 202,
    }
    assert reply.status_code == expected.get(path.stem, 200), reply.text


def change(payload: dict[str, Any], path: tuple[str | int, ...], value: Any = ...) -> None:
    """Set the field at `path` to `value`, or remove it when no value is given."""
    parent: Any = payload
    for key in path[:-1]:
        parent = parent[key]
    if value is ...:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value


@pytest.mark.parametrize(
    ("name", "path"),
    [
        ("issues.labeled", ("issue", "number")),
        ("pull_request.labeled", ("pull_request", "head", "sha")),
        ("issue_comment.created", ("comment",)),
        ("installation.created", ("installation", "account")),
        ("check_run.rerequested", ("repository",)),
    ],
)
def test_a_missing_field_is_a_400_naming_it(
    client: Any, name: str, path: tuple[str | int, ...]
) -> None:
    payload = real(f"{name}.json")
    change(payload, path)
    reply = post(client, name.split(".", maxsplit=1)[0], payload)
    where = ".".join(map(str, path))
    assert (reply.status_code, reply.get_json()) == (
        400,
        {"error": f"the payload is not a valid {name} event: {where}: Field required"},
    )
    assert client[1].deliveries == {}


@pytest.mark.parametrize(
    ("name", "path", "value", "problem"),
    [
        ("issues.labeled", ("issue", "number"), "one", "a valid integer"),
        ("issues.labeled", ("issue", "title"), 5, "a valid string"),
        ("issues.labeled", ("sender",), "octocat", "an object"),
        ("pull_request.closed", ("pull_request", "base", "repo"), [], "an object"),
        ("check_run.rerequested", ("check_run", "pull_requests"), {}, "a valid array"),
        ("installation_repositories.added", ("repositories_added", 0, "full_name"), None, "string"),
    ],
)
def test_a_field_of_the_wrong_type_is_a_400_naming_it(
    client: Any, name: str, path: tuple[str | int, ...], value: Any, problem: str
) -> None:
    payload = real(f"{name}.json")
    change(payload, path, value)
    reply = post(client, name.split(".", maxsplit=1)[0], payload)
    error = reply.get_json()["error"]
    where = ".".join(map(str, path))
    assert reply.status_code == 400
    assert error.startswith(f"the payload is not a valid {name} event: {where}: Input should be ")
    assert problem in error
    assert client[1].deliveries == {}


def test_many_bad_items_are_named_a_few_at_a_time(client: Any) -> None:
    payload = real("installation.created.json")
    payload["repositories"] = [{"name": str(i)} for i in range(1000)]
    error = post(client, "installation", payload).get_json()["error"]
    assert "repositories.0.full_name: Field required" in error
    assert error.endswith("and 997 more") and len(error) < 400


def test_an_action_trimo_ignores_is_acknowledged_whatever_its_shape(client: Any) -> None:
    # As before: only deliveries Trimo acts on are held to their event's fields.
    reply = post(client, "issues", {"action": "opened", "issue": "not an object"})
    assert (reply.status_code, reply.get_json()) == (200, {"status": "ignored"})
    assert [d[:2] for d in client[1].deliveries.values()] == [("issues", "opened")]


@pytest.mark.parametrize(
    ("action", "stored"),
    [(5, None), (None, None), (["labeled"], None), ("x" * 100, "x" * 64)],
)
def test_an_odd_action_is_kept_as_before(client: Any, action: Any, stored: str | None) -> None:
    payload = real("issues.labeled.json")
    payload["action"] = action
    reply = post(client, "issues", payload)
    assert (reply.status_code, reply.get_json()) == (200, {"status": "ignored"})
    assert [d[:2] for d in client[1].deliveries.values()] == [("issues", stored)]


# --- JSON exactly as json.loads reads it ----------------------------------------------------------


def with_extra(value: bytes) -> bytes:
    """issues.labeled (a run with trigger label "bug") with one more key, holding `value` as is."""
    body = (GITHUB_FIXTURES / "webhooks" / "issues.labeled.json").read_bytes()
    return b'{"extra": ' + value + b", " + body.lstrip()[1:]


def json_loads_object(body: bytes) -> bool:
    try:
        return isinstance(json.loads(body), dict)
    except (ValueError, RecursionError):
        return False


ACCEPTED = {
    # pydantic's parser refuses these; json.loads accepts them.
    "lone-surrogate": with_extra(b'"\\ud800"'),
    "reversed-surrogates": with_extra(b'"\\udc00\\ud800"'),
    "surrogate-bytes": with_extra(b'"\xed\xa0\x80"'),
    "nested-300": with_extra(b"[" * 300 + b"]" * 300),
    "utf-8-bom": b"\xef\xbb\xbf" + with_extra(b"1"),
    "utf-16": with_extra(b"1").decode().encode("utf-16"),
    # Both accept these.
    "surrogate-pair": with_extra(b'"\\ud83d\\ude00"'),
    "nan": with_extra(b"NaN"),
    "big-int": with_extra(b"1" * 4300),
}
REFUSED = {
    "too-deep": with_extra(b"[" * 100_000 + b"]" * 100_000),
    "int-too-long": with_extra(b"1" * 4301),
    "trailing": with_extra(b"1") + b"x",
    "raw-newline": with_extra(b'"a\nb"'),
    "not-utf-8": with_extra(b'"\xff"'),
    "array": b"[" + with_extra(b"1") + b"]",
    "number": b"5",
    "null": b"null",
    "empty": b"",
}


@pytest.mark.parametrize(
    ("body", "accepted"),
    [(b, True) for b in ACCEPTED.values()] + [(b, False) for b in REFUSED.values()],
    ids=[*ACCEPTED, *REFUSED],
)
def test_a_body_is_json_exactly_when_json_loads_accepts_it(
    client: Any, body: bytes, accepted: bool
) -> None:
    assert json_loads_object(body) is accepted
    reply = post(client, "issues", body)
    if accepted:
        assert (reply.status_code, reply.get_json()) == (202, {"status": "queued", "intents": 1})
        assert decode("issues", body)["issue"]["number"] == 1
    else:
        assert (reply.status_code, reply.get_json()) == (
            400,
            {"error": "the body is not a JSON object"},
        )


@pytest.mark.parametrize(
    ("field", "where"),
    [
        ("title", ("issue", "title")),
        ("body", ("issue", "body")),
        ("sender", ("sender", "login")),
    ],
)
def test_a_lone_surrogate_becomes_u_fffd_once_and_for_every_field(
    client: Any, field: str, where: tuple[str, str]
) -> None:
    body = real("issues.labeled.json")
    body[where[0]][where[1]] = "broken \ud800 text \udfff"
    reply = post(client, "issues", json.dumps(body).encode())  # as "\ud800", valid JSON
    assert (reply.status_code, reply.get_json()) == (202, {"status": "queued", "intents": 1})
    ((_event, _action, stored),) = client[1].deliveries.values()
    stored.encode()  # what the store keeps is UTF-8
    (intent,) = load_intents(stored)
    assert getattr(intent, field) == "broken \ufffd text \ufffd"


def test_only_lone_surrogates_are_replaced() -> None:
    body = real("issues.labeled.json")
    body["issue"]["title"] = "pair \ud83d\ude00 reversed \udc00\ud800"
    body["action"] = "labeled"
    payload = decode("issues", json.dumps(body).encode())
    assert payload["issue"]["title"] == "pair \U0001f600 reversed \ufffd\ufffd"
    # A field read as any JSON value is repaired too, keys included, however deep.
    body["issue"]["pull_request"] = {"\ud800": [[{"k": "\udbff"}]]}
    payload = decode("issues", json.dumps(body).encode())
    assert payload["issue"]["pull_request"] == {"\ufffd": [[{"k": "\ufffd"}]]}


@pytest.mark.parametrize("event", ["issues", "push", "ping"])
@pytest.mark.parametrize("body", [b"[1, 2]", b"3", b'"text"', b"null", b"true"])
def test_json_that_is_not_an_object_is_a_400(client: Any, event: str, body: bytes) -> None:
    reply = post(client, event, body)
    assert (reply.status_code, reply.get_json()) == (
        400,
        {"error": "the body is not a JSON object"},
    )
    with pytest.raises(NotAJsonObject):
        decode(event, body)


def test_ping_answers_with_its_zen_even_deeply_nested(client: Any) -> None:
    assert post(client, "ping", real("ping.json")).get_json() == {
        "msg": "pong",
        "zen": real("ping.json")["zen"],
    }
    deep = b'{"zen": ' + b"[" * 300 + b'"\\ud800"' + b"]" * 300 + b"}"
    zen = json.loads(b"[" * 300 + b'"\\ufffd"' + b"]" * 300)
    assert post(client, "ping", deep).get_json() == {"msg": "pong", "zen": zen}


def test_decode_raises_payload_error_for_a_misshapen_delivery() -> None:
    payload = real("pull_request.labeled.json")
    del payload["pull_request"]["head"]
    with pytest.raises(PayloadError, match=r"^the payload is not a valid pull_request\.labeled"):
        decode("pull_request", json.dumps(payload).encode())


@pytest.mark.parametrize("name", ["Hello-World", "a/b/c", "owner/", "a b/c", "o/" + "r" * 200])
def test_a_repository_not_named_owner_slash_name_is_refused_by_field(name: str) -> None:
    # The worker splits the name at "/" and puts both halves in API paths.
    payload = real("issues.labeled.json")
    payload["repository"]["full_name"] = name
    with pytest.raises(PayloadError, match=r"issues\.labeled event: repository\.full_name: "):
        decode("issues", json.dumps(payload).encode())


@pytest.mark.parametrize("name", ["Codertocat/Hello-World", "octo_org/re.po-1", "o/.github"])
def test_repository_names_as_github_and_ghes_spell_them_are_kept(name: str) -> None:
    payload = real("issues.labeled.json")
    payload["repository"]["full_name"] = name
    assert decode("issues", json.dumps(payload).encode())["repository"]["full_name"] == name


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("issue", "number"), 0),
        (("issue", "number"), -1),
        (("issue", "number"), 2**31),  # PostgreSQL's INTEGER, the pipeline's number
        (("installation", "id"), 2**63),  # a 64-bit INTEGER
        (("sender", "login"), "x" * 101),
        (("repository", "full_name"), "o/" + "r" * 199),
    ],
)
def test_a_field_beyond_what_github_sends_and_the_store_holds_is_refused(
    path: tuple[str, str], value: Any
) -> None:
    payload = real("issue_comment.created.json")
    payload[path[0]][path[1]] = value
    field = re.escape(".".join(path))
    with pytest.raises(PayloadError, match=f"created event: {field}: "):
        decode("issue_comment", json.dumps(payload).encode())
    payload[path[0]][path[1]] = real("issue_comment.created.json")[path[0]][path[1]]
    assert decode("issue_comment", json.dumps(payload).encode())
