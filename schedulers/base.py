"""The scheduler-neutral job model and the adapter interface every scheduler implements.

An adapter is a small module of differences: it turns a request into argv, and a scheduler's output into
`JobStatus`. Running commands is the runner's job; the outer methods here are shared by every adapter.
"""
from __future__ import annotations

import abc
import enum
import re
from dataclasses import dataclass, field, fields
from datetime import datetime
from typing import ClassVar, Iterable, Mapping, Sequence

from .errors import CommandTimeout, SchedulerError, SchedulerUnavailable, SubmitRejected
from .runner import CommandResult, Runner

__all__ = [
    "Adapter", "CommandResult", "CommandTimeout", "InvalidRequest", "JobRequest", "JobState", "JobStatus",
    "Associations", "PartitionInfo", "QueuePosition", "Runner",
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
class QueuePosition:
    """`position` (1 = next to start) among `pending` jobs waiting in `partition`."""

    position: int
    pending: int
    partition: str


class InvalidRequest(ValueError):
    """A request value that cannot go into a job script; names the field and what it allows."""

    def __init__(self, field: str, value: object, allowed: str):
        super().__init__(f"{field}: {value!r} is not allowed ({allowed})")
        self.field = field
        self.value = value
        self.allowed = allowed


# Values that reach directive lines: no white space, quotes, `$`, backticks, `#` or line breaks, so none
# can end a directive, start another or expand in a shell.
_WORD = (re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*"), "letters, digits and _.+- , starting with a letter or digit")
_CONSTRAINT = (re.compile(r"[A-Za-z0-9_.:,&|()\[\]*+-]+"), "node features with the operators & | , : * () []")
_PATH = (re.compile(r"/[A-Za-z0-9_.%@+~=/-]*"), "an absolute path of letters, digits and _.%@+~=/-")
_VALIDATED = {
    "name": _WORD, "tag": _WORD, "partition": _WORD, "gpu_type": _WORD, "parallel_environment": _WORD, "account": _WORD, "qos": _WORD, "reservation": _WORD,
    "constraint": _CONSTRAINT, "workdir": _PATH, "output": _PATH, "error": _PATH,
}
_AT_LEAST = {"cores": 1, "nodes": 1, "gpus": 0, "memory_mb": 1, "walltime_s": 1, "signal_before_end_s": 1}


@dataclass(frozen=True)
class JobRequest:
    """What a job needs, in no scheduler's syntax. Construction validates every value (InvalidRequest).

    `env_setup` (shell lines run before the server) and `extra_directives` are the admin's: placed as
    written, one line each."""

    name: str
    tag: str
    cores: int = 1
    nodes: int = 1
    memory_mb: int | None = None
    gpus: int = 0
    #: a GPU model the scheduler knows (Slurm gres type); None = any
    gpu_type: str | None = None
    walltime_s: int | None = None
    partition: str | None = None
    #: Grid Engine parallel environment for multi-core jobs; None = the template's choice
    parallel_environment: str | None = None
    account: str | None = None
    qos: str | None = None
    reservation: str | None = None
    constraint: str | None = None
    workdir: str | None = None
    output: str | None = None
    error: str | None = None
    env_setup: tuple[str, ...] = ()
    extra_directives: tuple[str, ...] = ()
    #: ask the scheduler to signal the job this many seconds before its walltime ends, so that the server
    #: shuts down cleanly (where the scheduler can: Slurm --signal, Grid Engine s_rt)
    signal_before_end_s: int | None = None

    def __post_init__(self) -> None:
        for item in fields(self):
            value = getattr(self, item.name)
            if item.name in _VALIDATED and value is not None:
                pattern, allowed = _VALIDATED[item.name]
                if not isinstance(value, str) or not pattern.fullmatch(value):
                    raise InvalidRequest(item.name, value, allowed)
            elif item.name in _AT_LEAST and value is not None:
                if not isinstance(value, int) or isinstance(value, bool) or value < _AT_LEAST[item.name]:
                    raise InvalidRequest(item.name, value, f"a whole number >= {_AT_LEAST[item.name]}")
            elif item.name in ("env_setup", "extra_directives"):
                for line in value:
                    if not isinstance(line, str) or any(c in line for c in "\r\n\0"):
                        raise InvalidRequest(item.name, line, "one line of text per entry")


@dataclass(frozen=True)
class JobStatus:
    job_id: str
    state: JobState
    native_state: str = ""
    reason: str = ""
    nodes: tuple[str, ...] = ()
    exit_code: int | None = None
    #: the scheduler's own estimate of when a pending job starts, where it gives one
    estimated_start: datetime | None = None


@dataclass(frozen=True)
class PartitionInfo:
    """A partition (Slurm) or queue (Grid Engine, PBS) and its limits, as the scheduler reports them now.

    None means the scheduler sets no limit. Per-node figures are those of the largest node in it."""

    name: str
    default: bool = False
    #: "up", "down", "drain", "inactive": whether jobs submitted now can start
    state: str = "up"
    max_walltime_s: int | None = None
    default_walltime_s: int | None = None
    max_nodes: int | None = None
    max_cores_per_node: int | None = None
    max_memory_mb_per_node: int | None = None
    #: GPU type -> most GPUs of that type on one node; "" -> most GPUs of any type on one node (the bound for
    #: a request that names no type). Empty: no GPUs.
    gpus: Mapping[str, int] = field(default_factory=dict)
    nodes_total: int = 0
    nodes_idle: int = 0
    #: Grid Engine parallel environments the queue accepts
    parallel_environments: tuple[str, ...] = ()
    #: accounts / groups the scheduler restricts the partition to; () = everyone
    allowed_accounts: tuple[str, ...] = ()
    allowed_groups: tuple[str, ...] = ()


@dataclass(frozen=True)
class Associations:
    """What the scheduler's accounting lets one user charge: accounts and QOS (Slurm `sacctmgr`)."""

    user: str
    accounts: tuple[str, ...] = ()
    default_account: str | None = None
    qos: tuple[str, ...] = ()
    default_qos: str | None = None


class Adapter(abc.ABC):
    """One scheduler. Subclasses set `name`, `template`, `job_id_pattern` and `submit_command` and implement the
    small steps."""

    name: ClassVar[str]
    template: ClassVar[str]
    #: native state -> JobState; anything missing maps to UNKNOWN
    state_map: ClassVar[Mapping[str, JobState]] = {}
    #: a job id as the submit command prints it
    job_id_pattern: ClassVar[re.Pattern[str]]
    #: how messages name the submit command, and what it reaches
    submit_command: ClassVar[str]
    server: ClassVar[str] = "the scheduler"
    #: what a command prints when it cannot reach the scheduler
    unreachable: ClassVar[tuple[str, ...]] = ()
    #: how messages name this scheduler's job ids ("Slurm"). Where set, an id that is not `job_id_pattern` reaches
    #: no command: a query reports it UNKNOWN, a cancel refuses it.
    id_label: ClassVar[str | None] = None

    def __init__(self, runner: Runner, *, command_timeout: float = 30.0):
        self.runner = runner
        self.command_timeout = command_timeout

    async def submit(self, script: str, request: JobRequest, *, user: str | None = None) -> str:
        """Submit `script` (passed on stdin, never argv) and return the job id.

        When the answer is lost (timeout, scheduler unreachable) the job may exist all the same: it is
        looked up by its tag, so that a caller's retry never submits it twice."""
        try:
            result = await self._run(self.submit_argv(request), user=user, stdin=script)
            self.check_submit(result)
        except SchedulerUnavailable:
            found = await self.find_by_tag(request.tag)
            if len(found) == 1:
                return found[0]
            raise
        return self.parse_submit(result.stdout)

    async def query(self, job_ids: Iterable[str]) -> dict[str, JobStatus]:
        """Status of many jobs in one scheduler call.

        A job the scheduler does not report, an id that is not one of its job ids, or a query that failed, is
        UNKNOWN (with the reason): only positive evidence makes a job gone."""
        ids = list(dict.fromkeys(job_ids))
        valid = [i for i in ids if self._is_job_id(i)]
        statuses: dict[str, JobStatus] = {}
        if valid:
            try:
                result = await self._run(self.query_argv(valid))
                statuses = self.parse_query(result, valid)
            except SchedulerUnavailable as err:
                reason = f"scheduler unavailable: {err.reason}"
                statuses = {i: JobStatus(i, JobState.UNKNOWN, reason=reason) for i in valid}
        return {i: statuses.get(i) or JobStatus(i, JobState.UNKNOWN, reason=self._not_a_job_id(i)) for i in ids}

    async def estimate_start(self, job_ids: Iterable[str]) -> dict[str, datetime | None]:
        """The scheduler's own estimate of when each pending job starts; None where it has none.

        Costly on some schedulers: ask on demand and cache, not on every poll. This default knows none."""
        return dict.fromkeys(job_ids)

    async def queue_position(self, job_id: str) -> QueuePosition | None:
        """Where a pending job stands among the pending jobs of its partition, in the scheduler's priority
        order; None where the scheduler does not say. One call, on demand. This default knows none."""
        return None

    async def partitions(self) -> list[PartitionInfo]:
        """Every partition/queue with its limits and idle nodes, in one or two scheduler calls.
        Uncached: callers cache (`schedulers.limits`)."""
        raise NotImplementedError(f"{self.name} does not report its partitions")

    async def associations(self, user: str) -> Associations | None:
        """The accounts and QOS `user` may use; None where the scheduler keeps no accounting."""
        return None

    async def find_by_tag(self, tag: str) -> list[str]:
        """Ids of the jobs carrying `tag`; [] when the scheduler cannot be asked."""
        try:
            result = await self._run(self.tag_query_argv(tag))
            return self.parse_tag_query(result, tag)
        except SchedulerUnavailable:
            return []

    async def cancel(self, job_ids: Iterable[str], *, user: str | None = None) -> None:
        """Cancel many jobs in one call. Cancelling a job that already ended is not an error."""
        ids = list(dict.fromkeys(job_ids))
        if not ids:
            return
        result = await self._run(self.cancel_argv(ids), user=user)
        self.check_cancel(result, ids)

    def _is_job_id(self, job_id: str) -> bool:
        return self.id_label is None or self.job_id_pattern.fullmatch(job_id) is not None

    def _not_a_job_id(self, job_id: str) -> str:
        return "" if self._is_job_id(job_id) else f"not a {self.id_label} job id"

    async def _run(self, argv: Sequence[str], *, user: str | None = None, stdin: str | None = None) -> CommandResult:
        return await self.runner.run(argv, user=user, stdin=stdin, timeout=self.command_timeout)

    @abc.abstractmethod
    def submit_argv(self, request: JobRequest) -> list[str]: ...

    @abc.abstractmethod
    def query_argv(self, job_ids: Sequence[str]) -> list[str]: ...

    @abc.abstractmethod
    def parse_query(self, result: CommandResult, job_ids: Sequence[str]) -> dict[str, JobStatus]:
        """Raise SchedulerUnavailable when the output says nothing reliable about the jobs."""

    @abc.abstractmethod
    def cancel_argv(self, job_ids: Sequence[str]) -> list[str]: ...

    @abc.abstractmethod
    def tag_query_argv(self, tag: str) -> list[str]:
        """A command listing the jobs that carry `tag` (the template puts it in the job's name or comment)."""

    @abc.abstractmethod
    def parse_tag_query(self, result: CommandResult, tag: str) -> list[str]: ...

    def parse_submit(self, stdout: str) -> str:
        """The job id, which the submit command printed alone."""
        job_id = stdout.strip()
        if not self.job_id_pattern.fullmatch(job_id):
            raise SchedulerError(f"{self.submit_command} printed no job id: {stdout!r}")
        return job_id

    def check_submit(self, result: CommandResult) -> None:
        """Raise SubmitRejected when the scheduler refused the job; SchedulerUnavailable when it was not asked (the
        job may exist all the same: `submit` looks for its tag)."""
        if result.returncode == 0:
            return
        message = self.submit_error(result.stderr) or result.stdout.strip()
        if self.cannot_reach(result):
            raise SchedulerUnavailable(f"{self.name}: {self.submit_command} could not reach {self.server}: {message}",
                                       reason=message, result=result)
        raise SubmitRejected(f"{self.name} refused the job: {message}", reason=message, result=result)

    def submit_error(self, stderr: str) -> str:
        """Why the submit command failed, from its stderr without the command's own frame."""
        return stderr.strip()

    def cannot_reach(self, result: CommandResult) -> bool:
        """The command's output says that it could not reach the scheduler."""
        return any(text in result.stderr or text in result.stdout for text in self.unreachable)

    def checked_ids(self, job_ids: Sequence[str]) -> Sequence[str]:
        """`job_ids`, for a command's argv, when each is a job id: ValueError otherwise."""
        bad = [i for i in job_ids if not self._is_job_id(i)]
        if bad:
            raise ValueError(f"not {self.id_label} job ids: {bad}")
        return job_ids

    def check_cancel(self, result: CommandResult, job_ids: Sequence[str]) -> None:
        if result.returncode != 0:
            raise SchedulerError(f"{self.name}: cancel of {', '.join(job_ids)} failed: {result.stderr.strip()}",
                                 result=result)
