"""Son of Grid Engine: qsub with the script on stdin, one `qstat -xml` for many jobs, qdel for many jobs.

Verified against SGE 8.1.9 (Debian 12):
- `qsub -terse` with no script argument reads the script from stdin, honours its `#$` lines and prints
  the job id alone.
- `qstat -xml -u '*' -s prsz` lists every job in one call: pending, running, suspended, and the last
  `finished_jobs` (100 by default) that ended, as state "z" until sge_qmaster restarts. Asking for ids
  needs `-j`, whose output is the long per-job detail; so the whole list is fetched and filtered here.
- A job that ended is in the accounting file: `qacct -j ID`, which takes ONE id (`qacct -j 3,4` reads 3
  only, `qacct -j 3 4` is a usage error) and reads the file without sge_qmaster. Records are written every
  `flush_time` (15 s by default; `accounting_flush_time=00:00:00` in reporting_params: at once). It
  records `failed 0` and the exit status; `failed 37 : qmaster enforced h_rt, h_cpu, or h_vmem limit`;
  `failed 100 : assumedly after job` with exit status 137 for a running job deleted by qdel (SGE records
  no more: a job killing itself with SIGKILL looks the same); a job deleted while pending has no record.
  So a job listed as ended without a record is taken as deleted before it started: where accounting is
  flushed every 15 s, a job that ended within those seconds reads the same.
- sge_qmaster down: every client exits 1 within 0.1 s with "error: commlib error: got select error
  (Connection refused)" and "unable to send message to qmaster using port 6444 on host ...".
- qdel answers each id on stdout and exits 1 when any failed: "U has registered the job N for deletion",
  "U has deleted job N", "job N is already in deletion", 'denied: job "N" does not exist' (ended), and
  'U - you do not have the necessary privileges to delete the job "N"'.
- Grid Engine gives no start estimate for pending jobs: `estimated_start` stays None.
- `qconf -sq '*'` prints every cluster queue's configuration in one call, and qconf takes several `-se HOST` in
  one call too; `qhost -q -xml` lists each host's queue instances (slots total/used/reserved, state letters).
  A queue value may differ per host: "8,[node1=16],[@big=32]".
"""
from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from datetime import datetime
from typing import ClassVar, Iterable, Sequence

from .base import Adapter, JobRequest, JobState, JobStatus, PartitionInfo, SchedulerError, SchedulerUnavailable
from .runner import CommandResult, Runner

_JOB_ID = re.compile(r"[0-9]+")
_UNREACHABLE = ("unable to send message to qmaster", "unable to contact qmaster", "commlib error")
_TAG_CONTEXT = "hpchub_tag"
_NOT_LISTED = "not in qstat and not looked up in the accounting file"
# qdel's answers for an id whose job is being deleted or has ended: the goal of a cancel
_CANCEL_DONE = re.compile(r'.* has registered the job (\d+) for deletion|.* has deleted job (\d+)'
                          r'|job (\d+) is already in deletion|denied: job "(\d+)" does not exist')
_FAILED_LIMIT = 37    # "qmaster enforced h_rt, h_cpu, or h_vmem limit"
_FAILED_AFTER_JOB = 100
_SIGKILL_EXIT = 128 + 9
_NO_QUEUE = "No cluster queue or queue instance matches the phrase"
# queue instance states in which it takes no new job: unknown (execd down), load alarm, suspend alarm, calendar
# suspended/disabled, suspended, subordinated, disabled, error, configuration ambiguous, orphaned
_CLOSED = set("uaACDsSdEco")
_MEMORY = re.compile(r"([0-9.]+)([kKmMgGtT]?)")
_UNLIMITED = ("INFINITY", "NONE", "UNDEFINED", "-", "")


