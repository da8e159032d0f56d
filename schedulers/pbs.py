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
- `qstat -B -f -F json` prints {"Server": {NAME: {..., "default_queue": ...}}}; `qstat -Q -f -F json` {"Queue":
  {NAME: {"queue_type", "resources_max": {...}, "resources_default": {...}, "enabled", "started", ...}}};
  `pbsnodes -a -v -F json` {"nodes": {NAME: {"state", "jobs": [...], "resources_available": {...}, ...}}}, and
  without any node "pbsnodes: No nodes found" on stderr, exit 0. Sizes are "100gb", "384000000kb".
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import re
from datetime import datetime
from typing import Any, ClassVar, Iterable, Mapping, Sequence

from .base import Adapter, JobRequest, JobState, JobStatus, PartitionInfo, SchedulerError, SchedulerUnavailable
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
_SIZE = re.compile(r"([0-9]+)([kmgtp]?)([bw]?)", re.IGNORECASE)
# (enabled, started) -> PartitionInfo.state: a queue that takes jobs but does not start them is "down", as a
# Slurm partition that is DOWN; one that starts its jobs but takes no new ones "drain"
_QUEUE_STATES = {(True, True): "up", (True, False): "down", (False, True): "drain", (False, False): "inactive"}


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

    async def partitions(self) -> list[PartitionInfo]:
        """The queues jobs may be submitted to, from three calls made at once: `qstat -B` (the default queue),
        `qstat -Q` (limits, state) and `pbsnodes` (the nodes' CPUs, memory, GPUs, states)."""
        results = await asyncio.gather(*(self._run(argv) for argv in self.partitions_argv()), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
            if result.returncode != 0:
                text = result.stderr.strip()
                raise SchedulerUnavailable(f"pbs: {os.path.basename(result.argv[0])} failed (exit "
                                           f"{result.returncode}): {text}", reason=text, result=result)
        server, queues, nodes = (_document(result) for result in results)
        return parse_queues(server, queues, nodes)

    def partitions_argv(self) -> list[list[str]]:
        return [[self.command("qstat"), "-B", "-f", "-F", "json"], [self.command("qstat"), "-Q", "-f", "-F", "json"],
                [self.command("pbsnodes"), "-a", "-v", "-F", "json"]]

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
        """The job's status, with its queue, times and walltime: qstat -f tells them all in the same answer."""
        status = self._state(job_id, attributes)
        try:
            limit = _walltime(_mapping(attributes.get("Resource_List")).get("walltime"))
        except SchedulerUnavailable:
            limit = None    # an odd walltime must not cost the job's state
        return dataclasses.replace(
            status, partition=str(attributes.get("queue", "")), submitted=_when(attributes.get("qtime")),
            started=_when(attributes.get("stime")), time_limit_s=limit)

    def _state(self, job_id: str, attributes: Mapping[str, Any]) -> JobStatus:
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


def parse_queues(server: Mapping[str, Any], queues: Mapping[str, Any], nodes: Mapping[str, Any]) -> list[PartitionInfo]:
    """The queues of `qstat -B -f -F json`, `qstat -Q -f -F json` and `pbsnodes -a -v -F json` documents, as parsed
    JSON, in qstat's order; queues that take jobs only from a routing queue (from_route_only) are left out.

    A queue's nodes: those whose `queue` attribute names it when any does; else, when its default_chunk has a
    Qlist, those whose resources_available.Qlist holds that; else every node not tied to a queue. A routing queue's
    nodes are those of its destinations. Per-node figures are the largest node's, within the queue's resources_max
    (ncpus, mem and ngpus are job-wide there: a bound for one node as well)."""
    default = next((str(s.get("default_queue", "")) for s in _members(server, "Server").values()), "")
    all_queues = _members(queues, "Queue")
    all_nodes = _members(nodes, "nodes")
    partitions = []
    for name, queue in all_queues.items():
        if _true(queue.get("from_route_only")):
            continue
        members = [all_nodes[n] for n in _queue_nodes(name, all_queues, all_nodes, set())]
        limits = _mapping(queue.get("resources_max"))
        cores = _capped(_largest(_number(_mapping(n.get("resources_available")).get("ncpus")) for n in members),
                        _number(limits.get("ncpus")))
        memory = _capped(_largest(_size_mb(_mapping(n.get("resources_available")).get("mem")) for n in members),
                         _size_mb(limits.get("mem")))
        gpus = _capped(_largest(_number(_mapping(n.get("resources_available")).get("ngpus")) for n in members),
                       _number(limits.get("ngpus")))
        partitions.append(PartitionInfo(
            name=name, default=name == default,
            state=_QUEUE_STATES[_true(queue.get("enabled")), _true(queue.get("started"))],
            max_walltime_s=_walltime(limits.get("walltime")),
            default_walltime_s=_walltime(_mapping(queue.get("resources_default")).get("walltime")),
            max_nodes=_number(limits.get("nodect")), max_cores_per_node=cores, max_memory_mb_per_node=memory,
            gpus={"": gpus} if gpus else {}, nodes_total=len(members),
            nodes_idle=sum(1 for n in members if _idle(n)),
            allowed_groups=_acl(queue, "acl_group_enable", "acl_groups")))
    return partitions


def _queue_nodes(name: str, queues: Mapping[str, Mapping[str, Any]], nodes: Mapping[str, Mapping[str, Any]],
                 seen: set[str]) -> list[str]:
    queue = queues.get(name)
    if queue is None or name in seen:
        return []
    seen.add(name)
    if str(queue.get("queue_type", "")).lower() == "route":
        found = (_queue_nodes(d.strip().partition("@")[0], queues, nodes, seen)
                 for d in str(queue.get("route_destinations", "")).split(","))
        return list(dict.fromkeys(n for names in found for n in names))
    tied = [n for n, node in nodes.items() if node.get("queue") == name]
    if tied:
        return tied
    qlist = _mapping(queue.get("default_chunk")).get("Qlist")
    if qlist is not None:
        return [n for n, node in nodes.items()
                if str(qlist) in str(_mapping(node.get("resources_available")).get("Qlist", "")).split(",")]
    return [n for n, node in nodes.items() if "queue" not in node]


def _idle(node: Mapping[str, Any]) -> bool:
    """Free, and no job on it: "free" alone means that some of its CPUs are."""
    return str(node.get("state", "")) == "free" and not node.get("jobs") and \
        not _number(_mapping(node.get("resources_assigned")).get("ncpus"))


def _acl(queue: Mapping[str, Any], enable: str, entries: str) -> tuple[str, ...]:
    """An enabled ACL's allowed names: "+physics@*,-guests,chem" -> ("physics", "chem")."""
    if not _true(queue.get(enable)):
        return ()
    names = (e.strip() for e in str(queue.get(entries, "")).split(","))
    return tuple(n.lstrip("+").partition("@")[0] for n in names if n and not n.startswith("-"))


def _document(result: CommandResult) -> Mapping[str, Any]:
    if not result.stdout.strip():
        return {}  # pbsnodes without any node: "No nodes found" on stderr, exit 0
    try:
        document = json.loads(result.stdout)
    except ValueError as e:
        raise SchedulerUnavailable(f"pbs: {os.path.basename(result.argv[0])} printed no JSON document ({e}): "
                                   f"{result.stdout[:200]!r}", result=result) from None
    if not isinstance(document, dict):
        raise SchedulerUnavailable(f"pbs: unexpected JSON: {result.stdout[:200]!r}", result=result)
    return document


def _members(document: Mapping[str, Any], key: str) -> dict[str, Mapping[str, Any]]:
    members = document.get(key, {})
    if not isinstance(members, dict) or not all(isinstance(m, dict) for m in members.values()):
        raise SchedulerUnavailable(f"pbs: unexpected {key!r} in a JSON document: {str(members)[:200]!r}")
    return members


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, dict) else {}


