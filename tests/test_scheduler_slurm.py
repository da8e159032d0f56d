"""SlurmAdapter: its parsers on answers recorded from Slurm 22.05 (fixtures/slurm, no daemon needed), and the
adapter against the real test cluster (docker/slurm-cluster/cluster.sh), jobs running as alice."""
from __future__ import annotations

import asyncio
import functools
import json
import shutil
import signal
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Sequence

import pytest

import helpers
from helpers import (CountedQuery, CountingRunner, cancel_refused, cancelled_at_end, controller_stopped, submit_refused,
                     submit_with_lost_answer)
from schedulers import (CommandResult, JobRequest, JobState, JobStatus, LocalRunner, Runner, SchedulerUnavailable,
                        SlurmAdapter, SubmitRejected, SudoRunner)
from schedulers.slurm import expand_nodes

REQUEST = JobRequest(name="hpchub-test", tag="hpchub-test")
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "slurm"
# Slurm schedules and reports on a coarser clock than localq: wait longer, poll less often
wait_until = functools.partial(helpers.wait_until, timeout=60.0, interval=0.2)


@pytest.fixture
def jobs(slurm_cluster):
    """Job ids a test submitted; whatever is left is cancelled at the end."""
    yield from cancelled_at_end("scancel")


def script(directory: Path, body: str, *directives: str) -> str:
    lines = ["#!/bin/bash", "#SBATCH --job-name=hpchub-test", f"#SBATCH --output={directory}/slurm-%j.out",
             "#SBATCH --time=5", *(f"#SBATCH {d}" for d in directives), body]
    return "\n".join(lines) + "\n"


@pytest.mark.asyncio
async def test_lifecycle_as_alice_with_one_squeue_per_query(counting, jobs, shared_dir):
    adapter = SlurmAdapter(counting)
    go = shared_dir / "go"
    ids: list[str] = []
    query = CountedQuery(adapter, ids)
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
    assert len(squeues) == query.calls
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
    error = await cancel_refused(adapter, [bobs], "Access/permission denied")
    assert error.result is not None and error.result.returncode != 0
    assert (await adapter.query([bobs]))[bobs].state is JobState.PENDING


@pytest.mark.asyncio
async def test_sbatch_rejection_carries_slurms_message(slurm_cluster, counting, shared_dir):
    adapter = SlurmAdapter(counting)
    error = await submit_refused(adapter, script(shared_dir, "true", "--partition=no-such-partition"), REQUEST)
    assert "Invalid partition name specified" in error.reason and "sbatch: error:" not in error.reason
    assert error.result is not None and error.result.returncode == 1


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
    """squeue, sbatch and scancel that answer like a cluster whose controller is down: the recorded answers."""
    for command, case in (("squeue", "query-controller-down"), ("sbatch", "submit-controller-down"),
                          ("scancel", "cancel-controller-down")):
        answer = recorded(case)
        stderr = tmp_path / f"{command}.stderr"
        stderr.write_text(answer["stderr"])
        path = tmp_path / command
        path.write_text(f"#!/bin/sh\ncat >/dev/null\ncat '{stderr}' >&2\nexit {answer['returncode']}\n")
        path.chmod(0o755)
    return tmp_path


@pytest.mark.asyncio
async def test_controller_down_is_unavailable_never_gone(fake_slurm):
    counting = CountingRunner(LocalRunner(path=f"{fake_slurm}:/usr/bin:/bin"))
    adapter = SlurmAdapter(counting)
    for ids in (["42", "43"], ["42"]):
        statuses = await adapter.query(ids)
        assert set(statuses) == set(ids)
        for status in statuses.values():
            assert status.state == JobState.UNKNOWN
            assert status.reason.startswith("scheduler unavailable:")
            assert "Unable to contact slurm controller" in status.reason
    # a failed squeue says nothing about the jobs: none of them is taken for one squeue forgot
    assert (counting.count("squeue"), counting.count("sacct")) == (2, 0)
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


# --- answers recorded from the test cluster (fixtures/slurm/record.py): the parsers without a daemon ---------

def recorded(case: str) -> dict[str, Any]:
    """One command of the adapter and Slurm's answer: argv, user, stdin, exit status, stdout, stderr."""
    return json.loads((FIXTURES / f"{case}.json").read_text())


