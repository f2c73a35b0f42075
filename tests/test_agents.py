"""The real agent CLIs in real containers, through the run's model gateway, on the sample repo.

A scripted model server (tests/model_fake.py) plays the model on the engine's bridge; each CLI
reads the buggy file, edits it, runs the tests and finishes. The provider key is a canary: it
must reach the model server and nothing else.
"""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import docker
import pytest

from bot.engine import Engine, RunContext
from bot.gateway.policy import ModelPolicy
from bot.gateway.sidecar import GATEWAY_ALIAS
from bot.runtime import EGRESS_NETWORK, LABEL_RUN, DockerRuntime
from bot.sample import BUG_FILE, GOOD_LINE, TASK
from bot.secrets import ServerSecrets
from bot.settings import Settings
from bot.states import PipelineKind, RunState
from bot.store import Run, Store
from bot.worker import dispatch
from bot.workspace import Remote, Workspace
from tests.agent_layers import PREBUILD, sample
from tests.containers import TEST_OWNER, extra_ca_certs, git
from tests.model_fake import SESSION, ModelFake

pytestmark = [pytest.mark.docker, pytest.mark.timeout(1500)]

CANARY = "sk-canary-7Qm2vX-provider-key-never-in-a-container"
KEYS = {"ANTHROPIC_API_KEY": CANARY, "OPENAI_API_KEY": CANARY}


def bridge_gateway(client: docker.DockerClient) -> str:
    """The host's address on the engine's default bridge: where the gateway container finds the
    scripted model server (on this machine)."""
    config = client.networks.get("bridge").attrs["IPAM"]["Config"][0]
    if config.get("Gateway"):
        return str(config["Gateway"])
    # An engine that took over an existing docker0 may not list it: the bridge then has the
    # subnet's first address, as the engine gives a bridge by default.
    return str(next(ipaddress.ip_network(config["Subnet"]).hosts()))


@pytest.fixture(autouse=True)
def _layers_built(base_image: str) -> None:
    """The agent layers, started in the background at collection (tests/agent_layers.py)."""
    PREBUILD.wait()


@pytest.fixture
def fake(docker_client: docker.DockerClient) -> Iterator[ModelFake]:
    with ModelFake(bridge_gateway(docker_client)) as server:
        yield server


@dataclass
class Watch:
    """An observer that looks into the run's containers while they run."""

    client: docker.DockerClient
    checks: list[str] = field(default_factory=list)
    tokens: list[str] = field(default_factory=list)

    def state(self, run: Run) -> None:
        if run.state not in (RunState.AGENT, RunState.TESTING):
            return
        for c in self.client.containers.list(filters={"label": f"{LABEL_RUN}={run.id}"}):
            if c.labels.get("trimo.owner") != TEST_OWNER:
                continue
            inspected = json.dumps(c.attrs)
            assert CANARY not in inspected, f"the key is in {c.name}'s configuration"
            if c.labels.get("trimo.role") == "gateway":
                # The gateway read its configuration file and deleted it.
                gone = c.exec_run(["test", "-e", "/etc/trimo-gateway/config.json"])
                assert gone.exit_code == 1
                # Hardened like the proxy, on the run's network and the egress network only.
                host = c.attrs["HostConfig"]
                assert host["CapDrop"] == ["ALL"] and not host.get("CapAdd")
                assert "no-new-privileges:true" in host["SecurityOpt"]
                assert c.attrs["Config"]["User"] != "root"
                nets = c.attrs["NetworkSettings"]["Networks"]
                assert set(nets) == {EGRESS_NETWORK, c.name.removesuffix("-gateway")}
                assert GATEWAY_ALIAS in (nets[c.name.removesuffix("-gateway")]["Aliases"] or [])
                self.checks.append("gateway")
                continue
            env = dict(e.split("=", 1) for e in c.attrs["Config"]["Env"])
            token = env.get("ANTHROPIC_API_KEY") or env.get("OPENAI_API_KEY")
            if token:
                self.tokens.append(token)
            found = c.exec_run(["grep", "-rlsF", CANARY, "/workspace", "/trimo"])
            if found.exit_code in (0, 1):
                assert found.exit_code == 1, found.output.decode()
                self.checks.append("run")

    def logs(self, run: Run, lines: list[str]) -> None:
        pass


@dataclass
class Rig:
    store: Store
    engine: Engine
    client: docker.DockerClient

    def run(self, repo: Path, observer: Watch | None = None, agent: str | None = None) -> Run:
        pipeline = self.store.get_or_create_pipeline(
            repo=str(repo),
            key=f"local:{repo.name}",
            kind=PipelineKind.LOCAL,
            branch=f"trimo/1-{repo.name}",
            title="Page slugs are wrong",
        )
        queued = dispatch(self.store, pipeline, trigger="cli", task=TASK, agent_command=agent)
        claimed = self.store.claim_run(self.engine.owner, queued.id)
        assert claimed is not None
        return self.engine.execute(claimed, RunContext(remote=Remote(str(repo))), observer)


