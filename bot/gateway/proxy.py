"""The model gateway: a reverse proxy beside one run that swaps the run's token for the real key.

The coding agent inside the run's container holds a per-run token, never a provider key. This
proxy accepts that token and nothing else, adds the real key, forwards to the provider's base URL,
streams the response back byte for byte (SSE included), reads each response's `usage` on the way
and refuses calls once the run's budget is spent. It prints one JSON event per line on stdout
(`ready`, `usage`, `refused`, `ended`) for the daemon, which follows them through the Docker API
like the runner's events.

It runs in its own container (no untrusted code there), so it imports only the standard library
and aiohttp — Debian's python3-aiohttp in the gateway image. Its configuration arrives as a file
through the Docker API, which it deletes once read: the key is in no container's environment.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import ClientSession, ClientTimeout, TCPConnector, web

CONFIG_PATH = "/etc/trimo-gateway/config.json"
PORT = 8080
EVENT_PREFIX = "::gateway::"
MAX_JSON_BODY = 32 * 1024 * 1024
# Hop-by-hop headers (RFC 9110 §7.6.1), plus those the proxy sets itself.
_DROP_REQUEST = {
    "host",
    "connection",
    "keep-alive",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "content-length",
    "accept-encoding",
    "authorization",
    "x-api-key",
}
_DROP_RESPONSE = {
    "connection",
    "keep-alive",
    "transfer-encoding",
    "content-length",
    "content-encoding",
    "trailer",
    "upgrade",
}

BAD_TOKEN = "Trimo model gateway: this token is not valid for run {run}"
RUN_ENDED = "Trimo model gateway: run {run} has ended; its token is no longer valid"
BUDGET_SPENT = (
    "Trimo model gateway: run {run}'s model budget is spent ({spent}); no further model calls "
    "are allowed. Trimo stops the agent, commits its work so far and pushes it."
)
UNKNOWN_ROUTE = "Trimo model gateway: no provider at {path}; use {routes}"


@dataclass
class Route:
    """One provider: requests under /<name>/ go to `upstream`, with the real key in `header`."""

    name: str
    upstream: str
    header: str  # "x-api-key" (Anthropic) or "authorization" (OpenAI: Bearer)
    key: str

    def auth(self) -> dict[str, str]:
        if self.header == "authorization":
            return {"Authorization": f"Bearer {self.key}"}
        return {self.header: self.key}


@dataclass
class Meter:
    """Tokens and cost of the run's model calls so far, and its limits."""

    prices: dict[str, tuple[float, float]] = field(default_factory=dict)  # $ per million in/out
    max_tokens: int | None = None
    max_usd: float | None = None
    input_tokens: int = 0
    output_tokens: int = 0
    usd: float = 0.0
    calls: int = 0

    def price(self, model: str) -> tuple[float, float] | None:
        # The longest matching prefix wins: "claude-sonnet-4-5" over "claude-sonnet".
        best = None
        for name, price in self.prices.items():
            if model.startswith(name) and (best is None or len(name) > len(best[0])):
                best = (name, price)
        return best[1] if best else None

    def add(self, model: str, usage: tuple[int, int]) -> float:
        price = self.price(model)
        cost = (usage[0] * price[0] + usage[1] * price[1]) / 1e6 if price else 0.0
        self.input_tokens += usage[0]
        self.output_tokens += usage[1]
        self.usd += cost
        self.calls += 1
        return cost

    def spent(self) -> str | None:
        """What is spent, in words, when a limit is reached; None while the budget lasts."""
        tokens = self.input_tokens + self.output_tokens
        if self.max_tokens is not None and tokens >= self.max_tokens:
            return f"{tokens} of {self.max_tokens} tokens"
        if self.max_usd is not None and self.usd >= self.max_usd:
            return f"${self.usd:.4f} of ${self.max_usd:.4f}"
        return None

    def totals(self) -> dict[str, Any]:
        return {
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "usd": round(self.usd, 6),
            "calls": self.calls,
        }


