"""Partitions, queues and their limits as each scheduler reports them (`Adapter.partitions()`), the user's Slurm
associations, the cache in front of them and the check of a request against them (schedulers/limits.py).

The parsers run on outputs recorded from the test clusters (fixtures/record_limits.py) and on outputs written by
hand in the same formats for what those clusters lack (GPUs, drained nodes, per-host overrides, accounting); the
adapters run against the real Slurm and Grid Engine, and against the PBS emulator (tests/pbs_emulator: no PBS
package exists for Debian)."""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

import pytest

from helpers import CountingRunner
from schedulers import (Associations, CommandResult, InvalidRequest, JobRequest, LocalAdapter, LocalRunner,
                        PartitionInfo, PBSAdapter, Runner, SchedulerError, SchedulerUnavailable, SGEAdapter,
                        SlurmAdapter)
from schedulers.limits import PartitionCache, check_request, find_partition, violations
from schedulers.slurm import node_is_idle, parse_gres, slurm_seconds

FIXTURES = Path(__file__).resolve().parent / "fixtures"
EMULATOR = Path(__file__).resolve().parent / "pbs_emulator"
REQUEST = JobRequest(name="hpchub-test", tag="hpchub-test")


class Answers(Runner):
    """Answers each command from a table (argv -> exit status, stdout, stderr); a command it has none for fails the
    test. Keeps the commands it was asked."""

    def __init__(self, answers: dict[tuple[str, ...], tuple[int, str, str]]):
        self.answers = answers
        self.calls: list[tuple[str, ...]] = []

    async def run(self, argv: Sequence[str], *, user: str | None = None, stdin: str | None = None,
                  timeout: float = 30.0) -> CommandResult:
        self.calls.append(tuple(argv))
        assert tuple(argv) in self.answers, f"no answer for {argv}"
        returncode, stdout, stderr = self.answers[tuple(argv)]
        return CommandResult(tuple(argv), returncode, stdout, stderr, 0.0)


def slurm_case(*names: str) -> dict[tuple[str, ...], tuple[int, str, str]]:
    """Recorded Slurm cases (fixtures/slurm/NAME.json) as Answers' table."""
    table = {}
    for name in names:
        case = json.loads((FIXTURES / "slurm" / f"{name}.json").read_text())
        table[tuple(case["argv"])] = (case["returncode"], case["stdout"], case["stderr"])
    return table


def by_name(partitions: Sequence[PartitionInfo]) -> dict[str, PartitionInfo]:
    return {p.name: p for p in partitions}


# --- Slurm ------------------------------------------------------------------------------------------------------

@pytest.mark.asyncio
async def test_slurm_partitions_recorded_from_the_test_cluster():
    runner = Answers(slurm_case("partitions-scontrol", "partitions-sinfo"))
    partitions = by_name(await SlurmAdapter(runner).partitions())
    assert runner.calls == [("scontrol", "show", "partition", "--oneliner"),
                            ("sinfo", "--all", "--Node", "--noheader", "--Format",
                             "NodeList:\x1f,PartitionName:\x1f,CPUs:\x1f,Memory:\x1f,Gres:\x1f,StateComplete:\x1f")]
    # slurm.conf.in: debug (default, MaxTime=01:00:00) and long (7 days) on c[1-2], CPUs=8 RealMemory=8000 each
    assert partitions["debug"] == PartitionInfo(
        name="debug", default=True, state="up", max_walltime_s=3600, default_walltime_s=None, max_nodes=None,
        max_cores_per_node=8, max_memory_mb_per_node=8000, gpus={}, nodes_total=2, nodes_idle=2)
    assert partitions["long"] == PartitionInfo(
        name="long", default=False, max_walltime_s=7 * 86400, max_cores_per_node=8, max_memory_mb_per_node=8000,
        nodes_total=2, nodes_idle=2)
    # the recording caught netns's node n1 running a job: there, but not idle
    assert (partitions["netns"].nodes_total, partitions["netns"].nodes_idle) == (1, 0)


