"""SGEAdapter against the real Son of Grid Engine of docker/sge-cluster/cluster.sh (jobs run as alice), and
its parsers on outputs recorded from that cluster (tests/fixtures/sge, written by record.py there)."""
from __future__ import annotations

import functools
import json
import re
import socket
import subprocess
import time
from pathlib import Path
from typing import Sequence

from datetime import datetime

import pytest

import helpers
from conftest import require_service
from helpers import CountingRunner, alive, cancel_refused, cancelled_at_end, ended, submit_refused, wait_for
from job_templates import render_job_script
from schedulers import (CommandResult, CommandTimeout, JobRequest, JobState, Runner, SchedulerError,
                        SchedulerUnavailable, SubmitRejected)
from schedulers.sge import SGEAdapter, explanation, job_state, parse_accounting

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "sge"
RECORDED = json.loads((FIXTURES / "jobs.json").read_text())
CLUSTER_SH = Path(__file__).resolve().parents[1] / "docker" / "sge-cluster" / "cluster.sh"
QMASTER_PID = Path("/var/spool/gridengine/qmaster/qmaster.pid")
REQUEST = JobRequest(name="hpchub-test", tag="hpchub-test")
QSTAT = ("qstat", "-xml", "-u", "*", "-s", "prsz")
wait_until = functools.partial(helpers.wait_until, timeout=60.0, interval=0.2)


def fixture(name: str) -> str:
    return (FIXTURES / name).read_text()


class RecordedRunner(Runner):
    """Answers commands with outputs recorded from the real cluster; a command it has none for fails."""

    def __init__(self, answers: dict[tuple[str, ...], tuple[int, str, str] | SchedulerError]):
        self.answers = answers

    async def run(self, argv: Sequence[str], *, user: str | None = None, stdin: str | None = None,
                  timeout: float = 30.0) -> CommandResult:
        answer = self.answers[tuple(argv)]
        if isinstance(answer, SchedulerError):
            raise answer
        returncode, stdout, stderr = answer
        return CommandResult(tuple(argv), returncode, stdout, stderr, 0.0)


def down(name: str) -> tuple[int, str, str]:
    """A recorded "exit N" line and stderr (most of a command run while sge_qmaster was stopped)."""
    status, _, stderr = fixture(name).partition("\n")
    return int(status.removeprefix("exit ")), "", stderr


# --- parsers, on recorded outputs -----------------------------------------------------------------
def test_states_letter_by_letter():
    assert job_state("r") == (JobState.RUNNING, "")
    assert job_state("Rr")[0] is JobState.RUNNING
    assert job_state("qw") == (JobState.PENDING, "")
    assert job_state("hqw") == (JobState.PENDING, "on hold")
    assert job_state("t") == (JobState.PENDING, "being transferred to its host")
    assert job_state("s") == (JobState.PENDING, "suspended")
    assert job_state("S")[1] == "suspended with its queue" and job_state("T")[0] is JobState.PENDING
    assert job_state("Eqw")[0] is JobState.FAILED and job_state("Ehqw")[0] is JobState.FAILED
    assert job_state("dr") == (JobState.COMPLETING, "being deleted")
    assert job_state("z") == (JobState.COMPLETING, "ended")
    assert job_state("x")[0] is JobState.UNKNOWN


@pytest.mark.asyncio
async def test_one_recorded_qstat_answers_for_every_job():
    ids = [RECORDED[role] for role in ("running", "suspended", "held", "waiting", "error")]
    runner = CountingRunner(RecordedRunner({QSTAT: (0, fixture("qstat-all.xml"), "")}))
    statuses = await SGEAdapter(runner).query(ids)
    assert runner.calls == [QSTAT]
    got = {role: statuses[RECORDED[role]] for role in ("running", "suspended", "held", "waiting", "error")}
    assert (got["running"].state, got["running"].native_state, got["running"].nodes) == (
        JobState.RUNNING, "r", ("vm",))
    assert (got["suspended"].state, got["suspended"].reason, got["suspended"].nodes) == (
        JobState.PENDING, "suspended", ("vm",))
    assert (got["held"].state, got["held"].native_state, got["held"].reason) == (JobState.PENDING, "hqw", "on hold")
    assert (got["waiting"].state, got["waiting"].native_state, got["waiting"].nodes) == (JobState.PENDING, "qw", ())
    assert (got["error"].state, got["error"].native_state) == (JobState.FAILED, "Eqw")
    assert all(s.estimated_start is None and s.exit_code is None for s in statuses.values())
    # the queue and start time of a job that runs, the submit time of one that waits: qstat's local time
    recorded_time = datetime(2026, 11, 22, 0, 14, 41).astimezone()
    assert (got["running"].partition, got["running"].started) == ("all.q", recorded_time)
    assert (got["waiting"].partition, got["waiting"].submitted, got["waiting"].started) == ("", recorded_time, None)


