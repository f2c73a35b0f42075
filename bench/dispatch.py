"""Dispatch overhead: `trimo run` of a trivial agent against a bare `docker run` of the same work.

Both sides use the warm base image; Trimo's mirror is warm too. Trimo's side includes everything a
user waits for: process start, store, mirror fetch, branch, checkout upload, the runner's protocol,
the bundle hand-back, verification and the push. Runs alternate, so machine noise hits both alike.

    python bench/dispatch.py [--rounds 7]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMAGE = "trimo/base:bookworm"
AGENT = "date +%s%N > hello.txt && git add hello.txt && git commit -qm 'Say hello'"
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
    env = {**os.environ, "TRIMO_DATA_DIR": str(data)}
    started = time.perf_counter()
    # The same task each round: one pipeline, one warm branch, as a follow-up run would be.
    subprocess.run(
        [
            sys.executable,
            "-m",
            "bot",
            "run",
            "--repo",
            str(repo),
            "--task",
            "bench task",
            "--agent",
            AGENT,
        ],
        check=True,
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return time.perf_counter() - started


def bare_run() -> float:
    script = (
        "mkdir -p /tmp/w && cd /tmp/w && git init -q -b main && echo '# bench' > README.md "
        f"&& git add -A && git commit -qm init && {AGENT}"
    )
    env_flags = [f"-e{k}={v}" for k, v in GIT_ENV.items()]
    started = time.perf_counter()
    sh("docker", "run", "--rm", *env_flags, "--entrypoint", "bash", IMAGE, "-c", script)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
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
    }
    print(json.dumps(result))
    print(
        f"trimo run {t:.2f}s vs bare docker run {b:.2f}s (medians of {args.rounds}): "
        f"overhead {t - b:.2f}s, ratio {t / b:.2f}x (target: overhead under 1.5 s)"
    )


if __name__ == "__main__":
    main()
