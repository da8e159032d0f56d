"""Runners execute scheduler commands as argv lists, never through a shell, always with a timeout."""
from __future__ import annotations

import abc
import asyncio
import os
import pwd
import re
import signal
import time
from dataclasses import dataclass
from typing import ClassVar, Mapping, Sequence

from .errors import CommandTimeout, SchedulerUnavailable

SAFE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# No leading "#" (sudo reads "-u #0" as uid 0) or "-", no whitespace, separators or path characters.
_USER_NAME = re.compile(r"[A-Za-z0-9_.][A-Za-z0-9_.@-]{0,255}\$?")


@dataclass(frozen=True)
class CommandResult:
    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str
    duration_s: float


class Runner(abc.ABC):
    @abc.abstractmethod
    async def run(self, argv: Sequence[str], *, user: str | None = None, stdin: str | None = None,
                  timeout: float = 30.0) -> CommandResult:
        """Run argv (as `user` where the runner supports it). Raises CommandTimeout or SchedulerUnavailable."""


class LocalRunner(Runner):
    """Runs commands as the hub's own user, each in a new session, with a minimal explicit environment:
    the hub's environment holds secrets and must never reach a scheduler command or a job."""

    switches_user: ClassVar[bool] = False

    def __init__(self, *, path: str = SAFE_PATH, kill_grace_s: float = 2.0) -> None:
        self.path = path
        self.kill_grace_s = kill_grace_s
        self._me = pwd.getpwuid(os.geteuid())

    def environment(self) -> Mapping[str, str]:
        return {"PATH": self.path, "LANG": "C.UTF-8", "HOME": self._me.pw_dir, "USER": self._me.pw_name}

    def command(self, argv: Sequence[str], user: str | None) -> list[str]:
        """The argv actually executed for `argv` run as `user`."""
        if user is not None and user != self._me.pw_name:
            raise ValueError(f"{type(self).__name__} runs commands as {self._me.pw_name!r} only, not {user!r}")
        return list(argv)

    async def run(self, argv: Sequence[str], *, user: str | None = None, stdin: str | None = None,
                  timeout: float = 30.0) -> CommandResult:
        if not argv:
            raise ValueError("empty argv")
        full = self.command(argv, user)
        started = time.monotonic()
        try:
            proc = await asyncio.create_subprocess_exec(
                *full, env=dict(self.environment()), start_new_session=True,
                stdin=asyncio.subprocess.DEVNULL if stdin is None else asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        except (FileNotFoundError, PermissionError) as e:
            raise SchedulerUnavailable(f"cannot run {full[0]!r}: {e.strerror} (PATH={self.path})") from e
        try:
            out, err = await asyncio.wait_for(
                proc.communicate(None if stdin is None else stdin.encode()), timeout)
        except asyncio.TimeoutError:
            await self._stop(proc)
            raise CommandTimeout(f"{' '.join(full)} did not finish within {timeout:g} s; killed") from None
        except BaseException:
            await self._stop(proc)
            raise
        assert proc.returncode is not None
        result = CommandResult(tuple(full), proc.returncode, out.decode(errors="replace"),
                               err.decode(errors="replace"), time.monotonic() - started)
        self.check(result, user)
        return result

    def check(self, result: CommandResult, user: str | None) -> None:
        """Raise when the runner itself, rather than the command, failed."""

    async def _stop(self, proc: asyncio.subprocess.Process) -> None:
        # TERM first: a sudo we may not KILL still relays TERM to its command. Then KILL what is left of
        # the group, the leader or stragglers it left behind.
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                await asyncio.wait_for(asyncio.shield(proc.wait()), self.kill_grace_s)
            except asyncio.TimeoutError:
                pass


class SudoRunner(LocalRunner):
    """Runs a command as another user through `sudo -n -H -u USER -- argv`: no shell, no -E, no password
    prompt. sudo resets the environment itself; the sudo process gets the minimal one."""

    switches_user: ClassVar[bool] = True

    def command(self, argv: Sequence[str], user: str | None) -> list[str]:
        if user is None or user == self._me.pw_name:
            return list(argv)
        if not _USER_NAME.fullmatch(user):
            raise ValueError(f"not a valid user name: {user!r}")
        return ["sudo", "-n", "-H", "-u", user, "--", *argv]

    def check(self, result: CommandResult, user: str | None) -> None:
        # sudo's own failures (no rule, password required, unknown user) exit 1 with "sudo: ..."
        if result.argv[0] == "sudo" and result.returncode == 1 and result.stderr.startswith("sudo: "):
            raise SchedulerUnavailable(f"sudo could not run {result.argv[6]!r} as {user}: {result.stderr.strip()}",
                                       result=result)
