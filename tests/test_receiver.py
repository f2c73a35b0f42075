"""The webhook receiver over a real socket: signed real payloads in, intents in the store."""

from __future__ import annotations

import json
import logging
import socket
import sqlite3
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from pydantic import SecretStr
from werkzeug.serving import make_server

from bot.intents import InstallationIntent, RunIntent, load_intents
from bot.settings import Settings
from tests.conftest import GITHUB_FIXTURES, webhook_payloads
from webhooks.app import create_app
from webhooks.signature import sign

SECRET = "It's a Secret to Everybody"
REPO_ROOT = Path(__file__).resolve().parents[1]


PAYLOADS = webhook_payloads()


class MemoryStore:
    """The store's delivery interface, in memory."""

    def __init__(self) -> None:
        self.deliveries: dict[str, tuple[str, str | None, str]] = {}
        self.lock = threading.Lock()

    def record_delivery(
        self, delivery_id: str, event: str, action: str | None, intents: str
    ) -> bool:
        with self.lock:
            if delivery_id in self.deliveries:
                return False
            self.deliveries[delivery_id] = (event, action, intents)
            return True


def recorded(store: Any) -> dict[str, tuple[str, str | None, str]]:
    """Every delivery the store holds: id -> (event, action, intents JSON)."""
    if isinstance(store, MemoryStore):
        return dict(store.deliveries)
    with sqlite3.connect(store.db_path) as db:
        rows = db.execute("SELECT delivery_id, event, action, intents FROM deliveries").fetchall()
    return {row[0]: (row[1], row[2], row[3]) for row in rows}


@dataclass
class Receiver:
    url: str
    store: Any

    def post(
        self,
        event: str,
        body: bytes,
        *,
        delivery: str | None = None,
        secret: str = SECRET,
        headers: dict[str, str] | None = None,
    ) -> requests.Response:
        sent = {
            "Content-Type": "application/json",
            "X-GitHub-Event": event,
            "X-GitHub-Delivery": delivery or str(uuid.uuid4()),
            "X-Hub-Signature-256": sign(secret.encode(), body),
            "User-Agent": "GitHub-Hookshot/test",
        }
        sent.update(headers or {})
        return requests.post(self.url + "/webhooks/github", data=body, headers=sent, timeout=30)

    def healthy(self) -> bool:
        return requests.get(self.url + "/healthz", timeout=10).status_code == 200


def make_settings(trigger_label: str = "trimo", app_id: int | None = 2, **kw: Any) -> Settings:
    return Settings(
        webhook_secrets=kw.pop("secrets", [SECRET]),
        trigger_label=trigger_label,
        app_id=app_id,
        **kw,
    )


def real_store(tmp_path: Path) -> Any:
    from bot.store import Store

    store = Store(Store.sqlite_url(tmp_path))
    store.db_path = tmp_path / "trimo.db"
    return store


