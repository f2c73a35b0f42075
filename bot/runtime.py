"""The container runtime: Trimo's containers on a Docker engine, behind a small interface.

Everything goes through the Docker API (archives in and out, logs as a stream), never through host
bind mounts, so the same code drives a local or a remote engine. Every container carries Trimo's
labels, which is how the reaper finds what a crashed run left behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import os
import secrets
import tarfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import docker
import docker.errors
import requests.exceptions
import urllib3.exceptions
from docker.models.containers import Container

log = logging.getLogger(__name__)

LABEL_MANAGED = "trimo.managed"
LABEL_RUN = "trimo.run"
LABEL_PIPELINE = "trimo.pipeline"
LABEL_OWNER = "trimo.owner"
# Which store (deployment) a container belongs to: run ids are only unique within one store, and
# several Trimo instances may share an engine. The reaper touches its own store's containers only.
LABEL_STORE = "trimo.store"
# What a labelled object is to its run: the run's own container, its egress proxy, its network.
LABEL_ROLE = "trimo.role"
ROLE_RUN = "run"
ROLE_PROXY = "proxy"
ROLE_GATEWAY = "gateway"
ROLE_NETWORK = "network"
# A proxy started ahead of any run, paused on the egress network alone and given no policy; the
# one run that unpauses it names it after itself and hands it that run's policy (see egress.py).
ROLE_SPARE = "spare-proxy"
SPARE_PREFIX = "trimo-spare-proxy-"
# A spare nobody claimed for this long is removed by the reaper (a later run starts another).
SPARE_MAX_AGE_SECONDS = 3600
# How long the reaper gives a run that unpaused a spare to rename it before judging the spare.
SPARE_RENAME_SECONDS = 1.0
# The one non-internal network of an engine: proxies reach the internet through it, runs never.
EGRESS_NETWORK = "trimo-egress"
LABEL_EGRESS = "trimo.egress"

# Every capability is dropped; these come back because the runner and preboot (root, before the
# agent) need them. Found by running the three examples with each one left out in turn:
#   CHOWN         the runner hands the agent's and the tests' output folders and /workspace to
#                 uid 1000 (without it every run stops before preboot); Postgres' init script
#                 chowns its socket folder
#   DAC_OVERRIDE  root writes files it does not own: the Django example's preboot appends to the
#                 Celery worker's log, which belongs to the agent user
#   FOWNER        Postgres' init script chmods /var/run/postgresql after handing it to postgres
#   SETGID/SETUID pg_ctlcluster becomes postgres ("Could not change group/user id" without);
#                 the runner becomes the agent; runuser starts Celery as the agent
#   KILL          the runner signals the agent's processes (another uid): on stop and timeout
#                 (without it the runner fails there and the checkpoint is lost) and before the
#                 tests, when it stops what the agent left running
# Left out, among Docker's defaults: NET_RAW (no raw sockets, so no forged packets on the run's
# network), NET_BIND_SERVICE, FSETID, SETPCAP, SETFCAP, MKNOD, SYS_CHROOT, AUDIT_WRITE.
# The agent (uid 1000) holds none: a uid change clears the effective set, and no-new-privileges
# keeps setuid binaries (su, sudo) from giving any back.
RUN_CAPABILITIES = ("CHOWN", "DAC_OVERRIDE", "FOWNER", "SETGID", "SETUID", "KILL")
DEFAULT_MEMORY_BYTES = 4 * 1024**3
DEFAULT_PIDS = 1024
# The proxy is small and needs no capability at all; a thread per direction of each connection.
PROXY_MEMORY_BYTES = 128 * 1024**2
PROXY_PIDS = 512

# Bound what one tar member read from a container may weigh: reports and bundles, not disks.
MAX_ARCHIVE_BYTES = 512 * 1024 * 1024
# What a call raises when the engine is not there at all (stopped, restarting, socket gone, a
# stream cut): docker-py leaves the transport's errors unwrapped.
ENGINE_UNREACHABLE = (
    requests.exceptions.RequestException,
    urllib3.exceptions.HTTPError,
    ConnectionError,
)
DEFAULT_DOCKER_URL = "unix:///var/run/docker.sock"


def engine_client(base_url: str | None = None, timeout: int = 60) -> docker.DockerClient:
    """A client of the engine at `base_url` (else the environment's DOCKER_HOST, as
    docker.from_env reads it).

    On a local socket it reads no proxy settings from the environment: requests would look them
    up in os.environ on every call to the engine, which costs time and, on a thread, fails
    (KeyError) when another thread changes the environment meanwhile. A TCP engine keeps them:
    one may be reached through a proxy.
    """
    if base_url:
        client = docker.DockerClient(base_url=base_url, timeout=timeout)
    else:
        client = docker.from_env(timeout=timeout)
    if not client.api.base_url.startswith(("http://", "https://")):
        client.api.trust_env = False
    return client


@dataclass(frozen=True)
class ContainerSpec:
    """What a run asks of its container."""

    image: str
    run_id: int
    pipeline_id: int
    owner: str
    env: Mapping[str, str] = field(default_factory=dict)
    cpus: float | None = None
    memory_bytes: int | None = None
    pids: int | None = None
    network: str = "bridge"  # a network name: the run's own, "none", or Docker's bridge
    name: str | None = None
    store: str = ""
    extra_labels: Mapping[str, str] = field(default_factory=dict)
    capabilities: tuple[str, ...] = RUN_CAPABILITIES

    def labels(self, role: str = ROLE_RUN) -> dict[str, str]:
        return {
            LABEL_MANAGED: "1",
            LABEL_RUN: str(self.run_id),
            LABEL_PIPELINE: str(self.pipeline_id),
            LABEL_OWNER: self.owner,
            LABEL_STORE: self.store,
            LABEL_ROLE: role,
            **self.extra_labels,
        }


@dataclass(frozen=True)
class ProxySpec:
    """A container beside one run (its egress proxy, its model gateway): on the egress network
    and, as `alias`, on the run's; hardened alike, labelled with the run so it is reaped with it."""

    image: str
    run: ContainerSpec  # whose labels it carries, so it goes with the run
    run_network: str
    alias: str
    env: Mapping[str, str] = field(default_factory=dict)
    role: str = ROLE_PROXY
    user: str = "nobody"
    # The gateway's configuration (its keys) is uploaded before start, which Docker refuses
    # into a read-only root; the proxy needs no file at all.
    read_only: bool = True
    memory_bytes: int = PROXY_MEMORY_BYTES
    pids: int = PROXY_PIDS


