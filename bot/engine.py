"""The run engine: one run from claim to report — prepare, boot, agent, test, publish.

Every trigger (a label, a comment command, `trimo run`) ends here. The engine owns the run's
container from creation to removal: whatever happens, the container goes, and the run ends in a
finished state with a reason a person can act on. The timeout and cancellation are enforced from
outside the container (`docker stop`, which makes the runner checkpoint the work so far).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from secrets import token_hex
from typing import TYPE_CHECKING, Any, Protocol, cast

import docker

from bot import images
from bot.agents import PRESETS, Preset, Step
from bot.agents.layer import build_agent_layer
from bot.deadline import Watchdog
from bot.egress import PROXY_URL, RunNetwork, Spares, ensure_proxy_image, host_addresses
from bot.errors import (
    ConfigError,
    ImageBuildError,
    PublishRefused,
    RunRefused,
    TrimoError,
    WorkspaceError,
)
from bot.gateway.network import run_network
from bot.gateway.policy import ModelPolicy
from bot.junit import TestReport, parse_junit
from bot.leases import LeaseKeeper, LeaseTerms
from bot.logs import about_run
from bot.masking import Masker
from bot.network import (
    EGRESS_DENIED,
    Blocked,
    NetworkLimits,
    NetworkMode,
    NetworkPolicy,
    blocked_text,
    resolve_policy,
    summarize,
)
from bot.protocol import (
    AGENT_OUT_DIR,
    BUNDLE_NAME,
    IN_DIR,
    OUT_DIR,
    SUMMARY_NAME,
    TESTS_OUT_DIR,
    WORKSPACE,
    ExitCode,
    parse_line,
)
from bot.repoconfig import (
    AGENT_ADAPTER,
    CONFIG_NAMES,
    DEFAULT_IMAGE_BUILD_TIMEOUT,
    RepoConfig,
    parse_repo_config,
)
from bot.runtime import ENGINE_UNREACHABLE, ContainerSpec, DockerRuntime, files_tar
from bot.secrets import MissingSecretError, Secrets
from bot.secretscan import SecretInResult, refuse_secrets
from bot.states import ACTIVE, RunMode, RunState
from bot.store import Run, Store
from bot.workspace import Checkout, PushDenied, Remote, Result, Workspace

if TYPE_CHECKING:
    from bot.gateway.sidecar import Gateway

log = logging.getLogger(__name__)

CONFIG_FILE = ".trimo/config.yml"
CONFIG_DIR = ".trimo"
STOP_GRACE_SECONDS = 10
CANCEL_POLL_SECONDS = 1.0
# The runner stops itself this long after the run's deadline: the engine stops it first when it
# is there to watch, the runner when nobody is (its worker died, the engine is out of reach).
RUNNER_DEADLINE_MARGIN_SECONDS = 5
LOG_FLUSH_SECONDS = 0.5
LOG_FLUSH_LINES = 200
TAIL_LINES = 30
MAX_SUMMARY_CHARS = 20_000
# A summary is read up to MAX_SUMMARY_CHARS; a file far beyond that is not worth copying out.
MAX_SUMMARY_BYTES = 1024 * 1024
# Where the engine keeps what it copied out of the container, below the run's temporary folder.
BUNDLE_FILE = BUNDLE_NAME
SUMMARY_FILE = f"agent/{SUMMARY_NAME}"
TESTS_DIR = "tests"
SUMMARY_TOO_LARGE = "the agent's summary is larger than {limit} bytes: not shown"

NO_EDITS = "the pull request does not allow edits from maintainers"
HEAD_MOVED = "new commits since approval ({approved} → {head}): /trimo approve again"
# A patch up to this size is shown in the tracking comment; a bigger one only kept with the run.
PATCH_SHOWN_MAX = 20_000
PREBOOT_FAILED = "preboot failed (exit {code}); the agent did not start"
AGENT_FAILED = "the agent exited with {code}"
TESTS_FAILED = "tests failed"
CANCELLED = "cancelled"
LEASE_LOST = "its worker lost the run's lease (no renewal reached the store in time)"
TIMED_OUT = "timed out after {seconds}s; the work so far was committed and pushed"
RUNNER_TIMED_OUT = (
    "timed out after {seconds}s: the container stopped itself at its deadline; "
    "the work so far was committed and pushed"
)
REQUEUED = "requeued: {why}; the work so far was committed and pushed, and the next run resumes it"
RUNNER_ERROR = "the runner could not start the run: {detail}"
CONTAINER_DIED = "the container ended without a result (exit {code}, {oom})"
BUDGET_EXCEEDED = (
    "the model budget was spent ({spent}); the agent was stopped and its work so far pushed"
)
DAILY_CAP_SPENT = (
    "the installation's daily model budget is spent (${spent:.2f} of ${cap:.2f} today, UTC): "
    "the agent did not start; raise daily_model_usd in Trimo's settings or wait until tomorrow"
)
ENGINE_RESTARTED = (
    "the Docker engine at {url} restarted during the {phase} phase and stopped the run's "
    "container with it; nothing was published: run it again"
)
ENGINE_GONE = (
    "the Docker engine at {url} stopped answering during the {phase} phase and was not back "
    "within {seconds}s ({detail}); what the run left there is removed once it answers again"
)
ENGINE_UNANSWERED = "the Docker engine at {url} could not be reached: {detail}"
# A container that ended without a result may have been stopped by its engine going down: the
# engine's watch may see the stream cut a moment after the container's end.
ENGINE_SETTLE_SECONDS = 10.0
# How long a run whose engine went away waits for it before its last words, so that its
# containers and networks can still be removed.
ENGINE_RETURN_SECONDS = 60.0
# The exit codes with which a runner hands back a result of its own.
_RESULT_CODES = frozenset(
    {ExitCode.SUCCESS, ExitCode.TESTS_FAILED, ExitCode.AGENT_FAILED, ExitCode.PREBOOT_FAILED}
)
# What people call each phase in a reason.
_PHASE_NAMES = {
    RunState.PREPARING: "prepare",
    RunState.BOOTING: "preboot",
    RunState.AGENT: "agent",
    RunState.TESTING: "test",
    RunState.PUBLISHING: "publish",
}
MISSING_MODEL_KEY = (
    "agent preset {preset} calls the {provider} API, but the server has no {name} for it: set "
    "TRIMO_SECRET_{name} in Trimo's environment, or a value in [secrets.{name}] of its settings; "
    "the key stays in the model gateway"
)


class Observer(Protocol):
    """Who watches a run as it goes: the terminal, the GitHub reporter."""

    def state(self, run: Run) -> None: ...
    def logs(self, run: Run, lines: list[str]) -> None: ...


class NullObserver:
    def state(self, run: Run) -> None:
        pass

    def logs(self, run: Run, lines: list[str]) -> None:
        pass


@dataclass(frozen=True)
class PushTarget:
    """Where a run's commits go instead of the pipeline branch of the run's own remote."""

    url: str
    branch: str


@dataclass
class RunContext:
    """What a run is asked to do, beyond its row in the store."""

    remote: Remote
    extra_secrets: dict[str, str] = field(default_factory=dict)  # e.g. masked tokens
    default_branch: str | None = None
    # Where a new pipeline branch starts instead of the default branch (a fork PR's head ref).
    start_ref: str | None = None
    # The repository whose secret grants apply ("owner/name"); None: the pipeline's repository.
    repo: str | None = None
    # A fork's run: it starts at `start_ref` whatever the pipeline branch holds, gets only the
    # secrets granted to forks, and its commits never go to a branch of the base repository.
    fork: bool = False
    # The commit a person approved: a `start_ref` at any other commit refuses the run.
    approved_sha: str | None = None
    # Set when the run must not start; it ends `rejected` with this reason.
    refusal: str | None = None
    # Where commits are pushed (a fork's head branch); None: the pipeline branch of `remote`.
    push_to: PushTarget | None = None
    # Nothing is pushed: the result is offered as a patch (also when a push is denied).
    patch_only: bool = False
    # A token for each push, renewed when near expiry; called with True after a 401.
    token: Callable[[bool], str] | None = None


class _Control:
    """Who may stop a run's container, and why it was stopped (the first reason wins)."""

    def __init__(self, engine: Engine, run_id: int, engine_breaks: int = 0) -> None:
        self.engine = engine
        self.run_id = run_id
        # How often the engine had gone away when the run started (see EngineWatch).
        self.engine_breaks = engine_breaks
        self.container_id: str | None = None
        self.reasons: list[RunState] = []
        self.detail: str | None = None
        self.lock = threading.Lock()
        # Set at the first stop: what runs before the container (the image build) ends early.
        self.stopped = threading.Event()

    def stop(self, reason: RunState, detail: str | None = None) -> None:
        """Record why, then stop the container; raises only when the engine could not stop it
        (the watchdog tries again). A second call stops again, with the first reason kept."""
        with self.lock:
            first = not self.reasons
            if first:
                self.reasons.append(reason)
                self.detail = detail
                self.stopped.set()
            cid = self.container_id
        if first:
            what = "requeue" if reason == RunState.QUEUED else reason.value
            try:
                self.engine.store.add_event(
                    self.run_id, "stop", f"stopping the container: {what}", {"detail": detail}
                )
            except Exception as exc:  # noqa: BLE001 - the container must stop all the same
                log.warning("run %s: could not record the stop (%s)", self.run_id, exc)
        if cid is not None:
            self.engine.runtime.stop(cid, STOP_GRACE_SECONDS)


