"""The GitHub side of the worker kill rounds (tests/fleet.py): GitHub-triggered runs whose
workers die while their reports go out.

The fake GitHub (tests/github_fake.py) is served on a real socket, as a GitHub Enterprise Server
at http://127.0.0.1:<port>/api/v3, so that `trimo worker` processes reach it; the webhook
receiver runs in this process on a socket of its own, and each round's issue is labelled
`trimo` through it, as GitHub would deliver it. A local bare repository per round plays the
git remote. A write to GitHub can be held on its way in (`Gate`): the worker that sends it is
killed while GitHub has it, and GitHub then acts on it with no one left to hear the answer, as
a crash between GitHub's work and the store would leave it.

After the rounds, `audit` says what GitHub shows: one tracking comment per run, one check run
per run and kind, every check run completed, one pull request per pipeline, no request the
OpenAPI description rejects.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import hmac
import json
import logging
import re
import subprocess
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker
import requests
from werkzeug.serving import make_server

from bot.settings import Settings
from bot.states import PipelineKind
from bot.store import Run, Store
from bot.store.outbox import Outbox, ReportState
from tests.conftest import GITHUB_FIXTURES
from tests.containers import git
from tests.fleet import (
    Fleet,
    Round,
    in_phase,
    kill_bound,
    killed_round,
    phase_repo,
    wait_until,
)
from tests.github_fake import FakeGitHub

OWNER = "octo"
SECRET = "webhook-secret-for-kill-rounds"
WRITER = "Codertocat"
# Longest a held write waits for its release: a round that never releases it still ends.
HOLD_SECONDS = 60
# The writes a publish round may kill its worker in, as the run's end goes out to GitHub.
HELD_WRITES = (("POST", r"/pulls$"), ("POST", r"/check-runs$"))


@dataclass
class Hold:
    """One write to GitHub, held on arrival until released."""

    method: str
    path: re.Pattern[str]
    arrived: threading.Event = field(default_factory=threading.Event)
    released: threading.Event = field(default_factory=threading.Event)


class Gate:
    """WSGI middleware before the fake: holds the first request that matches each armed
    `Hold`; GitHub acts on it once it is released, whoever still waits for the answer."""

    def __init__(self, app: Callable[..., list[bytes]]) -> None:
        self.app = app
        self._holds: list[Hold] = []
        self._lock = threading.Lock()

    def hold(self, method: str, path_regex: str) -> Hold:
        hold = Hold(method, re.compile(path_regex))
        with self._lock:
            self._holds.append(hold)
        return hold

    def release_all(self) -> None:
        with self._lock:
            holds, self._holds = self._holds, []
        for hold in holds:
            hold.released.set()

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        method, path = environ["REQUEST_METHOD"], environ.get("PATH_INFO", "")
        with self._lock:
            hold = next(
                (
                    h
                    for h in self._holds
                    if not h.arrived.is_set() and h.method == method and h.path.search(path)
                ),
                None,
            )
            if hold is not None:
                hold.arrived.set()
        if hold is not None:
            hold.released.wait(HOLD_SECONDS)
        return self.app(environ, start_response)


@dataclass
class GitHub:
    """The served fake, its gate, the webhook receiver's URL and the remotes' folder."""

    fake: FakeGitHub
    gate: Gate
    receiver_url: str
    remotes: Path
    settings: Settings

    def worker_env(self) -> dict[str, str]:
        """What a `trimo worker` needs to act as this GitHub App."""
        return {
            "TRIMO_APP_ID": str(self.fake.app_id),
            "TRIMO_PRIVATE_KEY": self.fake.private_key,
            "TRIMO_WEBHOOK_SECRET": SECRET,
            "TRIMO_API_URL": self.fake.base_url,
            "TRIMO_WEB_URL": self.fake.web_url,
            "TRIMO_GIT_URL": str(self.remotes / "{repo}.git"),
        }

    def deliver(self, event: str, data: dict[str, Any]) -> None:
        body = json.dumps(data).encode()
        signature = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
        response = requests.post(
            f"{self.receiver_url}/webhooks/github",
            data=body,
            timeout=10,
            headers={
                "Content-Type": "application/json",
                "X-GitHub-Event": event,
                "X-GitHub-Delivery": str(uuid.uuid4()),
                "X-Hub-Signature-256": signature,
            },
        )
        assert response.status_code == 202, response.text


@contextmanager
def served_github(data_dir: Path, database_url: str, store: Store) -> Iterator[GitHub]:
    """The fake GitHub and the webhook receiver on sockets of this machine, until closed."""
    # A line per request to GitHub and per webhook would bury the rounds' own.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = make_server("127.0.0.1", 0, lambda e, s: [], threaded=True)
    remotes = data_dir.parent / "remotes"
    remotes.mkdir(parents=True, exist_ok=True)
    with FakeGitHub(f"http://127.0.0.1:{server.server_port}/api/v3") as fake:
        gate = Gate(fake.wsgi)
        server.app = gate
        fake.set_permission(WRITER, "write")
        settings = Settings(
            data_dir=data_dir,
            database_url=database_url,
            app_id=fake.app_id,
            private_key=fake.private_key,
            webhook_secrets=[SECRET],
            api_url=fake.base_url,
            web_url=fake.web_url,
            git_url=str(remotes / "{repo}.git"),
        )
        from webhooks.app import create_app

        receiver = make_server("127.0.0.1", 0, create_app(settings, store), threaded=True)
        threads = [
            threading.Thread(target=s.serve_forever, args=(0.05,), daemon=True)
            for s in (server, receiver)
        ]
        for t in threads:
            t.start()
        try:
            yield GitHub(fake, gate, f"http://127.0.0.1:{receiver.server_port}", remotes, settings)
        finally:
            gate.release_all()
            receiver.shutdown()
            server.shutdown()
            for t in threads:
                t.join(timeout=10)


def _payload(name: str, repo: str, number: int) -> dict[str, Any]:
    """A recorded webhook payload pointed at `repo`'s issue `number`, sent by the writer."""
    data: dict[str, Any] = json.loads((GITHUB_FIXTURES / "webhooks" / f"{name}.json").read_text())
    data = copy.deepcopy(data)
    owner, short = repo.split("/")
    data["repository"]["full_name"] = repo
    data["repository"]["name"] = short
    data["repository"]["owner"]["login"] = owner
    data["installation"] = {"id": 1, "node_id": "MDIzOkluc3RhbGxhdGlvbjE="}
    data["issue"]["number"] = number
    data["sender"]["login"] = WRITER
    data["sender"]["type"] = "User"
    return data


