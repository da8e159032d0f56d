"""The tunnel gateway (in this process, in the test's event loop) with real job-side clients: `python -m
tunnel.client` as subprocesses over asyncssh and over OpenSSH's ssh, and asyncssh connections made here
to try what a job must not be able to do."""
from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import asyncssh
import pytest
import pytest_asyncio

from conftest import require_service
from tunnel import REVERSE_PLACEHOLDER
from tunnel.client import Options, openssh_argv, terminate
from tunnel.credentials import CredentialStore, Endpoint, IssuedCredential
from tunnel.gateway import Gateway, TunnelEvent, load_host_key

BODY = b"hello from the node"
GATEWAY_LOG = "tunnel.gateway"


# --- the pieces: a "node" HTTP server, the gateway, keys and clients -----------------------------------
async def http_server(host: str = "127.0.0.1", path: str | None = None, body: bytes = BODY) -> asyncio.AbstractServer:
    """A minimal HTTP/1.0 server answering every request with `body`, on host:0 or at a Unix socket path."""
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            await writer.drain()
        finally:
            writer.close()
    if path:
        return await asyncio.start_unix_server(handle, path)
    return await asyncio.start_server(handle, host, 0)


def port_of(server: asyncio.AbstractServer) -> int:
    return server.sockets[0].getsockname()[1]


async def http_get(endpoint: Endpoint | tuple[str, int], timeout: float = 5.0) -> bytes:
    """The body of GET / at a Unix socket endpoint or a TCP address."""
    async def get() -> bytes:
        if isinstance(endpoint, Endpoint) and endpoint.path:
            reader, writer = await asyncio.open_unix_connection(endpoint.path)
        else:
            host, port = (endpoint.host, endpoint.port) if isinstance(endpoint, Endpoint) else endpoint
            reader, writer = await asyncio.open_connection(host, port)
        writer.write(b"GET / HTTP/1.0\r\nHost: node\r\n\r\n")
        data = await reader.read()
        writer.close()
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.0 200"), data
        return body
    return await asyncio.wait_for(get(), timeout)


class Events:
    """The gateway's up/down events, to wait on."""

    def __init__(self) -> None:
        self.seen: list[TunnelEvent] = []
        self.changed = asyncio.Event()

    def __call__(self, event: TunnelEvent) -> None:
        self.seen.append(event)
        self.changed.set()

    async def wait(self, up: bool, tag: str, count: int = 1, timeout: float = 10.0) -> TunnelEvent:
        """The `count`-th event of this kind for `tag`, waiting up to `timeout` s for it."""
        deadline = time.monotonic() + timeout
        while True:
            matching = [e for e in self.seen if e.up == up and e.tag == tag]
            if len(matching) >= count:
                return matching[count - 1]
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"no {'up' if up else 'down'} event #{count} for {tag} in {timeout} s: {self.seen}"
            self.changed.clear()
            try:
                await asyncio.wait_for(self.changed.wait(), remaining)
            except asyncio.TimeoutError:
                pass


class Setup:
    """One gateway (Unix socket endpoints unless told otherwise), its events and a scratch directory."""

    def __init__(self, root: Path, store: CredentialStore, gateway: Gateway, events: Events, hub_api: asyncio.AbstractServer):
        self.root, self.store, self.gateway, self.events, self.hub_api = root, store, gateway, events, hub_api
        self.known_hosts = root / "known_hosts"
        self.known_hosts.write_text(gateway.known_hosts_line("127.0.0.1"))
        self.procs: list[asyncio.subprocess.Process] = []

    def issue(self, tag: str, **kw) -> tuple[IssuedCredential, Path]:
        """A credential for `tag` and its private key written as the spawner does (a 0600 file)."""
        cred = self.store.issue(tag, **kw)
        return cred, write_key(self.root / f"{tag}.key", cred.private_key)

    def connect(self, tag: str, key_text: str, **kw):
        """An asyncssh connection made here, as a job (or an impostor) would."""
        return asyncssh.connect("127.0.0.1", self.gateway.port, username=tag, known_hosts=str(self.known_hosts),
                                client_keys=[asyncssh.import_private_key(key_text)], agent_path=None, config=[],
                                connect_timeout=5, **kw)

    async def client(self, tag: str, key: Path, local: str, *extra: str, ssh: str = "asyncssh",
                     python: str = sys.executable, env: dict | None = None) -> asyncio.subprocess.Process:
        """`python -m tunnel.client` for job `tag`, its output in <root>/<tag>.client.log."""
        if ssh != "asyncssh":
            need_openssh()
        argv = [python, "-m", "tunnel.client", "--gateway", f"127.0.0.1:{self.gateway.port}", "--user", tag,
                "--key", str(key), "--known-hosts", str(self.known_hosts), "--local", local, "--ssh", ssh,
                "--keepalive", "1", "--backoff-max", "1", "--connect-timeout", "20", *extra]
        with open(self.root / f"{tag}.client.log", "ab") as out:
            proc = await asyncio.create_subprocess_exec(*argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                                        env=env, cwd="/")
        self.procs.append(proc)
        return proc

    def client_log(self, tag: str) -> str:
        path = self.root / f"{tag}.client.log"
        return path.read_text() if path.exists() else ""


