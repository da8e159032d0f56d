"""LocalAdapter and localq: real processes, real spool, jobs as root and as alice through sudo."""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest

import schedulers
from helpers import (CountedQuery, CountingRunner, alive, cancelled_at_end, ended, submit_with_lost_answer,
                     wait_until)
from schedulers import JobRequest, JobState, LocalAdapter, LocalRunner, SchedulerUnavailable, SubmitRejected, SudoRunner

REQUEST = JobRequest(name="hpchub-test", tag="hpchub-test")


@pytest.fixture(scope="session")
def python(world: Path) -> str:
    """A Python any user can run, with this checkout's `schedulers` installed: what a deployment has.
    (The machine's default Python lives under root's 0700 home; Debian's /usr/bin/python3 does not.)"""
    venv = world / "venv"
    subprocess.run(["/usr/bin/python3", "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = str(venv / "bin" / "python")
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          check=True, capture_output=True, text=True, timeout=30).stdout.strip()
    shutil.copytree(Path(schedulers.__file__).parent, Path(site) / "schedulers",
                    ignore=shutil.ignore_patterns("__pycache__"))
    return python


@pytest.fixture
def spool(world: Path) -> Path:
    parent = Path(tempfile.mkdtemp(prefix="spool-parent-", dir=world))
    parent.chmod(0o755)
    return parent / "spool"


@pytest.fixture
def cleanup(python: str, spool: Path):
    """Ids a test submitted: any still running at the end is cancelled, as root, which may signal anyone."""
    yield from cancelled_at_end(python, "-m", "schedulers.localq", "cancel", "--spool", str(spool))


def job(directory: Path, body: str, *directives: str) -> str:
    lines = ["#!/bin/bash", "#LOCALQ --name=hpchub-test", f"#LOCALQ --output={directory}/localq-%j.out",
             f"#LOCALQ --chdir={directory}", *(f"#LOCALQ {d}" for d in directives), body]
    return "\n".join(lines) + "\n"


def test_spool_is_created_like_tmp(python, spool):
    LocalAdapter(LocalRunner(), spool_dir=spool, python=python)
    mode = spool.stat().st_mode
    assert stat.S_ISDIR(mode) and stat.S_IMODE(mode) == 0o1777


def test_unsafe_spool_is_refused(python, spool):
    spool.mkdir()
    spool.chmod(0o777)
    with pytest.raises(ValueError, match="sticky"):
        LocalAdapter(LocalRunner(), spool_dir=spool, python=python)


@pytest.mark.asyncio
async def test_lifecycle_with_one_query_call_for_many_jobs(python, spool, shared_dir, cleanup):
    counting = CountingRunner(LocalRunner())
    adapter = LocalAdapter(counting, spool_dir=spool, python=python)
    go = shared_dir / "go"
    waiter = await adapter.submit(job(shared_dir, f"echo started; while [ ! -e {go} ]; do sleep 0.05; done"),
                                  REQUEST)
    failing = await adapter.submit(job(shared_dir, "echo failing >&2; exit 3"), REQUEST)
    completing = await adapter.submit(job(shared_dir, "echo $LOCALQ_JOB_ID; pwd"), REQUEST)
    ids = [waiter, failing, completing]
    cleanup.extend(ids)
    assert [int(i) for i in ids] == sorted(int(i) for i in ids) and len(set(ids)) == 3
    query = CountedQuery(adapter, ids)
    statuses = await wait_until(query, lambda s: s[waiter].state is JobState.RUNNING and ended(failing, completing)(s))
    assert statuses[waiter].nodes == (socket.gethostname(),) and statuses[waiter].exit_code is None
    assert (statuses[failing].state, statuses[failing].exit_code, statuses[failing].reason) == (
        JobState.FAILED, 3, "NonZeroExitCode")
    assert (statuses[completing].state, statuses[completing].exit_code) == (JobState.COMPLETED, 0)
    # the script holds secrets: private while the job runs, gone once it ended
    private = spool / waiter / "private"
    assert stat.S_IMODE(private.stat().st_mode) == 0o700
    assert stat.S_IMODE((private / "script").stat().st_mode) == 0o700
    assert not (spool / completing / "private" / "script").exists()

    go.touch()
    statuses = await wait_until(query, ended(waiter))
    assert (statuses[waiter].state, statuses[waiter].native_state, statuses[waiter].exit_code) == (
        JobState.COMPLETED, "COMPLETED", 0)
    assert not (private / "script").exists() and (spool / waiter / "end.json").exists()
    assert (shared_dir / f"localq-{failing}.out").read_text() == "failing\n"
    assert (shared_dir / f"localq-{completing}.out").read_text() == f"{completing}\n{shared_dir}\n"
    assert stat.S_IMODE((shared_dir / f"localq-{waiter}.out").stat().st_mode) == 0o600
    queries_made = [argv for argv in counting.calls if "query" in argv]
    assert len(queries_made) == query.calls and all(argv[-3:] == tuple(ids) for argv in queries_made)


@pytest.mark.asyncio
async def test_walltime_ends_in_timeout(python, spool, shared_dir, cleanup):
    adapter = LocalAdapter(LocalRunner(), spool_dir=spool, python=python, kill_grace_s=0.5)
    # the second one ignores TERM and needs the KILL after the grace
    polite = await adapter.submit(job(shared_dir, "sleep 60", "--time=1"), REQUEST)
    stubborn = await adapter.submit(job(shared_dir, "trap '' TERM; sleep 60 & wait", "--time 1"), REQUEST)
    cleanup.extend([polite, stubborn])
    started = time.monotonic()
    statuses = await wait_until(lambda: adapter.query([polite, stubborn]), ended(polite, stubborn))
    assert time.monotonic() - started < 10
    for job_id in (polite, stubborn):
        assert (statuses[job_id].state, statuses[job_id].reason) == (JobState.TIMEOUT, "TimeLimit")
    assert statuses[polite].exit_code == 128 + signal.SIGTERM
    assert statuses[stubborn].exit_code == 128 + signal.SIGKILL


@pytest.mark.asyncio
async def test_cancel_many_in_one_call(python, spool, shared_dir, cleanup):
    counting = CountingRunner(LocalRunner())
    adapter = LocalAdapter(counting, spool_dir=spool, python=python, kill_grace_s=0.5)
    ids = [await adapter.submit(job(shared_dir, body), REQUEST)
           for body in ("sleep 60", "sleep 60", "trap '' TERM; sleep 60 & wait")]
    finished = await adapter.submit(job(shared_dir, "true"), REQUEST)
    cleanup.extend([*ids, finished])
    await wait_until(lambda: adapter.query([*ids, finished]),
                     lambda s: all(s[i].state is JobState.RUNNING for i in ids) and ended(finished)(s))
    pids = [json.loads((spool / i / "running.json").read_text())["pid"] for i in ids]

    await adapter.cancel([*ids, finished, "424242"])
    assert sum("cancel" in argv for argv in counting.calls) == 1
    statuses = await wait_until(lambda: adapter.query([*ids, finished]), ended(*ids))
    assert all((statuses[i].state, statuses[i].reason) == (JobState.CANCELLED, "Cancelled") for i in ids)
    assert statuses[finished].state is JobState.COMPLETED
    assert not any(alive(pid) for pid in pids)
    await adapter.cancel(ids)  # cancelling finished jobs is not an error


@pytest.mark.asyncio
async def test_bad_scripts_are_rejected_with_a_clear_message(python, spool, shared_dir):
    adapter = LocalAdapter(LocalRunner(), spool_dir=spool, python=python)
    with pytest.raises(SubmitRejected, match="unknown directive '--partition=debug'") as error:
        await adapter.submit(job(shared_dir, "true", "--partition=debug"), REQUEST)
    assert "line 5" in error.value.reason and error.value.result.returncode == 2
    with pytest.raises(SubmitRejected, match="--time must be a positive number of seconds"):
        await adapter.submit(job(shared_dir, "true", "--time=1:00"), REQUEST)
    with pytest.raises(SubmitRejected, match="does not exist"):
        await adapter.submit(job(shared_dir, "true", f"--chdir={shared_dir}/missing"), REQUEST)
    # directives after the first command are ordinary comments, as with #SBATCH
    late = await adapter.submit(job(shared_dir, "true\n#LOCALQ --bogus"), REQUEST)
    assert late.isdigit()
    assert sorted(p.name for p in spool.iterdir()) == [late]


@pytest.mark.asyncio
async def test_job_as_alice_through_sudo(python, spool, shared_dir, cleanup, test_users):
    adapter = LocalAdapter(SudoRunner(), spool_dir=spool, python=python, kill_grace_s=0.5)
    go = shared_dir / "go"
    job_id = await adapter.submit(job(shared_dir, f"id -un; echo $HOME; while [ ! -e {go} ]; do sleep 0.05; done"),
                                  REQUEST, user="alice")
    cancelled = await adapter.submit(job(shared_dir, "sleep 60"), REQUEST, user="alice")
    cleanup.extend([job_id, cancelled])
    statuses = await wait_until(lambda: adapter.query([job_id, cancelled]),
                                lambda s: all(s[i].state is JobState.RUNNING for i in (job_id, cancelled)))
    job_dir = spool / job_id
    assert job_dir.owner() == "alice" and (job_dir / "private" / "script").owner() == "alice"
    assert stat.S_IMODE((job_dir / "private").stat().st_mode) == 0o700

    await adapter.cancel([cancelled], user="alice")
    go.touch()
    statuses = await wait_until(lambda: adapter.query([job_id, cancelled]), ended(job_id, cancelled))
    assert statuses[job_id].state is JobState.COMPLETED and statuses[cancelled].state is JobState.CANCELLED
    assert (shared_dir / f"localq-{job_id}.out").read_text() == "alice\n/home/alice\n"
    assert (shared_dir / f"localq-{job_id}.out").owner() == "alice"
    assert not (job_dir / "private" / "script").exists()


@pytest.mark.asyncio
async def test_a_dead_supervisor_is_failed_not_running(python, spool, shared_dir, cleanup):
    adapter = LocalAdapter(LocalRunner(), spool_dir=spool, python=python, kill_grace_s=0.5)
    job_id = await adapter.submit(job(shared_dir, "sleep 60"), REQUEST)
    cleanup.append(job_id)
    await wait_until(lambda: adapter.query([job_id]), lambda s: s[job_id].state is JobState.RUNNING)
    supervisor = json.loads((spool / job_id / "supervisor.json").read_text())["pid"]
    os.kill(supervisor, signal.SIGKILL)
    statuses = await wait_until(lambda: adapter.query([job_id]), ended(job_id))
    assert statuses[job_id].state is JobState.FAILED and statuses[job_id].reason.startswith("SupervisorLost")
    # its job is orphaned but still cancellable
    pid = json.loads((spool / job_id / "running.json").read_text())["pid"]
    await adapter.cancel([job_id])
    deadline = time.monotonic() + 10
    while alive(pid):
        assert time.monotonic() < deadline, "the orphaned job survived its cancel"
        await asyncio.sleep(0.05)


@pytest.mark.asyncio
async def test_unknown_ids_are_unknown_not_gone(python, spool):
    adapter = LocalAdapter(LocalRunner(), spool_dir=spool, python=python)
    statuses = await adapter.query(["77", "../etc"])
    assert all(s.state is JobState.UNKNOWN and s.native_state == "NOT_FOUND" for s in statuses.values())
    assert statuses["77"].reason == "no such job in the spool"


@pytest.mark.asyncio
async def test_a_spool_the_user_cannot_reach_is_unavailable(python, world, spool, test_users):
    hidden = Path(tempfile.mkdtemp(dir=world)) / "spool"
    adapter = LocalAdapter(SudoRunner(), spool_dir=hidden, python=python)
    with pytest.raises(SchedulerUnavailable, match="Permission denied"):
        await adapter.submit(job(world, "true"), REQUEST, user="alice")


@pytest.mark.asyncio
async def test_missing_python_is_unavailable(spool):
    adapter = LocalAdapter(LocalRunner(), spool_dir=spool, python="/nonexistent/python")
    status = (await adapter.query(["1"]))["1"]
    assert status.state == JobState.UNKNOWN and "/nonexistent/python" in status.reason


@pytest.mark.asyncio
async def test_lost_submit_answer_is_found_by_the_jobs_tag(python, spool, shared_dir, cleanup, test_users):
    silent = shared_dir / "python"  # localq submits for real, then never answers
    silent.write_text(f'#!/bin/sh\ncase "$3" in submit) {python} "$@"; exec sleep 60;; esac\nexec {python} "$@"\n')
    silent.chmod(0o755)
    adapter = LocalAdapter(CountingRunner(SudoRunner()), spool_dir=spool, python=str(silent), kill_grace_s=0.5,
                           command_timeout=3)
    request = JobRequest(name="hpchub-test", tag=f"hpchub-test-{uuid.uuid4().hex}", walltime_s=60,
                         workdir=str(shared_dir), output=f"{shared_dir}/localq-%j.out")
    job_id = await submit_with_lost_answer(adapter, request, ["sleep", "60"], cleanup)
    assert sorted(p.name for p in spool.iterdir()) == [job_id]
