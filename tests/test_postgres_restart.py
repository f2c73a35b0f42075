"""PostgreSQL restarted (as if it crashed) while webhooks arrive: no delivery answered 202 is lost,
and each is processed exactly once after the restart.

The database is a cluster of the test's own (tests/postgres_cluster.py), so restarting it
disturbs nobody. The receiver is Trimo's webhook app on a real socket; the worker side is the
GitHub service's delivery lanes and report sender on a store of its own, as in `trimo worker`;
GitHub is the fake. A delivery answered 503 (the store was down) is sent again with the same
delivery id, as GitHub's redelivery would.
"""

from __future__ import annotations

import copy
import hashlib
import hmac
import json
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from sqlalchemy.exc import DBAPIError
from werkzeug.serving import make_server

from bot.github.auth import AppAuth
from bot.github.service import GitHubService
from bot.settings import Settings
from bot.store import DeliveryState, Store
from bot.store.outbox import ReportState
from tests.conftest import GITHUB_FIXTURES
from tests.github_fake import FakeGitHub
from tests.postgres_cluster import Cluster, own_cluster

SECRET = "restart-test-secret"
REPO = "octo/sample"
WRITER = "Codertocat"
ISSUES = 48
SENDERS = 4
LOAD_SECONDS = 60


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    with own_cluster() as made:
        yield made


def _labelled(number: int) -> bytes:
    data: dict[str, Any] = json.loads(
        (GITHUB_FIXTURES / "webhooks" / "issues.labeled.json").read_text()
    )
    data = copy.deepcopy(data)
    owner, name = REPO.split("/")
    data["repository"].update(full_name=REPO, name=name)
    data["repository"]["owner"]["login"] = owner
    data["installation"] = {"id": 1, "node_id": "MDIzOkluc3RhbGxhdGlvbjE="}
    data["issue"].update(number=number, title=f"Work {number}")
    data["label"]["name"] = "trimo"
    data["sender"]["login"] = WRITER
    return json.dumps(data).encode()


def _post(url: str, delivery: str, body: bytes) -> int:
    signature = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    try:
        answer = requests.post(
            url,
            data=body,
            timeout=10,
            headers={
                "Content-Type": "application/json",
                "X-GitHub-Event": "issues",
                "X-GitHub-Delivery": delivery,
                "X-Hub-Signature-256": signature,
            },
        )
    except requests.RequestException:
        return 0
    return answer.status_code


def test_deliveries_answered_202_survive_a_postgres_restart(
    cluster: Cluster, tmp_path: Path
) -> None:
    with FakeGitHub() as fake:
        fake.add_repo(REPO)
        fake.set_permission(WRITER, "write")
        for _ in range(ISSUES):
            fake.add_issue(REPO, title="Work")
        settings = Settings(
            data_dir=tmp_path / "data",
            database_url=cluster.url,
            app_id=fake.app_id,
            private_key=fake.private_key,
            webhook_secrets=[SECRET],
            api_url=fake.base_url,
            web_url=fake.web_url,
            report_backoff_seconds=0.1,
            report_max_backoff_seconds=1.0,
            delivery_backoff_seconds=0.2,
            delivery_attempts=20,
            delivery_lease_seconds=10,
        )
        receiving = Store(cluster.url)
        working = Store(cluster.url)
        from webhooks.app import create_app

        server = make_server("127.0.0.1", 0, create_app(settings, receiving), threaded=True)
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        url = f"http://127.0.0.1:{server.server_port}/webhooks/github"
        service = GitHubService(
            settings,
            working,
            AppAuth(fake.app_id, fake.private_key, fake.base_url),
            write_interval=0,
            edit_interval=0,
        )
        stop = threading.Event()

        def deliveries() -> None:
            while not stop.is_set():
                try:
                    if service.process_pending() == 0:
                        stop.wait(0.1)
                except DBAPIError:  # the store is restarting: as `trimo worker` does, wait
                    stop.wait(0.2)

        workers = [
            threading.Thread(target=deliveries, daemon=True),
            threading.Thread(
                target=service.sender.run_forever, args=(stop, service.reports.sweep), daemon=True
            ),
        ]
        for thread in workers:
            thread.start()

        answers: dict[str, list[int]] = {}
        lock = threading.Lock()
        accepted_at: list[float] = []
        deadline = time.monotonic() + LOAD_SECONDS

        def send(numbers: list[int]) -> None:
            for number in numbers:
                delivery = str(uuid.uuid4())
                body = _labelled(number)
                while time.monotonic() < deadline:
                    status = _post(url, delivery, body)
                    with lock:
                        answers.setdefault(delivery, []).append(status)
                        if status == 202:
                            accepted_at.append(time.monotonic())
                    if status in (200, 202):
                        break
                    time.sleep(0.1)  # GitHub's redelivery, much sooner

        chunks = [list(range(1 + i, ISSUES + 1, SENDERS)) for i in range(SENDERS)]
        senders = [threading.Thread(target=send, args=(c,), daemon=True) for c in chunks]
        try:
            for thread in senders:
                thread.start()
            while len(accepted_at) < ISSUES // 3 and time.monotonic() < deadline:
                time.sleep(0.01)
            restarted_at = time.monotonic()
            cluster.restart("immediate")
            back_at = time.monotonic()
            for thread in senders:
                thread.join(timeout=LOAD_SECONDS)

            def settled() -> bool:
                try:
                    pending = working.delivery_counts()[DeliveryState.PENDING]
                    reports = service.sender.outbox.counts()[ReportState.PENDING]
                except DBAPIError:
                    return False
                return pending == 0 and reports == 0

            settle_by = time.monotonic() + 60
            while not settled() and time.monotonic() < settle_by:
                time.sleep(0.2)
            assert settled(), "deliveries or reports still pending a minute after the load"
        finally:
            stop.set()
            for thread in workers:
                thread.join(timeout=15)
            assert service.deliveries.wait_idle(30)
            server.shutdown()

        # The load went on across the restart, and the restart was noticed.
        assert any(at < restarted_at for at in accepted_at)
        assert any(at > back_at for at in accepted_at)
        assert any(status in (0, 503) for statuses in answers.values() for status in statuses)
        recorded = {d for d, statuses in answers.items() if statuses[-1] in (200, 202)}
        assert len(recorded) == ISSUES, "every issue's delivery was recorded in the end"
        said_202 = {d for d, statuses in answers.items() if 202 in statuses}
        stored = {i.delivery_id: i for i in working.list_deliveries(limit=10 * ISSUES)}
        for delivery in said_202:
            info = stored.get(delivery)
            assert info is not None, f"delivery {delivery} was answered 202 and is lost"
            assert info.state == DeliveryState.PROCESSED, (delivery, info.state, info.error)
        # Processed exactly once: each issue has one run and one tracking comment.
        for number in range(1, ISSUES + 1):
            pipeline = working.find_pipeline(REPO, f"issue:{number}")
            assert pipeline is not None, f"issue {number}: no pipeline"
            runs = working.list_runs(pipeline_id=pipeline.id)
            assert len(runs) == 1, f"issue {number}: {len(runs)} runs"
            tracking = [c for c in fake.comments_on(REPO, number) if "trimo:run=" in c["body"]]
            assert len(tracking) == 1, f"issue {number}: {len(tracking)} tracking comments"
        receiving.close()
        working.close()
