"""A cluster's partitions, cached, and a job request checked against them before anything is submitted.

Schedulers accept some requests they can never run: sbatch takes `--time` above a partition's MaxTime and the job
pends for ever (PartitionTimeLimit). `check_request` refuses such a request first, naming the field.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Callable, Sequence

from .base import Adapter, InvalidRequest, JobRequest, PartitionInfo
from .errors import SchedulerError, SchedulerUnavailable


@dataclass(frozen=True)
class Partitions:
    """The partitions a scheduler reported, and how fresh that answer is."""

    partitions: tuple[PartitionInfo, ...]
    #: when the scheduler gave this answer (time.time())
    fetched_at: float
    #: the last refresh failed: this is an older answer, served for at most the cache's `keep_stale` seconds
    stale: bool = False
    #: why the last refresh failed ("" when it did not)
    error: str = ""

    def find(self, name: str | None) -> PartitionInfo:
        """The partition called `name`, or the default one for None. InvalidRequest("partition") otherwise."""
        return find_partition(self.partitions, name)


class PartitionCache:
    """One cluster's partitions, asked of its adapter at most once per `max_age` seconds.

    Concurrent callers share one scheduler call. When a refresh fails, the last good answer is served (marked stale,
    with the reason) until it is `keep_stale` seconds old; without one, SchedulerUnavailable. After a failure the
    scheduler is not asked again for `retry_after` seconds, so a form reloaded during an outage does not pile up
    calls on a scheduler that is not answering."""

    def __init__(self, adapter: Adapter, *, max_age: float = 60.0, keep_stale: float = 600.0,
                 retry_after: float = 10.0, clock: Callable[[], float] = time.monotonic):
        for name, value in (("max_age", max_age), ("keep_stale", keep_stale), ("retry_after", retry_after)):
            if value < 0:
                raise ValueError(f"PartitionCache {name} must be >= 0 seconds, not {value!r}")
        self.adapter = adapter
        self.max_age = max_age
        self.keep_stale = keep_stale
        self.retry_after = retry_after
        self._clock = clock
        #: how many times the adapter was asked (each is the adapter's one to three scheduler commands)
        self.calls = 0
        self._good: Partitions | None = None
        self._good_at = 0.0  # clock() of the last good answer
        self._expired = False  # invalidate() was called since
        self._failure: tuple[float, SchedulerError] | None = None  # clock() and error of the last failed refresh
        self._inflight: asyncio.Task[Partitions] | None = None

    async def get(self) -> Partitions:
        """Fresh partitions, or the cached ones while younger than `max_age`."""
        now = self._clock()
        if self._good is not None and not self._expired and now - self._good_at < self.max_age:
            return self._good
        if self._failure is not None and now - self._failure[0] < self.retry_after:
            return self._fallback(self._failure[1])
        if self._inflight is None:
            self._inflight = asyncio.ensure_future(self._refresh())
            self._inflight.add_done_callback(self._finished)
        # shielded: one caller giving up (a closed browser tab) must not cancel the others' call
        return await asyncio.shield(self._inflight)

    def invalidate(self) -> None:
        """Forget the cached answer: the next get() asks the scheduler (after an admin changed a partition)."""
        self._expired = True
        self._failure = None

    async def _refresh(self) -> Partitions:
        self.calls += 1
        try:
            partitions = await self.adapter.partitions()
        except SchedulerError as error:
            self._failure = (self._clock(), error)
            return self._fallback(error)
        self._good = Partitions(tuple(partitions), fetched_at=time.time())
        self._good_at = self._clock()
        self._expired = False
        self._failure = None
        return self._good

    def _fallback(self, error: SchedulerError) -> Partitions:
        if self._good is None or self._clock() - self._good_at > self.keep_stale:
            age = "" if self._good is None else f" (the last answer is older than {self.keep_stale:g} s)"
            raise SchedulerUnavailable(f"{self.adapter.name}: cannot list the partitions{age}: {error.reason}",
                                       reason=error.reason, result=error.result) from error
        return Partitions(self._good.partitions, self._good.fetched_at, stale=True, error=error.reason)

    def _finished(self, task: asyncio.Task[Partitions]) -> None:
        self._inflight = None
        if not task.cancelled():
            task.exception()  # retrieved here: a failure nobody awaited any more is not "never retrieved"


def find_partition(partitions: Sequence[PartitionInfo], name: str | None) -> PartitionInfo:
    """The partition called `name`; for None the default one (the only one, when there is a single partition).
    InvalidRequest naming the field "partition" when there is no such partition."""
    if name is None:
        defaults = [p for p in partitions if p.default] or (list(partitions) if len(partitions) == 1 else [])
        if defaults:
            return defaults[0]
        raise InvalidRequest("partition", None, f"the scheduler has no default: choose one of {_names(partitions)}")
    for partition in partitions:
        if partition.name == name:
            return partition
    raise InvalidRequest("partition", name, f"one of {_names(partitions)}")


def check_request(request: JobRequest, partition: PartitionInfo) -> None:
    """Raise InvalidRequest for the first value of `request` that `partition` cannot run, naming the request's field
    ("walltime_s", "nodes", "cores", "memory_mb", "gpu_type", "gpus", "parallel_environment", "account",
    "partition")."""
    for violation in violations(request, partition):
        raise violation


def violations(request: JobRequest, partition: PartitionInfo) -> list[InvalidRequest]:
    """Every value of `request` that `partition` cannot run, one InvalidRequest each, in the form's order."""
    found: list[InvalidRequest] = []
    where = f"partition {partition.name}"

    def over(field: str, value: int | None, limit: int | None, says: str) -> None:
        if value is not None and limit is not None and value > limit:
            found.append(InvalidRequest(field, value, f"at most {says} in {where}"))

    if partition.state != "up":
        found.append(InvalidRequest("partition", partition.name,
                                    f"{where} is {partition.state}: a job submitted now cannot start"))
    if request.walltime_s is not None and partition.max_walltime_s is not None:
        over("walltime_s", request.walltime_s, partition.max_walltime_s,
             f"{partition.max_walltime_s} s ({_duration(partition.max_walltime_s)})")
    # a job asking for more nodes than the partition has is accepted by Slurm, and pends for ever
    node_limits = [(limit, says) for limit, says in ((partition.max_nodes, f"{partition.max_nodes} nodes"),
                                                    (partition.nodes_total or None,
                                                     f"{partition.nodes_total} nodes, all it has"))
                   if limit is not None]
    if node_limits:
        over("nodes", request.nodes, *min(node_limits))
    over("cores", request.cores, partition.max_cores_per_node,
         f"{partition.max_cores_per_node} cores per node")
    over("memory_mb", request.memory_mb, partition.max_memory_mb_per_node,
         f"{partition.max_memory_mb_per_node} MB per node")
    types = sorted(t for t in partition.gpus if t)
    if request.gpu_type is not None and request.gpu_type not in types:
        found.append(InvalidRequest("gpu_type", request.gpu_type,
                                    f"one of {', '.join(types)} in {where}" if types else f"{where} has no GPU types"))
    elif request.gpus:
        most = partition.gpus.get(request.gpu_type or "", 0)
        kind = f"{request.gpu_type} GPUs" if request.gpu_type else "GPUs"
        if most == 0:
            found.append(InvalidRequest("gpus", request.gpus, f"0: {where} has no {kind}"))
        else:
            over("gpus", request.gpus, most, f"{most} {kind} per node")
    if request.parallel_environment is not None and \
            request.parallel_environment not in partition.parallel_environments:
        pes = partition.parallel_environments
        found.append(InvalidRequest("parallel_environment", request.parallel_environment,
                                    f"one of {', '.join(pes)} in {where}" if pes
                                    else f"{where} accepts no parallel environment"))
    if request.account is not None and partition.allowed_accounts and \
            request.account not in partition.allowed_accounts:
        found.append(InvalidRequest("account", request.account,
                                    f"one of {', '.join(partition.allowed_accounts)} in {where}"))
    return found


def _duration(seconds: int) -> str:
    days, rest = divmod(seconds, 86400)
    clock = f"{rest // 3600:02d}:{rest % 3600 // 60:02d}:{rest % 60:02d}"
    return f"{days}-{clock}" if days else clock


def _names(partitions: Sequence[PartitionInfo]) -> str:
    return ", ".join(p.name for p in partitions) or "(none: the scheduler reports no partition)"