@pytest.mark.asyncio
async def test_ended_jobs_are_looked_up_in_accounting_one_qacct_each():
    exit3, pending, gone, never = RECORDED["exit3"], RECORDED["deleted_pending"], RECORDED["exit0"], "999999"
    answers = {
        QSTAT: (0, fixture("qstat-all.xml").replace(f"<JB_job_number>{gone}<", "<JB_job_number>1<"), ""),
        ("qacct", "-j", exit3): (0, fixture("qacct-exit3.txt"), ""),
        ("qacct", "-j", gone): (0, fixture("qacct-exit0.txt"), ""),
        ("qacct", "-j", pending): (1, "", fixture("qacct-missing.txt").replace("999999", pending)),
        ("qacct", "-j", never): (1, "", fixture("qacct-missing.txt")),
    }
    runner = CountingRunner(RecordedRunner(answers))
    statuses = await SGEAdapter(runner).query([exit3, pending, gone, never, "12.x"])
    assert runner.count("qstat") == 1 and runner.count("qacct") == 4
    assert (statuses[exit3].state, statuses[exit3].exit_code, statuses[exit3].nodes) == (JobState.FAILED, 3, ("vm",))
    # listed as ended ("z"), no record: deleted while pending
    assert (statuses[pending].state, statuses[pending].native_state) == (JobState.CANCELLED, "z")
    # left qstat's list: the accounting file tells
    assert (statuses[gone].state, statuses[gone].exit_code) == (JobState.COMPLETED, 0)
    # neither listed nor recorded: unknown, never gone
    assert statuses[never].state is JobState.UNKNOWN and "job id 999999 not found" in statuses[never].reason
    assert statuses["12.x"].state is JobState.UNKNOWN
    # a cap on qacct calls per query: the rest waits for a later query, still UNKNOWN or "ended"
    capped = await SGEAdapter(RecordedRunner(answers), accounting_lookups=1).query([never, exit3])
    assert capped[never].state is JobState.UNKNOWN and capped[exit3].state is JobState.COMPLETING
    # a qacct that times out ends the lookups of this query
    runner = CountingRunner(RecordedRunner({**answers, ("qacct", "-j", never): CommandTimeout("qacct hangs")}))
    stalled = await SGEAdapter(runner).query([never, exit3])
    assert runner.count("qacct") == 1
    assert (stalled[never].state, stalled[exit3].state) == (JobState.UNKNOWN, JobState.COMPLETING)


def test_accounting_records():
    cases = {
        "exit0": (JobState.COMPLETED, 0, ""),
        "exit3": (JobState.FAILED, 3, ""),
        "timeout": (JobState.TIMEOUT, 137, "failed 37: qmaster enforced h_rt, h_cpu, or h_vmem limit"),
        "deleted_running": (JobState.CANCELLED, 137, "failed 100: assumedly after job"),
    }
    for role, expected in cases.items():
        job_id = RECORDED[role]
        status = parse_accounting(fixture(f"qacct-{role.replace('_', '-')}.txt"), job_id)
        assert status is not None and (status.state, status.exit_code, status.reason) == expected, role
        assert status.nodes == ("vm",)
    assert parse_accounting(fixture("qacct-exit0.txt"), "1") is None
    # a job that never started (its working directory is missing: "Eqw") has no meaningful exit status
    status = parse_accounting(fixture("qacct-error.txt"), RECORDED["error"])
    assert status is not None and (status.state, status.exit_code, status.reason) == (
        JobState.FAILED, None, "failed 28: changing into working directory")


