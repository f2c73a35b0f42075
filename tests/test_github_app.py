"""The GitHub App end to end: signed webhooks over a socket in, real containers, reports out.

GitHub's API is the one fake (tests/github_fake.py), validated against GitHub's OpenAPI description;
everything else is real: the receiver on an HTTP socket, the store, the worker, Docker, git (a local
bare repository plays GitHub's git remote).
"""

from __future__ import annotations

import copy
import hashlib
import hmac
import json
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker
import pytest
import requests
from werkzeug.serving import make_server

from bot.engine import Engine
from bot.github.auth import AppAuth
from bot.github.service import GitHubService
from bot.runtime import LABEL_RUN, DockerRuntime
from bot.settings import Settings
from bot.states import RunState
from bot.store import Store
from bot.worker import WorkerPool
from bot.workspace import Workspace
from tests.conftest import shared_dir
from tests.containers import git, make_repo
from tests.github_fake import FakeGitHub

pytestmark = pytest.mark.docker

SECRET = "webhook-secret-for-tests"
REPO = "octo/sample"
WRITER = "Codertocat"
READER = "visitor"
JUNIT = (
    '<testsuite name="t"><testcase classname="t" name="test_one"/>'
    '<testcase classname="t" name="test_two"/><testcase classname="t" name="test_three">'
    "<skipped/></testcase></testsuite>"
)
CONFIG = f"""agent:
  command: >-
    grep -q SLOWLY "$TRIMO_TASK_FILE" && sleep 300;
    echo "fixed by $TRIMO_RUN_ID" >> fix.txt && git add fix.txt && git commit -qm "Fix the bug"
test:
  command: echo '{JUNIT}' > "$TRIMO_OUT/junit.xml"
  junit: junit.xml
"""


