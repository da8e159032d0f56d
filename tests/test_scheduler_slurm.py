"""SlurmAdapter against the real test cluster (docker/slurm-cluster/cluster.sh): jobs run as alice."""
from __future__ import annotations

import functools
import subprocess
from pathlib import Path

import pytest

import helpers
from helpers import CountingRunner
from schedulers import (JobRequest, JobState, JobStatus, LocalRunner, SchedulerError, SchedulerUnavailable,
                        SlurmAdapter, SubmitRejected, SudoRunner)
from schedulers.slurm import expand_nodes

CONTROLLER_DOWN = "slurm_load_jobs error: Unable to contact slurm controller (connect failure)"
REQUEST = JobRequest(name="hpchub-test", tag="hpchub-test")
# Slurm schedules and reports on a coarser clock than localq: wait longer, poll less often
wait_until = functools.partial(helpers.wait_until, timeout=60.0, interval=0.2)


@pytest.fixture
def jobs(slurm_cluster):
    """Job ids a test submitted; whatever is left is cancelled at the end."""
    ids: list[str] = []
    yield ids
    if ids:
        subprocess.run(["scancel", *ids], capture_output=True, timeout=30)


@pytest.fixture
def counting(slurm_cluster, test_users) -> CountingRunner:
    return CountingRunner(SudoRunner())


def script(directory: Path, body: str, *directives: str) -> str:
    lines = ["#!/bin/bash", "#SBATCH --job-name=hpchub-test", f"#SBATCH --output={directory}/slurm-%j.out",
             "#SBATCH --time=5", *(f"#SBATCH {d}" for d in directives), body]
    return "\n".join(lines) + "\n"


@pytest.mark.asyncio
async def test_lifecycle_as_alice_with_one_squeue_per_query(counting, jobs, shared_dir):
    adapter = SlurmAdapter(counting)
    go = shared_dir / "go"
    ids: list[str] = []
    queries = 0

    async def query() -> dict[str, JobStatus]:
        nonlocal queries
        queries += 1
        return await adapter.query(ids)

    waiter = await adapter.submit(script(shared_dir, f"id -un; while [ ! -e {go} ]; do sleep 0.1; done"),
                                  REQUEST, user="alice")
    ids.append(waiter)
    jobs.append(waiter)
    assert waiter.isdigit()
    assert counting.calls[-1] == ("sbatch", "--parsable")
    statuses = await wait_until(query, lambda s: s[waiter].state is JobState.RUNNING)
    assert len(statuses[waiter].nodes) == 1 and statuses[waiter].nodes[0] in ("c1", "c2")

    failing = await adapter.submit(script(shared_dir, "exit 3", f"--dependency=afterok:{waiter}"), REQUEST,
                                   user="alice")
    ids.append(failing)
    jobs.append(failing)
    statuses = await wait_until(query, lambda s: s[failing].state is JobState.PENDING)
    assert statuses[waiter].state is JobState.RUNNING
    assert (statuses[failing].native_state, statuses[failing].reason) == ("PENDING", "Dependency")
    assert statuses[failing].nodes == () and statuses[failing].exit_code is None

    go.touch()
    statuses = await wait_until(query, lambda s: s[failing].state.is_terminal)
    assert (statuses[waiter].state, statuses[waiter].exit_code) == (JobState.COMPLETED, 0)
    failed = statuses[failing]
    assert (failed.state, failed.native_state, failed.exit_code, failed.reason) == (
        JobState.FAILED, "FAILED", 3, "NonZeroExitCode")
    assert (shared_dir / f"slurm-{waiter}.out").read_text() == "alice\n"
    squeues = [argv for argv in counting.calls if argv[0] == "squeue"]
    assert len(squeues) == queries
    assert sum(f"--jobs={waiter},{failing}" in argv for argv in squeues) >= 2
    assert counting.count("sacct") == 0


@pytest.mark.asyncio
async def test_cancel_many_in_one_call(counting, jobs, shared_dir):
    adapter = SlurmAdapter(counting)
    running = [await adapter.submit(script(shared_dir, "sleep 300"), REQUEST, user="alice") for _ in range(2)]
    # TERM is ignored: Slurm reports COMPLETING until its KillWait ends in a KILL
    stubborn = await adapter.submit(script(shared_dir, "trap '' TERM; sleep 300 & wait"), REQUEST, user="alice")
    held = await adapter.submit(script(shared_dir, "sleep 300", "--hold"), REQUEST, user="alice")
    ids = [*running, stubborn, held]
    jobs.extend(ids)
    statuses = await wait_until(lambda: adapter.query(ids),
                                lambda s: all(s[i].state is JobState.RUNNING for i in [*running, stubborn]))
    assert (statuses[held].state, statuses[held].reason) == (JobState.PENDING, "JobHeldUser")

    before = counting.count("scancel")
    await adapter.cancel(ids, user="alice")
    assert counting.count("scancel") == before + 1
    assert counting.calls[-1] == ("scancel", *ids)
    statuses = await wait_until(lambda: adapter.query(ids),
                                lambda s: all(s[i].state is JobState.CANCELLED for i in ids))
    assert all(s.native_state == "CANCELLED" for s in statuses.values())

    # a finished job, and one slurmctld never knew: neither is an error
    await adapter.cancel([*ids, "999999999"], user="alice")
    await adapter.cancel([running[0]])


@pytest.mark.asyncio
async def test_cancel_of_someone_elses_job_is_an_error(counting, jobs, shared_dir):
    adapter = SlurmAdapter(counting)
    bobs = await adapter.submit(script(shared_dir, "sleep 300", "--hold"), REQUEST, user="bob")
    jobs.append(bobs)
    with pytest.raises(SchedulerError, match="Access/permission denied") as error:
        await adapter.cancel([bobs], user="alice")
    assert not isinstance(error.value, SchedulerUnavailable)
    assert error.value.result is not None and error.value.result.returncode != 0
    assert (await adapter.query([bobs]))[bobs].state is JobState.PENDING


