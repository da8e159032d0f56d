"""The job ledger on both backends it supports: SQLite (a file) and PostgreSQL (the test server of
docker/postgres/postgres.sh; each test in a schema of its own, in a session time zone far from UTC)."""
from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import os
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Iterator
from zoneinfo import ZoneInfo

import pytest
import sqlalchemy
from sqlalchemy import select
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError, OperationalError, StatementError
from sqlalchemy.orm import Session

from conftest import require_service
from hpchub.ledger import CANCELLING, REJECTED, SUBMITTING, JobRecord, Ledger
from schedulers import JobRequest, JobState, JobStatus

pytestmark = pytest.mark.asyncio

POSTGRES_URL = os.environ.get("HPCHUB_TEST_POSTGRES_URL",
                              "postgresql+psycopg://hpchub@127.0.0.1:55432/hpchub_ledger_test")
#: the PostgreSQL sessions' time zone, +12:45 or +13:45: a datetime left in it cannot pass for UTC
SESSION_TZ = "Pacific/Chatham"
CLUSTER = "slurm"


@pytest.fixture(scope="session")
def postgres_url() -> str:
    """The test PostgreSQL, answering; fails under CI and skips elsewhere when it does not."""
    try:
        engine = sqlalchemy.create_engine(POSTGRES_URL, connect_args={"connect_timeout": 5})
    except ImportError as err:
        require_service("The PostgreSQL driver", False, f"{err}: install the project's `test` extra (psycopg)")
    try:
        with engine.connect() as connection:
            connection.execute(sqlalchemy.text("SELECT 1"))
        up = True
    except OperationalError:
        up = False
    finally:
        engine.dispose()
    require_service(f"PostgreSQL at {POSTGRES_URL}", up, "run `docker/postgres/postgres.sh start` as root")
    return POSTGRES_URL


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty ledger database on each backend."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'ledger.sqlite'}"
        return
    base = make_url(request.getfixturevalue("postgres_url"))
    schema = f"ledger_test_{uuid.uuid4().hex}"
    admin = sqlalchemy.create_engine(base, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.execute(sqlalchemy.text(f"CREATE SCHEMA {schema}"))
        url = base.update_query_dict({"options": f"-c search_path={schema} -c timezone={SESSION_TZ}"})
        yield url.render_as_string(hide_password=False)
        with admin.connect() as connection:
            connection.execute(sqlalchemy.text(f"DROP SCHEMA {schema} CASCADE"))
    finally:
        admin.dispose()


@pytest.fixture
def ledger(ledger_url: str) -> Iterator[Ledger]:
    ledger = Ledger(ledger_url)
    yield ledger
    ledger.close()


def request_for(tag: str, **values) -> JobRequest:
    return JobRequest(name="hpchub-test", tag=tag, **values)


async def record(ledger: Ledger, tag: str, *, user: str = "alice", server_name: str = "", cluster: str = CLUSTER,
                 log_path: str = "") -> None:
    await ledger.record_submission(tag=tag, user=user, server_name=server_name, cluster=cluster,
                                   request=request_for(tag), script=f"#!/bin/bash\n# {tag}\n", log_path=log_path)


async def submitted(ledger: Ledger, tag: str, job_id: str, **where) -> None:
    await record(ledger, tag, **where)
    await ledger.submitted(tag, job_id)


async def row(ledger: Ledger, tag: str) -> JobRecord:
    found = await ledger.get(tag)
    assert found is not None, f"no ledger row {tag}"
    return found


def utc(value: datetime | None) -> bool:
    return value is not None and value.tzinfo is not None and value.utcoffset() == timedelta(0)


# -- one submission, start to end ---------------------------------------------------------------------
async def test_record_submission_before_submit(ledger):
    request = request_for("t1", cores=4, memory_mb=8000, walltime_s=3600, partition="debug", account="proj-1",
                          output="/tmp/hpchub-%j.log", env_setup=("module load python", "export A='b c'"),
                          extra_directives=("--exclusive",))
    script = "#!/bin/bash\necho 'grüße'\n"
    await ledger.record_submission(tag="t1", user="alice", server_name="gpu", cluster=CLUSTER, request=request,
                                   script=script, log_path="/tmp/hpchub-%j.log")
    got = await row(ledger, "t1")
    assert (got.state, got.user, got.server_name, got.cluster, got.job_id) == (SUBMITTING, "alice", "gpu", CLUSTER, None)
    assert got.active and [r.tag for r in await ledger.active(CLUSTER)] == ["t1"]
    assert got.script_sha256 == hashlib.sha256(script.encode("utf-8")).hexdigest()
    assert got.request == json.loads(json.dumps(dataclasses.asdict(request)))
    as_tuples = {k: tuple(v) if isinstance(v, list) else v for k, v in got.request.items()}
    assert JobRequest(**as_tuples) == request
    assert got.submitted is got.started is got.ended is got.exit_code is None


async def test_submitted_sets_job_id_and_expands_log_path(ledger):
    await record(ledger, "t1", log_path="/home/alice/.hpchub/logs/jupyter-%j.log")
    await ledger.submitted("t1", "4242")
    got = await row(ledger, "t1")
    assert (got.job_id, got.state) == ("4242", JobState.PENDING.value)
    assert got.log_path == "/home/alice/.hpchub/logs/jupyter-4242.log"
    assert got.submitted is not None and got.submitted >= got.created


async def test_pending_running_completed(ledger):
    await submitted(ledger, "t1", "100")
    await ledger.update(CLUSTER, [JobStatus("100", JobState.PENDING, "PENDING", "Priority")])
    got = await row(ledger, "t1")
    assert (got.state, got.reason, got.started, got.node) == ("PENDING", "Priority", None, "")

    await ledger.update(CLUSTER, [JobStatus("100", JobState.RUNNING, "RUNNING", "None", nodes=("c1", "c2"))])
    got = await row(ledger, "t1")
    assert (got.state, got.native_state, got.node) == ("RUNNING", "RUNNING", "c1,c2")
    assert got.started is not None and got.ended is None
    started = got.started

    await ledger.update(CLUSTER, [JobStatus("100", JobState.RUNNING, "RUNNING", nodes=("c1", "c2"))])
    assert (await row(ledger, "t1")).started == started, "a later RUNNING must not move the start"

    await ledger.update(CLUSTER, [JobStatus("100", JobState.FAILED, "FAILED", "NonZeroExitCode", exit_code=3)])
    got = await row(ledger, "t1")
    assert (got.state, got.reason, got.exit_code, got.active) == ("FAILED", "NonZeroExitCode", 3, False)
    assert got.ended is not None and got.ended >= started
    assert await ledger.active() == []

    # an ended row is final: a stale status from a slow poll changes nothing
    await ledger.update(CLUSTER, [JobStatus("100", JobState.RUNNING, "RUNNING", nodes=("c9",))])
    after = await row(ledger, "t1")
    assert (after.state, after.node, after.ended) == ("FAILED", "c1,c2", got.ended)


async def test_unknown_changes_only_the_reason(ledger):
    await submitted(ledger, "t1", "100")
    await ledger.update(CLUSTER, [JobStatus("100", JobState.RUNNING, "RUNNING", "None", nodes=("c1",))])
    before = await row(ledger, "t1")
    await ledger.update(CLUSTER, [JobStatus("100", JobState.UNKNOWN, reason="scheduler unavailable: timed out")])
    after = await row(ledger, "t1")
    assert after.reason == "scheduler unavailable: timed out"
    assert (after.state, after.native_state, after.node, after.started, after.ended, after.exit_code) == \
        (before.state, before.native_state, before.node, before.started, None, None)
    assert after.active


async def test_cancelling_stays_until_a_terminal_state(ledger):
    await submitted(ledger, "t1", "100")
    await ledger.cancelling("t1")
    assert (await row(ledger, "t1")).state == CANCELLING

    await ledger.update(CLUSTER, [JobStatus("100", JobState.RUNNING, "RUNNING", nodes=("c1",))])
    got = await row(ledger, "t1")
    assert (got.state, got.native_state, got.node, got.note) == (CANCELLING, "RUNNING", "c1", "cancel requested")
    assert got.started is not None
    await ledger.update(CLUSTER, [JobStatus("100", JobState.COMPLETING, "COMPLETING")])
    await ledger.update(CLUSTER, [JobStatus("100", JobState.UNKNOWN, reason="query failed")])
    got = await row(ledger, "t1")
    assert (got.state, got.native_state, got.reason, got.ended) == (CANCELLING, "COMPLETING", "query failed", None)
    assert [r.tag for r in await ledger.active(CLUSTER)] == ["t1"]

    await ledger.update(CLUSTER, [JobStatus("100", JobState.CANCELLED, "CANCELLED", exit_code=0)])
    got = await row(ledger, "t1")
    assert (got.state, got.exit_code, got.active) == ("CANCELLED", 0, False) and got.ended is not None
    await ledger.cancelling("t1", "again")
    assert (await row(ledger, "t1")).state == "CANCELLED", "an ended job is not cancelling"


async def test_rejected(ledger):
    await record(ledger, "t1")
    await ledger.rejected("t1", "sbatch: error: invalid partition specified: nope")
    got = await row(ledger, "t1")
    assert (got.state, got.job_id, got.active) == (REJECTED, None, False)
    assert got.reason == "sbatch: error: invalid partition specified: nope" and got.ended is not None
    assert await ledger.active() == []
    await ledger.cancelling("t1")
    assert (await row(ledger, "t1")).state == REJECTED


async def test_unknown_tag_is_an_error(ledger):
    with pytest.raises(KeyError, match="nope"):
        await ledger.submitted("nope", "1")
    with pytest.raises(KeyError, match="nope"):
        await ledger.rejected("nope", "reason")
    assert await ledger.get("nope") is None


async def test_a_job_on_many_nodes(ledger):
    nodes = tuple(f"node{i:04d}.cluster.example.org" for i in range(100))
    await submitted(ledger, "wide", "100")
    await submitted(ledger, "narrow", "101")
    await ledger.update(CLUSTER, [JobStatus("100", JobState.RUNNING, nodes=nodes),
                                  JobStatus("101", JobState.RUNNING, nodes=("c1",))])
    assert (await row(ledger, "wide")).node == ",".join(nodes)
    assert (await row(ledger, "narrow")).state == "RUNNING"


async def test_update_touches_only_its_cluster(ledger):
    await submitted(ledger, "a", "100", cluster="slurm")
    await submitted(ledger, "b", "100", cluster="sge")
    await ledger.update("slurm", [JobStatus("100", JobState.RUNNING, "RUNNING", nodes=("c1",))])
    assert (await row(ledger, "a")).state == "RUNNING"
    assert (await row(ledger, "b")).state == "PENDING"
    await ledger.update("slurm", [])   # an empty poll is no error


# -- lists ----------------------------------------------------------------------------------------------
async def test_active_per_cluster_oldest_first(ledger):
    await record(ledger, "submitting")
    await submitted(ledger, "pending", "1")
    await submitted(ledger, "running", "2")
    await submitted(ledger, "done", "3")
    await submitted(ledger, "cancelling", "4")
    await record(ledger, "rejected")
    await submitted(ledger, "other-cluster", "1", cluster="sge")
    await ledger.update(CLUSTER, [JobStatus("2", JobState.RUNNING), JobStatus("3", JobState.COMPLETED, exit_code=0)])
    await ledger.cancelling("cancelling")
    await ledger.rejected("rejected", "no")

    assert [r.tag for r in await ledger.active(CLUSTER)] == ["submitting", "pending", "running", "cancelling"]
    assert [r.tag for r in await ledger.active("sge")] == ["other-cluster"]
    assert [r.tag for r in await ledger.active()] == ["submitting", "pending", "running", "cancelling",
                                                      "other-cluster"]
    assert await ledger.active("pbs") == []


async def test_history_newest_first_per_user_and_server(ledger):
    for i in range(5):
        await submitted(ledger, f"alice-{i}", str(i), server_name="gpu" if i % 2 else "")
    await submitted(ledger, "bob-0", "10", user="bob")
    await ledger.update(CLUSTER, [JobStatus("0", JobState.COMPLETED, exit_code=0)])

    assert [r.tag for r in await ledger.history("alice")] == [f"alice-{i}" for i in (4, 3, 2, 1, 0)]
    assert [r.tag for r in await ledger.history("alice", "gpu")] == ["alice-3", "alice-1"]
    assert [r.tag for r in await ledger.history("alice", "")] == ["alice-4", "alice-2", "alice-0"]
    assert [r.tag for r in await ledger.history("alice", limit=2)] == ["alice-4", "alice-3"]
    assert [r.tag for r in await ledger.history("bob")] == ["bob-0"]
    assert await ledger.history("carol") == []
    assert (await ledger.history("alice"))[-1].state == "COMPLETED", "history keeps ended jobs"


async def test_tags_are_unique(ledger):
    await submitted(ledger, "t1", "100")
    with pytest.raises(IntegrityError):
        await record(ledger, "t1", user="bob")
    # the failed insert was rolled back: the ledger goes on working, the first row untouched
    await record(ledger, "t2")
    got = await row(ledger, "t1")
    assert (got.user, got.job_id, got.state) == ("alice", "100", "PENDING")
    assert [r.tag for r in await ledger.active()] == ["t1", "t2"]


# -- scale and concurrency ------------------------------------------------------------------------------
async def test_many_rows_in_one_update(ledger, ledger_url):
    n = 200
    await asyncio.gather(*(submitted(ledger, f"t{i}", str(1000 + i)) for i in range(n)))
    running = [JobStatus(str(1000 + i), JobState.RUNNING, "RUNNING", nodes=(f"c{i % 2 + 1}",)) for i in range(n)]
    ended = [JobStatus(str(1000 + i), JobState.COMPLETED, "COMPLETED", exit_code=0) for i in range(n)]
    timings = []
    for statuses in (running, running, ended):   # the middle one changes nothing, as most poller ticks
        t0 = time.perf_counter()
        await ledger.update(CLUSTER, statuses)
        timings.append(time.perf_counter() - t0)
    backend = make_url(ledger_url).get_backend_name()
    print(f"{backend}: update of {n} rows: to RUNNING {timings[0] * 1000:.1f} ms, unchanged "
          f"{timings[1] * 1000:.1f} ms, to COMPLETED {timings[2] * 1000:.1f} ms")
    assert max(timings) < 2.0, f"updating {n} rows took {timings} s"
    rows = await ledger.history("alice", limit=n)
    assert len(rows) == n and {r.state for r in rows} == {"COMPLETED"}
    assert all(r.started is not None and r.ended is not None and r.exit_code == 0 for r in rows)
    assert await ledger.active() == []


async def test_concurrent_tasks_keep_their_order(ledger):
    """Calls run on the ledger's one worker thread in the order they were made, whichever task made them:
    a poll recorded right after `submitted` finds the job id, a CANCELLED after RUNNING is the last word."""
    n = 50
    await asyncio.gather(*(record(ledger, f"t{i}", user=f"user{i % 5}") for i in range(n)))
    calls = []
    for i in range(n):
        job_id = str(500 + i)
        calls += [
            ledger.submitted(f"t{i}", job_id),
            ledger.update(CLUSTER, [JobStatus(job_id, JobState.RUNNING, "RUNNING", nodes=("c1",))]),
            ledger.cancelling(f"t{i}"),
            ledger.update(CLUSTER, [JobStatus(job_id, JobState.CANCELLED, "CANCELLED", exit_code=0)]),
            ledger.update(CLUSTER, [JobStatus(job_id, JobState.RUNNING, "RUNNING", nodes=("c2",))]),
        ]
    await asyncio.gather(*calls)
    rows = await asyncio.gather(*(row(ledger, f"t{i}") for i in range(n)))
    for got in rows:
        assert (got.state, got.node, got.note) == ("CANCELLED", "c1", "cancel requested"), got.tag
        assert got.submitted <= got.started <= got.ended
    assert await ledger.active() == []
    histories = await asyncio.gather(*(ledger.history(f"user{u}") for u in range(5)))
    assert sorted(r.tag for h in histories for r in h) == sorted(f"t{i}" for i in range(n))


# -- time zones -----------------------------------------------------------------------------------------
async def test_datetimes_are_utc_aware(ledger):
    before = datetime.now(timezone.utc)
    await submitted(ledger, "t1", "100")
    await ledger.update(CLUSTER, [JobStatus("100", JobState.RUNNING, nodes=("c1",))])
    await ledger.update(CLUSTER, [JobStatus("100", JobState.TIMEOUT, exit_code=0)])
    after = datetime.now(timezone.utc)
    for got in (await row(ledger, "t1"), (await ledger.history("alice"))[0]):
        stamps = [got.created, got.submitted, got.started, got.ended]
        assert all(utc(s) for s in stamps + [got.updated]), stamps
        assert before <= got.created <= got.submitted <= got.started <= got.ended <= got.updated <= after, stamps


async def test_an_aware_datetime_in_any_zone_is_stored_as_its_instant(ledger):
    await submitted(ledger, "early", "1")
    await submitted(ledger, "late", "2")
    early = datetime(2026, 6, 30, 23, 30, tzinfo=timezone.utc)
    # 9:00 on July 1st in Chatham is 20:15 UTC on June 30th: a wall time stored as such would sort last
    late = datetime(2026, 7, 1, 9, 0, tzinfo=ZoneInfo("Pacific/Chatham"))
    with Session(ledger.engine) as session, session.begin():
        session.scalar(select(JobRecord).where(JobRecord.tag == "early")).started = early
        session.scalar(select(JobRecord).where(JobRecord.tag == "late")).started = late
    assert (await row(ledger, "early")).started == early and utc((await row(ledger, "early")).started)
    got = (await row(ledger, "late")).started
    assert got == late and utc(got) and got.hour == 20 and got.minute == 15
    with Session(ledger.engine) as session:
        first = session.scalars(select(JobRecord.tag).where(JobRecord.started.is_not(None))
                                .order_by(JobRecord.started)).all()
        after = session.scalars(select(JobRecord.tag).where(
            JobRecord.started > datetime(2026, 6, 30, 21, tzinfo=timezone.utc))).all()
    assert (first, after) == (["late", "early"], ["early"])


async def test_naive_datetimes_are_refused(ledger):
    await submitted(ledger, "t1", "100")
    with Session(ledger.engine) as session:
        session.scalar(select(JobRecord).where(JobRecord.tag == "t1")).started = datetime(2026, 7, 1, 9, 0)
        with pytest.raises(StatementError, match="naive"):
            session.commit()
    assert (await row(ledger, "t1")).started is None