class SGEAdapter(Adapter):
    name: ClassVar[str] = "sge"
    template: ClassVar[str] = "sge.sh.j2"
    job_id_pattern: ClassVar[re.Pattern[str]] = _JOB_ID
    submit_command: ClassVar[str] = "qsub"
    server: ClassVar[str] = "sge_qmaster"
    unreachable: ClassVar[tuple[str, ...]] = _UNREACHABLE
    id_label: ClassVar[str] = "Grid Engine"

    def __init__(self, runner: Runner, *, command_timeout: float = 30.0, accounting_lookups: int = 10,
                 default_queue: str | None = None, gpu_complex: str = "gpu"):
        """`accounting_lookups`: at most this many `qacct` calls (one per job that left qstat) per query;
        the jobs beyond stay UNKNOWN until a later query. `default_queue`: where jobs that name no queue go (the
        `-q` of the cluster's sge_request), which `partitions()` marks default: Grid Engine itself has no default
        queue. `gpu_complex`: the consumable that counts GPUs, as the job template requests it (`-l gpu=N`)."""
        super().__init__(runner, command_timeout=command_timeout)
        self.accounting_lookups = accounting_lookups
        self.default_queue = default_queue
        self.gpu_complex = gpu_complex

    def submit_argv(self, request: JobRequest) -> list[str]:
        return ["qsub", "-terse"]

    def submit_error(self, stderr: str) -> str:
        """qsub's reason without its frame: "Unable to run job: REASON" ... "Exiting." """
        lines = [line.strip().removeprefix("Unable to run job: ") for line in stderr.strip().splitlines()]
        return "\n".join(line for line in lines if line and line != "Exiting.")

    async def query(self, job_ids: Iterable[str]) -> dict[str, JobStatus]:
        statuses = await super().query(job_ids)
        # only after a qstat that answered: left its list, or listed as ended ("z")
        ended = [i for i, s in statuses.items() if s.reason == _NOT_LISTED or s.native_state == "z"]
        for job_id in ended[:self.accounting_lookups]:
            try:
                statuses[job_id] = await self._from_accounting(statuses[job_id])
            except SchedulerUnavailable:
                break   # qacct timed out or is missing: the others would too
        return statuses

    def query_argv(self, job_ids: Sequence[str]) -> list[str]:
        return ["qstat", "-xml", "-u", "*", "-s", "prsz"]

    def parse_query(self, result: CommandResult, job_ids: Sequence[str]) -> dict[str, JobStatus]:
        if result.returncode != 0:
            raise SchedulerUnavailable(f"sge: qstat failed (exit {result.returncode}): {result.stderr.strip()}",
                                       reason=result.stderr.strip(), result=result)
        wanted = set(job_ids)
        statuses = {i: JobStatus(i, JobState.UNKNOWN, reason=_NOT_LISTED) for i in job_ids}
        for job in _xml(result, "qstat -xml").iter("job_list"):
            job_id, native = job.findtext("JB_job_number", ""), job.findtext("state", "")
            if job_id in wanted and statuses[job_id].reason == _NOT_LISTED:   # an array job lists each task
                queue, _, host = job.findtext("queue_name", "").partition("@")
                state, reason = job_state(native)
                # qstat names the queue and start time of a job that runs, the submit time of one that waits
                statuses[job_id] = JobStatus(job_id, state, native_state=native, reason=reason,
                                             nodes=(host,) if host else (), partition=queue,
                                             submitted=_local_time(job.findtext("JB_submission_time")),
                                             started=_local_time(job.findtext("JAT_start_time")))
        return statuses

    async def partitions(self) -> list[PartitionInfo]:
        """Each cluster queue with its limits, in two calls: `qhost -q -xml` (hosts, their queue instances, CPUs,
        memory), then one qconf for every queue's configuration and every host's complex values (GPUs)."""
        hosts = await self._run(["qhost", "-q", "-xml"])
        if hosts.returncode != 0:
            raise SchedulerUnavailable(f"sge: qhost failed (exit {hosts.returncode}): {hosts.stderr.strip()}",
                                       reason=hosts.stderr.strip(), result=hosts)
        names = [host.get("name", "") for host in _xml(hosts, "qhost -xml").iter("host")]
        configs = await self._run(self.queue_config_argv(names))
        if configs.returncode != 0 and not (_NO_QUEUE in configs.stderr and not self.cannot_reach(configs)):
            raise SchedulerUnavailable(f"sge: qconf failed (exit {configs.returncode}): {configs.stderr.strip()}",
                                       reason=configs.stderr.strip(), result=configs)
        return parse_queues(configs.stdout, hosts.stdout, default_queue=self.default_queue,
                            gpu_complex=self.gpu_complex)

    def queue_config_argv(self, hosts: Sequence[str]) -> list[str]:
        """Every queue's configuration and the complex values of `hosts` ("global" is the whole cluster's)."""
        argv = ["qconf", "-sq", "*"]
        for host in dict.fromkeys(["global", *hosts]):
            argv += ["-se", host]
        return argv

    def tag_query_argv(self, tag: str) -> list[str]:
        # the job context is only in the detailed listing, which this gives for every job in one call.
        # Not with -xml: for a job that has run, it prints a tag "<JATASK:     212.>" no parser takes.
        return ["qstat", "-j", "*"]

    def parse_tag_query(self, result: CommandResult, tag: str) -> list[str]:
        if result.returncode != 0:
            if "Following jobs do not exist" in result.stderr and not self.cannot_reach(result):
                return []   # no job at all
            raise SchedulerUnavailable(f"sge: qstat -j failed: {result.stderr.strip()}", result=result)
        found, job_id = [], ""
        for line in result.stdout.splitlines():
            key, _, value = line.partition(":")
            if key == "job_number":
                job_id = value.strip()
            elif key == "context" and f"{_TAG_CONTEXT}={tag}" in value.strip().split(","):
                found.append(job_id)
        return found

    def cancel_argv(self, job_ids: Sequence[str]) -> list[str]:
        return ["qdel", *self.checked_ids(job_ids)]

    def check_cancel(self, result: CommandResult, job_ids: Sequence[str]) -> None:
        if result.returncode == 0:
            return
        if self.cannot_reach(result):
            raise SchedulerUnavailable(f"sge: qdel could not reach sge_qmaster: {result.stderr.strip()}",
                                       reason=result.stderr.strip(), result=result)
        failures = "\n".join(line for line in result.stdout.strip().splitlines() if not _CANCEL_DONE.fullmatch(line))
        if failures or result.stderr.strip():
            text = "\n".join(t for t in (failures, result.stderr.strip()) if t)
            raise SchedulerError(f"sge: qdel {' '.join(job_ids)} failed: {text}", reason=text, result=result)

    async def explain(self, job_id: str) -> str:
        """Why a job waits or is in error, in SGE's words (`qstat -j ID`: one call per job, so asked on
        demand, never by `query`). "" when SGE says nothing."""
        if not _JOB_ID.fullmatch(job_id):
            raise ValueError(f"not a Grid Engine job id: {job_id!r}")
        result = await self._run(["qstat", "-j", job_id])
        if result.returncode != 0:
            if self.cannot_reach(result):
                raise SchedulerUnavailable(f"sge: qstat -j failed: {result.stderr.strip()}", result=result)
            return result.stdout.strip() or result.stderr.strip()   # "Following jobs do not exist: ..."
        return explanation(result.stdout)

    async def _from_accounting(self, status: JobStatus) -> JobStatus:
        """The end of a job that left qstat's list, from `qacct`. Without a record it stays UNKNOWN,
        except a job qstat listed as ended: that one was deleted before it started."""
        result = await self._run(["qacct", "-j", status.job_id])
        record = parse_accounting(result.stdout, status.job_id) if result.returncode == 0 else None
        if record is not None:
            return record
        if status.native_state == "z":
            return JobStatus(status.job_id, JobState.CANCELLED, native_state="z",
                             reason="ended without an accounting record: deleted before it started")
        return JobStatus(status.job_id, JobState.UNKNOWN,
                         reason="not in qstat, and no accounting record (qacct: "
                                f"{result.stderr.strip() or result.stdout.strip()})")