@pytest.mark.asyncio
async def test_tag_found_in_the_job_context_in_one_call():
    runner = CountingRunner(RecordedRunner({("qstat", "-j", "*"): (0, fixture("qstat-j-all.txt"), "")}))
    adapter = SGEAdapter(runner)
    assert await adapter.find_by_tag("tag-of-held") == [RECORDED["held"]]
    assert await adapter.find_by_tag("no-such-tag") == []
    assert await adapter.find_by_tag("tag") == []
    assert len(runner.calls) == 3
    # no job at all: qstat -j exits 1 with "Following jobs do not exist"
    none = RecordedRunner({("qstat", "-j", "*"): down("qstat-j-none.txt")})
    assert "Following jobs do not exist" in none.answers[("qstat", "-j", "*")][2]
    assert SGEAdapter(none).parse_tag_query(await none.run(["qstat", "-j", "*"]), "tag") == []
    gone = RecordedRunner({("qstat", "-j", "*"): down("qstat-qmaster-down.txt")})
    with pytest.raises(SchedulerUnavailable, match="commlib error"):
        SGEAdapter(gone).parse_tag_query(await gone.run(["qstat", "-j", "*"]), "tag")


def test_explanation_of_waiting_and_error_jobs():
    assert explanation(fixture("qstat-j-waiting.txt")).splitlines() == [
        'cannot run in queue "short.q" because it is not contained in its hard queue list (-q)',
        'cannot run in PE "smp" because it only offers 0 slots']
    error = explanation(fixture("qstat-j-error.txt"))
    assert "can't chdir to /nonexistent: No such file or directory" in error and "Job is in error state" in error


@pytest.mark.asyncio
async def test_qmaster_down_is_unavailable_never_gone():
    adapter = SGEAdapter(RecordedRunner({
        QSTAT: down("qstat-qmaster-down.txt"),
        ("qsub", "-terse"): down("qsub-qmaster-down.txt"),
        ("qdel", "42"): down("qdel-qmaster-down.txt"),
        ("qstat", "-j", "*"): down("qstat-qmaster-down.txt"),
    }))
    statuses = await adapter.query(["42", "43"])
    assert {s.state for s in statuses.values()} == {JobState.UNKNOWN}
    assert all("commlib error: got select error (Connection refused)" in s.reason for s in statuses.values())
    with pytest.raises(SchedulerUnavailable, match="unable to send message to qmaster") as error:
        await adapter.submit("#!/bin/bash\ntrue\n", REQUEST)
    assert not isinstance(error.value, SubmitRejected)
    with pytest.raises(SchedulerUnavailable, match="commlib error"):
        await adapter.cancel(["42"])


@pytest.mark.asyncio
async def test_recorded_qsub_and_qdel_answers():
    held, done = RECORDED["held"], RECORDED["exit0"]
    adapter = SGEAdapter(RecordedRunner({("qsub", "-terse"): (1, "", fixture("qsub-rejected.txt")),
                                         ("qdel", held, done, "999999"): (1, fixture("qdel-mixed.txt"), "")}))
    with pytest.raises(SubmitRejected) as error:
        await adapter.submit("#!/bin/bash\ntrue\n", REQUEST)
    assert error.value.reason == 'Job was rejected because job requests unknown queue "nosuch.q"'
    # bob may not delete alice's held job; the ended one and 999999 are over: only the first is an error
    error = await cancel_refused(adapter, [held, done, "999999"], f'privileges to delete the job "{held}"')
    assert error.reason.count("\n") == 0
    ended = "\n".join(line for line in fixture("qdel-mixed.txt").splitlines() if "privileges" not in line)
    await SGEAdapter(RecordedRunner({("qdel", done, "999999"): (1, ended, "")})).cancel([done, "999999"])


