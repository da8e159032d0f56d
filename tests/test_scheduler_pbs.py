"""PBSAdapter against the PBS emulator (tests/pbs_emulator; docs/pbs-emulation.md), whose jobs really run as alice,
and the parser against reference outputs in the formats PBS Professional documents (tests/fixtures/pbs)."""
from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Sequence

import pytest

import helpers
from helpers import CountedQuery, cancel_refused, ended, submit_refused
from job_templates import render_job_script
from schedulers import (CommandResult, CommandTimeout, JobRequest, JobState, JobStatus, LocalRunner, Runner,
                        SchedulerError, SchedulerUnavailable, SubmitRejected, SudoRunner)
from schedulers.pbs import PBSAdapter
from schedulers.runner import SAFE_PATH

EMULATOR = Path(__file__).with_name("pbs_emulator")
FIXTURES = Path(__file__).with_name("fixtures") / "pbs"
SERVER = "pbsemu"
NCPUS = 64
REQUEST = JobRequest(name="hpchub-test", tag="hpchub-test")
NODE = socket.gethostname().split(".")[0]
wait_until = helpers.wait_until


class Emulator:
    """An installed emulated server: its commands in bin/, its state in home/."""

    def __init__(self, root: Path):
        self.root, self.bin, self.home = root, root / "bin", root / "home"

    def run(self, command: str, *args: str, user: str | None = None, stdin: str = "") -> subprocess.CompletedProcess:
        argv = [str(self.bin / command), *args]
        if user is not None:
            argv = ["sudo", "-n", "-u", user, "--", *argv]
        return subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=30)

    def jobs(self) -> dict[str, dict]:
        return json.loads(self.run("qstat", "-f", "-F", "json", "-x").stdout).get("Jobs", {})


@pytest.fixture
def pbs(world: Path) -> Emulator:
    """A fresh emulated server (one node of NCPUS CPUs, queues workq and debug) per test, installed where the test
    users run it from; whatever a test leaves queued or running is deleted and waited for."""
    assert not sys.executable.startswith("/root"), (
        f"run the tests with a Python the test users can execute, e.g. /opt/hpchub/bin/python, not {sys.executable}")
    root = Path(tempfile.mkdtemp(prefix="server-", dir=world))
    subprocess.run([sys.executable, str(EMULATOR / "pbs_emu.py"), "install", str(root), "--server", SERVER,
                    "--ncpus", str(NCPUS), "--queues", "workq,debug", "--kill-delay", "1"],
                   check=True, capture_output=True, timeout=60)
    emulator = Emulator(root)
    yield emulator
    (emulator.home / "server_down").unlink(missing_ok=True)
    left = [job_id for job_id, job in emulator.jobs().items() if job["job_state"] != "F"]
    if left:
        emulator.run("qdel", *left)
        helpers.wait_for(lambda: all(job["job_state"] == "F" for job in emulator.jobs().values()), 20,
                         "the emulated jobs to end")
    shutil.rmtree(root, ignore_errors=True)


def adapter_for(pbs: Emulator, runner: Runner) -> PBSAdapter:
    return PBSAdapter(runner, pbs_exec=str(pbs.root))


def script(directory: Path, body: str, *directives: str) -> str:
    lines = ["#!/bin/bash", "#PBS -N hpchub-test", f"#PBS -o {directory}/", "#PBS -j oe",
             *(f"#PBS {d}" for d in directives), body]
    return "\n".join(lines) + "\n"


