"""A compute node the hub cannot reach (docker/slurm-cluster/netns.sh): the network namespace hpchub-n1.
A server in it is unreachable from the host, the node reaches the host's bridge address, and the tunnel
client run inside it (as alice) makes the node's server answer on the host through the gateway."""
from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import pytest_asyncio

from conftest import require_service
from test_tunnel import Events, http_get, write_key
from tunnel.client import terminate
from tunnel.credentials import CredentialStore
from tunnel.gateway import Gateway

REPO = Path(__file__).resolve().parent.parent
NETNS_SH = REPO / "docker" / "slurm-cluster" / "netns.sh"
NS_PATH = "/run/netns/hpchub-n1"
PREFIX = os.environ.get("HPCHUB_NETNS_PREFIX", "10.251.0")
HOST_ADDR, NODE_ADDR = f"{PREFIX}.1", f"{PREFIX}.11"
SLURMD_PORT = 6818
IN_NODE = ["nsenter", f"--net={NS_PATH}"]
# a server in the node that prints its port, then answers every request with its body
SERVER = ("import http.server, sys\n"
          "class H(http.server.BaseHTTPRequestHandler):\n"
          "    def do_GET(self):\n"
          "        self.send_response(200); self.send_header('Content-Length', '12'); self.end_headers()\n"
          "        self.wfile.write(b'node server\\n')\n"
          "    def log_message(self, *a): pass\n"
          "s = http.server.HTTPServer((sys.argv[1], 0), H)\n"
          "print(s.server_address[1], flush=True)\n"
          "s.serve_forever()\n")


@pytest.fixture(scope="module")
def netns_node() -> None:
    up = os.path.exists(NS_PATH) and subprocess.run([str(NETNS_SH), "status"], capture_output=True,
                                                     timeout=30).returncode == 0
    require_service("the network namespace node hpchub-n1", up, f"run `{NETNS_SH} up` as root")


@pytest_asyncio.fixture
async def node_server(netns_node, test_users):
    """start(bind_address) -> port: an HTTP server as alice inside the node; all stopped afterwards."""
    procs: list[asyncio.subprocess.Process] = []

    async def start(bind: str) -> int:
        proc = await asyncio.create_subprocess_exec(
            *IN_NODE, "sudo", "-n", "-u", "alice", "--", "/usr/bin/python3", "-c", SERVER, bind,
            stdin=subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=subprocess.DEVNULL, cwd="/")
        procs.append(proc)
        line = await asyncio.wait_for(proc.stdout.readline(), 15)
        assert line.strip().isdigit(), f"the node's server did not start: {line!r}"
        return int(line)

    yield start
    for proc in procs:
        await terminate(proc)


def in_node(*argv: str, timeout: float = 15) -> subprocess.CompletedProcess:
    return subprocess.run([*IN_NODE, *argv], capture_output=True, text=True, timeout=timeout)


CONNECT = "import socket, sys; socket.create_connection((sys.argv[1], int(sys.argv[2])), 3).close()"


@pytest.mark.asyncio
async def test_host_cannot_reach_a_server_in_the_node(node_server):
    port = await node_server("0.0.0.0")
    # the server is up, for the node itself
    assert in_node("/usr/bin/python3", "-c", CONNECT, NODE_ADDR, str(port)).returncode == 0
    # from the host the connection attempt is dropped: no answer, not even a refusal
    with pytest.raises(socket.timeout):
        await asyncio.to_thread(socket.create_connection, (NODE_ADDR, port), 2)


def test_slurmd_port_is_open_from_the_host(netns_node):
    """slurmctld must reach a slurmd in the node: its port answers (an accept, or a refusal when no slurmd
    runs there), where every other port stays silent."""
    try:
        socket.create_connection((NODE_ADDR, SLURMD_PORT), 3).close()
    except ConnectionRefusedError:
        pass


def test_node_reaches_the_host(netns_node):
    with socket.create_server((HOST_ADDR, 0)) as listener:
        listener.settimeout(5)
        done = in_node("/usr/bin/python3", "-c", CONNECT, HOST_ADDR, str(listener.getsockname()[1]))
        assert done.returncode == 0, done.stderr
        listener.accept()[0].close()
    # ... but not the host's loopback services (its own 127.0.0.1 is the node's)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        assert in_node("/usr/bin/python3", "-c", CONNECT, "127.0.0.1", str(listener.getsockname()[1])).returncode != 0


@pytest.mark.asyncio
async def test_tunnel_from_the_node(node_server, shared_dir):
    """The gateway on the bridge address; the client as alice inside the node: the node's loopback server
    answers at the hub-side socket, and the node reaches the hub API (on the host's loopback, which the
    node cannot reach otherwise) through the tunnel."""
    hub_root = Path(shared_dir) / "hub"
    hub_root.mkdir(mode=0o700)
    async def hub_api_handler(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.0 200 OK\r\nContent-Length: 7\r\n\r\nhub api")
        await writer.drain()
        writer.close()
    hub_api = await asyncio.start_server(hub_api_handler, "127.0.0.1", 0)
    api_port = hub_api.sockets[0].getsockname()[1]
    events = Events()
    store = CredentialStore(str(hub_root / "sockets"))
    gateway = Gateway(store, host_key_path=str(hub_root / "host_key"), host=HOST_ADDR,
                      hub_api=("127.0.0.1", api_port), on_up=events, on_down=events, keepalive_interval=2)
    await gateway.start()
    client = None
    try:
        port = await node_server("127.0.0.1")
        cred = store.issue("n1job")
        job_dir = Path(shared_dir) / "job"
        job_dir.mkdir(mode=0o700)
        shutil.chown(job_dir, "alice")
        key = write_key(job_dir / "tunnel.key", cred.private_key)
        shutil.chown(key, "alice")
        known_hosts = Path(shared_dir) / "known_hosts"
        known_hosts.write_text(gateway.known_hosts_line(HOST_ADDR))
        known_hosts.chmod(0o644)
        local_api = free_port_in_node()
        with open(Path(shared_dir) / "client.log", "wb") as out:
            client = await asyncio.create_subprocess_exec(
                *IN_NODE, "sudo", "-n", "-u", "alice", "--", sys.executable, "-m", "tunnel.client",
                "--gateway", f"{HOST_ADDR}:{gateway.port}", "--user", "n1job", "--key", str(key),
                "--known-hosts", str(known_hosts), "--local", f"127.0.0.1:{port}", "--connect-timeout", "20",
                "--hub-api-local", f"127.0.0.1:{local_api}", "--hub-api-remote", f"127.0.0.1:{api_port}",
                stdin=subprocess.DEVNULL, stdout=out, stderr=out, cwd="/")
        up = await events.wait(True, "n1job", timeout=20)
        assert up.peer.startswith(NODE_ADDR + ":")
        assert await http_get(up.endpoint) == b"node server\n"
        fetch = ("import sys, urllib.request; "
                 "print(urllib.request.urlopen(f'http://127.0.0.1:{sys.argv[1]}/', timeout=5).read().decode())")
        got = await asyncio.to_thread(in_node, "/usr/bin/python3", "-c", fetch, str(local_api))
        assert got.stdout.strip() == "hub api", got.stderr
    finally:
        if client is not None:
            await terminate(client)
        await gateway.close()
        hub_api.close()


def free_port_in_node() -> int:
    out = in_node("/usr/bin/python3", "-c", "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); "
                  "print(s.getsockname()[1])")
    return int(out.stdout)