@pytest.mark.asyncio
async def test_slurm_partitions_with_gpus_drained_nodes_and_odd_limits():
    partitions = by_name(await SlurmAdapter(Answers(slurm_case("partitions-gpu-scontrol", "partitions-gpu-sinfo")))
                         .partitions())
    gpu = partitions["gpu"]
    # g01 gpu:a100:4(S:0-1); g02 gpu:a100:2(S:0),gpu:v100:2(S:1), mixed; g03 gpu:v100:8 + mps, drained
    assert gpu.gpus == {"": 8, "a100": 4, "v100": 8}
    assert (gpu.max_cores_per_node, gpu.max_memory_mb_per_node) == (32, 32 * 4000)   # MaxCPUsPerNode, MaxMemPerCPU
    assert (gpu.max_walltime_s, gpu.default_walltime_s, gpu.max_nodes) == (2 * 86400, 4 * 3600, 2)
    assert (gpu.nodes_total, gpu.nodes_idle, gpu.default, gpu.state) == (3, 1, False, "up")
    assert (gpu.allowed_accounts, gpu.allowed_groups) == (("physics", "chem"), ("gpuusers", "staff"))
    cpu = partitions["cpu"]
    assert (cpu.default, cpu.max_walltime_s, cpu.default_walltime_s, cpu.max_nodes) == (True, None, None, None)
    assert (cpu.nodes_idle, cpu.gpus, cpu.allowed_accounts, cpu.allowed_groups) == (1, {}, (), ())  # c02 down*
    maint = partitions["maint"]
    assert (maint.state, maint.max_walltime_s, maint.max_memory_mb_per_node) == ("down", 1800, 64000)
    old = partitions["old"]
    assert (old.state, old.nodes_total, old.max_walltime_s, old.max_cores_per_node) == ("inactive", 0, None, None)


@pytest.mark.parametrize("gres,gpus", [
    ("(null)", {}),
    ("gpu:4", {"": 4}),
    ("gpu:a100:4", {"": 4, "a100": 4}),
    ("gpu:a100:4(S:0-1)", {"": 4, "a100": 4}),
    ("gpu:a100:2(S:0,2)", {"": 2, "a100": 2}),
    ("gpu:a100:4(IDX:0-3)", {"": 4, "a100": 4}),
    ("gpu:a100:2(S:0),gpu:v100:1(S:1),mps:200", {"": 3, "a100": 2, "v100": 1}),
    ("gpu:nvidia_a100-sxm4-80gb:4(S:0-1)", {"": 4, "nvidia_a100-sxm4-80gb": 4}),
    ("gpu:tesla", {"": 1, "tesla": 1}),
    ("gpu:no_consume:2", {"": 2}),
    ("gpu:a100:0", {}),
    ("mps:400,shard:8", {}),
])
def test_gres_strings(gres, gpus):
    assert parse_gres(gres) == gpus


@pytest.mark.parametrize("text,seconds", [
    ("01:00:00", 3600), ("7-00:00:00", 7 * 86400), ("1-02:03:04", 93784), ("30:00", 1800), ("45", 2700),
    ("2-12", 216000), ("1-02:03", 93780), ("UNLIMITED", None), ("INFINITE", None), ("NONE", None), ("", None),
])
def test_slurm_time_limits(text, seconds):
    assert slurm_seconds(text) == seconds


def test_an_unreadable_time_limit_is_not_taken_for_none():
    with pytest.raises(SchedulerUnavailable, match="unexpected time limit"):
        slurm_seconds("soon")


@pytest.mark.parametrize("state,idle", [
    ("idle", True), ("idle+cloud", True), ("mixed", False), ("allocated", False), ("idle+drain", False),
    ("idle+not_responding", False), ("idle+powered_down", False), ("idle+reserved", False), ("idle+planned", False),
    ("idle+maintenance", False), ("down+not_responding", False), ("IDLE", True), ("idle*", False),
])
def test_which_slurm_nodes_count_as_idle(state, idle):
    assert node_is_idle(state) is idle


@pytest.mark.asyncio
async def test_slurm_controller_down_is_unavailable():
    runner = Answers({**slurm_case("partitions-controller-down"), **slurm_case("partitions-sinfo")})
    with pytest.raises(SchedulerUnavailable, match="Unable to contact slurm controller"):
        await SlurmAdapter(runner).partitions()


@pytest.mark.asyncio
async def test_no_slurmdbd_means_no_associations_in_one_call():
    """Recorded on the test cluster, which keeps no accounting database (AccountingStorageType=none)."""
    runner = Answers(slurm_case("associations-no-slurmdbd"))
    assert await SlurmAdapter(runner).associations("alice") is None
    assert len(runner.calls) == 1


@pytest.mark.asyncio
async def test_associations_from_slurmdbd():
    runner = Answers(slurm_case("associations-physics", "user-physics"))
    associations = await SlurmAdapter(runner).associations("alice")
    assert associations == Associations("alice", accounts=("physics", "chem"), default_account="physics",
                                        qos=("high", "normal", "debug"), default_qos="normal")


