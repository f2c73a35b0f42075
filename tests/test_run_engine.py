"""`trimo run` end to end on the real engine: a local repository and a task in, a branch out."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import docker
import docker.errors
import pytest

from bot.runtime import LABEL_ROLE, LABEL_RUN, LABEL_STORE, engine_client
from bot.states import RunState
from bot.store import Store
from tests.containers import git, make_repo
from tests.engine_proxy import EngineProxy

pytestmark = pytest.mark.docker

CANARY = "canary-Zq9xT4-secret-value"


class Trimo:
    """Runs the real `trimo` command in a subprocess against one data directory."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.env = {**os.environ, "TRIMO_DATA_DIR": str(data_dir), "COLUMNS": "200"}

    def __call__(
        self, *args: str, timeout: float = 600, **env: str
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "bot", *args],
            env={**self.env, **env},
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def popen(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, "-m", "bot", *args],
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def store(self) -> Store:
        return Store(Store.sqlite_url(self.data_dir))


@pytest.fixture
def trimo(tmp_path: Path, base_image: str) -> Trimo:
    return Trimo(tmp_path / "data")


def light_repo(path: Path, config: str = "", extra: dict[str, str] | None = None) -> Path:
    files = {"README.md": "# light\n", **(extra or {})}
    if config:
        files[".trimo/config.yml"] = config
    make_repo(path, files)
    return path


def branches(repo: Path) -> list[str]:
    return git(repo, "for-each-ref", "--format=%(refname:short)", "refs/heads/").split()


def containers_of(client: docker.DockerClient, store: Store, run_id: int) -> list[object]:
    """The containers of run `run_id` of `store` (run ids repeat across stores)."""
    labels = [f"{LABEL_RUN}={run_id}", f"{LABEL_STORE}={store.key}"]
    return client.containers.list(all=True, filters={"label": labels})