@pytest.fixture
def rig(tmp_path: Path, runtime: DockerRuntime, base_image: str, fake: ModelFake) -> Iterator[Rig]:
    store = Store(Store.sqlite_url(tmp_path / "data"))
    engine = Engine(
        store=store,
        workspace=Workspace(tmp_path / "data"),
        runtime=runtime,
        owner=TEST_OWNER,
        # The model keys are server secrets granted to the repository like any other.
        secrets=ServerSecrets(
            Settings(
                data_dir=tmp_path / "data",
                secrets={name: {"value": value, "repos": ["*"]} for name, value in KEYS.items()},
            )
        ),
        extra_ca_certs=extra_ca_certs(),
        models=ModelPolicy(
            anthropic_url=fake.url,
            openai_url=fake.url + "/v1",
            prices={"claude-sonnet-4": (3.0, 15.0), "gpt-5": (1.25, 10.0)},
        ),
    )
    yield Rig(store, engine, runtime.client)
    store.close()


def everything_stored(store: Store, run: Run) -> str:
    events = store.events(run.id)
    return json.dumps(
        [[e.kind, e.message, e.data] for e in events]
        + [run.summary, run.reason, run.error, run.report],
        default=str,
    )


def assert_fixed(
    rig: Rig,
    repo: Path,
    run: Run,
    fake: ModelFake,
    turns: tuple[str, ...] = ("read", "edit", "run", "finish"),
) -> None:
    assert run.state == RunState.SUCCEEDED, (run.reason, run.error)
    branch = rig.store.get_pipeline(run.pipeline_id).branch
    assert GOOD_LINE in git(repo, "show", f"{branch}:{BUG_FILE}")
    assert run.commits == 1
    assert run.tests_passed and run.tests_passed > 0 and run.tests_failed == 0
    # The transcript: the tool calls in the order the session made them.
    steps = [e.data or {} for e in rig.store.events(run.id, kinds=["step"])]
    actions = [s.get("action") for s in steps if s.get("kind") == "tool"]
    assert actions == ["read", "edit", "run"], steps
    # The usage the gateway metered is what the model server reported, call for call.
    assert run.usage is not None
    assert run.usage["input_tokens"] == fake.served.input_tokens
    assert run.usage["output_tokens"] == fake.served.output_tokens
    assert tuple(fake.served.session_steps) == turns
    # The key reached the model server, and only it.
    assert {h.get("x-api-key") or h.get("authorization") for h in fake.served.headers} <= {
        CANARY,
        f"Bearer {CANARY}",
    }
    assert CANARY not in everything_stored(rig.store, run)
    assert mine(rig.client, run) == []


def mine(client: docker.DockerClient, run: Run) -> list[object]:
    """This session's containers of `run` that still exist (run ids repeat across stores)."""
    return [
        c
        for c in client.containers.list(all=True, filters={"label": f"{LABEL_RUN}={run.id}"})
        if c.labels.get("trimo.owner") == TEST_OWNER
    ]


def test_claude_code_fixes_the_sample_through_the_gateway(
    rig: Rig, tmp_path: Path, fake: ModelFake
) -> None:
    repo = sample(tmp_path / "repo")
    watch = Watch(rig.client)
    run = rig.run(repo, watch, agent="claude-code")
    assert_fixed(rig, repo, run, fake)
    assert "gateway" in watch.checks and "run" in watch.checks
    assert run.summary and "slug_for" in run.summary
    assert run.usage is not None and run.usage["usd"] > 0
    assert {r["api"] for r in fake.served.requests} == {"anthropic"}


def test_a_budget_smaller_than_the_session_ends_budget_exceeded_with_the_work_pushed(
    rig: Rig, tmp_path: Path, fake: ModelFake
) -> None:
    # Enough for reading and editing; the call after the edit is refused.
    budget = sum(s.usage_in + s.usage_out for s in SESSION[:2])
    repo = sample(
        tmp_path / "repo", f"agent:\n  preset: claude-code\n  budget: {{tokens: {budget}}}\n"
    )
    run = rig.run(repo)
    assert run.state == RunState.BUDGET_EXCEEDED, (run.reason, run.error)
    assert run.reason and "budget" in run.reason
    branch = rig.store.get_pipeline(run.pipeline_id).branch
    assert GOOD_LINE in git(repo, "show", f"{branch}:{BUG_FILE}")
    assert fake.served.session_steps == ["read", "edit"]
    refused = [e for e in rig.store.events(run.id, kinds=["gateway"]) if "refused" in e.message]
    assert refused and (refused[0].data or {}).get("reason") == "budget"
    assert mine(rig.client, run) == []