@pytest.fixture(params=["memory", "sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    if request.param == "memory":
        yield MemoryStore()
        return
    s = real_store(tmp_path)
    try:
        yield s
    finally:
        s.close()


def start(settings: Settings, store: Any, **kw: Any) -> tuple[Any, str]:
    app = create_app(settings, store, **kw)
    server = make_server("127.0.0.1", 0, app, threaded=True)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_port}"


@pytest.fixture
def serve(store: Any) -> Iterator[Any]:
    """Start a receiver with the given settings; every server started is shut down."""
    servers: list[Any] = []

    def _serve(settings: Settings | None = None, **kw: Any) -> Receiver:
        server, url = start(settings or make_settings(), store, **kw)
        servers.append(server)
        return Receiver(url, store)

    try:
        yield _serve
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()


def read(name: str) -> bytes:
    return (GITHUB_FIXTURES / "webhooks" / name).read_bytes()


# --- accepted deliveries -----------------------------------------------------------------------


@pytest.mark.parametrize("path", PAYLOADS, ids=lambda p: p.stem)
def test_every_real_payload_is_accepted(serve: Any, path: Path) -> None:
    receiver = serve()
    event = path.name.split(".", maxsplit=1)[0]
    reply = receiver.post(event, path.read_bytes(), delivery="d-" + path.stem)
    assert reply.status_code in (200, 202), reply.text
    stored = recorded(receiver.store)
    if event == "ping":
        assert reply.json()["msg"] == "pong" and reply.json()["zen"]
        assert stored == {}
        return
    assert list(stored) == ["d-" + path.stem]
    stored_event, action, intents = stored["d-" + path.stem]
    assert stored_event == event
    assert action == json.loads(path.read_bytes()).get("action")
    assert len(load_intents(intents)) == reply.json().get("intents", 0)


def test_expected_intents_for_real_payloads(serve: Any) -> None:
    receiver = serve(make_settings(trigger_label="trimo", app_id=2))
    # With the default label the real "bug" label starts nothing.
    assert receiver.post("issues", read("issues.labeled.json")).json() == {"status": "ignored"}
    assert receiver.post("pull_request", read("pull_request.closed.json"), delivery="c").json() == {
        "status": "queued",
        "intents": 1,
    }
    assert receiver.post("check_run", read("check_run.rerequested.json")).status_code == 202
    assert receiver.post("installation", read("installation.created.json")).status_code == 202
    assert receiver.post("push", read("push.json")).json() == {"status": "ignored"}
    [cancel] = load_intents(recorded(receiver.store)["c"][2])
    assert cancel.type == "cancel" and cancel.number == 2 and cancel.delivery_id == "c"


def test_trigger_label_decides_what_runs(serve: Any) -> None:
    receiver = serve(make_settings(trigger_label="bug"))
    reply = receiver.post("issues", read("issues.labeled.json"), delivery="label-bug")
    assert (reply.status_code, reply.json()) == (202, {"status": "queued", "intents": 1})
    [intent] = load_intents(recorded(receiver.store)["label-bug"][2])
    assert isinstance(intent, RunIntent)
    assert (intent.repo, intent.number, intent.trigger) == ("Codertocat/Hello-World", 1, "label")


def test_a_comment_command_is_queued(serve: Any) -> None:
    receiver = serve()
    payload = json.loads(read("issue_comment.created.json"))
    payload["comment"]["body"] = "/trimo run add a test\n/trimo status"
    reply = receiver.post("issue_comment", json.dumps(payload).encode(), delivery="cmd")
    assert reply.json() == {"status": "queued", "intents": 2}
    types = [i.type for i in load_intents(recorded(receiver.store)["cmd"][2])]
    assert types == ["run", "status"]


def test_a_redelivery_is_recorded_once(serve: Any) -> None:
    receiver = serve(make_settings(trigger_label="bug"))
    body = read("issues.labeled.json")
    first = receiver.post("issues", body, delivery="same")
    again = receiver.post("issues", body, delivery="same")
    assert first.status_code == 202
    assert (again.status_code, again.json()) == (200, {"status": "duplicate"})
    assert list(recorded(receiver.store)) == ["same"]


def test_concurrent_redeliveries_are_recorded_once(serve: Any) -> None:
    receiver = serve(make_settings(trigger_label="bug"))
    body = read("issues.labeled.json")
    with ThreadPoolExecutor(8) as pool:
        codes = list(
            pool.map(lambda _: receiver.post("issues", body, delivery="x").status_code, range(16))
        )
    assert sorted(codes) == [200] * 15 + [202]
    assert list(recorded(receiver.store)) == ["x"]


def test_either_secret_signs_while_rotating(serve: Any) -> None:
    receiver = serve(make_settings(secrets=[SecretStr("old secret"), SecretStr("new secret")]))
    body = read("push.json")
    assert receiver.post("push", body, secret="old secret").status_code == 200
    assert receiver.post("push", body, secret="new secret").status_code == 200
    assert receiver.post("push", body, secret="other").status_code == 401
    assert len(recorded(receiver.store)) == 2


def test_lone_surrogates_in_an_installation_event_are_stored_as_u_fffd(serve: Any) -> None:
    # JSON may spell a lone UTF-16 surrogate; UTF-8 (the store, GitHub's API) cannot hold one.
    receiver = serve()
    created = json.loads(read("installation.created.json"))
    created["installation"]["account"]["login"] = "Coder\ud800tocat"
    created["sender"]["login"] = "\udbff"
    reply = receiver.post("installation", json.dumps(created).encode(), delivery="kept")
    assert (reply.status_code, reply.json()) == (202, {"status": "queued", "intents": 1})
    # An action Trimo does not act on is only acknowledged, and stored for deduplication.
    odd = dict(created, action="creat\ud800ed")
    reply = receiver.post("installation", json.dumps(odd).encode(), delivery="odd")
    assert (reply.status_code, reply.json()) == (200, {"status": "ignored"})
    # A repository's name has GitHub's shape, which U+FFFD is not part of: refused, named.
    created["repositories"][0]["full_name"] = "Codertocat/Hello-\udfffWorld"
    reply = receiver.post("installation", json.dumps(created).encode(), delivery="refused")
    assert reply.status_code == 400
    assert reply.json()["error"].startswith(
        "the payload is not a valid installation.created event: repositories.0.full_name: "
    )
    stored = recorded(receiver.store)
    assert sorted(stored) == ["kept", "odd"]
    assert stored["odd"][:2] == ("installation", "creat\ufffded")
    [intent] = load_intents(stored["kept"][2])
    assert isinstance(intent, InstallationIntent)
    assert (intent.account, intent.repositories, intent.sender) == (
        "Coder\ufffdtocat",
        ["Codertocat/Hello-World"],
        "\ufffd",
    )
    assert receiver.healthy()


# --- rejected deliveries -----------------------------------------------------------------------


def test_wrong_signature_says_to_check_the_secret(
    serve: Any, caplog: pytest.LogCaptureFixture
) -> None:
    receiver = serve()
    with caplog.at_level(logging.WARNING, logger="webhooks.receiver"):
        reply = receiver.post("push", read("push.json"), delivery="bad-sig", secret="wrong")
    assert reply.status_code == 401
    assert "webhook secret" in reply.json()["error"]
    [line] = [r.getMessage() for r in caplog.records if r.name == "webhooks.receiver"]
    assert "bad-sig" in line and "push" in line and "secret" in line
    assert SECRET not in line and "Codertocat" not in line
    assert recorded(receiver.store) == {}
    assert receiver.healthy()


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({"X-GitHub-Event": ""}, 400),
        ({"X-GitHub-Delivery": ""}, 400),
        ({"X-GitHub-Delivery": "d" * 101}, 400),
        ({"Content-Type": "application/x-www-form-urlencoded"}, 415),
        ({"Content-Type": "text/plain"}, 415),
        ({"X-Hub-Signature-256": ""}, 401),
        ({"X-Hub-Signature-256": "sha1=abc"}, 401),
    ],
)
def test_bad_headers_are_rejected(serve: Any, headers: dict[str, str], status: int) -> None:
    receiver = serve()
    reply = receiver.post("push", read("push.json"), headers=headers)
    assert reply.status_code == status
    assert reply.headers["Content-Type"] == "application/json" and reply.json()["error"]
    assert recorded(receiver.store) == {}
    assert receiver.healthy()


