"""The shared poller: however many jobs it follows, one scheduler query per tick (real localq jobs)."""
from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from batchspawner.poller import JobPoller, shared_poller
from helpers import CountingRunner, cancelled_at_end
from schedulers import JobRequest, JobState, LocalAdapter, LocalRunner, SGEAdapter, SlurmAdapter

N_JOBS = 20


@pytest.fixture
def spool():
    parent = Path(tempfile.mkdtemp(prefix="hpchub-test-poller-"))
    yield parent / "spool"
    shutil.rmtree(parent, ignore_errors=True)


@pytest.fixture
def local_counting(spool: Path) -> tuple[LocalAdapter, CountingRunner]:
    runner = CountingRunner(LocalRunner())
    return LocalAdapter(runner, spool_dir=spool, python=sys.executable, kill_grace_s=1), runner


async def submit(adapter: LocalAdapter, spool: Path, body: str, n: int) -> list[str]:
    script = f"#!/bin/bash\n#LOCALQ --name=hpchub-test\n#LOCALQ --chdir={spool}\n{body}\n"
    return [await adapter.submit(script, JobRequest(name="hpchub-test", tag=f"poller-{i}")) for i in range(n)]


def queries(runner: CountingRunner) -> int:
    return sum(1 for argv in runner.calls if "query" in argv)


@pytest.mark.asyncio
async def test_many_jobs_one_query_per_tick(local_counting, spool):
    adapter, runner = local_counting
    ids = await submit(adapter, spool, "sleep 60", N_JOBS)
    poller = JobPoller(adapter, interval=0.5, fast_first=0.05, fast_max=0.2, jitter=0.1)
    try:
        # every spawner asks at once, as JupyterHub does for all servers at a hub restart
        statuses = await asyncio.gather(*(poller.refresh(i) for i in ids))
        assert {s.job_id for s in statuses} == set(ids)
        assert poller.queries == queries(runner) == 1
        assert all(s.state in (JobState.PENDING, JobState.RUNNING) for s in statuses)

        for _ in range(3):
            await poller.next_update(ids[0])
        assert poller.queries == queries(runner) == 4
        assert all(len([a for a in argv if a.isdigit()]) == N_JOBS for argv in runner.calls if "query" in argv)

        # fresh enough: served from the last tick, no new query
        await asyncio.gather(*(poller.refresh(i) for i in ids))
        assert poller.queries == 4
    finally:
        await adapter.cancel(ids)
        for i in ids:
            poller.untrack(i)


@pytest.mark.asyncio
async def test_pending_jobs_back_off_and_running_jobs_wait_the_interval(local_counting, spool):
    adapter, runner = local_counting
    [job] = await submit(adapter, spool, "sleep 60", 1)
    poller = JobPoller(adapter, interval=3.0, fast_first=0.1, fast_max=0.4, jitter=0.0)
    try:
        loop = asyncio.get_running_loop()
        status = await poller.next_update(job)
        while status.state != JobState.RUNNING:
            status = await poller.next_update(job)
        started = loop.time()
        await poller.next_update(job)
        assert loop.time() - started >= 2.9, "a running job was polled before the interval"

        await adapter.cancel([job])
        poller.hurry(job)
        started = loop.time()
        while not (await poller.next_update(job)).state.is_terminal:
            pass
        assert loop.time() - started < 2.0, "a cancelled job was not followed fast"
    finally:
        poller.untrack(job)


class SlowQueries(CountingRunner):
    """Every scheduler query takes `delay` seconds longer, so that callers can arrive while one runs."""

    def __init__(self, inner, delay: float):
        super().__init__(inner)
        self.delay = delay
        self.querying = asyncio.Event()

    async def run(self, argv, **kwargs):
        if "query" in argv:
            self.querying.set()
            await asyncio.sleep(self.delay)
        return await super().run(argv, **kwargs)


@pytest.mark.asyncio
async def test_a_refresh_during_a_query_is_served_by_the_next_query_not_after_the_back_off(spool):
    """A job that reports its port while a tick's query runs: its spawn asks for a fresh status then, and the
    query that was already running must not push that request back to the job's (doubled) next check."""
    runner = SlowQueries(LocalRunner(), delay=0.3)
    adapter = LocalAdapter(runner, spool_dir=spool, python=sys.executable, kill_grace_s=1)
    [job] = await submit(adapter, spool, "sleep 60", 1)
    poller = JobPoller(adapter, interval=60, fast_first=0.05, fast_max=60, jitter=0.0)
    try:
        poller.track(job)
        await runner.querying.wait()       # the first tick's query is running
        loop = asyncio.get_running_loop()
        asked = loop.time()
        await poller.refresh(job, max_age=0)
        assert loop.time() - asked < 2.0, "the refresh waited for the job's back-off"
        assert queries(runner) == 2
    finally:
        await adapter.cancel([job])
        poller.untrack(job)


