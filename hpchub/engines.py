"""ipyparallel engines as batch jobs, submitted by the hub for a notebook server (the hub side of hpchub.ipp).

A notebook server asks with its own token (`POST /hub/api/hpchub/engines`, a fixed schema: how many engines,
optional cores, memory and walltime within the server's own, and the path of its controller's engine
connection file). The hub builds each engine's job from the admin's template and the server's own job as it
was submitted (cluster, partition, account, QOS, reservation, constraint, set-up lines: the profile's and the
user's choices included), runs a fixed command (`ipengine --file=PATH`, behind the profile's command prefix),
submits one job per engine as the user, records each in the job ledger and follows it with the shared poller.
Engine jobs end when their cluster is stopped (`DELETE`), when their server stops (`cancel_engines`, from
BatchSpawner.stop), or at their walltime.

Ledger convention: an engine job's tag is `<its server's job tag>-ipp-<set id>-<index>` (`parse_engine_tag`)
and its server_name is its server's, so a row names its parent server and, through the tag, the server's job.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import os
import re
import secrets
from dataclasses import dataclass, fields, replace
from typing import Any, Awaitable, Callable

from jupyterhub.apihandlers import APIHandler, default_handlers
from sqlalchemy import select
from sqlalchemy.orm import Session
from tornado import web
from traitlets import Integer, List, Unicode, default, validate
from traitlets.config import LoggingConfigurable

from job_templates import TemplateValueError, hms, render_env_file, render_job_script
from schedulers import InvalidRequest, JobRequest, SchedulerError, SubmitRejected

from .ledger import ENDED_STATES, JobRecord, Ledger

_TAG = re.compile(r"(?P<parent>[A-Za-z0-9]+)-ipp-(?P<set_id>[0-9a-f]{8})-(?P<index>[0-9]+)")
_SET_ID = r"[0-9a-f]{8}"
# where a connection file may be: an absolute path of plain characters, no white space or shell syntax
_CONNECTION_FILE = re.compile(r"/[A-Za-z0-9_.%@+~=/-]*\.json")
_REQUEST_FIELDS = ("n", "connection_file", "cores", "memory", "walltime")


@dataclass(frozen=True)
class EngineTag:
    """Where an engine job belongs: its server's job tag, its engine set and its place in the set."""

    parent: str
    set_id: str
    index: int

    def __str__(self) -> str:
        return f"{self.parent}-ipp-{self.set_id}-{self.index}"


def parse_engine_tag(tag: str) -> EngineTag | None:
    """The EngineTag of a ledger row's tag; None for a row that is not an engine job."""
    match = _TAG.fullmatch(tag)
    return EngineTag(match["parent"], match["set_id"], int(match["index"])) if match else None


