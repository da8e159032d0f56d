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
- `scontrol show partition --oneliner`: one line of Key=Value words per partition (hidden ones left out);
  "UNLIMITED", "NONE" and "ALL" mean no limit; times are [D-]HH:MM:SS. `sinfo --Node` lists a node once per
  partition it is in; its StateComplete is the base state and every flag, lower case ("idle+drain").
- sacctmgr without slurmdbd (AccountingStorageType=accounting_storage/none): exit 1, "You are not running a
  supported accounting_storage plugin" on stderr.
"""
from __future__ import annotations

import dataclasses
import re
from datetime import datetime
from typing import ClassVar, Iterable, Mapping, Sequence

from .base import (Adapter, Associations, JobRequest, JobState, JobStatus, PartitionInfo, QueuePosition,
                   SchedulerError, SchedulerUnavailable)
from .runner import CommandResult, Runner

# ASCII unit separator: cannot occur in ids, states, reasons or node names
_SEP = "\x1f"
_SQUEUE_FORMAT = ",".join(f"{field}:{_SEP}" for field in ("JobID", "State", "Reason", "NodeList", "exit_code"))
_DETAIL_FIELDS = ("JobID", "State", "Reason", "NodeList", "exit_code", "Partition", "SubmitTime", "StartTime", "TimeLimit")
_DETAILS_FORMAT = ",".join(f"{field}:{_SEP}" for field in _DETAIL_FIELDS)
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
_SINFO_FORMAT = ",".join(f"{field}:{_SEP}" for field in ("NodeList", "PartitionName", "CPUs", "Memory", "Gres",
                                                         "StateComplete"))
# scontrol's words for "no limit"
_UNLIMITED = ("UNLIMITED", "INFINITE", "NONE", "N/A", "(null)", "")
# node flags that still let a job start on an idle node at once
_IDLE_FLAGS = {"cloud", "dynamic_norm"}
_NO_ACCOUNTING = "not running a supported accounting_storage plugin"
_USER = re.compile(r"[A-Za-z0-9_.][A-Za-z0-9_.@-]{0,255}")


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

    def __init__(self, runner: Runner, *, command_timeout: float = 30.0, use_sacct: bool = True,
                 cluster: str | None = None):
        """`cluster`: this cluster's ClusterName, to read only its associations where one slurmdbd serves several
        clusters; None: the associations of every cluster the database holds."""
        super().__init__(runner, command_timeout=command_timeout)
        self.use_sacct = use_sacct
        self.cluster = cluster

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
        statuses, rows = _squeue_rows(result, job_ids, 5)
        for job_id, state, reason, nodes, status in rows:
            if job_id in statuses:
                statuses[job_id] = self._status(job_id, state, reason, nodes, _exit_code(status))
        return statuses

    async def details(self, job_ids: Iterable[str]) -> dict[str, JobStatus]:
        """The query's statuses with partition, submit and start time and time limit: one squeue call with more
        columns. A job squeue no longer lists is UNKNOWN here (no sacct: the caller has the poller's status).
        Raises SchedulerUnavailable when squeue could not answer."""
        ids = list(dict.fromkeys(job_ids))
        valid = [i for i in ids if _JOB_ID.fullmatch(i)]
        statuses: dict[str, JobStatus] = {}
        if valid:
            statuses = self.parse_details(await self._run(self.details_argv(valid)), valid)
        return {i: statuses.get(i) or JobStatus(i, JobState.UNKNOWN, reason=self._not_a_job_id(i)) for i in ids}

    def details_argv(self, job_ids: Sequence[str]) -> list[str]:
        return ["squeue", "--noheader", f"--jobs={','.join(job_ids)}", "--states=all", "--Format", _DETAILS_FORMAT]

    def parse_details(self, result: CommandResult, job_ids: Sequence[str]) -> dict[str, JobStatus]:
        statuses, rows = _squeue_rows(result, job_ids, len(_DETAIL_FIELDS))
        for job_id, state, reason, nodes, status, partition, submitted, started, limit in rows:
            if job_id not in statuses:
                continue
            found = self._status(job_id, state, reason, nodes, _exit_code(status))
            # a pending job's StartTime is a plan, and a job cancelled before it ran gets its end time there
            ran = found.state in (JobState.RUNNING, JobState.COMPLETING) or (found.state.is_terminal and found.nodes)
            statuses[job_id] = dataclasses.replace(
                found, partition=partition, submitted=_local_time(submitted),
                started=_local_time(started) if ran else None, time_limit_s=slurm_seconds(limit))
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

    async def partitions(self) -> list[PartitionInfo]:
        """Two calls: `scontrol show partition` for the limits, `sinfo --Node` for the nodes' CPUs, memory, GPUs and
        states. SchedulerUnavailable when either fails."""
        limits = await self._run(self.partitions_argv())
        nodes = await self._run(self.nodes_argv())
        for result in (limits, nodes):
            if result.returncode != 0:
                raise SchedulerUnavailable(f"slurm: {result.argv[0]} failed (exit {result.returncode}): "
                                           f"{result.stderr.strip()}", reason=result.stderr.strip(), result=result)
        return parse_partitions(limits.stdout, nodes.stdout)

    def partitions_argv(self) -> list[str]:
        return ["scontrol", "show", "partition", "--oneliner"]

    def nodes_argv(self) -> list[str]:
        # --all: the nodes of partitions hidden from, or closed to, the hub's own account too
        return ["sinfo", "--all", "--Node", "--noheader", "--Format", _SINFO_FORMAT]

    async def associations(self, user: str) -> Associations | None:
        """`user`'s accounts and QOS from slurmdbd: two sacctmgr calls. None when Slurm keeps no accounting
        database; SchedulerUnavailable when it has one that does not answer."""
        if not _USER.fullmatch(user):
            raise ValueError(f"not a user name: {user!r}")
        assoc = await self._run(self.associations_argv(user))
        if assoc.returncode != 0 and _NO_ACCOUNTING in assoc.stderr:
            return None
        _check_sacctmgr(assoc)
        default = await self._run(["sacctmgr", "--noheader", "--parsable2", "show", "user", f"name={user}",
                                   "format=User,DefaultAccount"])
        _check_sacctmgr(default)
        return parse_associations(user, assoc.stdout, default.stdout)

    def associations_argv(self, user: str) -> list[str]:
        argv = ["sacctmgr", "--noheader", "--parsable2", "show", "associations", f"users={user}"]
        if self.cluster:
            argv.append(f"clusters={self.cluster}")
        return [*argv, "format=Account,QOS,DefaultQOS"]

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


def parse_partitions(scontrol: str, sinfo: str) -> list[PartitionInfo]:
    """`scontrol show partition --oneliner` and `sinfo --Node` (the adapter's format) as PartitionInfo, in
    scontrol's order. Per-node figures are the largest node's, within the partition's MaxCPUsPerNode and
    MaxMemPerNode (or MaxMemPerCPU times those CPUs)."""
    nodes: dict[str, list[tuple[int | None, int | None, dict[str, int], bool]]] = {}
    for line in sinfo.splitlines():
        fields = line.split(_SEP)
        if len(fields) != 7 or fields[6]:
            raise SchedulerUnavailable(f"slurm: unexpected sinfo output {line!r}")
        names, partition, cpus, memory, gres, state = fields[:6]
        for _ in expand_nodes(names):
            nodes.setdefault(partition, []).append((_number(cpus), _number(memory), parse_gres(gres),
                                                    node_is_idle(state)))
    partitions = []
    for line in scontrol.splitlines():
        words = scontrol_words(line)
        if "PartitionName" not in words:
            continue  # "No partitions in the system"
        members = nodes.get(words["PartitionName"], [])
        cores = _capped(max((c for c, _, _, _ in members if c is not None), default=None),
                        _limit(words.get("MaxCPUsPerNode")))
        memory = max((m for _, m, _, _ in members if m is not None), default=None)
        if "MaxMemPerNode" in words:
            memory = _capped(memory, _limit(words["MaxMemPerNode"]))
        elif _limit(words.get("MaxMemPerCPU")) is not None and cores is not None:
            memory = _capped(memory, _limit(words["MaxMemPerCPU"]) * cores)
        gpus: dict[str, int] = {}
        for _, _, node_gpus, _ in members:
            for kind, count in node_gpus.items():
                gpus[kind] = max(gpus.get(kind, 0), count)
        partitions.append(PartitionInfo(
            name=words["PartitionName"], default=words.get("Default") == "YES",
            state=words.get("State", "UP").lower(), max_walltime_s=slurm_seconds(words.get("MaxTime", "")),
            default_walltime_s=slurm_seconds(words.get("DefaultTime", "")), max_nodes=_limit(words.get("MaxNodes")),
            max_cores_per_node=cores, max_memory_mb_per_node=memory, gpus=gpus,
            nodes_total=_number(words.get("TotalNodes", "")) or len(members),
            nodes_idle=sum(idle for _, _, _, idle in members),
            allowed_accounts=_names(words.get("AllowAccounts", "ALL")),
            allowed_groups=_names(words.get("AllowGroups", "ALL"))))
    return partitions


def scontrol_words(line: str) -> dict[str, str]:
    """One `scontrol --oneliner` line as {Key: Value}. A value runs to the next " Key=": some hold spaces
    (a node's OS=Linux 6.1 #1 SMP, a Reason)."""
    return {match.group(1): match.group(2) for match in re.finditer(r"(?:^|(?<= ))([A-Za-z][A-Za-z0-9_:/]*)=(.*?)"
                                                                     r"(?= +[A-Za-z][A-Za-z0-9_:/]*=|\s*$)", line)}


def parse_gres(gres: str) -> dict[str, int]:
    """A node's Gres ("gpu:a100:4(S:0-1),gpu:v100:2,mps:200", "gpu:2", "(null)") as GPUs per type, and "" for
    all of its GPUs whatever their type."""
    gpus: dict[str, int] = {}
    for item in re.findall(r"(?:[^,(]|\([^)]*\))+", gres):
        parts = re.sub(r"\(.*\)$", "", item).split(":")  # "(S:0-1)", "(IDX:0-3)": which sockets / devices
        if parts[0] != "gpu":
            continue
        parts = [p for p in parts[1:] if p != "no_consume"]
        count = _count(parts[-1]) if parts else 1
        if count is None:    # "gpu:a100": one of that type
            count, kind = 1, parts[-1]
        else:
            kind = parts[-2] if len(parts) > 1 else ""
        if count:
            gpus[""] = gpus.get("", 0) + count
            if kind:
                gpus[kind] = gpus.get(kind, 0) + count
    return gpus


def node_is_idle(state: str) -> bool:
    """sinfo's StateComplete ("idle", "idle+drain", "idle*", "mixed"...): nothing runs on the node and a job
    could start there now (not drained, down, reserved, planned, powered down, rebooting or unresponsive)."""
    base, *flags = state.lower().split("+")
    return base == "idle" and set(flags) <= _IDLE_FLAGS


def slurm_seconds(text: str) -> int | None:
    """A Slurm time limit ("01:00:00", "7-00:00:00", "30:00", "45", "2-12") in seconds; None for none
    (UNLIMITED, NONE)."""
    if text.upper() in _UNLIMITED:
        return None
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text)
    if match is None:
        raise SchedulerUnavailable(f"slurm: unexpected time limit {text!r}")
    days, first, second, third = match.groups()
    if days is not None:   # D-HH, D-HH:MM, D-HH:MM:SS
        hours, minutes, seconds = int(first), int(second or 0), int(third or 0)
    elif third is not None:  # HH:MM:SS
        hours, minutes, seconds = int(first), int(second), int(third)
    elif second is not None:  # MM:SS
        hours, minutes, seconds = 0, int(first), int(second)
    else:  # minutes
        hours, minutes, seconds = 0, int(first), 0
    return ((int(days or 0) * 24 + hours) * 60 + minutes) * 60 + seconds


def parse_associations(user: str, associations: str, users: str) -> Associations:
    """`sacctmgr -nP show associations ... format=Account,QOS,DefaultQOS` and `show user ...
    format=User,DefaultAccount`: the user's accounts and QOS, each once, in sacctmgr's order."""
    accounts: list[str] = []
    qos: list[str] = []
    default_qos = None
    for line in associations.splitlines():
        fields = line.split("|")
        if len(fields) != 3:
            raise SchedulerUnavailable(f"slurm: unexpected sacctmgr output {line!r}")
        account, allowed, default = fields
        if account and account not in accounts:
            accounts.append(account)
        qos.extend(q for q in allowed.split(",") if q and q not in qos)
        default_qos = default_qos or default or None
    default_account = next((fields[1] for fields in (line.split("|") for line in users.splitlines())
                            if len(fields) == 2 and fields[0] == user and fields[1]), None)
    return Associations(user, accounts=tuple(accounts), default_account=default_account, qos=tuple(qos),
                        default_qos=default_qos)


def _check_sacctmgr(result: CommandResult) -> None:
    if result.returncode != 0:
        text = result.stderr.strip()
        raise SchedulerUnavailable(f"slurm: sacctmgr failed (exit {result.returncode}): {text}", reason=text,
                                   result=result)


def _limit(text: str | None) -> int | None:
    """A count limit ("16", "UNLIMITED") as an int, None for no limit."""
    return None if text is None or text.upper() in _UNLIMITED else _number(text)


def _number(text: str) -> int | None:
    return int(text) if text.isdigit() else None


def _count(text: str) -> int | None:
    """A gres count, with Slurm's K, M, G suffixes (powers of 1024); None when it is not a count."""
    match = re.fullmatch(r"(\d+)([KMG]?)", text)
    return None if match is None else int(match.group(1)) * 1024 ** " KMG".index(match.group(2) or " ")


def _capped(value: int | None, cap: int | None) -> int | None:
    if value is None:
        return cap
    return value if cap is None else min(value, cap)


def _names(text: str) -> tuple[str, ...]:
    """AllowAccounts / AllowGroups: () for everyone ("ALL")."""
    return () if text.upper() in ("ALL", "") else tuple(n for n in text.split(",") if n)


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


def _squeue_rows(result: CommandResult, job_ids: Sequence[str], width: int
                 ) -> tuple[dict[str, JobStatus], list[list[str]]]:
    """squeue's answer about `job_ids`: every job UNKNOWN ("not queued") until a row says otherwise, and the
    rows of `width` fields. SchedulerUnavailable when squeue failed or printed something else."""
    if result.returncode != 0:
        if _unknown_alone(result, job_ids):
            return {job_ids[0]: JobStatus(job_ids[0], JobState.UNKNOWN, reason=_NOT_QUEUED)}, []
        raise SchedulerUnavailable(f"slurm: squeue failed (exit {result.returncode}): {result.stderr.strip()}",
                                   result=result)
    rows = []
    for line in result.stdout.splitlines():
        fields = line.split(_SEP)
        if len(fields) != width + 1 or fields[-1]:
            raise SchedulerUnavailable(f"slurm: unexpected squeue output {line!r}", result=result)
        rows.append(fields[:-1])
    return {i: JobStatus(i, JobState.UNKNOWN, reason=_NOT_QUEUED) for i in job_ids}, rows


def _unknown_alone(result: CommandResult, job_ids: Sequence[str]) -> bool:
    """squeue's failure for a single id slurmctld does not know: an answer about that job, not an outage."""
    return len(job_ids) == 1 and "slurm_load_jobs error: Invalid job id specified" in result.stderr


def _local_time(text: str) -> datetime | None:
    """squeue's local time without a zone ("2026-11-21T10:01:02"), aware; None for Slurm's "no time" words."""
    if text in _NO_ESTIMATE or text in ("None", ""):
        return None
    try:
        return datetime.fromisoformat(text).astimezone()
    except ValueError:
        raise SchedulerUnavailable(f"slurm: unexpected time {text!r} from squeue") from None


def _exit_code(wait_status: str) -> int | None:
    """squeue's raw wait status as a shell would report it: the exit code, or 128 + the signal."""
    if not wait_status.isdigit():
        return None
    signal = int(wait_status) & 0x7F
    return 128 + signal if signal else (int(wait_status) >> 8) & 0xFF


def _messages(stderr: str, prefix: str) -> str:
    return "\n".join(line.strip().removeprefix(prefix) for line in stderr.strip().splitlines())
