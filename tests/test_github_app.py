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
import logging
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker
import pytest
import requests
from werkzeug.serving import make_server

from bot.engine import Engine
from bot.github.auth import AppAuth
from bot.github.service import GitHubService
from bot.intents import StatusIntent
from bot.runtime import LABEL_RUN, DockerRuntime
from bot.secrets import ServerSecrets
from bot.settings import Settings
from bot.states import FINISHED, PipelineKind, RunMode, RunState
from bot.store import Store
from bot.store.outbox import Outbox, ReportState
from bot.worker import WorkerPool
from bot.workspace import Workspace
from tests.conftest import BACKENDS, GITHUB_FIXTURES, empty_database
from tests.containers import extra_ca_certs, git, make_repo
from tests.engines import needs_second_engine
from tests.git_http import GitHttp, serve_git
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
GHES_API = "https://ghe.example.test/api/v3"
PUBLIC_URL = "https://trimo.example.test"
FORK = "forker/sample"
CONFIG = f"""agent:
  command: >-
    grep -q SLOWLY "$TRIMO_TASK_FILE" && sleep 300;
    grep -q BRIEFLY "$TRIMO_TASK_FILE" && sleep 8;
    grep -q PRINTENV "$TRIMO_TASK_FILE" && env | sort;
    echo "fixed by $TRIMO_RUN_ID" >> fix.txt && git add fix.txt && git commit -qm "Fix the bug"
test:
  command: echo '{JUNIT}' > "$TRIMO_OUT/junit.xml"
  junit: junit.xml
"""


