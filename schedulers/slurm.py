"""Slurm: sbatch with the script on stdin, one squeue call for many jobs, scancel for many jobs.

Verified against Slurm 22.05.8:
- `squeue --jobs=a,b` lists only pending/running/completing jobs unless `--states=all`; with it, jobs that
  ended within MinJobAge are listed as COMPLETED, FAILED (reason NonZeroExitCode), CANCELLED...
- an id slurmctld no longer knows: alone, exit 1 and "slurm_load_jobs error: Invalid job id specified";
  among several ids (even all unknown), exit 0 and the id is simply not listed.
- controller down: exit 1, "slurm_load_jobs error: Unable to contact slurm controller (connect failure)",
  after 9 s of retries with MessageTimeout=10 (18 s when asked about exactly one id); sbatch and scancel
  give up after 9 s too.
- `-O exit_code` is the raw wait status (768 for `exit 3`, 15 for SIGTERM).
- scancel of a finished or unknown job of one's own: exit 0, silent.
- `squeue --start` ignores `--Format` (it prints its own layout) but honours `--format`; it lists pending
  jobs only, with StartTime "N/A" where the scheduler has no plan (held jobs), as local time otherwise.
"""
from __future__ import annotations

import re
from datetime import datetime
from typing import ClassVar, Iterable, Mapping, Sequence

from .base import Adapter, JobRequest, JobState, JobStatus, QueuePosition, SchedulerError, SchedulerUnavailable
from .runner import CommandResult, Runner

# ASCII unit separator: cannot occur in ids, states, reasons or node names
_SEP = "\x1f"
_SQUEUE_FORMAT = ",".join(f"{field}:{_SEP}" for field in ("JobID", "State", "Reason", "NodeList", "exit_code"))
_SACCT_FORMAT = "JobID,State,Reason,NodeList,ExitCode"
_JOB_ID = re.compile(r"[0-9]+(_[0-9]+)?")
_UNREACHABLE = ("Unable to contact slurm controller", "Socket timed out", "Zero Bytes were transmitted",
                "Could not establish a configuration source")
_CANCEL_ERROR = re.compile(r"Kill job error on job id (\S+): (.*)")
# scancel's answers that mean "the job is not running any more": the goal of a cancel
_ALREADY_ENDED = ("Invalid job id specified", "Job/step already completing or completed")
_NOT_QUEUED = "slurmctld does not know this job (ended over MinJobAge ago, or never existed)"
# squeue's words for "no time": none set, or Slurm's "never" (INFINITE)
_NO_ESTIMATE = ("N/A", "Unknown")


