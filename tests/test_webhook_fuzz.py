"""Fuzzed deliveries, seeded from GitHub's real payloads, through the receiver and the worker.

Every body goes to the receiver over a real socket, signed; each one it accepts is then acted on
by the GitHub worker (`GitHubService`) against the one fake GitHub, with the real SQLite store.
What must hold for any body: the receiver answers below 500, and every accepted delivery ends
processed, or failed with its reason stored, without an unexpected exception in the worker.
Hypothesis draws the bodies deterministically (derandomize), a fixed number of them, so CI sees
the same ones every time, in bounded time.
"""

from __future__ import annotations

import copy
import http.client
import itertools
import json
import logging
import re
import sqlite3
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from bot.github.auth import AppAuth
from bot.github.service import GitHubService
from bot.settings import Settings
from bot.store import Installation, Store
from tests.conftest import webhook_payloads
from tests.github_fake import FakeGitHub, _spec
from tests.test_receiver import start
from webhooks.router import HANDLERS
from webhooks.signature import sign

SECRET = "fuzz-secret"
SEEDS: dict[str, dict[str, Any]] = {
    path.stem: json.loads(path.read_bytes()) for path in webhook_payloads()
}
EVENTS = sorted({name.split(".", 1)[0] for name in SEEDS} | {event for event, _ in HANDLERS})
ACTIONS: dict[str, list[str]] = {}
for _event, _action in HANDLERS:
    ACTIONS.setdefault(_event, []).append(str(_action))
BODIES = 600
# Percent of bodies posted under another event's header, and cut short.
OTHER_EVENT, TRUNCATED = 8, 8

# The fields the event concerns read (webhooks/payloads.py), where mutations do most harm; other
# paths are reached by a random walk from the top of the document.
READ = [
    ("action",),
    ("sender",),
    ("sender", "login"),
    ("sender", "type"),
    ("repository",),
    ("repository", "full_name"),
    ("installation",),
    ("installation", "id"),
    ("installation", "account"),
    ("installation", "account", "login"),
    ("label",),
    ("label", "name"),
    ("issue", "number"),
    ("issue", "title"),
    ("issue", "body"),
    ("issue", "pull_request"),
    ("comment", "id"),
    ("comment", "body"),
    ("pull_request", "number"),
    ("pull_request", "title"),
    ("pull_request", "body"),
    ("pull_request", "head"),
    ("pull_request", "head", "sha"),
    ("pull_request", "head", "ref"),
    ("pull_request", "head", "repo"),
    ("pull_request", "head", "repo", "full_name"),
    ("pull_request", "base", "repo", "full_name"),
    ("check_run", "id"),
    ("check_run", "head_sha"),
    ("check_run", "name"),
    ("check_run", "app"),
    ("check_run", "app", "id"),
    ("check_run", "pull_requests"),
    ("repositories",),
    ("repositories", 0, "full_name"),
    ("repositories_added",),
    ("repositories_added", 0, "full_name"),
    ("repositories_removed",),
    ("zen",),
]
ODD = [
    "",
    " ",
    "\ud800",
    "x\udfffy",
    "\udc00\ud800",
    "\ud83d\ude00",
    "\x00",
    "\u202e\u0645",
    "a/b/c",
    "/",
    "owner/",
    "Codertocat/Hello-World",
    "Codertocat",
    "trimo[bot]",
    "Bot",
    "bug",
    "trimo",
    "0" * 40,
    "-1",
    "1e400",
    "\n" * 50,
    "../../etc/passwd",
    "/trimo",
    "/trimo run add a test",
    "/trimo retry",
    "/trimo test",
    "/trimo stop",
    "/trimo status",
    "/trimo approve",
    "/trimo help",
    "/trimo frobnicate",
    "```\n/trimo run\n```",
]
# Any code point, lone surrogates included (Hypothesis leaves category Cs out unless told).
ANY_TEXT = st.text(st.characters(codec=None, exclude_categories=()), max_size=40)
DEEP = "@@deep@@"  # stands for a nesting spliced into the JSON text
# Where GitHub's numbers, and the store's and PostgreSQL's integers, end.
EDGES = [0, -1, 2**31 - 1, 2**31, 2**53, 2**63 - 1, 2**63, 2**64]
SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