@pytest.mark.asyncio
async def test_untracked_jobs_leave_the_query_and_the_loop_stops(local_counting, spool):
    adapter, runner = local_counting
    ids = await submit(adapter, spool, "sleep 60", 3)
    poller = JobPoller(adapter, interval=0.3, fast_first=0.05, fast_max=0.1)
    try:
        await asyncio.gather(*(poller.refresh(i) for i in ids))
        poller.untrack(ids[0])
        await poller.next_update(ids[1])
        assert ids[0] not in runner.calls[-1] and ids[1] in runner.calls[-1]
        poller.untrack(ids[1])
        poller.untrack(ids[2])
        before = poller.queries
        await asyncio.sleep(0.5)
        assert poller.queries == before and poller._task is not None and poller._task.done()
    finally:
        await adapter.cancel(ids)


@pytest.mark.asyncio
async def test_a_scheduler_outage_is_unknown_for_every_job(spool):
    adapter = LocalAdapter(LocalRunner(), spool_dir=spool, python="/nonexistent/python")
    poller = JobPoller(adapter, interval=1, fast_first=0.05)
    statuses = await asyncio.gather(*(poller.refresh(i) for i in ("1", "2")))
    assert [s.state for s in statuses] == [JobState.UNKNOWN, JobState.UNKNOWN]
    assert all("scheduler unavailable" in s.reason for s in statuses)
    for i in ("1", "2"):
        poller.untrack(i)


def test_one_shared_poller_per_key(spool):
    adapter = LocalAdapter(LocalRunner(), spool_dir=spool)
    first = shared_poller(("local", "test-key"), lambda: JobPoller(adapter))
    assert shared_poller(("local", "test-key"), lambda: JobPoller(adapter)) is first
    assert shared_poller(("local", "other-key"), lambda: JobPoller(adapter)) is not first


def job_info_rpcs() -> int:
    """slurmctld's own count of job-information requests (sdiag), whoever sent them."""
    out = subprocess.run(["sdiag"], capture_output=True, text=True, timeout=10, check=True).stdout
    return sum(int(count) for count in re.findall(r"^\s*REQUEST_JOB_INFO\b[^\n]*?count:(\d+)", out, re.M))


@pytest.fixture
def slurm_jobs(slurm_cluster):
    yield from cancelled_at_end("scancel")


@pytest.mark.asyncio
async def test_fifty_slurm_jobs_one_query_per_interval_and_sdiag_agrees(counting, slurm_jobs, shared_dir):
    adapter = SlurmAdapter(counting)
    script = (f"#!/bin/bash\n#SBATCH --job-name=hpchub-test\n#SBATCH --hold\n#SBATCH --time=5\n"
              f"#SBATCH --output={shared_dir}/slurm-%j.out\ntrue\n")
    for i in range(50):
        slurm_jobs.append(await adapter.submit(script, JobRequest(name="hpchub-test", tag=f"poller-{i}"), user="alice"))
    interval = 2.0
    poller = JobPoller(adapter, interval=interval, fast_first=interval, fast_max=interval, jitter=0.0)
    loop = asyncio.get_running_loop()
    rpcs, queries = job_info_rpcs(), counting.count("squeue")
    started = loop.time()
    try:
        statuses = await asyncio.gather(*(poller.refresh(job) for job in slurm_jobs))  # 50 servers polled at once
        assert {s.reason for s in statuses} == {"JobHeldUser"}
        for _ in range(3):
            await poller.next_update(slurm_jobs[0])
        elapsed = loop.time() - started
    finally:
        for job in slurm_jobs:
            poller.untrack(job)
    made = counting.count("squeue") - queries
    assert made == poller.queries == 4
    assert 3 * interval - 0.5 <= elapsed <= 3 * interval + 2.0, elapsed  # one query per interval
    assert job_info_rpcs() - rpcs == made, "slurmctld saw another number of job queries than the poller made"


@pytest.fixture
def sge_jobs(sge_cluster):
    yield from cancelled_at_end("qdel", timeout=60)


@pytest.mark.asyncio
async def test_grid_engine_jobs_one_qstat_per_tick(counting, sge_jobs, shared_dir):
    adapter = SGEAdapter(counting)
    script = f"#!/bin/bash\n#$ -N hpchub-test\n#$ -S /bin/bash\n#$ -h\n#$ -o {shared_dir}/sge-$JOB_ID.out\n#$ -j y\ntrue\n"
    for i in range(20):
        sge_jobs.append(await adapter.submit(script, JobRequest(name="hpchub-test", tag=f"poller-{i}"), user="alice"))
    poller = JobPoller(adapter, interval=1.0, fast_first=1.0, fast_max=1.0, jitter=0.0)
    queries = counting.count("qstat")
    try:
        statuses = await asyncio.gather(*(poller.refresh(job) for job in sge_jobs))
        assert {s.state for s in statuses} == {JobState.PENDING}
        for _ in range(2):
            await poller.next_update(sge_jobs[0])
    finally:
        for job in sge_jobs:
            poller.untrack(job)
    assert counting.count("qstat") - queries == poller.queries == 3
