"""A run's network through `trimo run` on the real engine: isolation, the egress proxy, hardening.

Every connection a test makes goes to this machine: another run's address, a run's own
gateway, a server container the test starts on the egress network, or the proxy, which is asked
about private destinations and refuses them before connecting anywhere. The registries pypi.org
and registry.npmjs.org are reached only to show that the allowlist lets them through.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import tarfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import pytest

from bot import runtime as runtime_module
from bot.egress import ensure_proxy_image, host_addresses
from bot.network import NetworkMode
from bot.runtime import (
    EGRESS_NETWORK,
    LABEL_ROLE,
    LABEL_RUN,
    LABEL_STORE,
    ROLE_SPARE,
    RUN_CAPABILITIES,
    SPARE_RENAME_SECONDS,
    ContainerSpec,
    DockerRuntime,
    Leftover,
)
from bot.states import RunState
from tests.containers import TEST_OWNER
from tests.test_run_engine import Trimo, light_repo

pytestmark = [pytest.mark.docker, pytest.mark.slow]

PROBE = (Path(__file__).parent / "netprobe.py").read_text()
# pip and npm for the allowlist test, and a setuid-root copy of `id`: without no-new-privileges
# the agent running it would be root again.
DOCKERFILE = """FROM trimo/base:bookworm
RUN apt-get update \\
    && apt-get install -y --no-install-recommends python3-pip npm \\
    && apt-get clean && rm -rf /var/lib/apt/lists/*
RUN cp /usr/bin/id /usr/local/bin/suid-id && chmod 4755 /usr/local/bin/suid-id
COPY preboot.sh /opt/trimo/preboot.sh
"""
PREBOOT = """#!/bin/bash
grep -E '^(CapEff|CapBnd|NoNewPrivs):' /proc/self/status | sed 's/^/preboot: /'
"""
CAP_BITS = {
    "CHOWN": 0,
    "DAC_OVERRIDE": 1,
    "DAC_READ_SEARCH": 2,
    "FOWNER": 3,
    "FSETID": 4,
    "KILL": 5,
    "SETGID": 6,
    "SETUID": 7,
    "SETPCAP": 8,
    "NET_BIND_SERVICE": 10,
    "NET_RAW": 13,
    "SYS_CHROOT": 18,
    "MKNOD": 27,
    "AUDIT_WRITE": 29,
    "SETFCAP": 31,
}
RELEASE = "/tmp/trimo-test-release"
WAIT_RELEASE = f"timeout 300 bash -c 'until [ -f {RELEASE} ]; do sleep 0.2; done'"
FILE_SERVER = "trimo-test-files"


def probe_repo(path: Path, config: str = "") -> Path:
    return light_repo(
        path,
        config,
        {".trimo/Dockerfile": DOCKERFILE, ".trimo/preboot.sh": PREBOOT, "netprobe.py": PROBE},
    )


def probes(output: str) -> dict[str, dict[str, Any]]:
    found = {}
    for line in output.splitlines():
        _, sep, rest = line.partition("probe: {")
        if sep:
            data = json.loads("{" + rest)
            found[data["probe"]] = data
    return found


def run_container(client: docker.DockerClient, store_key: str, run_id: int) -> Any:
    filters = {
        "label": [f"{LABEL_RUN}={run_id}", f"{LABEL_STORE}={store_key}", f"{LABEL_ROLE}=run"]
    }
    found = client.containers.list(filters=filters)
    assert len(found) == 1, found
    return found[0]


def release(container: Any) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo(RELEASE.lstrip("/"))
        tar.addfile(info, io.BytesIO(b""))
    container.put_archive("/", buf.getvalue())


def wait_for_line(proc: Any, pattern: str, timeout: float = 600) -> tuple[str, list[str]]:
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        if re.search(pattern, line):
            return line, seen
    raise AssertionError(f"no line matching {pattern!r}:\n" + "".join(seen[-40:]))


@pytest.fixture
def file_server(docker_client: docker.DockerClient, runtime: DockerRuntime) -> Iterator[str]:
    """An HTTP server on the egress network (a private address on this machine) that counts
    the connections it accepts: `GET /count` answers with the count so far."""
    runtime.ensure_egress_network()
    name = f"{FILE_SERVER}-{uuid.uuid4().hex[:6]}"
    server = """
import http.server, socketserver
count = 0
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = str(count).encode()
        self.send_response(200); self.send_header("Content-Length", str(len(body)))
        self.end_headers(); self.wfile.write(body)
class S(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    def verify_request(self, request, client_address):
        global count
        count += 1
        return True
S(("0.0.0.0", 8080), H).serve_forever()
"""
    container = docker_client.containers.run(
        "trimo/base:bookworm",
        entrypoint=["python3", "-c", server],
        name=name,
        network=EGRESS_NETWORK,
        detach=True,
        labels={"trimo.test": "1", "trimo.owner": "pytest"},
    )
    try:
        yield name
    finally:
        container.remove(force=True)


def connections(docker_client: docker.DockerClient, name: str) -> int:
    out = docker_client.containers.get(name).exec_run(
        [
            "python3",
            "-c",
            "import urllib.request as u; print(u.urlopen('http://127.0.0.1:8080/count').read().decode())",
        ]
    )
    return int(out.output.decode().strip()) - 1  # this question was one connection too


def test_run_b_cannot_reach_run_a_on_any_address_or_port(
    tmp_path: Path, base_image: str, docker_client: docker.DockerClient
) -> None:
    trimo_a, trimo_b = Trimo(tmp_path / "a"), Trimo(tmp_path / "b")
    repo_a, repo_b = probe_repo(tmp_path / "repo-a"), probe_repo(tmp_path / "repo-b")
    serve = (
        "echo run-A-private-data > secret.txt; "
        "python3 -m http.server 8000 --bind 0.0.0.0 >/dev/null 2>&1 & "
        "for _ in $(seq 50); do curl -s -o /dev/null localhost:8000 && break; sleep 0.1; done; "
        'echo "local: $(curl -s localhost:8000/secret.txt)"; python3 netprobe.py address; '
        f"{WAIT_RELEASE}"
    )
    a = trimo_a.popen("run", "--repo", str(repo_a), "--task", "serve", "--agent", serve)
    try:
        line, seen = wait_for_line(a, r'probe: \{"probe": "address"')
        address = probes(line)["address"]["address"]
        assert any("local: run-A-private-data" in s for s in seen), "".join(seen)
        run_a = trimo_a.store().list_runs()[0]
        container_a = run_container(docker_client, trimo_a.store().key, run_a.id)
        nets_a = set(container_a.attrs["NetworkSettings"]["Networks"])
        assert address in {
            n["IPAddress"] for n in container_a.attrs["NetworkSettings"]["Networks"].values()
        }

        b = trimo_b(
            "run",
            "--repo",
            str(repo_b),
            "--task",
            "reach A",
            "--agent",
            f"python3 netprobe.py ports {address}; python3 netprobe.py route; "
            f"python3 netprobe.py proxy {address}:8000; "
            f"curl -sS -m 5 http://{address}:8000/secret.txt; true",
        )
        found = probes(b.stdout)
        assert "run-A-private-data" not in b.stdout
        outcomes = found["ports"]["outcomes"]
        assert "connected" not in outcomes, outcomes
        assert sum(len(p) for p in outcomes.values()) == 1029
        # No route of its own: the way out (its gateway) has no owner, the kernel gives up.
        assert found["route"]["connect"] in ("EHOSTUNREACH", "ENETUNREACH"), found["route"]
        answer = found["proxy"]["answers"][0]
        assert answer["status"].startswith("HTTP/1.1 403"), answer
        assert "a private address" in answer["status"]
        assert f"network: blocked CONNECT {address}:8000" in b.stdout
        run_b = trimo_b.store().list_runs()[0]
        assert run_b.state == RunState.SUCCEEDED, b.stdout
    finally:
        with contextlib.suppress(Exception):
            release(run_container(docker_client, trimo_a.store().key, run_a.id))
        a.wait(timeout=120)
    # The run's network and its proxy went with it.
    for net in nets_a:
        with pytest.raises(docker.errors.NotFound):
            docker_client.networks.get(net)
    left = [f"{LABEL_RUN}={run_a.id}", f"{LABEL_STORE}={trimo_a.store().key}"]
    assert docker_client.containers.list(all=True, filters={"label": left}) == []


def test_allowlist_lets_registries_through_and_reports_a_blocked_host(
    tmp_path: Path, base_image: str
) -> None:
    trimo = Trimo(tmp_path / "data")
    repo = probe_repo(tmp_path / "repo", "network:\n  mode: allowlist\n  presets: [pypi, npm]\n")
    agent = (
        "pip download --no-deps -q -d /tmp/wheels six && ls /tmp/wheels; "
        'echo "is-number $(npm view is-number version)"; '
        "curl -sS -m 10 https://example.org/ 2>&1; "
        "python3 -c 'import urllib.request as u; u.urlopen(\"https://example.org/\")' 2>&1 "
        "| tail -1; "
        'python3 -c "import time,subprocess; t=time.monotonic(); '
        "subprocess.run(['curl','-s','-m','10','https://example.org/']); "
        "print('seconds', round(time.monotonic()-t, 3))\""
    )
    r = trimo("run", "--repo", str(repo), "--task", "registries", "--agent", agent, timeout=900)
    out = r.stdout
    assert r.returncode == 0, out + r.stderr
    assert re.search(r"six-[\d.]+-py2\.py3-none-any\.whl", out), out
    assert re.search(r"is-number \d+\.\d+\.\d+", out), out
    # The proxy's answer names the host and the reason, fast.
    assert "Blocked by Trimo: example.org not in network.allow" in out
    seconds = float(re.search(r"seconds ([\d.]+)", out)[1])  # type: ignore[index]
    assert seconds < 2, seconds
    assert "network: blocked CONNECT example.org:443 — not in network.allow" in out
    # The run's report: the host, how often, and the exact line that would allow it.
    run = trimo.store().list_runs()[0]
    blocked = {row["host"]: row for row in (run.report or {})["network_blocked"]}
    assert blocked["example.org"]["count"] == 3
    assert blocked["example.org"]["fix"].startswith('network: {allow: ["example.org"]}')
    assert "pypi.org" not in blocked and "registry.npmjs.org" not in blocked
    assert 'to allow: network: {allow: ["example.org"]}' in out


def test_proxy_refuses_private_destinations_before_connecting(
    tmp_path: Path, base_image: str, docker_client: docker.DockerClient, file_server: str
) -> None:
    trimo = Trimo(tmp_path / "data")
    repo = probe_repo(tmp_path / "repo", "network: {mode: open}\n")
    targets = [
        "127.0.0.1:22",
        "localhost:8000",
        "10.0.0.1:80",
        "172.16.0.1:80",
        "192.168.1.1:80",
        "169.254.169.254:80",
        "100.64.0.1:80",
        "[::1]:80",
        "[fe80::1]:80",
        f"{file_server}:8080",
    ]
    # The host's own addresses that no other rule covers (here a documentation-range address).
    covered = ("127.", "10.", "172.", "192.168.", "169.254.", "100.")
    own = [a for a in host_addresses() if a.count(".") == 3 and not a.startswith(covered)]
    targets += [f"{a}:22" for a in own]
    r = trimo(
        "run",
        "--repo",
        str(repo),
        "--task",
        "private",
        "--agent",
        "python3 netprobe.py proxy " + " ".join(targets),
    )
    answers = {a["target"]: a for a in probes(r.stdout)["proxy"]["answers"]}
    expected = {
        "127.0.0.1:22": "127.0.0.1 is a loopback address",
        "localhost:8000": "localhost resolves to 127.0.0.1, a loopback address",
        "10.0.0.1:80": "a private address",
        "172.16.0.1:80": "a private address",
        "192.168.1.1:80": "a private address",
        "169.254.169.254:80": "169.254.169.254 is a link-local address",
        "100.64.0.1:80": "a carrier-grade NAT address",
        "[::1]:80": "a loopback address",
        "[fe80::1]:80": "a link-local address",
        f"{file_server}:8080": "a private address",
        **{f"{a}:22": f"{a} is one of the host's own addresses" for a in own},
    }
    for target, why in expected.items():
        status = answers[target]["status"]
        assert status.startswith("HTTP/1.1 403 Blocked by Trimo"), (target, status)
        assert why in status, (target, status)
        assert answers[target]["seconds"] < 1, answers[target]
    # Refused before connecting: the server on the egress network saw nobody.
    assert connections(docker_client, file_server) == 0
    # A named internal host of the server's settings is let through, and only it.
    r = trimo(
        "run",
        "--repo",
        str(repo),
        "--task",
        "internal",
        "--agent",
        f"curl -sS -m 5 http://{file_server}:8080/count; echo; "
        "python3 netprobe.py proxy 10.0.0.1:80",
        TRIMO_NETWORK_INTERNAL_HOSTS=file_server,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert connections(docker_client, file_server) == 2  # curl's, and this question's
    assert "a private address" in probes(r.stdout)["proxy"]["answers"][0]["status"]


def test_capabilities_are_the_documented_few_and_the_agent_cannot_be_root(
    tmp_path: Path, base_image: str
) -> None:
    trimo = Trimo(tmp_path / "data")
    repo = probe_repo(tmp_path / "repo", "network: {mode: none}\n")
    agent = (
        "grep -E '^(CapEff|CapBnd|NoNewPrivs):' /proc/self/status | sed 's/^/agent: /'; "
        'echo "suid-id: $(suid-id -u)"; su -c id root </dev/null; echo "su exit $?"; '
        "ls /var/run/docker.sock 2>&1 | sed 's/^/socket: /'; "
        "python3 netprobe.py route"
    )
    r = trimo("run", "--repo", str(repo), "--task", "caps", "--agent", agent)
    out = r.stdout
    assert r.returncode == 0, out + r.stderr
    values = {
        (who, name): value
        for who, name, value in re.findall(r"(preboot|agent): (\w+):\s+(\S+)", out)
    }
    expected = sum(1 << CAP_BITS[c] for c in RUN_CAPABILITIES)
    assert int(values[("preboot", "CapEff")], 16) == expected
    assert int(values[("preboot", "CapBnd")], 16) == expected
    assert int(values[("agent", "CapEff")], 16) == 0
    assert values[("agent", "NoNewPrivs")] == "1" and values[("preboot", "NoNewPrivs")] == "1"
    assert "suid-id: 1000" in out  # the setuid bit gives nothing back
    assert "su exit 0" not in out
    assert "socket: ls: cannot access '/var/run/docker.sock'" in out
    # mode none: loopback only, not even a route to look up.
    assert probes(out)["route"]["gateway"] is None
    assert probes(out)["route"]["connect"] == "ENETUNREACH"
    assert "network: none (no route out, no proxy)" in out


def test_network_mode_is_capped_by_the_server(tmp_path: Path, base_image: str) -> None:
    trimo = Trimo(tmp_path / "data")
    repo = light_repo(tmp_path / "repo", "network: bridge\n")
    r = trimo(
        "run",
        "--repo",
        str(repo),
        "--task",
        "cap",
        "--agent",
        "true",
        TRIMO_NETWORK_MAX_MODE=NetworkMode.ALLOWLIST.value,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert (
        "network: 'bridge' is the old form of this setting and now means {mode: open}" in r.stdout
    )
    assert "the server allows at most allowlist, so the run gets allowlist" in r.stdout


def spares_of(client: docker.DockerClient, store_key: str) -> list[str]:
    labels = [f"{LABEL_ROLE}={ROLE_SPARE}", f"{LABEL_STORE}={store_key}"]
    return [c.id for c in client.containers.list(all=True, filters={"label": labels})]


def test_a_run_takes_the_spare_proxy_an_earlier_run_started_with_its_own_policy(
    tmp_path: Path, base_image: str, docker_client: docker.DockerClient, file_server: str
) -> None:
    trimo = Trimo(tmp_path / "data")
    repo = light_repo(tmp_path / "repo", "network: {mode: allowlist}\n")
    first = trimo("run", "--repo", str(repo), "--task", "first", "--agent", "true")
    assert first.returncode == 0, first.stdout + first.stderr
    key = trimo.store().key
    # The first run left the next run's proxy: paused, on the egress network alone.
    (spare,) = spares_of(docker_client, key)
    container = docker_client.containers.get(spare)
    assert container.status == "paused"
    assert set(container.attrs["NetworkSettings"]["Networks"]) == {EGRESS_NETWORK}
    # The second run names the file server an internal host: only its own policy lets it in.
    fetch = f"curl -sS -m 5 http://{file_server}:8080/count; echo"
    second = trimo(
        "run",
        "--repo",
        str(repo),
        "--task",
        "second",
        "--agent",
        fetch,
        TRIMO_NETWORK_INTERNAL_HOSTS=file_server,
    )
    assert second.returncode == 0, second.stdout + second.stderr
    assert connections(docker_client, file_server) == 1
    # It took the spare (which went with it) and left another for the run after it.
    left = [c for c in docker_client.containers.list(all=True) if c.id == spare]
    assert not left, (left[0].name, left[0].status, second.stdout + second.stderr)
    (following,) = spares_of(docker_client, key)
    assert following != spare
    assert docker_client.containers.get(following).status == "paused"
    # A third run without the internal host: the spare it takes refuses the server, whatever
    # the run before asked for.
    third = trimo("run", "--repo", str(repo), "--task", "third", "--agent", fetch)
    assert f"Trimo's network policy refused GET {file_server}:8080" in third.stdout
    assert f"network: blocked GET {file_server}:8080" in third.stdout
    assert connections(docker_client, file_server) == 2  # the second run's, and one question


def _run_network(
    runtime: DockerRuntime, image: str, store: str, run_id: int
) -> tuple[ContainerSpec, str]:
    """A run's spec in `store` and the network the engine makes for it."""
    spec = ContainerSpec(
        image=image, run_id=run_id, pipeline_id=1, owner=TEST_OWNER, store=store,
        name=f"trimo-test-run-{uuid.uuid4().hex[:8]}",
    )  # fmt: skip
    assert spec.name is not None
    return spec, runtime.create_network(spec.name, spec)


def test_the_reaper_never_removes_a_spare_a_run_is_taking(
    docker_client: docker.DockerClient, runtime: DockerRuntime, base_image: str
) -> None:
    """A spare whose maker is dead is the reaper's, unless a run unpaused it a moment ago and is
    renaming it; and the reaper takes a paused spare by the same unpause a run does."""
    image = ensure_proxy_image(docker_client)
    store = f"test-spares-{uuid.uuid4().hex[:8]}"
    dead_maker = f"{TEST_OWNER}-gone"
    claimed, cut_short, paused = (
        runtime.start_spare_proxy(image, dead_maker, store) for _ in range(3)
    )
    # The run taking `claimed` has its network, as a run does: a claimed spare whose network is
    # gone is any reaper's to remove (other test processes reap too).
    spec, network = _run_network(runtime, image, store, run_id=8)
    try:
        # A run unpauses one (its claim) and renames it while the reaper is judging it.
        docker_client.api.unpause(claimed)
        # A maker died before pausing this one: it runs under a spare's name, and no run will
        # ever unpause it.
        docker_client.api.unpause(cut_short)
        found: list[list[Leftover]] = []
        reaper = threading.Thread(
            target=lambda: found.append(runtime.reap(store, lambda lo: lo.owner == dead_maker))
        )
        reaper.start()
        time.sleep(SPARE_RENAME_SECONDS / 4)
        docker_client.api.rename(claimed, f"{spec.name}-proxy")
        reaper.join(timeout=60)
        [removed] = found
        gone = {r.container_id for r in removed}
        assert claimed not in gone
        assert docker_client.containers.get(claimed).status == "running"
        assert cut_short in gone
        with pytest.raises(docker.errors.NotFound):
            docker_client.containers.get(cut_short)
        # A paused spare of a dead maker stays for a run to take.
        assert paused not in gone
        assert docker_client.containers.get(paused).status == "paused"
    finally:
        for cid in (claimed, cut_short, paused):
            runtime.remove(cid)
        runtime.remove_network(network)


def test_the_reaper_removes_spares_nobody_takes_and_those_of_finished_runs(
    docker_client: docker.DockerClient,
    runtime: DockerRuntime,
    base_image: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    image = ensure_proxy_image(docker_client)
    image_id = runtime.image_id(image)
    store = f"test-spares-{uuid.uuid4().hex[:8]}"
    spec, network = _run_network(runtime, image, store, run_id=7)
    spares = {
        runtime.start_spare_proxy(image, TEST_OWNER, store),
        runtime.start_spare_proxy(image, TEST_OWNER, store),
    }
    try:
        # Two runs never take the same spare: each unpause is a claim only one wins.
        taken = runtime.claim_spare_proxy(store, image_id, f"{spec.name}-proxy")
        assert taken in spares  # (started within the same second: either may be the oldest)
        (left,) = spares - {taken}
        with pytest.raises(docker.errors.APIError):
            docker_client.api.unpause(taken)
        runtime.join_run_network(taken, spec.name, "trimo-proxy")
        mine = {taken, left, network}
        # A paused spare, and one whose run goes on, stay.
        live = runtime.reap(store, lambda leftover: False)
        assert [r for r in live if r.container_id in mine] == []
        finished = runtime.reap(store, lambda leftover: leftover.run_id == 7)
        assert {(r.kind, r.container_id) for r in finished if r.container_id in mine} == {
            ("spare proxy", taken),
            ("network", network),
        }
        with pytest.raises(docker.errors.NotFound):
            docker_client.containers.get(taken)
        assert docker_client.containers.get(left).status == "paused"
        # An unclaimed spare past its age is the reaper's too, whatever store is reaping (only
        # asked here: the engine may hold other sessions' spares).
        monkeypatch.setattr(runtime_module, "SPARE_MAX_AGE_SECONDS", -1)
        aged = runtime.dead_spares("another-store", lambda leftover: False)
        assert left in {r.container_id for r in aged}
    finally:
        for cid in spares:
            runtime.remove(cid)
        runtime.remove_network(network)
