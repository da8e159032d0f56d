"""One poller per scheduler: a single batched query per tick for every job the hub tracks.

Upstream batchspawner asked the scheduler once per server (twice a second while pending), which floods a
controller with a thousand users. Here every spawner's poll(), start() and stop() read the statuses of
one shared loop: new and pending jobs make ticks come fast (backing off), steady ones at the interval.
"""
from __future__ import annotations

import asyncio
import logging
import random
from dataclasses import dataclass
from typing import Awaitable, Callable, Hashable

from prometheus_client import Counter, Gauge

from schedulers import Adapter, JobState, JobStatus

log = logging.getLogger(__name__)

SCHEDULER_QUERIES = Counter(
    "hpchub_scheduler_queries_total", "Batched job queries hpchub's pollers sent to a scheduler", ["scheduler"]
)
TRACKED_JOBS = Gauge("hpchub_tracked_jobs", "Jobs hpchub's pollers follow", ["scheduler"])

UpdateHook = Callable[[dict[str, JobStatus]], Awaitable[None]]


@dataclass
class _Entry:
    due: float
    delay: float
    status: JobStatus | None = None
    updated: float = float("-inf")
    #: when a caller last asked for this job sooner than its schedule (refresh, hurry)
    asked: float = float("-inf")


class JobPoller:
    """Follows a set of job ids with one `adapter.query` call per tick.

    A job is polled fast while it is new, pending, completing or unknown (`fast_first`, doubling up to
    `fast_max`), and every `interval` seconds once running or ended (with `jitter`, a fraction). A tick queries every tracked job, so the scheduler sees
    one call per tick however many jobs there are.
    """

    def __init__(self, adapter: Adapter, *, interval: float = 30.0, fast_first: float = 0.5,
                 fast_max: float = 10.0, jitter: float = 0.1, on_update: UpdateHook | None = None):
        self.adapter = adapter
        self.interval = interval
        self.fast_first = fast_first
        self.fast_max = fast_max
        self.jitter = jitter
        self.on_update = on_update
        self.queries = 0
        self._entries: dict[str, _Entry] = {}
        self._wake = asyncio.Event()
        self._tick: asyncio.Future[dict[str, JobStatus]] | None = None
        self._task: asyncio.Task | None = None

    @property
    def tracked(self) -> list[str]:
        return list(self._entries)

    def track(self, job_id: str) -> None:
        """Follow `job_id`, fast at first."""
        if job_id not in self._entries:
            loop = asyncio.get_running_loop()
            self._entries[job_id] = _Entry(due=loop.time() + self.fast_first, delay=self.fast_first)
            TRACKED_JOBS.labels(self.adapter.name).set(len(self._entries))
            self._wake.set()
        self._ensure_running()

    def hurry(self, job_id: str) -> None:
        """Poll `job_id` fast again (it was just cancelled, or is expected to change soon)."""
        self.track(job_id)
        entry = self._entries[job_id]
        entry.delay = self.fast_first
        entry.asked = asyncio.get_running_loop().time()
        entry.due = min(entry.due, entry.asked + self.fast_first)
        self._wake.set()

    def untrack(self, job_id: str) -> None:
        if self._entries.pop(job_id, None) is not None:
            TRACKED_JOBS.labels(self.adapter.name).set(len(self._entries))
            self._wake.set()

    def cached(self, job_id: str) -> JobStatus | None:
        entry = self._entries.get(job_id)
        return entry.status if entry else None

    async def next_update(self, job_id: str) -> JobStatus:
        """The job's status from the next tick that includes it."""
        self.track(job_id)
        while True:
            statuses = await asyncio.shield(self._next_tick())
            if job_id in statuses:
                return statuses[job_id]

    async def refresh(self, job_id: str, max_age: float | None = None) -> JobStatus:
        """The job's status, no older than `max_age` seconds (default: the interval).

        A stale job is made due at once; requests that arrive together (all spawners polled at a hub
        restart) share one query."""
        self.track(job_id)
        entry = self._entries[job_id]
        loop = asyncio.get_running_loop()
        if entry.status is not None and loop.time() - entry.updated <= (self.interval if max_age is None else max_age):
            return entry.status
        entry.asked = loop.time()
        entry.due = min(entry.due, entry.asked)
        self._wake.set()
        return await self.next_update(job_id)

    def _next_tick(self) -> asyncio.Future[dict[str, JobStatus]]:
        if self._tick is None or self._tick.done():
            self._tick = asyncio.get_running_loop().create_future()
        return self._tick

    def _ensure_running(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name=f"hpchub-poller-{self.adapter.name}")

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while self._entries:
            self._wake.clear()
            wait = min(entry.due for entry in self._entries.values()) - loop.time()
            if wait > 0:
                try:
                    await asyncio.wait_for(self._wake.wait(), wait)
                    continue  # something changed: recompute when the next job is due
                except asyncio.TimeoutError:
                    pass
            if self._entries:
                await self._poll_once()
        if self._tick is not None and not self._tick.done():
            self._tick.set_result({})

    async def _poll_once(self) -> None:
        loop = asyncio.get_running_loop()
        ids = list(self._entries)
        started = loop.time()
        tick = self._next_tick()
        self._tick = None  # callers arriving during the query wait for the following tick
        try:
            statuses = await self.adapter.query(ids)
        except Exception as err:  # a bug must not stop every server's polling
            log.exception("Query of %d %s jobs failed", len(ids), self.adapter.name)
            statuses = {i: JobStatus(i, JobState.UNKNOWN, reason=f"query failed: {err}") for i in ids}
        self.queries += 1
        SCHEDULER_QUERIES.labels(self.adapter.name).inc()
        now = loop.time()
        for job_id, status in statuses.items():
            entry = self._entries.get(job_id)
            if entry is None:
                continue  # untracked while the query ran
            entry.status, entry.updated = status, now
            if status.state == JobState.RUNNING or status.state.is_terminal:
                entry.delay = self.interval * (1 + random.uniform(-self.jitter, self.jitter))
            else:
                entry.delay = min(entry.delay * 2, self.fast_max)
            if entry.asked <= started:
                entry.due = now + entry.delay
            # else a caller asked during the query: it waits for the next tick, not for the back-off
        if self.on_update is not None:
            try:
                await self.on_update(statuses)
            except Exception:
                log.exception("Recording %d %s job statuses failed", len(statuses), self.adapter.name)
        if not tick.done():
            tick.set_result(statuses)


_pollers: dict[Hashable, JobPoller] = {}


def shared_poller(key: Hashable, make: Callable[[], JobPoller]) -> JobPoller:
    """The hub-wide poller for `key` (one per scheduler and way of reaching it), made on first use."""
    poller = _pollers.get(key)
    if poller is None:
        poller = _pollers[key] = make()
    return poller