def test_content_type_may_name_a_charset(serve: Any) -> None:
    receiver = serve()
    headers = {"Content-Type": "application/json; charset=utf-8"}
    assert receiver.post("push", read("push.json"), headers=headers).status_code == 200


@pytest.mark.parametrize(
    "body",
    [read("push.json")[:-40], b"", b"[1, 2]", b'"text"', b"\xff\xfe{}", b"[" * 100_000, b"{" * 10],
    ids=["truncated", "empty", "array", "string", "not-utf8", "deep", "braces"],
)
def test_bodies_that_are_not_a_json_object_are_rejected(serve: Any, body: bytes) -> None:
    receiver = serve()
    reply = receiver.post("push", body)
    assert reply.status_code == 400 and "JSON object" in reply.json()["error"]
    assert recorded(receiver.store) == {}
    assert receiver.healthy()


def test_a_payload_missing_a_needed_field_is_rejected(serve: Any) -> None:
    receiver = serve(make_settings(trigger_label="bug"))
    payload = json.loads(read("pull_request.labeled.json"))
    del payload["pull_request"]["head"]
    reply = receiver.post("pull_request", json.dumps(payload).encode())
    assert reply.status_code == 400 and "pull_request.labeled" in reply.json()["error"]
    assert recorded(receiver.store) == {}