def _local_time(text: str | None) -> datetime | None:
    """qstat -xml's local time without a zone ("2026-11-22T00:14:41"), aware; None when absent or odd."""
    try:
        return datetime.fromisoformat(text).astimezone() if text else None
    except ValueError:
        return None


def job_state(native: str) -> tuple[JobState, str]:
    """A qstat state ("qw", "hqw", "r", "t", "Rr", "s", "S", "T", "Eqw", "dr", "z"...), letter by letter,
    as a JobState and a reason a person can read."""
    if "E" in native:
        return JobState.FAILED, "error state: the job cannot start (qstat -j tells why)"
    if "d" in native:
        return JobState.COMPLETING, "being deleted"
    if native == "z":
        return JobState.COMPLETING, "ended"   # its outcome is in the accounting file
    for letter, reason in (("s", "suspended"), ("S", "suspended with its queue"),
                           ("T", "suspended by a load threshold")):
        if letter in native:
            return JobState.PENDING, reason   # will resume, but its server cannot answer meanwhile
    if "r" in native:
        return JobState.RUNNING, ""
    if "t" in native:
        return JobState.PENDING, "being transferred to its host"
    if "h" in native:
        return JobState.PENDING, "on hold"
    if "w" in native:
        return JobState.PENDING, ""
    return JobState.UNKNOWN, f"unknown Grid Engine state {native!r}"