class SlurmAdapter(Adapter):
    name: ClassVar[str] = "slurm"
    template: ClassVar[str] = "slurm.sh.j2"
    job_id_pattern: ClassVar[re.Pattern[str]] = _JOB_ID
    submit_command: ClassVar[str] = "sbatch"
    server: ClassVar[str] = "the controller"
    unreachable: ClassVar[tuple[str, ...]] = _UNREACHABLE
    id_label: ClassVar[str] = "Slurm"
    state_map: ClassVar[Mapping[str, JobState]] = {
        "PENDING": JobState.PENDING,
        "CONFIGURING": JobState.PENDING,  # nodes allocated but still booting: no server can run yet
        "REQUEUED": JobState.PENDING,
        "REQUEUE_HOLD": JobState.PENDING,
        "REQUEUE_FED": JobState.PENDING,
        "RESV_DEL_HOLD": JobState.PENDING,
        "SUSPENDED": JobState.PENDING,  # will resume, but its server cannot answer meanwhile
        "STOPPED": JobState.PENDING,
        "RUNNING": JobState.RUNNING,
        "RESIZING": JobState.RUNNING,
        "SIGNALING": JobState.RUNNING,
        "COMPLETING": JobState.COMPLETING,
        "STAGE_OUT": JobState.COMPLETING,
        "COMPLETED": JobState.COMPLETED,
        "FAILED": JobState.FAILED,
        "NODE_FAIL": JobState.FAILED,
        "OUT_OF_MEMORY": JobState.FAILED,
        "BOOT_FAIL": JobState.FAILED,
        "PREEMPTED": JobState.FAILED,
        "SPECIAL_EXIT": JobState.FAILED,
        "CANCELLED": JobState.CANCELLED,
        "TIMEOUT": JobState.TIMEOUT,
        "DEADLINE": JobState.TIMEOUT,
    }

    def __init__(self, runner: Runner, *, command_timeout: float = 30.0, use_sacct: bool = True):
        super().__init__(runner, command_timeout=command_timeout)
        self.use_sacct = use_sacct

    def submit_argv(self, request: JobRequest) -> list[str]:
        return ["sbatch", "--parsable"]

    def parse_submit(self, stdout: str) -> str:
        return super().parse_submit(stdout.partition(";")[0])   # --parsable: "ID" or "ID;CLUSTER"

    def submit_error(self, stderr: str) -> str:
        return _messages(stderr, "sbatch: error: ")

    async def query(self, job_ids: Iterable[str]) -> dict[str, JobStatus]:
        statuses = await super().query(job_ids)
        # only squeue's positive "not queued" goes to sacct: a failed squeue says nothing about any job
        forgotten = [i for i, s in statuses.items() if s.reason == _NOT_QUEUED]
        if forgotten and self.use_sacct:
            statuses.update(await self._from_accounting(forgotten))
        return statuses

    def query_argv(self, job_ids: Sequence[str]) -> list[str]:
        return ["squeue", "--noheader", f"--jobs={','.join(job_ids)}", "--states=all", "--Format", _SQUEUE_FORMAT]

    def parse_query(self, result: CommandResult, job_ids: Sequence[str]) -> dict[str, JobStatus]:
        if result.returncode != 0:
            if _unknown_alone(result, job_ids):
                return {job_ids[0]: JobStatus(job_ids[0], JobState.UNKNOWN, reason=_NOT_QUEUED)}
            raise SchedulerUnavailable(f"slurm: squeue failed (exit {result.returncode}): {result.stderr.strip()}",
                                       result=result)
        statuses = {i: JobStatus(i, JobState.UNKNOWN, reason=_NOT_QUEUED) for i in job_ids}
        for line in result.stdout.splitlines():
            fields = line.split(_SEP)
            if len(fields) != 6 or fields[5]:
                raise SchedulerUnavailable(f"slurm: unexpected squeue output {line!r}", result=result)
            job_id, state, reason, nodes, status = fields[:5]
            if job_id in statuses:
                statuses[job_id] = self._status(job_id, state, reason, nodes, _exit_code(status))
        return statuses

    async def estimate_start(self, job_ids: Iterable[str]) -> dict[str, datetime | None]:
        """When Slurm expects each pending job to start (a --begin time, or the backfill plan), in local time;
        None where it has no estimate (held, running, ended, unknown jobs). One squeue call: ask on demand and
        cache, not on every poll. Raises SchedulerUnavailable when squeue could not answer."""
        ids = list(dict.fromkeys(job_ids))
        estimates: dict[str, datetime | None] = dict.fromkeys(ids)
        valid = [i for i in ids if _JOB_ID.fullmatch(i)]
        if valid:
            result = await self._run(self.start_argv(valid))
            estimates.update((i, t) for i, t in self.parse_start(result, valid).items() if i in estimates)
        return estimates

    async def queue_position(self, job_id: str) -> QueuePosition | None:
        """From one `squeue --states=PENDING` call sorted as Slurm schedules (priority, then id)."""
        result = await self._run(self.position_argv())
        return self.parse_position(result, job_id)

    def position_argv(self) -> list[str]:
        return ["squeue", "--noheader", "--states=PENDING", "--sort=-p,i", "--Format", f"JobID:{_SEP},Partition:{_SEP}"]

    def parse_position(self, result: CommandResult, job_id: str) -> QueuePosition | None:
        if result.returncode != 0:
            raise SchedulerUnavailable(f"slurm: squeue failed: {result.stderr.strip()}", result=result)
        pending = [fields[:2] for fields in (line.split(_SEP) for line in result.stdout.splitlines())
                   if len(fields) == 3]
        partition = next((p for i, p in pending if i == job_id), None)
        if partition is None:
            return None
        queue = [i for i, p in pending if p == partition]
        return QueuePosition(queue.index(job_id) + 1, len(queue), partition)

    def start_argv(self, job_ids: Sequence[str]) -> list[str]:
        return ["squeue", "--start", "--noheader", f"--jobs={','.join(job_ids)}", "--format", f"%i{_SEP}%S{_SEP}"]

    def parse_start(self, result: CommandResult, job_ids: Sequence[str]) -> dict[str, datetime | None]:
        if result.returncode != 0:
            if _unknown_alone(result, job_ids):
                return {}
            raise SchedulerUnavailable(f"slurm: squeue --start failed (exit {result.returncode}): "
                                       f"{result.stderr.strip()}", result=result)
        estimates = {}
        for line in result.stdout.splitlines():
            fields = line.split(_SEP)
            start = fields[1] if len(fields) == 3 and not fields[2] else ""
            try:
                # local time without a zone: SLURM_TIME_FORMAT could change that, but runners never pass it on
                estimates[fields[0]] = None if start in _NO_ESTIMATE else datetime.fromisoformat(start).astimezone()
            except ValueError:
                raise SchedulerUnavailable(f"slurm: unexpected squeue --start output {line!r}", result=result) from None
        return estimates

    def tag_query_argv(self, tag: str) -> list[str]:
        # squeue cannot filter on the comment: one call lists every job's id and comment
        return ["squeue", "--noheader", "--states=all", "--Format", f"JobID:{_SEP},Comment:{_SEP}"]

    def parse_tag_query(self, result: CommandResult, tag: str) -> list[str]:
        if result.returncode != 0:
            raise SchedulerUnavailable(f"slurm: squeue failed: {result.stderr.strip()}", result=result)
        return [fields[0] for fields in (line.split(_SEP) for line in result.stdout.splitlines())
                if len(fields) == 3 and fields[1] == tag]

    def cancel_argv(self, job_ids: Sequence[str]) -> list[str]:
        return ["scancel", *self.checked_ids(job_ids)]

    def check_cancel(self, result: CommandResult, job_ids: Sequence[str]) -> None:
        if result.returncode == 0:
            return
        failures = []
        for message in _messages(result.stderr, "scancel: error: ").split("\n"):
            match = _CANCEL_ERROR.fullmatch(message)
            if match is None or match.group(2) not in _ALREADY_ENDED:
                failures.append(message)
        if not failures:
            return
        text = "\n".join(failures)
        error = SchedulerUnavailable if any(t in text for t in _UNREACHABLE) else SchedulerError
        raise error(f"slurm: scancel {' '.join(job_ids)} failed: {text}", reason=text, result=result)

    async def _from_accounting(self, job_ids: Sequence[str]) -> dict[str, JobStatus]:
        """Ended jobs squeue forgot, from sacct. Without accounting they stay UNKNOWN: never gone unproven."""
        try:
            result = await self._run(["sacct", "--noheader", "--allocations", "--parsable2",
                                      f"--delimiter={_SEP}", f"--jobs={','.join(job_ids)}",
                                      f"--format={_SACCT_FORMAT}"])
        except SchedulerUnavailable:
            return {}
        if result.returncode != 0:
            if "accounting storage is disabled" in result.stderr:
                self.use_sacct = False
            return {}
        statuses = {}
        for line in result.stdout.splitlines():
            fields = line.split(_SEP)
            if len(fields) != 5 or fields[0] not in job_ids:
                continue
            job_id, state, reason, nodes, exit_code = fields
            code, _, sig = exit_code.partition(":")  # "3:0", or "0:15" for a signal
            exit_status = 128 + int(sig) if sig.isdigit() and int(sig) else int(code) if code.isdigit() else None
            # "CANCELLED by 1001"
            statuses[job_id] = self._status(job_id, state.split(" ")[0], reason, nodes, exit_status)
        return statuses

    def _status(self, job_id: str, state: str, reason: str, nodes: str, exit_code: int | None) -> JobStatus:
        job_state = self.state_map.get(state, JobState.UNKNOWN)
        return JobStatus(job_id, job_state, native_state=state, reason="" if reason == "None" else reason,
                         nodes=expand_nodes(nodes), exit_code=exit_code if job_state.is_terminal else None)