def test_only_post_is_allowed(serve: Any) -> None:
    receiver = serve()
    reply = requests.get(receiver.url + "/webhooks/github", timeout=10)
    assert reply.status_code == 405 and reply.json()["error"]
    assert requests.get(receiver.url + "/nowhere", timeout=10).status_code == 404


def _raw_request(url: str, head: bytes, chunks: list[bytes]) -> tuple[int, bytes]:
    """Send a request by hand; the server may answer before the body is all sent."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(head)
        try:
            for chunk in chunks:
                sock.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass
        sock.shutdown(socket.SHUT_WR)
        reply = b""
        try:
            while data := sock.recv(65536):
                reply += data
        except ConnectionResetError:
            pass
    return int(reply[9:12]), reply


def _head(receiver: Receiver, extra: str) -> bytes:
    return (
        "POST /webhooks/github HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        f"X-GitHub-Event: push\r\nX-GitHub-Delivery: big\r\nX-Hub-Signature-256: sha256=00\r\n"
        f"{extra}\r\n"
    ).encode()


def test_a_30_mb_body_is_refused_from_its_length(serve: Any) -> None:
    receiver = serve()
    size = 30 * 1024 * 1024
    # Only the headers and a little of the body go out: the answer must not wait for the rest.
    status, reply = _raw_request(
        receiver.url, _head(receiver, f"Content-Length: {size}\r\n"), [b"{" * 1024]
    )
    assert status == 413 and b"larger than" in reply
    assert recorded(receiver.store) == {}
    assert receiver.healthy()


def test_a_30_mb_body_is_refused_by_requests(serve: Any) -> None:
    receiver = serve()
    try:
        reply = receiver.post("push", b"{" + b" " * (30 * 1024 * 1024) + b"}")
    except requests.ConnectionError:
        # The server may close before the client has sent all of 30 MB; what matters is below.
        pass
    else:
        assert reply.status_code == 413
    assert recorded(receiver.store) == {}
    assert receiver.healthy()


def test_a_chunked_body_is_cut_at_the_limit(serve: Any) -> None:
    receiver = serve(max_body=64 * 1024)
    piece = b" " * 8192
    chunks = [b"%x\r\n%s\r\n" % (len(piece), piece) for _ in range(16)] + [b"0\r\n\r\n"]
    status, reply = _raw_request(
        receiver.url, _head(receiver, "Transfer-Encoding: chunked\r\n"), chunks
    )
    assert status == 413 and b"larger than 65536" in reply
    assert recorded(receiver.store) == {}
    assert receiver.healthy()


def test_garbage_never_causes_a_server_error(serve: Any) -> None:
    receiver = serve()
    rng = __import__("random").Random(7)
    for i in range(60):
        body = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 300)))
        event = rng.choice(["push", "issues", "issue_comment", "ping", "", "x" * 70, "??"])
        headers = {
            "X-Hub-Signature-256": rng.choice([sign(SECRET.encode(), body), "sha256=zz", ""])
        }
        if i % 3 == 0:
            # Signed JSON objects of the wrong shape reach the event concerns.
            body = json.dumps(
                {"action": rng.choice(["labeled", "created", 5, None]), "issue": i}
            ).encode()
            headers["X-Hub-Signature-256"] = sign(SECRET.encode(), body)
        reply = receiver.post(event or "push", body, headers=headers)
        assert reply.status_code < 500, (reply.status_code, reply.text)
    assert receiver.healthy()
