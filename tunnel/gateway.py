"""The tunnel gateway: an asyncssh server in the hub's event loop that carries port forwards and nothing else.

A job logs in with user name = its tag and its one-time key (tunnel.credentials), then may open exactly:
  - one reverse forward, asked for as `hpchub:1` (REVERSE_PLACEHOLDER): the gateway binds the job's own
    hub-side endpoint, chosen from the credential, and sends the hub's connections there down the tunnel;
  - direct forwards to the hub API address (`hub_api`), so the server in the job can call the hub.
Everything else (shell, exec, sftp and other subsystems, pty, agent, X11, other forward targets, Unix
socket forwards, tun/tap) is refused and logged. `on_up`/`on_down` hear when a job's forward comes up and
when it goes (connection lost, forward cancelled, credential revoked), in order.
"""
from __future__ import annotations

import asyncio
import inspect
import logging
import os
import stat
from dataclasses import dataclass
from typing import Awaitable, Callable, Optional, Union

import asyncssh
# asyncssh's own forwarders (what its forward_local_port/path use), given our coroutine that opens the
# channel, so that the listener sits at the hub-chosen endpoint while channels name the job's request
from asyncssh.listener import create_tcp_forward_listener, create_unix_forward_listener

from . import REVERSE_PLACEHOLDER
from .credentials import CredentialRefused, CredentialStore, Endpoint

log = logging.getLogger(__name__)

# a callback may not hold up the events behind it longer than this
_CALLBACK_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class TunnelEvent:
    """A job's reverse forward came up (`up`) or went down; `endpoint` is where the hub reaches the server."""

    tag: str
    up: bool
    endpoint: Endpoint
    peer: str                                    # the job's address, "host:port"
    reason: str = ""                             # why it went down


EventCallback = Callable[[TunnelEvent], Optional[Awaitable[None]]]


