"""A second, private Docker engine for the test session: its own dockerd, socket, data root and
bridge, so several engines can be shown on one machine (and restarted) without disturbing the
engine everybody else uses.

The engine's bridge gets a 172.x/16 that no route of this machine uses (never docker0's
172.17/16), and its own networks come from a 10.x pool of its own, so neither overlaps with what
the main engine hands out. Everything it made goes at the end: the process, its iptables rules,
the bridge, the data root.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import docker
import docker.errors
import pytest

from bot.egress import PROXY_IMAGE, ensure_proxy_image
from bot.images import BASE_IMAGE, DEBIAN_IMAGE, HASH_REPO
from bot.states import PipelineKind
from bot.store import Run, Store
from bot.worker import dispatch
from tests.containers import trimo_free_env
from tests.locks import machine_lock

START_SECONDS = 60
STOP_SECONDS = 40


def why_no_second_engine() -> str | None:
    """Why this machine cannot start a second engine, or None when it can."""
    if os.geteuid() != 0:
        return "a second Docker engine needs root (dockerd, ip link, iptables)"
    for tool in ("dockerd", "docker", "ip"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed: a second Docker engine cannot be started"
    return None


needs_second_engine = pytest.mark.skipif(
    why_no_second_engine() is not None, reason=why_no_second_engine() or ""
)


def _routes() -> list[ipaddress.IPv4Network]:
    """Every IPv4 network this machine routes or holds an address in."""
    found = []
    for cmd in (["ip", "-4", "route", "show", "table", "all"], ["ip", "-4", "-o", "addr"]):
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            for word in line.split():
                if "/" in word or word[:1].isdigit():
                    with contextlib.suppress(ValueError):
                        found.append(ipaddress.IPv4Network(word, strict=False))
    return found


def _free_subnet(candidates: list[str]) -> ipaddress.IPv4Network:
    used = _routes()
    # Sessions side by side start their search at different places.
    offset = os.getpid() % len(candidates)
    for raw in candidates[offset:] + candidates[:offset]:
        net = ipaddress.IPv4Network(raw)
        if not any(net.overlaps(other) for other in used):
            return net
    raise RuntimeError("no free subnet for a second Docker engine")


def _bridges() -> set[str]:
    """The names of this machine's bridge interfaces."""
    out = subprocess.run(
        ["ip", "-o", "link", "show", "type", "bridge"], capture_output=True, text=True, check=True
    ).stdout
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if ":" in line}


def _host_bridges() -> set[str]:
    """The bridges an engine's start could delete: docker0 and the engines' own, not the
    `br-*` of networks, which the engines add and remove as their runs come and go."""
    return {name for name in _bridges() if not name.startswith("br-")}


BRIDGES_LOCK = "side-engine-bridges"


