"""PBS Professional and OpenPBS: qsub with the script on stdin, one `qstat -f -F json -x` for many jobs, one qdel
for many jobs.

Tested against an emulation of the PBS commands (tests/pbs_emulator; docs/pbs-emulation.md): no PBS package exists
for Debian. What this module relies on, from the PBS Professional 2022 / OpenPBS 22.05 sources and documentation:
- qsub prints the job id, "SEQ.SERVER", which qstat and qdel take as it is. A refused job: non-zero exit and
  "qsub: REASON" ("qsub: Unknown queue"); an unreachable server: "qsub: cannot connect to server NAME (errno=15010)".
- `qstat -f -F json -x ID...` prints one document, {"timestamp", "pbs_version", "pbs_server", "Jobs": {ID: {...}}},
  finished jobs included (-x). An id the server does not know is left out of "Jobs" and named on stderr,
  "qstat: Unknown Job Id ID" (exit 153); the others are still printed. Unreachable server: the document without
  "Jobs", and "Connection refused" and "qstat: cannot connect to server NAME (errno=15010)" on stderr, exit 255.
- job_state: Q queued, H held, W waiting for its start time, T in transit, S and U suspended, R running, B array
  begun, E exiting, F finished, X finished subjob, M moved to another server.
- Exit_status of a finished job: the script's exit status; 256 + N when signal N killed the job's shell; negative
  JOB_EXEC_* codes for what PBS did itself (-29: walltime exceeded). substate 91 (terminated): qdel ended it.
- exec_host "node1/0*2+node2/0*2"; comment holds the scheduler's reason ("Not Running: Insufficient amount of
  resource: ncpus (R: 8 A: 2 T: 8)"); estimated.start_time is a ctime() string in the server's local time.
- qdel prints "qdel: REASON ID" per job it could not delete: "Unknown Job Id", "Job has finished" (both: the job
  is not running, which is what a cancel wants), "Unauthorized Request "; unreachable server: "Couldn't connect to
  cluster: NAME".
"""
from __future__ import annotations

import json
import os
import re
from datetime import datetime
from typing import Any, ClassVar, Mapping, Sequence

from .base import Adapter, JobRequest, JobState, JobStatus, SchedulerError, SchedulerUnavailable
from .runner import CommandResult, Runner

_JOB_ID = re.compile(r"[0-9]+(\[[0-9]*\])?(\.[A-Za-z0-9_-]+)*")
_UNREACHABLE = ("cannot connect to server", "Couldn't connect to cluster", "Connection refused", "No route to host",
                "Connection timed out", "Communication failure")
# stderr lines about one job: "qstat: Unknown Job Id 12.pbs", "qdel: Job has finished 12.pbs"
_ABOUT_A_JOB = re.compile(r"(?:qstat|qdel): (?:illegally formed job identifier: (\S+)|(.+?) (\S+))")
_ALREADY_ENDED = ("Unknown Job Id", "Job has finished")
_UNKNOWN_JOB = "Unknown Job Id: PBS no longer keeps this job (it ended over job_history_duration ago) or never had it"
_NOT_LISTED = "qstat did not list this job"
_CTIME = "%a %b %d %H:%M:%S %Y"
TERMINATED = 91  # substate of a finished job that qdel ended
SIGNALLED = 256  # Exit_status 256 + N: signal N killed the job's shell
# Exit_status values PBS sets itself (job.h)
JOB_EXEC_CODES = {
    -1: "JOB_EXEC_FAIL1", -2: "JOB_EXEC_FAIL2", -3: "JOB_EXEC_RETRY", -4: "JOB_EXEC_INITABT",
    -5: "JOB_EXEC_INITRST", -6: "JOB_EXEC_INITRMG", -7: "JOB_EXEC_BADRESRT", -10: "JOB_EXEC_FAILUID",
    -11: "JOB_EXEC_RERUN", -12: "JOB_EXEC_CHKP", -13: "JOB_EXEC_FAIL_PASSWORD", -14: "JOB_EXEC_RERUN_SIS_FAIL",
    -15: "JOB_EXEC_QUERST", -16: "JOB_EXEC_FAILHOOK_RERUN", -17: "JOB_EXEC_FAILHOOK_DELETE",
    -18: "JOB_EXEC_HOOK_RERUN", -19: "JOB_EXEC_HOOK_DELETE", -20: "JOB_EXEC_RERUN_MS_FAIL",
    -21: "JOB_EXEC_FAIL_SECURITY", -22: "JOB_EXEC_HOOKERROR", -23: "JOB_EXEC_FAIL_KRB5",
    -24: "JOB_EXEC_KILL_NCPUS_BURST", -25: "JOB_EXEC_KILL_NCPUS_SUM", -26: "JOB_EXEC_KILL_VMEM",
    -27: "JOB_EXEC_KILL_MEM", -28: "JOB_EXEC_KILL_CPUT", -29: "JOB_EXEC_KILL_WALLTIME",
}
JOB_EXEC_KILL_WALLTIME = -29