class EngineRefused(Exception):
    """A request for engines that cannot be carried out; `status` is the HTTP status, the message says why."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class HpcHubEngines(LoggingConfigurable):
    """What the hub allows and runs when a notebook server asks for ipyparallel engines
    (`ipp.Cluster(engines="hpchub")`, see docs/ipyparallel.md)."""

    max_engines_per_user = Integer(
        16,
        min=0,
        help="Engine jobs one user may have queued or running at once, over all their servers. A request that "
        "would go beyond is refused (HTTP 403) naming this setting; 0 turns engines off.",
    ).tag(config=True)

    engine_command = List(
        Unicode(),
        help="The engine program of every engine job; the hub adds `--file=CONNECTION_FILE`. It must run the "
        "same ipyparallel as the notebook's kernels. Default: ipengine next to the hub's Python (the jobs' "
        "environment, as for batchspawner-singleuser).",
    ).tag(config=True)

    @default("engine_command")
    def _default_engine_command(self) -> list[str]:
        from batchspawner.spawner import beside_python

        return [beside_python("ipengine")]

    @validate("engine_command")
    def _validate_engine_command(self, proposal: dict) -> list[str]:
        if not proposal["value"]:
            raise ValueError("HpcHubEngines.engine_command: give the engine program, e.g. ['/opt/hpchub/bin/ipengine']")
        return proposal["value"]

    job_name = Unicode(
        "ipengine-{username}",
        help="Batch job name of engine jobs; {username} and {servername} are replaced.",
    ).tag(config=True)

    job_template = Unicode(
        "",
        help="Job script template of engine jobs; empty: the server's (BatchSpawner.job_template, else the "
        "scheduler's own). Searched in BatchSpawner.job_template_dirs first.",
    ).tag(config=True)

    extra_directives = List(
        Unicode(),
        help="Admin-only scheduler directives of engine jobs, one per entry. The server's req_extra_directives "
        "are not used: a server's GPUs or exclusive node should not be multiplied by its engine count.",
    ).tag(config=True)

    default_cores = Integer(1, min=1, help="Cores of an engine job whose request names none.").tag(config=True)

    default_memory = Unicode(
        "",
        help="Memory of an engine job whose request names none, e.g. '2G'; empty: the scheduler's default.",
    ).tag(config=True)

    default_walltime = Unicode(
        "",
        help="Walltime of an engine job whose request names none, in Slurm's forms; empty: the server's own "
        "(BatchSpawner.req_runtime).",
    ).tag(config=True)

    @validate("default_memory")
    def _validate_memory(self, proposal: dict) -> str:
        from batchspawner.request import parse_memory_mb

        parse_memory_mb(proposal["value"])
        return proposal["value"]

    @validate("default_walltime")
    def _validate_walltime(self, proposal: dict) -> str:
        from batchspawner.request import parse_walltime_s

        parse_walltime_s(proposal["value"])
        return proposal["value"]


@dataclass(frozen=True)
class EngineRequest:
    """The body of `POST /hub/api/hpchub/engines`: exactly these fields, each checked."""

    n: int
    connection_file: str
    cores: int | None = None
    memory: str | None = None
    walltime: str | None = None

    @classmethod
    def from_json(cls, body: Any) -> EngineRequest:
        """Raises EngineRefused(400) naming the field that is wrong."""
        if not isinstance(body, dict):
            raise EngineRefused(400, 'expected a JSON object like {"n": 4, "connection_file": "/home/..."}')
        unknown = sorted(set(body) - set(_REQUEST_FIELDS))
        if unknown:
            raise EngineRefused(400, f"unknown fields {unknown}; allowed: {', '.join(_REQUEST_FIELDS)}")
        for name in ("n", "connection_file"):
            if name not in body:
                raise EngineRefused(400, f"{name} is missing")
        if not _whole(body["n"], 1):
            raise EngineRefused(400, f"n: {body['n']!r} is not a whole number >= 1")
        if not isinstance(body["connection_file"], str):
            raise EngineRefused(400, "connection_file: expected the path of the controller's engine connection file")
        if body.get("cores") is not None and not _whole(body["cores"], 1):
            raise EngineRefused(400, f"cores: {body['cores']!r} is not a whole number >= 1")
        for name in ("memory", "walltime"):
            if body.get(name) is not None and (not isinstance(body[name], str) or len(body[name]) > 32):
                example = "'2G'" if name == "memory" else "'01:00:00'"
                raise EngineRefused(400, f"{name}: expected a short string such as {example}")
        return cls(n=body["n"], connection_file=body["connection_file"], cores=body.get("cores"),
                   memory=body.get("memory") or None, walltime=body.get("walltime") or None)


def _whole(value: Any, least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


@dataclass(frozen=True)
class _Resources:
    cores: int
    memory_mb: int | None
    walltime_s: int | None


class EngineJobs:
    """The engine jobs of one running notebook server (a BatchSpawner), as the hub handles them."""

    def __init__(self, spawner: Any, settings: HpcHubEngines):
        self.spawner = spawner
        self.settings = settings
        self.parent = spawner.job_tag

    @property
    def ledger(self) -> Ledger:
        return self.spawner.ledger

    async def start(self, request: EngineRequest) -> dict:
        """Submit `request.n` engine jobs; the new set's model."""
        spawner = self.spawner
        self._check_count(request.n, 0)   # at once: nothing is built for a request that cannot be met
        home = await spawner.user_home()
        self._check_path(request.connection_file, home)
        server = await self._server_request()
        resources = self._resources(request, server)
        await self._check_connection_file(request.connection_file)
        set_id = secrets.token_hex(4)
        env_file = _env_file(spawner, home, self.parent, set_id)
        jobs = [self._job(EngineTag(self.parent, set_id, index), server, resources, env_file, request.connection_file)
                for index in range(request.n)]
        async with _user_lock(spawner.user.name):
            await self._check_limit(request.n)
            for tag, job_request, script in jobs:
                await self.ledger.record_submission(
                    tag=tag, user=spawner.user.name, server_name=spawner.name or "", cluster=spawner.cluster_name,
                    request=job_request, script=script, log_path=job_request.output or "")
        try:
            await _write_job_files(spawner, env_file, os.path.dirname(jobs[0][1].output or ""), set_id)
        except EngineRefused as err:
            for tag, _, _ in jobs:
                await self.ledger.rejected(tag, str(err))
            raise
        submitted = await self._submit(jobs, set_id, env_file)
        if not spawner.ready or spawner.job_tag != self.parent:
            # the server began to stop while these were submitted: its cancel_engines did not see their job ids
            records = await _rows(self.ledger, spawner.user.name, f"{self.parent}-ipp-{set_id}-", active=True)
            await _cancel(spawner, records, "cancelled: its notebook server stopped", wait=0)
            raise EngineRefused(409, "the notebook server stopped while its engines were submitted; they were "
                                "cancelled")
        spawner.log.info("Submitted %d engine jobs for %s (set %s): %s", len(submitted), spawner._log_name, set_id,
                         ", ".join(submitted))
        return await self.get(set_id)

    async def sets(self) -> list[dict]:
        """Every engine set of this server, oldest first."""
        records = await _rows(self.ledger, self.spawner.user.name, f"{self.parent}-ipp-")
        by_set: dict[str, list[JobRecord]] = {}
        for record in records:
            engine = parse_engine_tag(record.tag)
            if engine is not None:
                by_set.setdefault(engine.set_id, []).append(record)
        _ensure_followed(self.spawner, [r for r in records if r.active])
        return [_set_model(set_id, rows) for set_id, rows in by_set.items()]

    async def get(self, set_id: str) -> dict:
        records = await self._set_rows(set_id)
        _ensure_followed(self.spawner, [r for r in records if r.active])
        return _set_model(set_id, records)

    async def stop(self, set_id: str) -> tuple[bool, dict]:
        """Cancel the set's jobs: (confirmed ended within the server's stop_timeout, the set's model)."""
        records = await self._set_rows(set_id)
        active = [r for r in records if r.active]
        _ensure_followed(self.spawner, active)
        confirmed = await _cancel(self.spawner, active, "cancelled: its ipyparallel cluster stopped",
                                  wait=self.spawner.stop_timeout)
        return confirmed, _set_model(set_id, await self._set_rows(set_id))

    async def _set_rows(self, set_id: str) -> list[JobRecord]:
        records = await _rows(self.ledger, self.spawner.user.name, f"{self.parent}-ipp-{set_id}-")
        if not records:
            raise EngineRefused(404, f"this server has no engine set {set_id}")
        return records

    def _check_path(self, path: str, home: str) -> None:
        inside = home.rstrip("/") + "/"
        if (len(path) > 1024 or not _CONNECTION_FILE.fullmatch(path) or os.path.normpath(path) != path
                or not path.startswith(inside)):
            raise EngineRefused(400, f"connection_file: {path!r} is not allowed: give the absolute path of a .json "
                                f"file inside {inside} (letters, digits and _.%@+~=/- only, no '..')")

    async def _check_connection_file(self, path: str) -> None:
        """The file exists for the user and only the user can read it: it holds the cluster's key."""
        result = await _run_as_user(self.spawner, ["stat", "-L", "--format=%a", "--", path],
                                    "read the connection file", status=400)
        mode = int(result.strip() or "0", 8)
        if mode & 0o077:
            raise EngineRefused(400, f"connection_file: {path} has mode {mode:o}: it holds the cluster's key, so only "
                                "its owner may read it (chmod 600)")

    async def _server_request(self) -> JobRequest:
        """What the server's own job was submitted with (its ledger row): the engines' bounds and settings, the
        user's profile choices included, also after a hub restart."""
        record = await self.ledger.get(self.parent)
        if record is None:
            raise EngineRefused(409, f"the job ledger has no record of this server's job ({self.parent})")
        known = {item.name for item in fields(JobRequest)}
        values = {name: value for name, value in record.request.items() if name in known}
        for name in ("env_setup", "extra_directives"):
            values[name] = tuple(values.get(name) or ())
        return JobRequest(**values)

    def _resources(self, request: EngineRequest, server: JobRequest) -> _Resources:
        """The request's cores, memory and walltime, each at most the server's own; the admin's defaults else."""
        from batchspawner.request import parse_memory_mb, parse_walltime_s

        settings = self.settings
        cores = request.cores or settings.default_cores
        if request.cores is not None and request.cores > server.cores:
            raise EngineRefused(400, f"cores: {request.cores} is more than this server's own {server.cores}")
        memory = parse_memory_mb(settings.default_memory)
        if request.memory is not None:
            memory = _parsed("memory", parse_memory_mb, request.memory)
            if server.memory_mb is None:
                raise EngineRefused(400, "memory: this server has the scheduler's default memory, so its engines do "
                                    "too; leave memory out")
            if memory > server.memory_mb:
                raise EngineRefused(400, f"memory: {request.memory} is more than this server's own "
                                    f"{server.memory_mb} MB")
        walltime = parse_walltime_s(settings.default_walltime) or server.walltime_s
        if request.walltime is not None:
            walltime = _parsed("walltime", parse_walltime_s, request.walltime)
            if server.walltime_s is not None and walltime > server.walltime_s:
                raise EngineRefused(400, f"walltime: {request.walltime} is longer than this server's own "
                                    f"{hms(server.walltime_s)}")
        return _Resources(cores, memory, walltime)

    def _job(self, tag: EngineTag, server: JobRequest, resources: _Resources, env_file: str,
             connection_file: str) -> tuple[str, JobRequest, str]:
        """An engine's job: the server's partition, account, QOS, reservation, constraint, working directory and
        set-up lines; its own name, resources, output and directives; no GPU and no early walltime signal."""
        spawner, settings = self.spawner, self.settings
        spec = spawner.cluster_spec
        prefix = spawner.choice.command_prefix if spawner.choice is not None else ()
        name = settings.job_name.format(username=spawner.user.name, servername=spawner.name or "")
        try:
            request = replace(
                server,
                name=re.sub(r"[^A-Za-z0-9_.+-]", "-", name),
                tag=str(tag),
                nodes=1,
                cores=resources.cores,
                memory_mb=resources.memory_mb,
                gpus=0,
                gpu_type=None,
                walltime_s=resources.walltime_s,
                output=os.path.join(os.path.dirname(server.output or server.workdir or "/"), "ipengine-%j.log"),
                error=None,
                extra_directives=tuple(settings.extra_directives),
                signal_before_end_s=None,
            )
            script = render_job_script(
                settings.job_template or (spec.job_template if spec else "") or spawner.job_template
                or spawner.adapter.template,
                request,
                user=spawner.user.name,
                env_file=env_file,
                command=[*prefix, *settings.engine_command, f"--file={connection_file}"],
                template_dirs=(spec.job_template_dirs if spec else ()) or spawner.job_template_dirs,
            )
        except InvalidRequest as err:
            raise EngineRefused(400, f"cannot build an engine job: {err}") from err
        except TemplateValueError as err:
            raise EngineRefused(500, f"cannot build the engine job script: {err}") from err
        return str(tag), request, script

    async def _check_limit(self, n: int) -> None:
        records = await _rows(self.ledger, self.spawner.user.name, "", active=True)
        self._check_count(n, sum(1 for r in records if parse_engine_tag(r.tag)))

    def _check_count(self, n: int, active: int) -> None:
        limit = self.settings.max_engines_per_user
        if limit == 0:
            raise EngineRefused(403, "engines are turned off on this hub (HpcHubEngines.max_engines_per_user = 0)")
        if active + n > limit:
            raise EngineRefused(403, f"{self.spawner.user.name} may have at most {limit} engine jobs queued or "
                                f"running at once (HpcHubEngines.max_engines_per_user); {active} are, and {n} more "
                                "were asked for")

    async def _submit(self, jobs: list[tuple[str, JobRequest, str]], set_id: str, env_file: str) -> list[str]:
        """Submit every job of a set, or none: when one is refused the others are cancelled."""
        from batchspawner.spawner import submission_slots

        spawner = self.spawner
        slots = submission_slots(spawner.cluster_name, spawner.max_concurrent_submissions)

        async def submit(job_request: JobRequest, script: str) -> str:
            async with slots:
                return await spawner.adapter.submit(script, job_request, user=spawner.run_as)

        results = await asyncio.gather(*(submit(r, s) for _, r, s in jobs), return_exceptions=True)
        job_ids, failure = [], None
        for (tag, _, _), result in zip(jobs, results):
            if isinstance(result, BaseException):
                reason = result.reason if isinstance(result, SchedulerError) else f"hpchub error: {result!r}"
                await self.ledger.rejected(tag, reason)
                if not isinstance(result, SchedulerError):
                    spawner.log.error("Submitting engine job %s failed", tag, exc_info=result)
                failure = failure or (tag, result)
            else:
                await self.ledger.submitted(tag, result)
                job_ids.append(result)
        records = [r for r in await _rows(self.ledger, spawner.user.name, f"{self.parent}-ipp-{set_id}-") if r.active]
        _ensure_followed(spawner, records)
        if failure is None:
            return job_ids
        await _cancel(spawner, records, "cancelled: another engine job of its set was refused", wait=0)
        if not records:
            await _remove_env_file(spawner, env_file)
        tag, error = failure
        index = parse_engine_tag(tag).index
        if isinstance(error, SubmitRejected):
            raise EngineRefused(400, f"the scheduler refused engine job {index + 1} of {len(jobs)}: {error.reason}")
        if isinstance(error, SchedulerError):
            raise EngineRefused(503, f"the scheduler could not be reached to submit engine job {index + 1} of "
                                f"{len(jobs)}: {error.reason}")
        raise EngineRefused(500, f"submitting engine job {index + 1} of {len(jobs)} failed: {error!r}")


