"""Dispatch overhead: `trimo run` of a trivial agent against a bare `docker run` of the same work.

Both sides use the warm base image; Trimo's mirror is warm too. Trimo's side includes everything a
user waits for: process start, store, mirror fetch, branch, checkout upload, the runner's protocol,
the bundle hand-back, verification and the push. Runs alternate, so machine noise hits both alike.

The allowlist rows: the same `trimo run` with `network: {mode: allowlist}` (the run's own network
and its egress proxy) against `network: {mode: none}` (neither), and a 50 MB download from a local
HTTP server on the egress network, through a run's proxy against a container fetching it directly.
An allowlist run takes the spare proxy the run before it started and starts the next one, as
runs in a row do; the warm-up run is the one that starts its proxy itself. Each mode is reported
twice: the whole command, and the seconds until the agent starts (from the run's own progress
lines), which is what a run of any length waits for. The allowlist rows are measured twice: with
the trivial agent, whose run ends as its agent starts (so the next run's spare proxy, started
when the agent starts, competes with the run's end for the engine), and with an agent that works
2 seconds first, as every real agent works longer than that.

    python bench/dispatch.py [--rounds 7] [--no-network]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMAGE = "trimo/base:bookworm"
AGENT = "date +%s%N > hello.txt && git add hello.txt && git commit -qm 'Say hello'"
WORK_SECONDS = 2
WORKING_AGENT = f"sleep {WORK_SECONDS} && {AGENT}"
GIT_ENV = {
    "GIT_AUTHOR_NAME": "B",
    "GIT_AUTHOR_EMAIL": "b@example.test",
    "GIT_COMMITTER_NAME": "B",
    "GIT_COMMITTER_EMAIL": "b@example.test",
}


def sh(*args: str, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, check=True, capture_output=True, text=True, **kw)  # type: ignore[call-overload]


def make_repo(path: Path) -> None:
    path.mkdir(parents=True)
    (path / "README.md").write_text("# bench\n")
    env = {**os.environ, **GIT_ENV}
    sh("git", "init", "-q", "-b", "main", cwd=path, env=env)
    sh("git", "add", "-A", cwd=path, env=env)
    sh("git", "commit", "-qm", "init", cwd=path, env=env)


def trimo_run(repo: Path, data: Path, i: int) -> float:
    return trimo_run_phases(repo, data, i)[0]


def trimo_run_phases(
    repo: Path, data: Path, i: int, agent: str = AGENT
) -> tuple[float, float, float]:
    """One `trimo run`: its wall time, the seconds from its start to the agent's (as the run's
    own progress lines tell them: what a run waits before its agent works), and the seconds
    until it printed its summary (the run is over; the process may still finish starting the
    next run's spare proxy)."""
    env = {**os.environ, "TRIMO_DATA_DIR": str(data), "PYTHONUNBUFFERED": "1"}
    started = time.perf_counter()
    # The same task each round: one pipeline, one warm branch, as a follow-up run would be.
    command = [sys.executable, "-m", "bot", "run", "--repo", str(repo), "--task", "bench task"]
    proc = subprocess.Popen(
        [*command, "--agent", agent],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdout is not None
    out: list[str] = []
    summary: float | None = None
    for line in proc.stdout:
        if summary is None and re.match(r"run \d+: \w+$", line.strip()):
            summary = time.perf_counter() - started
        out.append(line)
    if proc.wait() != 0:
        raise RuntimeError(f"trimo run failed:\n{''.join(out)}")
    wall = time.perf_counter() - started
    agent = re.search(r"^\[\s*([0-9.]+)s\] agent$", "".join(out), re.MULTILINE)
    if agent is None or summary is None:
        raise RuntimeError(f"no agent phase or summary in the run's output:\n{''.join(out)}")
    return wall, float(agent.group(1)), summary


def bare_run() -> float:
    script = (
        "mkdir -p /tmp/w && cd /tmp/w && git init -q -b main && echo '# bench' > README.md "
        f"&& git add -A && git commit -qm init && {AGENT}"
    )
    env_flags = [f"-e{k}={v}" for k, v in GIT_ENV.items()]
    started = time.perf_counter()
    sh("docker", "run", "--rm", *env_flags, "--entrypoint", "bash", IMAGE, "-c", script)
    return time.perf_counter() - started


def network_repo(path: Path, mode: str) -> Path:
    make_repo(path)
    (path / ".trimo").mkdir()
    (path / ".trimo" / "config.yml").write_text(f"network: {{mode: {mode}}}\n")
    env = {**os.environ, **GIT_ENV}
    sh("git", "add", "-A", cwd=path, env=env)
    sh("git", "commit", "-qm", f"network {mode}", cwd=path, env=env)
    return path


def mode_medians(
    none_repo: Path, allow_repo: Path, data: Path, rounds: int, agent: str
) -> dict[str, float]:
    """Medians of the whole command, the seconds to the agent and to the summary, per mode."""
    times: dict[str, list[float]] = {}
    for i in range(rounds):
        for mode, repo in (("none", none_repo), ("allowlist", allow_repo)):
            for what, value in zip(
                ("wall", "agent", "summary"), trimo_run_phases(repo, data, i, agent), strict=True
            ):
                times.setdefault(f"{what}_{mode}", []).append(value)
    return {key: statistics.median(values) for key, values in times.items()}


def network_rows(rounds: int, tmp: Path) -> dict[str, object]:
    """What the run's network and proxy add to a dispatch, and the proxy's download speed."""
    none_repo = network_repo(tmp / "none", "none")
    allow_repo = network_repo(tmp / "allow", "allowlist")
    data = tmp / "data-net"
    trimo_run(none_repo, data, -1)
    trimo_run(allow_repo, data, -1)
    med = mode_medians(none_repo, allow_repo, data, rounds, AGENT)
    # The same with an agent that works for a moment, as every real one does: the next run's
    # spare proxy starts while it works, not while the run is ending.
    work = mode_medians(none_repo, allow_repo, data, rounds, WORKING_AGENT)
    remove_spares(data)
    direct, proxied = download_speeds(max(5, rounds))
    d, p = statistics.median(direct), statistics.median(proxied)
    rows: dict[str, object] = {}
    for prefix, m in (("", med), (f"agent_{WORK_SECONDS}s_", work)):
        rows.update(
            {
                f"{prefix}mode_none_median_s": round(m["wall_none"], 3),
                f"{prefix}mode_allowlist_median_s": round(m["wall_allowlist"], 3),
                f"{prefix}network_and_proxy_added_s": round(
                    m["wall_allowlist"] - m["wall_none"], 3
                ),
                f"{prefix}to_summary_none_median_s": round(m["summary_none"], 3),
                f"{prefix}to_summary_allowlist_median_s": round(m["summary_allowlist"], 3),
                f"{prefix}network_and_proxy_added_to_summary_s": round(
                    m["summary_allowlist"] - m["summary_none"], 3
                ),
                f"{prefix}to_agent_none_median_s": round(m["agent_none"], 3),
                f"{prefix}to_agent_allowlist_median_s": round(m["agent_allowlist"], 3),
                f"{prefix}network_and_proxy_added_to_agent_s": round(
                    m["agent_allowlist"] - m["agent_none"], 3
                ),
            }
        )
    return {
        **rows,
        "download_mb": DOWNLOAD_MB,
        "direct_mb_s": round(d, 1),
        "proxied_mb_s": round(p, 1),
        "download_ratio": round(p / d, 2),
        "direct_runs_mb_s": [round(x, 1) for x in direct],
        "proxied_runs_mb_s": [round(x, 1) for x in proxied],
    }


def remove_spares(data: Path) -> None:
    """The spare proxy the last allowlist run left for a next one: the bench leaves nothing."""
    import docker

    from bot.runtime import DockerRuntime
    from bot.store import Store

    store = Store(Store.sqlite_url(data))
    runtime = DockerRuntime(docker.from_env())
    for spare in runtime.spare_proxies(store.key):
        runtime.remove(spare)
    store.close()


DOWNLOAD_MB = 50
# The local file server both downloads fetch from: Python's http.server, but sending the file
# with sendfile(2) as a package mirror's web server does, so the server's own copying does not
# take the core the network path needs.
FILE_SERVER = """
import http.server

class Files(http.server.SimpleHTTPRequestHandler):
    def copyfile(self, source, outputfile):
        outputfile.flush()
        self.connection.sendfile(source)

http.server.ThreadingHTTPServer(("", 8080), Files).serve_forever()
"""
SERVER = "trimo-bench-files"
CURL = "curl -s --noproxy '' -o /dev/null -w '%{{speed_download}}\\n' http://{server}:8080/blob"


def download_speeds(rounds: int) -> tuple[list[float], list[float]]:
    """MB/s of a 50 MB download from a server on the egress network, alternating: a container
    on the egress network fetching it directly, and a container on a run's network made by
    Trimo's own code (`RunNetwork`: internal network, egress proxy, the same policy a run gets,
    the server named an internal host) fetching it through the proxy."""
    import docker

    from bot.egress import PROXY_URL, RunNetwork, ensure_proxy_image
    from bot.network import NetworkLimits, NetworkMode, resolve_policy
    from bot.runtime import ContainerSpec, DockerRuntime

    runtime = DockerRuntime(docker.from_env())
    runtime.ensure_egress_network()
    script = (
        f"head -c {DOWNLOAD_MB * 1024 * 1024} /dev/zero > /tmp/blob && cd /tmp && "
        f"python3 -c {shlex.quote(FILE_SERVER)}"
    )
    subprocess.run(["docker", "rm", "-f", SERVER], check=False, capture_output=True)
    sh(
        "docker", "run", "-d", "--name", SERVER, "--network", "trimo-egress",
        "--entrypoint", "bash", IMAGE, "-c", script,
    )  # fmt: skip
    spec = ContainerSpec(
        image=IMAGE, run_id=0, pipeline_id=0, owner="bench", network="trimo-bench-run",
        name="trimo-bench-run", store="bench",
    )  # fmt: skip
    limits = NetworkLimits(allow=(SERVER,), internal_hosts=(SERVER,))
    policy = resolve_policy(NetworkMode.ALLOWLIST, [], [], limits, [])
    net = RunNetwork(
        runtime, spec, policy, lambda _b: None, lambda: ensure_proxy_image(runtime.client)
    )
    clients: list[str] = []
    try:
        net.ready()
        for name, network in (
            ("trimo-bench-direct", "trimo-egress"),
            ("trimo-bench-proxied", spec.network),
        ):
            subprocess.run(["docker", "rm", "-f", name], check=False, capture_output=True)
            sh(
                "docker", "run", "-d", "--name", name, "--network", network,
                "--entrypoint", "sleep", IMAGE, "600",
            )  # fmt: skip
            clients.append(name)
        for _ in range(100):
            probe = subprocess.run(
                ["docker", "exec", SERVER, "curl", "-sf", "-o", "/dev/null", "localhost:8080/blob"],
                check=False,
            )
            if probe.returncode == 0:
                break
            time.sleep(0.1)
        fetch = CURL.format(server=SERVER)
        direct: list[float] = []
        proxied: list[float] = []
        for _ in range(rounds):
            out = sh("docker", "exec", clients[0], "bash", "-c", fetch).stdout
            direct.append(float(out.split()[-1]) / 1e6)
            via = fetch.replace("--noproxy ''", f"--proxy {PROXY_URL}")
            out = sh("docker", "exec", clients[1], "bash", "-c", via).stdout
            proxied.append(float(out.split()[-1]) / 1e6)
        return direct, proxied
    finally:
        for name in clients:
            subprocess.run(["docker", "rm", "-f", name], check=False, capture_output=True)
        net.close()
        subprocess.run(["docker", "rm", "-f", SERVER], check=False, capture_output=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--no-network", action="store_true", help="Skip the allowlist rows.")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="trimo-bench-") as tmp:
        repo, data = Path(tmp) / "repo", Path(tmp) / "data"
        make_repo(repo)
        trimo_run(repo, data, -1)  # warm: mirror cloned, image checked
        bare_run()
        trimo_times, bare_times = [], []
        for i in range(args.rounds):
            bare_times.append(bare_run())
            trimo_times.append(trimo_run(repo, data, i))
        remove_spares(data)  # these runs have the default network mode, allowlist
        net = {} if args.no_network else network_rows(args.rounds, Path(tmp))
    t, b = statistics.median(trimo_times), statistics.median(bare_times)
    result = {
        "bench": "dispatch",
        "rounds": args.rounds,
        "trimo_run_median_s": round(t, 3),
        "bare_docker_run_median_s": round(b, 3),
        "overhead_s": round(t - b, 3),
        "ratio": round(t / b, 2),
        "trimo_runs_s": [round(x, 3) for x in trimo_times],
        "bare_runs_s": [round(x, 3) for x in bare_times],
        **net,
    }
    print(json.dumps(result))
    print(
        f"trimo run {t:.2f}s vs bare docker run {b:.2f}s (medians of {args.rounds}): "
        f"overhead {t - b:.2f}s, ratio {t / b:.2f}x (target: overhead under 1.5 s)"
    )
    if net:
        print(
            f"allowlist {net['mode_allowlist_median_s']}s vs none {net['mode_none_median_s']}s: "
            f"network and proxy add {net['network_and_proxy_added_s']}s (target: under 0.3 s)"
        )
        print(
            f"  until the agent starts: allowlist {net['to_agent_allowlist_median_s']}s vs none "
            f"{net['to_agent_none_median_s']}s: {net['network_and_proxy_added_to_agent_s']}s"
        )
        w = f"agent_{WORK_SECONDS}s_"
        print(
            f"  with an agent that works {WORK_SECONDS}s: allowlist "
            f"{net[w + 'mode_allowlist_median_s']}s vs none {net[w + 'mode_none_median_s']}s: "
            f"{net[w + 'network_and_proxy_added_s']}s "
            f"(until the agent starts {net[w + 'network_and_proxy_added_to_agent_s']}s, "
            f"until the summary {net[w + 'network_and_proxy_added_to_summary_s']}s)"
        )
        print(
            f"{DOWNLOAD_MB} MB through the proxy {net['proxied_mb_s']} MB/s vs direct "
            f"{net['direct_mb_s']} MB/s: {net['download_ratio']}x (target: at least 0.8x)"
        )


if __name__ == "__main__":
    main()