@pytest.mark.asyncio
async def test_lifecycle_as_alice_with_one_qstat_per_query(pbs, counting, shared_dir):
    adapter = adapter_for(pbs, counting)
    go = shared_dir / "go"
    ids: list[str] = []
    query = CountedQuery(adapter, ids)
    waiter = await adapter.submit(
        script(shared_dir, f"id -un; echo $PBS_JOBID; while [ ! -e {go} ]; do sleep 0.05; done"), REQUEST, user="alice")
    failing = await adapter.submit(script(shared_dir, "echo failing >&2; exit 3"), REQUEST, user="alice")
    ids += [waiter, failing]
    assert waiter.endswith(f".{SERVER}") and waiter.split(".")[0].isdigit()
    assert counting.calls[0] == (str(pbs.bin / "qsub"),)
    statuses = await wait_until(query, lambda s: s[waiter].state is JobState.RUNNING and ended(failing)(s))
    assert statuses[waiter].nodes == (NODE,) and statuses[waiter].native_state == "R"
    assert statuses[waiter].reason == "" and statuses[waiter].exit_code is None
    failed = statuses[failing]
    assert (failed.state, failed.native_state, failed.exit_code) == (JobState.FAILED, "F", 3)
    assert failed.reason.startswith("Job run at ") and failed.nodes == (NODE,)

    go.touch()
    statuses = await wait_until(query, ended(waiter))
    assert (statuses[waiter].state, statuses[waiter].exit_code) == (JobState.COMPLETED, 0)
    seq = waiter.split(".")[0]
    assert (shared_dir / f"hpchub-test.o{seq}").read_text() == f"alice\n{waiter}\n"
    assert (shared_dir / f"hpchub-test.o{seq}").owner() == "alice"
    assert (shared_dir / f"hpchub-test.o{failing.split('.')[0]}").read_text() == "failing\n"
    qstats = [argv for argv in counting.calls if argv[0] == str(pbs.bin / "qstat")]
    assert len(qstats) == query.calls
    assert all(argv[1:] == ("-f", "-F", "json", "-x", waiter, failing) for argv in qstats)


@pytest.mark.asyncio
async def test_fifty_five_jobs_cost_one_qstat(pbs, counting, shared_dir):
    adapter = adapter_for(pbs, counting)
    ids = await asyncio.gather(*(adapter.submit(script(shared_dir, f"exit {n % 3}"), REQUEST, user="alice")
                                 for n in range(55)))
    assert len(set(ids)) == 55
    unknown = [f"999{n}.{SERVER}" for n in range(3)]
    before = counting.count(str(pbs.bin / "qstat"))
    statuses = await wait_until(lambda: adapter.query([*ids, *unknown]), ended(*ids), timeout=60, interval=0.3)
    for n, job_id in enumerate(ids):
        expected = (JobState.COMPLETED, 0) if n % 3 == 0 else (JobState.FAILED, n % 3)
        assert (statuses[job_id].state, statuses[job_id].exit_code) == expected, job_id
    for job_id in unknown:
        assert statuses[job_id].state is JobState.UNKNOWN and "Unknown Job Id" in statuses[job_id].reason
    polls = counting.count(str(pbs.bin / "qstat")) - before
    assert await adapter.query([*ids, *unknown]) == statuses
    assert counting.count(str(pbs.bin / "qstat")) == before + polls + 1
    assert counting.calls[-1] == (str(pbs.bin / "qstat"), "-f", "-F", "json", "-x", *ids, *unknown)