@pytest.mark.asyncio
async def test_associations_of_one_cluster_where_slurmdbd_serves_several():
    adapter = SlurmAdapter(LocalRunner(), cluster="hpchub")
    assert adapter.associations_argv("alice") == ["sacctmgr", "--noheader", "--parsable2", "show", "associations",
                                                  "users=alice", "clusters=hpchub", "format=Account,QOS,DefaultQOS"]


@pytest.mark.asyncio
async def test_slurmdbd_down_is_unavailable_not_no_accounting():
    with pytest.raises(SchedulerUnavailable, match="Problem talking to the database"):
        await SlurmAdapter(Answers(slurm_case("associations-slurmdbd-down"))).associations("alice")


@pytest.mark.asyncio
@pytest.mark.parametrize("user", ["alice bob", "-h", "alice,bob", "#0", ""])
async def test_associations_refuse_what_is_not_a_user_name(user):
    with pytest.raises(ValueError, match="not a user name"):
        await SlurmAdapter(Answers({})).associations(user)


# --- Grid Engine ------------------------------------------------------------------------------------------------

def sge_answers(qhost: str, qconf: str, hosts: Sequence[str]) -> Answers:
    argv = ["qconf", "-sq", "*"]
    for host in ["global", *hosts]:
        argv += ["-se", host]
    return Answers({("qhost", "-q", "-xml"): (0, (FIXTURES / "sge" / qhost).read_text(), ""),
                    tuple(argv): (0, (FIXTURES / "sge" / qconf).read_text(), "")})


@pytest.mark.asyncio
async def test_sge_queues_recorded_from_the_test_cluster():
    host = next(line.split("'")[1] for line in (FIXTURES / "sge" / "partitions-qhost.xml").read_text().splitlines()
                if line.strip().startswith("<host name=") and "'global'" not in line)
    runner = sge_answers("partitions-qhost.xml", "partitions-qconf.txt", [host])
    queues = by_name(await SGEAdapter(runner, default_queue="all.q").partitions())
    assert len(runner.calls) == 2
    # sge.conf.in: all.q 8 slots, PEs make smp mpi; short.q 2 slots, smp, h_rt 00:10:00; the host offers gpu=2
    all_q, short_q = queues["all.q"], queues["short.q"]
    assert (all_q.default, all_q.state, all_q.max_walltime_s, all_q.max_cores_per_node) == (True, "up", None, 8)
    assert (all_q.parallel_environments, all_q.gpus, all_q.nodes_total) == (("make", "smp", "mpi"), {"": 2}, 1)
    assert (short_q.default, short_q.max_walltime_s, short_q.max_cores_per_node) == (False, 600, 2)
    assert (short_q.parallel_environments, short_q.gpus) == (("smp",), {"": 2})
    assert all_q.max_memory_mb_per_node == short_q.max_memory_mb_per_node > 0   # the host's memory
    assert all_q.max_nodes is None and all_q.allowed_accounts == () and all_q.allowed_groups == ()


@pytest.mark.asyncio
async def test_sge_queues_with_host_overrides_closed_instances_and_units():
    queues = by_name(await SGEAdapter(sge_answers("handwritten-partitions-qhost.xml", "handwritten-partitions-qconf.txt",
                                                  ["g01", "g02", "g03"])).partitions())
    gpu = queues["gpu.q"]
    # slots 4,[g01=16],[@big=32]: qhost resolves them per host (16, 32, 4); pe_list NONE,[@gpuhosts=smp mpi]
    assert (gpu.max_cores_per_node, gpu.parallel_environments) == (32, ("smp", "mpi"))
    # h_rt 48:00:00,[g02=72:0:0] and s_rt INFINITY: the longest host's
    assert gpu.max_walltime_s == 72 * 3600
    # h_vmem 4G per slot: 32 slots on g02 (251.6G) can use 128 GB
    assert gpu.max_memory_mb_per_node == 32 * 4096
    # complex_values gpu=2,[g02=gpu=8] within each host's own gpu (g01: 4, g02: 8, g03: none)
    assert gpu.gpus == {"": 8}
    # g03 is "au" (execd unknown, alarm): not open; g02 runs 4 slots: not idle
    assert (gpu.state, gpu.nodes_total, gpu.nodes_idle, gpu.allowed_accounts) == ("up", 3, 1, ("physics", "chem"))
    serial = queues["serial.q"]
    # no parallel environment: one slot per job; h_rt 1:: and s_rt 0:30:0 -> the lower
    assert (serial.max_cores_per_node, serial.parallel_environments, serial.max_walltime_s) == (1, (), 1800)
    # g01 busy, g02 disabled; a host's GPUs serve every queue on it
    assert (serial.state, serial.nodes_idle, serial.gpus) == ("up", 0, {"": 8})
    dead = queues["dead.q"]
    assert (dead.state, dead.nodes_total, dead.nodes_idle, dead.max_memory_mb_per_node) == ("down", 1, 0, None)
    assert not any(q.default for q in queues.values())