def need_openssh() -> None:
    require_service("OpenSSH's ssh", shutil.which("ssh") is not None,
                    "install openssh-client (docker/sshd/sshd.sh start does)")


def write_key(path: Path, text: str) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return path


async def eventually(check, timeout: float, what: str) -> None:
    """Poll `check` (without blocking the loop the gateway runs in) until true; fail after `timeout` s."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        await asyncio.sleep(0.05)


async def exit_status(proc: asyncio.subprocess.Process, timeout: float) -> int:
    return await asyncio.wait_for(proc.wait(), timeout)


@pytest_asyncio.fixture
async def make_setup():
    """make_setup(socket_endpoints=True, **store options) -> Setup; everything is stopped afterwards."""
    made: list[Setup] = []
    roots: list[str] = []

    async def make(socket_endpoints: bool = True, **store_kw) -> Setup:
        root = Path(tempfile.mkdtemp(prefix="hpchub-tunnel-test-"))
        roots.append(str(root))
        hub_api = await http_server(body=b"hub api")
        store = CredentialStore(str(root / "sockets") if socket_endpoints else None, **store_kw)
        events = Events()
        gateway = Gateway(store, host_key_path=str(root / "host_key"), hub_api=("127.0.0.1", port_of(hub_api)),
                          on_up=events, on_down=events, keepalive_interval=1, keepalive_count_max=3)
        await gateway.start()
        setup = Setup(root, store, gateway, events, hub_api)
        made.append(setup)
        return setup

    yield make
    for setup in made:
        for proc in setup.procs:
            await terminate(proc)
        await setup.gateway.close()
        setup.hub_api.close()
    for root in roots:
        shutil.rmtree(root, ignore_errors=True)


def refusals(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == GATEWAY_LOG and r.levelno >= logging.WARNING]


# --- forwards that work --------------------------------------------------------------------------------
@pytest.mark.parametrize("ssh", ["asyncssh", "openssh"])
@pytest.mark.asyncio
async def test_forward_end_to_end(make_setup, ssh):
    """The node's server answers at the hub-side Unix socket; the route goes when the client does."""
    s = await make_setup()
    node = await http_server()
    cred, key = s.issue("job1")
    proc = await s.client("job1", key, f"127.0.0.1:{port_of(node)}", ssh=ssh)
    up = await s.events.wait(True, "job1")
    assert up.endpoint == cred.endpoint == Endpoint(path=str(s.root / "sockets" / "job1.sock"))
    assert await http_get(up.endpoint) == BODY
    assert up.endpoint.url == "http+unix://" + str(s.root / "sockets" / "job1.sock").replace("/", "%2F")
    # only the hub's user can reach the socket
    assert stat.S_IMODE(os.stat(s.root / "sockets").st_mode) == 0o700
    assert stat.S_IMODE(os.stat(up.endpoint.path).st_mode) == 0o600
    assert await s.gateway.wait_up("job1", 1) == up.endpoint
    with pytest.raises(ValueError, match="revoke its credential"):
        s.store.issue("job1")
    await terminate(proc)
    assert proc.returncode == 128 + signal.SIGTERM
    # the client took its connection (and, with OpenSSH, its ssh process) down with it
    down = await s.events.wait(False, "job1")
    assert down.endpoint == up.endpoint and down.reason.startswith("connection lost")
    assert not os.path.exists(up.endpoint.path) and s.gateway.endpoint("job1") is None


