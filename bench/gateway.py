"""The model gateway's added latency per streamed call, and the agent layer's build cache.

Latency: the scripted model server (tests/model_fake.py) and the gateway (bot/gateway/proxy.py,
the very program the gateway container runs) each in a process of their own on loopback; one
client makes streamed Anthropic Messages calls, alternating direct and through the gateway, each
timed to the last byte of the stream. Reported: p50 and p99 of both, and of the difference.

Layer cache: `build_agent_layer` twice on a repository image made for this bench, the first a
real build (the CLI installed), the second only a lookup.

    python bench/gateway.py --calls 400 [--layer claude-code]
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

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TOKEN = "trimo-run-bench"
KEY = "sk-bench-key"
BODY = {
    "model": "claude-sonnet-4-5",
    "max_tokens": 1024,
    "stream": True,
    "tools": [{"name": "Read", "input_schema": {"type": "object"}}],
    "messages": [{"role": "user", "content": "fix it"}],
}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def latency(calls: int) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    fake = subprocess.Popen(
        [sys.executable, "-m", "tests.model_fake"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert fake.stdout is not None
    upstream = fake.stdout.readline().strip()
    port = _free_port()
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(
            {
                "run_id": 1,
                "token": TOKEN,
                "port": port,
                "routes": [
                    {"name": "anthropic", "upstream": upstream, "header": "x-api-key", "key": KEY}
                ],
            },
            f,
        )
    # The gateway prints an event per call: to a file, which never fills up as a pipe would.
    events = tempfile.TemporaryFile("w+")  # noqa: SIM115 - closed in the finally below
    gateway = subprocess.Popen(
        [sys.executable, "-m", "bot.gateway.proxy"],
        env={**env, "TRIMO_GATEWAY_CONFIG": f.name, "TRIMO_GATEWAY_HOST": "127.0.0.1"},
        stdout=events,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            events.seek(0)
            if '"ready"' in events.read():
                break
            time.sleep(0.05)
        else:
            raise RuntimeError("the gateway did not start")
        session = requests.Session()
        through = f"http://127.0.0.1:{port}/anthropic/v1/messages"
        direct_url = f"{upstream}/v1/messages"
        times: dict[str, list[float]] = {"direct": [], "gateway": []}
        for i in range(calls + 20):
            for name, url, key in (
                ("direct", direct_url, KEY),
                ("gateway", through, TOKEN),
            )[:: 1 if i % 2 else -1]:
                started = time.perf_counter()
                r = session.post(url, json=BODY, headers={"x-api-key": key}, timeout=10)
                assert r.status_code == 200 and r.content.endswith(b"\n\n")
                if i >= 20:  # the first calls warm connections and caches
                    times[name].append((time.perf_counter() - started) * 1000)
        added = [g - d for g, d in zip(times["gateway"], times["direct"], strict=True)]
        return {
            "direct_p50_ms": statistics.median(times["direct"]),
            "direct_p99_ms": _percentile(times["direct"], 0.99),
            "gateway_p50_ms": statistics.median(times["gateway"]),
            "gateway_p99_ms": _percentile(times["gateway"], 0.99),
            "added_p50_ms": statistics.median(added),
            "added_p99_ms": _percentile(added, 0.99),
        }
    finally:
        gateway.terminate()
        gateway.wait(timeout=70)
        events.close()
        assert fake.stdin is not None
        fake.stdin.close()
        fake.wait(timeout=10)


def layer_cache(preset: str) -> dict[str, object]:
    import docker

    from bot import images
    from bot.agents.layer import build_agent_layer

    client = docker.from_env(timeout=1800)
    extra = os.environ.get("TRIMO_EXTRA_CA_CERTS")
    images.ensure_base(client, None, Path(extra) if extra else None)
    with tempfile.TemporaryDirectory() as tmp:
        # A repository image of its own, so the first layer build is a real one.
        (Path(tmp) / "Dockerfile").write_text(
            f"FROM {images.BASE_IMAGE}\nLABEL bench.made={time.time_ns()}\n"
        )
        repo = images.build_image(client, Path(tmp), name="bench-layer")
    made = []
    try:
        first_start = time.perf_counter()
        first = build_agent_layer(client, repo.tag, preset)
        first_s = time.perf_counter() - first_start
        second_start = time.perf_counter()
        second = build_agent_layer(client, repo.tag, preset)
        second_s = time.perf_counter() - second_start
        made = [first.image_id, repo.image_id]
        return {
            "first_built": first.built,
            "first_s": round(first_s, 2),
            "second_built": second.built,
            "second_s": round(second_s, 3),
            "same_image": first.image_id == second.image_id,
        }
    finally:
        for image_id in made:
            client.images.remove(image_id, force=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=400)
    parser.add_argument("--layer", default=None, help="also measure this preset's layer cache")
    args = parser.parse_args()
    result: dict[str, object] = {"latency": latency(args.calls)}
    if args.layer:
        result["layer"] = layer_cache(args.layer)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
