"""The container runtime: Trimo's containers on a Docker engine, behind a small interface.

Everything goes through the Docker API (archives in and out, logs as a stream), never through host
bind mounts, so the same code drives a local or a remote engine. Every container carries Trimo's
labels, which is how the reaper finds what a crashed run left behind.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tarfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import docker
import docker.errors
from docker.models.containers import Container

log = logging.getLogger(__name__)

LABEL_MANAGED = "trimo.managed"
LABEL_RUN = "trimo.run"
LABEL_PIPELINE = "trimo.pipeline"
LABEL_OWNER = "trimo.owner"
# Which store (deployment) a container belongs to: run ids are only unique within one store, and
# several Trimo instances may share an engine. The reaper touches its own store's containers only.
LABEL_STORE = "trimo.store"

# Bound what one tar member read from a container may weigh: reports and bundles, not disks.
MAX_ARCHIVE_BYTES = 512 * 1024 * 1024
NETWORK_GRACE_SECONDS = 120


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
    network: str = "bridge"
    name: str | None = None
    store: str = ""
    extra_labels: Mapping[str, str] = field(default_factory=dict)

    def labels(self) -> dict[str, str]:
        return {
            LABEL_MANAGED: "1",
            LABEL_RUN: str(self.run_id),
            LABEL_PIPELINE: str(self.pipeline_id),
            LABEL_OWNER: self.owner,
            LABEL_STORE: self.store,
            **self.extra_labels,
        }


@dataclass(frozen=True)
class Leftover:
    """A Trimo-labelled container found by the reaper."""

    container_id: str
    run_id: int | None
    owner: str
    status: str


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
    def create_network(self, name: str, labels: Mapping[str, str], internal: bool) -> str: ...
    def connect(
        self, network: str, container_id: str, aliases: list[str] | None = None
    ) -> None: ...
    def remove_network(self, name: str) -> None: ...


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


class DockerRuntime:
    """Containers on a Docker engine (local socket or `base_url`)."""

    def __init__(self, client: docker.DockerClient | None = None, base_url: str | None = None):
        if client is None:
            client = docker.DockerClient(base_url=base_url) if base_url else docker.from_env()
        self.client = client

    def create(self, spec: ContainerSpec) -> str:
        kwargs: dict[str, Any] = {
            "image": spec.image,
            "detach": True,
            "environment": dict(spec.env),
            "labels": spec.labels(),
            "network_mode": spec.network,
            "init": False,  # the image's entrypoint is tini already
        }
        if spec.name:
            kwargs["name"] = spec.name
        if spec.cpus:
            kwargs["nano_cpus"] = int(spec.cpus * 1e9)
        if spec.memory_bytes:
            kwargs["mem_limit"] = spec.memory_bytes
            kwargs["memswap_limit"] = spec.memory_bytes
        if spec.pids:
            kwargs["pids_limit"] = spec.pids
        container: Container = self.client.containers.create(**kwargs)
        return str(container.id)

    def put_archive(self, container_id: str, path: str, data: bytes) -> None:
        if not self.client.api.put_archive(container_id, path, data):
            raise RuntimeError(f"could not upload into {path} of container {container_id[:12]}")

    def start(self, container_id: str) -> None:
        self.client.api.start(container_id)

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
        with contextlib.suppress(docker.errors.NotFound):
            self.client.api.stop(container_id, timeout=grace_seconds)

    def kill(self, container_id: str) -> None:
        with contextlib.suppress(docker.errors.APIError):
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

    def remove(self, container_id: str) -> None:
        try:
            self.client.api.remove_container(container_id, force=True, v=True)
        except docker.errors.NotFound:
            pass
        except docker.errors.APIError as exc:
            # "removal already in progress" is fine; anything else is worth a line.
            if "already in progress" not in str(exc):
                log.warning("could not remove container %s: %s", container_id[:12], exc)

    def exists(self, container_id: str) -> bool:
        try:
            self.client.api.inspect_container(container_id)
        except docker.errors.NotFound:
            return False
        return True

    def create_network(self, name: str, labels: Mapping[str, str], internal: bool) -> str:
        """A network of its own for a run; `internal` ones have no route out of the engine."""
        self.client.api.create_network(
            name, driver="bridge", internal=internal, labels=dict(labels), check_duplicate=True
        )
        return name

    def connect(self, network: str, container_id: str, aliases: list[str] | None = None) -> None:
        self.client.api.connect_container_to_network(container_id, network, aliases=aliases)

    def remove_network(self, name: str) -> None:
        try:
            self.client.api.remove_network(name)
        except docker.errors.NotFound:
            pass
        except docker.errors.APIError as exc:
            log.warning("could not remove network %s: %s", name, exc)

    def leftover_networks(self, store: str) -> list[tuple[str, int | None]]:
        """Trimo's networks of `store`, with the run each belongs to."""
        labels_filter = [f"{LABEL_MANAGED}=1", f"{LABEL_STORE}={store}"]
        found = []
        for n in self.client.api.networks(filters={"label": labels_filter}):
            run = (n.get("Labels") or {}).get(LABEL_RUN, "")
            found.append((str(n["Name"]), int(run) if run.isdigit() else None))
        return found

    def leftovers(self, store: str) -> list[Leftover]:
        """Trimo's containers that belong to `store` (see LABEL_STORE)."""
        found = []
        labels_filter = [f"{LABEL_MANAGED}=1", f"{LABEL_STORE}={store}"]
        for c in self.client.api.containers(all=True, filters={"label": labels_filter}):
            labels = c.get("Labels") or {}
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

    def reap(self, store: str, is_dead: Callable[[Leftover], bool]) -> list[Leftover]:
        """Remove every container of `store` whose run `is_dead` says is over; returns them."""
        removed = []
        for leftover in self.leftovers(store):
            if is_dead(leftover):
                self.remove(leftover.container_id)
                removed.append(leftover)
        # A run's network outlives none of its containers: one with no container left is a
        # crash's leftover (a grace period spares a network whose run is starting right now).
        live = {leftover.run_id for leftover in self.leftovers(store)}
        for name, run_id in self.leftover_networks(store):
            if run_id not in live and self._network_age(name) > NETWORK_GRACE_SECONDS:
                self.remove_network(name)
        return removed

    def _network_age(self, name: str) -> float:
        try:
            created = str(self.client.api.inspect_network(name).get("Created", ""))
        except docker.errors.NotFound:
            return 0.0
        try:
            stamp = datetime.fromisoformat(created[:26].rstrip("Z") + "+00:00")
        except ValueError:
            return float("inf")
        return (datetime.now(UTC) - stamp).total_seconds()