def github_phase_repo(github: GitHub, work: Path, phase: str, token: str) -> str:
    """A repository on GitHub (its remote a local bare one) whose run spends a few seconds in
    `phase`, as tests.fleet.phase_repo makes for a local run; returns its full name."""
    repo = f"{OWNER}/{work.name}"
    _, agent = phase_repo(work, phase, token)
    config = work / ".trimo" / "config.yml"
    config.parent.mkdir(exist_ok=True)
    # Each run commits something new: the pipeline's next run has a commit to push too.
    command = f'{agent} && echo "$TRIMO_RUN_ID" >> runs.txt && git add -A && git commit -qm Work'
    config.write_text(f"agent:\n  command: {json.dumps(command)}\n")
    git(work, "add", "-A")
    git(work, "commit", "-qm", "Trimo's settings")
    remote = github.remotes / f"{repo}.git"
    remote.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["git", "clone", "-q", "--bare", str(work), str(remote)], check=True)
    hook = work / ".git" / "hooks" / "pre-receive"
    if hook.exists():
        # The push to GitHub takes a while: that is where a publish round kills.
        hook.rename(remote / "hooks" / "pre-receive")
    github.fake.add_repo(repo)
    return repo


def _run_of(store: Store, repo: str, after: int = 0) -> Run | None:
    for run in store.list_runs():
        if run.id > after and store.get_pipeline(run.pipeline_id).repo == repo:
            return run
    return None


def label_issue(github: GitHub, store: Store, repo: str, title: str) -> tuple[int, Run]:
    """Open an issue on `repo` and label it `trimo` through the webhook; returns its number
    and the run the delivery queued."""
    issue = github.fake.add_issue(repo, title=title, body="Do the work.")
    data = _payload("issues.labeled", repo, issue["number"])
    data["issue"]["title"] = title
    data["label"]["name"] = "trimo"
    github.deliver("issues", data)
    run = wait_until(f"the run of {repo}", lambda: _run_of(store, repo), 60, 0.05)
    return issue["number"], run


def retry_issue(github: GitHub, store: Store, repo: str, number: int, after: int) -> Run:
    """The writer comments `/trimo retry` on the issue: the pipeline's next run."""
    body = "/trimo retry"
    comment = github.fake.add_comment(repo, number, body, user=WRITER)
    data = _payload("issue_comment.created", repo, number)
    data["comment"]["body"] = body
    data["comment"]["id"] = comment["id"]
    data["comment"]["user"]["login"] = WRITER
    github.deliver("issue_comment", data)
    return wait_until(f"the next run of {repo}", lambda: _run_of(store, repo, after), 60, 0.05)