class PBSAdapter(Adapter):
    name: ClassVar[str] = "pbs"
    template: ClassVar[str] = "pbs.sh.j2"
    job_id_pattern: ClassVar[re.Pattern[str]] = _JOB_ID
    submit_command: ClassVar[str] = "qsub"
    server: ClassVar[str] = "the server"
    unreachable: ClassVar[tuple[str, ...]] = _UNREACHABLE
    id_label: ClassVar[str] = "PBS"
    # F and X (finished) depend on Exit_status and substate; M (moved elsewhere) stays UNKNOWN
    state_map: ClassVar[Mapping[str, JobState]] = {
        "Q": JobState.PENDING,
        "H": JobState.PENDING,
        "W": JobState.PENDING,
        "T": JobState.PENDING,
        "S": JobState.PENDING,  # will resume, but its server cannot answer meanwhile
        "U": JobState.PENDING,
        "R": JobState.RUNNING,
        "B": JobState.RUNNING,
        "E": JobState.COMPLETING,
    }

    def __init__(self, runner: Runner, *, command_timeout: float = 30.0, pbs_exec: str | None = None):
        """`pbs_exec`: PBS_EXEC of pbs.conf, so commands run as PBS_EXEC/bin/qsub...; sudo's secure_path rarely
        holds /opt/pbs/bin. None: the runner finds them on its PATH."""
        super().__init__(runner, command_timeout=command_timeout)
        if pbs_exec is not None and not os.path.isabs(pbs_exec):
            raise ValueError(f"pbs_exec must be an absolute path, not {pbs_exec!r}")
        self.pbs_exec = pbs_exec

    def command(self, name: str) -> str:
        return name if self.pbs_exec is None else os.path.join(self.pbs_exec, "bin", name)

    def submit_argv(self, request: JobRequest) -> list[str]:
        return [self.command("qsub")]

    def submit_error(self, stderr: str) -> str:
        return re.sub(r"^qsub: ", "", stderr.strip(), flags=re.MULTILINE)

    def query_argv(self, job_ids: Sequence[str]) -> list[str]:
        return [self.command("qstat"), "-f", "-F", "json", "-x", *job_ids]

    def parse_query(self, result: CommandResult, job_ids: Sequence[str]) -> dict[str, JobStatus]:
        reasons = _job_errors(result, "qstat", job_ids)
        jobs = _jobs(result)
        statuses = {}
        for job_id in job_ids:
            attributes = _find(jobs, job_id)
            if attributes is None:
                reason = reasons.get(job_id, _NOT_LISTED)
                statuses[job_id] = JobStatus(job_id, JobState.UNKNOWN,
                                             reason=_UNKNOWN_JOB if reason == "Unknown Job Id" else reason)
            else:
                statuses[job_id] = self._status(job_id, attributes)
        return statuses

    def tag_query_argv(self, tag: str) -> list[str]:
        # qstat cannot select on a name's suffix: one call lists every job the server keeps, finished ones too
        return [self.command("qstat"), "-f", "-F", "json", "-x"]

    def parse_tag_query(self, result: CommandResult, tag: str) -> list[str]:
        _job_errors(result, "qstat", ())
        return [job_id for job_id, attributes in _jobs(result).items()
                if str(attributes.get("Job_Name", "")).endswith(f"-{tag}")]

    def cancel_argv(self, job_ids: Sequence[str]) -> list[str]:
        return [self.command("qdel"), *self.checked_ids(job_ids)]

    def check_cancel(self, result: CommandResult, job_ids: Sequence[str]) -> None:
        if result.returncode == 0:
            return
        failures = {job_id: reason for job_id, reason in _job_errors(result, "qdel", job_ids).items()
                    if reason not in _ALREADY_ENDED}
        if failures:
            text = "\n".join(f"{job_id}: {reason.strip()}" for job_id, reason in failures.items())
            raise SchedulerError(f"pbs: qdel {' '.join(job_ids)} failed: {text}", reason=text, result=result)

    def _status(self, job_id: str, attributes: Mapping[str, Any]) -> JobStatus:
        state = str(attributes.get("job_state", ""))
        comment = str(attributes.get("comment", ""))
        nodes = tuple(dict.fromkeys(chunk.partition("/")[0]
                                    for chunk in str(attributes.get("exec_host", "")).split("+") if chunk))
        if state in ("F", "X"):
            return _finished(job_id, state, attributes, comment, nodes)
        if state == "M":
            return JobStatus(job_id, JobState.UNKNOWN, native_state=state,
                             reason=f"moved to another PBS server: {comment}".rstrip(": "))
        job_state = self.state_map.get(state, JobState.UNKNOWN)
        estimate = attributes.get("estimated") if job_state is JobState.PENDING else None
        return JobStatus(job_id, job_state, native_state=state,
                         reason="" if job_state is JobState.RUNNING else comment, nodes=nodes,
                         estimated_start=_when(estimate.get("start_time")) if isinstance(estimate, dict) else None)