def _true(value: Any) -> bool:
    return str(value).lower() in ("true", "t", "1", "y")


def _walltime(value: Any) -> int | None:
    """"24:00:00", "30:00", "90" or a bare number of seconds."""
    if value is None:
        return None
    parts = str(value).split(".")[0].split(":")
    if len(parts) > 3 or not all(p.isdigit() for p in parts):
        raise SchedulerUnavailable(f"pbs: unexpected walltime {value!r}")
    seconds = 0
    for part in parts:
        seconds = seconds * 60 + int(part)
    return seconds


def _size_mb(value: Any) -> int | None:
    """A PBS size ("100gb", "384000000kb", "2048", "1024w") in MB; None when absent."""
    if value is None:
        return None
    match = _SIZE.fullmatch(str(value).strip())
    if match is None:
        raise SchedulerUnavailable(f"pbs: unexpected size {value!r}")
    number, scale, unit = match.groups()
    size = int(number) * 1024 ** " kmgtp".index(scale.lower() or " ") * (8 if unit.lower() == "w" else 1)
    return size // 1024 ** 2


def _largest(values: Iterable[int | None]) -> int | None:
    return max((v for v in values if v is not None), default=None)


def _capped(value: int | None, cap: int | None) -> int | None:
    if value is None:
        return cap
    return value if cap is None else min(value, cap)


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
