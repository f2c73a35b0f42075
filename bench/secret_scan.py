"""Benchmark of the secret scan before a push, against the publication it guards.

    python bench/secret_scan.py [--lines 10000] [--commits 10] [--secrets 6] [--rounds 7]

A repository gets a change of `--lines` added lines over `--commits` commits (plus a 256 KB
binary file), handed back as a git bundle as a run would. Each round, in a fresh data directory
and a fresh bare remote: the baseline is what Trimo already did before a push (bundle import and
verification, then the push itself); the scan is `refuse_secrets` over the same commits with
`--secrets` values (each looked for in plain, base64 x3 alignments x2 alphabets, URL and hex
forms). The result: the scan's median time and its ratio to the baseline's.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bot.secretscan import refuse_secrets
from bot.workspace import Remote, Workspace

TARGET_MS = 100.0
WORDS = ["login", "session", "token", "user", "account", "render", "cache", "queue", "worker"]
ENV = {
    "GIT_AUTHOR_NAME": "Bench",
    "GIT_AUTHOR_EMAIL": "bench@example.test",
    "GIT_COMMITTER_NAME": "Bench",
    "GIT_COMMITTER_EMAIL": "bench@example.test",
    "HOME": "/nonexistent",
    "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
}
HUMAN_LINE = (
    "{lines} added lines in {commits} commits ({patch_kb:.0f} KB of patch), {secrets} secrets: "
    "scan {scan_ms:.1f} ms vs import+push {publish_ms:.1f} ms (medians of {rounds}), "
    "scan/publish {ratio:.2f}, target scan < {target:.0f} ms: {verdict}"
)


def _git(cwd: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", *args], cwd=cwd, env=ENV, check=True, capture_output=True, text=True
    )
    return done.stdout.strip()


def make_change(root: Path, lines: int, commits: int) -> tuple[Path, Path, str, str]:
    """A work repository with base and head, its bundle of base..head, and the base remote."""
    rng = random.Random(14)
    work = root / "work"
    work.mkdir()
    _git(work, "init", "-q", "-b", "main")
    (work / "README.md").write_text("# bench\n")
    _git(work, "add", "-A")
    _git(work, "commit", "-qm", "base")
    base = _git(work, "rev-parse", "HEAD")
    remote = root / "remote.git"
    _git(root, "clone", "-q", "--bare", str(work), str(remote))
    per_commit = lines // commits
    for n in range(commits):
        text = "".join(
            f"    {' '.join(rng.choices(WORDS, k=6))} = compute({n}, {i})  # step\n"
            for i in range(per_commit)
        )
        (work / f"src/module_{n}.py").parent.mkdir(exist_ok=True)
        (work / f"src/module_{n}.py").write_text(text)
        if n == 0:
            (work / "assets.bin").write_bytes(rng.randbytes(256 * 1024))
        _git(work, "add", "-A")
        _git(work, "commit", "-qm", f"Change {n}: rework the workers")
    head = _git(work, "rev-parse", "HEAD")
    _git(work, "bundle", "create", "-q", str(root / "result.bundle"), "HEAD", f"^{base}")
    return work, remote, base, head


def one_round(
    root: Path, remote_src: Path, bundle: Path, secrets: dict[str, str]
) -> dict[str, float]:
    remote = root / "remote.git"
    shutil.copytree(remote_src, remote)
    ws = Workspace(root / "data")
    checkout = ws.prepare(Remote(str(remote)), "trimo/bench")
    started = time.perf_counter()
    result = ws.import_bundle(checkout, bundle, run_id=1)
    ws.publish(checkout, result)
    publish = time.perf_counter() - started
    started = time.perf_counter()
    hits = refuse_secrets(secrets, checkout.mirror, result.base, result.head, run_id=1)
    scan = time.perf_counter() - started
    assert hits == []
    return {"publish_s": publish, "scan_s": scan}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=10_000)
    parser.add_argument("--commits", type=int, default=10)
    parser.add_argument("--secrets", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rng = random.Random(7)
    secrets = {
        f"SECRET_{i}": "".join(rng.choices("abcdefghijklmnopqrstuvwxyz0123456789+/=-_ ", k=32))
        for i in range(args.secrets)
    }
    with tempfile.TemporaryDirectory(prefix="trimo-bench-scan-") as tmp:
        root = Path(tmp)
        _, remote, base, head = make_change(root, args.lines, args.commits)
        patch_bytes = len(
            subprocess.run(
                [
                    "git",
                    "-C",
                    str(remote.parent / "work"),
                    "log",
                    "-p",
                    "--text",
                    f"{base}..{head}",
                ],
                capture_output=True,
                check=True,
            ).stdout
        )
        rounds = []
        for n in range(args.rounds):
            work = root / f"round-{n}"
            work.mkdir()
            rounds.append(one_round(work, remote, root / "result.bundle", secrets))
            shutil.rmtree(work)
    scan_ms = statistics.median(r["scan_s"] for r in rounds) * 1000
    publish_ms = statistics.median(r["publish_s"] for r in rounds) * 1000
    summary = {
        "lines": args.lines,
        "commits": args.commits,
        "secrets": args.secrets,
        "rounds": args.rounds,
        "patch_kb": patch_bytes / 1024,
        "scan_ms": scan_ms,
        "publish_ms": publish_ms,
        "ratio": scan_ms / publish_ms,
        "target": TARGET_MS,
        "verdict": "met" if scan_ms < TARGET_MS else "NOT met",
    }
    print(json.dumps(summary) if args.json else HUMAN_LINE.format(**summary))


if __name__ == "__main__":
    main()
