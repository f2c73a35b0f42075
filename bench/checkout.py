"""Benchmark of the workspace's prepare + checkout tar on a 10,000-commit repository, cold vs warm.

    python bench/checkout.py [--commits 10000] [--files 300] [--cache-dir DIR] [--runs 3]

The repository is generated once with `git fast-import` and cached; each invocation measures a
fresh data directory (cold mirror: clone) and then the same again (warm mirror: fetch only).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bot.workspace import Remote, Workspace

TARGET_WARM_SECONDS = 1.0
HUMAN_LINE = (
    "{commits} commits, {files} files: cold {cold_s:.3f} s, warm {warm_s:.3f} s "
    "(prepare {warm_prepare_s:.3f} s + tar {warm_tar_s:.3f} s, {tar_mb:.1f} MB), "
    "cold/warm {ratio:.1f}x, target warm < {target} s: {verdict}"
)
WORDS = ["login", "session", "token", "user", "account", "render", "cache", "queue", "worker"]


def _file_text(rng: random.Random, lines: int) -> str:
    return "".join(" ".join(rng.choices(WORDS, k=8)) + "\n" for _ in range(lines))


def _fast_import_stream(commits: int, files: int) -> bytes:
    rng = random.Random(1000)
    paths = [f"src/pkg{i % 12}/module_{i}.py" for i in range(files)]
    out: list[bytes] = []

    def data(text: str) -> None:
        raw = text.encode()
        out.append(b"data %d\n%s\n" % (len(raw), raw))

    for n in range(commits):
        when = 1_600_000_000 + n * 60
        out.append(b"commit refs/heads/main\n")
        out.append(b"committer Bench <bench@example.com> %d +0000\n" % when)
        data(f"Change {n}\n")
        if n == 0:
            for path in paths:
                out.append(f"M 100644 inline {path}\n".encode())
                data(_file_text(rng, 60))
        else:
            path = rng.choice(paths)
            out.append(f"M 100644 inline {path}\n".encode())
            data(_file_text(rng, 60))
    return b"".join(out)


def ensure_repository(cache: Path, commits: int, files: int) -> Path:
    """A bare repository with `commits` commits on main touching `files` files, made once."""
    bare = cache / f"remote-{commits}-{files}.git"
    if (bare / "trimo-bench-complete").exists():
        return bare
    shutil.rmtree(bare, ignore_errors=True)
    subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(bare)], check=True)
    subprocess.run(
        ["git", "fast-import", "--quiet"],
        cwd=bare,
        input=_fast_import_stream(commits, files),
        check=True,
    )
    subprocess.run(["git", "gc", "-q"], cwd=bare, check=True)
    (bare / "trimo-bench-complete").touch()
    return bare


def measure(ws: Workspace, remote: Remote) -> tuple[float, float, int]:
    start = time.perf_counter()
    co = ws.prepare(remote, "trimo/1-bench")
    prepared = time.perf_counter()
    with ws.checkout_tar(co) as tar:
        size = len(tar.read())
    return prepared - start, time.perf_counter() - prepared, size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--commits", type=int, default=10_000)
    parser.add_argument("--files", type=int, default=300)
    parser.add_argument("--runs", type=int, default=3, help="warm runs; the best is reported")
    parser.add_argument(
        "--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "trimo-bench"
    )
    args = parser.parse_args()
    args.cache_dir.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    bare = ensure_repository(args.cache_dir, args.commits, args.files)
    generate_s = time.perf_counter() - t0
    remote = Remote(str(bare))
    data_dir = Path(tempfile.mkdtemp(dir=args.cache_dir, prefix="data-"))
    try:
        ws = Workspace(data_dir)
        cold_prepare, cold_tar, _ = measure(ws, remote)
        warm = min(
            (measure(ws, remote) for _ in range(max(1, args.runs))), key=lambda m: m[0] + m[1]
        )
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
    cold_s, warm_s = cold_prepare + cold_tar, warm[0] + warm[1]
    result = {
        "commits": args.commits,
        "files": args.files,
        "generate_s": round(generate_s, 3),
        "cold_s": round(cold_s, 3),
        "cold_prepare_s": round(cold_prepare, 3),
        "cold_tar_s": round(cold_tar, 3),
        "warm_s": round(warm_s, 3),
        "warm_prepare_s": round(warm[0], 3),
        "warm_tar_s": round(warm[1], 3),
        "tar_bytes": warm[2],
        "ratio": round(cold_s / warm_s, 2),
    }
    print(json.dumps(result))
    print(
        HUMAN_LINE.format(
            **result,
            tar_mb=warm[2] / 1e6,
            target=TARGET_WARM_SECONDS,
            verdict="met" if warm_s < TARGET_WARM_SECONDS else "MISSED",
        )
    )


if __name__ == "__main__":
    main()