@st.composite
def _path(draw: st.DrawFn, doc: dict[str, Any]) -> tuple[Any, Any] | None:
    """A (container, key) in `doc`: one of the fields read, or a random walk's end."""
    if draw(st.integers(0, 3)):
        read = [p for p in READ if _parent(doc, p) is not None]
        if read:
            where = draw(st.sampled_from(read))
            return _parent(doc, where), where[-1]
    node: Any = doc
    while True:
        keys = list(node) if isinstance(node, dict) else list(range(len(node)))
        if not keys:
            return None
        key = draw(st.sampled_from(keys))
        child = node[key]
        if not isinstance(child, dict | list) or not child or not draw(st.integers(0, 2)):
            return node, key
        node = child


def _parent(doc: Any, path: tuple[Any, ...]) -> Any:
    """The container of `path`'s last key in `doc`, if the path leads there."""
    node = doc
    for key in path[:-1]:
        if not _has(node, key):
            return None
        node = node[key]
    return node if isinstance(node, dict) or _has(node, path[-1]) else None


def _has(node: Any, key: Any) -> bool:
    if isinstance(node, dict):
        return key in node
    return isinstance(node, list) and isinstance(key, int) and key < len(node)


def _value(draw: st.DrawFn, current: Any) -> Any:
    """A value of any JSON type, odd or long strings and deep nesting included; often, for a
    number, a number at the edge of what the store's integers hold."""
    if isinstance(current, int) and not isinstance(current, bool) and draw(st.booleans()):
        return draw(st.sampled_from(EDGES))
    kind = draw(st.sampled_from(["null", "retype", "odd", "text", "long", "deep"]))
    if kind == "null":
        return None
    if kind == "odd":
        return draw(st.sampled_from(ODD))
    if kind == "text":
        return draw(ANY_TEXT)
    if kind == "long":
        return draw(st.sampled_from(["x", "\u00e9", "\ud800", "/trimo run "])) * draw(
            st.sampled_from([300, 70_000])
        )
    if kind == "deep":
        return DEEP
    return draw(
        st.one_of(
            st.booleans(),
            st.integers(min_value=-(2**70), max_value=2**70),
            st.floats(allow_nan=True, allow_infinity=True),
            st.lists(st.integers(), max_size=3),
            st.dictionaries(ANY_TEXT, st.integers(), max_size=3),
            st.just({}),
            st.just([]),
        )
    )


@st.composite
def deliveries(draw: st.DrawFn) -> tuple[str, bytes]:
    """(X-GitHub-Event, body): a real payload with a few mutations."""
    name = draw(st.sampled_from(sorted(SEEDS)))
    event = name.split(".", 1)[0]
    doc = copy.deepcopy(SEEDS[name])
    if event in ACTIONS and draw(st.integers(0, 3)) == 0:
        doc["action"] = draw(st.sampled_from(ACTIONS[event]))
    for _ in range(draw(st.integers(0, 4))):
        target = draw(_path(doc))
        if target is None:
            continue
        container, key = target
        if isinstance(container, dict) and draw(st.integers(0, 4)) == 0:
            container.pop(key, None)
        else:
            container[key] = _value(draw, container[key] if _has(container, key) else None)
    text = json.dumps(doc)  # a lone surrogate is written "\ud800", as JSON allows
    if f'"{DEEP}"' in text:
        depth = draw(st.sampled_from([50, 250, 1000, 100_000]))
        open_, close = draw(st.sampled_from([("[", "]"), ('{"a":', "}")]))
        text = text.replace(f'"{DEEP}"', open_ * depth + "1" + close * depth, 1)
    body = text.encode()
    # Hypothesis draws the simplest value, 0, most: 0 means "leave the body alone".
    if draw(st.integers(0, 99)) >= 100 - TRUNCATED:
        body = body[: draw(st.integers(0, max(len(body) - 1, 0)))]
    if draw(st.integers(0, 99)) >= 100 - OTHER_EVENT:
        event = draw(st.sampled_from(EVENTS))
    return event, body


def _edited(name: str, path: tuple[Any, ...], value: Any) -> tuple[str, bytes]:
    """A delivery of seed `name` with one field set: what a fuzzed body once broke."""
    doc = copy.deepcopy(SEEDS[name])
    _parent(doc, path)[path[-1]] = value
    return name.split(".", 1)[0], json.dumps(doc).encode()


