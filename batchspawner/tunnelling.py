"""The hub's tunnel gateway, shared by every spawner in `reverse` mode, and the proxy routes it keeps.

One gateway per listening address runs in the hub's event loop (started by the first spawner that needs
it). Its up/down events go to the spawner of the job they concern, which adds or removes its route.

Hub-side endpoints are loopback ports, bound by the gateway when a job's forward comes up: JupyterHub
keeps a user server's address as proto/ip/port, which cannot name a Unix socket.
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Protocol

from tunnel.credentials import CredentialStore
from tunnel.gateway import Gateway, TunnelEvent

log = logging.getLogger(__name__)


class TunnelListener(Protocol):
    async def tunnel_up(self, event: TunnelEvent) -> None: ...

    async def tunnel_down(self, event: TunnelEvent) -> None: ...


@dataclass(frozen=True)
class GatewaySettings:
    """Where the gateway listens, its host key file, and the hub API address jobs may forward to."""

    ip: str
    port: int
    host_key_file: str
    hub_api: tuple[str, int]
    keepalive_interval: float = 15.0
    keepalive_count_max: int = 3


class HubGateway:
    """A started gateway, its credentials, and the spawners waiting for their jobs' events."""

    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        # no first-use window by default here: each spawner issues with its queue timeout
        self.credentials = CredentialStore(None)
        self.gateway = Gateway(
            self.credentials, host_key_path=settings.host_key_file, host=settings.ip, port=settings.port,
            hub_api=settings.hub_api, on_up=self._up, on_down=self._down,
            keepalive_interval=settings.keepalive_interval, keepalive_count_max=settings.keepalive_count_max)
        self._listeners: dict[str, TunnelListener] = {}

    def attach(self, tag: str, listener: TunnelListener) -> None:
        """Send job `tag`'s events to `listener` (its server's spawner)."""
        self._listeners[tag] = listener

    def detach(self, tag: str) -> None:
        """The server stopped: its credential is revoked (closing the tunnel) and its events go nowhere."""
        self._listeners.pop(tag, None)
        self.gateway.revoke(tag)

    async def _up(self, event: TunnelEvent) -> None:
        listener = self._listeners.get(event.tag)
        if listener is not None:
            await listener.tunnel_up(event)

    async def _down(self, event: TunnelEvent) -> None:
        listener = self._listeners.get(event.tag)
        if listener is not None:
            await listener.tunnel_down(event)


_gateways: dict[tuple[str, int], HubGateway] = {}
_starting: dict[tuple[str, int], asyncio.Future] = {}


async def shared_gateway(settings: GatewaySettings, hub_log: logging.Logger | None = None) -> HubGateway:
    """The hub's gateway listening at settings.ip:port, started on first use (concurrent callers wait for
    the same start). A different host key or hub API for the same address is a configuration error.
    The gateway logs (logins, refusals, tunnels up and down) go to `hub_log`'s handlers."""
    key = (settings.ip, settings.port)
    if hub_log is not None:
        _log_to(hub_log)
    if key in _gateways:
        return _same(_gateways[key], settings)
    if key in _starting:
        return _same(await asyncio.shield(_starting[key]), settings)
    future = asyncio.get_running_loop().create_future()
    _starting[key] = future
    try:
        hub_gateway = HubGateway(settings)
        await hub_gateway.gateway.start()
    except BaseException as err:
        future.set_exception(err)
        future.exception()          # retrieved: waiters get it too, and nothing is logged as unhandled
        raise
    finally:
        del _starting[key]
    _gateways[key] = hub_gateway
    future.set_result(hub_gateway)
    return hub_gateway


def _log_to(hub_log: logging.Logger) -> None:
    tunnel_log = logging.getLogger("tunnel")
    handlers = [h for logger in (hub_log, hub_log.parent) if logger is not None for h in logger.handlers]
    if handlers and not tunnel_log.handlers:
        for handler in handlers[:1]:
            tunnel_log.addHandler(handler)
        tunnel_log.setLevel(min(hub_log.getEffectiveLevel(), logging.INFO))
        tunnel_log.propagate = False


def _same(hub_gateway: HubGateway, settings: GatewaySettings) -> HubGateway:
    if hub_gateway.settings != settings:
        raise ValueError(f"the tunnel gateway on {settings.ip}:{settings.port} is already running with other "
                         f"settings ({hub_gateway.settings}); spawners sharing an address must agree")
    return hub_gateway