def expand_nodes(nodelist: str) -> tuple[str, ...]:
    """"c[1-2],gpu07" -> ("c1", "c2", "gpu07"), keeping zero padding ("n[08-10]")."""
    if nodelist in ("", "(null)", "None assigned"):
        return ()
    names: list[str] = []
    for item in re.findall(r"(?:[^,\[]|\[[^\]]*\])+", nodelist):
        names.extend(_expand_item(item))
    return tuple(names)


def _expand_item(item: str) -> list[str]:
    match = re.fullmatch(r"([^\[]*)\[([0-9,\-]+)\](.*)", item)
    if match is None:
        return [item]
    prefix, ranges, rest = match.groups()
    names = []
    for part in ranges.split(","):
        low, _, high = part.partition("-")
        for number in range(int(low), int(high or low) + 1):
            names.extend(f"{prefix}{number:0{len(low)}d}{tail}" for tail in _expand_item(rest))
    return names


def _unknown_alone(result: CommandResult, job_ids: Sequence[str]) -> bool:
    """squeue's failure for a single id slurmctld does not know: an answer about that job, not an outage."""
    return len(job_ids) == 1 and "slurm_load_jobs error: Invalid job id specified" in result.stderr


def _exit_code(wait_status: str) -> int | None:
    """squeue's raw wait status as a shell would report it: the exit code, or 128 + the signal."""
    if not wait_status.isdigit():
        return None
    signal = int(wait_status) & 0x7F
    return 128 + signal if signal else (int(wait_status) >> 8) & 0xFF


def _messages(stderr: str, prefix: str) -> str:
    return "\n".join(line.strip().removeprefix(prefix) for line in stderr.strip().splitlines())
