"""Small helpers shared by the test modules: polling, process liveness, a runner that records commands, jobs
cleaned up after a test, a submit whose answer is lost."""
from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import shutil
import subprocess
import time
from pathlib import Path
from typing import Awaitable, Callable, Iterator, Sequence, TypeVar

import pytest

from job_templates import render_env_file, render_job_script
from schedulers import (Adapter, CommandResult, JobRequest, JobState, JobStatus, Runner, SchedulerError,
                        SchedulerUnavailable, SubmitRejected)

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


class CountedQuery:
    """`adapter.query(ids)` for wait_until, counting its calls in `calls`; `ids` may grow meanwhile."""

    def __init__(self, adapter: Adapter, ids: list[str]):
        self.adapter, self.ids, self.calls = adapter, ids, 0

    async def __call__(self) -> dict[str, JobStatus]:
        self.calls += 1
        return await self.adapter.query(self.ids)


def ended(*ids: str) -> Callable[[dict[str, JobStatus]], bool]:
    """For wait_until: all these jobs have ended."""
    return lambda statuses: all(statuses[i].state.is_terminal for i in ids)


def cancelled_at_end(*cancel: str, timeout: float = 30) -> Iterator[list[str]]:
    """For a fixture to yield from: a list for the ids a test submits; `cancel IDS...` ends those left at the end."""
    ids: list[str] = []
    yield ids
    if ids:
        subprocess.run([*cancel, *ids], capture_output=True, timeout=timeout)


async def submit_with_lost_answer(adapter: Adapter, request: JobRequest, command: list[str], jobs: list[str]) -> str:
    """Submit `command` as alice, rendered from the adapter's template, through `adapter.runner`: a CountingRunner
    whose submit command submits for real, then never answers. The adapter must find the job by its tag within its
    command timeout, the kill's grace and one lookup. Returns the job id, also appended to `jobs`."""
    counting = adapter.runner
    assert isinstance(counting, CountingRunner)
    script = render_job_script(adapter.template, request, user="alice", env_file="/dev/null", command=command)
    started = time.monotonic()
    job_id = await adapter.submit(script, request, user="alice")
    jobs.append(job_id)
    assert time.monotonic() - started < adapter.command_timeout + 2 + 1  # the timeout, the kill's grace, one lookup
    assert counting.calls == [tuple(adapter.submit_argv(request)), tuple(adapter.tag_query_argv(request.tag))]
    assert job_id.isdigit() and await adapter.find_by_tag(request.tag) == [job_id]
    assert (await adapter.query([job_id]))[job_id].state in (JobState.PENDING, JobState.RUNNING)
    return job_id


async def submit_refused(adapter: Adapter, script: str, request: JobRequest,
                         match: str | None = None) -> SubmitRejected:
    """alice's submit of `script` is refused by the scheduler (SubmitRejected matching `match`)."""
    with pytest.raises(SubmitRejected, match=match) as error:
        await adapter.submit(script, request, user="alice")
    return error.value


async def cancel_refused(adapter: Adapter, job_ids: list[str], match: str | None = None) -> SchedulerError:
    """alice's cancel of `job_ids` fails with the scheduler's refusal (matching `match`), not as an outage."""
    with pytest.raises(SchedulerError, match=match) as error:
        await adapter.cancel(job_ids, user="alice")
    assert not isinstance(error.value, SchedulerUnavailable)
    return error.value


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


SLURM_CLUSTER_SH = Path(__file__).resolve().parents[1] / "docker" / "slurm-cluster" / "cluster.sh"
SLURMCTLD_PID = Path("/run/slurm/slurmctld.pid")


@contextlib.contextmanager
def controller_stopped() -> Iterator[None]:
    """slurmctld stopped, the way cluster.sh stops it, for the block only. Other tests share the cluster:
    keep the block short; cluster.sh starts slurmctld again whatever happens, and both nodes must be back."""
    pid = int(SLURMCTLD_PID.read_text())
    assert Path(f"/proc/{pid}/comm").read_text().strip() == "slurmctld", f"stale {SLURMCTLD_PID}"
    try:
        os.kill(pid, signal.SIGTERM)
        wait_for(lambda: not alive(pid), 15, "slurmctld to stop")
        yield
    finally:
        # not its exit status: cluster.sh fails when backfill holds a node "planned" for a pending job
        started = subprocess.run([str(SLURM_CLUSTER_SH), "start"], stdin=subprocess.DEVNULL, capture_output=True,
                                 text=True, timeout=120)
        wait_for(_cluster_ready, 30, f"slurmctld and both nodes back; cluster.sh start said: {started.stderr}")


def _cluster_ready() -> bool:
    """slurmctld answers and both nodes respond (planned: reserved by backfill for a pending job)."""
    ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=15).stdout
    nodes = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True, text=True, timeout=15).stdout
    states = dict(line.split() for line in nodes.splitlines())
    return "is UP" in ping and all(states.get(n) in ("idle", "mix", "alloc", "plnd") for n in ("c1", "c2"))