def test_template_directives():
    request = JobRequest(name="jupyterhub-alice", tag="0123abcd", cores=4, memory_mb=2050, gpus=1, walltime_s=5400,
                         partition="short.q", account="hpchub", reservation="12", constraint="infiniband",
                         workdir="/home/alice", output="/home/alice/logs/jupyterhub-%j.log",
                         extra_directives=("-m n",))
    script = render_job_script("sge.sh.j2", request, user="alice", env_file="/dev/null", command=["true"])
    assert [line for line in script.splitlines() if line.startswith("#$")] == [
        "#$ -N jupyterhub-alice", "#$ -ac hpchub_tag=0123abcd", "#$ -S /bin/bash", "#$ -w e", "#$ -pe smp 4",
        "#$ -l h_vmem=513M", "#$ -l gpu=1", "#$ -l h_rt=01:30:00", "#$ -q short.q", "#$ -P hpchub", "#$ -ar 12",
        "#$ -l infiniband", "#$ -wd /home/alice", "#$ -o /home/alice/logs/jupyterhub-$JOB_ID.log", "#$ -j y",
        "#$ -m n",
    ]
    small = render_job_script("sge.sh.j2", JobRequest(name="n", tag="t", nodes=2, cores=3, error="/tmp/e-%j"),
                              user="alice", env_file="/dev/null", command=["true"])
    assert "#$ -pe mpi 6\n" in small and "#$ -e /tmp/e-$JOB_ID\n" in small
    assert "-j y" not in small and "h_vmem" not in small and "-q " not in small and "-P " not in small


# --- the real cluster ---------------------------------------------------------------------------------
@pytest.fixture
def jobs(sge_cluster):
    """Job ids a test submitted; whatever is left is deleted at the end (root is an SGE manager)."""
    yield from cancelled_at_end("qdel", timeout=60)


def script(directory: Path, body: str, *directives: str) -> str:
    lines = ["#!/bin/bash", "#$ -N hpchub-test", "#$ -S /bin/bash", f"#$ -o {directory}/sge-$JOB_ID.out", "#$ -j y",
             *(f"#$ {d}" for d in directives), body]
    return "\n".join(lines) + "\n"


async def submit_all(adapter: SGEAdapter, jobs: list[str], scripts: list[str], user: str = "alice") -> list[str]:
    ids = []
    for text in scripts:
        ids.append(await adapter.submit(text, REQUEST, user=user))
        jobs.append(ids[-1])
    return ids


async def sleeping_and_held(adapter: SGEAdapter, jobs: list[str], directory: Path, sleeping: int,
                            held: int) -> tuple[list[str], list[str]]:
    """`sleeping` jobs of alice's that sleep for 300 s, and `held` ones on hold."""
    return (await submit_all(adapter, jobs, [script(directory, "sleep 300")] * sleeping),
            await submit_all(adapter, jobs, [script(directory, "true", "-h")] * held))


@pytest.mark.asyncio
async def test_rendered_job_runs_as_alice_and_ends_failed_with_its_exit_code(counting, jobs, shared_dir):
    adapter = SGEAdapter(counting)
    go = shared_dir / "go"
    request = JobRequest(name="hpchub-e2e", tag="e2e-0123abcd", cores=2, memory_mb=1000, gpus=1, walltime_s=600,
                         partition="all.q", account="hpchub", workdir=str(shared_dir),
                         output=f"{shared_dir}/jupyterhub-%j.log")
    body = (f'echo "user=$(id -un) cwd=$PWD queue=$QUEUE pe=$PE slots=$NSLOTS vmem_kb=$(ulimit -v) '
            f'token=$HPCHUB_TOKEN"; while [ ! -e {go} ]; do sleep 0.1; done; exit 3')
    text = render_job_script("sge.sh.j2", request, user="alice", env_file=helpers.env_file(shared_dir, {"HPCHUB_TOKEN": "not in argv"}),
                             command=["/bin/bash", "-c", body])
    job_id = await adapter.submit(text, request, user="alice")
    jobs.append(job_id)
    assert counting.calls[-1] == ("qsub", "-terse") and job_id.isdigit()
    statuses = await wait_until(lambda: adapter.query([job_id]), lambda s: s[job_id].state is JobState.RUNNING)
    assert statuses[job_id].nodes == (socket.gethostname(),)
    assert await adapter.find_by_tag("e2e-0123abcd") == [job_id]

    go.touch()
    statuses = await wait_until(lambda: adapter.query([job_id]), lambda s: s[job_id].state.is_terminal)
    assert (statuses[job_id].state, statuses[job_id].exit_code) == (JobState.FAILED, 3)
    assert counting.count("qacct") >= 1
    log = (shared_dir / f"jupyterhub-{job_id}.log").read_text()
    # h_vmem is per slot: 500 MiB on each of the 2 slots, 1000 MiB for the job
    assert f"user=alice cwd={shared_dir} queue=all.q pe=smp slots=2 vmem_kb={1000 * 1024} token=not in argv" in log
    assert "hpchub: job started on" in log