def payload(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((GITHUB_FIXTURES / "webhooks" / name).read_text())
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
    docker: docker.DockerClient
    tmp: Path
    git_http: GitHttp | None = None
    # Seconds GitHub's clock (and the App's) runs ahead of the real one.
    clock_offset: list[float] = field(default_factory=lambda: [0.0])
    # Lets the workers claim runs, with the option `hold_workers` (until then runs stay queued).
    start_workers: Callable[[], None] = lambda: None

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
                    self.wait_reported(run_id)
                    # Shown with a failing assertion on the state: why it ended so.
                    print(f"run {run_id} ended {run.state}: {run.reason} ({run.error})")
                    return run.state
            except Exception:  # noqa: BLE001 - not there yet
                pass
            time.sleep(0.2)
        raise AssertionError(f"run {run_id} did not finish")

    def wait_reported(self, run_id: int, timeout: float = 30) -> None:
        """Wait until the run's final report is stored and GitHub took all of its reports (a
        run that was never reported, such as a refused one, is not waited for long)."""
        outbox = Outbox(self.store)
        deadline = time.monotonic() + timeout
        quiet_until = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            final = outbox.get(f"run:{run_id}:comment")
            waiting = outbox.entries(run_id=run_id, states=[ReportState.PENDING])
            if final is not None and final.final and not waiting:
                return
            if final is None and time.monotonic() > quiet_until:
                return
            time.sleep(0.1)

    def wait_for(self, pred: Any, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if pred():
                return
            time.sleep(0.1)
        raise AssertionError("condition not reached")

    def say(self, number: int, body: str, sender: str = WRITER, *, pull: bool = False) -> None:
        """`sender` comments `body` on issue or PR `number`: on the fake, then as a webhook."""
        comment = self.fake.add_comment(REPO, number, body, user=sender)
        data = _comment_payload(number, body, sender, pull=pull)
        data["comment"]["id"] = comment["id"]
        assert self.deliver("issue_comment", data).status_code == 202

    def comments(self, number: int, text: str = "") -> list[str]:
        """Bodies of Trimo's comments on `number` that contain `text`."""
        return [
            c["body"]
            for c in self.fake.comments_on(REPO, number)
            if c["user"]["type"] == "Bot" and text in c["body"]
        ]

    def wait_comment(self, number: int, text: str, timeout: float = 30) -> str:
        self.wait_for(lambda: self.comments(number, text), timeout)
        return self.comments(number, text)[-1]

    def tracking(self, run_id: int) -> str:
        """The tracking comment of run `run_id`, as it reads now."""
        marker = f"<!-- trimo:run={run_id} -->"
        found = [c["body"] for c in self.fake.comments.values() if marker in c["body"]]
        assert len(found) == 1, f"{len(found)} tracking comments for run {run_id}"
        return found[0]

    def settle(self) -> None:
        """Wait until every delivery has been acted on."""
        self.wait_for(lambda: self.store.pending_deliveries() == 0)
        time.sleep(0.3)  # the last delivery's replies follow its claim by a moment

    def containers(self, run_id: int) -> list[Any]:
        """This test's containers of run `run_id` (other tests may run with the same run ids)."""
        labels = [f"{LABEL_RUN}={run_id}", "trimo.owner=pytest-app"]
        return list(self.docker.containers.list(all=True, filters={"label": labels}))

    def live_run(self, state: RunState = RunState.AGENT, timeout: float = 60) -> int:
        """The id of the latest run once it reached `state`."""
        self.wait_for(
            lambda: self.store.list_runs() and self.store.list_runs()[0].state == state, timeout
        )
        return self.store.list_runs()[0].id


@pytest.fixture
def backend(request: pytest.FixtureRequest) -> str:
    """The store's database: SQLite unless a test parametrizes it indirectly (see BACKENDS)."""
    return str(getattr(request, "param", "sqlite"))


@pytest.fixture
def app(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    base_image: str,
    docker_client: docker.DockerClient,
    backend: str,
) -> Iterator[App]:
    """Trimo against the fake GitHub; parametrize indirectly with an API URL for GHES, or with
    a dict of options: `write_interval` (seconds between writes per installation), `git_http`
    (git over HTTP with installation tokens checked, instead of plain paths), `second_engine`
    (runs go to the session's second Docker engine, see tests/engines.py), `hold_workers` (no
    run is claimed until the test calls `App.start_workers`)."""
    param = getattr(request, "param", None)
    options: dict[str, Any] = param if isinstance(param, dict) else {}
    engine_url: str | None = None
    if options.get("second_engine"):
        second = request.getfixturevalue("second_engine")
        docker_client, engine_url = second.client(), second.url
    api = param if isinstance(param, str) else "https://api.github.com"
    remote = tmp_path / "remotes" / f"{REPO}.git"
    work = tmp_path / "work"
    make_repo(work, {"README.md": "# sample\n", ".trimo/config.yml": CONFIG})
    remote.parent.mkdir(parents=True)
    subprocess.run(["git", "clone", "-q", "--bare", str(work), str(remote)], check=True)
    clock_offset = [0.0]

    def clock() -> float:
        return time.time() + clock_offset[0]

    with (
        empty_database(backend, tmp_path / "data") as database_url,
        FakeGitHub(api, clock=clock) as fake,
        ExitStack() as stack,
    ):
        git_http = None
        git_url = str(tmp_path / "remotes" / "{repo}.git")
        if options.get("git_http"):
            git_http = stack.enter_context(serve_git(tmp_path / "remotes", fake.token_valid))
            git_url = git_http.url + "/{repo}.git"
        fake.add_repo(REPO)
        fake.set_permission(WRITER, "write")
        fake.set_permission(READER, "read")
        settings = Settings(
            data_dir=tmp_path / "data",
            database_url=database_url,
            app_id=fake.app_id,
            private_key=fake.private_key,
            webhook_secrets=[SECRET],
            api_url=fake.base_url,
            web_url=fake.web_url,
            git_url=git_url,
            # The one secret these tests grant; others are refused (see the secrets tests).
            secrets={"DEPLOY_TOKEN": {"repos": [REPO]}},
            workers=2,
            public_url=PUBLIC_URL,
        )
        store = Store(settings.database_url)
        from webhooks.app import create_app

        server = make_server("127.0.0.1", 0, create_app(settings, store), threaded=True)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        auth = AppAuth(settings.app_id or 0, fake.private_key, settings.api_url, clock=clock)
        service = GitHubService(
            settings,
            store,
            auth,
            write_interval=options.get("write_interval", 0),
            edit_interval=0,
        )
        engine = Engine(
            store,
            Workspace(settings.data_dir),
            DockerRuntime(docker_client, url=engine_url),
            owner="pytest-app",
            secrets=ServerSecrets(settings),
            extra_ca_certs=extra_ca_certs(),
        )
        pool = WorkerPool(
            engine, store, service.context_for, service.observer_for, size=2, poll_seconds=0.1
        )
        stop = threading.Event()

        def deliveries() -> None:
            while not stop.is_set():
                if service.process_pending() == 0:
                    stop.wait(0.1)

        workers = threading.Thread(target=pool.run_forever, daemon=True)
        threads = [
            threading.Thread(target=deliveries, daemon=True),
            # As in `trimo worker`: what GitHub did not take at once goes from here.
            threading.Thread(
                target=service.sender.run_forever, args=(stop, service.reports.sweep), daemon=True
            ),
        ]
        for t in threads:
            t.start()
        if not options.get("hold_workers"):
            workers.start()
        try:
            yield App(
                fake,
                f"http://127.0.0.1:{server.server_port}",
                store,
                remote,
                service,
                docker_client,
                tmp_path,
                git_http,
                clock_offset,
                workers.start,
            )
        finally:
            stop.set()
            pool.stop(wait=True)
            for t in threads:
                t.join(timeout=10)
            if workers.ident is not None:
                workers.join(timeout=10)
            # Lanes still answering would reach for GitHub once the fake is gone.
            service.deliveries.wait_idle(60)
            server.shutdown()
            store.close()
            for c in docker_client.containers.list(
                all=True, filters={"label": "trimo.owner=pytest-app"}
            ):
                c.remove(force=True)
            assert not fake.violations, fake.violations


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_labelled_issue_becomes_a_tested_branch_a_draft_pr_and_reports(
    app: App,
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
    # Both link to the run's page.
    assert f"]({PUBLIC_URL}/runs/{run_id})" in comments[0]["body"]
    assert all(
        c["details_url"] == f"{PUBLIC_URL}/runs/{run_id}" for c in app.fake.check_runs.values()
    )
    # One check run, completed on the commit the run pushed (the draft PR's head), none on the
    # default branch's commits.
    head = git(app.remote, "rev-parse", branch)
    checks = list(app.fake.check_runs.values())
    assert [(c["head_sha"], c["status"], c["conclusion"]) for c in checks] == [
        (head, "completed", "success")
    ]
    assert app.containers(run_id) == []

    # The same delivery again: one run only.
    before = len(app.store.list_runs())
    assert app.deliver("issues", data, delivery="same-id").status_code == 202
    assert app.deliver("issues", data, delivery="same-id").status_code == 200
    app.wait_for(lambda: app.store.pending_deliveries() == 0)
    assert len(app.store.list_runs()) == before + 1
    app.wait_finished(app.store.list_runs()[0].id)


def _comment_payload(number: int, body: str, sender: str, *, pull: bool = False) -> dict[str, Any]:
    data = retarget(payload("issue_comment.created.json"), number)
    data["comment"]["body"] = body
    data["comment"]["id"] = app_comment_id = int(time.time() * 1000) % 10**9
    data["sender"]["login"] = sender
    data["sender"]["type"] = "User"
    if pull:
        # A comment on a PR's conversation is an issue_comment whose issue has a `pull_request`
        # member (GitHub's shape; the recorded payload is from a plain issue).
        api = f"https://api.github.com/repos/{REPO}/pulls/{number}"
        data["issue"]["pull_request"] = {
            "url": api,
            "html_url": f"https://github.com/{REPO}/pull/{number}",
            "diff_url": f"https://github.com/{REPO}/pull/{number}.diff",
            "patch_url": f"https://github.com/{REPO}/pull/{number}.patch",
            "merged_at": None,
        }
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
    app: App,
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
    assert app.containers(run.id) == []
    app.wait_for(lambda: "was cancelled" in app.tracking(run.id))
    assert f"**Why:** stopped by @{WRITER}" in app.tracking(run.id)
    # It pushed nothing: its report is the comment alone, no check run on any commit.
    assert app.fake.check_runs == {}


@needs_second_engine
@pytest.mark.parametrize("app", [{"second_engine": True}], indirect=True)
def test_an_engine_restart_mid_run_is_reported_as_the_failure_and_a_retry_succeeds(
    app: App, request: pytest.FixtureRequest
) -> None:
    engine = request.getfixturevalue("second_engine")
    issue = app.fake.add_issue(REPO, title="Long one")
    run_cmd = _comment_payload(issue["number"], "/trimo run work SLOWLY please", WRITER)
    assert app.deliver("issue_comment", run_cmd).status_code == 202
    run_id = app.live_run(RunState.AGENT, timeout=90)

    engine.restart()

    assert app.wait_finished(run_id, timeout=150) == RunState.ERROR
    why = (
        f"**Why:** the Docker engine at {engine.url} restarted during the agent phase and "
        "stopped the run's container with it; nothing was published: run it again"
    )
    app.wait_for(lambda: why in app.tracking(run_id))
    assert app.containers(run_id) == []

    retry = _comment_payload(issue["number"], "/trimo run work", WRITER)
    assert app.deliver("issue_comment", retry).status_code == 202
    app.wait_for(lambda: len(app.store.list_runs()) == 2, timeout=30)
    second = app.store.list_runs()[0]
    assert app.wait_finished(second.id, timeout=150) == RunState.SUCCEEDED
    app.wait_for(lambda: "succeeded" in app.tracking(second.id))


@pytest.mark.parametrize("app", [{"hold_workers": True}], indirect=True)
def test_the_report_shows_agent_while_it_works_and_a_pr_check_run_exists_from_queued(
    app: App,
) -> None:
    # Reports are coalesced as in production (not posted on every change, as elsewhere here).
    app.service.edit_interval = 1.0
    head = git(app.remote, "rev-parse", "HEAD")
    git(app.remote, "update-ref", "refs/heads/feature", head)
    pull = app.fake.add_pull(REPO, head="feature", head_sha=head, title="Slow work")
    app.say(pull["number"], "/trimo run work BRIEFLY", WRITER, pull=True)
    app.wait_for(lambda: app.store.list_runs())
    run_id = app.store.list_runs()[0].id
    app.wait_for(lambda: app.fake.check_runs)
    (check,) = app.fake.check_runs.values()
    # Created while the run waited in the queue, on the pull request's head.
    assert check["head_sha"] == head
    assert app.fake.check_run_history[check["id"]][0]["status"] == "queued"
    # No worker was free until now (else a worker can claim the run before the first report).
    app.start_workers()

    app.wait_for(lambda: app.store.get_run(run_id).state == RunState.AGENT, timeout=60)
    # Within the edit interval (and a write) of the agent starting, GitHub shows it.
    # The comment and the check run are two writes of one flush: wait for both, not one.
    app.wait_for(
        lambda: (
            f"Trimo run #{run_id}: agent" in app.tracking(run_id)
            and app.fake.check_runs[check["id"]]["status"] == "in_progress"
        ),
        timeout=3,
    )
    assert app.store.get_run(run_id).state == RunState.AGENT  # the agent is still working
    assert app.wait_finished(run_id) == RunState.SUCCEEDED
    app.wait_for(lambda: "succeeded" in app.tracking(run_id))
    assert app.fake.check_runs[check["id"]]["conclusion"] == "success"


# ---- helpers for the tests below ---------------------------------------------------------------


def _label(app: App, title: str, body: str = "") -> dict[str, Any]:
    """A new issue on the fake, labelled `trimo` by the writer; returns the issue."""
    issue = app.fake.add_issue(REPO, title=title, body=body)
    data = retarget(payload("issues.labeled.json"), issue["number"], title)
    data["issue"]["body"] = body
    data["label"]["name"] = "trimo"
    data["sender"]["login"] = WRITER
    assert app.deliver("issues", data).status_code == 202
    return issue


def _fork(app: App) -> Path:
    """The fork's own git repository (forker/sample): a second bare repository."""
    fork = app.tmp / "remotes" / f"{FORK}.git"
    if not fork.exists():
        fork.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["git", "clone", "-q", "--bare", str(app.remote), str(fork)], check=True)
    return fork


def _fork_push(app: App, number: int, message: str, *, api: bool = True) -> str:
    """The fork's author pushes a commit to the PR's head branch `feature`; GitHub's copy of it
    in the base repository (refs/pull/<n>/head) follows, and with `api` the PR's head too."""
    fork = _fork(app)
    clone = app.tmp / f"fork-{uuid.uuid4().hex[:6]}"
    subprocess.run(["git", "clone", "-q", str(fork), str(clone)], check=True)
    if git(fork, "branch", "--list", "feature"):
        git(clone, "checkout", "-q", "feature")
    name = f"{uuid.uuid4().hex[:6]}.txt"
    (clone / name).write_text(f"{message}\n")
    git(clone, "add", name)
    git(clone, "commit", "-qm", message)
    head = git(clone, "rev-parse", "HEAD")
    git(clone, "push", "-q", "origin", "HEAD:refs/heads/feature")
    git(clone, "push", "-q", str(app.remote), f"HEAD:refs/pull/{number}/head")
    if api:
        app.fake.pulls[(REPO, number)]["head"]["sha"] = head
    return head


def _fork_pull(
    app: App, title: str, *, maintainer_can_modify: bool = False
) -> tuple[dict[str, Any], str]:
    """A PR from the fork's branch `feature`; returns the PR and its head commit."""
    pull = app.fake.add_pull(
        REPO,
        head="feature",
        head_repo=FORK,
        head_sha="0" * 40,
        title=title,
        maintainer_can_modify=maintainer_can_modify,
    )
    head = _fork_push(app, pull["number"], "The fork's feature")
    pull["head"]["sha"] = head
    return pull, head


def _branches(repo: Path) -> str:
    return git(repo, "for-each-ref", "--format=%(refname) %(objectname)", "refs/heads")


def _approved_run(app: App, pull: dict[str, Any]) -> int:
    """The fork PR labelled, then approved by a writer: the id of the run that starts."""
    number = pull["number"]
    assert app.deliver("pull_request", _pull_labeled(pull)).status_code == 202
    app.wait_comment(number, "comes from a fork")
    app.say(number, "/trimo approve", WRITER, pull=True)
    app.wait_for(lambda: app.store.list_runs())
    return app.store.list_runs()[0].id


def _pull_labeled(pull: dict[str, Any], sender: str = WRITER) -> dict[str, Any]:
    """The recorded pull_request.labeled payload, pointed at `pull` (head in the fork)."""
    data = retarget(payload("pull_request.labeled.json"), pull["number"])
    data["number"] = pull["number"]
    data["label"]["name"] = "trimo"
    data["sender"]["login"] = sender
    pr = data["pull_request"]
    pr["number"] = pull["number"]
    pr["title"] = pull["title"]
    pr["head"]["sha"] = pull["head"]["sha"]
    pr["head"]["ref"] = pull["head"]["ref"]
    pr["head"]["repo"]["full_name"] = pull["head"]["repo"]["full_name"]
    pr["base"]["repo"]["full_name"] = REPO
    return data


def _rerequested(app: App, check_run_id: int, head_sha: str, app_id: int) -> dict[str, Any]:
    data = retarget(payload("check_run.rerequested.json"), 0)
    data["check_run"]["id"] = check_run_id
    data["check_run"]["head_sha"] = head_sha
    data["check_run"]["app"]["id"] = app_id
    data["check_run"]["pull_requests"] = []
    data["sender"]["login"] = WRITER
    return data


def _no_run_yet(app: App) -> None:
    app.settle()
    assert app.store.list_runs() == []


# ---- fork pull requests ------------------------------------------------------------------------


def test_a_fork_pr_allowing_edits_gets_the_commits_on_its_head_branch_none_on_base(
    app: App,
) -> None:
    pull, head = _fork_pull(app, "Feature from a fork", maintainer_can_modify=True)
    number = pull["number"]
    base_branches = _branches(app.remote)
    assert app.deliver("pull_request", _pull_labeled(pull)).status_code == 202
    waiting = app.wait_comment(number, "comes from a fork")
    assert head[:12] in waiting and "/trimo approve" in waiting
    _no_run_yet(app)
    assert app.docker.containers.list(all=True, filters={"label": "trimo.owner=pytest-app"}) == []

    # A reader cannot approve.
    app.say(number, "/trimo approve", READER, pull=True)
    app.wait_comment(number, f"@{READER} Trimo runs only for people with **write**")
    _no_run_yet(app)

    # A writer can: the run starts at the approved commit and pushes to the fork's branch.
    app.say(number, "/trimo approve", WRITER, pull=True)
    assert head[:12] in app.wait_comment(number, f"for Trimo runs by @{WRITER}")
    app.wait_for(lambda: app.store.list_runs())
    run = app.store.list_runs()[0]
    assert app.wait_finished(run.id) == RunState.SUCCEEDED
    fork = _fork(app)
    assert git(fork, "rev-parse", "feature~1") == head
    assert git(fork, "log", "-1", "--format=%s", "feature") == "Fix the bug"
    assert app.store.get_run(run.id).base_sha == head
    # Nothing of the fork's landed in the base repository: no branch appeared or moved.
    assert _branches(app.remote) == base_branches
    body = app.tracking(run.id)
    assert "succeeded" in body and f"{FORK}/tree/feature" in body
    checks = [c for c in app.fake.check_runs.values() if c["head_sha"] == head]
    assert [c["conclusion"] for c in checks] == ["success"]
    assert app.containers(run.id) == []

    # New commits by the fork's author: the approval does not carry over, by label or command.
    new_head = _fork_push(app, number, "More from the fork")
    moved = copy.deepcopy(pull)
    moved["head"]["sha"] = new_head
    assert app.deliver("pull_request", _pull_labeled(moved)).status_code == 202
    said = f"new commits since approval ({git(fork, 'rev-parse', 'feature~1')[:7]} → "
    app.wait_comment(number, said)
    app.say(number, "/trimo retry", WRITER, pull=True)
    app.wait_for(lambda: len(app.comments(number, said)) == 2)
    app.settle()
    assert len(app.store.list_runs()) == 1


def _patch_in(body: str) -> str:
    """The `git am`-able patch offered in a tracking comment."""
    lines = body.splitlines()
    start = next(i for i, line in enumerate(lines) if line.endswith("diff") and "`" in line)
    end = next(i for i in range(start + 1, len(lines)) if lines[i] == lines[start][:-4])
    return "\n".join(lines[start + 1 : end]) + "\n"


def test_a_fork_pr_without_edits_is_pushed_nowhere_and_offered_as_a_patch(app: App) -> None:
    pull, head = _fork_pull(app, "Feature from a fork")
    base_branches = _branches(app.remote)
    fork_branches = _branches(_fork(app))
    run_id = _approved_run(app, pull)
    assert app.wait_finished(run_id) == RunState.SUCCEEDED
    assert _branches(app.remote) == base_branches
    assert _branches(_fork(app)) == fork_branches

    body = app.tracking(run_id)
    assert "**Not pushed:** the pull request does not allow edits from maintainers" in body
    clone = app.tmp / "reviewer"
    subprocess.run(["git", "clone", "-q", "-b", "feature", str(_fork(app)), str(clone)], check=True)
    assert git(clone, "rev-parse", "HEAD") == head
    applied = subprocess.run(
        ["git", "am", "-q"], cwd=clone, input=_patch_in(body), text=True, capture_output=True
    )
    assert applied.returncode == 0, applied.stderr
    assert git(clone, "log", "-1", "--format=%s") == "Fix the bug"
    assert git(clone, "rev-parse", "HEAD~1") == head
    assert (clone / "fix.txt").read_text() == f"fixed by {run_id}\n"
    # The patch is kept with the run, and the check run sits on the PR's head.
    kept = Path(str((app.store.get_run(run_id).report or {})["patch_path"]))
    assert kept.read_text() == _patch_in(body)
    assert [(c["head_sha"], c["conclusion"]) for c in app.fake.check_runs.values()] == [
        (head, "success")
    ]


def test_new_commits_after_approval_refuse_the_run_before_any_container(app: App) -> None:
    pull, approved = _fork_pull(app, "Feature from a fork")
    number = pull["number"]
    first = _approved_run(app, pull)
    assert app.wait_finished(first) == RunState.SUCCEEDED

    # The fork moves on; GitHub's API still shows the approved head for a moment.
    moved = _fork_push(app, number, "Sneaky change", api=False)
    app.say(number, "/trimo retry", WRITER, pull=True)
    app.wait_for(lambda: len(app.store.list_runs()) == 2)
    second = app.store.list_runs()[0].id
    assert app.wait_finished(second) == RunState.REJECTED
    message = f"new commits since approval ({approved[:7]} → {moved[:7]}): /trimo approve again"
    assert message in app.tracking(second)
    assert app.store.get_run(second).container_id is None
    assert app.containers(second) == []

    # Once the API shows the new head too, a retry is refused before a run is even queued.
    app.fake.pulls[(REPO, number)]["head"]["sha"] = moved
    app.say(number, "/trimo retry", WRITER, pull=True)
    app.wait_comment(number, message)
    app.settle()
    assert len(app.store.list_runs()) == 2


# ---- GitHub failing, rate limits, GHES --------------------------------------------------------


def test_a_502_on_the_tracking_comment_is_retried_into_exactly_one_comment(app: App) -> None:
    app.fake.fail_next("POST", r"^/repos/octo/sample/issues/\d+/comments$", 502)
    issue = _label(app, "Flaky GitHub")
    app.wait_for(lambda: app.store.list_runs())
    run_id = app.store.list_runs()[0].id
    assert app.wait_finished(run_id) == RunState.SUCCEEDED
    posts = app.fake.requests_to("POST", rf"/issues/{issue['number']}/comments$")
    assert len(posts) == 2  # the 502, then the 201
    assert len(app.comments(issue["number"], "trimo:run=")) == 1
    assert "succeeded" in app.tracking(run_id)


def test_a_502_after_github_posted_the_comment_does_not_post_it_twice(app: App) -> None:
    app.fake.fail_next("POST", r"^/repos/octo/sample/issues/\d+/comments$", 502, apply=True)
    issue = _label(app, "Flaky GitHub")
    app.wait_for(lambda: app.store.list_runs())
    run_id = app.store.list_runs()[0].id
    assert app.wait_finished(run_id) == RunState.SUCCEEDED
    assert len(app.fake.requests_to("POST", rf"/issues/{issue['number']}/comments$")) == 1
    assert len(app.comments(issue["number"], "trimo:run=")) == 1
    assert "succeeded" in app.tracking(run_id)


def test_a_secondary_rate_limit_is_waited_out_as_retry_after_says(app: App) -> None:
    app.fake.fail_next("POST", r"/check-runs$", 403, headers={"retry-after": "1"})
    _label(app, "Rate limited")
    app.wait_for(lambda: app.store.list_runs())
    run_id = app.store.list_runs()[0].id
    assert app.wait_finished(run_id) == RunState.SUCCEEDED
    # The check run goes on the pushed commit as the run finishes: its retry follows.
    app.wait_for(lambda: app.fake.check_runs)
    first, second, *rest = app.fake.requests_to("POST", r"/check-runs$")
    assert second.at - first.at >= 1.0
    assert second.json == first.json  # the same create, sent again
    assert rest == []
    assert [c["conclusion"] for c in app.fake.check_runs.values()] == ["success"]


@pytest.mark.parametrize("app", [GHES_API], indirect=True)
def test_on_github_enterprise_server_every_request_goes_there(app: App) -> None:
    assert app.fake.base_url == GHES_API
    issue = _label(app, "Fix the bug")
    app.wait_for(lambda: app.store.list_runs())
    run_id = app.store.list_runs()[0].id
    assert app.wait_finished(run_id) == RunState.SUCCEEDED
    # Tokens, permission, comment, check run and PR all went to the GHES API ...
    assert app.fake.token_requests
    for method, path in [
        ("GET", r"/collaborators/.+/permission$"),
        ("POST", r"/issues/\d+/comments$"),
        ("POST", r"/check-runs$"),
        ("POST", r"/pulls$"),
    ]:
        assert app.fake.requests_to(method, path), (method, path)
    # ... and none to api.github.com (the fake records any as a violation; the fixture checks).
    assert not app.fake.violations
    body = app.tracking(run_id)
    assert f"https://ghe.example.test/{REPO}/tree/trimo/{issue['number']}-fix-the-bug" in body
    assert "https://github.com" not in body
    assert [c["conclusion"] for c in app.fake.check_runs.values()] == ["success"]


# ---- secrets -----------------------------------------------------------------------------------


def test_tokens_and_secrets_never_reach_logs_events_requests_or_the_agent(
    app: App, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    issue = _label(app, "Show me the environment", body="Run with PRINTENV please.")
    app.wait_for(lambda: app.store.list_runs())
    run_id = app.store.list_runs()[0].id
    assert app.wait_finished(run_id) == RunState.SUCCEEDED
    app.say(issue["number"], "/trimo status")
    app.wait_comment(issue["number"], f"Run {run_id}:")
    app.settle()

    tokens = list(app.fake.tokens)
    assert tokens and all(t.startswith("ghs_") for t in tokens)
    key_lines = [line for line in app.fake.private_key.splitlines() if "-----" not in line]
    canaries = [*tokens, SECRET, *key_lines]

    logs = [r.getMessage() + (r.exc_text or "") for r in caplog.records]
    assert any("installation token" in line for line in logs)  # DEBUG and INFO were captured
    events = [json.dumps([e.kind, e.message, e.data]) for e in app.store.events(run_id)]
    bodies = [json.dumps(r.json) for r in app.fake.requests if r.json is not None]
    for where, texts in [("log records", logs), ("run events", events), ("requests", bodies)]:
        for canary in canaries:
            assert not any(canary in text for text in texts), f"a secret is in the {where}"

    # The agent printed its whole environment: no token there, not even a masked one.
    env = [e.message for e in app.store.events(run_id, kinds=["log"])]
    assert any(line.startswith("TRIMO_RUN_ID=") for line in env), env
    assert not any("ghs_" in line or "***" in line for line in env)


# ---- check run Re-run --------------------------------------------------------------------------


def test_re_run_on_trimos_check_run_retries_the_pipeline_and_others_are_ignored(
    app: App,
) -> None:
    issue = _label(app, "Fix the bug", body="It is broken.")
    app.wait_for(lambda: app.store.list_runs())
    first = app.store.list_runs()[0]
    assert app.wait_finished(first.id) == RunState.SUCCEEDED
    # Re-run works from the run's check run, on the commit it pushed.
    check = list(app.fake.check_runs.values())[-1]

    rerun = _rerequested(app, check["id"], check["head_sha"], app.fake.app_id)
    assert app.deliver("check_run", rerun).status_code == 202
    app.wait_for(lambda: len(app.store.list_runs()) == 2)
    second = app.store.list_runs()[0]
    assert second.pipeline_id == first.pipeline_id
    assert second.trigger == "check_run" and second.task == first.task
    assert app.wait_finished(second.id) == RunState.SUCCEEDED
    branch = app.store.get_pipeline(first.pipeline_id).branch
    assert git(app.remote, "rev-list", "--count", f"main..{branch}") == "2"
    assert len(app.comments(issue["number"], "trimo:run=")) == 2
    assert "succeeded" in app.tracking(second.id)

    # Another App's check run, or a check run Trimo never made: nothing happens.
    comments = len(app.fake.comments)
    other = _rerequested(app, check["id"], check["head_sha"], app.fake.app_id + 1)
    assert app.deliver("check_run", other).status_code == 200
    unknown = _rerequested(app, 99, check["head_sha"], app.fake.app_id)
    app.deliver("check_run", unknown)
    app.settle()
    assert len(app.store.list_runs()) == 2
    assert len(app.fake.comments) == comments
    assert len(app.fake.check_runs) == 2  # one per run, on the commit each pushed: no third run


# ---- comment commands --------------------------------------------------------------------------


def test_test_status_help_and_unknown_commands_and_bots_are_ignored(app: App) -> None:
    issue = app.fake.add_issue(REPO, title="Only the tests")
    number = issue["number"]
    app.say(number, "/trimo test")
    app.wait_for(lambda: app.store.list_runs())
    run = app.store.list_runs()[0]
    assert run.mode == RunMode.TESTS
    assert app.wait_finished(run.id) == RunState.SUCCEEDED
    body = app.tracking(run.id)
    assert "2 passed" in body and "1 skipped" in body
    # No agent ran: nothing was committed, so no branch and no PR.
    assert app.store.get_run(run.id).commits in (None, 0)
    assert git(app.remote, "branch", "--list", "trimo/*") == ""
    assert app.fake.pulls == {}

    app.say(number, "/trimo status")
    status = app.wait_comment(number, f"Run {run.id}:")
    assert "**succeeded**" in status

    app.say(number, "/trimo help")
    help_text = app.wait_comment(number, "Trimo understands these commands")
    assert "`/trimo retry`" in help_text and "Unknown command" not in help_text

    app.say(number, "/trimo rety")
    unknown = app.wait_comment(number, "Unknown command `/trimo rety`")
    assert "Did you mean `/trimo retry`?" in unknown and "Trimo understands" in unknown

    # Comments by bots are never commands, whether the type or the login says so.
    before = len(app.fake.comments)
    bot = _comment_payload(number, "/trimo retry", "some-ci[bot]")
    bot["sender"]["type"] = "Bot"
    assert app.deliver("issue_comment", bot).status_code == 200
    itself = _comment_payload(number, "/trimo retry", "trimo[bot]")
    assert app.deliver("issue_comment", itself).status_code == 200
    app.settle()
    assert len(app.store.list_runs()) == 1
    assert len(app.fake.comments) == before


# ---- runs that end early -----------------------------------------------------------------------


def test_a_new_trigger_supersedes_the_live_run_and_its_report_says_so(app: App) -> None:
    issue = app.fake.add_issue(REPO, title="Superseded")
    number = issue["number"]
    app.say(number, "/trimo run work SLOWLY please")
    old = app.live_run(RunState.AGENT)

    app.say(number, "/trimo retry")
    app.wait_for(lambda: len(app.store.list_runs()) == 2)
    new = app.store.list_runs()[0].id
    assert app.wait_finished(old, timeout=60) == RunState.CANCELLED
    assert app.store.get_run(old).reason == f"superseded by run {new}"
    assert app.wait_finished(new) == RunState.SUCCEEDED
    app.wait_for(lambda: "was cancelled" in app.tracking(old))
    assert f"Superseded by run #{new}" in app.tracking(old)
    assert "succeeded" in app.tracking(new)
    assert app.containers(old) == [] and app.containers(new) == []
    # The old run pushed nothing: no check run; the new one's sits on the commit it pushed.
    assert [c["conclusion"] for c in app.fake.check_runs.values()] == ["success"]


def test_closing_the_issue_cancels_its_live_run(app: App) -> None:
    _label(app, "Closed soon", body="Work SLOWLY on this.")
    run_id = app.live_run(RunState.AGENT)
    run = app.store.get_run(run_id)
    number = app.store.get_pipeline(run.pipeline_id).number or 0
    data = retarget(payload("issues.labeled.json"), number, "Closed soon")
    data["action"] = "closed"
    data["issue"]["state"] = "closed"
    del data["label"]
    assert app.deliver("issues", data).status_code == 202
    assert app.wait_finished(run_id, timeout=60) == RunState.CANCELLED
    app.wait_for(lambda: "was cancelled" in app.tracking(run_id))
    assert "**Why:** the issue was closed" in app.tracking(run_id)
    assert app.containers(run_id) == []
    assert app.fake.check_runs == {}


# ---- what went wrong, in the report ------------------------------------------------------------


def _set_config(app: App, config: str) -> None:
    """A maintainer pushes a new `.trimo/config.yml` to the default branch."""
    work = app.remote.parent / "maintainer"
    subprocess.run(["git", "clone", "-q", str(app.remote), str(work)], check=True)
    (work / ".trimo" / "config.yml").write_text(config)
    git(work, "commit", "-qam", "Change Trimo's configuration")
    git(work, "push", "-q", "origin", "HEAD:main")


def test_invalid_config_is_reported_by_field_and_nothing_runs(app: App) -> None:
    _set_config(app, CONFIG + "resources:\n  memory: lots\n")
    _label(app, "Anything")
    app.wait_for(lambda: app.store.list_runs())
    run_id = app.store.list_runs()[0].id
    assert app.wait_finished(run_id) == RunState.ERROR
    body = app.tracking(run_id)
    assert ".trimo/config.yml: resources.memory" in body
    assert "512m or 4g" in body  # what would be valid
    assert app.store.get_run(run_id).container_id is None


def test_failing_tests_are_named_with_their_last_lines_and_annotated(app: App) -> None:
    junit = (
        '<testsuite name="t"><testcase classname="t" name="test_total" file="shop/cart.py" '
        'line="12"><failure message="expected 2, got 3">AssertionError</failure></testcase>'
        '<testcase classname="t" name="test_empty"/></testsuite>'
    )
    _set_config(
        app,
        CONFIG.split("test:", maxsplit=1)[0]
        + (
            "test:\n"
            "  command: |\n"
            f"    echo '{junit}' > \"$TRIMO_OUT/junit.xml\"\n"
            "    echo 'E   AssertionError: expected 2, got 3 ``` not a fence'\n"
            "    exit 1\n"
            "  junit: junit.xml\n"
        ),
    )
    issue = _label(app, "Cart totals")
    app.wait_for(lambda: app.store.list_runs())
    run_id = app.store.list_runs()[0].id
    assert app.wait_finished(run_id) == RunState.FAILED
    body = app.tracking(run_id)
    assert "1 passed" in body and "1 failed" in body
    assert "test_total" in body and "expected 2, got 3" in body
    assert "<summary>Last lines</summary>" in body
    assert "E   AssertionError: expected 2, got 3 ``` not a fence" in body
    assert "````" in body  # the fence is longer than any backtick run inside it
    # The agent's commit is still pushed; its check run says failure and points at the line.
    pushed = [c for c in app.fake.check_runs.values() if c["conclusion"] == "failure"]
    assert pushed and all(c["status"] == "completed" for c in pushed)
    annotated = [
        r.json
        for r in app.fake.requests_to("PATCH", r"/check-runs/\d+$")
        if r.json and r.json.get("output", {}).get("annotations")
    ]
    annotated += [
        r.json
        for r in app.fake.requests_to("POST", r"/check-runs$")
        if r.json and r.json.get("output", {}).get("annotations")
    ]
    notes = [a for body_ in annotated for a in body_["output"]["annotations"]]
    assert {(a["path"], a["start_line"]) for a in notes} == {("shop/cart.py", 12)}
    assert app.comments(issue["number"], "trimo:run=")


def test_a_report_the_agent_planted_never_reaches_the_comment_or_the_check_run(app: App) -> None:
    _set_config(
        app,
        "agent:\n"
        "  command: >-\n"
        f"    echo '{JUNIT}' > \"$TRIMO_OUT/junit.xml\";\n"
        "    echo 'All tests pass.' > \"$TRIMO_SUMMARY_FILE\";\n"
        "    echo x >> fix.txt && git add fix.txt && git commit -qm 'Fix the bug'\n"
        "test:\n"
        "  command: echo 'tests ran, report went elsewhere'\n"
        "  junit: junit.xml\n",
    )
    _label(app, "Make it green")
    app.wait_for(lambda: app.store.list_runs())
    run_id = app.store.list_runs()[0].id
    assert app.wait_finished(run_id) == RunState.SUCCEEDED
    body = app.tracking(run_id)
    assert "**Tests:** no test report (the test command exited 0" in body
    assert "passed" not in body
    assert "**Summary from the agent** (its own words, not checked by Trimo):" in body
    outputs = [
        r.json["output"]
        for r in [
            *app.fake.requests_to("POST", r"/check-runs$"),
            *app.fake.requests_to("PATCH", r"/check-runs/\d+$"),
        ]
        if r.json and r.json.get("status") == "completed"
    ]
    assert outputs and {o["title"] for o in outputs} == {"Tests: no test report (exit 0)"}
    assert not any("passed" in o["title"] + o["summary"] for o in outputs)


LEAKED = "ghp_leakCanary0123456789abcdefXYZ"


def test_a_commit_carrying_a_granted_secret_is_never_pushed_and_the_report_names_it(
    app: App, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("TRIMO_SECRET_DEPLOY_TOKEN", LEAKED)
    _set_config(
        app,
        "agent:\n"
        "  secrets: [DEPLOY_TOKEN]\n"
        "  command: >-\n"
        '    echo "$DEPLOY_TOKEN" > leaked.txt && git add leaked.txt &&\n'
        "    git commit -qm 'Add the deploy config' && exit 1\n",
    )
    before = git(app.remote, "for-each-ref")
    issue = _label(app, "Deploy it")
    app.wait_for(lambda: app.store.list_runs())
    run_id = app.store.list_runs()[0].id
    assert app.wait_finished(run_id) == RunState.REJECTED
    assert git(app.remote, "for-each-ref") == before  # nothing reached the repository
    assert app.fake.pulls == {}
    head = app.store.get_run(run_id).report["result"]["head"]  # type: ignore[index]
    body = app.tracking(run_id)
    assert "Trimo run #" in body and "was not published" in body
    assert f"secret DEPLOY_TOKEN (commit {head[:12]}, added line leaked.txt line 1)" in body
    # An issue run that pushed nothing reports in its comment alone: no check run anywhere.
    assert app.fake.check_runs == {}
    texts = [
        *(json.dumps(r.json) + r.path for r in app.fake.requests),
        *(r.getMessage() + (r.exc_text or "") for r in caplog.records),
        *(json.dumps([e.kind, e.message, e.data]) for e in app.store.events(run_id)),
    ]
    assert not any(LEAKED in text for text in texts)
    assert issue["number"]


# ---- installations -----------------------------------------------------------------------------


def test_installation_events_record_installations_and_their_repositories(app: App) -> None:
    created = payload("installation.created.json")
    added = payload("installation_repositories.added.json")
    assert app.deliver("installation", created).status_code == 202
    assert app.deliver("installation_repositories", added).status_code == 202
    app.settle()
    assert app.store.installation_for_repo("Codertocat/Hello-World") == 957387
    assert app.store.installation_for_repo("Codertocat/Space") == 957387
    assert app.store.installation_for_repo("someone/else") is None

    # The real `deleted` example is another installation (2): nothing of 957387 is touched.
    assert app.deliver("installation", payload("installation.deleted.json")).status_code == 202
    app.settle()
    assert app.store.installation_for_repo("Codertocat/Hello-World") == 957387
    # Derived from it: the App uninstalled from Codertocat.
    gone = copy.deepcopy(payload("installation.deleted.json"))
    gone["installation"] = created["installation"]
    assert app.deliver("installation", gone).status_code == 202
    app.settle()
    assert app.store.installation_for_repo("Codertocat/Hello-World") is None
    assert not app.fake.requests  # nothing of this needed GitHub's API


# ---- secrets granted per repository ------------------------------------------------------------

CANARY = "canary-4b1d7f-value-of-the-servers-own-environment"


def test_a_secret_only_in_the_servers_environment_is_refused_and_goes_nowhere(
    app: App, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    # Set in the environment of the process serving GitHub, as any server variable would be.
    monkeypatch.setenv("DEPLOY_KEY", CANARY)
    _set_config(app, CONFIG.replace("agent:\n", "agent:\n  secrets: [DEPLOY_KEY]\n", 1))
    issue = _label(app, "Use the deploy key")
    app.wait_for(lambda: app.store.list_runs())
    run_id = app.store.list_runs()[0].id
    assert app.wait_finished(run_id) == RunState.REJECTED
    run = app.store.get_run(run_id)
    assert run.container_id is None and app.containers(run_id) == []
    assert run.image_tag is None  # refused before the image, whose build runs containers too
    body = app.tracking(run_id)
    assert "was not started" in body
    assert "secret DEPLOY_KEY" in body and "[secrets.DEPLOY_KEY]" in body
    assert f'repos = ["{REPO}"]' in body
    assert app.comments(issue["number"], "DEPLOY_KEY")

    logs = [r.getMessage() + (r.exc_text or "") for r in caplog.records]
    bodies = [json.dumps(r.json) for r in app.fake.requests if r.json is not None]
    bodies += [json.dumps(r.query) for r in app.fake.requests]
    events = [json.dumps([e.kind, e.message, e.data]) for e in app.store.events(run_id)]
    rows = [repr(app.store.get_run(r.id)) for r in app.store.list_runs()]
    for where, texts in [("log", logs), ("requests", bodies), ("events", events), ("runs", rows)]:
        assert not any(CANARY in text for text in texts), f"the canary is in the {where}"
    # Not a byte of it anywhere in the database files either.
    for db in (app.tmp / "data").glob("trimo.db*"):
        assert CANARY.encode() not in db.read_bytes(), db


# ---- commands: permission and the refusal limit --------------------------------------------------


def test_fifty_status_commands_from_a_reader_get_one_refusal_even_across_a_restart(
    app: App, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    issue = app.fake.add_issue(REPO, title="Flooded")
    number = issue["number"]
    for n in range(50):
        app.say(number, "/trimo help" if n % 10 == 9 else "/trimo status", READER)
    app.settle()
    mine = app.comments(number)
    assert len(mine) == 1
    assert f"@{READER} Trimo runs only for people with **write**" in mine[0]
    assert app.fake.reactions == []
    assert sum("already told within the hour" in r.getMessage() for r in caplog.records) == 49

    # A restarted worker remembers: the store says the reader was told within the hour.
    restarted = GitHubService(app.service.settings, app.store, app.service.auth, write_interval=0)
    restarted.handle(
        StatusIntent(
            repo=REPO,
            installation_id=1,
            sender=READER,
            sender_type="User",
            delivery_id="after-restart",
            kind=PipelineKind.ISSUE,
            number=number,
        )
    )
    assert len(app.comments(number)) == 1
    # A writer is answered as always.
    app.say(number, "/trimo status", WRITER)
    app.wait_comment(number, "No Trimo run on this issue yet")


FLOOD_REPO = "octo/flood"


@pytest.mark.parametrize("app", [{"write_interval": 0.05}], indirect=True)
def test_a_flood_of_commands_on_one_installation_does_not_delay_anothers_reports(
    app: App,
) -> None:
    app.fake.add_repo(FLOOD_REPO, installation_id=2)
    flooded = app.fake.add_issue(FLOOD_REPO, title="Busy")
    for _ in range(200):
        comment = app.fake.add_comment(FLOOD_REPO, flooded["number"], "/trimo status", user=WRITER)
        data = _comment_payload(flooded["number"], "/trimo status", WRITER)
        data["repository"]["full_name"] = FLOOD_REPO
        data["repository"]["name"] = "flood"
        data["installation"]["id"] = 2
        data["comment"]["id"] = comment["id"]
        assert app.deliver("issue_comment", data).status_code == 202

    def answered() -> int:
        comments = app.fake.comments_on(FLOOD_REPO, flooded["number"])
        return len([c for c in comments if c["user"]["type"] == "Bot"])

    # Each flood command costs two writes 50 ms apart: its installation is busy for 20 s.
    app.wait_for(lambda: answered() > 0)
    issue = _label(app, "Meanwhile elsewhere")
    labelled = time.monotonic()
    app.wait_for(lambda: app.comments(issue["number"], "trimo:run="), timeout=10)
    posted = app.fake.requests_to("POST", rf"^/repos/{REPO}/issues/{issue['number']}/comments$")
    assert posted[0].at - labelled < 2.0
    run_id = app.store.list_runs()[0].id
    app.wait_for(lambda: app.store.get_run(run_id).finished, timeout=120)
    finished = time.monotonic()
    app.wait_for(lambda: "succeeded" in app.tracking(run_id), timeout=10)
    assert time.monotonic() - finished < 2.0
    assert answered() < 200  # the flood was still being answered all along
    app.wait_for(lambda: answered() == 200, timeout=60)


# ---- fresh tokens ------------------------------------------------------------------------------


@pytest.mark.parametrize("app", [{"git_http": True}], indirect=True)
def test_a_run_outliving_its_first_token_pushes_with_a_renewed_one(app: App) -> None:
    assert app.git_http is not None
    _set_config(app, CONFIG.replace("sleep 300", "sleep 3"))
    issue = _label(app, "Takes a while", body="Work SLOWLY.")
    app.wait_for(lambda: app.store.list_runs())
    run_id = app.store.list_runs()[0].id
    app.wait_for(lambda: app.store.get_run(run_id).state in (RunState.AGENT, *FINISHED), 60)
    assert app.store.get_run(run_id).state == RunState.AGENT, app.store.get_run(run_id).reason
    first = set(app.fake.tokens)
    # An hour and more passes on GitHub's clock: every token the run started with is dead.
    app.clock_offset[0] += 3700
    assert first and not any(app.fake.token_valid(t) for t in first)
    assert app.wait_finished(run_id) == RunState.SUCCEEDED, app.store.get_run(run_id).reason
    branch = app.store.get_pipeline(app.store.get_run(run_id).pipeline_id).branch
    assert git(app.remote, "log", "-1", "--format=%s", branch) == "Fix the bug"
    [(token, status)] = app.git_http.pushes
    assert status == 200 and token not in first and app.fake.token_valid(token)
    # The reports after the jump went out with renewed tokens too (the fake refuses dead ones).
    assert "succeeded" in app.tracking(run_id)
    assert app.comments(issue["number"], "trimo:run=")


@pytest.mark.parametrize("app", [{"git_http": True}], indirect=True)
def test_a_401_on_push_is_retried_once_with_a_new_token(app: App) -> None:
    assert app.git_http is not None
    app.git_http.refuse_pushes = 1
    _label(app, "Refused once")
    app.wait_for(lambda: app.store.list_runs())
    run_id = app.store.list_runs()[0].id
    assert app.wait_finished(run_id) == RunState.SUCCEEDED, app.store.get_run(run_id).reason
    (refused, first_status), (renewed, second_status) = app.git_http.pushes
    assert (first_status, second_status) == (401, 200)
    assert refused != renewed
    assert len(app.store.get_run(run_id).report["commits"]) == 1  # type: ignore[index]