class _Unexpected(logging.Handler):
    """Keeps what Trimo logs with a traceback: an exception nobody meant."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info:
            self.records.append(record)


@dataclass
class Trimo:
    url: str
    store: Store
    db: Path
    service: GitHubService
    fake: FakeGitHub
    unexpected: _Unexpected
    ids: Iterator[int] = field(default_factory=itertools.count)
    statuses: Counter[int] = field(default_factory=Counter)
    outcomes: Counter[str] = field(default_factory=Counter)
    kinds: Counter[str] = field(default_factory=Counter)

    def deliver(self, event: str, body: bytes, delivery: str) -> tuple[int, dict[str, Any]]:
        """POST a signed delivery; (status, JSON answer).

        Sent with http.client: `requests` would go through the fake GitHub's interception first.
        """
        host, port = self.url.removeprefix("http://").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        try:
            conn.request(
                "POST",
                "/webhooks/github",
                body=body,
                headers={
                    "Content-Type": "application/json",
                    "X-GitHub-Event": event,
                    "X-GitHub-Delivery": delivery,
                    "X-Hub-Signature-256": sign(SECRET.encode(), body),
                },
            )
            reply = conn.getresponse()
            status, answer = reply.status, json.loads(reply.read())
        finally:
            conn.close()
        self.statuses[status] += 1
        return status, answer

    def process(self, delivery: str) -> tuple[str | None, str | None]:
        """Let the worker act on what is pending; (processed_at, error) of `delivery`."""
        self.service.process_pending()
        # Deliveries are acted on in their installation's lane: wait for every lane.
        assert self.service.deliveries.wait_idle(60), "the worker did not finish in 60 s"
        return self.outcome(delivery)

    def outcome(self, delivery: str) -> tuple[str | None, str | None]:
        """(processed_at, error) of a stored delivery."""
        with sqlite3.connect(self.db) as db:
            row = db.execute(
                "SELECT processed_at, error FROM deliveries WHERE delivery_id = ?", (delivery,)
            ).fetchone()
        assert row is not None, f"delivery {delivery} was accepted but not stored"
        return row[0], row[1]


@pytest.fixture
def trimo(tmp_path: Path) -> Iterator[Trimo]:
    """The receiver on a socket and the GitHub worker, on one store, against the fake GitHub."""
    # The OpenAPI description loads once per session, in seconds: not inside one example's deadline.
    _spec()
    with FakeGitHub() as fake:
        for repo in ("Codertocat/Hello-World", "Codertocat/Space", "github/hello-world"):
            fake.add_repo(repo)
        # The payloads' issue #1 and pull request #2, so runs get as far as their reports.
        fake.add_issue("Codertocat/Hello-World", title="Spelling error in the README file")
        fake.add_pull("Codertocat/Hello-World", head="changes", title="Update the README")
        for user in ("Codertocat", "octocat"):
            fake.set_permission(user, "write")
        app_settings = Settings(
            data_dir=tmp_path / "data",
            app_id=fake.app_id,
            private_key=fake.private_key,
            webhook_secrets=[SECRET],
            trigger_label="bug",  # the real payloads' label starts runs
            api_url=fake.base_url,
            web_url=fake.web_url,
        )
        store = Store(app_settings.database_url)
        server, url = start(app_settings, store)
        auth = AppAuth(fake.app_id, fake.private_key, app_settings.api_url)
        service = GitHubService(app_settings, store, auth, write_interval=0, edit_interval=0)
        unexpected = _Unexpected()
        logging.getLogger("bot").addHandler(unexpected)
        logging.getLogger("webhooks").addHandler(unexpected)
        try:
            yield Trimo(url, store, app_settings.data_dir / "trimo.db", service, fake, unexpected)
        finally:
            logging.getLogger("bot").removeHandler(unexpected)
            logging.getLogger("webhooks").removeHandler(unexpected)
            server.shutdown()
            server.server_close()
            store.close()


@pytest.mark.timeout(120)
def test_fuzzed_deliveries_get_no_5xx_and_end_processed_or_failed_with_a_reason(
    trimo: Trimo,
) -> None:
    started = time.monotonic()

    @settings(
        max_examples=BODIES,
        derandomize=True,
        database=None,
        deadline=timedelta(seconds=10),
        suppress_health_check=list(HealthCheck),
    )
    @given(deliveries())
    # What fuzzed bodies once broke, first, before installations recorded here change the rest.
    @example(_edited("issues.labeled", ("issue", "number"), 2**63))
    @example(_edited("pull_request.labeled", ("pull_request", "number"), 2**31))
    @example(_edited("issues.labeled", ("repository", "full_name"), "Hello-World"))
    @example(_edited("installation.created", ("action",), "creat\ud800ed"))
    @example(_edited("installation_repositories.added", ("sender", "login"), "Codertocat"))
    @example(_edited("installation.created", ("installation", "account", "login"), "\udfff"))
    def one(delivery: tuple[str, bytes]) -> None:
        event, body = delivery
        delivery_id = f"fuzz-{next(trimo.ids)}"
        seen = len(trimo.unexpected.records)
        trimo.kinds["lone or paired surrogates"] += bool(SURROGATE_ESCAPE.search(body))
        trimo.kinds["nested 50+ deep"] += b"[" * 50 in body or b'{"a":' * 50 in body
        status, answer = trimo.deliver(event, body, delivery_id)
        assert status < 500, (status, answer)
        if status >= 400:
            assert answer["error"]  # a rejection says why
            trimo.outcomes["rejected"] += 1
            return
        if event == "ping":
            trimo.outcomes["pong"] += 1
            return
        if answer["status"] == "ignored":  # kept for deduplication, nothing to do
            assert trimo.outcome(delivery_id) != (None, None)
            trimo.outcomes["ignored"] += 1
            return
        assert answer["status"] == "queued", answer
        processed, error = trimo.process(delivery_id)
        assert processed is not None, f"delivery {delivery_id} was left unprocessed"
        assert error is None or error.strip(), "a failed delivery keeps its reason"
        trimo.outcomes["failed with reason" if error else "processed"] += 1
        # Only this delivery's: Hypothesis must not blame a later body for an earlier one.
        new = trimo.unexpected.records[seen:]
        assert not new, logging.Formatter().format(new[0])

    one()
    took = time.monotonic() - started
    print(
        f"\n{sum(trimo.statuses.values())} fuzzed bodies in {took:.1f} s; "
        f"of them {dict(trimo.kinds)}; statuses {dict(sorted(trimo.statuses.items()))}; "
        f"outcomes {dict(trimo.outcomes)}; "
        f"5xx: {sum(n for s, n in trimo.statuses.items() if s >= 500)}; "
        f"worker exceptions: {len(trimo.unexpected.records)}"
    )
    assert not [s for s in trimo.statuses if s >= 500]
    assert not trimo.unexpected.records
    # The bodies reached every outcome, so none of the checks above held by default.
    assert {"rejected", "ignored", "processed", "failed with reason"} <= set(trimo.outcomes)


def test_installation_events_in_any_order_end_processed_and_recorded(trimo: Trimo) -> None:
    # Repositories added to an installation Trimo never saw created: the App was installed
    # before Trimo first started. The installation is recorded from the event, with them.
    added = SEEDS["installation_repositories.added"]
    assert trimo.deliver("installation_repositories", json.dumps(added).encode(), "a") == (
        202,
        {"status": "queued", "intents": 1},
    )
    assert trimo.process("a")[1] is None
    assert trimo.store.get_installation(957387) == Installation(
        957387, "Codertocat", ["Codertocat/Space"]
    )
    assert trimo.store.installation_for_repo("Codertocat/Space") == 957387

    # Removing repositories of, suspending, unsuspending and deleting installations Trimo does
    # not know: each delivery ends processed without an error; only what exists is recorded.
    removed = dict(added, action="removed", repositories_added=[])
    removed["repositories_removed"] = added["repositories_added"]
    removed["installation"] = dict(added["installation"], id=31)
    created = SEEDS["installation.created"]
    suspended = dict(created, action="suspend", installation=dict(created["installation"], id=32))
    unsuspended = dict(
        suspended, action="unsuspend", installation=dict(created["installation"], id=33)
    )
    for delivery, (event, body) in enumerate(
        [
            ("installation_repositories", removed),
            ("installation", suspended),
            ("installation", unsuspended),
            ("installation", SEEDS["installation.deleted"]),  # installation 2, never seen
        ]
    ):
        assert trimo.deliver(event, json.dumps(body).encode(), f"o-{delivery}")[0] == 202
        processed, error = trimo.process(f"o-{delivery}")
        assert processed is not None and error is None, (event, body["action"], error)
    assert trimo.store.get_installation(31) is None
    assert trimo.store.get_installation(2) is None
    for installation_id in (32, 33):
        assert trimo.store.get_installation(installation_id) == Installation(
            installation_id, "Codertocat", ["Codertocat/Hello-World"]
        )
    # The repository removed from installation 31 was another installation's: still there.
    assert trimo.store.installation_for_repo("Codertocat/Space") == 957387
    assert not trimo.unexpected.records
    assert not trimo.fake.requests  # none of this needed GitHub's API