@pytest.mark.parametrize("ssh", ["asyncssh", "openssh"])
@pytest.mark.asyncio
async def test_hub_api_through_the_tunnel(make_setup, ssh):
    """--hub-api-local on the node reaches exactly the hub API address the gateway allows."""
    s = await make_setup()
    node = await http_server()
    _, key = s.issue("job1")
    api_port = free_port()
    await s.client("job1", key, f"127.0.0.1:{port_of(node)}", "--hub-api-local", f"127.0.0.1:{api_port}",
                   "--hub-api-remote", f"127.0.0.1:{port_of(s.hub_api)}", ssh=ssh)
    await s.events.wait(True, "job1")
    assert await http_get(("127.0.0.1", api_port)) == b"hub api"


@pytest.mark.asyncio
async def test_node_side_unix_socket_and_tcp_endpoint(make_setup):
    """The node's server on a Unix socket (no other user of the node can take it over), and a gateway
    with loopback TCP endpoints, whose port is picked at bind time and carried by the up-event."""
    s = await make_setup(socket_endpoints=False)
    node_dir = s.root / "node"
    node_dir.mkdir(mode=0o700)
    node = await http_server(path=str(node_dir / "jupyter.sock"))
    cred, key = s.issue("job1")
    assert cred.endpoint == Endpoint(host="127.0.0.1", port=0)
    await s.client("job1", key, str(node_dir / "jupyter.sock"), ssh="openssh")
    up = await s.events.wait(True, "job1")
    assert up.endpoint.port > 0 and up.endpoint.url == f"http://127.0.0.1:{up.endpoint.port}"
    assert await http_get(up.endpoint) == BODY
    node.close()


@pytest.mark.asyncio
async def test_openssh_fallback_without_asyncssh(make_setup):
    """Where asyncssh cannot be imported (Debian's python3 here, given only the tunnel package), `--ssh auto`
    runs OpenSSH's ssh."""
    s = await make_setup()
    node = await http_server()
    _, key = s.issue("job1")
    import tunnel
    only_tunnel = s.root / "pythonpath"
    only_tunnel.mkdir()
    (only_tunnel / "tunnel").symlink_to(Path(tunnel.__file__).parent)
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(only_tunnel)}
    await s.client("job1", key, f"127.0.0.1:{port_of(node)}", ssh="auto", python="/usr/bin/python3", env=env)
    await s.events.wait(True, "job1")
    assert await http_get(s.gateway.endpoint("job1")) == BODY
    await eventually(lambda: "tunnel up (OpensshTunnel)" in s.client_log("job1"), 5, "the client's log line")


@pytest.mark.asyncio
async def test_command_runs_once_the_tunnel_is_up(make_setup):
    """With `-- COMMAND`, COMMAND starts after the tunnel is up, learns the local addresses from its
    environment, and its exit status is the client's; the tunnel goes down with it."""
    s = await make_setup()
    node = await http_server()
    _, key = s.issue("job1")
    seen = s.root / "seen"
    script = ("import os, sys; open(sys.argv[1], 'w').write(os.environ['HPCHUB_TUNNEL_LOCAL'] + ' ' + "
              "os.environ['HPCHUB_HUB_API_LOCAL']); sys.exit(7)")
    api_port = free_port()
    proc = await s.client("job1", key, f"127.0.0.1:{port_of(node)}", "--hub-api-local", f"127.0.0.1:{api_port}",
                          "--hub-api-remote", f"127.0.0.1:{port_of(s.hub_api)}", "--", sys.executable, "-c",
                          script, str(seen))
    assert await exit_status(proc, 20) == 7
    assert seen.read_text() == f"127.0.0.1:{port_of(node)} 127.0.0.1:{api_port}"
    assert (await s.events.wait(False, "job1")).reason.startswith("connection lost")