class Replay(Runner):
    """Answers with recorded cases, in order; each command must be the one recorded."""

    def __init__(self, *cases: str):
        self.cases = list(cases)

    async def run(self, argv: Sequence[str], *, user: str | None = None, stdin: str | None = None,
                  timeout: float = 30.0) -> CommandResult:
        assert self.cases, f"no recorded answer left for {argv}"
        answer = recorded(self.cases.pop(0))
        assert (list(argv), user) == (answer["argv"], answer["user"]), f"not the command of {answer['case']}"
        return CommandResult(tuple(argv), answer["returncode"], answer["stdout"], answer["stderr"],
                             answer["duration_s"])


# case: state (and native state), reason, exit code
RECORDED_STATES = {
    "query-held": (JobState.PENDING, "JobHeldUser", None),
    "query-begin": (JobState.PENDING, "BeginTime", None),
    "query-resources": (JobState.PENDING, "Resources", None),
    "query-priority": (JobState.PENDING, "Priority", None),
    # accepted by sbatch, pending for good
    "query-over-time-limit": (JobState.PENDING, "PartitionTimeLimit", None),
    "query-over-node-limit": (JobState.PENDING, "PartitionNodeLimit", None),
    "query-running": (JobState.RUNNING, "", None),
    "query-completing": (JobState.COMPLETING, "", None),
    "query-completed": (JobState.COMPLETED, "", 0),
    "query-failed": (JobState.FAILED, "NonZeroExitCode", 3),
    "query-cancelled": (JobState.CANCELLED, "", 128 + signal.SIGTERM),
    "query-timeout": (JobState.TIMEOUT, "TimeLimit", 128 + signal.SIGTERM),
}


@pytest.mark.parametrize("case", RECORDED_STATES)
@pytest.mark.asyncio
async def test_recorded_job_states(case):
    state, reason, exit_code = RECORDED_STATES[case]
    [job_id] = recorded(case)["job_ids"]
    status = (await SlurmAdapter(Replay(case)).query([job_id]))[job_id]
    assert (status.state, status.native_state, status.reason, status.exit_code) == (
        state, state.value, reason, exit_code)
    if state is JobState.PENDING:
        assert status.nodes == ()
    else:
        assert len(status.nodes) == 1 and status.nodes[0] in ("c1", "c2")


@pytest.mark.asyncio
async def test_recorded_batch_of_every_kind():
    ids = recorded("query-batch")["job_ids"]
    held, begin, resources, priority, running, completed, failed, unknown = ids
    statuses = await SlurmAdapter(Replay("query-batch"), use_sacct=False).query(ids)
    assert [statuses[i].reason for i in (held, begin, resources, priority)] == [
        "JobHeldUser", "BeginTime", "Resources", "Priority"]
    assert [statuses[i].state for i in ids] == [JobState.PENDING] * 4 + [
        JobState.RUNNING, JobState.COMPLETED, JobState.FAILED, JobState.UNKNOWN]
    assert "MinJobAge" in statuses[unknown].reason


@pytest.mark.asyncio
async def test_recorded_details_give_partition_times_and_limit():
    answer = recorded("details-batch")
    held, running, completed, failed, unknown = answer["job_ids"]
    statuses = await SlurmAdapter(Replay("details-batch")).details(answer["job_ids"])
    printed = {line.split("\x1f")[0]: line.split("\x1f") for line in answer["stdout"].splitlines()}
    assert [statuses[i].state for i in answer["job_ids"]] == [JobState.PENDING, JobState.RUNNING, JobState.COMPLETED,
                                                              JobState.FAILED, JobState.UNKNOWN]
    assert (statuses[held].reason, statuses[failed].exit_code, statuses[running].nodes) == ("JobHeldUser", 3, ("c1",))
    for job_id in (held, running, completed, failed):
        assert (statuses[job_id].partition, statuses[job_id].time_limit_s) == ("debug", 300)
        assert statuses[job_id].submitted == datetime.fromisoformat(printed[job_id][6]).astimezone()
    assert statuses[held].started is None     # squeue's StartTime of a pending job is a plan, not a start
    assert statuses[running].started == datetime.fromisoformat(printed[running][7]).astimezone()
    assert statuses[unknown].state is JobState.UNKNOWN and statuses[unknown].partition == ""


@pytest.mark.asyncio
async def test_recorded_unknown_id_alone():
    [job_id] = recorded("query-invalid-id")["job_ids"]
    status = (await SlurmAdapter(Replay("query-invalid-id"), use_sacct=False).query([job_id]))[job_id]
    assert (status.state, status.native_state) == (JobState.UNKNOWN, "")
    assert "MinJobAge" in status.reason


