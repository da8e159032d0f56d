"""The job ledger: every batch job hpchub submits, from before submission to its end, with history.

Its own tables and engine (SQLite by default, PostgreSQL supported), apart from JupyterHub's database.
A row is written before the job is submitted, so a hub that dies at any moment can find what it started.
SQLAlchemy is blocking: every call runs on one worker thread, off the hub's event loop, in order.
"""
from __future__ import annotations

import asyncio
import dataclasses
import hashlib
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from typing import Any, Callable, Iterable, TypeVar

from sqlalchemy import JSON, DateTime, Integer, String, Text, TypeDecorator, create_engine, event, select
from sqlalchemy.engine import Dialect, Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from schedulers import JobRequest, JobState, JobStatus

T = TypeVar("T")

#: ledger states beyond the scheduler's: before the job id is known, and after a cancel was asked for
SUBMITTING = "SUBMITTING"
CANCELLING = "CANCELLING"
REJECTED = "REJECTED"
ENDED_STATES = {s.value for s in JobState if s.is_terminal} | {REJECTED}


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class UTCDateTime(TypeDecorator[datetime]):
    """Aware datetimes, always in UTC, on every backend: SQLite keeps no offset (it would store the wall
    time of whatever zone it was given and return naive values), PostgreSQL returns the session's zone."""

    impl = DateTime
    cache_ok = True

    def __init__(self) -> None:
        super().__init__(timezone=True)

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.utcoffset() is None:
            raise ValueError(f"the ledger stores aware datetimes only, not the naive {value.isoformat()}")
        return value.astimezone(timezone.utc)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:   # SQLite: stored as UTC by process_bind_param
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


class Base(DeclarativeBase):
    pass


class JobRecord(Base):
    __tablename__ = "hpchub_jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    tag: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    user: Mapped[str] = mapped_column(String(255), index=True)
    server_name: Mapped[str] = mapped_column(String(255), default="")
    cluster: Mapped[str] = mapped_column(String(64), index=True)
    job_id: Mapped[str | None] = mapped_column(String(64), index=True, default=None)
    request: Mapped[dict] = mapped_column(JSON)
    script_sha256: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16), index=True, default=SUBMITTING)
    native_state: Mapped[str] = mapped_column(String(64), default="")
    reason: Mapped[str] = mapped_column(Text, default="")
    node: Mapped[str] = mapped_column(Text, default="")   # every node of a job: any length
    log_path: Mapped[str] = mapped_column(Text, default="")
    exit_code: Mapped[int | None] = mapped_column(Integer, default=None)
    note: Mapped[str] = mapped_column(Text, default="")
    created: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    submitted: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)
    started: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)
    ended: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)
    updated: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow)

    @property
    def active(self) -> bool:
        return self.state not in ENDED_STATES


def script_hash(script: str) -> str:
    return hashlib.sha256(script.encode()).hexdigest()