class BudgetSpent(TrimoError):
    """The run may not call a model at all: its installation's daily cap is spent."""


class EngineLost(TrimoError):
    """The run's Docker engine stopped or restarted under it; the message says when."""


@dataclass
class _Outcome:
    state: RunState
    reason: str | None = None
    tail: list[str] = field(default_factory=list)
    # The test command's exit code, from the runner's `tests` event; None when no test phase ran.
    tests_exit_code: int | None = None


class Engine:
    """Executes claimed runs. One instance serves many runs, on as many threads as it likes."""

    def __init__(
        self,
        store: Store,
        workspace: Workspace,
        runtime: DockerRuntime,
        owner: str,
        secrets: Secrets,
        default_timeout: int = 1800,
        git_author: tuple[str, str] = ("Trimo", "trimo@localhost"),
        heartbeat_seconds: int = 5,
        extra_ca_certs: Path | None = None,
        network_limits: NetworkLimits | None = None,
        models: ModelPolicy | None = None,
        image_build_timeout: int = DEFAULT_IMAGE_BUILD_TIMEOUT,
        lease: LeaseTerms | None = None,
    ) -> None:
        self.store = store
        self.workspace = workspace
        self.runtime = runtime
        self.owner = owner
        self.secrets = secrets
        self.default_timeout = default_timeout
        self.git_author = git_author
        self.heartbeat_seconds = heartbeat_seconds
        self.extra_ca_certs = extra_ca_certs
        self.network_limits = network_limits or NetworkLimits()
        self._host_addresses = host_addresses()
        self.models = models or ModelPolicy()
        self.image_build_timeout = image_build_timeout
        # The runs this engine executes now, by id: what `requeue` can reach.
        self._controls: dict[int, _Control] = {}
        self._controls_lock = threading.Lock()
        self.leases = LeaseKeeper(store, owner, lease or LeaseTerms())
        # Egress proxies started for runs to come (egress.py): the next run takes one.
        self.spares = Spares()

    @property
    def docker(self) -> docker.DockerClient:
        return self.runtime.client

    # -- the run ---------------------------------------------------------------------------------

    def claim(self, run_id: int | None = None) -> Run | None:
        """Claim the oldest queued run (or `run_id`) for this engine's worker, under a lease
        that `execute` keeps renewed."""
        return self.store.claim_run(
            self.owner,
            run_id,
            host=socket.gethostname(),
            engine_id=self.runtime.engine_id,
            lease=self.leases.terms.length,
        )

    def execute(self, run: Run, ctx: RunContext, observer: Observer | None = None) -> Run:
        """Drive a claimed run (state `preparing`) to a finished state, or back to `queued` when
        `requeue` was asked for; returns its final row."""
        with about_run(run.id):
            return self._execute(run, ctx, observer)

    def requeue(self, run_id: int, why: str) -> bool:
        """Stop a run this engine executes, checkpoint its work and put it back in the queue, so
        another worker resumes it; False when the run is not executing here."""
        with self._controls_lock:
            control = self._controls.get(run_id)
        if control is None:
            return False
        control.stop(RunState.QUEUED, why)
        return True

    def _execute(self, run: Run, ctx: RunContext, observer: Observer | None) -> Run:
        obs = observer or NullObserver()
        masker = Masker(ctx.extra_secrets.values())
        if run.reason:
            # A run resumed after a requeue: why it went back to the queue is in its events,
            # and no longer why it is where it is.
            self.store.update_run(run.id, reason=None)
            run = dataclasses.replace(run, reason=None)
        obs.state(run)
        container_id: str | None = None
        network: list[RunNetwork] = []
        gateway: Gateway | None = None
        gateway_network: str | None = None
        watch = self.runtime.watch()
        watch.wait_connected(2)
        control = _Control(self, run.id, watch.breaks)
        with self._controls_lock:
            self._controls[run.id] = control
        # Renewed from the keeper's thread whatever this one is doing, until the run is over.
        lease_lost = threading.Event()

        def on_lease_lost() -> None:
            lease_lost.set()
            control.stop(RunState.ERROR, LEASE_LOST)

        lease = contextlib.ExitStack()
        lease.enter_context(self.leases.hold(run.id, on_lease_lost))
        try:
            if ctx.refusal:
                raise RunRefused(ctx.refusal)
            checkout, config, image, spec, secrets, model_keys = self._prepare(
                run, ctx, masker, obs, network, control.stopped
            )
            masker = Masker([*ctx.extra_secrets.values(), *secrets.values(), *model_keys.values()])
            agent = self._preset(run, config)
            agent_env: dict[str, str] = {}
            if agent is not None:
                image = self._agent_layer(run, image, agent, masker, obs)
                spec = dataclasses.replace(spec, image=image)
                if network:
                    # The gateway joins the run's network beside its proxy, once both are up.
                    network[0].ready()
                else:
                    # `network: none`: a network of the run's own that holds the gateway only.
                    gateway_network = run_network(self.runtime, spec)
                    spec = dataclasses.replace(spec, network=spec.name or "")
                gateway = self._gateway(run, config, agent, model_keys, spec, control)
                agent_env = agent.env(
                    gateway.base_url(agent.provider),
                    gateway.token,
                    config.agent.model,
                    config.agent.max_turns,
                )
                if agent.name == "aider" and config.test.command:
                    agent_env["TRIMO_AGENT_TEST_COMMAND"] = config.test.command
            if lease_lost.is_set():
                raise TrimoError(LEASE_LOST)
            container_id = self._create(
                run, checkout, config, spec, secrets, network, agent, agent_env
            )
            with control.lock:
                control.container_id = container_id
            outcome, out_dir = self._watch(
                run, container_id, config, masker, obs, control, agent, network
            )
            # Every value the run was given (and the model keys it was not): none of them may
            # leave in what Trimo publishes.
            handed_out = {**ctx.extra_secrets, **secrets, **model_keys}
            if gateway is not None:
                handed_out["TRIMO_MODEL_TOKEN"] = gateway.token
                # The token ends with the run's container; the gateway leaves the run's network
                # before the network goes, and its last usage is in the report before publishing.
                gateway.close()
                gateway = None
            # Its results are out: the container goes now, and so its network (which the proxy
            # left when the container exited) can go while the result is published.
            self.runtime.remove(container_id)
            container_id = None
            for net in network:
                net.run_gone()
            try:
                outcome = self._finish(
                    run, checkout, config, outcome, out_dir, masker, obs, ctx, handed_out
                )
            finally:
                if out_dir is not None:
                    shutil.rmtree(out_dir, ignore_errors=True)
        except RunRefused as exc:
            outcome = _Outcome(RunState.REJECTED, str(exc))
        except ConfigError as exc:
            outcome = _Outcome(RunState.ERROR, f"invalid configuration: {exc}")
        except BudgetSpent as exc:
            outcome = _Outcome(RunState.BUDGET_EXCEEDED, str(exc))
        except ImageBuildError as exc:
            if control.reasons == [RunState.QUEUED]:  # stopped to be requeued: nothing failed
                outcome = _Outcome(RunState.QUEUED)
            else:
                outcome = _Outcome(RunState.ERROR, f"image build failed: {exc}", list(exc.tail))
        except EngineLost as exc:
            outcome = _Outcome(RunState.ERROR, str(exc))
        except TrimoError as exc:
            lost = self._engine_lost(run, control.engine_breaks, settle=0)
            outcome = _Outcome(RunState.ERROR, lost or str(exc))
        except docker.errors.DockerException as exc:
            lost = self._engine_lost(run, control.engine_breaks, ENGINE_SETTLE_SECONDS)
            outcome = _Outcome(RunState.ERROR, lost or f"Docker engine error: {exc}")
        except ENGINE_UNREACHABLE as exc:
            lost = self._engine_lost(run, control.engine_breaks, ENGINE_SETTLE_SECONDS)
            detail = ENGINE_UNANSWERED.format(url=self.runtime.url, detail=exc)
            outcome = _Outcome(RunState.ERROR, lost or detail)
        except Exception as exc:
            log.exception("run %s failed unexpectedly", run.id)
            outcome = _Outcome(RunState.ERROR, f"internal error: {type(exc).__name__}: {exc}")
        finally:
            if gateway is not None:
                gateway.close()
            if container_id is not None:
                self.runtime.remove(container_id)
            for net in network:
                net.close()
                self._report_blocked(run, net)
            if gateway_network is not None:
                self.runtime.remove_network(gateway_network)
            with self._controls_lock:
                self._controls.pop(run.id, None)
            # Held until here: what the run made is gone, and only its final state is left.
            lease.close()
        reason = masker.mask(outcome.reason) if outcome.reason else None
        fields: dict[str, Any] = {}
        if outcome.tail:
            fields["error"] = masker.mask("\n".join(outcome.tail))
        current = self.store.get_run(run.id)
        if outcome.state == RunState.CANCELLED:
            if current.superseded_by:
                reason = f"superseded by run {current.superseded_by}"
            elif current.cancel_reason:
                reason = masker.mask(current.cancel_reason)
        if outcome.state == RunState.QUEUED:
            # Nobody owns it now: the next claim takes it, like any queued run.
            # (set_state: back in the queue, no worker holds it.)
            fields.update(container_id=None)
            if control.detail:
                reason = masker.mask(REQUEUED.format(why=control.detail))
        final = self.store.set_state(
            run.id, outcome.state, expect=ACTIVE, owner=self.owner, reason=reason, **fields
        )
        obs.state(final)
        return final

    # -- preparing: workspace, config, image ----------------------------------------------------

    def _prepare(
        self,
        run: Run,
        ctx: RunContext,
        masker: Masker,
        obs: Observer,
        network: list[RunNetwork],
        stopped: threading.Event | None = None,
    ) -> tuple[Checkout, RepoConfig, str, ContainerSpec, dict[str, str], dict[str, str]]:
        pipeline = self.store.get_pipeline(run.pipeline_id)
        checkout = self.workspace.prepare(
            ctx.remote,
            pipeline.branch,
            ctx.default_branch,
            start_ref=ctx.start_ref,
            follow_branch=not ctx.fork,
        )
        self.store.add_event(
            run.id,
            "mirror",
            checkout.sync.describe(),
            {"cloned": checkout.sync.cloned, "refs": checkout.sync.refs_updated},
        )
        if ctx.approved_sha and checkout.base != ctx.approved_sha:
            moved = HEAD_MOVED.format(approved=ctx.approved_sha[:7], head=checkout.base[:7])
            raise RunRefused(moved)
        self.store.update_run(run.id, base_sha=checkout.base)
        branch_note = "created" if checkout.new_branch else "reused"
        self.store.add_event(
            run.id,
            "branch",
            f"branch {checkout.branch} {branch_note} at {checkout.base[:12]}",
            {"new": checkout.new_branch},
        )
        # Configuration and the image come from the default branch, never from the run's branch
        # or a pull request's head: a PR cannot change what runs with the run's secrets.
        raw = self.workspace.read_file(checkout, checkout.default_head, CONFIG_FILE)
        config = parse_repo_config(raw.decode("utf-8", "replace")) if raw else RepoConfig()
        # Grants are checked before the image build and the run's network: a refused run
        # starts no container.
        secrets = self._secrets(run, config, ctx)
        preset = self._preset(run, config)
        model_keys = self._model_keys(run, preset, ctx) if preset is not None else {}
        policy = self._policy(run, config, obs)
        # Unique on the engine, which other stores (another data directory, another server)
        # share: their run numbers start at 1 too, and may start in the same second.
        name = f"trimo-run-{run.id}-{token_hex(4)}"
        spec = ContainerSpec(
            image="",  # known once the image is built or found
            run_id=run.id,
            pipeline_id=run.pipeline_id,
            owner=self.owner,
            cpus=config.resources.cpus,
            memory_bytes=config.resources.memory_bytes,
            pids=config.resources.pids,
            network="none" if policy.mode == NetworkMode.NONE else name,
            name=name,
            store=self.store.key,
        )
        base_ready = threading.Event()
        if policy.mode != NetworkMode.NONE:
            # Network and proxy are made while the image is checked or built.
            network.append(
                RunNetwork(
                    self.runtime,
                    spec,
                    policy,
                    self._on_blocked(run, obs),
                    lambda: self._proxy_image(base_ready),
                    self.spares,
                )
            )
        try:
            image = self._image(run, checkout, config, masker, obs, base_ready, stopped)
        finally:
            base_ready.set()
        self.store.update_run(run.id, image_tag=image)
        spec = dataclasses.replace(spec, image=image)
        return checkout, config, image, spec, secrets, model_keys

    def _image(
        self,
        run: Run,
        checkout: Checkout,
        config: RepoConfig,
        masker: Masker,
        obs: Observer,
        base_ready: threading.Event,
        stopped: threading.Event | None = None,
    ) -> str:
        def progress(line: str) -> None:
            # A build can take minutes: its steps are shown as they happen.
            masked = [masker.mask(line)]
            self.store.add_logs(run.id, masked)
            obs.logs(run, masked)

        base = images.ensure_base(self.docker, progress, self.extra_ca_certs)
        base_ready.set()
        with tempfile.TemporaryDirectory(prefix="trimo-ctx-") as tmp:
            dest = Path(tmp) / CONFIG_DIR
            self.workspace.extract_dir(checkout, checkout.default_head, CONFIG_DIR, dest)
            # Trimo's own configuration is not the image's: a new budget, timeout or network
            # setting must not rebuild the image (and every agent layer on top of it).
            for name in CONFIG_NAMES:
                (dest / name).unlink(missing_ok=True)
            dockerfile = dest / config.image.dockerfile
            if not dockerfile.is_file():
                self.store.add_event(
                    run.id,
                    "image",
                    f"image {base.tag} (no .trimo/Dockerfile)",
                    {"built": False, "tag": base.tag},
                )
                return base.tag
            started = time.monotonic()
            result = images.build_image(
                self.docker,
                dest,
                dockerfile=config.image.dockerfile,
                name=_project_name(checkout),
                progress=progress,
                timeout=config.image.build_timeout_within(self.image_build_timeout),
                stop=stopped,
            )
            what = "built" if result.built else "reused"
            self.store.add_event(
                run.id,
                "image",
                f"image {result.tag} {what} in {time.monotonic() - started:.1f}s",
                {"built": result.built, "tag": result.tag, "hash": result.context_hash},
            )
            return result.tag

    def _secrets(self, run: Run, config: RepoConfig, ctx: RunContext) -> dict[str, str]:
        names = config.secret_names()
        if not names:
            return {}
        repo = ctx.repo or self.store.get_pipeline(run.pipeline_id).repo
        return self.secrets.resolve(names, repo, fork=ctx.fork)

    # -- the agent preset: its layer and its model gateway -------------------------------------

    def _preset(self, run: Run, config: RepoConfig) -> Preset | None:
        """The agent preset the run uses: `trimo run --agent <preset>` or `agent.preset`."""
        if run.mode == RunMode.TESTS:
            return None
        if run.agent_command:
            return PRESETS.get(run.agent_command.strip())
        return PRESETS.get(config.agent.preset or "")

    def _agent_layer(
        self, run: Run, image: str, agent: Preset, masker: Masker, obs: Observer
    ) -> str:
        def progress(line: str) -> None:
            masked = [masker.mask(line)]
            self.store.add_logs(run.id, masked)
            obs.logs(run, masked)

        started = time.monotonic()
        result = build_agent_layer(self.docker, image, agent.name, progress)
        what = "built" if result.built else "reused"
        self.store.add_event(
            run.id,
            "image",
            f"agent layer {result.tag} ({agent.name}) {what} in {time.monotonic() - started:.1f}s",
            {"built": result.built, "tag": result.tag, "hash": result.context_hash},
        )
        self.store.update_run(run.id, image_tag=result.tag)
        return result.tag

    def _model_keys(self, run: Run, agent: Preset, ctx: RunContext) -> dict[str, str]:
        """The provider key the preset's calls need: a server secret granted to the repository
        like any other, handed to the gateway only."""
        provider = next(p for p in self.models.providers() if p.name == agent.provider)
        repo = ctx.repo or self.store.get_pipeline(run.pipeline_id).repo
        try:
            return self.secrets.resolve([provider.secret], repo, fork=ctx.fork)
        except MissingSecretError:
            raise TrimoError(
                MISSING_MODEL_KEY.format(
                    preset=agent.name, provider=provider.name, name=provider.secret
                )
            ) from None

    def _gateway(
        self,
        run: Run,
        config: RepoConfig,
        agent: Preset,
        keys: dict[str, str],
        run_spec: ContainerSpec,
        control: _Control,
    ) -> Gateway:
        # Here, not at the top: only runs of an agent preset need the gateway (and aiohttp), and
        # every `trimo` command imports this module.
        from bot.gateway.sidecar import GatewaySpec, start_gateway

        usd = config.agent.budget.usd
        if self.models.daily_usd is not None:
            pipeline = self.store.get_pipeline(run.pipeline_id)
            midnight = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
            spent = self.store.model_usd_since(pipeline.installation_id, midnight)
            left = self.models.daily_usd - spent
            if left <= 0:
                raise BudgetSpent(DAILY_CAP_SPENT.format(spent=spent, cap=self.models.daily_usd))
            usd = left if usd is None else min(usd, left)
        spec = GatewaySpec(
            run=run_spec,
            providers=[p for p in self.models.providers() if p.name == agent.provider],
            keys=keys,
            budget_tokens=config.agent.budget.tokens,
            budget_usd=usd,
            prices=dict(self.models.prices),
        )

        def on_event(event: dict[str, Any]) -> None:
            kind = event.get("event")
            if kind == "usage":
                totals = event.get("totals") or {}
                self.store.merge_report(run.id, usage=totals)
                self.store.add_event(
                    run.id,
                    "usage",
                    f"{event.get('model')}: {event.get('input_tokens')} tokens in, "
                    f"{event.get('output_tokens')} out, ${float(event.get('usd') or 0):.4f}",
                    event,
                )
            elif kind == "refused":
                why = str(event.get("reason"))
                self.store.add_event(run.id, "gateway", f"model call refused: {why}", event)
                if why == "budget":
                    control.stop(RunState.BUDGET_EXCEEDED, str(event.get("spent") or ""))

        gateway = start_gateway(self.runtime, spec, on_event, extra_ca_certs=self.extra_ca_certs)
        self.store.add_event(
            run.id,
            "gateway",
            f"model gateway for {agent.provider} started beside the run",
            {"provider": agent.provider},
        )
        return gateway

    # -- the container ------------------------------------------------------------------------

    def _create(
        self,
        run: Run,
        checkout: Checkout,
        config: RepoConfig,
        spec: ContainerSpec,
        secrets: dict[str, str],
        network: list[RunNetwork],
        preset: Preset | None = None,
        agent_env: dict[str, str] | None = None,
    ) -> str:
        if preset is not None:
            agent: str | None = AGENT_ADAPTER
        else:
            agent = (
                None if run.mode == RunMode.TESTS else (run.agent_command or config.agent_command())
            )
        agent_env = agent_env or {}
        cid = self.runtime.create(dataclasses.replace(spec, env={**secrets, **agent_env}))
        try:
            self._fill(run, cid, checkout, config, agent, secrets, agent_env, network)
        except BaseException:
            self.runtime.remove(cid)
            raise
        return cid

    def _fill(
        self,
        run: Run,
        cid: str,
        checkout: Checkout,
        config: RepoConfig,
        agent: str | None,
        secrets: dict[str, str],
        agent_env: dict[str, str],
        network: list[RunNetwork],
    ) -> None:
        self.store.update_run(run.id, container_id=cid)
        run_json = {
            "run_id": run.id,
            "base": checkout.base,
            "agent_command": agent,
            "test_command": config.test.command,
            "secret_names": sorted(secrets),
            "agent_env_names": sorted(agent_env),
            "heartbeat_seconds": self.heartbeat_seconds,
            # The runner's own backstop: it stops the agent and the tests after this long, even
            # when no worker is left to stop its container.
            "deadline_seconds": config.timeout_or(self.default_timeout)
            + RUNNER_DEADLINE_MARGIN_SECONDS,
            "git_author": {"name": self.git_author[0], "email": self.git_author[1]},
            "proxy": PROXY_URL if network else None,
        }
        # Rooted at "workspace" and put at "/", so /workspace itself is the agent's too.
        with self.workspace.checkout_tar(checkout, root=WORKSPACE.strip("/")) as tar:
            self.runtime.put_archive(cid, "/", tar.read())
        inputs = {
            f"{IN_DIR.lstrip('/')}/run.json": json.dumps(run_json),
            f"{IN_DIR.lstrip('/')}/task.md": _task_text(run),
        }
        self.runtime.put_archive(cid, "/", files_tar(inputs))
        for net in network:
            net.ready()  # the run's container joins a network whose proxy answers

    # -- the network ---------------------------------------------------------------------------

    def _policy(self, run: Run, config: RepoConfig, obs: Observer) -> NetworkPolicy:
        net = config.network
        policy = resolve_policy(
            net.mode, net.presets, net.allow, self.network_limits, self._host_addresses
        )
        lines = [line for line in (net.old_form_note(), *policy.notes) if line]
        lines.append(policy.describe())
        self.store.add_logs(run.id, lines)
        obs.logs(run, lines)
        self.store.add_event(
            run.id, "network", policy.describe(), {"mode": policy.mode.value, "hosts": policy.allow}
        )
        return policy

    def _proxy_image(self, base_ready: threading.Event) -> str:
        # FROM the base: once it is ensured, the proxy follows it by content hash (a lookup when
        # nothing changed).
        base_ready.wait()
        return ensure_proxy_image(self.docker)

    def _on_blocked(self, run: Run, obs: Observer) -> Callable[[Blocked], None]:
        def blocked(refusal: Blocked) -> None:
            line = [refusal.log_line()]
            self.store.add_logs(run.id, line)
            self.store.add_event(
                run.id,
                EGRESS_DENIED,
                line[0],
                {"host": refusal.host, "port": refusal.port, "rule": refusal.rule},
            )
            obs.logs(run, line)

        return blocked

    def _report_blocked(self, run: Run, net: RunNetwork) -> None:
        rows = summarize(net.blocked)
        if not rows:
            return
        report = dict(self.store.get_run(run.id).report or {})
        report["network_blocked"] = rows
        self.store.update_run(run.id, report=report)
        self.store.add_logs(run.id, ["network: blocked hosts", *blocked_text(rows)])

    def _watch(
        self,
        run: Run,
        cid: str,
        config: RepoConfig,
        masker: Masker,
        obs: Observer,
        control: _Control | None = None,
        preset: Preset | None = None,
        network: Sequence[RunNetwork] = (),
    ) -> tuple[_Outcome, Path | None]:
        timeout = config.timeout_or(self.default_timeout)
        control = control or _Control(self, run.id, self.runtime.watch().breaks)
        control.container_id = cid
        stop = control.stop
        finished = threading.Event()
        parser = preset.parser() if preset is not None else None
        phase = ""

        def cancelled() -> RunState | None:
            return RunState.CANCELLED if self.store.get_run(run.id).cancel_requested else None

        watchdog = Watchdog(run.id, timeout, cancelled, stop, CANCEL_POLL_SECONDS)
        with control.lock:
            stopped_early = list(control.reasons)
        if stopped_early:
            # Asked to stop (a requeue, say) before its container ever ran: it never starts.
            return _outcome(-1, {}, stopped_early, timeout), None
        self.runtime.start(cid)
        with control.lock:
            late = list(control.reasons)
        if late:  # asked between the look above and the start
            stop(late[0])
        watchdog.start(finished)
        events: dict[str, dict[str, Any]] = {}
        buffer: list[str] = []
        buffer_lock = threading.Lock()
        last_flush = time.monotonic()

        def flush() -> None:
            nonlocal last_flush
            with buffer_lock:
                lines = list(buffer)
                buffer.clear()
                if lines:
                    self.store.add_logs(run.id, lines)
                last_flush = time.monotonic()
            if lines:
                obs.logs(run, lines)

        def flush_quiet_lines() -> None:
            # A line followed by silence would otherwise wait for the next one: people watch
            # the log live, so nothing waits longer than LOG_FLUSH_SECONDS.
            while not finished.wait(LOG_FLUSH_SECONDS):
                if buffer and time.monotonic() - last_flush >= LOG_FLUSH_SECONDS:
                    flush()

        threading.Thread(target=flush_quiet_lines, name=f"run-{run.id}-log", daemon=True).start()
        try:
            for line in self.runtime.lines(cid):
                event = parse_line(line)
                steps = parser.feed(line) if parser and event is None and phase == "agent" else None
                if steps is not None:
                    flush()
                    self._steps(run, steps, masker, obs)
                    continue
                if event is None:
                    with buffer_lock:
                        buffer.append(masker.mask(line))
                        due = (
                            len(buffer) >= LOG_FLUSH_LINES
                            or time.monotonic() - last_flush > LOG_FLUSH_SECONDS
                        )
                    if due:
                        flush()
                    continue
                flush()
                events[event.kind] = event.data
                if event.kind == "heartbeat":
                    # The run's liveness is its worker's lease (bot/leases.py), renewed in every
                    # phase; the runner's heartbeat only shows its stream is alive.
                    continue
                self.store.add_event(
                    run.id, "event", event.kind, cast(dict[str, Any], masker.mask_obj(event.data))
                )
                if event.kind == "phase":
                    phase = str(event.data.get("phase"))
                    state = _PHASE_STATES.get(phase)
                    if state is not None:
                        obs.state(
                            self.store.set_state(run.id, state, expect=ACTIVE, owner=self.owner)
                        )
                    if state in (RunState.AGENT, RunState.TESTING):
                        # Preboot is done: the next run's spare proxy starts while this one's
                        # agent mostly waits (on its model), not while the container boots.
                        for net in network:
                            net.started()
            flush()
            code = self.runtime.wait(cid)
        finally:
            finished.set()
            # The proxy and network go while the results are fetched and published.
            for net in network:
                net.release()
        if not control.reasons and code != ExitCode.SUCCESS:
            # Nobody here stopped it: was it its engine, going down?
            settle = 0 if code in _RESULT_CODES else ENGINE_SETTLE_SECONDS
            lost = self._engine_lost(run, control.engine_breaks, settle)
            if lost is not None:
                raise EngineLost(lost)
        out_dir = Path(tempfile.mkdtemp(prefix=f"trimo-run-{run.id}-"))
        self._fetch_results(run, cid, out_dir)
        outcome = _outcome(code, events, control.reasons, timeout)
        if outcome.state == RunState.BUDGET_EXCEEDED:
            outcome = _Outcome(outcome.state, BUDGET_EXCEEDED.format(spent=control.detail))
        return outcome, out_dir

    def _engine_lost(self, run: Run, breaks: int, settle: float) -> str | None:
        """Why the run ended, when its engine went away since it started (`breaks`; looking for
        up to `settle` seconds); None when the engine stayed. Waits for the engine to be back,
        so that what the run made there can still be removed."""
        watch = self.runtime.watch()
        deadline = time.monotonic() + settle
        while watch.breaks == breaks:
            if self.runtime.problem(fresh=True) is not None:
                break
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.2)
        state = self.store.get_run(run.id).state
        phase = _PHASE_NAMES.get(state, state.value)
        self.store.add_event(run.id, "engine", f"the Docker engine at {self.runtime.url} went away")
        if self.runtime.wait_until_up(ENGINE_RETURN_SECONDS):
            return ENGINE_RESTARTED.format(url=self.runtime.url, phase=phase)
        return ENGINE_GONE.format(
            url=self.runtime.url,
            phase=phase,
            seconds=int(ENGINE_RETURN_SECONDS),
            detail=self.runtime.problem(fresh=True) or "no answer",
        )

    def _steps(self, run: Run, steps: list[Step], masker: Masker, obs: Observer) -> None:
        """The agent's transcript: each step a run event, readable in `trimo runs logs`."""
        for step in steps:
            text = masker.mask(step.describe())
            data = cast(dict[str, Any], masker.mask_obj(step.data()))
            self.store.add_event(run.id, "step", text, data)
            obs.logs(run, [f"▸ {text}"])

    def _fetch_results(self, run: Run, cid: str, out_dir: Path) -> None:
        """Copies out what the runner hands back, each from the place only its writer can write:
        the bundle (the runner), the summary (the agent), the test reports (the test phase)."""
        self.runtime.fetch_file(cid, f"{OUT_DIR}/{BUNDLE_NAME}", out_dir / BUNDLE_FILE)
        self.runtime.fetch_dir(cid, TESTS_OUT_DIR, out_dir / TESTS_DIR)
        try:
            self.runtime.fetch_file(
                cid,
                f"{AGENT_OUT_DIR}/{SUMMARY_NAME}",
                out_dir / SUMMARY_FILE,
                max_bytes=MAX_SUMMARY_BYTES,
            )
        except RuntimeError:
            self.store.add_event(
                run.id, "summary", SUMMARY_TOO_LARGE.format(limit=MAX_SUMMARY_BYTES)
            )

    # -- publishing and the report -------------------------------------------------------------

    def _finish(
        self,
        run: Run,
        checkout: Checkout,
        config: RepoConfig,
        outcome: _Outcome,
        out_dir: Path | None,
        masker: Masker,
        obs: Observer,
        ctx: RunContext,
        handed_out: dict[str, str],
    ) -> _Outcome:
        fields: dict[str, Any] = {}
        report: TestReport | None = None
        if out_dir is not None:
            # Only the folder the test phase wrote: nothing the agent left counts as a result.
            tests_dir = out_dir / TESTS_DIR
            if tests_dir.is_dir():
                report = parse_junit(sorted(tests_dir.glob(config.test.junit)))
            if report is not None:
                fields.update(_test_fields(report, masker))
            summary = out_dir / SUMMARY_FILE
            if summary.is_file():
                fields["summary"] = masker.mask(
                    summary.read_text(errors="replace")[:MAX_SUMMARY_CHARS]
                )
        if outcome.tests_exit_code is not None:
            self.store.merge_report(
                run.id, tests={"exit_code": outcome.tests_exit_code, "junit": report is not None}
            )
        if fields:
            self.store.update_run(run.id, **fields)
        bundle = out_dir / BUNDLE_FILE if out_dir is not None else None
        if bundle is None or not bundle.is_file():
            return outcome
        publishing = self.store.set_state(
            run.id, RunState.PUBLISHING, expect=ACTIVE, owner=self.owner
        )
        obs.state(publishing)
        if publishing.state != RunState.PUBLISHING:
            # Finished meanwhile (its lease lost, and the run reaped): nothing is published.
            return outcome
        try:
            result = self.workspace.import_bundle(checkout, bundle, run_id=run.id)
            self._keep_result(run, checkout, result)
            self._publish(run, checkout, config, result, ctx, masker, handed_out)
        except SecretInResult as exc:
            hits = [hit.__dict__ for hit in exc.hits]
            self.store.add_event(
                run.id, "publish", masker.mask(str(exc)), {"pushed": False, "secrets": hits}
            )
            self.store.merge_report(run.id, secrets=hits)
            return _Outcome(
                RunState.REJECTED, f"result not published: {masker.mask(str(exc))}", outcome.tail
            )
        except PublishRefused as exc:
            self.store.add_event(run.id, "publish", masker.mask(str(exc)), {"pushed": False})
            return _Outcome(
                RunState.FAILED, f"result not published: {masker.mask(str(exc))}", outcome.tail
            )
        except WorkspaceError as exc:
            return _Outcome(
                RunState.ERROR, f"publishing failed: {masker.mask(str(exc))}", outcome.tail
            )
        return outcome

    def _keep_result(self, run: Run, checkout: Checkout, result: Result) -> None:
        """Where the run's commits are, whether or not they are published: the operator can see
        them (`trimo runs show ID --patch`) when a publication is refused."""
        # Merged in place: the run's gateway may be adding its usage to the report meanwhile.
        self.store.merge_report(
            run.id,
            result={
                "mirror": str(checkout.mirror),
                "ref": result.ref,
                "base": result.base,
                "head": result.head,
            },
        )

    def _publish(
        self,
        run: Run,
        checkout: Checkout,
        config: RepoConfig,
        result: Result,
        ctx: RunContext,
        masker: Masker,
        handed_out: dict[str, str],
    ) -> None:
        self.workspace.check_protected(result, config.protected_paths)
        # Before any push or patch: nothing leaves carrying a value the run was given.
        refuse_secrets(handed_out, checkout.mirror, result.base, result.head, run.id)
        if not result.commits and (ctx.patch_only or ctx.fork):
            return
        target = ctx.push_to or PushTarget(checkout.remote.url, checkout.branch)
        denied = None
        if not ctx.patch_only:
            try:
                self._push(checkout, result, target, ctx)
            except PushDenied as exc:
                if not ctx.fork:
                    raise
                denied = masker.mask(str(exc))
        commits = [list(c) for c in result.commits]
        if ctx.patch_only or denied is not None:
            self._keep_patch(run, checkout, result, commits, denied)
            return
        self.store.update_run(run.id, head_sha=result.head, commits=len(result.commits))
        # Merged, not rewritten: the gateway's usage lands in the same report meanwhile.
        self.store.merge_report(run.id, commits=commits, branch=target.branch, pushed_to=target.url)
        self.store.add_event(
            run.id,
            "publish",
            f"pushed {len(result.commits)} commit(s) to {target.branch} ({result.head[:12]})",
            {"pushed": True, "head": result.head, "commits": len(result.commits)},
        )

    def _push(
        self, checkout: Checkout, result: Result, target: PushTarget, ctx: RunContext
    ) -> None:
        """Push with a token fresh enough for the push; after a 401, once more with a new one."""
        for renew in (False, True):
            token = ctx.token(renew) if ctx.token is not None else checkout.remote.token
            try:
                self.workspace.publish(
                    checkout, result, Remote(target.url, token=token), branch=target.branch
                )
                return
            except PushDenied as exc:
                if renew or not exc.unauthorized or ctx.token is None:
                    raise

    def _keep_patch(
        self,
        run: Run,
        checkout: Checkout,
        result: Result,
        commits: list[list[str]],
        denied: str | None,
    ) -> None:
        """Nothing was pushed: the commits are kept with the run as a `git am`-able patch."""
        patch = self.workspace.format_patch(checkout, result)
        path = self.workspace.data_dir / "patches" / f"run-{run.id}.patch"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(patch)
        why = f"the push was refused ({denied})" if denied else NO_EDITS
        self.store.update_run(run.id, commits=len(result.commits))
        self.store.merge_report(
            run.id,
            commits=commits,
            patch_path=str(path),
            patch=patch if len(patch) <= PATCH_SHOWN_MAX else None,
            not_pushed=why,
        )
        self.store.add_event(
            run.id,
            "publish",
            f"nothing pushed ({why}); {len(result.commits)} commit(s) kept as a patch: {path}",
            {"pushed": False, "patch": str(path), "commits": len(result.commits)},
        )