@pytest.mark.asyncio
async def test_query_of_54_jobs_is_one_qstat(counting, jobs, shared_dir):
    adapter = SGEAdapter(counting)
    # all.q has 8 slots: 10 sleepers are 8 running and 2 waiting; 44 more held
    sleepers, held = await sleeping_and_held(adapter, jobs, shared_dir, 10, 44)
    ids = sleepers + held
    await wait_until(lambda: adapter.query(ids), lambda s: sum(s[i].state is JobState.RUNNING for i in sleepers) == 8)
    before = len(counting.calls)
    statuses = await adapter.query(ids)
    assert counting.calls[before:] == [QSTAT]
    running = [statuses[i] for i in sleepers if statuses[i].state is JobState.RUNNING]
    waiting = [statuses[i] for i in sleepers if statuses[i].state is not JobState.RUNNING]
    assert all(s.nodes == (socket.gethostname(),) and s.native_state == "r" for s in running)
    assert [(s.state, s.native_state, s.nodes) for s in waiting] == [(JobState.PENDING, "qw", ())] * 2
    assert {(statuses[i].state, statuses[i].native_state, statuses[i].reason) for i in held} == {
        (JobState.PENDING, "hqw", "on hold")}
    assert "cannot run" in await adapter.explain(waiting[0].job_id)


@pytest.mark.asyncio
async def test_cancel_many_in_one_qdel(counting, jobs, shared_dir):
    adapter = SGEAdapter(counting)
    running, held = await sleeping_and_held(adapter, jobs, shared_dir, 3, 2)
    ids = running + held
    await wait_until(lambda: adapter.query(ids), lambda s: all(s[i].state is JobState.RUNNING for i in running))

    before = counting.count("qdel")
    await adapter.cancel(ids, user="alice")
    assert counting.count("qdel") == before + 1 and counting.calls[-1] == ("qdel", *ids)
    statuses = await wait_until(lambda: adapter.query(ids), ended(*ids))
    # a running job deleted: accounting says failed 100 with SIGKILL; a held one is just listed as ended
    assert {(statuses[i].state, statuses[i].exit_code, statuses[i].native_state) for i in running} == {
        (JobState.CANCELLED, 137, "failed 100")}
    assert {(statuses[i].state, statuses[i].native_state) for i in held} == {(JobState.CANCELLED, "z")}

    # ended jobs, and an id SGE never had: not an error
    await adapter.cancel([*ids, "999999"], user="alice")
    bobs = (await submit_all(adapter, jobs, [script(shared_dir, "true", "-h")], user="bob"))[0]
    await cancel_refused(adapter, [bobs, ids[0]], "privileges")
    assert (await adapter.query([bobs]))[bobs].state is JobState.PENDING


@pytest.mark.asyncio
async def test_rejections_carry_sges_message(sge_cluster, counting, shared_dir):
    adapter = SGEAdapter(counting)
    error = await submit_refused(adapter, script(shared_dir, "true", "-q nosuch.q"), REQUEST)
    assert error.reason == 'Job was rejected because job requests unknown queue "nosuch.q"'
    # the template's `-w e`: a job no queue can ever run is refused at once, not left pending
    too_big = JobRequest(name="too-big", tag="too-big", cores=16, partition="short.q")
    text = render_job_script("sge.sh.j2", too_big, user="alice", env_file="/dev/null", command=["true"])
    await submit_refused(adapter, text, too_big, "no suitable queues")
    await submit_refused(adapter, script(shared_dir, "true", "-P nosuch"), REQUEST,
                         'requested project "nosuch" does not exist')