@pytest.mark.asyncio
async def test_pending_job_shows_the_schedulers_reason_and_estimate(pbs, counting, shared_dir):
    adapter = adapter_for(pbs, counting)
    holder = await adapter.submit(script(shared_dir, "sleep 300", f"-l select=1:ncpus={NCPUS - 1}",
                                         "-l walltime=00:10:00"), REQUEST, user="alice")
    await wait_until(lambda: adapter.query([holder]), lambda s: s[holder].state is JobState.RUNNING)
    pending = await adapter.submit(script(shared_dir, "sleep 300", "-l select=1:ncpus=2"), REQUEST, user="alice")
    never = await adapter.submit(script(shared_dir, "true", f"-l select=1:ncpus={NCPUS + 1}"), REQUEST, user="alice")
    ids = [holder, pending, never]
    statuses = await wait_until(lambda: adapter.query(ids),
                                lambda s: s[pending].reason != "" and s[never].reason != "")
    waiting = statuses[pending]
    assert (waiting.state, waiting.native_state, waiting.nodes, waiting.exit_code) == (JobState.PENDING, "Q", (), None)
    assert waiting.reason == f"Not Running: Insufficient amount of resource: ncpus (R: 2 A: 1 T: {NCPUS})"
    # the holder reaches its walltime ten minutes after it started: then the pending job fits
    assert waiting.estimated_start is not None and waiting.estimated_start.tzinfo is not None
    assert abs(waiting.estimated_start.timestamp() - (time.time() + 600)) < 30
    assert statuses[never].state is JobState.PENDING and statuses[never].estimated_start is None
    assert statuses[never].reason == (
        f"Can Never Run: Insufficient amount of resource: ncpus (R: {NCPUS + 1} A: 1 T: {NCPUS})")

    await adapter.cancel([holder], user="alice")
    statuses = await wait_until(lambda: adapter.query(ids), lambda s: s[pending].state is JobState.RUNNING)
    assert statuses[holder].state is JobState.CANCELLED and statuses[pending].nodes == (NODE,)
    assert statuses[never].state is JobState.PENDING


@pytest.mark.asyncio
async def test_walltime_and_signals(pbs, counting, shared_dir):
    adapter = adapter_for(pbs, counting)
    slow = await adapter.submit(script(shared_dir, "sleep 60", "-l walltime=00:00:01"), REQUEST, user="alice")
    # a shell that a signal kills: PBS reports 256 + the signal, the adapter 128 + it, as a shell would
    killed = await adapter.submit(script(shared_dir, "kill -KILL $$"), REQUEST, user="alice")
    started = time.monotonic()
    statuses = await wait_until(lambda: adapter.query([slow, killed]), ended(slow, killed))
    assert time.monotonic() - started < 15
    assert (statuses[slow].state, statuses[slow].exit_code, statuses[slow].reason) == (
        JobState.TIMEOUT, -29, "JOB_EXEC_KILL_WALLTIME")
    assert (statuses[killed].state, statuses[killed].exit_code) == (JobState.FAILED, 137)
    assert pbs.jobs()[killed]["Exit_status"] == 265


@pytest.mark.asyncio
async def test_cancel_many_in_one_call(pbs, counting, shared_dir):
    adapter = adapter_for(pbs, counting)
    running = [await adapter.submit(script(shared_dir, "sleep 300"), REQUEST, user="alice") for _ in range(2)]
    # ignores SIGTERM: the SIGKILL after kill_delay ends it
    stubborn = await adapter.submit(script(shared_dir, "trap '' TERM; sleep 300 & wait"), REQUEST, user="alice")
    queued = await adapter.submit(script(shared_dir, "true", f"-l select=1:ncpus={NCPUS + 1}"), REQUEST, user="alice")
    finished = await adapter.submit(script(shared_dir, "true"), REQUEST, user="alice")
    ids = [*running, stubborn, queued]
    await wait_until(lambda: adapter.query([*ids, finished]),
                     lambda s: all(s[i].state is JobState.RUNNING for i in [*running, stubborn])
                     and s[queued].state is JobState.PENDING and s[finished].state is JobState.COMPLETED)

    before = counting.count(str(pbs.bin / "qdel"))
    await adapter.cancel(ids, user="alice")
    assert counting.count(str(pbs.bin / "qdel")) == before + 1
    assert counting.calls[-1] == (str(pbs.bin / "qdel"), *ids)
    statuses = await wait_until(lambda: adapter.query(ids), ended(*ids))
    assert all(statuses[i].state is JobState.CANCELLED for i in ids)
    assert [statuses[i].exit_code for i in ids] == [143, 143, 137, None]

    # finished jobs, and one the server never had, are not errors
    await adapter.cancel([*ids, finished, f"424242.{SERVER}"], user="alice")