@dataclass(frozen=True)
class Leftover:
    """A Trimo-labelled container found by the reaper."""

    container_id: str  # a network's id when kind is "network"
    run_id: int | None
    owner: str
    status: str
    kind: str = "container"
    name: str = ""


class Runtime(Protocol):
    """What the engine needs of a container backend (Docker today; a cluster could be another)."""

    def create(self, spec: ContainerSpec) -> str: ...
    def put_archive(self, container_id: str, path: str, data: bytes) -> None: ...
    def start(self, container_id: str) -> None: ...
    def lines(self, container_id: str) -> Iterator[str]: ...
    def wait(self, container_id: str) -> int: ...
    def stop(self, container_id: str, grace_seconds: int) -> None: ...
    def fetch_dir(self, container_id: str, path: str, dest: Path) -> list[Path]: ...
    def fetch_file(
        self, container_id: str, path: str, dest: Path, max_bytes: int = ...
    ) -> Path | None: ...
    def remove(self, container_id: str) -> None: ...
    def exists(self, container_id: str) -> bool: ...
    def leftovers(self, store: str) -> list[Leftover]: ...


def files_tar(files: Mapping[str, bytes | str], uid: int = 0, mode: int = 0o644) -> bytes:
    """A tar archive holding `files` (relative name → content), for `put_archive`."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        now = time.time()
        for name, content in files.items():
            data = content.encode() if isinstance(content, str) else content
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = int(now)
            info.mode = mode
            info.uid = info.gid = uid
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


class EngineWatch:
    """Counts the times the engine went away (a stop, a restart), as seen from this process.

    It holds the engine's event stream open: the stream has no read timeout, so it ends only
    when the engine closes it or its socket goes. A run compares the count at its start and at
    a container's unexplained end to tell an engine restart from any other death.
    """

    def __init__(self, runtime: DockerRuntime) -> None:
        self.runtime = runtime
        self._breaks = 0
        self._connected = threading.Event()
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._follow, name="trimo-engine-watch", daemon=True)
        self._thread.start()

    @property
    def breaks(self) -> int:
        with self._lock:
            return self._breaks

    def wait_connected(self, seconds: float) -> bool:
        return self._connected.wait(seconds)

    def stop(self) -> None:
        self._stopped.set()

    def _follow(self) -> None:
        while not self._stopped.is_set():
            try:
                stream = self.runtime.client.api.events(filters={"type": "daemon"}, decode=True)
            except (docker.errors.DockerException, *ENGINE_UNREACHABLE):
                self._stopped.wait(0.5)
                continue
            self._connected.set()
            with contextlib.suppress(Exception):  # however it ends, the engine let go of it
                for _event in stream:
                    pass
            self._connected.clear()
            if self._stopped.is_set():
                return
            with self._lock:
                self._breaks += 1
            log.warning("the Docker engine at %s went away; waiting for it", self.runtime.url)
            self._stopped.wait(0.5)


class DockerRuntime:
    """Containers on a Docker engine (local socket or `base_url`)."""

    def __init__(
        self,
        client: docker.DockerClient | None = None,
        base_url: str | None = None,
        url: str | None = None,
    ):
        if client is None:
            client = engine_client(base_url)
        self.client = client
        self._engine_id: str | None = None
        # Given explicitly (else the environment's, as docker.from_env reads it).
        self._given_url = url or base_url
        # What people call this engine in messages: its DOCKER_HOST.
        self.url = self._given_url or os.environ.get("DOCKER_HOST") or DEFAULT_DOCKER_URL
        self._watch: EngineWatch | None = None
        self._watch_lock = threading.Lock()

    def watch(self) -> EngineWatch:
        """The engine's watch, started on first use (only long-lived processes need one)."""
        with self._watch_lock:
            if self._watch is None:
                self._watch = EngineWatch(self)
            return self._watch

    def wait_until_up(self, seconds: float) -> bool:
        """Wait until the engine answers a ping on a new connection; False when it did not
        within `seconds`."""
        deadline = time.monotonic() + seconds
        while True:
            if self.problem(fresh=True) is None:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.5)

    @property
    def engine_id(self) -> str:
        """The engine's own id (`docker info`: one per dockerd and data root), whatever URL
        reaches it: stored with each run, so only a worker on that engine removes its
        containers."""
        if self._engine_id is None:
            self._engine_id = str(self.client.info()["ID"])
        return self._engine_id

    def create(self, spec: ContainerSpec) -> str:
        memory = spec.memory_bytes or DEFAULT_MEMORY_BYTES
        kwargs: dict[str, Any] = {
            "image": spec.image,
            "detach": True,
            "environment": dict(spec.env),
            "labels": spec.labels(),
            "network_mode": spec.network,
            "init": False,  # the image's entrypoint is tini already
            "cap_drop": ["ALL"],
            "cap_add": list(spec.capabilities),
            "security_opt": ["no-new-privileges:true"],
            "mem_limit": memory,
            "memswap_limit": memory,
            "pids_limit": spec.pids or DEFAULT_PIDS,
            # No host mounts, no Docker socket: nothing of the host but what is uploaded.
            "volumes": {},
            "privileged": False,
        }
        if spec.name:
            kwargs["name"] = spec.name
        if spec.cpus:
            kwargs["nano_cpus"] = int(spec.cpus * 1e9)
        container: Container = self.client.containers.create(**kwargs)
        return str(container.id)

    # -- networks and the egress proxy --------------------------------------------------------

    def create_network(self, name: str, spec: ContainerSpec) -> str:
        """The run's own network: internal (no route out) and without an address on the host.

        `inhibit_ipv4` leaves the bridge without the gateway address, so the engine's host is
        not reachable from the run either; only the run and its proxy are on it.
        """
        network = self.client.networks.create(
            name,
            driver="bridge",
            internal=True,
            labels=spec.labels(ROLE_NETWORK),
            options={
                "com.docker.network.bridge.inhibit_ipv4": "true",
                "com.docker.network.bridge.enable_ip_masquerade": "false",
            },
            check_duplicate=True,
        )
        return str(network.id)

    def remove_network(self, network_id: str) -> bool:
        """Remove a network; False when it is still in use (the reason is logged)."""
        try:
            self.client.api.remove_network(network_id)
        except docker.errors.NotFound:
            pass
        except (docker.errors.APIError, *ENGINE_UNREACHABLE) as exc:
            # Without an engine the reaper removes it once the engine is back.
            log.warning("could not remove network %s: %s", network_id[:12], exc)
            return False
        return True

    def ensure_egress_network(self) -> str:
        """The engine's egress network, made on first use; shared by every run's proxy."""
        found = self.client.api.networks(names=[EGRESS_NETWORK])
        if not any(n.get("Name") == EGRESS_NETWORK for n in found):
            with contextlib.suppress(docker.errors.APIError):  # another worker made it first
                self.client.networks.create(
                    EGRESS_NETWORK,
                    driver="bridge",
                    labels={LABEL_MANAGED: "1", LABEL_EGRESS: "1"},
                    check_duplicate=True,
                )
        return EGRESS_NETWORK

    def create_sidecar(self, spec: ProxySpec) -> str:
        """Create (not start) a container beside the run; returns its container id."""
        egress = self.ensure_egress_network()
        suffix = spec.role
        container: Container = self.client.containers.create(
            image=spec.image,
            detach=True,
            environment=dict(spec.env),
            labels=spec.run.labels(spec.role),
            name=f"{spec.run.name}-{suffix}" if spec.run.name else None,
            network=egress,
            cap_drop=["ALL"],
            security_opt=["no-new-privileges:true"],
            read_only=spec.read_only,
            mem_limit=spec.memory_bytes,
            memswap_limit=spec.memory_bytes,
            pids_limit=spec.pids,
            user=spec.user,
        )
        try:
            self.client.api.connect_container_to_network(
                container.id, spec.run_network, aliases=[spec.alias]
            )
        except BaseException:
            self.remove(str(container.id))
            raise
        return str(container.id)

    def start_proxy(self, spec: ProxySpec) -> str:
        """Create and start the run's proxy; returns its container id."""
        cid = self.create_sidecar(spec)
        try:
            self.client.api.start(cid)
        except BaseException:
            self.remove(cid)
            raise
        return cid

    def start_spare_proxy(self, image: str, owner: str, store: str) -> str:
        """A proxy for a run of `store` yet to come: started now, so no run waits for it, then
        paused. It is on the egress network only, has no policy and so serves nobody; its stdin
        stays open for the policy of the run that claims it."""
        labels = {
            LABEL_MANAGED: "1",
            LABEL_ROLE: ROLE_SPARE,
            LABEL_OWNER: owner,
            LABEL_STORE: store,
        }
        # Hardened as the proxy of a run is (create_sidecar), with stdin open for the policy.
        container: Container = self.client.containers.create(
            image=image,
            detach=True,
            labels=labels,
            name=f"{SPARE_PREFIX}{secrets.token_hex(6)}",
            network=self.ensure_egress_network(),
            cap_drop=["ALL"],
            security_opt=["no-new-privileges:true"],
            read_only=True,
            mem_limit=PROXY_MEMORY_BYTES,
            memswap_limit=PROXY_MEMORY_BYTES,
            pids_limit=PROXY_PIDS,
            user="nobody",
            stdin_open=True,
        )
        try:
            self.client.api.start(container.id)
            # Paused once it waits for its policy: a process still loading may refuse to freeze.
            stream = self.client.api.logs(container.id, stream=True, follow=True)
            seen = b""
            try:
                for chunk in stream:
                    seen += chunk
                    if b'"waiting"' in seen:
                        break
                else:
                    raise RuntimeError("the spare proxy stopped before it waited for a policy")
            finally:
                stream.close()
            self.client.api.pause(container.id)
        except BaseException:
            self.remove(str(container.id))
            raise
        return str(container.id)

    def spare_proxies(self, store: str, image_id: str | None = None) -> list[str]:
        """The paused spares of `store` and `image_id` (any image when None), oldest first."""
        labels = [f"{LABEL_ROLE}={ROLE_SPARE}", f"{LABEL_STORE}={store}"]
        found = self.client.api.containers(filters={"label": labels, "status": "paused"})
        return [
            str(c["Id"])
            for c in sorted(found, key=lambda c: int(c.get("Created", 0)))
            if image_id is None or c.get("ImageID") == image_id
        ]

    def claim_spare_proxy(self, store: str, image_id: str, name: str) -> str | None:
        """Take a paused spare of `store` and `image_id` for one run and name it `name`; None
        if there is none. Unpausing is the claim: the engine lets exactly one caller unpause a
        container, so two runs never share a spare."""
        for spare in self.spare_proxies(store, image_id):
            try:
                self.client.api.unpause(spare)
            except docker.errors.APIError as exc:
                # Another run unpaused it first, or it is gone.
                log.info("spare proxy %s was not there to take: %s", spare[:12], exc)
                continue
            try:
                # Named after the run's network: the reaper knows whose it is from then on.
                self.client.api.rename(spare, name)
            except docker.errors.APIError as exc:
                log.warning("could not take spare proxy %s: %s", spare[:12], exc)
                self.remove(spare)
                continue
            return spare
        return None

    def join_run_network(self, container_id: str, network: str, alias: str) -> None:
        self.client.api.connect_container_to_network(container_id, network, aliases=[alias])

    def leave_network(self, container_id: str, network: str) -> None:
        """Detach a container from `network`; one already gone or detached is no error, nor an
        engine that went away (its removal, tried next, says so and is tried again)."""
        with contextlib.suppress(docker.errors.APIError, *ENGINE_UNREACHABLE):
            self.client.api.disconnect_container_from_network(container_id, network, force=True)

    def send_line(self, container_id: str, line: str) -> None:
        """Write one line to the container's stdin (kept open since it was created)."""
        sock = self.client.api.attach_socket(container_id, params={"stdin": 1, "stream": 1})
        try:
            raw = getattr(sock, "_sock", sock)
            raw.sendall(line.encode() + b"\n")
        finally:
            sock.close()

    def image_id(self, image: str) -> str:
        return str(self.client.api.inspect_image(image)["Id"])

    def put_archive(self, container_id: str, path: str, data: bytes) -> None:
        if not self.client.api.put_archive(container_id, path, data):
            raise RuntimeError(f"could not upload into {path} of container {container_id[:12]}")

    def start(self, container_id: str) -> None:
        self.client.api.start(container_id)

    def problem(self, fresh: bool = False) -> str | None:
        """None when the engine answers a ping, else what went wrong.

        `fresh` pings on a new connection: an engine that is shutting down still answers on
        the connections it has, but takes no new one.
        """
        try:
            if not fresh:
                self.client.ping()
                return None
            version = self.client.api.api_version
            probe = (
                docker.APIClient(base_url=self._given_url, version=version, timeout=5)
                if self._given_url
                else docker.from_env(version=version, timeout=5).api
            )
            try:
                probe.ping()
            finally:
                probe.close()
        except (docker.errors.DockerException, OSError, *ENGINE_UNREACHABLE) as exc:
            return f"{type(exc).__name__}: {exc}"
        return None

    def lines(self, container_id: str) -> Iterator[str]:
        """The container's stdout and stderr, line by line, until it exits."""
        pending = b""
        for chunk in self.client.api.logs(container_id, stream=True, follow=True):
            pending += chunk
            *complete, pending = pending.split(b"\n")
            for raw in complete:
                yield raw.decode("utf-8", "replace").rstrip("\r")
        if pending:
            yield pending.decode("utf-8", "replace")

    def wait(self, container_id: str) -> int:
        return int(self.client.api.wait(container_id)["StatusCode"])

    def stop(self, container_id: str, grace_seconds: int) -> None:
        with contextlib.suppress(docker.errors.NotFound, *ENGINE_UNREACHABLE):
            self.client.api.stop(container_id, timeout=grace_seconds)

    def kill(self, container_id: str) -> None:
        with contextlib.suppress(docker.errors.APIError, *ENGINE_UNREACHABLE):
            self.client.api.kill(container_id)

    def _archive(self, container_id: str, path: str, max_bytes: int) -> io.BytesIO | None:
        try:
            stream, _ = self.client.api.get_archive(container_id, path)
        except docker.errors.NotFound:
            return None
        buf = io.BytesIO()
        for chunk in stream:
            buf.write(chunk)
            if buf.tell() > max_bytes:
                raise RuntimeError(f"{path} in the container is larger than {max_bytes} bytes")
        buf.seek(0)
        return buf

    def fetch_file(
        self, container_id: str, path: str, dest: Path, max_bytes: int = MAX_ARCHIVE_BYTES
    ) -> Path | None:
        """Copy the regular file `path` out of the container to `dest`; None when there is none
        (a link is not followed: it could name any file of the container)."""
        buf = self._archive(container_id, path, max_bytes)
        if buf is None:
            return None
        with tarfile.open(fileobj=buf) as tar:
            member = tar.next()
            if member is None or not member.isfile():
                return None
            src = tar.extractfile(member)
            if src is None:
                return None
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(src.read())
        return dest

    def fetch_dir(self, container_id: str, path: str, dest: Path) -> list[Path]:
        """Copy `path` (a folder) out of the container into `dest`; returns the files written."""
        buf = self._archive(container_id, path, MAX_ARCHIVE_BYTES)
        if buf is None:
            return []
        written: list[Path] = []
        dest.mkdir(parents=True, exist_ok=True)
        with tarfile.open(fileobj=buf) as tar:
            for member in tar.getmembers():
                if not member.isfile():
                    continue
                # Drop the archive's top folder (the basename of `path`).
                parts = Path(member.name).parts[1:]
                if not parts or ".." in parts:
                    continue
                target = dest.joinpath(*parts)
                target.parent.mkdir(parents=True, exist_ok=True)
                src = tar.extractfile(member)
                if src is None:
                    continue
                target.write_bytes(src.read())
                written.append(target)
        return written

    def remove(self, container_id: str) -> bool:
        """Remove a container; False when it may still exist (the reason is logged)."""
        try:
            self.client.api.remove_container(container_id, force=True, v=True)
        except docker.errors.NotFound:
            pass
        except docker.errors.APIError as exc:
            # "removal already in progress" is fine; anything else is worth a line.
            if "already in progress" not in str(exc):
                log.warning("could not remove container %s: %s", container_id[:12], exc)
                return False
        except ENGINE_UNREACHABLE as exc:
            # The reaper removes it once the engine answers again: the run is finished by then.
            log.warning("could not remove container %s: %s", container_id[:12], exc)
            return False
        return True

    def exists(self, container_id: str) -> bool:
        try:
            self.client.api.inspect_container(container_id)
        except docker.errors.NotFound:
            return False
        return True

    def leftovers(self, store: str) -> list[Leftover]:
        """Trimo's containers that belong to `store` (see LABEL_STORE)."""
        found = []
        labels_filter = [f"{LABEL_MANAGED}=1", f"{LABEL_STORE}={store}"]
        for c in self.client.api.containers(all=True, filters={"label": labels_filter}):
            labels = c.get("Labels") or {}
            if labels.get(LABEL_ROLE) == ROLE_SPARE:
                continue  # a spare is judged by whose network it is on (dead_spares)
            run = labels.get(LABEL_RUN, "")
            found.append(
                Leftover(
                    container_id=c["Id"],
                    run_id=int(run) if run.isdigit() else None,
                    owner=labels.get(LABEL_OWNER, ""),
                    status=c.get("State", ""),
                )
            )
        return found

    def leftover_networks(self, store: str) -> list[Leftover]:
        """The run networks that belong to `store`."""
        found = []
        labels_filter = [f"{LABEL_MANAGED}=1", f"{LABEL_STORE}={store}"]
        for n in self.client.api.networks(filters={"label": labels_filter}):
            labels = n.get("Labels") or {}
            run = labels.get(LABEL_RUN, "")
            found.append(
                Leftover(
                    container_id=n["Id"],
                    run_id=int(run) if run.isdigit() else None,
                    owner=labels.get(LABEL_OWNER, ""),
                    status="",
                    kind="network",
                    name=str(n.get("Name", "")),
                )
            )
        return found

    def dead_spares(self, store: str, is_dead: Callable[[Leftover], bool]) -> list[Leftover]:
        """Spare proxies to remove: unclaimed ones past SPARE_MAX_AGE_SECONDS, stopped or left
        unpaused by a maker that is gone, of any store (they serve nobody; a store whose data is
        gone leaves them too), and claimed ones
        (named `<run network>-proxy`) whose run in `store` is over or whose network is gone.
        A spare claimed by another store's run is that store's to judge."""
        networks = {n.name: n for n in self.leftover_networks(store)}
        found = []
        now = time.time()
        for c in self.client.api.containers(
            all=True, filters={"label": f"{LABEL_ROLE}={ROLE_SPARE}"}
        ):
            name = str((c.get("Names") or ["/"])[0]).lstrip("/")
            state = str(c.get("State", ""))
            maker = str((c.get("Labels") or {}).get(LABEL_OWNER, ""))
            spare = Leftover(str(c["Id"]), None, maker, state, kind="spare proxy", name=name)
            if name.startswith(SPARE_PREFIX):
                too_old = now - int(c.get("Created", 0)) > SPARE_MAX_AGE_SECONDS
                # Not paused and its maker gone: its start was cut short, or a run unpaused it
                # this instant (reap tells the two apart: _taken_for_removal).
                cut_short = state != "paused" and is_dead(spare)
                if too_old or cut_short or state in ("exited", "dead"):
                    found.append(spare)
                continue
            network = networks.get(name.removesuffix("-proxy"))
            if network is not None:
                if is_dead(network):
                    found.append(dataclasses.replace(spare, run_id=network.run_id))
            elif not self.client.api.networks(names=[name.removesuffix("-proxy")]):
                found.append(spare)
        return found

    def _taken_for_removal(self, spares: list[Leftover]) -> list[Leftover]:
        """The dead spares the reaper may remove: never one a run is taking at this moment.

        A run takes a paused spare by unpausing it (one caller wins) and then renames it after
        its network. The reaper takes an unclaimed paused spare the same way, so a run and the
        reaper never both win it. A spare running under a spare's name is either one whose
        maker died before pausing it, or one a run unpaused an instant ago and is renaming: it
        goes only if it still has that name a moment later (a run's rename is one call; a run
        that was slower finds it gone, and starts a proxy of its own).
        """
        taken, unsure = [], []
        for spare in spares:
            if not spare.name.startswith(SPARE_PREFIX) or spare.status in ("exited", "dead"):
                taken.append(spare)  # a claimed one is judged by its run; a stopped one by nobody
            elif spare.status == "paused":
                try:
                    self.client.api.unpause(spare.container_id)
                except docker.errors.APIError:
                    continue  # a run took it first
                taken.append(spare)
            else:
                unsure.append(spare)
        if unsure:
            time.sleep(SPARE_RENAME_SECONDS)
        for spare in unsure:
            try:
                seen = self.client.api.inspect_container(spare.container_id)
            except docker.errors.NotFound:
                continue
            name = str(seen.get("Name", "")).lstrip("/")
            if name.startswith(SPARE_PREFIX) and not (seen.get("State") or {}).get("Paused"):
                taken.append(spare)
        return taken

    def reap(self, store: str, is_dead: Callable[[Leftover], bool]) -> list[Leftover]:
        """Remove every container, then network, of `store` whose run `is_dead` says is over."""
        removed = []
        for leftover in self.leftovers(store):
            if is_dead(leftover):
                self.remove(leftover.container_id)
                removed.append(leftover)
        for leftover in self._taken_for_removal(self.dead_spares(store, is_dead)):
            self.remove(leftover.container_id)
            removed.append(leftover)
        # Containers first: a network with a container attached cannot go.
        for leftover in self.leftover_networks(store):
            if is_dead(leftover):
                self.remove_network(leftover.container_id)
                removed.append(leftover)
        return removed
