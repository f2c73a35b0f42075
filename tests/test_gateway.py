"""The model gateway on real sockets: the token swapped for the key, streams unchanged, usage
metered from each provider's own shape, budgets and ended runs refused."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

import pytest
import requests

from tests.gateway_local import LocalGateway
from tests.model_fake import SESSION, ModelFake

KEY = "sk-canary-Hn38dQ-real-provider-key"
_IDS = re.compile(r"\b(msg|toolu|resp|fc|call|chatcmpl)[_-][0-9a-f]+")


@pytest.fixture
def fake() -> Iterator[ModelFake]:
    with ModelFake() as server:
        yield server


def _anthropic(base: str, token: str, step_messages: list[object] | None = None) -> bytes:
    body = {
        "model": "claude-sonnet-4-5",
        "max_tokens": 1024,
        "stream": True,
        "tools": [{"name": "Read", "input_schema": {"type": "object"}}],
        "messages": step_messages or [{"role": "user", "content": "fix it"}],
    }
    r = requests.post(
        f"{base}/v1/messages",
        json=body,
        headers={"x-api-key": token, "anthropic-version": "2023-06-01"},
        timeout=10,
    )
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/event-stream")
    return r.content


def _normal(stream: bytes) -> str:
    return _IDS.sub(r"\1_ID", stream.decode())


def test_an_anthropic_stream_passes_unchanged_with_the_key_added(fake: ModelFake) -> None:
    direct = _anthropic(fake.url, KEY)
    with LocalGateway(fake.url, KEY) as gw:
        through = _anthropic(f"{gw.url}/anthropic", gw.token)
    assert _normal(through) == _normal(direct)
    # Upstream saw the real key, never the run's token; the agent's side never saw the key.
    assert fake.served.headers[1]["x-api-key"] == KEY
    assert gw.token not in json.dumps(fake.served.headers)
    assert KEY not in through.decode()
    usage = [e for e in gw.events if e["event"] == "usage"]
    step = SESSION[0]
    assert usage[0]["input_tokens"] == step.usage_in
    assert usage[0]["output_tokens"] == step.usage_out
    assert usage[0]["model"] == "claude-sonnet-4-5"


def test_openai_responses_and_chat_streams_are_metered(fake: ModelFake) -> None:
    with LocalGateway(fake.url, KEY, prices={"gpt-5": (1.25, 10.0)}) as gw:
        headers = {"authorization": f"Bearer {gw.token}"}
        r = requests.post(
            f"{gw.url}/openai/responses",
            json={
                "model": "gpt-5-codex",
                "stream": True,
                "input": "fix",
                "tools": [{"type": "function", "name": "shell_command"}],
            },
            headers=headers,
            timeout=10,
        )
        assert r.status_code == 200
        assert b"event: response.completed" in r.content
        # A streamed chat completion that did not ask for usage is asked for it by the gateway.
        chat = requests.post(
            f"{gw.url}/openai/chat/completions",
            json={
                "model": "gpt-4.1",
                "stream": True,
                "messages": [{"role": "user", "content": "x"}],
            },
            headers=headers,
            timeout=10,
        )
        assert chat.status_code == 200
        assert b'"usage"' in chat.content and chat.content.rstrip().endswith(b"data: [DONE]")
        plain = requests.post(
            f"{gw.url}/openai/chat/completions",
            json={"model": "gpt-4.1", "messages": [{"role": "user", "content": "x"}]},
            headers=headers,
            timeout=10,
        )
        assert plain.json()["usage"]["prompt_tokens"] == SESSION[0].usage_in
    assert fake.served.headers[0]["authorization"] == f"Bearer {KEY}"
    totals = [e for e in gw.events if e["event"] == "usage"][-1]["totals"]
    assert totals["input_tokens"] == fake.served.input_tokens
    assert totals["output_tokens"] == fake.served.output_tokens
    assert totals["calls"] == 3
    # Only the gpt-5 call has a price: 1200 in at $1.25/M and 40 out at $10/M.
    assert totals["usd"] == pytest.approx((1200 * 1.25 + 40 * 10.0) / 1e6)


def test_a_wrong_token_or_an_ended_run_is_refused_before_upstream(fake: ModelFake) -> None:
    with LocalGateway(fake.url, KEY, token="trimo-run-A") as gw:
        other = requests.post(
            f"{gw.url}/anthropic/v1/messages",
            json={"model": "m", "messages": []},
            headers={"x-api-key": "trimo-run-B"},
            timeout=10,
        )
        assert other.status_code == 401
        assert "not valid for run 1" in other.json()["error"]["message"]
        missing = requests.post(f"{gw.url}/openai/responses", json={}, timeout=10)
        assert missing.status_code == 401
        gw.end()
        ended = requests.post(
            f"{gw.url}/anthropic/v1/messages",
            json={"model": "m", "messages": []},
            headers={"x-api-key": "trimo-run-A"},
            timeout=10,
        )
        assert ended.status_code == 401
        assert "has ended" in ended.json()["error"]["message"]
    assert fake.served.requests == []
    assert [e["reason"] for e in gw.events if e["event"] == "refused"] == [
        "token",
        "token",
        "ended",
    ]


def test_a_spent_budget_refuses_the_next_call_with_a_clear_error(fake: ModelFake) -> None:
    first = SESSION[0].usage_in + SESSION[0].usage_out
    with LocalGateway(fake.url, KEY, max_tokens=first) as gw:
        _anthropic(f"{gw.url}/anthropic", gw.token)
        r = requests.post(
            f"{gw.url}/anthropic/v1/messages",
            json={"model": "claude-sonnet-4-5", "stream": True, "messages": []},
            headers={"x-api-key": gw.token},
            timeout=10,
        )
    assert r.status_code == 402
    error = r.json()["error"]
    assert error["type"] == "budget_exceeded"
    assert f"{first} of {first} tokens" in error["message"]
    assert len(fake.served.requests) == 1
    kinds = [e["event"] for e in gw.events]
    assert kinds == ["usage", "budget_spent", "refused"]


def test_an_unknown_provider_path_says_which_exist(fake: ModelFake) -> None:
    with LocalGateway(fake.url, KEY) as gw:
        r = requests.post(f"{gw.url}/gemini/v1/x", json={}, timeout=10)
    assert r.status_code == 404
    assert "/anthropic/" in r.json()["error"]["message"]