@pytest.mark.parametrize("ssh", ["asyncssh", "openssh"])
@pytest.mark.asyncio
async def test_job_mode_key_from_the_environment_private_socket_and_free_api_port(make_setup, ssh):
    """As the spawner runs it: key and host key from environment variables (gone from COMMAND's
    environment), the server's socket in a private directory, a free port for the hub API; the private
    directory is removed at exit."""
    if ssh == "openssh":
        need_openssh()
    s = await make_setup()
    cred = s.store.issue("job1")
    seen = s.root / "seen.json"
    script = ("import json, os, stat, sys, urllib.request\n"
              "local = os.environ['HPCHUB_TUNNEL_LOCAL']; api = os.environ['HPCHUB_HUB_API_LOCAL']\n"
              "body = urllib.request.urlopen('http://' + api + '/', timeout=5).read().decode()\n"
              "json.dump({'local': local, 'api': api, 'body': body, 'dir_mode': stat.S_IMODE(os.stat(os.path.dirname(local)).st_mode),"
              " 'leaked': [k for k in os.environ if k.startswith('TEST_TUNNEL_')]}, open(sys.argv[1], 'w'))\n")
    argv = [sys.executable, "-m", "tunnel.client", "--gateway", f"127.0.0.1:{s.gateway.port}", "--user", "job1",
            "--key-env", "TEST_TUNNEL_KEY", "--known-hosts-env", "TEST_TUNNEL_KNOWN_HOSTS", "--local", "auto",
            "--hub-api-local", "127.0.0.1:0", "--hub-api-remote", f"127.0.0.1:{port_of(s.hub_api)}",
            "--ssh", ssh, "--connect-timeout", "20", "--", sys.executable, "-c", script, str(seen)]
    env = dict(os.environ, TEST_TUNNEL_KEY=cred.private_key, TEST_TUNNEL_KNOWN_HOSTS=s.known_hosts.read_text())
    with open(s.root / "client.log", "ab") as out:
        proc = await asyncio.create_subprocess_exec(*argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                                    env=env, cwd="/")
    s.procs.append(proc)
    assert await exit_status(proc, 30) == 0, (s.root / "client.log").read_text()
    result = json.loads(seen.read_text())
    assert result["body"] == "hub api" and not result["api"].endswith(":0"), result
    assert result["local"].endswith("/server.sock") and result["dir_mode"] == 0o700, result
    assert result["leaked"] == [], "the key reached the command's environment"
    assert not os.path.exists(os.path.dirname(result["local"])), "the private directory outlived the client"
    up = await s.events.wait(True, "job1")
    assert up.endpoint == cred.endpoint


# --- reconnects ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("ssh", ["asyncssh", "openssh"])
@pytest.mark.asyncio
async def test_reconnects_after_the_connection_is_killed(make_setup, ssh):
    """The tunnel's TCP connection destroyed under the client (`ss -K`, which also resets the gateway's
    end): down-event, reconnect and up-event again within 5 s, and the endpoint serves again."""
    s = await make_setup()
    node = await http_server()
    _, key = s.issue("job1")
    await s.client("job1", key, f"127.0.0.1:{port_of(node)}", ssh=ssh)
    first = await s.events.wait(True, "job1")
    assert await http_get(first.endpoint) == BODY
    killed_at = time.monotonic()
    kill = await asyncio.create_subprocess_exec(
        "ss", "-K", "-t", "-n", "src", first.peer, "dst", f"127.0.0.1:{s.gateway.port}",
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert await exit_status(kill, 10) == 0
    down = await s.events.wait(False, "job1", timeout=5)
    assert "connection lost" in down.reason
    again = await s.events.wait(True, "job1", count=2, timeout=5)
    assert time.monotonic() - killed_at < 5
    assert again.peer != first.peer and again.endpoint == first.endpoint
    assert await http_get(again.endpoint) == BODY


@pytest.mark.asyncio
async def test_client_exits_when_no_tunnel_comes_up(make_setup):
    """Nothing listening at the gateway address: the client gives up after --connect-timeout with status 1,
    so the job ends instead of holding its node."""
    s = await make_setup()
    _, key = s.issue("job1")
    started = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tunnel.client", "--gateway", f"127.0.0.1:{free_port()}", "--user", "job1", "--key",
        str(key), "--known-hosts", str(s.known_hosts), "--local", "127.0.0.1:9", "--connect-timeout", "2",
        stdout=subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE, cwd="/")
    _, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 1
    assert "giving up: no tunnel within --connect-timeout 2 s" in err.decode()
    assert time.monotonic() - started < 15


