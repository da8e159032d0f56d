"""SSHRunner: scheduler commands on a submit host over SSH (asyncssh), through one pooled connection.

The model: the hub logs in as one service account on the submit host, with a key, the host's key checked
against a known_hosts file (there is no way to turn that check off), and runs a user's commands there
through `sudo -n -H -u USER --`, exactly like SudoRunner does locally. One key serves every user; the
sudoers rule on the submit host decides which commands the account may run as whom (docs/runners.md).
"""
from __future__ import annotations

import asyncio
import os
import shlex
import time
from typing import ClassVar, Sequence, Union

import asyncssh

from .errors import CommandTimeout, SchedulerUnavailable
from .runner import _USER_NAME, CommandResult, Runner

PathArg = Union[str, "os.PathLike[str]"]
# tries to open a command's channel: enough for sshd to free a session slot (backing off 0.02 s to 1.3 s)
_OPEN_ATTEMPTS = 7


class SSHRunner(Runner):
    """Runs argv on `host` as the service account `username`, or as another user through sudo there.

    Commands share one SSH connection, each a channel on it, at most `max_sessions` at once: keep that a
    little below the server's MaxSessions (10 by default), as sshd frees a session only once it has reaped
    its command. A dead connection is replaced by the next command; after a failed attempt the next one
    waits `backoff_s[0]` seconds, doubling up to `backoff_s[1]`, and commands in between fail at once with
    the last error. The hub's environment is never sent; no agent, no ~/.ssh/config and no authentication
    but the keys (read once, here) are used."""

    switches_user: ClassVar[bool] = True

    def __init__(self, host: str, *, username: str, client_keys: PathArg | Sequence[PathArg],
                 known_hosts: PathArg | None, port: int = 22, connect_timeout: float = 10.0,
                 keepalive_interval: float = 15.0, keepalive_count_max: int = 3, max_sessions: int = 8,
                 kill_grace_s: float = 2.0, backoff_s: tuple[float, float] = (1.0, 30.0)) -> None:
        if not known_hosts:
            raise ValueError("SSHRunner needs known_hosts: a known_hosts file holding the submit host's key "
                             "(host-key checking cannot be turned off)")
        if not os.path.isfile(known_hosts):
            raise ValueError(f"SSHRunner known_hosts {os.fspath(known_hosts)!r} is not a file")
        try:
            asyncssh.read_known_hosts(os.fspath(known_hosts))
        except (OSError, ValueError) as e:
            raise ValueError(f"SSHRunner known_hosts {os.fspath(known_hosts)!r} cannot be read: {e}") from e
        if not _USER_NAME.fullmatch(username):
            raise ValueError(f"not a valid user name: {username!r}")
        paths = [client_keys] if isinstance(client_keys, (str, os.PathLike)) else list(client_keys)
        if not paths:
            raise ValueError("SSHRunner needs client_keys: the service account's private key file(s)")
        try:
            self._keys = [asyncssh.read_private_key(os.fspath(path)) for path in paths]
        except (OSError, ValueError) as e:  # missing, unreadable, not a key, or protected by a passphrase
            raise ValueError(f"SSHRunner client_keys: {e}") from e
        if max_sessions < 1:
            raise ValueError(f"max_sessions must be >= 1, not {max_sessions}")
        self.host = host
        self.port = port
        self.username = username
        self.known_hosts = os.fspath(known_hosts)
        self.connect_timeout = connect_timeout
        self.keepalive_interval = keepalive_interval
        self.keepalive_count_max = keepalive_count_max
        self.kill_grace_s = kill_grace_s
        self.backoff_s = backoff_s
        self.where = f"{username}@{host}:{port}"
        self._conn: asyncssh.SSHClientConnection | None = None
        # held while connecting, so that concurrent first commands open one connection, not one each
        self._lock = asyncio.Lock()
        self._max_sessions = max_sessions
        self._sessions = asyncio.Semaphore(max_sessions)
        self._failures = 0
        self._retry_at = 0.0
        self._last_error = ""

    def command(self, argv: Sequence[str], user: str | None) -> list[str]:
        """The argv actually executed on the submit host for `argv` run as `user`."""
        if any("\0" in word for word in argv):
            raise ValueError("argv words cannot contain NUL")
        if argv[0].startswith("-"):  # the remote shell's `exec` would take it for an option
            raise ValueError(f"not a command: {argv[0]!r}")
        if user is None or user == self.username:
            return list(argv)
        if not _USER_NAME.fullmatch(user):
            raise ValueError(f"not a valid user name: {user!r}")
        return ["sudo", "-n", "-H", "-u", user, "--", *argv]

    async def run(self, argv: Sequence[str], *, user: str | None = None, stdin: str | None = None,
                  timeout: float = 30.0) -> CommandResult:
        if not argv:
            raise ValueError("empty argv")
        full = self.command(argv, user)
        # The one place hpchub builds a command line. SSH has no argv on the wire: an exec request carries
        # one string, which the account's login shell on the submit host parses (so it must be a POSIX
        # shell: sh, dash, bash). shlex.join single-quotes every word, so each arrives as exactly one
        # argument, verbatim: nothing in it is expanded, split or globbed.
        line = shlex.join(full)
        started = time.monotonic()
        try:
            returncode, out, err = await asyncio.wait_for(self._execute(line, stdin), timeout)
        except asyncio.TimeoutError:
            raise CommandTimeout(f"{line} on {self.where} did not finish within {timeout:g} s; "
                                 "signalled and closed") from None
        result = CommandResult(tuple(full), returncode, out, err, time.monotonic() - started)
        self.check(result, user)
        return result

    def check(self, result: CommandResult, user: str | None) -> None:
        """Raise when the remote shell or sudo, rather than the command, failed."""
        if result.argv[0] == "sudo" and result.returncode == 1 and result.stderr.startswith("sudo: "):
            raise SchedulerUnavailable(f"sudo on {self.host} could not run {result.argv[6]!r} as {user}: "
                                       f"{result.stderr.strip()}", result=result)
        if result.argv[0] != "sudo" and result.returncode in (126, 127):  # the shell's "cannot execute" codes
            raise SchedulerUnavailable(f"cannot run {result.argv[0]!r} on {self.where}: {result.stderr.strip()}",
                                       result=result)

    async def close(self) -> None:
        """Close the pooled connection; the next command opens a new one."""
        async with self._lock:
            conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
            await conn.wait_closed()

    async def _execute(self, line: str, stdin: str | None) -> tuple[int, str, str]:
        async with self._sessions:
            process = await self._start(line, stdin)
            try:
                if stdin is not None:
                    process.stdin.write(stdin)
                    process.stdin.write_eof()
                out, err = await process.communicate()
            except (asyncssh.Error, OSError) as e:
                raise SchedulerUnavailable(f"SSH to {self.where} failed during {line!r}: {_reason(e)}") from e
            except BaseException:  # the timeout, or the caller gave up: the command must not outlive it
                await self._stop(process)
                raise
            finally:
                process.close()
        if process.returncode is None:
            raise SchedulerUnavailable(f"SSH to {self.where}: the connection ended before {line!r} reported "
                                       f"an exit status; stderr: {err.strip()}")
        return process.returncode, out, err

    async def _start(self, line: str, stdin: str | None) -> asyncssh.SSHClientProcess:
        attempt, delay = 1, 0.02
        while True:
            conn = await self._connection()
            try:
                # `exec`: the command replaces the shell as the session's leader, the process whose group
                # sshd signals on a timeout (a shell that TERM ended would leave the rest out of reach)
                return await conn.create_process(f"exec {line}", encoding="utf-8", errors="replace",
                                                 stdin=asyncssh.DEVNULL if stdin is None else asyncssh.PIPE)
            except asyncssh.ChannelOpenError as e:
                # The channel never opened, so the command never started: trying again is safe. Either
                # the pooled connection had died (a new one opens now), or sshd had no session free yet
                # (it frees one only once it has reaped the command that held it; it says "open failed").
                if attempt == _OPEN_ATTEMPTS:
                    raise SchedulerUnavailable(
                        f"SSH to {self.where} could not start {line!r}: {_reason(e)}, {attempt} times (is sshd's "
                        f"MaxSessions below max_sessions, {self._max_sessions}?)") from e
            except (asyncssh.Error, OSError) as e:
                raise SchedulerUnavailable(f"SSH to {self.where} could not start {line!r}: {_reason(e)}") from e
            if not conn.is_closed():
                await asyncio.sleep(delay)
                delay *= 2
            attempt += 1

    async def _stop(self, process: asyncssh.SSHClientProcess) -> None:
        # sshd delivers the signal to the command's process group as the service account: TERM reaches
        # sudo, which relays it to the user's command; KILL then takes whatever of the group is left.
        for signal in ("TERM", "KILL"):
            try:
                process.send_signal(signal)
            except OSError:  # the channel has closed: the command is gone
                return
            try:
                await asyncio.wait_for(asyncio.shield(process.wait_closed()), self.kill_grace_s)
                return
            except asyncio.TimeoutError:
                pass

    async def _connection(self) -> asyncssh.SSHClientConnection:
        async with self._lock:
            if self._conn is not None and not self._conn.is_closed():
                return self._conn
            self._conn = None
            wait = self._retry_at - time.monotonic()
            if wait > 0:
                raise SchedulerUnavailable(f"{self._last_error} (next attempt in {wait:.1f} s)")
            try:
                self._conn = await self._connect()
            except SchedulerUnavailable as e:
                self._failures += 1
                self._last_error = str(e)
                self._retry_at = time.monotonic() + min(self.backoff_s[1],
                                                        self.backoff_s[0] * 2 ** (self._failures - 1))
                raise
            self._failures = 0
            return self._conn

    async def _connect(self) -> asyncssh.SSHClientConnection:
        try:
            return await asyncssh.connect(
                self.host, self.port, username=self.username, known_hosts=self.known_hosts,
                client_keys=self._keys, preferred_auth="publickey", password_auth=False, kbdint_auth=False,
                host_based_auth=False, gss_host=None, agent_path=None, agent_forwarding=False,
                # only known_hosts vouches for the host: no ~/.ssh/config, no X.509 trust from ~/.ssh
                config=[], x509_trusted_certs=None, x509_trusted_cert_paths=None,
                env=None, send_env=None, request_pty=False,
                connect_timeout=self.connect_timeout, keepalive_interval=self.keepalive_interval,
                keepalive_count_max=self.keepalive_count_max)
        except asyncssh.HostKeyNotVerifiable as e:
            raise SchedulerUnavailable(
                f"SSH host key of {self.host}:{self.port} does not match {self.known_hosts} (the host key "
                f"changed, or the file has no entry for this host): not connecting ({_reason(e)})") from e
        except asyncssh.PermissionDenied as e:
            raise SchedulerUnavailable(f"SSH login as {self.where} refused ({_reason(e)}): is the key in "
                                       "the service account's authorized_keys?") from e
        except asyncio.TimeoutError as e:
            raise SchedulerUnavailable(f"SSH connection to {self.where} timed out after "
                                       f"{self.connect_timeout:g} s") from e
        except (asyncssh.Error, OSError) as e:
            raise SchedulerUnavailable(f"SSH connection to {self.where} failed: {_reason(e)}") from e


def _reason(error: Exception) -> str:
    return getattr(error, "reason", "") or str(error) or type(error).__name__