@pytest.mark.parametrize("case", ["query-controller-down", "query-controller-down-many"])
@pytest.mark.asyncio
async def test_recorded_controller_down_is_unknown_without_sacct(case):
    ids = recorded(case)["job_ids"]
    replay = Replay(case)  # one answer only: a call of sacct would fail the test
    statuses = await SlurmAdapter(replay).query(ids)
    assert all(s.state is JobState.UNKNOWN and s.reason.startswith("scheduler unavailable:") and
               "Unable to contact slurm controller" in s.reason for s in statuses.values())
    assert set(statuses) == set(ids) and not replay.cases


@pytest.mark.asyncio
async def test_recorded_start_estimates_are_local_time(monkeypatch):
    answer = recorded("start-pending")
    held, begin, resources, priority, running = answer["job_ids"]
    printed = dict(line.split("\x1f")[:2] for line in answer["stdout"].splitlines())
    monkeypatch.setenv("TZ", "HPC-3")  # POSIX TZ: three hours east of UTC, no tz database needed
    time.tzset()
    try:
        estimates = await SlurmAdapter(Replay("start-pending")).estimate_start(answer["job_ids"])
    finally:
        monkeypatch.undo()
        time.tzset()
    assert list(estimates) == answer["job_ids"]
    assert printed[held] == "N/A" and estimates[held] is None
    assert running not in printed and estimates[running] is None
    assert estimates[begin] == datetime.fromisoformat(printed[begin]).replace(tzinfo=timezone(timedelta(hours=3)))
    assert estimates[begin] < estimates[resources] < estimates[priority]


@pytest.mark.asyncio
async def test_recorded_start_estimate_failures():
    [unknown] = recorded("start-invalid-id")["job_ids"]
    assert await SlurmAdapter(Replay("start-invalid-id")).estimate_start([unknown, "not-an-id"]) == {
        unknown: None, "not-an-id": None}
    with pytest.raises(SchedulerUnavailable, match="Unable to contact slurm controller"):
        await SlurmAdapter(Replay("start-controller-down")).estimate_start(recorded("start-controller-down")["job_ids"])


@pytest.mark.asyncio
async def test_recorded_submits():
    answer = recorded("submit-accepted")
    job_id = await SlurmAdapter(Replay("submit-accepted")).submit(answer["stdin"], REQUEST, user="alice")
    assert job_id == answer["stdout"].strip() and job_id.isdigit()
    # the answer is lost: the adapter looks for the job's tag, finds none, and says so
    replay = Replay("submit-controller-down", "tag-query-controller-down")
    with pytest.raises(SchedulerUnavailable, match="Unable to contact slurm controller") as error:
        await SlurmAdapter(replay).submit(recorded("submit-controller-down")["stdin"], REQUEST, user="alice")
    assert not isinstance(error.value, SubmitRejected) and not replay.cases


@pytest.mark.parametrize("case, reason", [
    ("submit-rejected-partition", "invalid partition specified: no-such-partition\n"
                                  "Batch job submission failed: Invalid partition name specified"),
    ("submit-rejected-memory", "Memory specification can not be satisfied\n"
                               "Batch job submission failed: Requested node configuration is not available"),
    ("submit-rejected-option", "sbatch: unrecognized option '--no-such-option'\n"
                               'Try "sbatch --help" for more information'),
])
@pytest.mark.asyncio
async def test_recorded_sbatch_rejections(case, reason):
    assert (await submit_refused(SlurmAdapter(Replay(case)), recorded(case)["stdin"], REQUEST)).reason == reason


@pytest.mark.asyncio
async def test_recorded_cancels():
    # the goal of a cancel is a job that no longer runs: finished and unknown ids are no error
    for case in ("cancel-many", "cancel-finished", "cancel-unknown-id"):
        await SlurmAdapter(Replay(case)).cancel(recorded(case)["job_ids"], user="alice")
    [bobs] = recorded("cancel-other-user")["job_ids"]
    for case in ("cancel-other-user", "cancel-mixed"):  # bob's job alone, and among finished and unknown ones
        error = await cancel_refused(SlurmAdapter(Replay(case)), recorded(case)["job_ids"])
        assert error.reason == f"Kill job error on job id {bobs}: Access/permission denied"
    with pytest.raises(SchedulerUnavailable, match="Unable to contact slurm controller"):
        await SlurmAdapter(Replay("cancel-controller-down")).cancel(recorded("cancel-controller-down")["job_ids"],
                                                                    user="alice")


