"""Small helpers shared by the test modules: polling, process liveness, a runner that records commands."""
from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path
from typing import Awaitable, Callable, Sequence, TypeVar

from job_templates import render_env_file
from schedulers import CommandResult, JobStatus, Runner

T = TypeVar("T")


class CountingRunner(Runner):
    """Records every command the adapter runs, to prove that many jobs cost one scheduler call."""

    def __init__(self, inner: Runner):
        self.inner = inner
        self.calls: list[tuple[str, ...]] = []

    async def run(self, argv: Sequence[str], *, user: str | None = None, stdin: str | None = None,
                  timeout: float = 30.0) -> CommandResult:
        self.calls.append(tuple(argv))
        return await self.inner.run(argv, user=user, stdin=stdin, timeout=timeout)

    def count(self, command: str) -> int:
        """How many recorded commands ran the program `command`."""
        return sum(1 for argv in self.calls if argv[0] == command)


async def wait_until(check: Callable[[], Awaitable[dict[str, JobStatus]]],
                     done: Callable[[dict[str, JobStatus]], bool], timeout: float = 30.0,
                     interval: float = 0.1) -> dict[str, JobStatus]:
    """Await `check` every `interval` seconds until `done` accepts its statuses; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        statuses = await check()
        if done(statuses):
            return statuses
        assert time.monotonic() < deadline, f"no success within {timeout} s; last: {statuses}"
        await asyncio.sleep(interval)


def alive(pid: int) -> bool:
    """Running and not a zombie: kill -0 succeeds on zombies."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


def wait_for(check: Callable[[], T], timeout: float, what: str, interval: float = 0.2) -> T:
    """Poll `check` until it returns something truthy and return that; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def env_file(directory: Path, env: dict[str, str], owner: str = "alice") -> str:
    """Write a job environment file as the spawner does (0600, the job user's) and return its path."""
    path = directory / "job.env"
    path.write_text(render_env_file(env))
    path.chmod(0o600)
    shutil.chown(path, owner)
    return str(path)
