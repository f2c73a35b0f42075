"""The article's example images build FROM trimo/base; their own tests pass against real services.

Each example under images/examples/ is a sample repository: its `.trimo/` folder is the image's
build context and Trimo configuration. A run of each goes through the real runner: preboot starts
the services, the agent user (login shell) sees the environment from /etc/profile.d/trimo.sh, and
the example's own test command reports JUnit with passing tests.
"""

from __future__ import annotations

import shutil
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import docker
import docker.errors
import junitparser
import pytest
import yaml

from bot.images import build_image, images_dir
from bot.protocol import ExitCode
from bot.runtime import DockerRuntime
from tests.containers import RunnerResult, git, run_runner
from tests.locks import engine_key, machine_lock

pytestmark = [pytest.mark.docker, pytest.mark.slow]

EXAMPLES = ("node-postgres-redis", "django-postgres-celery", "go-postgres")
# What each example's login shell must see (from its /etc/profile.d/trimo.sh).
PROFILE_VARIABLES = {
    "node-postgres-redis": ("DATABASE_URL", "TEST_DATABASE_URL", "REDIS_URL"),
    "django-postgres-celery": ("DATABASE_URL", "REDIS_URL", "CELERY_BROKER_URL"),
    "go-postgres": ("DATABASE_URL", "TEST_DATABASE_URL", "GOPROXY"),
}
CELERY_TEST = "test_worker_counts_views_in_redis"
SESSION_TAG = uuid.uuid4().hex[:10]
AGENT_PROBE = (
    'echo "probe: uid=$(id -u) home=$HOME"; for v in {names}; do echo "probe: $v=${{!v}}"; done'
)


@dataclass(frozen=True)
class ExampleImage:
    name: str
    tag: str
    image_id: str
    build_seconds: float
    built: bool
    size_bytes: int


class ExampleImages:
    """Example images built on first use, once per session, and removed at the end."""

    def __init__(self, client: docker.DockerClient) -> None:
        self.client = client
        self.images: dict[str, ExampleImage] = {}
        self.lock = threading.Lock()

    def get(self, name: str) -> ExampleImage:
        # One build at a time, across the session's processes too: the machine's cores are
        # shared, and a second process wanting the same image finds it built and reuses it.
        with self.lock, machine_lock(f"example-images-{engine_key()}"):
            if name not in self.images:
                tag = f"trimo-test/example-{name}:{SESSION_TAG}"
                result = build_image(
                    self.client, images_dir() / "examples" / name / ".trimo", tag=tag
                )
                size = int(self.client.images.get(result.image_id).attrs["Size"])
                self.images[name] = ExampleImage(
                    name, tag, result.image_id, result.seconds, result.built, size
                )
                print(
                    f"\n{name}: {'built' if result.built else 'reused'} {tag} in "
                    f"{result.seconds:.1f}s, {size / 1e6:.0f} MB"
                )
            return self.images[name]


@pytest.fixture(scope="session")
def example_images(docker_client: docker.DockerClient, base_image: str) -> ExampleImages:
    """The examples' images, built once per session. They go at the session's end with the
    other images it made (tests/conftest.py, EngineCleanup): another test process may be
    running on one of them when this one is done."""
    return ExampleImages(docker_client)


def example_checkout(name: str, dest: Path) -> Path:
    """The example as the git repository a pipeline would check out."""
    shutil.copytree(
        images_dir() / "examples" / name,
        dest,
        ignore=shutil.ignore_patterns("__pycache__", ".pytest_cache", "node_modules", "junit.xml"),
    )
    git(dest, "init", "-q", "-b", "main")
    git(dest, "add", "-A")
    git(dest, "commit", "-q", "-m", f"{name} example")
    return dest


def configured_test_command(repo: Path) -> str:
    config = yaml.safe_load((repo / ".trimo" / "config.yml").read_text())
    assert config["test"]["junit"] == "junit.xml"
    return str(config["test"]["command"])


def run_example(
    client: docker.DockerClient,
    runtime: DockerRuntime,
    image: str,
    repo: Path,
    agent_command: str,
    test_command: str,
) -> RunnerResult:
    return run_runner(runtime, image, repo, agent_command=agent_command, test_command=test_command)


def junit_cases(result: RunnerResult) -> dict[str, junitparser.TestCase]:
    assert "junit.xml" in result.out, f"no junit.xml in /trimo/out; logs:\n{result.text}"
    report = junitparser.JUnitXml.fromstring(result.out["junit.xml"].decode())
    suites = [report] if isinstance(report, junitparser.TestSuite) else list(report)
    return {case.name: case for suite in suites for case in suite}


@pytest.fixture(scope="module")
def runs(
    docker_client: docker.DockerClient,
    example_images: ExampleImages,
    runtime: DockerRuntime,
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, RunnerResult]:
    """One run of each example through the runner, shared by the assertions below."""
    done: dict[str, RunnerResult] = {}
    for name in EXAMPLES:
        image = example_images.get(name)
        repo = example_checkout(name, tmp_path_factory.mktemp("examples") / name)
        started = time.monotonic()
        done[name] = run_example(
            docker_client,
            runtime,
            image.tag,
            repo,
            agent_command=AGENT_PROBE.format(names=" ".join(PROFILE_VARIABLES[name])),
            test_command=configured_test_command(repo),
        )
        print(f"{name}: run took {time.monotonic() - started:.1f}s")
    return done


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_tests_pass_against_services_started_by_preboot(
    runs: dict[str, RunnerResult], name: str
) -> None:
    result = runs[name]

    assert result.exit_code == ExitCode.SUCCESS, result.text
    phases = [event.data["phase"] for event in result.events if event.kind == "phase"]
    assert phases[:3] == ["booting", "agent", "testing"], phases
    assert "failure" not in result.kinds(), result.text
    tests = result.first("tests")
    assert tests["exit_code"] == 0, result.text
    assert tests["passed"] > 0
    assert (tests["failed"], tests["errors"]) == (0, 0)


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_runs_as_the_agent_user_with_the_profile_environment(
    runs: dict[str, RunnerResult], name: str
) -> None:
    probe = [line for line in runs[name].logs if line.startswith("probe: ")]

    assert "probe: uid=1000 home=/home/agent" in probe
    for variable in PROFILE_VARIABLES[name]:
        values = [line.split("=", 1)[1] for line in probe if line.startswith(f"probe: {variable}=")]
        assert values and values[0], f"{variable} is not set in the agent's login shell: {probe}"


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_junit_lists_every_test_passing(runs: dict[str, RunnerResult], name: str) -> None:
    cases = junit_cases(runs[name])

    assert len(cases) >= 4
    failed = [case_name for case_name, case in cases.items() if not case.is_passed]
    assert failed == []


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_run_leaves_no_stray_files_to_commit(
    runs: dict[str, RunnerResult], name: str
) -> None:
    # Caches written by the services and tests (__pycache__, ...) are ignored, so the run hands
    # back no commit of its own.
    assert "committed" not in runs[name].kinds(), runs[name].text
    assert runs[name].first("result")["commits"] == 0


def test_django_celery_task_ran_in_the_worker_started_by_preboot(
    runs: dict[str, RunnerResult],
) -> None:
    cases = junit_cases(runs["django-postgres-celery"])

    assert CELERY_TEST in cases, sorted(cases)
    assert cases[CELERY_TEST].is_passed
    assert "preboot: celery worker is ready" in runs["django-postgres-celery"].logs