async def cancel_engines(spawner: Any) -> None:
    """Cancel every engine job of `spawner`'s server: its notebook server stops (BatchSpawner.stop calls this).

    Returns once the scheduler took the cancel (one call for all of them); the jobs' ends are followed in the
    background, and a cancel the scheduler did not take is retried there (BatchSpawner.cancel_retry_timeout)."""
    if not spawner.job_tag:
        return
    records = await _rows(spawner.ledger, spawner.user.name, f"{spawner.job_tag}-ipp-", active=True)
    if records:
        _ensure_followed(spawner, records)
        await _cancel(spawner, records, "cancelled: its notebook server stopped", wait=0)


# -- the jobs -------------------------------------------------------------------------------------
_followers: dict[str, asyncio.Task] = {}   # engine job tag -> the task following its job to its end
_user_locks: dict[str, asyncio.Lock] = {}
_background: set[asyncio.Task] = set()


def _user_lock(user: str) -> asyncio.Lock:
    """Held while a user's engine count is checked and the new jobs recorded, so two requests cannot both
    pass the limit."""
    return _user_locks.setdefault(user, asyncio.Lock())


def _ensure_followed(spawner: Any, records: list[JobRecord]) -> None:
    """Follow each job with the shared poller until it ends (the poller writes its states to the ledger). After
    a hub restart the first request about a server's engines takes them back."""
    for record in records:
        if record.job_id and record.tag not in _followers:
            _followers[record.tag] = asyncio.ensure_future(_follow(spawner, record.tag, record.job_id))