class Ledger:
    """Async access to the ledger at `url` (a SQLAlchemy URL)."""

    def __init__(self, url: str):
        self.url = url
        self.engine = _engine(url)
        Base.metadata.create_all(self.engine)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hpchub-ledger")

    async def _call(self, work: Callable[[Session], T]) -> T:
        def run() -> T:
            with self._sessions.begin() as session:
                return work(session)

        return await asyncio.get_running_loop().run_in_executor(self._thread, run)

    async def record_submission(self, *, tag: str, user: str, server_name: str, cluster: str, request: JobRequest,
                                script: str, log_path: str = "") -> None:
        """Written before the job is submitted: a lost answer can then be recovered by tag."""
        record = JobRecord(tag=tag, user=user, server_name=server_name, cluster=cluster,
                           request=dataclasses.asdict(request), script_sha256=script_hash(script), log_path=log_path)
        await self._call(lambda session: session.add(record))

    async def submitted(self, tag: str, job_id: str) -> None:
        def work(session: Session) -> None:
            record = _by_tag(session, tag)
            record.job_id, record.state, record.submitted = job_id, JobState.PENDING.value, utcnow()
            record.log_path = record.log_path.replace("%j", job_id)

        await self._call(work)

    async def rejected(self, tag: str, reason: str) -> None:
        def work(session: Session) -> None:
            record = _by_tag(session, tag)
            record.state, record.reason, record.ended = REJECTED, reason, utcnow()

        await self._call(work)

    async def cancelling(self, tag: str, note: str = "cancel requested") -> None:
        def work(session: Session) -> None:
            record = _by_tag(session, tag)
            if record.active:
                record.state, record.note = CANCELLING, note

        await self._call(work)

    async def update(self, cluster: str, statuses: Iterable[JobStatus]) -> None:
        """Record what one poll saw. UNKNOWN changes nothing but the reason: unknown is not gone."""
        by_id = {status.job_id: status for status in statuses}

        def work(session: Session) -> None:
            if not by_id:
                return
            rows = session.scalars(select(JobRecord).where(
                JobRecord.cluster == cluster, JobRecord.job_id.in_(list(by_id)), JobRecord.state.not_in(ENDED_STATES)))
            now = utcnow()
            for record in rows:
                _apply(record, by_id[record.job_id], now)

        await self._call(work)

    async def active(self, cluster: str | None = None) -> list[JobRecord]:
        """Jobs not known to have ended, oldest first."""
        def work(session: Session) -> list[JobRecord]:
            query = select(JobRecord).where(JobRecord.state.not_in(ENDED_STATES)).order_by(JobRecord.id)
            if cluster is not None:
                query = query.where(JobRecord.cluster == cluster)
            return list(session.scalars(query))

        return await self._call(work)

    async def history(self, user: str, server_name: str | None = None, limit: int = 50) -> list[JobRecord]:
        """A user's jobs, newest first."""
        def work(session: Session) -> list[JobRecord]:
            query = select(JobRecord).where(JobRecord.user == user).order_by(JobRecord.id.desc()).limit(limit)
            if server_name is not None:
                query = query.where(JobRecord.server_name == server_name)
            return list(session.scalars(query))

        return await self._call(work)

    async def get(self, tag: str) -> JobRecord | None:
        return await self._call(lambda session: session.scalar(select(JobRecord).where(JobRecord.tag == tag)))

    def close(self) -> None:
        self._thread.shutdown(wait=True)
        self.engine.dispose()


_ledgers: dict[str, Ledger] = {}


def shared_ledger(url: str) -> Ledger:
    """The hub-wide ledger at `url`, opened on first use."""
    if url not in _ledgers:
        _ledgers[url] = Ledger(url)
    return _ledgers[url]


def _by_tag(session: Session, tag: str) -> JobRecord:
    record = session.scalar(select(JobRecord).where(JobRecord.tag == tag))
    if record is None:
        raise KeyError(f"no ledger row for submission {tag}")
    return record


def _apply(record: JobRecord, status: JobStatus, now: datetime) -> None:
    if status.state == JobState.UNKNOWN:
        record.reason = status.reason
        return
    if record.state != CANCELLING or status.state.is_terminal:
        record.state = status.state.value
    record.native_state, record.reason = status.native_state, status.reason
    if status.nodes:
        record.node = ",".join(status.nodes)
    if status.state == JobState.RUNNING and record.started is None:
        record.started = now
    if status.state.is_terminal:
        record.ended, record.exit_code = now, status.exit_code


def _engine(url: str) -> Engine:
    kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if url.startswith("sqlite"):
        kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
    engine = create_engine(url, **kwargs)
    if url.startswith("sqlite"):
        @event.listens_for(engine, "connect")
        def _wal(connection, _record) -> None:  # readers (hpchub-status) never block the hub's writes
            connection.execute("PRAGMA journal_mode=WAL")

    return engine