@pytest.mark.asyncio
async def test_sbatch_rejection_carries_slurms_message(counting, shared_dir):
    adapter = SlurmAdapter(counting)
    with pytest.raises(SubmitRejected) as error:
        await adapter.submit(script(shared_dir, "true", "--partition=no-such-partition"), REQUEST, user="alice")
    assert "Invalid partition name specified" in error.value.reason
    assert "sbatch: error:" not in error.value.reason
    assert error.value.result is not None and error.value.result.returncode == 1


@pytest.mark.asyncio
async def test_jobs_slurm_does_not_know_stay_unknown(counting, jobs, shared_dir):
    adapter = SlurmAdapter(counting)
    held = await adapter.submit(script(shared_dir, "true", "--hold"), REQUEST, user="alice")
    jobs.append(held)
    unknown = "999999998"
    # alone, squeue exits 1 ("Invalid job id specified"); among others it just leaves the id out
    alone = await adapter.query([unknown])
    mixed = await adapter.query([unknown, held, "999999997", "not-an-id"])
    for status in (alone[unknown], mixed[unknown], mixed["999999997"], mixed["not-an-id"]):
        assert status.state is JobState.UNKNOWN and status.native_state == ""
    assert "MinJobAge" in alone[unknown].reason
    assert mixed[held].state is JobState.PENDING
    assert not any("not-an-id" in arg for argv in counting.calls for arg in argv)
    # this cluster has no accounting: sacct is asked once, then no more
    assert counting.count("sacct") == 1
    assert adapter.use_sacct is False


@pytest.fixture
def fake_slurm(tmp_path) -> Path:
    """squeue, sbatch and scancel that answer like a cluster whose controller is down (the real messages)."""
    messages = {
        "squeue": (CONTROLLER_DOWN, 1),
        "sbatch": ("sbatch: error: Batch job submission failed: Unable to contact slurm controller (connect failure)",
                   1),
        "scancel": ("scancel: error: Kill job error on job id 42: Unable to contact slurm controller "
                    "(connect failure)", 8),
    }
    for command, (message, code) in messages.items():
        path = tmp_path / command
        path.write_text(f"#!/bin/sh\ncat >/dev/null\necho '{message}' >&2\nexit {code}\n")
        path.chmod(0o755)
    return tmp_path


@pytest.mark.asyncio
async def test_controller_down_is_unavailable_never_gone(fake_slurm):
    adapter = SlurmAdapter(LocalRunner(path=f"{fake_slurm}:/usr/bin:/bin"))
    for ids in (["42", "43"], ["42"]):
        statuses = await adapter.query(ids)
        assert set(statuses) == set(ids)
        for status in statuses.values():
            assert status.state == JobState.UNKNOWN
            assert "scheduler unavailable" in status.reason and "Unable to contact slurm controller" in status.reason
    with pytest.raises(SchedulerUnavailable, match="Unable to contact slurm controller") as error:
        await adapter.submit(script(fake_slurm, "true"), REQUEST)
    assert not isinstance(error.value, SubmitRejected)
    with pytest.raises(SchedulerUnavailable, match="Unable to contact slurm controller"):
        await adapter.cancel(["42"])


@pytest.mark.asyncio
async def test_missing_slurm_commands_are_unavailable(tmp_path):
    adapter = SlurmAdapter(LocalRunner(path=str(tmp_path)))
    status = (await adapter.query(["42"]))["42"]
    assert status.state == JobState.UNKNOWN and "squeue" in status.reason
    with pytest.raises(SchedulerUnavailable, match="sbatch"):
        await adapter.submit("#!/bin/bash\ntrue\n", REQUEST)


def test_node_lists():
    assert expand_nodes("c1") == ("c1",)
    assert expand_nodes("c[1-2]") == ("c1", "c2")
    assert expand_nodes("c[1-2,5],gpu[08-10]") == ("c1", "c2", "c5", "gpu08", "gpu09", "gpu10")
    assert expand_nodes("") == ()


@pytest.mark.asyncio
async def test_accounting_answers_for_jobs_squeue_forgot(tmp_path):
    """This cluster has no slurmdbd: sacct's side is checked with its documented -P output."""
    rows = ["5\x1fCOMPLETED\x1fNone\x1fc1\x1f0:0", "6\x1fCANCELLED by 1001\x1fNone\x1fc[1-2]\x1f0:15",
            "7\x1fFAILED\x1fNonZeroExitCode\x1fc2\x1f3:0"]
    (tmp_path / "squeue").write_text("#!/bin/sh\nexit 0\n")
    (tmp_path / "sacct").write_text("#!/bin/sh\nprintf '%s\\n' " + " ".join(f"'{r}'" for r in rows) + "\n")
    for command in ("squeue", "sacct"):
        (tmp_path / command).chmod(0o755)
    statuses = await SlurmAdapter(LocalRunner(path=str(tmp_path))).query(["5", "6", "7", "8"])
    assert (statuses["5"].state, statuses["5"].exit_code, statuses["5"].nodes) == (JobState.COMPLETED, 0, ("c1",))
    assert (statuses["6"].state, statuses["6"].exit_code, statuses["6"].nodes) == (
        JobState.CANCELLED, 143, ("c1", "c2"))
    assert (statuses["7"].state, statuses["7"].exit_code, statuses["7"].reason) == (
        JobState.FAILED, 3, "NonZeroExitCode")
    assert statuses["8"].state is JobState.UNKNOWN