def usage_of(obj: Any) -> tuple[int, int] | None:
    """(input, output) tokens in one response object or stream event, in any provider's shape.

    Anthropic: `usage` of the message, of `message_start.message` and of `message_delta`
    (cumulative output); OpenAI Responses: `response.usage` of `response.completed`; Chat
    Completions: `usage` of the body, or of the last chunk with `stream_options.include_usage`.
    """
    if not isinstance(obj, dict):
        return None
    usage = obj.get("usage")
    for holder in ("message", "response"):
        inner = obj.get(holder)
        if not isinstance(usage, dict) and isinstance(inner, dict):
            usage = inner.get("usage")
    if not isinstance(usage, dict):
        return None
    tokens_in = _int(usage.get("input_tokens")) or _int(usage.get("prompt_tokens"))
    # Anthropic counts cached input apart from input_tokens; OpenAI counts it inside.
    tokens_in += _int(usage.get("cache_creation_input_tokens"))
    tokens_in += _int(usage.get("cache_read_input_tokens"))
    tokens_out = _int(usage.get("output_tokens")) or _int(usage.get("completion_tokens"))
    return tokens_in, tokens_out


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


class UsageReader:
    """Reads usage from a response body as it streams by, without holding the stream back."""

    def __init__(self, streaming: bool) -> None:
        self.streaming = streaming
        self.pending = b""
        self.body = bytearray()
        self.tokens_in = 0
        self.tokens_out = 0
        self.model: str | None = None

    def feed(self, chunk: bytes) -> None:
        if not self.streaming:
            if len(self.body) < MAX_JSON_BODY:
                self.body.extend(chunk)
            return
        self.pending += chunk
        *lines, self.pending = self.pending.split(b"\n")
        for line in lines:
            self._line(line.rstrip(b"\r"))

    def _line(self, line: bytes) -> None:
        if not line.startswith(b"data:"):
            return
        data = line[5:].strip()
        if not data or data == b"[DONE]":
            return
        try:
            self._seen(json.loads(data))
        except ValueError:
            return

    def _seen(self, obj: Any) -> None:
        usage = usage_of(obj)
        if usage is not None:
            # Streams repeat or grow their counts (message_start, then message_delta): keep the
            # largest of each, which is the call's total.
            self.tokens_in = max(self.tokens_in, usage[0])
            self.tokens_out = max(self.tokens_out, usage[1])
        if isinstance(obj, dict):
            for holder in (obj, obj.get("message"), obj.get("response")):
                if isinstance(holder, dict) and isinstance(holder.get("model"), str):
                    self.model = holder["model"]

    def close(self) -> tuple[int, int]:
        if self.streaming and self.pending:
            self._line(self.pending)
        if not self.streaming and self.body:
            with contextlib.suppress(ValueError):
                self._seen(json.loads(bytes(self.body)))
        return self.tokens_in, self.tokens_out


def emit(kind: str, **data: Any) -> None:
    sys.stdout.write(f"{EVENT_PREFIX} {json.dumps({'event': kind, **data})}\n")
    sys.stdout.flush()