@pytest.mark.asyncio
async def test_cancel_of_someone_elses_job_is_an_error(pbs, counting, shared_dir):
    adapter = adapter_for(pbs, counting)
    bobs = await adapter.submit(script(shared_dir, "sleep 300"), REQUEST, user="bob")
    error = await cancel_refused(adapter, [bobs], "Unauthorized Request")
    assert error.result is not None and error.result.returncode == 15007 % 256
    assert (await adapter.query([bobs]))[bobs].state in (JobState.PENDING, JobState.RUNNING)


@pytest.mark.asyncio
async def test_jobs_pbs_does_not_know_stay_unknown(pbs, counting, shared_dir):
    adapter = adapter_for(pbs, counting)
    job = await adapter.submit(script(shared_dir, "sleep 300"), REQUEST, user="alice")
    alone = await adapter.query([f"424242.{SERVER}"])
    mixed = await adapter.query([f"424243.{SERVER}", job, "not-an-id", "7.elsewhere"])
    for status in (alone[f"424242.{SERVER}"], mixed[f"424243.{SERVER}"], mixed["7.elsewhere"]):
        assert status.state is JobState.UNKNOWN and status.native_state == ""
        assert status.reason.startswith("Unknown Job Id: PBS no longer keeps this job")
    assert mixed["not-an-id"].state is JobState.UNKNOWN and mixed["not-an-id"].reason == "not a PBS job id"
    assert mixed[job].state in (JobState.PENDING, JobState.RUNNING)
    assert not any("not-an-id" in arg for argv in counting.calls for arg in argv)


@pytest.mark.asyncio
async def test_server_down_is_unavailable_never_gone(pbs, counting, shared_dir):
    adapter = adapter_for(pbs, counting)
    job = await adapter.submit(script(shared_dir, "sleep 300"), REQUEST, user="alice")
    await wait_until(lambda: adapter.query([job]), lambda s: s[job].state is JobState.RUNNING)
    (pbs.home / "server_down").touch()
    # the same commands found through a PATH that starts with the emulator, as the hub's own user
    on_path = PBSAdapter(LocalRunner(path=f"{pbs.bin}:{SAFE_PATH}"))
    for each in (adapter, on_path):
        for ids in ([job], [job, f"424242.{SERVER}"]):
            statuses = await each.query(ids)
            assert set(statuses) == set(ids)
            for status in statuses.values():
                assert status.state is JobState.UNKNOWN
                assert "scheduler unavailable" in status.reason and "cannot connect to server" in status.reason
        with pytest.raises(SchedulerUnavailable, match="cannot connect to server pbsemu") as error:
            await each.submit(script(shared_dir, "true"), REQUEST)
        assert not isinstance(error.value, SubmitRejected)
        with pytest.raises(SchedulerUnavailable, match="Couldn't connect to cluster"):
            await each.cancel([job])
        assert await each.find_by_tag("hpchub-test") == []
    # the job ran on meanwhile, as jobs do while pbs_server is away
    (pbs.home / "server_down").unlink()
    assert (await adapter.query([job]))[job].state is JobState.RUNNING


@pytest.mark.asyncio
async def test_missing_commands_are_unavailable(tmp_path):
    adapter = PBSAdapter(LocalRunner(path=str(tmp_path)))
    status = (await adapter.query([f"1.{SERVER}"]))[f"1.{SERVER}"]
    assert status.state is JobState.UNKNOWN and "qstat" in status.reason
    with pytest.raises(SchedulerUnavailable, match="qsub"):
        await adapter.submit("#!/bin/bash\ntrue\n", REQUEST)
    with pytest.raises(ValueError, match="absolute"):
        PBSAdapter(LocalRunner(), pbs_exec="opt/pbs")


@pytest.mark.asyncio
async def test_unknown_queue_is_rejected_with_pbss_message(pbs, counting, shared_dir):
    adapter = adapter_for(pbs, counting)
    error = await submit_refused(adapter, script(shared_dir, "true", "-q nosuchqueue"), REQUEST)
    assert error.reason == "Unknown queue"
    assert error.result is not None and error.result.returncode == 15018 % 256
    assert pbs.jobs() == {}