@dataclass
class SideEngine:
    """A dockerd of the test's own; `url` is its DOCKER_HOST."""

    name: str
    root: Path = field(init=False)
    run_dir: Path = field(init=False)
    bridge_net: ipaddress.IPv4Network = field(init=False)
    pool: ipaddress.IPv4Network = field(init=False)
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    host_bridges: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.root = Path("/var/lib") / f"trimo-test-{self.name}"
        # Short: containerd's sockets live below the exec root, and a socket path has 108 bytes.
        self.run_dir = Path("/run") / f"trimo-{self.name}"
        self.bridge = f"trimo-{self.name}"[:15]

    @property
    def url(self) -> str:
        return f"unix://{self.run_dir}/docker.sock"

    @property
    def log_path(self) -> Path:
        return self.run_dir / "dockerd.log"

    def client(self, timeout: int = 120) -> docker.DockerClient:
        return docker.DockerClient(base_url=self.url, timeout=timeout)

    # -- life ---------------------------------------------------------------------------------

    def start(self) -> SideEngine:
        # Engines of other test processes choose their subnets too: one at a time, so no two
        # take the same one.
        with machine_lock(BRIDGES_LOCK):
            self.bridge_net = _free_subnet([f"172.{n}.0.0/16" for n in range(40, 64)])
            self.pool = _free_subnet([f"10.{n}.0.0/16" for n in range(200, 250)])
            subprocess.run(["ip", "link", "add", self.bridge, "type", "bridge"], check=True)
            gateway = next(self.bridge_net.hosts())
            subprocess.run(
                ["ip", "addr", "add", f"{gateway}/{self.bridge_net.prefixlen}", "dev", self.bridge],
                check=True,
            )
            subprocess.run(["ip", "link", "set", self.bridge, "up"], check=True)
        self.root.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "exec").mkdir(parents=True, exist_ok=True)
        self._spawn()
        return self

    def _spawn(self) -> None:
        # A dockerd with `--default-address-pool` that finds a stale default "bridge" network in
        # its store deletes it and then the interface named docker0 (`removeDefaultBridgeInterface`
        # in moby's configureNetworking), whatever `--bridge` says: that is the main engine's
        # bridge. Every start therefore begins from an empty network store. Networks do not
        # outlive a restart for Trimo anyway: a run's network goes with the run, the egress
        # network is made again.
        (self.root / "network" / "files" / "local-kv.db").unlink(missing_ok=True)
        # Held while the engine starts: no other session's engine adds or drops its bridge in
        # between, so a bridge missing afterwards is one this start deleted.
        with machine_lock(BRIDGES_LOCK):
            self.host_bridges = _host_bridges() - {self.bridge}
            self._start_dockerd()
            gone = self.host_bridges - _host_bridges()
        if gone:
            raise RuntimeError(
                f"dockerd {self.name} deleted the host's bridge(s) {sorted(gone)} as it started"
            )

    def _start_dockerd(self) -> None:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [
                "dockerd",
                "--data-root",
                str(self.root),
                "--exec-root",
                str(self.run_dir / "exec"),
                "--host",
                self.url,
                "--pidfile",
                str(self.run_dir / "docker.pid"),
                "--bridge",
                self.bridge,
                "--default-address-pool",
                f"base={self.pool},size=24",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        self.wait_ready()

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_SECONDS
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                break
            try:
                client = self.client(timeout=5)
            except docker.errors.DockerException:
                time.sleep(0.3)
                continue
            try:
                if client.ping():
                    return
            except (docker.errors.DockerException, OSError):
                time.sleep(0.3)
            finally:
                client.close()
        tail = self.log_path.read_text(errors="replace").splitlines()[-20:]
        raise RuntimeError(f"dockerd {self.name} did not come up:\n" + "\n".join(tail))

    def _network_bridges(self) -> set[str]:
        """The interfaces behind the engine's own bridge networks (not its default bridge)."""
        names = set()
        with contextlib.suppress(docker.errors.DockerException, OSError):
            client = self.client(timeout=10)
            try:
                for net in client.networks.list(filters={"driver": "bridge"}):
                    options = net.attrs.get("Options") or {}
                    if net.name != "bridge":
                        names.add(
                            options.get("com.docker.network.bridge.name") or f"br-{net.id[:12]}"
                        )
            finally:
                client.close()
        return names

    def _terminate(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        # Each start begins from an empty network store (see _spawn), so the interfaces of the
        # networks the engine has now would be left to nobody: they go with the process.
        bridges = self._network_bridges()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=STOP_SECONDS)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        for name in bridges & _bridges():
            subprocess.run(["ip", "link", "del", name], check=False, capture_output=True)

    def restart(self) -> None:
        """What `systemctl restart docker` does: a clean stop (containers stopped), a start."""
        self._terminate()
        self.restarts += 1
        self._spawn()

    @contextlib.contextmanager
    def down(self) -> Iterator[None]:
        """The engine stopped for the block, started again after it (whatever the block did)."""
        self._terminate()
        try:
            yield
        finally:
            self.restarts += 1
            self._spawn()

    def stop(self) -> None:
        """Remove what the engine made, stop it, and leave no trace of it on the machine."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(Exception):
                client = self.client(timeout=30)
                for c in client.containers.list(all=True):
                    with contextlib.suppress(docker.errors.APIError):
                        c.remove(force=True, v=True)
                for net in client.networks.list():
                    if net.name not in ("bridge", "host", "none"):
                        with contextlib.suppress(docker.errors.APIError):
                            net.remove()
                client.close()
        self._terminate()
        self._drop_iptables_rules()
        with machine_lock(BRIDGES_LOCK):
            subprocess.run(["ip", "link", "del", self.bridge], check=False, capture_output=True)
        self._unmount_below(self.root)
        self._unmount_below(self.run_dir)
        shutil.rmtree(self.root, ignore_errors=True)
        shutil.rmtree(self.run_dir, ignore_errors=True)

    def _drop_iptables_rules(self) -> None:
        # dockerd leaves the rules of the bridge it was given; they name the bridge or its subnet.
        marks = (self.bridge, str(self.bridge_net), str(self.pool.network_address))
        for table in ("filter", "nat"):
            listed = subprocess.run(
                ["iptables", "-t", table, "-S"], capture_output=True, text=True, check=False
            )
            for rule in listed.stdout.splitlines():
                if rule.startswith("-A ") and any(mark in rule for mark in marks):
                    args = ["-D", *rule.split()[1:]]
                    subprocess.run(["iptables", "-t", table, *args], check=False)

    @staticmethod
    def _unmount_below(path: Path) -> None:
        with contextlib.suppress(OSError):
            mounts = Path("/proc/self/mounts").read_text().splitlines()
            targets = [line.split()[1] for line in mounts if len(line.split()) > 1]
            for target in sorted(targets, key=len, reverse=True):
                if target == str(path) or target.startswith(f"{path}/"):
                    subprocess.run(["umount", "-l", target], check=False)

    # -- images -------------------------------------------------------------------------------

    def load_images_from(self, main: docker.DockerClient, names: list[str]) -> None:
        """Copy images (with the content-hash tags that make them cache hits) from `main`."""
        refs: list[str] = []
        for name in names:
            image = main.images.get(name)
            refs.append(name)
            refs.extend(t for t in image.tags if t.startswith(f"{HASH_REPO}:"))
        # The main engine is the one docker.from_env() found, as the session's fixtures use.
        main_url = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
        save = subprocess.Popen(["docker", "-H", main_url, "save", *refs], stdout=subprocess.PIPE)
        try:
            subprocess.run(
                ["docker", "-H", self.url, "load", "-q"],
                stdin=save.stdout,
                check=True,
                capture_output=True,
                timeout=600,
            )
        finally:
            if save.stdout is not None:
                save.stdout.close()
            save.wait(timeout=60)


@contextlib.contextmanager
def side_engine(name: str, main: docker.DockerClient) -> Iterator[SideEngine]:
    """A started second engine holding the base, proxy and Debian images of `main`."""
    ensure_proxy_image(main)
    engine = SideEngine(name)
    try:
        engine.start()
        engine.load_images_from(main, [DEBIAN_IMAGE, BASE_IMAGE, PROXY_IMAGE])
        yield engine
    finally:
        engine.stop()


# -- workers as real processes, sharing one store --------------------------------------------


@dataclass
class WorkerProcess:
    """A `trimo worker` process on one engine."""

    proc: subprocess.Popen[bytes]
    docker_url: str
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def trimo_env(data_dir: Path, database_url: str) -> dict[str, str]:
    """The environment of a `trimo` process on this store, with no other Trimo setting."""
    return trimo_free_env(TRIMO_DATA_DIR=str(data_dir), TRIMO_DATABASE_URL=database_url)


def start_worker(
    data_dir: Path, database_url: str, docker_url: str, slots: int, log: Path
) -> WorkerProcess:
    """`trimo worker --docker-url … --workers slots`, without a GitHub App: local runs only."""
    env = trimo_env(data_dir, database_url)
    env.pop("DOCKER_HOST", None)  # the flag alone says which engine
    out = log.open("wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bot",
            "worker",
            "--docker-url",
            docker_url,
            "--workers",
            str(slots),
        ],
        env=env,
        stdout=out,
        stderr=subprocess.STDOUT,
    )
    out.close()
    return WorkerProcess(proc, docker_url, log)


def stop_workers(workers: list[WorkerProcess], seconds: float = 30) -> None:
    for w in workers:
        if w.proc.poll() is None:
            w.proc.send_signal(signal.SIGTERM)
    for w in workers:
        try:
            w.proc.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            w.proc.kill()
            w.proc.wait(timeout=10)


def queue_runs(store: Store, repo: Path, count: int, agent: str, prefix: str = "r") -> list[int]:
    """`count` queued runs of a command agent on `repo`, each on a pipeline of its own (a
    pipeline holds one live run at a time)."""
    ids = []
    for i in range(count):
        pipeline = store.get_or_create_pipeline(
            repo=str(repo),
            key=f"local:{prefix}-{i}",
            kind=PipelineKind.LOCAL,
            branch=f"trimo/{prefix}-{i}",
            title=f"{prefix} {i}",
        )
        ids.append(dispatch(store, pipeline, trigger="cli", task="x", agent_command=agent).id)
    return ids


def wait_finished(
    store: Store, run_ids: list[int], seconds: float, workers: Sequence[WorkerProcess] = ()
) -> list[Run]:
    """The runs once all are finished; fails, with the workers' output, after `seconds` or
    when a worker died."""
    deadline = time.monotonic() + seconds
    while True:
        runs = [store.get_run(i) for i in run_ids]
        if all(r.finished for r in runs):
            return runs
        dead = [w for w in workers if w.proc.poll() is not None]
        if dead or time.monotonic() > deadline:
            left = [(r.id, r.state.value) for r in runs if not r.finished]
            said = "\n".join(
                f"--- worker {w.pid} ({w.docker_url})\n{w.output()[-3000:]}" for w in workers
            )
            raise AssertionError(f"runs not finished: {left[:20]}\n{said}")
        time.sleep(0.5)


def worker_pid(worker_id: str) -> int:
    """The pid in a worker id (host:pid:start)."""
    return int(worker_id.rsplit(":", 2)[1])