@pytest.mark.asyncio
async def test_sge_qmaster_down_is_unavailable():
    status, _, stderr = (FIXTURES / "sge" / "qstat-qmaster-down.txt").read_text().partition("\n")
    runner = Answers({("qhost", "-q", "-xml"): (int(status.removeprefix("exit ")), "", stderr)})
    with pytest.raises(SchedulerUnavailable, match="unable to send message to qmaster"):
        await SGEAdapter(runner).partitions()


@pytest.mark.asyncio
async def test_sge_without_any_queue():
    runner = Answers({("qhost", "-q", "-xml"): (0, "<?xml version='1.0'?>\n<qhost>\n</qhost>\n", ""),
                      ("qconf", "-sq", "*", "-se", "global"): (
                          1, "", 'No cluster queue or queue instance matches the phrase "*"\n')})
    assert await SGEAdapter(runner).partitions() == []


# --- PBS: reference documents in PBS Professional 2022's format --------------------------------------------------

def pbs_answers(server: str, queues: str, nodes: str, *, nodes_status: int = 0, nodes_stderr: str = "") -> Answers:
    read = lambda name: (FIXTURES / "pbs" / name).read_text() if name else ""  # noqa: E731
    return Answers({("/opt/pbs/bin/qstat", "-B", "-f", "-F", "json"): (0, read(server), ""),
                    ("/opt/pbs/bin/qstat", "-Q", "-f", "-F", "json"): (0, read(queues), ""),
                    ("/opt/pbs/bin/pbsnodes", "-a", "-v", "-F", "json"): (nodes_status, read(nodes), nodes_stderr)})


@pytest.mark.asyncio
async def test_pbs_queues_from_reference_documents():
    runner = pbs_answers("qstat-server.json", "qstat-queues.json", "pbsnodes.json")
    queues = await PBSAdapter(runner, pbs_exec="/opt/pbs").partitions()
    assert len(runner.calls) == 3
    # small and large take jobs from routeq only (from_route_only): not offered
    assert [q.name for q in queues] == ["workq", "gpuq", "routeq", "closed"]
    workq, gpuq, routeq, closed = queues
    # every node not tied to a queue (c003 is small's): c001 free, c002 job-busy, g001 running a job, g002 down
    assert workq == PartitionInfo(
        name="workq", default=True, state="up", max_walltime_s=86400, default_walltime_s=3600, max_nodes=None,
        max_cores_per_node=128, max_memory_mb_per_node=500 * 1024, gpus={"": 8}, nodes_total=4, nodes_idle=1)
    # default_chunk.Qlist=gpuq: g001 (4 GPUs) and g002 (8, but resources_max.ngpus=4); started=False
    assert gpuq == PartitionInfo(
        name="gpuq", state="down", max_walltime_s=48 * 3600, max_nodes=2, max_cores_per_node=64,
        max_memory_mb_per_node=1024 * 1024, gpus={"": 4}, nodes_total=2, nodes_idle=0,
        allowed_groups=("gpuusers", "ml"))
    # a routing queue: the nodes of its destinations
    assert (routeq.nodes_total, routeq.nodes_idle, routeq.max_walltime_s, routeq.state) == (5, 1, 72 * 3600, "up")
    # enabled=False, started=True; a walltime given as a bare number of seconds
    assert (closed.state, closed.max_walltime_s) == ("drain", 3600)


@pytest.mark.asyncio
async def test_pbs_without_nodes():
    runner = pbs_answers("qstat-server.json", "qstat-queues.json", "", nodes_stderr="pbsnodes: No nodes found\n")
    queues = by_name(await PBSAdapter(runner, pbs_exec="/opt/pbs").partitions())
    assert (queues["workq"].nodes_total, queues["workq"].max_cores_per_node, queues["workq"].gpus) == (0, 128, {})