class LosesQsubAnswers(Runner):
    """qsub runs, but its answer is lost, as when the command times out after the server took the job."""

    def __init__(self, inner: Runner):
        self.inner = inner

    async def run(self, argv: Sequence[str], *, user: str | None = None, stdin: str | None = None,
                  timeout: float = 30.0) -> CommandResult:
        result = await self.inner.run(argv, user=user, stdin=stdin, timeout=timeout)
        if argv[0].endswith("/qsub"):
            raise CommandTimeout(f"{argv[0]} did not finish within {timeout:g} s; killed")
        return result


@pytest.mark.asyncio
async def test_rendered_job_is_found_by_its_tag_when_the_qsub_answer_is_lost(pbs, test_users, shared_dir):
    request = JobRequest(name="jupyterhub-alice.test", tag="0123456789abcdef0123456789abcdef", cores=2,
                         memory_mb=512, walltime_s=600, partition="debug", workdir=str(shared_dir),
                         output=f"{shared_dir}/logs/jupyterhub-%j.log")
    (shared_dir / "logs").mkdir(mode=0o777)
    (shared_dir / "logs").chmod(0o777)
    text = render_job_script("pbs.sh.j2", request, user="alice", env_file=helpers.env_file(shared_dir, {"HPCHUB_GREETING": "hello world"}),
                             command=["/bin/sh", "-c", 'echo "$HPCHUB_GREETING from $(pwd) with $NCPUS CPUs"; '
                                                       "exec sleep 300"])
    adapter = adapter_for(pbs, LosesQsubAnswers(SudoRunner()))
    job_id = await adapter.submit(text, request, user="alice")
    assert await adapter.find_by_tag(request.tag) == [job_id]
    assert await adapter.find_by_tag("fedcba9876543210fedcba9876543210") == []
    status = (await wait_until(lambda: adapter.query([job_id]), lambda s: s[job_id].state is JobState.RUNNING))[job_id]
    job = pbs.jobs()[job_id]
    assert job["Job_Name"] == f"jupyterhub-alice_test-{request.tag}" and job["queue"] == "debug"
    assert job["Resource_List"] == {"mem": "512mb", "ncpus": 2, "nodect": 1, "place": "pack",
                                    "select": "1:ncpus=2:mem=512mb", "walltime": "00:10:00"}
    log = shared_dir / "logs" / f"jupyterhub-{job_id}.log"
    text = helpers.wait_for(lambda: log.exists() and log.read_text(), 10, f"{log} to be written")
    assert text.splitlines()[0].startswith("hpchub: job started on ")
    assert text.splitlines()[1] == f"hello world from {shared_dir} with 2 CPUs"
    assert log.stat().st_mode & 0o777 == 0o600 and log.owner() == "alice"
    assert status.nodes == (NODE,)


def test_template_directives():
    request = JobRequest(name="jupyterhub-alice.smith", tag="0123abcd", cores=4, nodes=2, memory_mb=2048, gpus=1,
                         walltime_s=5400, partition="debug", account="physics", qos="high", constraint="haswell",
                         workdir="/home/alice", output="/home/alice/.hpchub/logs/jupyterhub-%j.log",
                         env_setup=("module load python/3.11",), extra_directives=("-m n",))
    text = render_job_script("pbs.sh.j2", request, user="alice", env_file="/dev/null", command=["jupyterhub-singleuser"])
    lines = text.splitlines()
    assert [line for line in lines if line.startswith("#PBS")] == [
        "#PBS -N jupyterhub-alice_smith-0123abcd", "#PBS -l select=2:ncpus=4:mem=2048mb:ngpus=1",
        "#PBS -l place=scatter", "#PBS -l walltime=01:30:00", "#PBS -q debug", "#PBS -A physics", "#PBS -j oe",
        "#PBS -o /home/alice/.hpchub/logs/", "#PBS -m n",
    ]
    body = lines[lines.index("export HPCHUB_JOB_STARTED") + 1:]
    assert body[:3] == ['exec >/home/alice/.hpchub/logs/jupyterhub-"$PBS_JOBID".log 2>&1', "cd /home/alice",
                        "module load python/3.11"]
    reserved = render_job_script("pbs.sh.j2", JobRequest(name="n", tag="t", partition="debug", reservation="R42",
                                                         error="/tmp/e-%j"),
                                 user="alice", env_file="/dev/null", command=["x"])
    assert "#PBS -q R42" in reserved and "#PBS -o" not in reserved and "\nexec 2>/tmp/e-\"$PBS_JOBID\"''\n" in reserved