def github_kill_round(
    fleet: Fleet,
    store: Store,
    client: docker.DockerClient,
    github: GitHub,
    work: Path,
    phase: str,
    held: tuple[str, str] | None = None,
) -> Round:
    """tests.fleet.kill_round for a run of a labelled issue. A publish round with `held` (a
    method and path of HELD_WRITES) kills the worker while GitHub holds that write of the
    run's end, instead of in the push."""
    token = uuid.uuid4().hex[:12]
    repo = github_phase_repo(github, work, phase, token)
    hold = github.gate.hold(held[0], rf"/repos/{repo}{held[1][:-1]}$") if held else None
    number, run = label_issue(github, store, repo, f"Round {token}")
    if hold is not None:
        wait_until(
            f"run {run.id}'s {held} under way",
            # The run ends before its end's reports go: only all of them sent says it is missed.
            lambda: hold.arrived.is_set() or reports_settled(store, [run.id]),
            120,
            0.02,
        )
        if not hold.arrived.is_set():
            ended = store.get_run(run.id)
            raise AssertionError(
                f"run {run.id} ended {ended.state.value} ({ended.reason}) and reported without"
                f" {held}: {outbox_of(store, run.id)}"
            )
        owner = store.get_run(run.id).worker_id
        victim = next((n for n, p in fleet.procs.items() if owner and f":{p.pid}:" in owner), None)
    else:
        wait_until(
            f"run {run.id} in {phase}", lambda: in_phase(store, run, phase, token), 120, 0.02
        )
        victim = fleet.holder(store.get_run(run.id))
    assert victim is not None, f"run {run.id} is held by {store.get_run(run.id).worker_id}"
    fleet.kill(victim)
    killed = time.monotonic()
    if hold is not None:
        hold.released.set()  # GitHub does it; the answer goes to a dead worker
    ended = killed_round(
        fleet,
        store,
        client,
        phase=phase if hold is None else f"{phase}:{held[0]} {held[1].strip('/$')}",
        run_id=run.id,
        victim=victim,
        killed=killed,
    )
    bound = kill_bound(fleet)
    try:
        wait_until(f"run {run.id}'s reports", lambda: reports_settled(store, [run.id]), bound, 0.1)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; its outbox: {outbox_of(store, run.id)}") from None
    seconds_to_reported = time.monotonic() - killed
    fleet.start(victim, other_host=fleet.other_host[victim])
    return dataclasses.replace(
        ended, repo=repo, number=number, seconds_to_reported=seconds_to_reported
    )


def reports_settled(store: Store, run_ids: list[int]) -> bool:
    """Whether every run in `run_ids` has its final tracking comment stored and GitHub took
    every report of theirs."""
    outbox = Outbox(store)
    for run_id in run_ids:
        final = outbox.get(f"run:{run_id}:comment")
        if final is None or not final.final:
            return False
        if outbox.entries(run_id=run_id, states=[ReportState.PENDING]):
            return False
    return True


def outbox_of(store: Store, run_id: int) -> list[str]:
    """What the outbox holds of a run, for a person to see why its reports did not go."""
    return [
        f"{e.report_id} {e.state} attempts={e.attempts} next at {e.next_attempt_at}: {e.last_error}"
        for e in Outbox(store).entries(run_id=run_id)
    ]


@dataclass
class Audit:
    """What GitHub shows of the runs, and each thing that is wrong with it."""

    runs: dict[int, dict[str, Any]]
    problems: list[str]


def audit(github: GitHub, store: Store, run_ids: list[int]) -> Audit:
    """Per run: its tracking comments (one), its check runs (one per kind, each completed with
    a conclusion); per pipeline: its pull requests (at most one); the spec's violations."""
    fake, problems = github.fake, []
    runs: dict[int, dict[str, Any]] = {}
    checks_by_id = Counter((c["_repo"], c["external_id"]) for c in fake.check_runs.values())
    for (repo, external_id), n in checks_by_id.items():
        if n > 1:
            problems.append(f"{repo}: {n} check runs with external_id {external_id}")
    for run_id in run_ids:
        run = store.get_run(run_id)
        pipeline = store.get_pipeline(run.pipeline_id)
        assert pipeline.kind == PipelineKind.ISSUE
        marker = f"<!-- trimo:run={run_id} -->"
        tracking = [
            c for c in fake.comments_on(pipeline.repo, pipeline.number or 0) if marker in c["body"]
        ]
        checks = [
            c
            for c in fake.check_runs.values()
            if c["_repo"] == pipeline.repo and c["external_id"].split("-")[0] == str(run_id)
        ]
        runs[run_id] = {
            "repo": pipeline.repo,
            "state": run.state.value,
            "tracking_comments": len(tracking),
            "check_runs": [f"{c['status']}/{c['conclusion']}" for c in checks],
        }
        if len(tracking) != 1:
            problems.append(f"run {run_id}: {len(tracking)} tracking comments")
        elif run.state.value not in tracking[0]["body"]:
            problems.append(f"run {run_id} ({run.state.value}): its comment does not say so")
        for c in checks:
            if c["status"] != "completed" or not c["conclusion"]:
                problems.append(f"run {run_id}: check run {c['id']} is {c['status']}")
    pulls = Counter(repo for repo, _ in fake.pulls)
    for repo, n in pulls.items():
        if n > 1:
            problems.append(f"{repo}: {n} pull requests")
    pending = Outbox(store).entries(states=[ReportState.PENDING, ReportState.FAILED])
    problems += [f"report {e.report_id} left {e.state}: {e.last_error}" for e in pending]
    problems += [f"spec violation: {v}" for v in fake.violations]
    return Audit(runs, problems)