@pytest.mark.asyncio
async def test_pbs_server_down_is_unavailable():
    stderr = "Connection refused\n/opt/pbs/bin/pbsnodes: cannot connect to server pbs01, error=15010\n"
    runner = pbs_answers("qstat-server.json", "qstat-queues.json", "", nodes_status=1, nodes_stderr=stderr)
    with pytest.raises(SchedulerUnavailable, match="cannot connect to server pbs01"):
        await PBSAdapter(runner, pbs_exec="/opt/pbs").partitions()


# --- local --------------------------------------------------------------------------------------------------------

@pytest.mark.asyncio
async def test_local_has_one_queue_the_size_of_this_machine(tmp_path):
    runner = CountingRunner(LocalRunner())
    (local,) = await LocalAdapter(runner, spool_dir=tmp_path / "spool").partitions()
    meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    assert (local.name, local.default, local.state, local.max_walltime_s, local.max_nodes) == (
        "local", True, "up", None, 1)
    assert local.max_cores_per_node == len(os.sched_getaffinity(0))
    assert abs(local.max_memory_mb_per_node - int(meminfo["MemTotal"].split()[0]) // 1024) <= 1
    assert (local.nodes_total, local.nodes_idle) == (1, 1) and runner.calls == []


# --- check_request ------------------------------------------------------------------------------------------------

GPU = PartitionInfo(name="gpu", max_walltime_s=3600, max_nodes=2, max_cores_per_node=32, max_memory_mb_per_node=128000,
                    gpus={"": 8, "a100": 4, "v100": 8}, nodes_total=3, parallel_environments=("smp", "mpi"),
                    allowed_accounts=("physics", "chem"))


def request(**values: Any) -> JobRequest:
    return JobRequest(name="n", tag="t", **values)


def test_a_request_within_the_limits_passes():
    check_request(request(cores=32, nodes=2, memory_mb=128000, gpus=4, gpu_type="a100", walltime_s=3600,
                          parallel_environment="mpi", account="chem"), GPU)
    check_request(request(gpus=8), GPU)   # any type: the most of any type on one node
    check_request(request(), PartitionInfo(name="open"))   # nothing known, nothing refused


@pytest.mark.parametrize("values,field,allowed", [
    ({"walltime_s": 3601}, "walltime_s", "at most 3600 s (01:00:00) in partition gpu"),
    ({"nodes": 3}, "nodes", "at most 2 nodes in partition gpu"),
    ({"cores": 33}, "cores", "at most 32 cores per node in partition gpu"),
    ({"memory_mb": 128001}, "memory_mb", "at most 128000 MB per node in partition gpu"),
    ({"gpus": 5, "gpu_type": "a100"}, "gpus", "at most 4 a100 GPUs per node in partition gpu"),
    ({"gpus": 9}, "gpus", "at most 8 GPUs per node in partition gpu"),
    ({"gpus": 1, "gpu_type": "h100"}, "gpu_type", "one of a100, v100 in partition gpu"),
    ({"parallel_environment": "make"}, "parallel_environment", "one of smp, mpi in partition gpu"),
    ({"account": "biology"}, "account", "one of physics, chem in partition gpu"),
])
def test_each_violation_names_its_field(values, field, allowed):
    with pytest.raises(InvalidRequest) as error:
        check_request(request(**values), GPU)
    assert (error.value.field, error.value.allowed) == (field, allowed)
    assert error.value.value == values[field] and str(error.value).startswith(f"{field}: ")


def test_what_a_partition_lacks_altogether():
    bare = PartitionInfo(name="cpu", nodes_total=2, state="drain")
    found = violations(request(nodes=3, gpus=1, parallel_environment="smp"), bare)
    assert [(v.field, v.allowed) for v in found] == [
        ("partition", "partition cpu is drain: a job submitted now cannot start"),
        ("nodes", "at most 2 nodes, all it has in partition cpu"),   # Slurm would accept it, and pend for ever
        ("gpus", "0: partition cpu has no GPUs"),
        ("parallel_environment", "partition cpu accepts no parallel environment"),
    ]
    with pytest.raises(InvalidRequest, match="has no GPU types"):
        check_request(request(gpus=1, gpu_type="a100"), PartitionInfo(name="cpu", gpus={"": 2}))


def test_all_violations_at_once_for_the_form():
    found = violations(request(walltime_s=7200, cores=64, memory_mb=10 ** 6, gpus=16), GPU)
    assert [v.field for v in found] == ["walltime_s", "cores", "memory_mb", "gpus"]


def test_find_partition():
    partitions = [PartitionInfo(name="debug", default=True), PartitionInfo(name="long")]
    assert find_partition(partitions, None).name == "debug"
    assert find_partition(partitions, "long").name == "long"
    assert find_partition(partitions[1:], None).name == "long"   # the only one
    with pytest.raises(InvalidRequest, match=r"partition: 'nosuch' is not allowed \(one of debug, long\)"):
        find_partition(partitions, "nosuch")
    with pytest.raises(InvalidRequest, match="no default"):
        find_partition([PartitionInfo(name="a"), PartitionInfo(name="b")], None)


# --- PartitionCache -------------------------------------------------------------------------------------------------

class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Scheduler:
    """An adapter's partitions(): answers, or fails, on demand; `gate` holds the answer back."""

    name = "fake"

    def __init__(self) -> None:
        self.calls = 0
        self.failure: SchedulerError | None = None
        self.gate = asyncio.Event()
        self.gate.set()

    async def partitions(self) -> list[PartitionInfo]:
        self.calls += 1
        await self.gate.wait()
        if self.failure is not None:
            raise self.failure
        return [PartitionInfo(name=f"p{self.calls}", default=True)]


@pytest.mark.asyncio
async def test_a_second_call_within_max_age_costs_nothing():
    scheduler, clock = Scheduler(), Clock()
    cache = PartitionCache(scheduler, max_age=60, clock=clock)
    first = await cache.get()
    clock.now += 59
    assert await cache.get() is first and (scheduler.calls, cache.calls) == (1, 1)
    clock.now += 1
    fresh = await cache.get()
    assert fresh.partitions[0].name == "p2" and not fresh.stale and cache.calls == 2
    cache.invalidate()
    assert (await cache.get()).partitions[0].name == "p3"


@pytest.mark.asyncio
async def test_concurrent_callers_share_one_call():
    scheduler = Scheduler()
    scheduler.gate.clear()
    cache = PartitionCache(scheduler)
    waiting = [asyncio.ensure_future(cache.get()) for _ in range(20)]
    await asyncio.sleep(0.01)
    waiting[0].cancel()   # one caller gives up: the others still get the answer
    scheduler.gate.set()
    answers = await asyncio.gather(*waiting[1:])
    assert scheduler.calls == 1 and all(a is answers[0] for a in answers)
    assert answers[0].find(None).name == "p1"


@pytest.mark.asyncio
async def test_a_failed_refresh_serves_the_last_answer_for_a_bounded_time():
    scheduler, clock = Scheduler(), Clock()
    cache = PartitionCache(scheduler, max_age=60, keep_stale=600, retry_after=10, clock=clock)
    good = await cache.get()
    scheduler.failure = SchedulerUnavailable("slurm: scontrol failed", reason="Unable to contact slurm controller")
    clock.now += 61
    stale = await cache.get()
    assert (stale.partitions, stale.fetched_at, stale.stale, stale.error) == (
        good.partitions, good.fetched_at, True, "Unable to contact slurm controller")
    clock.now += 5
    assert (await cache.get()).stale and scheduler.calls == 2   # within retry_after: not asked again
    clock.now += 600
    with pytest.raises(SchedulerUnavailable, match=r"older than 600 s\): Unable to contact slurm controller"):
        await cache.get()
    scheduler.failure = None
    clock.now += 10
    assert not (await cache.get()).stale


@pytest.mark.asyncio
async def test_no_answer_yet_and_a_failure_is_unavailable():
    scheduler = Scheduler()
    scheduler.failure = SchedulerUnavailable("qhost failed", reason="commlib error")
    with pytest.raises(SchedulerUnavailable, match="fake: cannot list the partitions: commlib error"):
        await PartitionCache(scheduler).get()


def test_cache_settings_are_checked():
    with pytest.raises(ValueError, match="max_age"):
        PartitionCache(Scheduler(), max_age=-1)


# --- the real clusters ---------------------------------------------------------------------------------------------

@pytest.mark.asyncio
async def test_slurm_partitions_live(slurm_cluster):
    runner = CountingRunner(LocalRunner())
    cache = PartitionCache(SlurmAdapter(runner))
    answer = await cache.get()
    assert await cache.get() is answer and [argv[0] for argv in runner.calls] == ["scontrol", "sinfo"]
    partitions = by_name(answer.partitions)
    debug, long = partitions["debug"], partitions["long"]
    # docker/slurm-cluster/slurm.conf.in
    assert (debug.default, debug.state, debug.max_walltime_s, debug.default_walltime_s) == (True, "up", 3600, None)
    assert (long.default, long.state, long.max_walltime_s) == (False, "up", 7 * 86400)
    for partition in (debug, long):
        assert (partition.nodes_total, partition.max_cores_per_node, partition.max_memory_mb_per_node) == (2, 8, 8000)
        assert 0 <= partition.nodes_idle <= 2 and partition.gpus == {} and partition.max_nodes is None
    assert [p.name for p in answer.partitions if p.default] == ["debug"]
    # what sbatch would accept and leave pending for ever (PartitionTimeLimit, or nodes it does not have)
    with pytest.raises(InvalidRequest, match="walltime_s: 7200 is not allowed"):
        check_request(request(walltime_s=7200), answer.find(None))
    with pytest.raises(InvalidRequest, match="nodes: 3 is not allowed"):
        check_request(request(nodes=3), answer.find("long"))
    check_request(request(walltime_s=7200, cores=8, memory_mb=8000), answer.find("long"))


@pytest.mark.asyncio
async def test_slurm_associations_live_without_slurmdbd(slurm_cluster):
    runner = CountingRunner(LocalRunner())
    assert await SlurmAdapter(runner).associations("alice") is None
    assert [argv[0] for argv in runner.calls] == ["sacctmgr"]


@pytest.mark.asyncio
async def test_sge_queues_live(sge_cluster):
    runner = CountingRunner(LocalRunner())
    answer = await PartitionCache(SGEAdapter(runner, default_queue="all.q")).get()
    assert [argv[:2] for argv in runner.calls] == [("qhost", "-q"), ("qconf", "-sq")]
    queues = by_name(answer.partitions)
    all_q, short_q = queues["all.q"], queues["short.q"]
    # docker/sge-cluster/sge.conf.in
    assert (all_q.default, all_q.state, all_q.max_walltime_s, all_q.max_cores_per_node) == (True, "up", None, 8)
    assert all_q.parallel_environments == ("make", "smp", "mpi")
    assert (short_q.default, short_q.state, short_q.max_walltime_s, short_q.max_cores_per_node) == (
        False, "up", 600, 2)
    assert short_q.parallel_environments == ("smp",)
    for queue in (all_q, short_q):
        assert (queue.nodes_total, queue.gpus) == (1, {"": 2}) and 0 <= queue.nodes_idle <= 1
        assert queue.max_memory_mb_per_node > 0
    with pytest.raises(InvalidRequest, match=r"walltime_s: 1200 is not allowed \(at most 600 s"):
        check_request(request(walltime_s=1200), short_q)
    over = request(walltime_s=1200, cores=4, parallel_environment="mpi")
    assert [v.field for v in violations(over, short_q)] == ["walltime_s", "cores", "parallel_environment"]
    check_request(over, all_q)


# --- the PBS emulator ------------------------------------------------------------------------------------------------

@pytest.fixture
def pbs_server(world: Path):
    """An emulated PBS server (docs/pbs-emulation.md) with queue limits: workq (default) and debug."""
    assert not sys.executable.startswith("/root"), "run the tests with a Python the test users can execute"
    root = Path(tempfile.mkdtemp(prefix="limits-", dir=world))
    subprocess.run([sys.executable, str(EMULATOR / "pbs_emu.py"), "install", str(root), "--ncpus", "4", "--ngpus", "2",
                    "--mem", "8gb", "--queues", "workq,debug", "--kill-delay", "1",
                    "--queue-attr", "workq:resources_max.ngpus=1",
                    "--queue-attr", "debug:resources_max.walltime=01:00:00",
                    "--queue-attr", "debug:resources_default.walltime=00:10:00",
                    "--queue-attr", "debug:resources_max.nodect=1"], check=True, capture_output=True, timeout=60)
    yield root
    (root / "home" / "server_down").unlink(missing_ok=True)
    jobs = json.loads(subprocess.run([str(root / "bin" / "qstat"), "-f", "-F", "json"], capture_output=True,
                                     text=True, timeout=30).stdout).get("Jobs", {})
    if jobs:
        subprocess.run([str(root / "bin" / "qdel"), *jobs], capture_output=True, timeout=30)
    shutil.rmtree(root, ignore_errors=True)


@pytest.mark.asyncio
async def test_pbs_queues_from_the_emulator(pbs_server, test_users, shared_dir):
    runner = CountingRunner(LocalRunner())
    adapter = PBSAdapter(runner, pbs_exec=str(pbs_server))
    workq, debug = await adapter.partitions()
    assert [argv[0] for argv in runner.calls] == [str(pbs_server / "bin" / c) for c in ("qstat", "qstat", "pbsnodes")]
    assert workq == PartitionInfo(name="workq", default=True, max_cores_per_node=4, max_memory_mb_per_node=8192,
                                  gpus={"": 1}, nodes_total=1, nodes_idle=1)
    assert debug == PartitionInfo(name="debug", max_walltime_s=3600, default_walltime_s=600, max_nodes=1,
                                  max_cores_per_node=4, max_memory_mb_per_node=8192, gpus={"": 2}, nodes_total=1,
                                  nodes_idle=1)
    # the emulated server refuses what the queue's limits exclude, as check_request does first
    over = request(walltime_s=7200, partition="debug")
    with pytest.raises(InvalidRequest, match="walltime_s"):
        check_request(over, debug)
    refused = subprocess.run(["sudo", "-n", "-u", "alice", "--", str(pbs_server / "bin" / "qsub"), "-q", "debug",
                              "-l", "walltime=02:00:00"], input="true\n", capture_output=True, text=True, timeout=30,
                             cwd=shared_dir)
    assert (refused.returncode, refused.stderr) == (15036 & 0xFF, "qsub: Job exceeds queue resource limits\n")
    # a job on the node: no idle node left
    job = subprocess.run(["sudo", "-n", "-u", "alice", "--", str(pbs_server / "bin" / "qsub"), "-q", "debug",
                          "-o", f"{shared_dir}/", "-j", "oe"], input="sleep 60\n", capture_output=True, text=True,
                         timeout=30, cwd=shared_dir)
    assert job.returncode == 0, job.stderr
    workq, debug = await adapter.partitions()
    assert (workq.nodes_idle, debug.nodes_idle) == (0, 0)
    (pbs_server / "home" / "server_down").touch()
    with pytest.raises(SchedulerUnavailable, match="cannot connect to server pbsemu"):
        await adapter.partitions()


@pytest.mark.asyncio
async def test_a_pbs_queue_not_enabled_drains(pbs_server, test_users, shared_dir):
    with (pbs_server / "bin" / "pbs.conf").open("a") as conf:
        conf.write("PBS_EMU_QATTR.debug.enabled=False\n")   # qmgr -c "set queue debug enabled=False"
    workq, debug = await PBSAdapter(LocalRunner(), pbs_exec=str(pbs_server)).partitions()
    assert (workq.state, debug.state) == ("up", "drain")
    with pytest.raises(InvalidRequest, match="partition debug is drain"):
        check_request(request(), debug)
    refused = subprocess.run(["sudo", "-n", "-u", "alice", "--", str(pbs_server / "bin" / "qsub"), "-q", "debug"],
                             input="true\n", capture_output=True, text=True, timeout=30, cwd=shared_dir)
    assert (refused.returncode, refused.stderr) == (15021 & 0xFF, "qsub: Queue is not enabled\n")


def test_emulated_queue_server_and_node_documents_follow_the_reference_layout(pbs_server):
    """The emulator's documents keep PBS's layout and the reference documents' attribute order."""
    def run(*argv: str) -> str:
        return subprocess.run([str(pbs_server / "bin" / argv[0]), *argv[1:]], capture_output=True, text=True,
                              timeout=30, check=True).stdout
    for argv, reference, kind in ((("qstat", "-Q", "-f", "-F", "json"), "qstat-queues.json", "Queue"),
                                  (("qstat", "-B", "-f", "-F", "json"), "qstat-server.json", "Server"),
                                  (("pbsnodes", "-a", "-v", "-F", "json"), "pbsnodes.json", "nodes")):
        document = run(*argv)
        expected = (FIXTURES / "pbs" / reference).read_text()
        layout = {line.split('"')[0] + ('"key":' if '":' in line else "") for line in expected.splitlines()}
        assert {line.split('"')[0] + ('"key":' if '":' in line else "") for line in document.splitlines()} <= layout
        emulated = next(iter(json.loads(document)[kind].values()))
        known = next(iter(json.loads(expected)[kind].values()))
        common = [name for name in known if name in emulated]
        assert [name for name in emulated if name in known] == common and len(common) >= 5
    text = run("qstat", "-Q", "-f", "debug")
    assert text.startswith("Queue: debug\n    queue_type = Execution\n") and text.endswith("\n\n")
    assert "    resources_max.walltime = 01:00:00\n" in text and "    started = True\n" in text
    nodes = run("pbsnodes", "-a")
    assert "\n     resources_available.ncpus = 4\n" in nodes and "\n     state = free\n" in nodes
