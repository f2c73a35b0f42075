"""A run's network and its egress proxy: made before the run starts, gone when it ends.

The run's container sits alone on an internal network of its own; the proxy container sits on
that network (as `trimo-proxy`) and on the engine's egress network, and enforces the run's
network policy. Its refusals are read from its log as they happen and become the run's log lines
and the report's list of blocked hosts. Everything goes through the Docker API, so a remote engine
works the same.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import threading
from collections.abc import Callable
from pathlib import Path

import docker

from bot import images
from bot.errors import TrimoError
from bot.network import PROXY_ALIAS, PROXY_PORT, Blocked, NetworkPolicy, parse_proxy_line
from bot.runtime import ContainerSpec, DockerRuntime, ProxySpec

log = logging.getLogger(__name__)

PROXY_IMAGE = "trimo/proxy:bookworm"
PROXY_URL = f"http://{PROXY_ALIAS}:{PROXY_PORT}"
LOG_JOIN_SECONDS = 5.0


def ensure_proxy_image(client: docker.DockerClient, progress: images.Progress | None = None) -> str:
    """trimo/proxy, built FROM the base image (which must exist) or reused by content hash."""
    return images.build_image(
        client, images.images_dir() / "proxy", tag=PROXY_IMAGE, progress=progress
    ).tag


def host_addresses() -> list[str]:
    """This machine's own addresses (Linux), which a proxy on a local engine must refuse.

    They may be public addresses, which the proxy's address rules alone would let through.
    """
    found: set[str] = set()
    with contextlib.suppress(OSError):
        last = ""
        for line in Path("/proc/net/fib_trie").read_text().splitlines():
            token = line.strip().split()
            if len(token) >= 2 and token[0] in ("|--", "+--"):
                last = token[1]
            elif line.strip() == "/32 host LOCAL" and last:
                found.add(last)
    with contextlib.suppress(OSError):
        for line in Path("/proc/net/if_inet6").read_text().splitlines():
            raw = line.split()[0]
            found.add(str(ipaddress.IPv6Address(int(raw, 16))))
    return sorted(found)


class RunNetwork:
    """The network (and proxy) of one run, made on a thread of its own while the run's image and
    container are prepared; `ready` waits for it, `close` removes both, whatever happened."""

    def __init__(
        self,
        runtime: DockerRuntime,
        spec: ContainerSpec,
        policy: NetworkPolicy,
        on_blocked: Callable[[Blocked], None],
        proxy_image: Callable[[], str],
    ) -> None:
        self.runtime = runtime
        self.name = spec.network
        self.on_blocked = on_blocked
        self.network_id: str | None = None
        self.proxy_id: str | None = None
        self.blocked: list[Blocked] = []
        self._error: BaseException | None = None
        self._reader: threading.Thread | None = None
        self._closing = False
        self._closer: threading.Thread | None = None
        self._lock = threading.Lock()
        self._maker = threading.Thread(
            target=self._make, args=(spec, policy, proxy_image), name=f"{self.name}-make"
        )
        self._maker.start()

    def _make(
        self, spec: ContainerSpec, policy: NetworkPolicy, proxy_image: Callable[[], str]
    ) -> None:
        try:
            self.network_id = self.runtime.create_network(self.name, spec)
            image = proxy_image()
            with self._lock:
                if self._closing:
                    return
                self.proxy_id = self.runtime.start_proxy(
                    ProxySpec(
                        image=image,
                        run=spec,
                        run_network=self.name,
                        alias=PROXY_ALIAS,
                        env={"TRIMO_PROXY_POLICY": policy.proxy_json()},
                    )
                )
            self._reader = threading.Thread(
                target=self._read, name=f"{self.name}-proxy-log", daemon=True
            )
            self._reader.start()
        except Exception as exc:  # noqa: BLE001 - handed to the engine's thread by ready()
            self._error = exc

    def ready(self) -> None:
        """Wait until network and proxy are up; raises what went wrong making them."""
        self._maker.join()
        if self._error is not None:
            raise TrimoError(f"the run's network or egress proxy could not start: {self._error}")

    def _read(self) -> None:
        assert self.proxy_id is not None
        try:
            for line in self.runtime.lines(self.proxy_id):
                blocked = parse_proxy_line(line)
                if blocked is not None:
                    self.blocked.append(blocked)
                    self.on_blocked(blocked)
        except docker.errors.DockerException as exc:
            log.debug("proxy log of %s ended: %s", self.name, exc)

    def release(self) -> None:
        """The run's container has exited: the proxy and network go on a thread of their own,
        while the engine publishes the result; `close` waits for them."""
        with self._lock:
            if self._closer is not None:
                return
            self._closer = threading.Thread(target=self._remove, name=f"{self.name}-close")
        self._closer.start()

    def close(self) -> None:
        self.release()
        assert self._closer is not None
        self._closer.join()
        if self.network_id is not None:
            # Removal failed while the run's container held it: it has gone by now.
            self.runtime.remove_network(self.network_id)

    def _remove(self) -> None:
        with self._lock:
            self._closing = True
        self._maker.join()
        if self.proxy_id is not None:
            # Stopping first lets the log stream end with every line read.
            self.runtime.kill(self.proxy_id)
            if self._reader is not None:
                self._reader.join(LOG_JOIN_SECONDS)
            self.runtime.remove(self.proxy_id)
        if self.network_id is not None and self.runtime.remove_network(self.network_id):
            self.network_id = None