class Gateway:
    """The aiohttp application of one run's gateway."""

    def __init__(
        self,
        run_id: int,
        token: str,
        routes: list[Route],
        meter: Meter,
        emit: Callable[..., None] = emit,
    ) -> None:
        self.emit = emit
        self.run_id = run_id
        self.token = token
        self.routes = {r.name: r for r in routes}
        self.meter = meter
        self.ended = False
        self.session: ClientSession | None = None

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_JSON_BODY)
        app.router.add_route("*", "/{route}/{tail:.*}", self.handle)
        app.on_startup.append(self._open)
        app.on_cleanup.append(self._close)
        return app

    async def _open(self, _app: web.Application) -> None:
        # No total timeout: an agent's streamed call may legitimately last minutes.
        self.session = ClientSession(
            connector=TCPConnector(limit=64),
            timeout=ClientTimeout(total=None, connect=30, sock_read=600),
            auto_decompress=False,
        )

    async def _close(self, _app: web.Application) -> None:
        if self.session is not None:
            await self.session.close()

    def _error(self, status: int, kind: str, message: str) -> web.Response:
        # Both providers' SDKs read `error.message`; Anthropic's also reads `type` at the top.
        body = {"type": "error", "error": {"type": kind, "message": message, "code": kind}}
        return web.json_response(body, status=status)

    def _presented(self, request: web.Request) -> str:
        key = request.headers.get("x-api-key", "")
        auth = request.headers.get("authorization", "")
        if not key and auth.lower().startswith("bearer "):
            key = auth[7:].strip()
        return key

    async def handle(self, request: web.Request) -> web.StreamResponse:
        route = self.routes.get(request.match_info["route"])
        if route is None:
            routes = ", ".join(f"/{name}/" for name in self.routes)
            return self._error(
                404, "not_found_error", UNKNOWN_ROUTE.format(path=request.path, routes=routes)
            )
        if not hmac.compare_digest(self._presented(request).encode(), self.token.encode()):
            self.emit("refused", reason="token", path=request.path)
            return self._error(401, "authentication_error", BAD_TOKEN.format(run=self.run_id))
        if self.ended:
            self.emit("refused", reason="ended", path=request.path)
            return self._error(401, "authentication_error", RUN_ENDED.format(run=self.run_id))
        spent = self.meter.spent()
        if spent is not None:
            self.emit("refused", reason="budget", spent=spent, totals=self.meter.totals())
            message = BUDGET_SPENT.format(run=self.run_id, spent=spent)
            return self._error(402, "budget_exceeded", message)
        return await self._forward(route, request)

    async def _forward(self, route: Route, request: web.Request) -> web.StreamResponse:
        assert self.session is not None
        body = await request.read()
        model, streaming, body = _inspect(body, request.path)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _DROP_REQUEST}
        headers.update(route.auth())
        headers["Accept-Encoding"] = "identity"  # usage is read from the bytes as they pass
        url = route.upstream.rstrip("/") + "/" + request.match_info["tail"]
        if request.query_string:
            url += "?" + request.query_string
        async with self.session.request(
            request.method, url, headers=headers, data=body, allow_redirects=False
        ) as upstream:
            out = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            for name, value in upstream.headers.items():
                if name.lower() not in _DROP_RESPONSE:
                    out.headers.add(name, value)
            sse = upstream.headers.get("content-type", "").startswith("text/event-stream")
            reader = UsageReader(streaming=sse or streaming)
            await out.prepare(request)
            async for chunk in upstream.content.iter_any():
                reader.feed(chunk)
                await out.write(chunk)
        # Metered before the agent sees the response end: an agent that finishes on its last
        # answer ends the run, and the gateway with it, at once.
        usage = reader.close()
        if usage != (0, 0):
            name = reader.model or model or ""
            cost = self.meter.add(name, usage)
            self.emit(
                "usage",
                api=route.name,
                model=name,
                input_tokens=usage[0],
                output_tokens=usage[1],
                usd=round(cost, 6),
                totals=self.meter.totals(),
            )
            spent = self.meter.spent()
            if spent is not None:
                self.emit("budget_spent", spent=spent, totals=self.meter.totals())
        await out.write_eof()
        return out


def _inspect(body: bytes, path: str) -> tuple[str | None, bool, bytes]:
    """The request's model and whether it streams; Chat Completions streams are asked for usage.

    A streamed Chat Completion reports no usage unless `stream_options.include_usage` is set, and
    a call that cannot be metered cannot be budgeted: the gateway sets it when the client did not.
    """
    try:
        data = json.loads(body) if body else None
    except ValueError:
        return None, False, body
    if not isinstance(data, dict):
        return None, False, body
    model = data.get("model") if isinstance(data.get("model"), str) else None
    streaming = data.get("stream") is True
    if streaming and path.endswith("/chat/completions"):
        options = data.get("stream_options")
        if not isinstance(options, dict) or "include_usage" not in options:
            data["stream_options"] = {**(options or {}), "include_usage": True}
            body = json.dumps(data).encode()
    return model, streaming, body


def load(config: dict[str, Any]) -> Gateway:
    budget = config.get("budget") or {}
    meter = Meter(
        prices={
            str(k): (float(v[0]), float(v[1])) for k, v in (config.get("prices") or {}).items()
        },
        max_tokens=budget.get("tokens"),
        max_usd=budget.get("usd"),
    )
    routes = [Route(**r) for r in config["routes"]]
    return Gateway(int(config["run_id"]), str(config["token"]), routes, meter)


async def serve(gateway: Gateway, host: str, port: int) -> None:
    runner = web.AppRunner(gateway.app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    stop = asyncio.Event()

    def end() -> None:
        # The run is over: refuse its token from now on, let calls in flight finish, then exit.
        gateway.ended = True
        gateway.emit("ended", totals=gateway.meter.totals())
        stop.set()

    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, end)
    loop.add_signal_handler(signal.SIGINT, end)
    gateway.emit("ready", port=port, routes=sorted(gateway.routes))
    await stop.wait()
    await runner.cleanup()


def main() -> int:
    path = os.environ.get("TRIMO_GATEWAY_CONFIG", CONFIG_PATH)
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    os.unlink(path)  # the key now lives in this process alone
    # In its container the gateway listens on the run's network; elsewhere (a bench) it may be
    # told to keep to loopback.
    host = os.environ.get("TRIMO_GATEWAY_HOST", "0.0.0.0")
    asyncio.run(serve(load(config), host, int(config.get("port") or PORT)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