# ---- the emulator against the documented messages and exit statuses ----------------------------------------

def test_emulated_messages_and_exit_statuses(pbs, test_users, shared_dir):
    submitted = pbs.run("qsub", user="alice", stdin=script(shared_dir, "true"))
    job_id = submitted.stdout.strip()
    assert submitted.returncode == 0 and job_id == f"1.{SERVER}"
    helpers.wait_for(lambda: pbs.jobs()[job_id]["job_state"] == "F", 10, "the job to finish")
    cases = [
        (pbs.run("qsub", "-q", "nosuchqueue", user="alice", stdin="true\n"), 170, "qsub: Unknown queue\n"),
        (pbs.run("qsub", "-l", "select=1:bogus=1", user="alice", stdin="true\n"), 187,
         "qsub: Unknown resource: bogus\n"),
        (pbs.run("qsub", "-N", "1bad", user="alice", stdin="true\n"), 2, "qsub: illegal -N value\n"),
        (pbs.run("qstat", "-f", "-F", "json", "-x", "998", f"999.{SERVER}"), 153,
         f"qstat: Unknown Job Id 998.{SERVER}\nqstat: Unknown Job Id 999.{SERVER}\n"),
        (pbs.run("qstat", job_id), 35,
         f"qstat: {job_id} Job has finished, use -x or -H to obtain historical job information\n"),
        (pbs.run("qdel", job_id, f"999.{SERVER}"), 153,
         f"qdel: Job has finished {job_id}\nqdel: Unknown Job Id 999.{SERVER}\n"),
        (pbs.run("qdel", job_id), 35, f"qdel: Job has finished {job_id}\n"),
    ]
    for result, status, stderr in cases:
        assert (result.returncode, result.stderr) == (status, stderr), result.args
    assert json.loads(cases[3][0].stdout).keys() == {"timestamp", "pbs_version", "pbs_server"}
    assert "not emulated" in pbs.run("qsub", "-v", "A=b", stdin="true\n").stderr

    (pbs.home / "server_down").touch()
    refused = f"Connection refused\nqstat: cannot connect to server {SERVER} (errno=15010)\n"
    down = pbs.run("qstat", "-f", "-F", "json", "-x", job_id, "2")
    assert (down.returncode, down.stderr) == (255, refused * 2)
    assert json.loads(down.stdout).keys() == {"timestamp", "pbs_version", "pbs_server"}
    down = pbs.run("qsub", user="alice", stdin="true\n")
    assert (down.returncode, down.stderr) == (162, f"Connection refused\nqsub: cannot connect to server {SERVER} "
                                                   "(errno=15010)\n")
    down = pbs.run("qdel", job_id)
    assert (down.returncode, down.stderr) == (162, f"Connection refused\nCouldn't connect to cluster: {SERVER}\n")