def parse_accounting(text: str, job_id: str) -> JobStatus | None:
    """The job's last record in `qacct -j ID` output (a reused id has several), or None."""
    records = [dict(_fields(block)) for block in text.split("=" * 62)]
    records = [r for r in records if r.get("jobnumber") == job_id]
    if not records:
        return None
    record = records[-1]
    failed_code, _, failed_text = record.get("failed", "").partition(":")
    exit_text = record.get("exit_status", "").split()
    exit_status = int(exit_text[0]) if exit_text and exit_text[0].isdigit() else None
    failed = int(failed_code) if failed_code.strip().isdigit() else None
    reason = f"failed {failed}: {failed_text.strip()}" if failed else ""
    nodes = (record["hostname"],) if record.get("hostname") else ()
    if failed == 0:
        state = JobState.COMPLETED if exit_status == 0 else JobState.FAILED
    elif failed == _FAILED_LIMIT:
        state = JobState.TIMEOUT
    elif failed == _FAILED_AFTER_JOB and exit_status == _SIGKILL_EXIT:
        state = JobState.CANCELLED
    else:
        state = JobState.FAILED
    if failed not in (0, _FAILED_LIMIT, _FAILED_AFTER_JOB):
        exit_status = None   # the job did not start: its exit status means nothing
    return JobStatus(job_id, state, native_state=f"failed {failed}" if failed else "finished", reason=reason,
                     nodes=nodes, exit_code=exit_status)


def explanation(text: str) -> str:
    """The "error reason" and "scheduling info" lines of `qstat -j ID` output."""
    lines: list[str] = []
    keep = False
    for line in text.splitlines():
        if line[:1].isspace():
            if keep:
                lines.append(line.strip())
            continue
        key, _, value = line.partition(":")
        keep = key.startswith("error reason") or key == "scheduling info"
        if keep:
            lines.append(value.strip())
    return "\n".join(lines)


def parse_queues(qconf: str, qhost_xml: str, *, default_queue: str | None = None,
                 gpu_complex: str = "gpu") -> list[PartitionInfo]:
    """Cluster queues from `qconf -sq '*' -se HOST...` and `qhost -q -xml`, in qconf's order.

    A queue's hosts are those qhost lists an instance of it on. Per-node figures are the largest instance's:
    its slots (1 without a parallel environment), its host's memory within h_vmem/s_vmem times those slots, its
    GPUs (the `gpu_complex` of the host, within the queue's and the global one). The run-time limit is the lower
    of h_rt and s_rt. Host-group overrides ("[@group=...]") are taken to apply to some host of the queue."""
    records = _qconf_records(qconf)
    queues = [r for r in records if "qname" in r]
    complexes = {r["hostname"]: _complex_values(r.get("complex_values", "")) for r in records if "hostname" in r}
    cluster_gpus = complexes.get("global", {}).get(gpu_complex)
    instances: dict[str, list[dict[str, str]]] = {}
    try:
        root = ET.fromstring(qhost_xml)
    except ET.ParseError as err:
        raise SchedulerUnavailable(f"sge: qhost -xml printed no XML ({err}): {qhost_xml[:200]!r}") from None
    for host in root.iter("host"):
        values = {v.get("name", ""): v.text or "" for v in host.iter("hostvalue")}
        for queue in host.iter("queue"):
            instance = {v.get("name", ""): v.text or "" for v in queue.iter("queuevalue")}
            instances.setdefault(queue.get("name", ""), []).append(
                {**values, **instance, "host": host.get("name", "")})
    partitions = []
    for queue in queues:
        name = queue["qname"]
        pes = tuple(dict.fromkeys(pe for value in _host_values(queue.get("pe_list", "NONE"), list_valued=True)
                                  for pe in value.replace(",", " ").split() if pe != "NONE"))
        members = instances.get(name, [])
        vmem = _lowest(_largest(_memory_mb(v) for v in _host_values(queue.get(key, "")))
                       for key in ("h_vmem", "s_vmem"))
        queue_gpus = _largest(_complex_values(v).get(gpu_complex) for v in
                              _host_values(queue.get("complex_values", "NONE"), list_valued=True))
        cores = memory = gpus = None
        for instance in members:
            slots = int(instance["slots"]) if instance.get("slots", "").isdigit() else 0
            slots = slots if pes else min(slots, 1)
            host_memory = _memory_mb(instance.get("mem_total", ""))
            if vmem is not None and slots:
                host_memory = vmem * slots if host_memory is None else min(host_memory, vmem * slots)
            host_gpus = [g for g in (complexes.get(instance["host"], {}).get(gpu_complex), queue_gpus, cluster_gpus)
                         if g is not None]
            cores = _larger(cores, slots or None)
            memory = _larger(memory, host_memory)
            gpus = _larger(gpus, min(host_gpus) if host_gpus else None)
        open_instances = [i for i in members if not set(i.get("state_string", "")) & _CLOSED]
        partitions.append(PartitionInfo(
            name=name, default=name == default_queue, state="up" if open_instances else "down",
            max_walltime_s=_lowest(_largest(_seconds(v) for v in _host_values(queue.get(key, "")))
                                   for key in ("h_rt", "s_rt")),
            max_cores_per_node=cores, max_memory_mb_per_node=memory,
            gpus={"": gpus} if gpus else {}, nodes_total=len(members),
            nodes_idle=sum(1 for i in open_instances if i.get("slots_used") in ("0", "") and
                           i.get("slots_resv") in ("0", "", None)),
            parallel_environments=pes,
            allowed_accounts=tuple(p for p in queue.get("projects", "NONE").replace(",", " ").split()
                                   if p != "NONE")))
    return partitions