def load_host_key(path: str) -> asyncssh.SSHPrivateKey:
    """The gateway's host key from `path`, generated there (mode 0600) the first time."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        info = os.stat(path)
        if info.st_uid != os.geteuid() or stat.S_IMODE(info.st_mode) & 0o077:
            raise ValueError(f"host key {path!r} must be this user's and mode 0600 "
                             f"(found {stat.S_IMODE(info.st_mode):o}, owner uid {info.st_uid})") from None
        return asyncssh.read_private_key(path)
    key = asyncssh.generate_private_key("ssh-ed25519", comment="hpchub-tunnel-gateway")
    with os.fdopen(fd, "wb") as f:
        f.write(key.export_private_key("openssh"))
    log.info("created the tunnel gateway's host key %s (%s)", path, key.get_fingerprint())
    return key


class Gateway:
    """The SSH server jobs open their tunnels to. Start it with `await start()` in the hub's loop.

    `hub_api` is the (host, port) jobs may reach through direct forwards, exactly as the job asks for it;
    None allows none. Keepalives every `keepalive_interval` s, `keepalive_count_max` unanswered ones
    drop a connection (and its route). `login_timeout` bounds a connection's time to authenticate."""

    def __init__(self, credentials: CredentialStore, *, host_key_path: str, host: str = "127.0.0.1",
                 port: int = 0, hub_api: tuple[str, int] | None = None, on_up: EventCallback | None = None,
                 on_down: EventCallback | None = None, keepalive_interval: float = 15.0,
                 keepalive_count_max: int = 3, login_timeout: float = 30.0) -> None:
        self.credentials = credentials
        self.host_key = load_host_key(host_key_path)
        self.host = host
        self.port = port
        self.hub_api = (hub_api[0].lower(), int(hub_api[1])) if hub_api else None
        self._callbacks = {True: on_up, False: on_down}
        self._options = dict(keepalive_interval=keepalive_interval, keepalive_count_max=keepalive_count_max,
                             login_timeout=login_timeout)
        self._server: asyncssh.SSHAcceptor | None = None
        self._events: asyncio.Queue[TunnelEvent] = asyncio.Queue()
        self._dispatcher: asyncio.Task | None = None
        self._connections: set[_JobConnection] = set()
        self._up: dict[str, Endpoint] = {}
        self._waiters: dict[str, list[asyncio.Future]] = {}

    async def start(self) -> None:
        """Listen on host:port (port 0: any free port, then in `self.port`)."""
        self._server = await asyncssh.create_server(
            lambda: _JobConnection(self), self.host, self.port, server_host_keys=[self.host_key],
            # forwards only: no agent, X11, scp; sessions are accepted only to refuse (and log) what they ask
            agent_forwarding=False, x11_forwarding=False, allow_scp=False, allow_pty=True,
            gss_host=None, compression_algs=["none"], **self._options)
        self.port = self._server.sockets[0].getsockname()[1]
        self._dispatcher = asyncio.ensure_future(self._deliver())
        log.info("tunnel gateway listening on %s:%d (host key %s)", self.host, self.port,
                 self.host_key.get_fingerprint())

    async def close(self) -> None:
        """Stop listening and drop every tunnel (their down-events are delivered first)."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        connections = list(self._connections)
        for job in connections:
            job.drop("the gateway is closing")
        if connections:
            await asyncio.wait([asyncio.ensure_future(job.closed.wait()) for job in connections], timeout=10)
        if self._dispatcher is not None:
            await asyncio.wait([asyncio.ensure_future(self._events.join())], timeout=_CALLBACK_TIMEOUT_S)
            self._dispatcher.cancel()
            self._dispatcher = None

    def known_hosts_line(self, *addresses: str) -> str:
        """A known_hosts line for this gateway at `addresses` (as jobs will dial them), for the job's file."""
        names = ",".join(a if self.port == 22 else f"[{a}]:{self.port}" for a in addresses or (self.host,))
        algorithm, data = self.host_key.export_public_key("openssh").decode().split()[:2]
        return f"{names} {algorithm} {data}\n"

    def revoke(self, tag: str) -> None:
        """The server stopped: its credential goes, and so does its tunnel if one is up."""
        holder = self.credentials.revoke(tag)
        if isinstance(holder, _JobConnection):
            holder.drop("credential revoked")

    def endpoint(self, tag: str) -> Endpoint | None:
        """Where job `tag`'s server is reachable now, or None while its tunnel is down."""
        return self._up.get(tag)

    async def wait_up(self, tag: str, timeout: float) -> Endpoint:
        """The endpoint of job `tag` once its forward is up; asyncio.TimeoutError after `timeout` s."""
        if tag in self._up:
            return self._up[tag]
        future = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(tag, []).append(future)
        try:
            return await asyncio.wait_for(future, timeout)
        finally:
            waiting = self._waiters.get(tag, [])
            if future in waiting:
                waiting.remove(future)
            if not waiting:
                self._waiters.pop(tag, None)

    def _changed(self, event: TunnelEvent) -> None:
        if event.up:
            self._up[event.tag] = event.endpoint
            for future in self._waiters.pop(event.tag, []):
                if not future.done():
                    future.set_result(event.endpoint)
        elif self._up.get(event.tag) == event.endpoint:
            del self._up[event.tag]
        self._events.put_nowait(event)

    async def _deliver(self) -> None:
        """Events reach the callbacks one at a time, in order: a route is never added after its removal."""
        while True:
            event = await self._events.get()
            callback = self._callbacks[event.up]
            try:
                if callback is not None:
                    result = callback(event)
                    if inspect.isawaitable(result):
                        await asyncio.wait_for(result, _CALLBACK_TIMEOUT_S)
            except Exception:  # a failing hook must not stop the events behind it
                log.exception("tunnel %s callback for job %s failed", "up" if event.up else "down", event.tag)
            finally:
                self._events.task_done()