def test_a_run_token_is_refused_after_its_run_and_by_another_run(
    rig: Rig, tmp_path: Path, fake: ModelFake
) -> None:
    first = Watch(rig.client)
    run1 = rig.run(sample(tmp_path / "one"), first, agent="claude-code")
    assert run1.state == RunState.SUCCEEDED and first.tokens
    stale = first.tokens[0]
    answers: list[tuple[int, int]] = []

    class Probe(Watch):
        def state(self, run: Run) -> None:
            super().state(run)
            if run.state != RunState.AGENT or answers:
                return
            for c in self.client.containers.list(filters={"label": f"{LABEL_RUN}={run.id}"}):
                if (
                    c.labels.get("trimo.role") == "gateway"
                    or c.labels.get("trimo.owner") != TEST_OWNER
                ):
                    continue
                own = self.tokens[-1]
                codes = []
                for token in (stale, own):
                    out = c.exec_run(
                        [
                            "curl",
                            "-s",
                            "-o",
                            "/dev/null",
                            "-w",
                            "%{http_code}",
                            "-H",
                            f"x-api-key: {token}",
                            "http://model-gateway:8080/anthropic/v1/models",
                        ]
                    ).output.decode()
                    codes.append(int(out or 0))
                answers.append((codes[0], codes[1]))

    probe = Probe(rig.client)
    run2 = rig.run(sample(tmp_path / "two"), probe, agent="claude-code")
    assert run2.state == RunState.SUCCEEDED, (run2.reason, run2.error)
    # The first run's token at the second run's gateway: refused. Its own token goes upstream
    # (the scripted server has no GET /v1/models: 404 from there, not from the gateway).
    assert answers == [(401, 404)]
    assert stale not in probe.tokens
    # The second run on the same repository image builds no agent layer.
    layers = [e for e in rig.store.events(run2.id, kinds=["image"]) if "agent layer" in e.message]
    assert [(e.data or {}).get("built") for e in layers] == [False]


def test_codex_fixes_the_sample_through_the_gateway(
    rig: Rig, tmp_path: Path, fake: ModelFake
) -> None:
    repo = sample(tmp_path / "repo")
    watch = Watch(rig.client)
    run = rig.run(repo, watch, agent="codex")
    assert_fixed(rig, repo, run, fake)
    assert "gateway" in watch.checks and "run" in watch.checks
    assert run.summary and "slug_for" in run.summary
    assert {r["api"] for r in fake.served.requests} == {"responses"}


def test_trimo_run_with_a_preset_shows_usage_and_the_transcript(
    tmp_path: Path, base_image: str, fake: ModelFake
) -> None:
    repo = sample(tmp_path / "repo")
    env = {
        **os.environ,
        "TRIMO_DATA_DIR": str(tmp_path / "data"),
        "TRIMO_ANTHROPIC_URL": fake.url,
        "TRIMO_SECRET_ANTHROPIC_API_KEY": CANARY,
        "COLUMNS": "200",
    }

    def trimo(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "bot", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )

    r = trimo("run", "--repo", str(repo), "--task", TASK, "--agent", "claude-code")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "succeeded" in r.stdout
    assert CANARY not in r.stdout + r.stderr
    show = trimo("runs", "show", "1")
    assert f"{fake.served.input_tokens:,} tokens in" in show.stdout, show.stdout
    logs = trimo("runs", "logs", "1")
    assert "● read /workspace/pages/models.py" in logs.stdout
    assert "● edited /workspace/pages/models.py" in logs.stdout
    assert "● ran `python3 -m pytest -q tests/test_models.py` → exit 0" in logs.stdout
    assert '{"type":' not in logs.stdout  # steps, not the CLI's raw JSON
    assert CANARY not in logs.stdout


def test_aider_fixes_the_sample_through_the_gateway(
    rig: Rig, tmp_path: Path, fake: ModelFake
) -> None:
    repo = sample(tmp_path / "repo")
    watch = Watch(rig.client)
    run = rig.run(repo, watch, agent="aider")
    # Aider asks for the file, edits it and runs the tests itself (--auto-test): two model turns.
    assert_fixed(rig, repo, run, fake, turns=("read", "edit"))
    assert "gateway" in watch.checks and "run" in watch.checks
    assert {r["api"] for r in fake.served.requests} == {"chat"}
    assert run.summary and "SEARCH" in run.summary