@pytest.mark.asyncio
async def test_recorded_tag_lookup():
    answer = recorded("tag-query")
    assert len(answer["tag"]) > 40  # squeue -O prints a comment whole when the field has no width
    assert await SlurmAdapter(Replay("tag-query")).find_by_tag(answer["tag"]) == answer["job_ids"]
    assert await SlurmAdapter(Replay("tag-query")).find_by_tag("hpchub-no-such-tag") == []
    assert await SlurmAdapter(Replay("tag-query-controller-down")).find_by_tag(answer["tag"]) == []


# --- live, as alice: many jobs, estimates, finished states, a lost submit answer, the controller down -----

@pytest.mark.asyncio
async def test_fifty_jobs_cost_one_squeue_each_query_and_one_scancel(counting, jobs, shared_dir):
    """Two jobs fill both nodes, one more waits behind them, 49 are held or wait for a begin time."""
    adapter = SlurmAdapter(counting)

    async def submit(count: int, *directives: str) -> list[str]:
        ids = [await adapter.submit(script(shared_dir, "sleep 300", *directives), REQUEST, user="alice")
               for _ in range(count)]
        jobs.extend(ids)
        return ids

    whole_node = ("--cpus-per-task=8", "--time=1")
    fillers = await submit(2, *whole_node)
    await wait_until(lambda: adapter.query(fillers), lambda s: all(s[i].state is JobState.RUNNING for i in fillers),
                     timeout=120)
    [blocked] = await submit(1, *whole_node)
    begin = datetime.now().astimezone().replace(microsecond=0) + timedelta(seconds=120)
    held = await submit(24, "--hold")
    later = await submit(25, "--begin=now+120")
    ids = [*fillers, blocked, *held, *later]
    calls = {"squeue": counting.count("squeue"), "query": 0, "estimate": 0}

    async def query() -> dict[str, JobStatus]:
        calls["query"] += 1
        return await adapter.query(ids)

    async def estimate() -> dict[str, datetime | None]:
        calls["estimate"] += 1
        return await adapter.estimate_start(ids)

    statuses = await wait_until(query, lambda s: s[blocked].reason in ("Resources", "Priority") and all(
        s[i].reason == "BeginTime" for i in later))
    assert sorted(statuses[i].nodes for i in fillers) == [("c1",), ("c2",)]
    assert all(statuses[i].state is JobState.RUNNING for i in fillers)
    assert all((s.state, s.native_state) == (JobState.PENDING, "PENDING") for s in (statuses[i] for i in ids[2:]))
    assert all(statuses[i].reason == "JobHeldUser" for i in held)

    estimates = await wait_until(estimate, lambda e: e[blocked] is not None, timeout=30)
    now = datetime.now().astimezone()
    assert all(estimates[i] is None for i in (*fillers, *held))
    assert all(timedelta(0) <= estimates[i] - begin < timedelta(seconds=10) for i in later)
    assert now < estimates[blocked] <= now + timedelta(seconds=60)  # a node frees when a filler's minute ends
    squeues = [argv for argv in counting.calls if argv[0] == "squeue"][calls["squeue"]:]
    assert len(ids) == 52 and len(squeues) == calls["query"] + calls["estimate"]
    assert squeues.count(tuple(adapter.query_argv(ids))) == calls["query"]
    assert squeues.count(tuple(adapter.start_argv(ids))) == calls["estimate"]

    await adapter.cancel(ids, user="alice")
    assert counting.count("scancel") == 1 and counting.calls[-1] == ("scancel", *ids)
    await wait_until(query, lambda s: all(s[i].state is JobState.CANCELLED for i in ids))


@pytest.mark.asyncio
async def test_finished_job_states(counting, jobs, shared_dir):
    adapter = SlurmAdapter(counting)
    # first: slurmctld checks walltimes every 30 s, so a one-minute job ends 60 to 90 s after it started
    bodies = {"timeout": ("sleep 300", "--time=1"), "completed": ("true",), "failed": ("exit 3",),
              "cancelled": ("sleep 300",)}
    ids = {kind: await adapter.submit(script(shared_dir, *body), REQUEST, user="alice")
           for kind, body in bodies.items()}
    jobs.extend(ids.values())
    await wait_until(lambda: adapter.query([ids["cancelled"]]),
                     lambda s: s[ids["cancelled"]].state is JobState.RUNNING)
    await adapter.cancel([ids["cancelled"]], user="alice")
    statuses = await wait_until(lambda: adapter.query(ids.values()),
                                lambda s: all(status.state.is_terminal for status in s.values()),
                                timeout=150, interval=1.0)
    assert {kind: (statuses[i].state, statuses[i].reason, statuses[i].exit_code) for kind, i in ids.items()} == {
        "timeout": (JobState.TIMEOUT, "TimeLimit", 128 + signal.SIGTERM),
        "completed": (JobState.COMPLETED, "", 0),
        "failed": (JobState.FAILED, "NonZeroExitCode", 3),
        "cancelled": (JobState.CANCELLED, "", 128 + signal.SIGTERM),
    }