def test_emulated_json_follows_the_reference_layout(pbs, test_users, shared_dir):
    """The emulator's document is laid out as PBS's writer lays it out, its attributes in the server's order."""
    job_id = pbs.run("qsub", "-l", "walltime=00:10:00", user="alice", stdin=script(shared_dir, "exit 3")).stdout.strip()
    helpers.wait_for(lambda: pbs.jobs()[job_id]["job_state"] == "F", 10, "the job to finish")
    document = pbs.run("qstat", "-f", "-F", "json", "-x", job_id).stdout
    reference = (FIXTURES / "qstat-jobs.json").read_text()
    layout = {line.split('"')[0] + ('"key":' if '":' in line else "") for line in reference.splitlines()}
    assert {line.split('"')[0] + ('"key":' if '":' in line else "") for line in document.splitlines()} <= layout
    emulated = json.loads(document)["Jobs"][job_id]
    finished = json.loads(reference)["Jobs"]["107.pbs01"]
    common = [name for name in finished if name in emulated]
    assert [name for name in emulated if name in finished] == common
    assert set(finished) - set(emulated) <= {"Account_Name"}
    assert (emulated["Exit_status"], emulated["substate"], emulated["exec_host"]) == (3, 93, f"{NODE}/0*1")
    full = pbs.run("qstat", "-x", "-f", job_id).stdout
    assert full.startswith(f"Job Id: {job_id}\n    Job_Name = hpchub-test\n") and full.endswith("\n\n")
    assert "    Resource_List.walltime = 00:10:00\n" in full and "    Exit_status = 3\n" in full


# ---- the parser on reference outputs ------------------------------------------------------------------------

def fixture_result(stdout: str, stderr: str = "", returncode: int = 0) -> CommandResult:
    return CommandResult(("qstat",), returncode, stdout, stderr, 0.01)


def parse(stdout: str, ids: Sequence[str], stderr: str = "", returncode: int = 0) -> dict[str, JobStatus]:
    return PBSAdapter(LocalRunner()).parse_query(fixture_result(stdout, stderr, returncode), ids)


def test_parser_maps_every_state_of_the_reference_document():
    document = (FIXTURES / "qstat-jobs.json").read_text()
    ids = [f"{n}.pbs01" for n in range(101, 114)]
    s = parse(document, ids)
    expected = {
        "101.pbs01": (JobState.PENDING, "Q", (), None),
        "102.pbs01": (JobState.PENDING, "H", (), None),
        "103.pbs01": (JobState.PENDING, "W", (), None),
        "104.pbs01": (JobState.RUNNING, "R", ("cn001", "cn002"), None),
        "105.pbs01": (JobState.PENDING, "S", ("cn004",), None),
        "106.pbs01": (JobState.COMPLETING, "E", ("cn005",), None),
        "107.pbs01": (JobState.COMPLETED, "F", ("cn002",), 0),
        "108.pbs01": (JobState.FAILED, "F", ("cn003",), 3),
        "109.pbs01": (JobState.CANCELLED, "F", ("cn001",), 143),
        "110.pbs01": (JobState.TIMEOUT, "F", ("cn004",), -29),
        "111.pbs01": (JobState.CANCELLED, "F", (), None),
        "112.pbs01": (JobState.FAILED, "F", ("cn002",), 137),
        "113.pbs01": (JobState.UNKNOWN, "M", (), None),
    }
    assert {i: (s[i].state, s[i].native_state, s[i].nodes, s[i].exit_code) for i in ids} == expected
    assert s["101.pbs01"].reason == "Not Running: Insufficient amount of resource: ncpus (R: 4 A: 2 T: 64)"
    assert s["101.pbs01"].estimated_start == datetime(2025, 11, 21, 12, 30).astimezone()
    assert s["102.pbs01"].reason == "Job held by bob on Fri Nov 21 09:59:10 2025"
    assert s["104.pbs01"].reason == "" and s["104.pbs01"].estimated_start is None
    assert s["108.pbs01"].reason == "Job run at Fri Nov 21 at 09:10 on (cn003:ncpus=1) and failed"
    assert s["110.pbs01"].reason == "JOB_EXEC_KILL_WALLTIME"
    assert s["111.pbs01"].reason.startswith("Can Never Run")
    assert s["113.pbs01"].reason == "moved to another PBS server"