def _qmaster_pid() -> int:
    return int(QMASTER_PID.read_text().strip())


@pytest.mark.asyncio
async def test_qmaster_stopped_is_unknown_then_back(counting, jobs, shared_dir):
    require_service("root", subprocess.run(["id", "-u"], capture_output=True, text=True).stdout.strip() == "0",
                    "stopping sge_qmaster needs root: run the tests as root")
    adapter = SGEAdapter(counting, command_timeout=10)
    [running], [held] = await sleeping_and_held(adapter, jobs, shared_dir, 1, 1)
    ids = [running, held]
    await wait_until(lambda: adapter.query(ids), lambda s: s[running].state is JobState.RUNNING)
    pid = _qmaster_pid()
    subprocess.run(["kill", "-TERM", str(pid)], check=True, timeout=10)
    try:
        wait_for(lambda: not alive(pid), 60, "sge_qmaster to stop")
        qacct_before = counting.count("qacct")
        t0 = time.monotonic()
        statuses = await adapter.query(ids)
        assert time.monotonic() - t0 < adapter.command_timeout
        assert {s.state for s in statuses.values()} == {JobState.UNKNOWN}
        assert all(re.search(r"scheduler unavailable: .*commlib error", s.reason) for s in statuses.values())
        assert counting.count("qacct") == qacct_before, "nothing may be looked up as gone while qstat fails"
        with pytest.raises(SchedulerUnavailable, match="unable to send message to qmaster"):
            await adapter.submit(script(shared_dir, "true"), REQUEST, user="alice")
        with pytest.raises(SchedulerUnavailable, match="commlib error"):
            await adapter.cancel(ids, user="alice")
    finally:
        start = subprocess.run([str(CLUSTER_SH), "start"], capture_output=True, text=True, timeout=180,
                               stdin=subprocess.DEVNULL)
        assert start.returncode == 0, start.stderr
    # the job ran on meanwhile (sge_execd kept it); both are back as they were
    statuses = await wait_until(lambda: adapter.query(ids), lambda s: s[running].state is JobState.RUNNING)
    assert statuses[held].state is JobState.PENDING


def _daemon_pids() -> list[str]:
    files = [QMASTER_PID, *Path("/var/spool/gridengine/execd").glob("*/execd.pid")]
    return sorted(f.read_text().strip() for f in files if f.exists())


def test_cluster_start_again_is_a_quick_no_op(sge_cluster):
    require_service("root", subprocess.run(["id", "-u"], capture_output=True, text=True).stdout.strip() == "0",
                    "cluster.sh must run as root: run the tests as root")
    # the first run converges (this checkout's sge.conf.in may differ from what runs); the second must
    # find nothing to do. Output through pipes: no daemon may hold them.
    first = subprocess.run([str(CLUSTER_SH), "start"], capture_output=True, text=True, timeout=180,
                           stdin=subprocess.DEVNULL)
    assert first.returncode == 0, first.stderr
    before = _daemon_pids()
    t0 = time.monotonic()
    second = subprocess.run([str(CLUSTER_SH), "start"], capture_output=True, text=True, timeout=120,
                            stdin=subprocess.DEVNULL)
    assert second.returncode == 0, second.stderr
    assert time.monotonic() - t0 < 10
    assert re.fullmatch(r"SGE cluster ready on \S+ in [0-9.]+ s: queues all\.q short\.q; nothing to start\n",
                        second.stdout), second.stdout + second.stderr
    assert _daemon_pids() == before and len(before) == 2
    short = subprocess.run(["qconf", "-sq", "short.q"], capture_output=True, text=True, timeout=10).stdout
    assert re.search(r"^h_rt\s+00:10:00$", short, re.M) and re.search(r"^slots\s+2$", short, re.M)
    status = subprocess.run([str(CLUSTER_SH), "status"], capture_output=True, text=True, timeout=30)
    assert status.returncode == 0 and "sge_qmaster: running" in status.stdout, status.stdout + status.stderr