class _JobConnection(asyncssh.SSHServer):
    """One SSH connection: authenticates one job, then allows its two kinds of forward."""

    def __init__(self, gateway: Gateway) -> None:
        self._gateway = gateway
        self._conn: asyncssh.SSHServerConnection | None = None
        self.peer = "?"
        self.tag = ""
        self._key: asyncssh.SSHKey | None = None
        self._endpoint: Endpoint | None = None       # set once authenticated and the credential claimed
        self._listener: _EndpointListener | None = None
        self._forwarding = False
        self._announcing: asyncio.Future | None = None
        self._announced = False
        self._lost = ""
        self.closed = asyncio.Event()

    # --- connection and authentication -------------------------------------------------------------
    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self._conn = conn
        peer = conn.get_extra_info("peername") or ("?", 0)
        self.peer = f"{peer[0]}:{peer[1]}"
        self._gateway._connections.add(self)

    def connection_lost(self, exc: Optional[Exception]) -> None:
        # asyncssh has closed the listener already (and _forward_closed deferred the event to read this)
        self._lost = f"connection lost: {exc or 'closed'}"
        if self._listener is not None:
            self._listener.close()
        if self._endpoint is not None:
            self._gateway.credentials.release(self.tag, self)
            log.info("job %s disconnected from %s: %s", self.tag, self.peer, exc or "closed")
        self._gateway._connections.discard(self)
        self.closed.set()

    def begin_auth(self, username: str) -> bool:
        self.tag = username
        return True

    def password_auth_supported(self) -> bool:
        return False

    def kbdint_auth_supported(self) -> bool:
        return False

    def host_based_auth_supported(self) -> bool:
        return False

    def public_key_auth_supported(self) -> bool:
        return True

    def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        # asyncssh verifies the signature after this (synchronously, so nothing runs in between): the key
        # last validated here is the one a successful login proved
        try:
            self._gateway.credentials.check(username, key)
        except CredentialRefused as e:
            log.warning("refused login from %s: %s", self.peer, e)
            return False
        self._key = key
        return True

    def auth_completed(self) -> None:
        try:
            self._endpoint = self._gateway.credentials.claim(self.tag, self._key, self)
        except CredentialRefused as e:   # a concurrent login with the same key claimed it first
            log.warning("refused login from %s: %s", self.peer, e)
            self.drop(str(e))
            return
        log.info("job %s connected from %s", self.tag, self.peer)

    def drop(self, reason: str) -> None:
        log.info("closing the tunnel connection of job %s from %s: %s", self.tag or "?", self.peer, reason)
        if self._conn is not None:
            self._conn.close()

    def refused(self, what: str) -> None:
        log.warning("refused job %s (from %s) %s", self.tag or "?", self.peer, what)

    # --- the reverse forward -------------------------------------------------------------------------
    def server_requested(self, listen_host: str, listen_port: int) -> Union[bool, Awaitable]:
        if self._endpoint is None:
            return False
        if (listen_host, listen_port) != REVERSE_PLACEHOLDER:
            self.refused(f"a reverse forward of {listen_host}:{listen_port}: the gateway binds the job's own "
                         f"endpoint, asked for as {REVERSE_PLACEHOLDER[0]}:{REVERSE_PLACEHOLDER[1]}")
            return False
        if self._forwarding:
            self.refused("a second reverse forward: one per connection")
            return False
        self._forwarding = True
        return self._bind(listen_host, listen_port)

    async def _bind(self, listen_host: str, listen_port: int) -> Union[bool, asyncssh.SSHListener]:
        conn, endpoint = self._conn, self._endpoint
        loop = asyncio.get_running_loop()

        async def open_channel(session_factory, orig_host: str = "", orig_port: int = 0):
            # the channel names the address the job asked for, which is how its SSH client finds the forward
            return await conn.create_connection(session_factory, listen_host, listen_port, orig_host, orig_port)

        try:
            if endpoint.path:
                _remove_socket(endpoint.path)
                inner = await create_unix_forward_listener(conn, loop, open_channel, endpoint.path)
                os.chmod(endpoint.path, 0o600)
                socket_id = _file_id(endpoint.path)
            else:
                inner = await create_tcp_forward_listener(conn, loop, open_channel, endpoint.host, 0)
                endpoint = Endpoint(host=endpoint.host, port=inner.get_port())
                socket_id = None
        except OSError as e:
            log.error("cannot bind the endpoint %s of job %s: %s", endpoint, self.tag, e)
            self._forwarding = False
            return False
        listener = _EndpointListener(inner, endpoint, socket_id, self._forward_closed)
        if self._lost:    # lost while binding: asyncssh's clean-up ran without this listener
            listener.close()
            return False
        self._listener = listener
        self._announcing = asyncio.ensure_future(self._announce_up(self._listener))
        return self._listener

    async def _announce_up(self, listener: _EndpointListener) -> None:
        # asyncssh has sent the forward's reply by now, but an asyncssh client registers the forward only
        # when its waiting task next runs: a channel opened at once could find no forward there. A round
        # trip first (a keepalive, which any client answers in order) means it has.
        try:
            await asyncio.wait_for(self._conn._make_global_request(b"keepalive@openssh.com"), 10)
        except asyncio.TimeoutError:
            pass                     # keepalives will drop a connection this unresponsive
        if self._listener is not listener:
            return                   # closed meanwhile: there was never an up to take back
        self._announced = True
        log.info("job %s is up: its server is reachable at %s", self.tag, listener.endpoint)
        self._gateway._changed(TunnelEvent(self.tag, True, listener.endpoint, self.peer))

    def _forward_closed(self, endpoint: Endpoint) -> None:
        # asyncssh closes listeners before it calls connection_lost: wait a turn to learn which it was
        asyncio.get_running_loop().call_soon(self._report_down, endpoint)

    def _report_down(self, endpoint: Endpoint) -> None:
        self._listener = None
        self._forwarding = False
        if not self._announced:
            return
        self._announced = False
        reason = self._lost or "forward cancelled"
        log.info("job %s is down (%s): %s", self.tag, endpoint, reason)
        self._gateway._changed(TunnelEvent(self.tag, False, endpoint, self.peer, reason))

    # --- direct forwards: the hub API only -----------------------------------------------------------
    def connection_requested(self, dest_host: str, dest_port: int, orig_host: str, orig_port: int) -> bool:
        if self._endpoint is None:
            return False
        if self._gateway.hub_api is not None and (dest_host.lower(), dest_port) == self._gateway.hub_api:
            return True
        self.refused(f"a connection to {dest_host}:{dest_port}: jobs may connect only to the hub API"
                     + (" at %s:%d" % self._gateway.hub_api if self._gateway.hub_api else " (none configured)"))
        raise asyncssh.ChannelOpenError(asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED,
                                        "only the hub API may be reached through this gateway")

    # --- everything else: refused and logged ---------------------------------------------------------
    def session_requested(self) -> Union[bool, asyncssh.SSHServerSession]:
        if self._endpoint is None:
            return False
        return _RefusingSession(self)

    def unix_connection_requested(self, dest_path: str) -> bool:
        self.refused(f"a connection to the Unix socket {dest_path!r}")
        return False

    def unix_server_requested(self, listen_path: str) -> bool:
        self.refused(f"a reverse forward of the Unix socket {listen_path!r}")
        return False

    def tun_requested(self, unit: Optional[int]) -> bool:
        self.refused("a tun device")
        return False

    def tap_requested(self, unit: Optional[int]) -> bool:
        self.refused("a tap device")
        return False


