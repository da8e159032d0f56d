"""The job side of the tunnel: `python -m tunnel.client ... [-- COMMAND ...]`, run in the job script.

Opens one outbound SSH connection to the hub's gateway, logged in as the job's tag with the job's one-time
key, the gateway's host key checked against the known_hosts file the hub gave the job (checking cannot be
turned off), and asks for
  - the reverse forward `hpchub:1` -> `--local` (the single-user server on the node: a Unix socket path,
    best, as no other user of the node can take it over, or HOST:PORT), which the gateway binds at the
    job's hub-side endpoint;
  - optionally a local forward `--hub-api-local` -> `--hub-api-remote`, so the server reaches the hub API.
Keepalives detect a dead connection; it reconnects with backoff. It exits 1 when no tunnel comes up within
`--connect-timeout` seconds, or none again within `--reconnect-timeout` after a drop, so that a job never
holds a node for nothing. With COMMAND it starts COMMAND once the tunnel is up (its environment gains
HPCHUB_TUNNEL_LOCAL and HPCHUB_HUB_API_LOCAL), exits with COMMAND's status, and stops COMMAND when the
tunnel is gone for good. Without COMMAND it runs until killed.

In a job, `--key-env`/`--known-hosts-env` take the key and the gateway's host key from environment variables
(set from the job's private environment file; removed before COMMAND starts), `--local auto` puts the
server's socket in a private directory on the node, and `--hub-api-local 127.0.0.1:0` takes a free port.

Uses asyncssh when it can be imported (`--ssh auto`), otherwise OpenSSH's `ssh` with the same settings
(`openssh_argv`). Only the standard library is needed besides.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import socket
import stat
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from typing import Callable, Protocol

from . import REVERSE_PLACEHOLDER

# ciphers in our order of preference: AES-GCM is the fastest where the CPU has AES instructions
CIPHERS = ("aes128-gcm@openssh.com", "chacha20-poly1305@openssh.com", "aes256-gcm@openssh.com")
# OpenSSH says this (at -v) when the gateway accepted the reverse forward
_OPENSSH_FORWARD_UP = f"remote forward success for: listen {REVERSE_PLACEHOLDER[0]}:{REVERSE_PLACEHOLDER[1]}"
_KILL_GRACE_S = 10.0
#: `--local auto`: the server's socket in the client's private directory on the node
LOCAL_AUTO = "auto"
# ssh logs at -v (to see the forward come up) a few lines per forwarded connection: cut its log beyond this
_OPENSSH_LOG_MAX = 1 << 20


def log(message: str) -> None:
    print(f"tunnel {time.strftime('%H:%M:%S')}: {message}", file=sys.stderr, flush=True)


class TunnelError(Exception):
    """This attempt failed; another may work."""


class FatalTunnelError(Exception):
    """No attempt can work (e.g. the gateway's host key does not match): give up now."""


@dataclass(frozen=True)
class Options:
    gateway: tuple[str, int]
    user: str                                    # the job's tag
    key: str                                     # private key file, mode 0600
    known_hosts: str
    local: str                                   # "HOST:PORT" or a Unix socket path
    hub_api_local: tuple[str, int] | None = None
    hub_api_remote: tuple[str, int] | None = None
    keepalive: float = 15.0
    keepalive_count: int = 3
    connect_timeout: float = 120.0
    reconnect_timeout: float = 300.0
    backoff_max: float = 5.0

    @property
    def local_is_path(self) -> bool:
        return "/" in self.local


def host_port(text: str, lowest_port: int = 1) -> tuple[str, int]:
    """"HOST:PORT" or "[V6ADDR]:PORT" -> (host, port)."""
    host, sep, port = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not lowest_port <= int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, not {text!r}")
    return host, int(port)


def _bindable(text: str) -> tuple[str, int]:
    """HOST:PORT to listen on; port 0 takes a free one."""
    return host_port(text, lowest_port=0)


def _local_spec(text: str) -> str:
    if text == LOCAL_AUTO:
        return text
    if "/" in text:
        if not os.path.isabs(text):
            raise argparse.ArgumentTypeError(f"a socket path must be absolute, not {text!r}")
        return text
    host_port(text)
    return text


def _fmt(address: tuple[str, int]) -> str:
    return f"[{address[0]}]:{address[1]}" if ":" in address[0] else f"{address[0]}:{address[1]}"


def openssh_argv(opts: Options, log_file: str, ssh: str = "ssh") -> list[str]:
    """The OpenSSH command equivalent to the asyncssh client: forwards only, the host key checked."""
    placeholder = f"{REVERSE_PLACEHOLDER[0]}:{REVERSE_PLACEHOLDER[1]}"
    local = opts.local if opts.local_is_path else _fmt(host_port(opts.local))
    argv = [ssh, "-N", "-T", "-F", "none", "-E", log_file, "-v",
            "-p", str(opts.gateway[1]), "-l", opts.user, "-i", opts.key,
            "-o", "IdentitiesOnly=yes", "-o", "IdentityAgent=none", "-o", "BatchMode=yes",
            "-o", "PubkeyAuthentication=yes", "-o", "PasswordAuthentication=no",
            "-o", "KbdInteractiveAuthentication=no", "-o", "GSSAPIAuthentication=no",
            "-o", "StrictHostKeyChecking=yes", "-o", f"UserKnownHostsFile={opts.known_hosts}",
            "-o", "GlobalKnownHostsFile=/dev/null", "-o", "UpdateHostKeys=no", "-o", "CheckHostIP=no",
            "-o", "ExitOnForwardFailure=yes", "-o", f"ServerAliveInterval={max(1, round(opts.keepalive))}",
            "-o", f"ServerAliveCountMax={opts.keepalive_count}", "-o", "ConnectTimeout=10",
            "-o", "ForwardAgent=no", "-o", "ForwardX11=no", "-o", "Compression=no",
            "-o", f"Ciphers={','.join(CIPHERS)}",
            "-R", f"{placeholder}:{local}"]
    if opts.hub_api_local and opts.hub_api_remote:
        argv += ["-L", f"{_fmt(opts.hub_api_local)}:{_fmt(opts.hub_api_remote)}"]
    return argv + [opts.gateway[0]]


class Session(Protocol):
    async def wait_closed(self) -> str: ...
    async def close(self) -> None: ...


# --- asyncssh ------------------------------------------------------------------------------------------
class AsyncsshTunnel:
    """Connections made with asyncssh. The hub API port stays bound by us across reconnects (a connection
    arriving while the tunnel is down is closed), so that no other user on the node can take it over."""

    def __init__(self, opts: Options, asyncssh_module) -> None:
        self.opts = opts        # start() fills in a hub API port 0 with the port it bound
        self.asyncssh = asyncssh_module
        self.key = asyncssh_module.read_private_key(opts.key)
        self.conn = None
        self.api_server: asyncio.AbstractServer | None = None

        class Client(asyncssh_module.SSHClient):
            lost: Exception | None = None      # why the connection ended

            def connection_lost(self, exc: Exception | None) -> None:
                self.lost = exc
        self.client_class = Client

    async def start(self) -> None:
        if self.opts.hub_api_local and self.opts.hub_api_remote:
            self.api_server = await asyncio.start_server(self._relay_api, *self.opts.hub_api_local)
            bound = self.api_server.sockets[0].getsockname()[:2]
            self.opts = replace(self.opts, hub_api_local=(self.opts.hub_api_local[0], bound[1]))

    async def stop(self) -> None:
        if self.api_server is not None:
            self.api_server.close()
            await self.api_server.wait_closed()

    async def connect(self) -> Session:
        ssh, o = self.asyncssh, self.opts
        try:
            conn = await ssh.connect(
                o.gateway[0], o.gateway[1], client_factory=self.client_class, username=o.user,
                client_keys=[self.key], known_hosts=o.known_hosts,
                preferred_auth="publickey", password_auth=False, kbdint_auth=False, host_based_auth=False,
                gss_host=None, agent_path=None, agent_forwarding=False, config=[], x509_trusted_certs=None,
                x509_trusted_cert_paths=None, env=None, send_env=None, request_pty=False,
                encryption_algs=list(CIPHERS), compression_algs=["none"], connect_timeout=10,
                keepalive_interval=o.keepalive, keepalive_count_max=o.keepalive_count)
        except ssh.HostKeyNotVerifiable as e:
            raise FatalTunnelError(f"the gateway's host key does not match {o.known_hosts}: {e.reason}") from e
        except (OSError, ssh.Error, asyncio.TimeoutError) as e:
            raise TunnelError(f"cannot connect to {_fmt(o.gateway)}: {getattr(e, 'reason', None) or e}") from e
        try:
            if o.local_is_path:
                await conn.forward_remote_port_to_path(*REVERSE_PLACEHOLDER, o.local)
            else:
                await conn.forward_remote_port(*REVERSE_PLACEHOLDER, *host_port(o.local))
        except (OSError, ssh.Error, ssh.ChannelListenError) as e:
            conn.close()
            raise TunnelError(f"the gateway refused the reverse forward: {e}") from e
        except asyncio.CancelledError:
            conn.close()
            raise
        self.conn = conn
        return _AsyncsshSession(self, conn, conn.get_owner())

    async def _relay_api(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = self.conn
        try:
            if conn is None:
                return
            try:
                remote_reader, remote_writer = await conn.open_connection(*self.opts.hub_api_remote)
            except (OSError, self.asyncssh.Error) as e:
                log(f"hub API connection refused by the gateway: {e}")
                return
            await asyncio.gather(_pipe(reader, remote_writer), _pipe(remote_reader, writer))
            remote_writer.close()
        finally:
            writer.close()


class _AsyncsshSession:
    def __init__(self, tunnel: AsyncsshTunnel, conn, client) -> None:
        self.tunnel = tunnel
        self.conn = conn
        self.client = client

    async def wait_closed(self) -> str:
        await self.conn.wait_closed()
        self.tunnel.conn = None
        return f"connection lost: {self.client.lost or 'closed by the gateway'}"

    async def close(self) -> None:
        self.tunnel.conn = None
        self.conn.close()
        await asyncio.wait_for(self.conn.wait_closed(), _KILL_GRACE_S)


async def _pipe(reader, writer) -> None:
    try:
        while True:
            data = await reader.read(65536)
            if not data:
                break
            writer.write(data)
            await writer.drain()
        writer.write_eof()
    except (OSError, EOFError, ConnectionError):
        pass
    except Exception as e:  # asyncssh's channel errors
        log(f"hub API relay: {e}")


# --- OpenSSH -------------------------------------------------------------------------------------------
class OpensshTunnel:
    """Connections made by an `ssh` process each; its log goes to a private file (a pipe nobody reads later
    would kill ssh), read for the line that says the reverse forward is up."""

    def __init__(self, opts: Options, ssh: str = "ssh") -> None:
        self.opts = opts        # start() fills in a hub API port 0 with a free port
        self.ssh = ssh
        self.log_dir = tempfile.mkdtemp(prefix="hpchub-tunnel-")

    async def start(self) -> None:
        if self.opts.hub_api_local and self.opts.hub_api_local[1] == 0:
            # ssh binds it itself: free now, taken by ssh a moment later (asyncssh holds its port throughout)
            host = self.opts.hub_api_local[0]
            with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
                probe.bind((host, 0))
                self.opts = replace(self.opts, hub_api_local=(host, probe.getsockname()[1]))

    async def stop(self) -> None:
        for name in os.listdir(self.log_dir):
            os.unlink(os.path.join(self.log_dir, name))
        os.rmdir(self.log_dir)

    async def connect(self) -> Session:
        log_file = os.path.join(self.log_dir, "ssh.log")
        open(log_file, "w").close()
        proc = await asyncio.create_subprocess_exec(
            *openssh_argv(self.opts, log_file, self.ssh), stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
        session = _OpensshSession(proc, log_file)
        try:
            return await self._wait_forward(session, log_file)
        except asyncio.CancelledError:
            await session.close()
            raise

    async def _wait_forward(self, session: _OpensshSession, log_file: str) -> Session:
        proc = session.proc
        deadline = time.monotonic() + 30
        while True:
            text = _read(log_file)
            if _OPENSSH_FORWARD_UP in text:
                return session
            if proc.returncode is not None or time.monotonic() > deadline:
                await session.close()
                failure = _ssh_failure(text)
                if "Host key verification failed" in text or "REMOTE HOST IDENTIFICATION HAS CHANGED" in text:
                    raise FatalTunnelError(f"the gateway's host key does not match {self.opts.known_hosts}: {failure}")
                raise TunnelError(f"ssh exited ({proc.returncode}): {failure}" if proc.returncode is not None
                                  else f"ssh set up no forward in 30 s: {failure}")
            try:
                await asyncio.wait_for(proc.wait(), 0.05)
            except asyncio.TimeoutError:
                pass


class _OpensshSession:
    def __init__(self, proc: asyncio.subprocess.Process, log_file: str) -> None:
        self.proc = proc
        self.log_file = log_file

    async def wait_closed(self) -> str:
        while True:
            try:
                code = await asyncio.wait_for(self.proc.wait(), 60)
                return f"ssh exited ({code}): {_ssh_failure(_read(self.log_file))}"
            except asyncio.TimeoutError:
                if os.path.getsize(self.log_file) > _OPENSSH_LOG_MAX:
                    os.truncate(self.log_file, 0)    # ssh appends (O_APPEND): it goes on at the new end

    async def close(self) -> None:
        await terminate(self.proc)


def _read(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except FileNotFoundError:
        return ""


def _ssh_failure(text: str) -> str:
    """The lines of an ssh log that explain a failure (not its debug chatter)."""
    chatter = ("debug", "OpenSSH_", "Authenticated to ", "Transferred: ")
    lines = [line for line in text.splitlines() if line and not line.startswith(chatter)]
    return " | ".join(lines[-2:]) or "no message"


# --- the supervisor ------------------------------------------------------------------------------------
class Backoff:
    """0.2 s, doubling up to `cap`, with jitter, so that many jobs do not reconnect in step."""

    def __init__(self, cap: float) -> None:
        self.cap = cap
        self.delay = 0.2

    def next(self) -> float:
        delay = self.delay
        self.delay = min(self.delay * 2, self.cap)
        return delay * random.uniform(0.8, 1.2)

    def reset(self) -> None:
        self.delay = 0.2


async def keep_up(tunnel, opts: Options, on_up: Callable[[], None]) -> None:
    """Hold the tunnel up, reconnecting after drops; returns never, raises TunnelError/FatalTunnelError
    when it cannot (no tunnel within the connect or reconnect timeout)."""
    deadline = time.monotonic() + opts.connect_timeout
    limit = f"--connect-timeout {opts.connect_timeout:g} s"
    backoff = Backoff(opts.backoff_max)
    while True:
        try:
            session = await tunnel.connect()
        except TunnelError as e:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TunnelError(f"no tunnel within {limit}; last error: {e}") from e
            delay = min(backoff.next(), remaining)
            log(f"{e}; again in {delay:.1f} s")
            await asyncio.sleep(delay)
            continue
        backoff.reset()
        try:
            on_up()
            reason = await session.wait_closed()
        except asyncio.CancelledError:
            await session.close()
            raise
        log(f"tunnel down: {reason}; reconnecting")
        deadline = time.monotonic() + opts.reconnect_timeout
        limit = f"--reconnect-timeout {opts.reconnect_timeout:g} s"


async def run(opts: Options, mode: str, command: list[str]) -> int:
    """The whole client: returns the exit status."""
    tunnel = make_tunnel(opts, mode)
    stopping = asyncio.Event()
    stop_signal: list[int] = []
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        stop_signal.append(signum)
        stopping.set()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(sig, on_signal, sig)
    first_up = asyncio.Event()

    def on_up() -> None:
        log(f"tunnel up ({type(tunnel).__name__}): gateway {_fmt(opts.gateway)} -> {opts.local}"
            + (f"; hub API at {_fmt(opts.hub_api_local)}" if opts.hub_api_local else ""))
        first_up.set()

    try:
        await tunnel.start()
    except OSError as e:
        log(f"cannot listen on {opts.hub_api_local} for the hub API: {e}")
        return 1
    opts = tunnel.opts
    keeper = asyncio.ensure_future(keep_up(tunnel, opts, on_up))
    stop_wait = asyncio.ensure_future(stopping.wait())
    child: asyncio.subprocess.Process | None = None
    try:
        up_wait = asyncio.ensure_future(first_up.wait())
        await asyncio.wait({keeper, stop_wait, up_wait}, return_when=asyncio.FIRST_COMPLETED)
        up_wait.cancel()
        if first_up.is_set() and not keeper.done() and not stopping.is_set():
            waits = {keeper, stop_wait}
            if command:
                child = await asyncio.create_subprocess_exec(*command, env=_child_env(opts))
                waits.add(asyncio.ensure_future(child.wait()))
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        # the first cause wins: the command's exit, a signal, or the tunnel given up
        if child is not None and child.returncode is not None:
            status = child.returncode
            log(f"{command[0]} exited with status {status}")
        elif stopping.is_set():
            status = 128 + stop_signal[0]
            log(f"stopping on signal {stop_signal[0]}")
            if child is not None:       # the command's own exit is the job's: 0 when it shut down cleanly
                await terminate(child)
                status = child.returncode if child.returncode >= 0 else 128 - child.returncode
                log(f"{command[0]} exited with status {status}")
        else:
            try:
                keeper.result()
            except (TunnelError, FatalTunnelError) as e:
                log(f"giving up: {e}")
                status = 1
    finally:
        for task in (keeper, stop_wait):
            task.cancel()
        if child is not None:
            await terminate(child)
        await asyncio.gather(keeper, stop_wait, return_exceptions=True)
        await tunnel.stop()
    return status


async def terminate(proc: asyncio.subprocess.Process, grace: float = _KILL_GRACE_S) -> None:
    """SIGTERM, then SIGKILL when `proc` still runs after `grace` seconds; returns once it has exited."""
    if proc.returncode is not None:
        return
    proc.terminate()
    try:
        await asyncio.wait_for(proc.wait(), grace)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()


def _child_env(opts: Options) -> dict[str, str]:
    # os.environ no longer holds the key and host key given with --key-env/--known-hosts-env (materialize)
    env = dict(os.environ, HPCHUB_TUNNEL_LOCAL=opts.local)
    if opts.hub_api_local:
        env["HPCHUB_HUB_API_LOCAL"] = _fmt(opts.hub_api_local)
    return env


def make_tunnel(opts: Options, mode: str):
    """The asyncssh client when asked for or (`auto`) importable, else OpenSSH."""
    if mode in ("auto", "asyncssh"):
        try:
            import asyncssh
        except ImportError:
            if mode == "asyncssh":
                raise
        else:
            return AsyncsshTunnel(opts, asyncssh)
    return OpensshTunnel(opts)


def parse_args(argv: list[str]) -> tuple[Options, str, list[str], "FromEnvironment"]:
    command: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, command = argv[:cut], argv[cut + 1:]
    p = argparse.ArgumentParser(prog="python -m tunnel.client", description=__doc__.split("\n\n")[0])
    p.add_argument("--gateway", type=host_port, required=True, help="the hub's tunnel gateway, HOST:PORT")
    p.add_argument("--user", required=True, help="the job's tag (the gateway's user name for this job)")
    key = p.add_mutually_exclusive_group(required=True)
    key.add_argument("--key", help="the job's private key file (mode 0600)")
    key.add_argument("--key-env", metavar="VAR", help="environment variable holding the job's private key")
    known = p.add_mutually_exclusive_group(required=True)
    known.add_argument("--known-hosts", help="known_hosts file with the gateway's host key")
    known.add_argument("--known-hosts-env", metavar="VAR", help="environment variable holding that line")
    p.add_argument("--local", type=_local_spec, required=True,
                   help="where the single-user server listens on this node: /path/to/socket, HOST:PORT, or "
                   "'auto' (a socket in a private directory)")
    p.add_argument("--hub-api-local", type=_bindable,
                   help="HOST:PORT on this node that reaches the hub API (port 0: a free one)")
    p.add_argument("--hub-api-remote", type=host_port, help="the hub API as the gateway reaches it, HOST:PORT")
    p.add_argument("--keepalive", type=float, default=15.0, help="seconds between keepalives (default 15)")
    p.add_argument("--keepalive-count", type=int, default=3, help="unanswered keepalives that drop the connection")
    p.add_argument("--connect-timeout", type=float, default=120.0,
                   help="exit 1 when the first tunnel is not up within this many seconds (default 120)")
    p.add_argument("--reconnect-timeout", type=float, default=300.0,
                   help="exit 1 when a lost tunnel is not back within this many seconds (default 300)")
    p.add_argument("--backoff-max", type=float, default=5.0, help="longest pause between attempts (default 5)")
    p.add_argument("--ssh", choices=("auto", "asyncssh", "openssh"), default="auto",
                   help="SSH client: asyncssh when importable (auto), or OpenSSH's ssh")
    a = p.parse_args(argv)
    if bool(a.hub_api_local) != bool(a.hub_api_remote):
        p.error("--hub-api-local and --hub-api-remote go together")
    if a.keepalive <= 0 or a.keepalive_count < 1 or a.connect_timeout <= 0 or a.reconnect_timeout <= 0 \
            or a.backoff_max <= 0:
        p.error("times and counts must be positive")
    if a.key:
        _check_key_file(p, a.key)
    if a.known_hosts and not os.path.isfile(a.known_hosts):
        p.error(f"--known-hosts {a.known_hosts!r} is not a file")
    for option, name in (("--key-env", a.key_env), ("--known-hosts-env", a.known_hosts_env)):
        if name and not os.environ.get(name):
            p.error(f"{option} {name}: the environment variable is not set")
    opts = Options(a.gateway, a.user, a.key or "", a.known_hosts or "", a.local, a.hub_api_local,
                   a.hub_api_remote, a.keepalive, a.keepalive_count, a.connect_timeout, a.reconnect_timeout,
                   a.backoff_max)
    return opts, a.ssh, command, FromEnvironment(a.key_env, a.known_hosts_env)


@dataclass(frozen=True)
class FromEnvironment:
    """Names of the environment variables that hold the key and the known_hosts line, if given so."""

    key: str | None = None
    known_hosts: str | None = None


def materialize(opts: Options, given: FromEnvironment, private_dir: str) -> Options:
    """Options with files for what came in environment variables, and the `--local auto` socket path, all in
    `private_dir` (mode 0700, removed at exit). The variables leave this process's environment, so that
    COMMAND (the server, its kernels) does not inherit the key."""
    def write(name: str, text: str) -> str:
        path = os.path.join(private_dir, name)
        with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
            f.write(text if text.endswith("\n") else text + "\n")
        return path
    if given.key:
        opts = replace(opts, key=write("key", os.environ.pop(given.key)))
    if given.known_hosts:
        opts = replace(opts, known_hosts=write("known_hosts", os.environ.pop(given.known_hosts)))
    if opts.local == LOCAL_AUTO:
        opts = replace(opts, local=os.path.join(private_dir, "server.sock"))
    return opts


def _check_key_file(p: argparse.ArgumentParser, path: str) -> None:
    try:
        info = os.stat(path)
    except OSError as e:
        p.error(f"--key {path!r}: {e.strerror}")
    if stat.S_IMODE(info.st_mode) & 0o077:
        p.error(f"--key {path!r} is readable by others (mode {stat.S_IMODE(info.st_mode):o}): it must be 0600")


def main(argv: list[str] | None = None) -> None:
    opts, mode, command, given = parse_args(sys.argv[1:] if argv is None else argv)
    with tempfile.TemporaryDirectory(prefix="hpchub-job-") as private_dir:     # mode 0700
        status = asyncio.run(run(materialize(opts, given, private_dir), mode, command))
    sys.exit(status)


if __name__ == "__main__":
    main()
