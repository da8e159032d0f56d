"""The embedded default scheduler: jobs are local processes managed by `localq`, through the same
template, submit, query and cancel lifecycle as a real batch system."""
from __future__ import annotations

import json
import os
import re
import stat
import sys
import tempfile
from typing import ClassVar, Mapping, Sequence

from .base import Adapter, JobRequest, JobState, JobStatus, PartitionInfo, SchedulerUnavailable
from .runner import CommandResult, Runner

DEFAULT_SPOOL = os.path.join(tempfile.gettempdir(), "hpchub-localq")
# localq's exit status for a script it refused, apart from failures of localq itself. Defined here, not in
# localq, so that importing the package does not import localq before `python -m` runs it.
REJECTED = 2
#: localq's one queue, as partitions() names it
QUEUE = "local"


class LocalAdapter(Adapter):
    name: ClassVar[str] = "local"
    template: ClassVar[str] = "local.sh.j2"
    job_id_pattern: ClassVar[re.Pattern[str]] = re.compile(r"[0-9]+")
    submit_command: ClassVar[str] = "localq submit"
    state_map: ClassVar[Mapping[str, JobState]] = {
        "PENDING": JobState.PENDING,
        "RUNNING": JobState.RUNNING,
        "COMPLETING": JobState.COMPLETING,
        "COMPLETED": JobState.COMPLETED,
        "FAILED": JobState.FAILED,
        "CANCELLED": JobState.CANCELLED,
        "TIMEOUT": JobState.TIMEOUT,
    }

    def __init__(self, runner: Runner, *, spool_dir: str | os.PathLike[str] = DEFAULT_SPOOL,
                 python: str = sys.executable, kill_grace_s: float = 5.0, command_timeout: float = 30.0):
        super().__init__(runner, command_timeout=command_timeout)
        self.spool_dir = os.path.abspath(spool_dir)
        self.python = python
        self.kill_grace_s = kill_grace_s
        ensure_spool(self.spool_dir)

    def _localq(self, command: str, *args: str) -> list[str]:
        return [self.python, "-m", f"{__package__}.localq", command, "--spool", self.spool_dir, *args]

    def submit_argv(self, request: JobRequest) -> list[str]:
        return self._localq("submit", "--grace", f"{self.kill_grace_s:g}")

    def check_submit(self, result: CommandResult) -> None:
        if result.returncode == REJECTED:
            super().check_submit(result)
        elif result.returncode != 0:
            raise SchedulerUnavailable(f"localq submit failed: {result.stderr.strip()}", result=result)

    async def partitions(self) -> list[PartitionInfo]:
        """localq's one queue: this machine, its CPUs and memory, no time limit. localq starts every job at
        once, so the machine always counts as an idle node. No command: the jobs run on the hub's own host."""
        memory_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 1024 ** 2
        return [PartitionInfo(name=QUEUE, default=True, max_nodes=1, max_cores_per_node=len(os.sched_getaffinity(0)),
                              max_memory_mb_per_node=memory_mb, nodes_total=1, nodes_idle=1)]

    def tag_query_argv(self, tag: str) -> list[str]:
        return self._localq("find", "--comment", tag)

    def parse_tag_query(self, result: CommandResult, tag: str) -> list[str]:
        if result.returncode != 0:
            raise SchedulerUnavailable(f"localq find failed: {result.stderr.strip()}", result=result)
        return result.stdout.split()

    def query_argv(self, job_ids: Sequence[str]) -> list[str]:
        return self._localq("query", "--", *job_ids)

    def parse_query(self, result: CommandResult, job_ids: Sequence[str]) -> dict[str, JobStatus]:
        if result.returncode != 0:
            raise SchedulerUnavailable(f"localq query failed: {result.stderr.strip()}", result=result)
        statuses = {}
        for line in result.stdout.splitlines():
            try:
                job = json.loads(line)
                native = job["state"]
                statuses[job["id"]] = JobStatus(
                    job["id"], self.state_map.get(native, JobState.UNKNOWN), native_state=native,
                    reason=job["reason"], nodes=(job["node"],) if job["node"] else (),
                    exit_code=job["exit_code"])
            except (ValueError, KeyError, TypeError) as e:
                raise SchedulerUnavailable(f"localq query printed {line!r}: {e}", result=result) from None
        return statuses

    def cancel_argv(self, job_ids: Sequence[str]) -> list[str]:
        return self._localq("cancel", "--", *job_ids)


def ensure_spool(path: str) -> None:
    """Create the spool like /tmp (1777) if missing; refuse one that others could tamper with."""
    try:
        os.mkdir(path, 0o700)
        os.chmod(path, 0o1777)  # after mkdir: the umask would strip bits from mkdir's mode
    except FileExistsError:
        pass
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise ValueError(f"localq spool {path} is not a directory")
    if st.st_uid not in (0, os.geteuid()):
        raise ValueError(f"localq spool {path} belongs to uid {st.st_uid}, not to this hub or root")
    if st.st_mode & stat.S_IWOTH and not st.st_mode & stat.S_ISVTX:
        raise ValueError(f"localq spool {path} is world-writable without the sticky bit")