def wait_for_state(store: Store, run_id: int, state: RunState, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if store.get_run(run_id).state == state:
                return
        except Exception:  # noqa: BLE001 - the run may not exist yet
            pass
        time.sleep(0.2)
    raise AssertionError(f"run {run_id} never reached {state}")


def test_timeout_checkpoints_and_pushes_the_work(
    trimo: Trimo, tmp_path: Path, docker_client: docker.DockerClient
) -> None:
    repo = light_repo(tmp_path / "repo", "timeout: 10s\n")
    started = time.monotonic()
    r = trimo(
        "run",
        "--repo",
        str(repo),
        "--task",
        "Slow work",
        "--agent",
        "echo 'half done' > progress.txt; sleep 300",
    )
    elapsed = time.monotonic() - started
    assert r.returncode == 1, r.stdout + r.stderr
    assert "timed_out" in r.stdout
    assert elapsed < 10 + 15 + 10, elapsed  # the container is stopped within timeout + 15 s
    branch = next(b for b in branches(repo) if b.startswith("trimo/"))
    assert git(repo, "show", f"{branch}:progress.txt") == "half done"
    run = trimo.store().list_runs()[0]
    assert run.state == RunState.TIMED_OUT
    assert containers_of(docker_client, trimo.store(), run.id) == []


def test_unrelated_history_is_not_published(trimo: Trimo, tmp_path: Path) -> None:
    repo = light_repo(tmp_path / "repo")
    r = trimo(
        "run",
        "--repo",
        str(repo),
        "--task",
        "Rewrite everything",
        "--agent",
        "git push origin HEAD; echo push_exit=$?; "
        "git checkout -q --orphan fresh && git rm -rqf . && echo new > new.txt && "
        "git add new.txt && git commit -qm 'unrelated root'",
    )
    assert r.returncode == 1
    assert "does not descend from the run's base commit" in r.stdout
    assert [b for b in branches(repo) if b.startswith("trimo/")] == []
    logs = "\n".join(e.message for e in trimo.store().events(1))
    assert "push_exit=1" in logs and "`git push` is disabled" in logs


def test_protected_path_is_not_published(trimo: Trimo, tmp_path: Path) -> None:
    repo = light_repo(tmp_path / "repo", extra={".github/workflows/ci.yml": "on: push\n"})
    r = trimo(
        "run",
        "--repo",
        str(repo),
        "--task",
        "Touch CI",
        "--agent",
        "echo '# pwned' >> .github/workflows/ci.yml && git commit -qam 'ci'",
    )
    assert r.returncode == 1
    assert ".github/workflows/ci.yml" in r.stdout
    assert [b for b in branches(repo) if b.startswith("trimo/")] == []
    assert trimo.store().list_runs()[0].state == RunState.FAILED


def test_failing_preboot_reports_its_last_lines(
    trimo: Trimo, tmp_path: Path, docker_client: docker.DockerClient
) -> None:
    name = f"preboot-fails-{os.getpid()}"
    repo = light_repo(
        tmp_path / name,
        extra={
            ".trimo/Dockerfile": (
                "FROM trimo/base:bookworm\nCOPY preboot.sh /opt/trimo/preboot.sh\n"
            ),
            ".trimo/preboot.sh": "#!/bin/bash\necho 'starting search'\n"
            "echo 'search: port 9200 is taken' >&2\nexit 1\n",
        },
    )
    try:
        r = trimo(
            "run", "--repo", str(repo), "--task", "Anything", "--agent", "echo AGENT-RAN > ran.txt"
        )
        assert r.returncode == 1
        assert "preboot failed" in r.stdout
        assert "search: port 9200 is taken" in r.stdout
        run = trimo.store().list_runs()[0]
        assert run.state == RunState.ERROR
        assert "search: port 9200 is taken" in (run.error or "")
        logs = [e.message for e in trimo.store().events(run.id)]
        assert not any("AGENT-RAN" in line for line in logs)
        assert RunState.AGENT.value not in [
            e.message for e in trimo.store().events(run.id, kinds=["state"])
        ]
    finally:
        for img in docker_client.images.list(name=f"trimo/{name}"):
            docker_client.images.remove(img.id, force=True)


def test_failed_image_build_ends_the_run_with_its_last_lines(trimo: Trimo, tmp_path: Path) -> None:
    repo = light_repo(
        tmp_path / f"build-fails-{os.getpid()}",
        extra={
            ".trimo/Dockerfile": (
                "FROM trimo/base:bookworm\n"
                "RUN echo 'fetching toolchain' && echo 'E: no such package libfoo-dev' && false\n"
            ),
        },
    )
    r = trimo("run", "--repo", str(repo), "--task", "Anything", "--agent", "echo AGENT-RAN")
    assert r.returncode == 1
    assert "image build failed" in r.stdout
    assert "E: no such package libfoo-dev" in r.stdout
    run = trimo.store().list_runs()[0]
    assert run.state == RunState.ERROR and run.container_id is None


def test_invalid_config_names_the_field_and_starts_nothing(trimo: Trimo, tmp_path: Path) -> None:
    repo = light_repo(tmp_path / "repo", "resources:\n  memory: lots\n")
    with EngineProxy() as proxy:
        r = trimo(
            "run",
            "--repo",
            str(repo),
            "--task",
            "Anything",
            "--agent",
            "true",
            DOCKER_HOST=proxy.url,
        )
    assert r.returncode == 1
    assert ".trimo/config.yml: resources.memory" in r.stdout
    assert not [p for p in proxy.paths("POST") if "/containers/create" in p]


def test_secret_value_never_reaches_logs_output_or_report(trimo: Trimo, tmp_path: Path) -> None:
    repo = light_repo(
        tmp_path / "repo",
        'agent:\n  secrets: [CANARY_TOKEN]\ntest:\n  command: echo "test sees $CANARY_TOKEN"\n',
    )
    r = trimo(
        "run",
        "--repo",
        str(repo),
        "--task",
        "Leak it",
        "--agent",
        'echo "agent has $CANARY_TOKEN"; echo "$CANARY_TOKEN" > "$TRIMO_SUMMARY_FILE"; '
        'echo "$CANARY_TOKEN" >&2; exit 3',
        TRIMO_SECRET_CANARY_TOKEN=CANARY,
    )
    shown = trimo("runs", "show", "1", "--json").stdout + trimo("runs", "logs", "1").stdout
    everything = r.stdout + r.stderr + shown
    assert CANARY not in everything
    store = trimo.store()
    stored = [e.message + str(e.data) for e in store.events(1)]
    assert not any(CANARY in line for line in stored)
    assert "agent has ***" in "\n".join(stored)  # it was there, and masked
    run = store.get_run(1)
    assert CANARY not in f"{run.summary}{run.error}{run.reason}{run.report}"


def test_missing_secret_is_named(trimo: Trimo, tmp_path: Path) -> None:
    repo = light_repo(tmp_path / "repo", "agent:\n  secrets: [NOT_SET_ANYWHERE_XYZ]\n")
    r = trimo("run", "--repo", str(repo), "--task", "x", "--agent", "true")
    assert r.returncode == 1
    assert "TRIMO_SECRET_NOT_SET_ANYWHERE_XYZ" in r.stdout


def test_cancel_stops_and_pushes_the_work_so_far(
    trimo: Trimo, tmp_path: Path, docker_client: docker.DockerClient
) -> None:
    repo = light_repo(tmp_path / "repo")
    proc = trimo.popen(
        "run",
        "--repo",
        str(repo),
        "--task",
        "Long work",
        "--agent",
        "echo draft > draft.txt; sleep 300",
    )
    try:
        store = trimo.store()
        wait_for_state(store, 1, RunState.AGENT)
        c = trimo("runs", "cancel", "1")
        assert c.returncode == 0, c.stderr
        proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 1
    assert store.get_run(1).state == RunState.CANCELLED
    branch = next(b for b in branches(repo) if b.startswith("trimo/"))
    assert git(repo, "show", f"{branch}:draft.txt") == "draft"
    assert containers_of(docker_client, store, 1) == []


def test_killed_trimo_run_is_reaped_by_the_next_command(
    trimo: Trimo, tmp_path: Path, docker_client: docker.DockerClient
) -> None:
    repo = light_repo(tmp_path / "repo")
    # A short lease, so the reaper may judge the run soon after its worker died.
    trimo.env.update(TRIMO_LEASE_SECONDS="2", TRIMO_LEASE_RENEW_SECONDS="0.5")
    proc = trimo.popen("run", "--repo", str(repo), "--task", "Long work", "--agent", "sleep 300")
    store = trimo.store()
    mine = {"label": [f"{LABEL_RUN}=1", f"{LABEL_STORE}={store.key}"]}
    try:
        wait_for_state(store, 1, RunState.AGENT)
        roles = [c.labels[LABEL_ROLE] for c in docker_client.containers.list(filters=mine)]
        assert sorted(roles) == ["proxy", "run"]
        assert len(docker_client.networks.list(filters=mine)) == 1
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    killed = store.get_run(1)
    assert killed.state == RunState.AGENT  # nobody finished it
    assert killed.lease_expires_at is not None
    # Dead only once its lease lapsed (and, this host's, its process is gone).
    time.sleep(max(0.0, (killed.lease_expires_at - datetime.now(UTC)).total_seconds()) + 0.5)
    r = trimo("image", "ls")  # any trimo command, even one that needs no run
    assert r.returncode == 0
    run = store.get_run(1)
    assert run.state == RunState.ERROR
    assert "stopped renewing its lease" in (run.reason or "")
    assert docker_client.containers.list(all=True, filters=mine) == []
    assert docker_client.networks.list(filters=mine) == []
    assert "removed container" in r.stderr and "removed network" in r.stderr


@pytest.fixture
def sample_repo(tmp_path: Path, docker_client: docker.DockerClient) -> Iterator[Path]:
    from bot.sample import make_sample_repo

    yield make_sample_repo(tmp_path / "sample-repo")


@pytest.mark.slow
def test_sample_agent_fixes_a_postgres_backed_test(
    trimo: Trimo, sample_repo: Path, docker_client: docker.DockerClient
) -> None:
    from bot.sample import AGENT, TASK

    base = git(sample_repo, "rev-parse", "main")
    r = trimo("run", "--repo", str(sample_repo), "--task", TASK, "--agent", AGENT)
    assert r.returncode == 0, r.stdout[-3000:]
    store = trimo.store()
    run = store.list_runs()[0]
    assert run.state == RunState.SUCCEEDED
    branch = store.get_pipeline(run.pipeline_id).branch
    assert git(sample_repo, "log", "-1", "--format=%s", branch) == "Build page slugs with slug_for"
    assert git(sample_repo, "rev-parse", f"{branch}^") == base
    assert run.tests_passed and run.tests_passed >= 5 and run.tests_failed == 0
    assert f"{run.tests_passed} passed, 0 failed" in r.stdout
    assert containers_of(docker_client, trimo.store(), run.id) == []

    # The same task again: the image is reused and the mirror only fetches.
    again = trimo(
        "run",
        "--repo",
        str(sample_repo),
        "--task",
        TASK,
        "--agent",
        "python3 -m pytest -q tests/test_models.py",
    )
    assert again.returncode == 0, again.stdout[-3000:]
    second = store.list_runs()[0]
    assert second.id != run.id and second.pipeline_id == run.pipeline_id
    kinds = {e.kind: e.data for e in store.events(second.id, kinds=["image", "mirror", "branch"])}
    assert kinds["image"] is not None and kinds["image"]["built"] is False
    assert kinds["mirror"] is not None and kinds["mirror"]["cloned"] is False
    assert kinds["branch"] is not None and kinds["branch"]["new"] is False  # builds on run 1


def test_a_change_to_trimos_config_alone_does_not_rebuild_the_image(
    trimo: Trimo, tmp_path: Path, docker_client: docker.DockerClient
) -> None:
    marker = uuid.uuid4().hex
    repo = light_repo(
        tmp_path / "repo",
        "timeout: 5m\nnetwork:\n  mode: none\n",
        {".trimo/Dockerfile": f"FROM trimo/base:bookworm\nRUN echo {marker} > /marker\n"},
    )
    first = trimo("run", "--repo", str(repo), "--task", "One", "--agent", "true")
    assert first.returncode == 0, first.stdout[-3000:]
    store = trimo.store()
    run = store.list_runs()[0]
    try:
        [built] = [e.data for e in store.events(run.id, kinds=["image"])]
        assert built is not None and built["built"] is True
        # A new budget or timeout is the run's business, not the image's.
        (repo / ".trimo" / "config.yml").write_text("timeout: 9m\nnetwork:\n  mode: none\n")
        git(repo, "commit", "-qam", "A longer timeout")
        again = trimo("run", "--repo", str(repo), "--task", "Two", "--agent", "true")
        assert again.returncode == 0, again.stdout[-3000:]
        second = store.list_runs()[0]
        assert second.id != run.id
        [reused] = [e.data for e in store.events(second.id, kinds=["image"])]
        assert reused is not None and reused["built"] is False, again.stdout[-3000:]
        assert second.image_tag == run.image_tag
    finally:
        if run.image_tag:
            with contextlib.suppress(docker.errors.ImageNotFound):
                docker_client.images.remove(docker_client.images.get(run.image_tag).id, force=True)


@pytest.fixture
def healthy_sample_repo(tmp_path: Path) -> Path:
    from bot.sample import make_sample_repo

    return make_sample_repo(tmp_path / "sample-repo", with_bug=False)


@pytest.mark.slow
def test_five_runs_at_once_each_with_its_own_postgres(
    trimo: Trimo, healthy_sample_repo: Path
) -> None:
    sample_repo = healthy_sample_repo
    agent = (
        'psql "$DATABASE_URL" -qAt -c "CREATE TABLE IF NOT EXISTS mark(v text); '
        "INSERT INTO mark VALUES ('$TRIMO_RUN_ID')\" && "
        'seen=$(psql "$DATABASE_URL" -qAt -c "SELECT count(*) || \'/\' || min(v) FROM mark") '
        '&& test "$seen" = "1/$TRIMO_RUN_ID" && echo "only-mine:$TRIMO_RUN_ID" > mine.txt'
    )
    # Warm the image once so the five measure dispatch, not one build five times.
    trimo("image", "build", str(sample_repo / ".trimo"))
    procs = [
        trimo.popen(
            "run", "--repo", str(sample_repo), "--task", f"Parallel task {i}", "--agent", agent
        )
        for i in range(5)
    ]
    outs = [p.communicate(timeout=900)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * 5, "\n".join(o[-1500:] for o in outs)
    store = trimo.store()
    runs = store.list_runs(limit=5)
    assert {r.state for r in runs} == {RunState.SUCCEEDED}
    seen_branches = set()
    for run in runs:
        branch = store.get_pipeline(run.pipeline_id).branch
        seen_branches.add(branch)
        assert git(sample_repo, "show", f"{branch}:mine.txt") == f"only-mine:{run.id}"
    assert len(seen_branches) == 5


def test_logs_follow_streams_until_the_run_ends(trimo: Trimo, tmp_path: Path) -> None:
    repo = light_repo(tmp_path / "repo")
    proc = trimo.popen(
        "run",
        "--repo",
        str(repo),
        "--task",
        "Talk",
        "--agent",
        "echo step-one; sleep 3; echo step-two",
    )
    try:
        wait_for_state(trimo.store(), 1, RunState.AGENT)
        follow = trimo("runs", "logs", "1", "--follow", timeout=120)
        proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert follow.returncode == 0, follow.stderr
    out = follow.stdout
    assert out.index("step-one") < out.index("step-two")
    assert "state: succeeded" in out  # it followed to the end
    shown = trimo("runs", "show", "1")
    assert "state:" in shown.stdout and "succeeded" in shown.stdout
    listed = trimo("runs", "ls")
    assert "succeeded" in listed.stdout and "trimo/1-talk" in listed.stdout


# An agent that wants a green result: a passing report where the agent writes ($TRIMO_OUT), an
# attempt at the tests' folder, and a process left behind to write one there once it exists.
PASSING_JUNIT = '<testsuite><testcase name="all_good"/><testcase name="also_fine"/></testsuite>'
PLANTING_AGENT = (
    f"echo '{PASSING_JUNIT}' > \"$TRIMO_OUT/junit.xml\"; "
    f"echo '{PASSING_JUNIT}' > /tmp/forged.xml; "
    "mkdir /trimo/out/tests 2>/dev/null && echo made-tests-dir; "
    "cp /tmp/forged.xml /trimo/out/junit.xml 2>/dev/null && echo wrote-out-dir; "
    "setsid sh -c 'for i in $(seq 1 100); do cp /tmp/forged.xml /trimo/out/tests/x.xml "
    "2>/dev/null; sleep 0.1; done' > /dev/null 2>&1 < /dev/null & "
    "echo planted"
)


@pytest.mark.parametrize("exit_code", [1, 0])
def test_tests_without_a_report_never_show_the_agents_counts(
    trimo: Trimo, tmp_path: Path, exit_code: int
) -> None:
    repo = light_repo(
        tmp_path / "repo",
        # Long enough for a leftover process to write into the tests' folder, if one ran.
        f'test:\n  command: sleep 3; echo "tests ran"; exit {exit_code}\n',
    )
    r = trimo("run", "--repo", str(repo), "--task", "Go green", "--agent", PLANTING_AGENT)
    store = trimo.store()
    run = store.get_run(1)
    logs = "\n".join(e.message for e in store.events(1))
    assert "planted" in logs and "tests ran" in logs
    assert "made-tests-dir" not in logs and "wrote-out-dir" not in logs
    assert run.tests_passed is None and run.tests_exit_code == exit_code
    assert "passed" not in r.stdout
    assert f"no test report (the test command exited {exit_code}" in r.stdout
    assert run.state == (RunState.SUCCEEDED if exit_code == 0 else RunState.FAILED)
    shown = trimo("runs", "show", "1", "--json").stdout
    assert f'"tests": "no test report (the test command exited {exit_code})"' in shown


def test_test_phase_report_is_counted_and_the_agents_is_not(trimo: Trimo, tmp_path: Path) -> None:
    junit = (
        '<testsuite><testcase name="a"/><testcase name="b"><failure message="x"/></testcase>'
        '<testcase name="c"><skipped/></testcase></testsuite>'
    )
    repo = light_repo(
        tmp_path / "repo",
        f"test:\n  command: echo '{junit}' > \"$TRIMO_OUT/junit.xml\"; exit 1\n",
    )
    r = trimo("run", "--repo", str(repo), "--task", "Go green", "--agent", PLANTING_AGENT)
    run = trimo.store().get_run(1)
    assert (run.tests_passed, run.tests_failed, run.tests_skipped) == (1, 1, 1)
    assert "tests:    1 passed, 1 failed, 1 skipped" in r.stdout
    assert run.state == RunState.FAILED


def test_agents_summary_is_shown_as_the_agents(trimo: Trimo, tmp_path: Path) -> None:
    repo = light_repo(tmp_path / "repo")
    r = trimo(
        "run",
        "--repo",
        str(repo),
        "--task",
        "Say it",
        "--agent",
        'echo "All 500 tests pass." > "$TRIMO_SUMMARY_FILE"',
    )
    assert r.returncode == 0, r.stdout
    assert "agent's summary:\n    > All 500 tests pass." in r.stdout
    assert "tests:    none run" in r.stdout
    shown = trimo("runs", "show", "1", "--json").stdout
    assert '"agent_summary": "All 500 tests pass.\\n"' in shown


def test_engine_calls_on_the_local_socket_do_not_read_an_environment_that_changes_meanwhile(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Trimo calls the engine from many threads. requests, left to itself, reads proxy settings
    from os.environ on every call, and reading it while another thread removes a variable
    raises KeyError (seen in the test process, where pytest changes PYTEST_CURRENT_TEST). That
    is simulated here: every read of os.environ's items meets a variable that has just gone."""
    trimo = engine_client()
    plain = docker.from_env()
    try:

        def items_while_changing(self: object) -> object:
            raise KeyError("TRIMO_JUST_REMOVED")

        monkeypatch.setattr(type(os.environ), "items", items_while_changing)
        assert trimo.ping()
        assert isinstance(trimo.containers.list(limit=1), list)
        # The same call from a client that does read the environment fails: the simulation
        # is the failure the client avoids.
        with pytest.raises(KeyError, match="TRIMO_JUST_REMOVED"):
            plain.ping()
    finally:
        monkeypatch.undo()
        trimo.close()
        plain.close()
