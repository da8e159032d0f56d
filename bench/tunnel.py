#!/usr/bin/env python3
"""What the tunnel costs: round-trip latency and throughput to a "node" server, side by side, in one run:

  direct            a loopback TCP connection to the server (no tunnel)
  gateway+asyncssh  hub-side Unix socket -> hpchub gateway -> `python -m tunnel.client` (asyncssh) -> server
  gateway+openssh   the same with `--ssh openssh` (OpenSSH's ssh as the job's client)
  sshd+ssh -R       OpenSSH all the way: a private sshd of this bench and `ssh -R` (the usual way)

The gateway runs in this process's event loop, as in the hub; the load comes from a separate process (as
configurable-http-proxy would be), the server is a third. Measures per path: `--round-trips` request/response
pairs of 64 bytes on one connection (median and 99th percentile), `--connects` new connections each with
one round trip, and `--megabytes` of bulk data one way; the paths take turns, `--repeat` times. Localhost only; run as root (the private sshd takes
root's key login on a loopback port). Not part of the test suite.

Usage: python3 bench/tunnel.py [--round-trips 2000] [--connects 200] [--megabytes 256] [--repeat 3]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# this file is named like the package it measures: keep its own directory off the import path
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
MESSAGE = 64
CHUNK = 1 << 16
READY_TIMEOUT_S = 30


# --- the node's server: echo, or sink-and-acknowledge --------------------------------------------------
def serve(port_file: str) -> None:
    """`echo\\n` then bytes: each read is sent back. `sink N\\n`: read N bytes, answer `ok`."""
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        mode = (await reader.readline()).split()
        if mode[:1] == [b"echo"]:
            while data := await reader.read(CHUNK):
                writer.write(data)
                await writer.drain()
        elif mode[:1] == [b"sink"]:
            left = int(mode[1])
            while left > 0 and (data := await reader.read(min(left, 1 << 20))):
                left -= len(data)
            writer.write(b"ok")
            await writer.drain()
        writer.close()

    async def main() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", 0, limit=1 << 20)
        Path(port_file).write_text(str(server.sockets[0].getsockname()[1]))
        await server.serve_forever()
    asyncio.run(main())


# --- the load: one process per path ---------------------------------------------------------------------
def connect(target: str) -> socket.socket:
    if target.startswith("/"):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(target)
    else:
        host, port = target.rsplit(":", 1)
        sock = socket.create_connection((host, int(port)))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.settimeout(30)
    return sock


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        part = sock.recv(n - len(data))
        if not part:
            raise ConnectionError("closed early")
        data += part
    return data


def measure(target: str, round_trips: int, connects: int, megabytes: int) -> dict:
    payload = os.urandom(MESSAGE)
    with connect(target) as sock:
        sock.sendall(b"echo\n")
        for _ in range(50):          # warm-up
            sock.sendall(payload)
            recv_exactly(sock, MESSAGE)
        rtt = []
        for _ in range(round_trips):
            t = time.perf_counter()
            sock.sendall(payload)
            recv_exactly(sock, MESSAGE)
            rtt.append(time.perf_counter() - t)
    fresh = []
    for _ in range(connects):
        t = time.perf_counter()
        with connect(target) as sock:
            sock.sendall(b"echo\n" + payload)
            recv_exactly(sock, MESSAGE)
        fresh.append(time.perf_counter() - t)
    total = megabytes << 20
    block = os.urandom(1 << 20)
    with connect(target) as sock:
        t = time.perf_counter()
        sock.sendall(b"sink %d\n" % total)
        for _ in range(megabytes):
            sock.sendall(block)
        assert recv_exactly(sock, 2) == b"ok"
        seconds = time.perf_counter() - t
    rtt.sort()
    return {"rtt_median_us": statistics.median(rtt) * 1e6, "rtt_p99_us": rtt[int(len(rtt) * 0.99) - 1] * 1e6,
            "connect_median_ms": statistics.median(fresh) * 1e3, "mb_per_s": megabytes / seconds}


async def run_measure(target: str, args: argparse.Namespace) -> dict:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "_measure", target, str(args.round_trips), str(args.connects),
        str(args.megabytes), stdout=asyncio.subprocess.PIPE)
    out, _ = await asyncio.wait_for(proc.communicate(), 600)
    if proc.returncode != 0:
        raise SystemExit(f"measuring {target} failed ({proc.returncode})")
    return json.loads(out)


# --- the set-up ---------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def wait_file(path: Path, proc: asyncio.subprocess.Process, what: str) -> str:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not (path.exists() and path.read_text()):
        if proc.returncode is not None or time.monotonic() > deadline:
            raise SystemExit(f"{what} did not start")
        await asyncio.sleep(0.05)
    return path.read_text()


async def wait_connectable(port: int, proc: asyncio.subprocess.Process, what: str, log: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        except OSError:
            if proc.returncode is not None or time.monotonic() > deadline:
                raise SystemExit(f"{what} is not up: {log.read_text()[-2000:]}") from None
            await asyncio.sleep(0.05)


def write_private(path: Path, text: str) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return path


async def start(procs: list, *argv: str, log: Path) -> asyncio.subprocess.Process:
    with open(log, "ab") as out:
        proc = await asyncio.create_subprocess_exec(*argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
    procs.append(proc)
    return proc


async def private_sshd(root: Path, procs: list, backend: int) -> str:
    """An sshd of this bench on a free loopback port, root's key login only, and `ssh -R` to it; returns
    the forwarded address."""
    import asyncssh
    from tunnel.client import CIPHERS

    host_key = asyncssh.generate_private_key("ssh-ed25519")
    user_key = asyncssh.generate_private_key("ssh-ed25519")
    write_private(root / "sshd_host_key", host_key.export_private_key("openssh").decode())
    write_private(root / "root_key", user_key.export_private_key("openssh").decode())
    (root / "authorized_keys").write_text(user_key.export_public_key("openssh").decode())
    port, forwarded = free_port(), free_port()
    (root / "sshd_known_hosts").write_text(
        f"[127.0.0.1]:{port} {' '.join(host_key.export_public_key('openssh').decode().split()[:2])}\n")
    (root / "sshd_config").write_text(
        f"ListenAddress 127.0.0.1:{port}\nHostKey {root}/sshd_host_key\nPidFile {root}/sshd.pid\n"
        f"AuthorizedKeysFile {root}/authorized_keys\nPermitRootLogin prohibit-password\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nAllowTcpForwarding remote\n"
        "GatewayPorts no\nX11Forwarding no\nPrintMotd no\n"
        # its files sit in a 0700 directory under /tmp, which StrictModes rejects for being under /tmp
        "StrictModes no\n")
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)    # sshd's privilege separation directory
    sshd = await start(procs, "/usr/sbin/sshd", "-D", "-e", "-f", str(root / "sshd_config"), log=root / "sshd.log")
    await wait_connectable(port, sshd, "the private sshd", root / "sshd.log")
    ssh = await start(procs, "ssh", "-N", "-F", "none", "-p", str(port), "-i", str(root / "root_key"),
                      "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
                      "-o", f"UserKnownHostsFile={root}/sshd_known_hosts", "-o", "ExitOnForwardFailure=yes",
                      "-o", f"Ciphers={','.join(CIPHERS)}", "-o", "Compression=no",
                      "-R", f"127.0.0.1:{forwarded}:127.0.0.1:{backend}", "root@127.0.0.1", log=root / "ssh-R.log")
    await wait_connectable(forwarded, ssh, "ssh -R to the private sshd", root / "ssh-R.log")
    return f"127.0.0.1:{forwarded}"


async def bench(args: argparse.Namespace) -> None:
    from tunnel.client import terminate
    from tunnel.credentials import CredentialStore
    from tunnel.gateway import Gateway

    root = Path(tempfile.mkdtemp(prefix="hpchub-bench-tunnel-"))
    procs: list[asyncio.subprocess.Process] = []
    gateway = None
    try:
        backend_proc = await start(procs, sys.executable, __file__, "_serve", str(root / "backend.port"),
                                   log=root / "backend.log")
        backend = int(await wait_file(root / "backend.port", backend_proc, "the node's server"))
        store = CredentialStore(str(root / "sockets"))
        gateway = Gateway(store, host_key_path=str(root / "gateway_host_key"))
        await gateway.start()
        (root / "known_hosts").write_text(gateway.known_hosts_line("127.0.0.1"))
        targets = {"direct": f"127.0.0.1:{backend}"}
        for client in ("asyncssh", "openssh"):
            tag = f"bench-{client}"
            key = write_private(root / f"{tag}.key", store.issue(tag).private_key)
            await start(procs, sys.executable, "-m", "tunnel.client", "--gateway", f"127.0.0.1:{gateway.port}",
                        "--user", tag, "--key", str(key), "--known-hosts", str(root / "known_hosts"),
                        "--local", f"127.0.0.1:{backend}", "--ssh", client, log=root / f"{tag}.log")
            targets[f"gateway+{client}"] = (await gateway.wait_up(tag, READY_TIMEOUT_S)).path
        targets["sshd+ssh -R"] = await private_sshd(root, procs, backend)
        # the paths take turns, `--repeat` times, and each figure is the median of its turns: load from
        # elsewhere on the machine then spreads over all paths instead of spoiling one
        runs: dict[str, list[dict]] = {name: [] for name in targets}
        for _ in range(args.repeat):
            for name, target in targets.items():
                runs[name].append(await run_measure(target, args))
        results = {name: {key: statistics.median(r[key] for r in rs) for key in rs[0]} for name, rs in runs.items()}
    finally:
        for proc in procs:
            await terminate(proc)
        if gateway is not None:
            await gateway.close()
        shutil.rmtree(root, ignore_errors=True)
    report(results, args)


def report(results: dict, args: argparse.Namespace) -> None:
    direct, sshd = results["direct"], results["sshd+ssh -R"]
    print(f"{args.round_trips} round trips of {MESSAGE} B on one connection, {args.connects} new connections, "
          f"{args.megabytes} MiB bulk; medians of {args.repeat} turns per path; {os.cpu_count()} CPUs")
    print(f"{'path':<18} {'RTT median':>11} {'RTT p99':>9} {'added':>9} {'connect+RTT':>12} "
          f"{'MB/s':>7} {'x direct':>9} {'x sshd -R':>9}")
    for name, r in results.items():
        print(f"{name:<18} {r['rtt_median_us']:>8.0f} us {r['rtt_p99_us']:>6.0f} us "
              f"{r['rtt_median_us'] - direct['rtt_median_us']:>6.0f} us {r['connect_median_ms']:>9.2f} ms "
              f"{r['mb_per_s']:>7.0f} {r['mb_per_s'] / direct['mb_per_s']:>9.2f} {r['mb_per_s'] / sshd['mb_per_s']:>9.2f}")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_serve":
        return serve(sys.argv[2])
    if len(sys.argv) > 1 and sys.argv[1] == "_measure":
        target, round_trips, connects, megabytes = sys.argv[2], *map(int, sys.argv[3:6])
        print(json.dumps(measure(target, round_trips, connects, megabytes)))
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--round-trips", type=int, default=2000)
    p.add_argument("--connects", type=int, default=200)
    p.add_argument("--megabytes", type=int, default=256)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench/tunnel.py runs as root (its private sshd takes root's key login on loopback)")
    asyncio.run(bench(args))


if __name__ == "__main__":
    main()