@pytest.mark.parametrize("ssh", ["asyncssh", "openssh"])
@pytest.mark.asyncio
async def test_client_gives_up_when_the_forward_is_refused(make_setup, ssh, caplog):
    """The gateway cannot bind the job's endpoint (something else sits at its path): the forward is refused,
    the client retries until --connect-timeout and exits 1."""
    s = await make_setup()
    cred, key = s.issue("job1")
    os.mkdir(cred.endpoint.path)
    proc = await s.client("job1", key, "127.0.0.1:9", "--connect-timeout", "2", ssh=ssh)
    assert await exit_status(proc, 20) == 1
    assert "giving up: no tunnel within --connect-timeout 2 s" in s.client_log("job1")
    assert any(r.getMessage().startswith("cannot bind the endpoint") for r in caplog.records if r.name == GATEWAY_LOG)
    assert not s.events.seen


@pytest.mark.parametrize("ssh", ["asyncssh", "openssh"])
@pytest.mark.asyncio
async def test_wrong_gateway_host_key_is_fatal(make_setup, ssh, caplog):
    """A known_hosts file naming another key: the client never logs in and exits 1 at once."""
    s = await make_setup()
    _, key = s.issue("job1")
    other = asyncssh.generate_private_key("ssh-ed25519").export_public_key("openssh").decode().split()
    s.known_hosts.write_text(f"[127.0.0.1]:{s.gateway.port} {other[0]} {other[1]}\n")
    started = time.monotonic()
    proc = await s.client("job1", key, "127.0.0.1:9", ssh=ssh)
    assert await exit_status(proc, 15) == 1
    assert time.monotonic() - started < 10
    assert "giving up: the gateway's host key does not match" in s.client_log("job1")
    assert not any("job job1 connected" in r.getMessage() for r in caplog.records)


@pytest.mark.asyncio
async def test_client_refuses_a_key_others_can_read(make_setup):
    s = await make_setup()
    _, key = s.issue("job1")
    key.chmod(0o644)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tunnel.client", "--gateway", f"127.0.0.1:{s.gateway.port}", "--user", "job1",
        "--key", str(key), "--known-hosts", str(s.known_hosts), "--local", "127.0.0.1:9",
        stdout=subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE, cwd="/")
    _, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 2 and "it must be 0600" in err.decode()


# --- what is refused, and logged -----------------------------------------------------------------------
@pytest.mark.asyncio
async def test_another_jobs_key_is_refused(make_setup, caplog):
    """Key A cannot log in as job B, so it cannot reach B's endpoint: the endpoint comes from the key."""
    caplog.set_level(logging.INFO, logger=GATEWAY_LOG)
    s = await make_setup()
    a, _ = s.issue("joba")
    s.issue("jobb")
    with pytest.raises(asyncssh.PermissionDenied):
        await s.connect("jobb", a.private_key)
    assert any("is not the credential of job jobb" in m for m in refusals(caplog))
    async with s.connect("joba", a.private_key) as conn:
        await conn.forward_remote_port(*REVERSE_PLACEHOLDER, "127.0.0.1", 9)
        assert (await s.events.wait(True, "joba")).endpoint.path.endswith("/joba.sock")


@pytest.mark.asyncio
async def test_reused_credential_is_refused(make_setup, caplog):
    """A second connection with the same key while the first is up is refused (a copied key is no use
    while the job holds its tunnel); once the first is gone the job may reconnect."""
    caplog.set_level(logging.INFO, logger=GATEWAY_LOG)
    s = await make_setup()
    cred, _ = s.issue("job1")
    first = await s.connect("job1", cred.private_key)
    with pytest.raises(asyncssh.PermissionDenied):
        await s.connect("job1", cred.private_key)
    assert any("credential of job job1 is in use by another connection" in m for m in refusals(caplog))
    first.close()
    await first.wait_closed()
    deadline = time.monotonic() + 5
    while True:  # the gateway learns of the close a moment later
        try:
            async with s.connect("job1", cred.private_key):
                break
        except asyncssh.PermissionDenied:
            assert time.monotonic() < deadline, "no reconnect within 5 s of the first connection's close"
            await asyncio.sleep(0.05)