class _RefusingSession(asyncssh.SSHServerSession):
    """A session channel, accepted only to log what it asks for by name; every request is refused and the
    channel closed. (Agent and X11 requests are refused by asyncssh itself, which logs them.)"""

    def __init__(self, job: _JobConnection) -> None:
        self._job = job
        self._chan: asyncssh.SSHServerChannel | None = None

    def connection_made(self, chan: asyncssh.SSHServerChannel) -> None:
        self._chan = chan

    def _refuse(self, what: str) -> bool:
        self._job.refused(f"{what}: this gateway carries port forwards only")
        if self._chan is not None:
            asyncio.get_running_loop().call_soon(self._chan.close)
        return False

    def pty_requested(self, term_type: str, term_size: tuple, term_modes: dict) -> bool:
        return self._refuse("a terminal (pty)")

    def shell_requested(self) -> bool:
        return self._refuse("a shell")

    def exec_requested(self, command: str) -> bool:
        return self._refuse(f"the command {command[:200]!r}")

    def subsystem_requested(self, subsystem: str) -> bool:
        return self._refuse(f"the subsystem {subsystem[:50]!r}")


class _EndpointListener(asyncssh.SSHListener):
    """The job's endpoint while its forward is up; closing it (asyncssh does when the connection goes or the
    forward is cancelled) removes a socket file and reports the forward down, once."""

    def __init__(self, inner: asyncssh.SSHListener, endpoint: Endpoint, socket_id: tuple[int, int] | None,
                 on_close: Callable[[Endpoint], None]) -> None:
        super().__init__()
        self._inner: asyncssh.SSHListener | None = inner
        self.endpoint = endpoint
        self._socket_id = socket_id
        self._on_close = on_close

    def get_port(self) -> int:
        return self.endpoint.port

    def close(self) -> None:
        if self._inner is None:
            return
        inner, self._inner = self._inner, None
        inner.close()
        if self.endpoint.path:
            _remove_socket(self.endpoint.path, self._socket_id)
        self._on_close(self.endpoint)

    async def wait_closed(self) -> None:
        pass


def _file_id(path: str) -> tuple[int, int]:
    info = os.lstat(path)
    return info.st_dev, info.st_ino


def _remove_socket(path: str, only: tuple[int, int] | None = None) -> None:
    """Remove the socket at `path`; with `only`, just when it is still that file (not a newer listener's)."""
    try:
        info = os.lstat(path)
        if stat.S_ISSOCK(info.st_mode) and only in (None, (info.st_dev, info.st_ino)):
            os.unlink(path)
    except FileNotFoundError:
        pass