_PHASE_STATES = {
    "booting": RunState.BOOTING,
    "agent": RunState.AGENT,
    "testing": RunState.TESTING,
}


def _outcome(
    code: int, events: dict[str, dict[str, Any]], stop_reason: list[RunState], timeout: int
) -> _Outcome:
    outcome = _state_of(code, events, stop_reason, timeout)
    tests = events.get("tests")
    if tests is not None and isinstance(tests.get("exit_code"), int):
        outcome.tests_exit_code = int(tests["exit_code"])
    return outcome


def _state_of(
    code: int, events: dict[str, dict[str, Any]], stop_reason: list[RunState], timeout: int
) -> _Outcome:
    failure = events.get("failure", {})
    tail = [str(x) for x in failure.get("tail", [])]
    if stop_reason:
        state = stop_reason[0]
        if state == RunState.TIMED_OUT:
            return _Outcome(state, TIMED_OUT.format(seconds=timeout))
        if state in (RunState.BUDGET_EXCEEDED, RunState.QUEUED):
            return _Outcome(state)
        return _Outcome(state, CANCELLED)
    if "deadline" in events:
        return _Outcome(RunState.TIMED_OUT, RUNNER_TIMED_OUT.format(seconds=timeout))
    if code == ExitCode.SUCCESS:
        return _Outcome(RunState.SUCCEEDED)
    if code == ExitCode.TESTS_FAILED:
        return _Outcome(RunState.FAILED, TESTS_FAILED, tail)
    if code == ExitCode.AGENT_FAILED:
        return _Outcome(RunState.FAILED, AGENT_FAILED.format(code=failure.get("exit_code")), tail)
    if code == ExitCode.PREBOOT_FAILED:
        return _Outcome(RunState.ERROR, PREBOOT_FAILED.format(code=failure.get("exit_code")), tail)
    if code == ExitCode.RUNNER_ERROR:
        return _Outcome(RunState.ERROR, RUNNER_ERROR.format(detail="; ".join(tail)), tail)
    oom = "killed: out of memory?" if code == 137 else "no done event"
    return _Outcome(RunState.ERROR, CONTAINER_DIED.format(code=code, oom=oom), tail)


def _test_fields(report: TestReport, masker: Masker) -> dict[str, Any]:
    return {
        "tests_passed": report.passed,
        "tests_failed": report.failed,
        "tests_skipped": report.skipped,
        "tests_errors": report.errors,
        "failures": masker.mask_obj([f.__dict__ for f in report.failures][:200]),
    }


def _task_text(run: Run) -> str:
    text = run.task.strip() + "\n"
    if run.instructions:
        text += f"\n## Follow-up instructions\n\n{run.instructions.strip()}\n"
    return text


def _project_name(checkout: Checkout) -> str:
    # Mirrors are named `<repository>-<hash8>.git`: the repository's name is what people know.
    return checkout.mirror.name.removesuffix(".git").rsplit("-", 1)[0]