@pytest.mark.asyncio
async def test_expired_unused_credential_is_refused(make_setup, caplog):
    """Unused past its first-use window: refused. Used in time: good for reconnects afterwards."""
    caplog.set_level(logging.INFO, logger=GATEWAY_LOG)
    now = [1000.0]
    s = await make_setup(first_use_within=60, clock=lambda: now[0])
    late, _ = s.issue("late")
    early, _ = s.issue("early")
    async with s.connect("early", early.private_key):
        pass
    now[0] += 61
    with pytest.raises(asyncssh.PermissionDenied):
        await s.connect("late", late.private_key)
    assert any("credential of job late expired unused 1 s ago" in m for m in refusals(caplog))
    async with s.connect("early", early.private_key):
        pass
    # the window restarts when the job starts running (its queue wait does not count)
    s.store.expect_first_use("late", 60)
    async with s.connect("late", late.private_key):
        pass


@pytest.mark.asyncio
async def test_revoked_credential_is_refused_and_drops_the_tunnel(make_setup, caplog):
    """The server stopped: revoke closes its tunnel (down-event), and the job cannot come back; its client
    gives up after --reconnect-timeout, ending the job."""
    caplog.set_level(logging.INFO, logger=GATEWAY_LOG)
    s = await make_setup()
    node = await http_server()
    cred, key = s.issue("job1")
    proc = await s.client("job1", key, f"127.0.0.1:{port_of(node)}", "--reconnect-timeout", "2")
    up = await s.events.wait(True, "job1")
    s.gateway.revoke("job1")
    assert (await s.events.wait(False, "job1")).endpoint == up.endpoint
    assert await exit_status(proc, 15) == 1
    assert "giving up: no tunnel within --reconnect-timeout 2 s" in s.client_log("job1")
    with pytest.raises(asyncssh.PermissionDenied):
        await s.connect("job1", cred.private_key)
    assert any("credential of job job1 was revoked" in m for m in refusals(caplog))
    assert len([e for e in s.events.seen if e.up]) == 1


@pytest.mark.asyncio
async def test_forwards_other_than_the_two_allowed_are_refused(make_setup, caplog):
    caplog.set_level(logging.INFO, logger=GATEWAY_LOG)
    s = await make_setup()
    other = await http_server()
    cred, _ = s.issue("job1")
    async with s.connect("job1", cred.private_key) as conn:
        # direct forwards: another port of the hub's host, another host
        for host, port in (("127.0.0.1", port_of(other)), ("localhost", port_of(s.hub_api)), ("10.0.0.1", 80)):
            with pytest.raises(asyncssh.ChannelOpenError, match="only the hub API"):
                await conn.open_connection(host, port)
            assert any(f"a connection to {host}:{port}: jobs may connect only to the hub API" in m
                       for m in refusals(caplog))
        with pytest.raises(asyncssh.ChannelOpenError):
            await conn.open_unix_connection("/run/munge/munge.socket.2")
        # reverse forwards: a real address instead of the placeholder, and a second forward
        with pytest.raises(asyncssh.ChannelListenError):
            await conn.forward_remote_port("0.0.0.0", 8080, "127.0.0.1", 9)
        assert any("a reverse forward of 0.0.0.0:8080" in m for m in refusals(caplog))
        with pytest.raises(asyncssh.ChannelListenError):
            await conn.forward_remote_path("/tmp/x.sock", "/tmp/y.sock")
        await conn.forward_remote_port(*REVERSE_PLACEHOLDER, "127.0.0.1", 9)
        with pytest.raises(asyncssh.ChannelListenError):
            await conn.forward_remote_port(*REVERSE_PLACEHOLDER, "127.0.0.1", 10)
        assert any("a second reverse forward" in m for m in refusals(caplog))
        # the allowed one still works
        reader, writer = await conn.open_connection("127.0.0.1", port_of(s.hub_api))
        writer.write(b"GET / HTTP/1.0\r\n\r\n")
        assert (await asyncio.wait_for(reader.read(), 5)).endswith(b"hub api")