async def _follow(spawner: Any, tag: str, job_id: str) -> None:
    poller = spawner.poller
    try:
        while not (await poller.next_update(job_id)).state.is_terminal:
            pass
    finally:
        poller.untrack(job_id)
        del _followers[tag]
    engine = parse_engine_tag(tag)
    set_prefix = f"{engine.parent}-ipp-{engine.set_id}-"
    if not any(other.startswith(set_prefix) for other in _followers):
        try:
            env_file = _env_file(spawner, await spawner.user_home(), engine.parent, engine.set_id)
        except (KeyError, OSError) as err:
            spawner.log.warning("Cannot find the home of %s to remove engine set %s's file: %s", spawner._log_name,
                                engine.set_id, err)
            return
        await _remove_env_file(spawner, env_file)


async def _cancel(spawner: Any, records: list[JobRecord], note: str, wait: float) -> bool:
    """Cancel the jobs of `records` in one scheduler call (retried in the background while the scheduler cannot be
    reached), then wait up to `wait` seconds for every one to end. True when they all did; their followers go on
    watching them either way."""
    for record in records:
        await spawner.ledger.cancelling(record.tag, note)
    submitted = [r for r in records if r.job_id]
    if not submitted:
        return True
    job_ids = [r.job_id for r in submitted]
    spawner.log.info("Cancelling engine jobs %s of %s (%s)", ", ".join(job_ids), spawner._log_name, note)
    taken = asyncio.ensure_future(_cancel_until_taken(spawner, job_ids))
    _background.add(taken)
    taken.add_done_callback(_background.discard)
    try:
        await asyncio.wait_for(asyncio.shield(taken), spawner.command_timeout + 1)
    except asyncio.TimeoutError:
        return False
    followers = [_followers[r.tag] for r in submitted if r.tag in _followers]
    if wait <= 0:
        return not followers
    if followers:
        done, _ = await asyncio.wait([asyncio.shield(f) for f in followers], timeout=wait)
        return len(done) == len(followers)
    return True


