"""The scheduler-neutral job model and the adapter interface every scheduler implements.

An adapter is a small module of differences: it turns a request into argv, and a scheduler's output into
`JobStatus`. Running commands is the runner's job; the outer methods here are shared by every adapter.
"""
from __future__ import annotations

import abc
import enum
from dataclasses import dataclass
from typing import ClassVar, Iterable, Mapping, Sequence

from .errors import CommandTimeout, SchedulerError, SchedulerUnavailable, SubmitRejected
from .runner import CommandResult, Runner

__all__ = [
    "Adapter", "CommandResult", "CommandTimeout", "JobRequest", "JobState", "JobStatus", "Runner",
    "SchedulerError", "SchedulerUnavailable", "SubmitRejected",
]


class JobState(str, enum.Enum):
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    COMPLETING = "COMPLETING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    TIMEOUT = "TIMEOUT"
    UNKNOWN = "UNKNOWN"

    @property
    def is_terminal(self) -> bool:
        """The job has ended for good; it will never run (again)."""
        return self in _TERMINAL


_TERMINAL = {JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED, JobState.TIMEOUT}


@dataclass(frozen=True)
class JobRequest:
    """What a job needs, in no scheduler's syntax. Values are validated before they get here."""

    name: str
    tag: str
    cores: int = 1
    nodes: int = 1
    memory_mb: int | None = None
    gpus: int = 0
    walltime_s: int | None = None
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    reservation: str | None = None
    constraint: str | None = None
    workdir: str | None = None
    output: str | None = None
    error: str | None = None
    env_setup: tuple[str, ...] = ()
    extra_directives: tuple[str, ...] = ()


@dataclass(frozen=True)
class JobStatus:
    job_id: str
    state: JobState
    native_state: str = ""
    reason: str = ""
    nodes: tuple[str, ...] = ()
    exit_code: int | None = None


class Adapter(abc.ABC):
    """One scheduler. Subclasses set `name` and `template` and implement the small steps."""

    name: ClassVar[str]
    template: ClassVar[str]
    #: native state -> JobState; anything missing maps to UNKNOWN
    state_map: ClassVar[Mapping[str, JobState]] = {}

    def __init__(self, runner: Runner, *, command_timeout: float = 30.0):
        self.runner = runner
        self.command_timeout = command_timeout

    async def submit(self, script: str, request: JobRequest, *, user: str | None = None) -> str:
        """Submit `script` (passed on stdin, never argv) and return the job id."""
        result = await self._run(self.submit_argv(request), user=user, stdin=script)
        self.check_submit(result)
        return self.parse_submit(result.stdout)

    async def query(self, job_ids: Iterable[str]) -> dict[str, JobStatus]:
        """Status of many jobs in one scheduler call. A job the scheduler does not report is UNKNOWN."""
        ids = list(dict.fromkeys(job_ids))
        if not ids:
            return {}
        result = await self._run(self.query_argv(ids))
        statuses = self.parse_query(result, ids)
        return {i: statuses.get(i, JobStatus(i, JobState.UNKNOWN)) for i in ids}

    async def cancel(self, job_ids: Iterable[str], *, user: str | None = None) -> None:
        """Cancel many jobs in one call. Cancelling a job that already ended is not an error."""
        ids = list(dict.fromkeys(job_ids))
        if not ids:
            return
        result = await self._run(self.cancel_argv(ids), user=user)
        self.check_cancel(result, ids)

    async def _run(self, argv: Sequence[str], *, user: str | None = None, stdin: str | None = None) -> CommandResult:
        return await self.runner.run(argv, user=user, stdin=stdin, timeout=self.command_timeout)

    @abc.abstractmethod
    def submit_argv(self, request: JobRequest) -> list[str]: ...

    @abc.abstractmethod
    def parse_submit(self, stdout: str) -> str: ...

    @abc.abstractmethod
    def query_argv(self, job_ids: Sequence[str]) -> list[str]: ...

    @abc.abstractmethod
    def parse_query(self, result: CommandResult, job_ids: Sequence[str]) -> dict[str, JobStatus]:
        """Raise SchedulerUnavailable when the output says nothing reliable about the jobs."""

    @abc.abstractmethod
    def cancel_argv(self, job_ids: Sequence[str]) -> list[str]: ...

    def check_submit(self, result: CommandResult) -> None:
        """Raise SubmitRejected when the scheduler refused the job; SchedulerUnavailable when it was not asked."""
        if result.returncode != 0:
            message = result.stderr.strip() or result.stdout.strip()
            raise SubmitRejected(f"{self.name} refused the job: {message}", reason=message, result=result)

    def check_cancel(self, result: CommandResult, job_ids: Sequence[str]) -> None:
        if result.returncode != 0:
            raise SchedulerError(f"{self.name}: cancel of {', '.join(job_ids)} failed: {result.stderr.strip()}",
                                 result=result)