def payload(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((shared_dir() / "github" / "webhooks" / name).read_text())
    return data


def retarget(data: dict[str, Any], number: int, title: str | None = None) -> dict[str, Any]:
    """A real payload pointed at our repository and issue."""
    data = copy.deepcopy(data)
    owner, name = REPO.split("/")
    data["repository"]["full_name"] = REPO
    data["repository"]["name"] = name
    data["repository"]["owner"]["login"] = owner
    data["installation"] = {"id": 1, "node_id": "MDIzOkluc3RhbGxhdGlvbjE="}
    if "issue" in data:
        data["issue"]["number"] = number
        if title:
            data["issue"]["title"] = title
    return data


@dataclass
class App:
    fake: FakeGitHub
    url: str
    store: Store
    remote: Path
    service: GitHubService

    def deliver(
        self, event: str, data: dict[str, Any], delivery: str | None = None
    ) -> requests.Response:
        body = json.dumps(data).encode()
        sig = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
        return requests.post(
            f"{self.url}/webhooks/github",
            data=body,
            timeout=10,
            headers={
                "Content-Type": "application/json",
                "X-GitHub-Event": event,
                "X-GitHub-Delivery": delivery or str(uuid.uuid4()),
                "X-Hub-Signature-256": sig,
            },
        )

    def wait_finished(self, run_id: int, timeout: float = 120) -> RunState:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                run = self.store.get_run(run_id)
                if run.finished:
                    time.sleep(0.3)  # the final report follows the state by a moment
                    return run.state
            except Exception:  # noqa: BLE001 - not there yet
                pass
            time.sleep(0.2)
        raise AssertionError(f"run {run_id} did not finish")

    def wait_for(self, pred: Any, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if pred():
                return
            time.sleep(0.1)
        raise AssertionError("condition not reached")


@pytest.fixture
def app(tmp_path: Path, base_image: str, docker_client: docker.DockerClient) -> Iterator[App]:
    remote = tmp_path / "remotes" / f"{REPO}.git"
    work = tmp_path / "work"
    make_repo(work, {"README.md": "# sample\n", ".trimo/config.yml": CONFIG})
    remote.parent.mkdir(parents=True)
    subprocess.run(["git", "clone", "-q", "--bare", str(work), str(remote)], check=True)
    with FakeGitHub() as fake:
        fake.add_repo(REPO)
        fake.set_permission(WRITER, "write")
        fake.set_permission(READER, "read")
        settings = Settings(
            data_dir=tmp_path / "data",
            app_id=fake.app_id,
            private_key=fake.private_key,
            webhook_secrets=[SECRET],
            api_url=fake.base_url,
            web_url=fake.web_url,
            git_url=str(tmp_path / "remotes" / "{repo}.git"),
            workers=2,
        )
        store = Store(settings.database_url)
        from webhooks.app import create_app

        server = make_server("127.0.0.1", 0, create_app(settings, store), threaded=True)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        auth = AppAuth(settings.app_id or 0, fake.private_key, settings.api_url)
        service = GitHubService(settings, store, auth, write_interval=0, edit_interval=0)
        engine = Engine(
            store,
            Workspace(settings.data_dir),
            DockerRuntime(docker_client),
            owner="pytest-app",
            secret_lookup=settings.secret_value,
        )
        pool = WorkerPool(
            engine, store, service.context_for, service.observer_for, size=2, poll_seconds=0.1
        )
        stop = threading.Event()

        def deliveries() -> None:
            while not stop.is_set():
                if service.process_pending() == 0:
                    stop.wait(0.1)

        threads = [
            threading.Thread(target=pool.run_forever, daemon=True),
            threading.Thread(target=deliveries, daemon=True),
        ]
        for t in threads:
            t.start()
        try:
            yield App(fake, f"http://127.0.0.1:{server.server_port}", store, remote, service)
        finally:
            stop.set()
            pool.stop(wait=True)
            for t in threads:
                t.join(timeout=10)
            server.shutdown()
            for c in docker_client.containers.list(
                all=True, filters={"label": "trimo.owner=pytest-app"}
            ):
                c.remove(force=True)
            assert not fake.violations, fake.violations


def test_labelled_issue_becomes_a_tested_branch_a_draft_pr_and_reports(
    app: App, docker_client: docker.DockerClient
) -> None:
    issue = app.fake.add_issue(REPO, title="Fix the bug", body="It is broken.")
    data = retarget(payload("issues.labeled.json"), issue["number"], issue["title"])
    data["label"]["name"] = "trimo"
    r = app.deliver("issues", data)
    assert r.status_code == 202, r.text
    app.wait_for(lambda: app.store.list_runs())
    run_id = app.store.list_runs()[0].id
    assert app.wait_finished(run_id) == RunState.SUCCEEDED

    # The branch was pushed to the remote, with the agent's commit on the default branch.
    branch = app.store.get_pipeline(app.store.get_run(run_id).pipeline_id).branch
    assert branch.startswith(f"trimo/{issue['number']}-fix-the-bug")
    assert git(app.remote, "log", "-1", "--format=%s", branch) == "Fix the bug"
    # A draft PR linking the issue.
    pulls = list(app.fake.pulls.values())
    assert len(pulls) == 1 and pulls[0]["draft"] is True
    assert f"Closes #{issue['number']}" in pulls[0]["body"]
    # The tracking comment ends with the counts; the check run completed with success.
    comments = [c for c in app.fake.comments_on(REPO, issue["number"]) if "trimo:run" in c["body"]]
    assert len(comments) == 1
    assert "2 passed" in comments[0]["body"] and "1 skipped" in comments[0]["body"]
    checks = list(app.fake.check_runs.values())
    assert len(checks) == 1 and checks[0]["status"] == "completed"
    assert checks[0]["conclusion"] == "success"
    assert docker_client.containers.list(all=True, filters={"label": f"{LABEL_RUN}={run_id}"}) == []

    # The same delivery again: one run only.
    before = len(app.store.list_runs())
    assert app.deliver("issues", data, delivery="same-id").status_code == 202
    assert app.deliver("issues", data, delivery="same-id").status_code == 200
    app.wait_for(lambda: app.store.pending_deliveries() == 0)
    assert len(app.store.list_runs()) == before + 1
    app.wait_finished(app.store.list_runs()[0].id)


def _comment_payload(number: int, body: str, sender: str) -> dict[str, Any]:
    data = retarget(payload("issue_comment.created.json"), number)
    data["comment"]["body"] = body
    data["comment"]["id"] = app_comment_id = int(time.time() * 1000) % 10**9
    data["sender"]["login"] = sender
    data["sender"]["type"] = "User"
    assert app_comment_id
    return data


def test_retry_by_writer_runs_again_and_reader_is_refused(app: App) -> None:
    issue = app.fake.add_issue(REPO, title="Add a feature")
    data = retarget(payload("issues.labeled.json"), issue["number"])
    data["label"]["name"] = "trimo"
    app.deliver("issues", data)
    app.wait_for(lambda: app.store.list_runs())
    first = app.store.list_runs()[0]
    assert app.wait_finished(first.id) == RunState.SUCCEEDED

    comment = app.fake.add_comment(REPO, issue["number"], "/trimo retry", user=WRITER)
    retry = _comment_payload(issue["number"], "/trimo retry", WRITER)
    retry["comment"]["id"] = comment["id"]
    assert app.deliver("issue_comment", retry).status_code == 202
    app.wait_for(lambda: len(app.store.list_runs()) == 2)
    second = app.store.list_runs()[0]
    assert second.pipeline_id == first.pipeline_id  # the same branch
    assert app.wait_finished(second.id) == RunState.SUCCEEDED
    assert any(r.get("content") == "eyes" for r in app.fake.reactions)
    branch = app.store.get_pipeline(first.pipeline_id).branch
    assert git(app.remote, "rev-list", "--count", f"main..{branch}") == "2"

    refused = _comment_payload(issue["number"], "/trimo retry", READER)
    assert app.deliver("issue_comment", refused).status_code == 202
    app.wait_for(lambda: len(app.store.list_runs()) == 3)
    third = app.store.list_runs()[0]
    assert app.store.get_run(third.id).state == RunState.REJECTED
    assert app.store.get_run(third.id).container_id is None
    app.wait_for(
        lambda: any(
            "permission" in c["body"] and READER in c["body"]
            for c in app.fake.comments_on(REPO, issue["number"])
        )
    )


def test_stop_during_agent_cancels_the_run_and_the_check(
    app: App, docker_client: docker.DockerClient
) -> None:
    issue = app.fake.add_issue(REPO, title="Long one")
    run_cmd = _comment_payload(issue["number"], "/trimo run work SLOWLY please", WRITER)
    assert app.deliver("issue_comment", run_cmd).status_code == 202
    app.wait_for(
        lambda: app.store.list_runs() and app.store.list_runs()[0].state == RunState.AGENT,
        timeout=60,
    )
    run = app.store.list_runs()[0]
    assert run.instructions and "SLOWLY" in run.instructions
    stop = _comment_payload(issue["number"], "/trimo stop", WRITER)
    assert app.deliver("issue_comment", stop).status_code == 202
    assert app.wait_finished(run.id, timeout=60) == RunState.CANCELLED
    assert docker_client.containers.list(all=True, filters={"label": f"{LABEL_RUN}={run.id}"}) == []
    app.wait_for(
        lambda: any(c.get("conclusion") == "cancelled" for c in app.fake.check_runs.values())
    )