def test_parser_gives_the_queue_times_and_walltime_of_the_same_answer():
    s = parse((FIXTURES / "qstat-jobs.json").read_text(), ["101.pbs01", "104.pbs01"])
    running, queued = s["104.pbs01"], s["101.pbs01"]
    assert (running.partition, running.time_limit_s) == ("workq", 4 * 3600)
    assert (running.submitted, running.started) == (datetime(2025, 11, 21, 9, 39, 51).astimezone(),
                                                    datetime(2025, 11, 21, 9, 40).astimezone())
    assert (queued.partition, queued.started, queued.time_limit_s) == ("workq", None, 8 * 3600)


def test_parser_reads_the_cjson_layout_of_openpbs_23():
    status = parse((FIXTURES / "qstat-cjson.json").read_text(), ["204.pbs01"])["204.pbs01"]
    assert (status.state, status.nodes) == (JobState.RUNNING, ("cn007",))


def test_parser_on_unknown_ids_and_an_unreachable_server():
    document = (FIXTURES / "qstat-jobs.json").read_text()
    unknown = (FIXTURES / "qstat-unknown.stderr").read_text()
    statuses = parse(document, ["107.pbs01", "998.pbs01", "999.pbs01", "120.pbs01"], unknown, 153)
    assert statuses["107.pbs01"].state is JobState.COMPLETED
    assert all(statuses[i].state is JobState.UNKNOWN for i in ("998.pbs01", "999.pbs01", "120.pbs01"))
    assert statuses["998.pbs01"].reason.startswith("Unknown Job Id")
    assert statuses["120.pbs01"].reason == "qstat did not list this job"
    # an id with the server's domain names the same job
    assert parse(document, ["107.pbs01.example.org"])["107.pbs01.example.org"].state is JobState.COMPLETED
    header = (FIXTURES / "qstat-down.json").read_text()
    nothing_found = parse(header, ["998.pbs01", "999.pbs01"], unknown, 153)
    assert all(status.state is JobState.UNKNOWN for status in nothing_found.values())
    # a failed qstat that speaks of a job not asked about says nothing reliable
    with pytest.raises(SchedulerUnavailable, match="999.pbs01"):
        parse(header, ["998.pbs01"], unknown, 153)
    with pytest.raises(SchedulerUnavailable, match="cannot connect to server pbs01"):
        parse(header, ["107.pbs01", "108.pbs01"], (FIXTURES / "qstat-down.stderr").read_text(), 255)
    for stdout, stderr, code in (("", "", 0), ("{\"Jobs\": [", "", 0), (document, "qstat: out of memory\n", 1)):
        with pytest.raises(SchedulerUnavailable):
            parse(stdout, ["107.pbs01"], stderr, code)


def test_cancel_errors():
    adapter = PBSAdapter(LocalRunner())
    ids = ["107.pbs01", "999.pbs01"]
    finished_and_unknown = "".join((FIXTURES / "qdel-errors.stderr").read_text().splitlines(True)[:2])
    adapter.check_cancel(CommandResult(("qdel",), 153, "", finished_and_unknown, 0.01), ids)
    with pytest.raises(SchedulerError, match="102.pbs01: Unauthorized Request") as error:
        adapter.check_cancel(CommandResult(("qdel",), 159, "", (FIXTURES / "qdel-errors.stderr").read_text(), 0.01),
                             [*ids, "102.pbs01"])
    assert not isinstance(error.value, SchedulerUnavailable)
    with pytest.raises(SchedulerUnavailable, match="Couldn't connect to cluster: pbs01"):
        adapter.check_cancel(CommandResult(("qdel",), 162, "", (FIXTURES / "qdel-down.stderr").read_text(), 0.01),
                             ids)
    with pytest.raises(ValueError, match="not PBS job ids"):
        adapter.cancel_argv(["107.pbs01", "-W force"])