async def _cancel_until_taken(spawner: Any, job_ids: list[str]) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + spawner.cancel_retry_timeout
    delay = 0.5
    while True:
        try:
            await spawner.adapter.cancel(job_ids, user=spawner.run_as)
            break
        except SchedulerError as err:
            if loop.time() + delay > deadline:
                spawner.log.error("Engine jobs %s of %s could not be cancelled: %s", ", ".join(job_ids),
                                  spawner._log_name, err)
                return
            spawner.log.warning("Cancel of engine jobs %s of %s failed (%s); retrying in %.1f s", ", ".join(job_ids),
                                spawner._log_name, err, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)
    for job_id in job_ids:
        spawner.poller.hurry(job_id)


# -- files and the ledger ---------------------------------------------------------------------------
def _format(template: str, spawner: Any, home: str) -> str:
    return template.format(home=home, username=spawner.user.name, servername=spawner.name or "")


def _env_file(spawner: Any, home: str, parent: str, set_id: str) -> str:
    return os.path.join(_format(spawner.job_run_dir, spawner, home), f"{parent}-ipp-{set_id}.env")


def _engine_env(spawner: Any, set_id: str) -> dict[str, str]:
    """The engines' environment: the admin's Spawner.environment and where they belong. Never the server's
    tokens: an engine has no business with the hub."""
    env = {key: value(spawner) if callable(value) else value for key, value in spawner.environment.items()}
    env.update(HPCHUB_ENGINE_SET=set_id, HPCHUB_SERVER_JOB_ID=spawner.job_id)
    return env


