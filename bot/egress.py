"""A run's network and its egress proxy: made before the run starts, gone when it ends.

The run's container sits alone on an internal network of its own; the proxy container sits on
that network (as `trimo-proxy`) and on the engine's egress network, and enforces the run's
network policy. Its refusals are read from its log as they happen and become the run's log lines
and the report's list of blocked hosts. Everything goes through the Docker API, so a remote engine
works the same.

Starting a container is the slow part of making a proxy, so a run takes a spare one that an
earlier run started (paused on the egress network, with no policy: it serves nobody), joins it to
its network and hands it its policy; then it starts the spare for the next run, off its own path.
A spare serves one run only and goes with it; with none at hand (the first run, or a proxy image
that changed) the run starts a proxy of its own as before.
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
from bot.runtime import ENGINE_UNREACHABLE, ContainerSpec, DockerRuntime, ProxySpec

log = logging.getLogger(__name__)

PROXY_IMAGE = "trimo/proxy:bookworm"
PROXY_URL = f"http://{PROXY_ALIAS}:{PROXY_PORT}"
LOG_JOIN_SECONDS = 5.0
# How long a proxy may take to read its policy and say it listens.
LISTEN_SECONDS = 15.0


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


class Spares:
    """The spare proxies an engine is starting for runs to come, each on a thread of its own.

    A run's result never waits for one: the spare is the next run's. A run about to take a
    spare waits for those under way (what is left of a start is never slower than a start of
    its own), and so does the process's end (the threads are not daemons): a spare its maker
    left before pausing it serves nobody and is the reaper's.
    """

    def __init__(self) -> None:
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def start(self, target: Callable[..., None], *args: object, name: str) -> None:
        thread = threading.Thread(target=target, args=args, name=name, daemon=False)
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive()]
            self._threads.append(thread)
        thread.start()

    def wait(self, timeout: float = LISTEN_SECONDS) -> None:
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(timeout)


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
        spares: Spares | None = None,
    ) -> None:
        self.runtime = runtime
        self.spares = spares or Spares()
        self.name = spec.network
        self.owner = spec.owner
        self.store = spec.store
        self.on_blocked = on_blocked
        self.network_id: str | None = None
        self.proxy_id: str | None = None
        self.blocked: list[Blocked] = []
        self._error: BaseException | None = None
        self._reader: threading.Thread | None = None
        self._closing = False
        self._proxy_left = False  # its removal failed: close() tries again
        self._closer: threading.Thread | None = None
        self._spare_started = False
        self._image: tuple[str, str] | None = None
        self._listening = threading.Event()  # set when it listens, or its log ended
        self._listens = False
        self._run_gone = threading.Event()
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
            image_id = self.runtime.image_id(image)
            # A spare an earlier run of this engine is starting is the one to take.
            self.spares.wait()
            with self._lock:
                if self._closing:
                    return
                self.proxy_id = self._claim(image_id, policy)
                if self.proxy_id is None:
                    self.proxy_id = self.runtime.start_proxy(
                        ProxySpec(
                            image=image,
                            run=spec,
                            run_network=self.name,
                            alias=PROXY_ALIAS,
                            env={"TRIMO_PROXY_POLICY": policy.proxy_json()},
                        )
                    )
                self._image = (image, image_id)
            self._reader = threading.Thread(
                target=self._read, name=f"{self.name}-proxy-log", daemon=True
            )
            self._reader.start()
            # The policy is in and the socket bound: the run's first connection is answered.
            self._listening.wait(LISTEN_SECONDS)
            if not self._listens:
                raise TrimoError(f"it stopped, or did not listen within {LISTEN_SECONDS:.0f}s")
        except Exception as exc:  # noqa: BLE001 - handed to the engine's thread by ready()
            self._error = exc

    def _claim(self, image_id: str, policy: NetworkPolicy) -> str | None:
        """A spare proxy, on this run's network and given its policy; None if there is none."""
        proxy = self.runtime.claim_spare_proxy(self.store, image_id, f"{self.name}-proxy")
        if proxy is None:
            return None
        try:
            # Joined before the policy is in: a connection that early waits in its backlog.
            self.runtime.join_run_network(proxy, self.name, PROXY_ALIAS)
            self.runtime.send_line(proxy, policy.proxy_json())
        except (docker.errors.DockerException, OSError) as exc:
            log.warning("spare proxy %s failed, starting another: %s", proxy[:12], exc)
            self.runtime.remove(proxy)
            return None
        return proxy

    def started(self) -> None:
        """The run's agent (or tests) started: the next run's spare is started now, off this
        run's path, and this run's end does not wait for it (called again, it does nothing)."""
        with self._lock:
            if self._image is None or self._spare_started or self._closing:
                return
            self._spare_started = True
            self.spares.start(self._start_spare, *self._image, name=f"{self.name}-spare")

    def _start_spare(self, image: str, image_id: str) -> None:
        """The next run's proxy, unless a spare of this image waits already."""
        try:
            if not self.runtime.spare_proxies(self.store, image_id):
                self.runtime.start_spare_proxy(image, self.owner, self.store)
        except (docker.errors.DockerException, RuntimeError, *ENGINE_UNREACHABLE) as exc:
            # The next run starts a proxy of its own: slower, never less safe.
            log.warning("could not start a spare egress proxy: %s", exc)

    def ready(self) -> None:
        """Wait until network and proxy are up; raises what went wrong making them."""
        self._maker.join()
        if self._error is not None:
            raise TrimoError(f"the run's network or egress proxy could not start: {self._error}")

    def _read(self) -> None:
        assert self.proxy_id is not None
        try:
            for line in self.runtime.lines(self.proxy_id):
                if not self._listens and '"listening"' in line:
                    self._listens = True
                    self._listening.set()
                blocked = parse_proxy_line(line)
                if blocked is not None:
                    self.blocked.append(blocked)
                    self.on_blocked(blocked)
        except docker.errors.DockerException as exc:
            log.debug("proxy log of %s ended: %s", self.name, exc)
        finally:
            self._listening.set()  # a proxy that stopped before it listened is an error now

    def release(self) -> None:
        """The run's container has exited: the proxy goes on a thread of its own, and the
        network once `run_gone` says the container went too, while the engine fetches and
        publishes the result; `close` waits for both."""
        with self._lock:
            if self._closer is not None:
                return
            self._closer = threading.Thread(target=self._remove, name=f"{self.name}-close")
        self._closer.start()

    def run_gone(self) -> None:
        """The run's container is removed: nothing but the proxy holds the network now."""
        self._run_gone.set()

    def close(self) -> None:
        self.release()
        self.run_gone()
        assert self._closer is not None
        self._closer.join()
        if self._proxy_left and self.proxy_id is not None:
            # The engine was away when the run's container exited (a restart): it is back now.
            self._proxy_left = not self.runtime.remove(self.proxy_id)
        if self.network_id is not None:
            # Removal failed while the run's container held it: it has gone by now.
            self.runtime.remove_network(self.network_id)

    def _remove(self) -> None:
        with self._lock:
            self._closing = True
        self._maker.join()
        network = threading.Thread(target=self._remove_network, name=f"{self.name}-remove")
        if self.proxy_id is not None:
            # The run's container has exited, so nothing connects any more: off the run's
            # network first, and the network goes while the proxy stops.
            self.runtime.leave_network(self.proxy_id, self.name)
            network.start()
            # Stopping first lets the log stream end with every line read.
            self.runtime.kill(self.proxy_id)
            if self._reader is not None:
                self._reader.join(LOG_JOIN_SECONDS)
            self._proxy_left = not self.runtime.remove(self.proxy_id)
        else:
            network.start()
        network.join()

    def _remove_network(self) -> None:
        self._run_gone.wait()
        if self.network_id is not None and self.runtime.remove_network(self.network_id):
            self.network_id = None