@pytest.mark.asyncio
async def test_exec_shell_pty_and_sftp_are_refused(make_setup, caplog):
    caplog.set_level(logging.INFO, logger=GATEWAY_LOG)
    s = await make_setup()
    cred, _ = s.issue("job1")
    async with s.connect("job1", cred.private_key) as conn:
        with pytest.raises(asyncssh.ChannelOpenError):
            await conn.run("cat /etc/shadow")
        with pytest.raises(asyncssh.ChannelOpenError):
            await conn.create_process()
        with pytest.raises(asyncssh.ChannelOpenError):
            await conn.create_process("ls", term_type="xterm")
        with pytest.raises(asyncssh.ChannelOpenError):
            await conn.start_sftp_client()
    messages = refusals(caplog)
    for what in ("the command 'cat /etc/shadow'", "a shell", "a terminal (pty)", "the subsystem 'sftp'"):
        assert any("refused job job1 (from 127.0.0.1:" in m and what in m for m in messages), (what, messages)


@pytest.mark.asyncio
async def test_openssh_exec_and_x11_are_refused(make_setup, caplog):
    """The stock ssh client asking for X11 and a command gets failures; the gateway logs the command, and
    asyncssh (on its own logger) the X11 request."""
    caplog.set_level(logging.INFO, logger=GATEWAY_LOG)
    caplog.set_level(logging.INFO, logger="asyncssh")
    need_openssh()
    s = await make_setup()
    _, key = s.issue("job1")
    opts = Options(("127.0.0.1", s.gateway.port), "job1", str(key), str(s.known_hosts), "127.0.0.1:9")
    argv = ["ForwardX11=yes" if a == "ForwardX11=no" else a
            for a in openssh_argv(opts, str(s.root / "ssh.log")) if a not in ("-N", "-T")]
    proc = await asyncio.create_subprocess_exec(*argv, "id", stdin=subprocess.DEVNULL,
                                                stdout=asyncio.subprocess.PIPE, stderr=subprocess.DEVNULL,
                                                env=dict(os.environ, DISPLAY="localhost:10"))
    out, _ = await asyncio.wait_for(proc.communicate(), 15)
    assert proc.returncode != 0 and out == b""
    ssh_log = (s.root / "ssh.log").read_text()
    assert "X11 forwarding request failed" in ssh_log and "exec request failed" in ssh_log
    assert any("refused job job1" in m and "the command 'id'" in m for m in refusals(caplog))
    assert any("X11 forwarding request denied" in r.getMessage() for r in caplog.records if r.name == "asyncssh")


# --- credentials and the host key ----------------------------------------------------------------------
def test_credential_issue_and_state(tmp_path):
    store = CredentialStore(str(tmp_path / "socks"))
    cred = store.issue("0123abcd")
    assert cred.public_key.startswith("ssh-ed25519 ")
    assert cred.private_key.startswith("-----BEGIN OPENSSH PRIVATE KEY-----")
    assert cred.private_key not in repr(cred) and "PRIVATE" not in repr(cred)
    assert asyncssh.import_private_key(cred.private_key).export_public_key("openssh").decode().split()[:2] \
        == cred.public_key.split()[:2]
    state = store.state("0123abcd")
    assert "PRIVATE" not in str(state) and state["used"] is False
    # a hub restart: a new store learns the credential again from the spawner's state
    again = CredentialStore(str(tmp_path / "socks"))
    assert again.restore(state) == cred.endpoint
    assert again.check("0123abcd", asyncssh.import_private_key(cred.private_key)) is not None
    for bad in ("", "../etc", "a b", "x" * 65, "-lead"):
        with pytest.raises(ValueError, match="job tag"):
            store.issue(bad)


def test_socket_dir_must_be_private(tmp_path):
    loose = tmp_path / "loose"
    loose.mkdir(mode=0o755)
    loose.chmod(0o755)
    with pytest.raises(ValueError, match="mode 0700"):
        CredentialStore(str(loose))
    with pytest.raises(ValueError, match="longer than a Unix socket allows"):
        CredentialStore(str(tmp_path / ("d" * 100))).issue("job1")


def test_host_key_is_made_once_and_kept_private(tmp_path):
    path = tmp_path / "host_key"
    first = load_host_key(str(path))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_host_key(str(path)).public_data == first.public_data
    path.chmod(0o644)
    with pytest.raises(ValueError, match="mode 0600"):
        load_host_key(str(path))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
