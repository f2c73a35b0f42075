"""The model gateway beside a run: its image, its container on the run's network, its events.

One gateway per run, in a container of its own (so it works on a remote engine as on a local
one): it holds the provider keys the run was granted and a fresh per-run token; the run's
container gets the token and the gateway's address only. The gateway joins the run's network
under the name `model-gateway`, and Trimo's egress network (as the run's proxy does) to reach the
provider. It is labelled with the run, so the reaper takes it with the run's other containers.
When the run ends the gateway is told (SIGTERM: from then on it refuses the token), then removed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import secrets
import shutil
import tempfile
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bot import images
from bot.cacerts import read_certificates
from bot.errors import TrimoError
from bot.gateway.policy import Provider
from bot.gateway.proxy import CONFIG_PATH, EVENT_PREFIX, PORT
from bot.runtime import ROLE_GATEWAY, ContainerSpec, DockerRuntime, ProxySpec, files_tar

log = logging.getLogger(__name__)

GATEWAY_ALIAS = "model-gateway"
GATEWAY_IMAGE = "trimo/gateway:bookworm"
GATEWAY_UID = 999
READY_SECONDS = 30
GATEWAY_MEMORY_BYTES = 256 * 1024**2
GATEWAY_PIDS = 256
NOT_READY = "the model gateway did not start within {seconds}s: {tail}"


@dataclass(frozen=True)
class GatewaySpec:
    run: ContainerSpec  # the run's container: its labels and name, its network
    providers: list[Provider]
    keys: Mapping[str, str]  # secret name → value
    budget_tokens: int | None = None
    budget_usd: float | None = None
    prices: Mapping[str, tuple[float, float]] = field(default_factory=dict)


def gateway_image(
    runtime: DockerRuntime,
    progress: Callable[[str], None] | None = None,
    extra_ca_certs: Path | None = None,
) -> str:
    """trimo/gateway:bookworm, built from images/gateway plus bot/gateway/proxy.py, or reused.

    The server's extra CA certificates join its bundle too: a proxy that intercepts TLS stands
    between the gateway and the provider as it does between a container and a registry.
    """
    images.bootstrap_debian(runtime.client, progress)
    with tempfile.TemporaryDirectory(prefix="trimo-gateway-") as tmp:
        context = Path(tmp)
        shutil.copy(images.images_dir() / "gateway" / "Dockerfile", context / "Dockerfile")
        shutil.copy(Path(__file__).with_name("proxy.py"), context / "proxy.py")
        (context / "extra-ca").mkdir()
        if extra_ca_certs is not None:
            try:
                certificates = read_certificates(extra_ca_certs)
            except ValueError as exc:
                raise TrimoError(str(exc)) from None
            for n, pem in enumerate(certificates):
                (context / "extra-ca" / f"extra-{n:03d}.crt").write_text(pem, encoding="ascii")
        else:
            (context / "extra-ca" / "none").write_text("")
        result = images.build_image(
            runtime.client, context, tag=GATEWAY_IMAGE, progress=progress, name="gateway"
        )
    return result.tag


class Gateway:
    """A started gateway: its address for the run, its token, and its events as they come."""

    def __init__(
        self,
        runtime: DockerRuntime,
        container_id: str,
        token: str,
        on_event: Callable[[dict[str, Any]], None],
    ) -> None:
        self.runtime = runtime
        self.container_id = container_id
        self.token = token
        self.on_event = on_event
        self.ready = threading.Event()
        self.answered = False
        self.tail: list[str] = []
        self.thread = threading.Thread(target=self._follow, name="gateway-events", daemon=True)

    def base_url(self, provider: str) -> str:
        return f"http://{GATEWAY_ALIAS}:{PORT}/{provider}"

    def _follow(self) -> None:
        try:
            for line in self.runtime.lines(self.container_id):
                if not line.startswith(EVENT_PREFIX):
                    self.tail = [*self.tail[-20:], line]
                    continue
                try:
                    event = json.loads(line[len(EVENT_PREFIX) :])
                except ValueError:
                    continue
                if event.get("event") == "ready":
                    self.answered = True
                    self.ready.set()
                with contextlib.suppress(Exception):
                    self.on_event(event)
        except Exception as exc:  # noqa: BLE001 - the stream ends when the container goes
            log.debug("gateway event stream ended: %s", exc)
        finally:
            self.ready.set()

    def close(self, grace_seconds: int = 5) -> None:
        """End the run's token (the gateway refuses it from now on), then remove the gateway."""
        self.runtime.stop(self.container_id, grace_seconds)
        self.thread.join(timeout=grace_seconds + 5)
        self.runtime.remove(self.container_id)


def start_gateway(
    runtime: DockerRuntime,
    spec: GatewaySpec,
    on_event: Callable[[dict[str, Any]], None],
    progress: Callable[[str], None] | None = None,
    extra_ca_certs: Path | None = None,
) -> Gateway:
    """Start the run's gateway on the run's network (as `model-gateway`); returns once it
    answers. The network must exist (a RunNetwork that is ready, or `run_network`)."""
    image = gateway_image(runtime, progress, extra_ca_certs)
    token = "trimo-run-" + secrets.token_urlsafe(32)
    routes = []
    for provider in spec.providers:
        key = spec.keys.get(provider.secret)
        if key is None:
            continue
        routes.append(
            {
                "name": provider.name,
                "upstream": provider.base_url,
                "header": provider.header,
                "key": key,
            }
        )
    config = {
        "run_id": spec.run.run_id,
        "token": token,
        "port": PORT,
        "routes": routes,
        "budget": {"tokens": spec.budget_tokens, "usd": spec.budget_usd},
        "prices": {name: list(price) for name, price in spec.prices.items()},
    }
    cid = runtime.create_sidecar(
        ProxySpec(
            image=image,
            run=spec.run,
            run_network=spec.run.network,
            alias=GATEWAY_ALIAS,
            role=ROLE_GATEWAY,
            user=str(GATEWAY_UID),
            read_only=False,
            memory_bytes=GATEWAY_MEMORY_BYTES,
            pids=GATEWAY_PIDS,
        )
    )
    gateway = Gateway(runtime, cid, token, on_event)
    try:
        # The key goes in as a file only this container has; the gateway deletes it once read.
        runtime.put_archive(
            cid,
            "/",
            files_tar({CONFIG_PATH.lstrip("/"): json.dumps(config)}, uid=GATEWAY_UID, mode=0o600),
        )
        runtime.start(cid)
        gateway.thread.start()
        gateway.ready.wait(READY_SECONDS)
        if not gateway.answered:
            raise TrimoError(NOT_READY.format(seconds=READY_SECONDS, tail=" | ".join(gateway.tail)))
    except BaseException:
        runtime.remove(cid)
        raise
    return gateway