def _finished(job_id: str, state: str, attributes: Mapping[str, Any], comment: str,
              nodes: tuple[str, ...]) -> JobStatus:
    exit_status = _number(attributes.get("Exit_status"))
    if _number(attributes.get("substate")) == TERMINATED:
        job_state = JobState.CANCELLED
    elif exit_status == JOB_EXEC_KILL_WALLTIME:
        job_state = JobState.TIMEOUT
    elif exit_status == 0:
        job_state = JobState.COMPLETED
    else:
        job_state = JobState.FAILED
    exit_code = exit_status
    if exit_status is not None and exit_status >= SIGNALLED:
        exit_code = 128 + exit_status - SIGNALLED  # as a shell reports a signal
    reason = JOB_EXEC_CODES.get(exit_status, comment) if exit_status is not None and exit_status < 0 else comment
    return JobStatus(job_id, job_state, native_state=state, reason=reason, nodes=nodes, exit_code=exit_code)


def _job_errors(result: CommandResult, command: str, job_ids: Sequence[str]) -> dict[str, str]:
    """What stderr says about each job. Raises SchedulerUnavailable when the server could not be asked, or when a
    failed command said something that is about none of the jobs."""
    reasons: dict[str, str] = {}
    unexplained = []
    for line in filter(None, (line.strip() for line in result.stderr.splitlines())):
        if _unreachable(line):
            text = "\n".join(dict.fromkeys(result.stderr.strip().splitlines()))  # qstat repeats it per id
            raise SchedulerUnavailable(f"pbs: {command} could not reach the server: {text}", reason=text,
                                       result=result)
        match = _ABOUT_A_JOB.fullmatch(line)
        job_id = match and (match.group(1) or match.group(3))
        if job_id in job_ids:
            reasons[job_id] = "illegally formed job identifier" if match.group(1) else match.group(2)
        else:
            unexplained.append(line)
    if unexplained and result.returncode != 0:
        text = "\n".join(unexplained)
        raise SchedulerUnavailable(f"pbs: {command} failed (exit {result.returncode}): {text}", reason=text,
                                   result=result)
    return reasons


def _jobs(result: CommandResult) -> dict[str, Mapping[str, Any]]:
    """The "Jobs" of qstat's JSON document; none when it has no such member (no job found)."""
    try:
        jobs = json.loads(result.stdout).get("Jobs", {})
    except (ValueError, AttributeError) as e:
        raise SchedulerUnavailable(f"pbs: qstat printed no JSON document ({e}): {result.stdout[:200]!r}",
                                   result=result) from None
    if not isinstance(jobs, dict) or not all(isinstance(a, dict) for a in jobs.values()):
        raise SchedulerUnavailable(f"pbs: unexpected qstat JSON: {result.stdout[:200]!r}", result=result)
    return jobs


def _find(jobs: Mapping[str, Mapping[str, Any]], job_id: str) -> Mapping[str, Any] | None:
    """The job's attributes; "12.pbs01" and "12.pbs01.example.org" name the same job."""
    if job_id in jobs:
        return jobs[job_id]
    sequence, _, server = job_id.partition(".")
    for key, attributes in jobs.items():
        other_sequence, _, other_server = key.partition(".")
        if other_sequence == sequence and (not server or not other_server or server.startswith(other_server + ".")
                                           or other_server.startswith(server + ".")):
            return attributes
    return None


def _number(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _when(text: Any) -> datetime | None:
    """A ctime() string ("Thu Nov 20 10:15:00 2026", or "UNKNOWN") in local time, as an aware datetime."""
    try:
        return datetime.strptime(str(text), _CTIME).astimezone()
    except ValueError:
        return None


def _unreachable(text: str) -> bool:
    return any(marker in text for marker in _UNREACHABLE)