def _qconf_records(text: str) -> list[dict[str, str]]:
    """qconf's "key  value" lines, continuation lines ("\\" at the end) joined, as one dict per queue ("qname")
    or host ("hostname")."""
    records: list[dict[str, str]] = []
    for line in re.sub(r"\\\n\s*", "", text).splitlines():
        key, _, value = line.strip().partition(" ")
        if not key:
            continue
        if key in ("qname", "hostname"):
            records.append({})
        if records:
            records[-1][key] = value.strip()
    return records


def _host_values(text: str, *, list_valued: bool = False) -> list[str]:
    """A queue value and its per-host overrides ("8,[node1=16],[@big=32]") as ["8", "16", "32"]. A list-valued
    default may itself hold commas ("make,smp"): its parts are joined back."""
    default, overrides = [], []
    for item in re.findall(r"\[[^\]]*\]|[^,\[]+", text):
        item = item.strip()
        if item.startswith("["):
            overrides.append(item[1:-1].partition("=")[2])
        elif item:
            default.append(item)
    values = [",".join(default)] if list_valued else default[:1]
    return values + overrides


def _complex_values(text: str) -> dict[str, int]:
    """"gpu=2,license=3" (NONE: none) as the integer-valued ones: {"gpu": 2, "license": 3}."""
    values = {}
    for item in text.split(","):
        name, _, value = item.strip().partition("=")
        try:
            values[name] = int(float(value))
        except ValueError:
            continue   # a string or memory complex: not a count
    return values


def _memory_mb(text: str) -> int | None:
    """A Grid Engine memory specifier ("23.5G", "2048M", "4g", "1024") in MB (1024 * 1024 bytes); None for
    INFINITY or an unknown value ("-")."""
    match = _MEMORY.fullmatch(text.strip())
    if text.strip() in _UNLIMITED or match is None:
        return None
    number, unit = float(match.group(1)), match.group(2)
    scale = {"": 1, "k": 1e3, "K": 1024, "m": 1e6, "M": 1024 ** 2, "g": 1e9, "G": 1024 ** 3, "t": 1e12,
             "T": 1024 ** 4}[unit]
    return int(number * scale // 1024 ** 2)


def _seconds(text: str) -> int | None:
    """A time specifier ("00:10:00", "1::1", "600") in seconds; None for INFINITY."""
    text = text.strip()
    if text in _UNLIMITED:
        return None
    if text.isdigit():
        return int(text)
    parts = text.split(":")
    if len(parts) != 3 or not all(p.isdigit() or p == "" for p in parts):
        raise SchedulerUnavailable(f"sge: unexpected time limit {text!r}")
    hours, minutes, seconds = (int(p or 0) for p in parts)
    return hours * 3600 + minutes * 60 + seconds


def _largest(values: Iterable[int | None]) -> int | None:
    """The largest value; None when any is None (no limit somewhere) or there is none."""
    values = list(values)
    return None if not values or None in values else max(v for v in values if v is not None)


def _lowest(limits: Iterable[int | None]) -> int | None:
    """The lowest of several limits on one thing; None (no limit) when none is set."""
    return min((v for v in limits if v is not None), default=None)


def _larger(a: int | None, b: int | None) -> int | None:
    return b if a is None else a if b is None else max(a, b)


def _fields(block: str) -> Iterable[tuple[str, str]]:
    for line in block.splitlines():
        key, _, value = line.partition(" ")
        if key:
            yield key, value.strip()


def _xml(result: CommandResult, what: str) -> ET.Element:
    try:
        return ET.fromstring(result.stdout)
    except ET.ParseError as err:
        raise SchedulerUnavailable(f"sge: {what} printed no XML ({err}): {result.stdout[:200]!r}",
                                   result=result) from None