class Substitute(Runner):
    """Runs `program` in place of the command `name`. sudo looks commands up in its own secure_path, so a
    stand-in cannot come first on PATH: it is given by its path."""

    def __init__(self, inner: Runner, name: str, program: str):
        self.inner, self.name, self.program = inner, name, program

    async def run(self, argv: Sequence[str], *, user: str | None = None, stdin: str | None = None,
                  timeout: float = 30.0) -> CommandResult:
        if argv[0] == self.name:
            argv = [self.program, *argv[1:]]
        return await self.inner.run(argv, user=user, stdin=stdin, timeout=timeout)


@pytest.mark.asyncio
async def test_lost_sbatch_answer_is_found_by_the_jobs_tag(jobs, shared_dir, test_users):
    silent = shared_dir / "sbatch"  # submits for real, then never answers
    silent.write_text(f'#!/bin/sh\n{shutil.which("sbatch")} "$@"\nexec sleep 60\n')
    silent.chmod(0o755)
    adapter = SlurmAdapter(CountingRunner(Substitute(SudoRunner(), "sbatch", str(silent))), command_timeout=3)
    request = JobRequest(name="hpchub-test", tag=f"hpchub-test-{uuid.uuid4().hex}", walltime_s=300,
                         output=f"{shared_dir}/slurm-%j.out")
    await submit_with_lost_answer(adapter, request, ["sleep", "300"], jobs)


@pytest.mark.asyncio
async def test_controller_down_for_real_is_unknown_within_the_timeout(counting, jobs, shared_dir):
    """slurmctld really stopped, for about 15 s. squeue then retries for 9 s (18 s with a single id) before
    it reports "Unable to contact slurm controller": a 5 s timeout ends the query first, a 15 s one gets the
    message. Either way the job is UNKNOWN, never gone, and still runs when the controller is back."""
    adapter = SlurmAdapter(counting)
    running = await adapter.submit(script(shared_dir, "sleep 300"), REQUEST, user="alice")
    jobs.append(running)
    before = (await wait_until(lambda: adapter.query([running]),
                               lambda s: s[running].state is JobState.RUNNING))[running]

    async def timed(command_timeout: float, ids: list[str]) -> tuple[dict[str, JobStatus], float]:
        started = time.monotonic()
        statuses = await SlurmAdapter(counting, command_timeout=command_timeout).query(ids)
        return statuses, time.monotonic() - started

    with controller_stopped():
        (alone, alone_s), (pair, pair_s) = await asyncio.gather(timed(5, [running]), timed(15, [running, "999999990"]))
    status = alone[running]
    assert status.state is JobState.UNKNOWN and alone_s < 5 + 2
    assert status.reason.startswith("scheduler unavailable:") and "did not finish within 5 s" in status.reason
    assert pair_s < 15 and all(s.state is JobState.UNKNOWN for s in pair.values())
    assert all(s.reason.startswith("scheduler unavailable:") and "Unable to contact slurm controller" in s.reason
               for s in pair.values())
    assert (counting.count("sacct"), counting.count("scancel")) == (0, 0)
    after = (await adapter.query([running]))[running]
    assert (after.state, after.nodes) == (JobState.RUNNING, before.nodes)


@pytest.mark.asyncio
async def test_queue_position_follows_slurms_priority_order(counting, jobs, shared_dir):
    adapter = SlurmAdapter(counting)
    for _ in range(3):
        jobs.append(await adapter.submit(script(shared_dir, "true", "--hold", "--partition=long"), REQUEST,
                                         user="alice"))
    before = counting.count("squeue")
    positions = [await adapter.queue_position(job) for job in jobs]
    assert [(p.position, p.pending, p.partition) for p in positions] == [(1, 3, "long"), (2, 3, "long"), (3, 3, "long")]
    assert counting.count("squeue") - before == 3  # one call each, on demand
    assert await adapter.queue_position("999999999") is None