async def _write_job_files(spawner: Any, env_file: str, log_dir: str, set_id: str) -> None:
    if log_dir:
        await _run_as_user(spawner, ["mkdir", "-p", "--", log_dir], f"create the job log directory {log_dir}")
    run_dir = os.path.dirname(env_file)
    await _run_as_user(spawner, ["install", "-d", "-m", "700", "--", run_dir],
                       f"create the private directory {run_dir}")
    await _run_as_user(spawner, ["dd", f"of={env_file}", "status=none"],
                       f"write the engines' environment file {env_file}",
                       stdin=render_env_file(_engine_env(spawner, set_id)))


async def _remove_env_file(spawner: Any, env_file: str) -> None:
    try:
        await _run_as_user(spawner, ["rm", "-f", "--", env_file], f"remove {env_file}")
    except EngineRefused as err:
        spawner.log.warning("%s", err)


async def _run_as_user(spawner: Any, argv: list[str], what: str, *, stdin: str | None = None, status: int = 500) -> str:
    """Run a file command as the job's user; its stdout. A failure is EngineRefused(`status`) saying what failed."""
    try:
        result = await spawner.adapter.runner.run(argv, user=spawner.run_as, stdin=stdin,
                                                  timeout=spawner.command_timeout)
    except SchedulerError as err:
        raise EngineRefused(500, f"cannot {what}: {err}") from err
    if result.returncode != 0:
        raise EngineRefused(status, f"cannot {what}: {result.stderr.strip()}")
    return result.stdout


async def _rows(ledger: Ledger, user: str, tag_prefix: str, *, active: bool = False) -> list[JobRecord]:
    """The user's ledger rows whose tag starts with `tag_prefix` (engine jobs contain '-ipp-'), oldest first."""
    def read() -> list[JobRecord]:
        query = select(JobRecord).where(JobRecord.user == user, JobRecord.tag.contains("-ipp-", autoescape=True))
        if tag_prefix:
            query = query.where(JobRecord.tag.startswith(tag_prefix, autoescape=True))
        if active:
            query = query.where(JobRecord.state.not_in(ENDED_STATES))
        with Session(ledger.engine) as session:
            return list(session.scalars(query.order_by(JobRecord.id)))

    return await asyncio.to_thread(read)


