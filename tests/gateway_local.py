"""The model gateway's own code served on a loopback socket from a thread, for tests and benches.

The same aiohttp application the gateway container runs; only the process around it differs.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from aiohttp import web

from bot.gateway.proxy import Gateway, Meter, Route


class LocalGateway:
    """`with LocalGateway(upstream, key) as gw:` serves at `gw.url`; `gw.events` is what it said."""

    def __init__(
        self,
        upstream: str,
        key: str,
        token: str = "trimo-run-test-token",  # noqa: S107 - a test token, not a secret
        run_id: int = 1,
        max_tokens: int | None = None,
        max_usd: float | None = None,
        prices: dict[str, tuple[float, float]] | None = None,
    ) -> None:
        self.events: list[dict[str, Any]] = []
        self.token = token
        routes = [
            Route("anthropic", upstream, "x-api-key", key),
            Route("openai", upstream + "/v1", "authorization", key),
        ]
        meter = Meter(prices=prices or {}, max_tokens=max_tokens, max_usd=max_usd)
        self.gateway = Gateway(run_id, token, routes, meter, emit=self._emit)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.runner: web.AppRunner | None = None
        self.url = ""

    def _emit(self, kind: str, **data: Any) -> None:
        self.events.append({"event": kind, **data})

    def __enter__(self) -> LocalGateway:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(timeout=10)
        return self

    async def _start(self) -> None:
        self.runner = web.AppRunner(self.gateway.app(), access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert server is not None
        port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"

    def end(self) -> None:
        """What SIGTERM does in the container: the run is over, its token no longer valid."""
        self.gateway.ended = True

    def __exit__(self, *exc: object) -> None:
        if self.runner is not None:
            asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)
        self.loop.close()