def _set_model(set_id: str, records: list[JobRecord]) -> dict:
    engines = [{
        "index": parse_engine_tag(r.tag).index, "tag": r.tag, "job_id": r.job_id, "state": r.state,
        "native_state": r.native_state, "reason": r.reason, "node": r.node, "exit_code": r.exit_code,
        "log_path": r.log_path,
    } for r in records]
    return {"id": set_id, "engines": engines, "active": sum(1 for r in records if r.active)}


def _parsed(field: str, parse: Any, text: str) -> int:
    try:
        return parse(text)
    except ValueError as err:
        raise EngineRefused(400, f"{field}: {err}") from None


# -- the API --------------------------------------------------------------------------------------
class EnginesAPIHandler(APIHandler):
    """`/hub/api/hpchub/engines[/SET]`: a notebook server's engine jobs, asked for with that server's own token.

    POST   /hpchub/engines        {"n", "connection_file", "cores"?, "memory"?, "walltime"?} -> 201, the new set
    GET    /hpchub/engines        -> {"sets": [...]}, every set of this server
    GET    /hpchub/engines/SET    -> the set: {"id", "engines": [...], "active": N}
    DELETE /hpchub/engines/SET    -> 200 once every job ended, 202 while the scheduler has not confirmed yet
    """

    @web.authenticated
    async def post(self, set_id: str | None = None) -> None:
        if set_id is not None:
            raise web.HTTPError(405, "POST to /hub/api/hpchub/engines starts a new set")
        jobs = self._engine_jobs()
        body = self.get_json_body()
        await self._answer(201, lambda: jobs.start(EngineRequest.from_json(body)))

    @web.authenticated
    async def get(self, set_id: str | None = None) -> None:
        jobs = self._engine_jobs()
        if set_id is None:
            await self._answer(200, lambda: _sets(jobs))
        else:
            await self._answer(200, lambda: jobs.get(set_id))

    @web.authenticated
    async def delete(self, set_id: str | None = None) -> None:
        if set_id is None:
            raise web.HTTPError(405, "DELETE names a set: /hub/api/hpchub/engines/SET")
        jobs = self._engine_jobs()
        try:
            confirmed, model = await jobs.stop(set_id)
        except EngineRefused as err:
            raise web.HTTPError(err.status, "%s", str(err)) from None
        self.set_status(200 if confirmed else 202)
        self.finish(json.dumps(model))

    async def _answer(self, status: int, work: Callable[[], Awaitable[dict]]) -> None:
        try:
            model = await work()
        except EngineRefused as err:
            raise web.HTTPError(err.status, "%s", str(err)) from None
        self.set_status(status)
        self.finish(json.dumps(model))

    def _engine_jobs(self) -> EngineJobs:
        from batchspawner import BatchSpawner

        token = self.get_auth_token() or ""
        for spawner in getattr(self.current_user, "spawners", {}).values():
            if (isinstance(spawner, BatchSpawner) and spawner.api_token
                    and hmac.compare_digest(spawner.api_token, token)):
                break
        else:
            raise web.HTTPError(403, "engines are asked for with a notebook server's own token ($JUPYTERHUB_API_TOKEN "
                                "in a server hpchub started)")
        if not spawner.ready or not spawner.job_tag:
            raise web.HTTPError(409, "%s", f"the server {spawner._log_name} is not running")
        settings = self.settings.get("hpchub_engines")
        if settings is None:
            settings = self.settings["hpchub_engines"] = HpcHubEngines(config=self.settings["config"], log=self.log)
        return EngineJobs(spawner, settings)


async def _sets(jobs: EngineJobs) -> dict:
    return {"sets": await jobs.sets()}


# JupyterHub builds its handlers after the spawner class is resolved: importing batchspawner (which imports
# this module) is enough to serve the endpoint, as for /hub/api/batchspawner.
if not any(h[1] is EnginesAPIHandler for h in default_handlers):
    default_handlers.append((rf"/api/hpchub/engines(?:/({_SET_ID}))?", EnginesAPIHandler))
