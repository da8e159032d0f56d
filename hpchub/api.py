"""The hub API behind `hpchub-status`: each server's batch job as the hub, the ledger, the scheduler, the tunnel
gateway and the proxy see it, in one answer.

Routes, under the hub's API prefix (/hub/api/):

    GET hpchub/users                               every server the caller may read (`hpchub-status --all`)
    GET hpchub/users/NAME[?history=N]              NAME's servers, with N past jobs from the ledger
    GET hpchub/users/NAME/server                   the default server; named ones: .../servers/SERVER
    GET .../server[s/SERVER]/log?lines=N[&tag=T]   the last N lines of the job's output, read as the user
    GET .../server[s/SERVER]/script[?tag=T]        the job script, rendered again from the ledger's request
    GET .../server[s/SERVER]/probe                 each hop from the scheduler to the proxy, the first broken one
                                                   named with a fix

Access is JupyterHub's `read:servers` scope on the server: users hold it on their own servers (their browser
session or a token of theirs), admins (`admin:servers`) on everyone's. Anyone else gets 403, whether or not the
user exists. Scheduler state comes from the hub's shared poller, refreshed only when older than `max_age`.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import re
import time
from datetime import datetime, timezone
from typing import Any, Iterable
from urllib.parse import urlsplit, urlunsplit

from jupyterhub.apihandlers import APIHandler, default_handlers
from jupyterhub.utils import url_escape_path, url_path_join
from tornado import web
from tornado.httpclient import AsyncHTTPClient, HTTPClientError

from batchspawner.spawner import BatchSpawner
from hpchub.ledger import JobRecord, script_hash
from schedulers import JobRequest, JobState, JobStatus, SchedulerError

#: a status view accepts scheduler state this old (seconds) before asking the poller for a fresh one
LIVE_MAX_AGE = 10.0
#: a probe wants the scheduler's answer of now (requests arriving together still share one query)
PROBE_MAX_AGE = 0.0
#: the freshest a status view may ask for
MIN_MAX_AGE = 1.0
MAX_LOG_LINES = 5000
#: bytes of the end of a job log read for `log` (whatever the line count): a log of long lines stays bounded
MAX_LOG_BYTES = 2 * 1024 * 1024
MAX_HISTORY = 500
#: the scheduler's partition and times change rarely: asked again after this long, or when the state moves on
DETAILS_MAX_AGE = 300.0
#: queue position and start estimate of a pending job, asked on demand: reused this long
QUEUE_MAX_AGE = 30.0
HTTP_TIMEOUT = 5.0
REDACTED = "[redacted]"
#: a job across the hub: (its scheduler's poller, job id)
JobKey = tuple[Any, str]

# NAME=value where NAME says it holds a secret; values up to the end of the shell word
_SECRET_ASSIGNMENT = re.compile(
    r"""(?P<name>\b(?=[A-Za-z_])[A-Za-z0-9_]*(?:TOKEN|SECRET|PASSWORD|PASSWD|PASSPHRASE|API_KEY|ACCESS_KEY|PRIVATE_KEY"""
    r"""|CREDENTIALS?)[A-Za-z0-9_]*=)(?P<value>'[^']*'|"[^"]*"|[^\s;&|]+)""", re.IGNORECASE)
_SECRET_OPTION = re.compile(r"(?P<name>--?(?:password|passwd|token|secret|api-key)[= ])(?P<value>'[^']*'|\"[^\"]*\"|\S+)",
                            re.IGNORECASE)
_PEM_BLOCK = re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?-----END [A-Z ]*PRIVATE KEY-----", re.DOTALL)


# --- pure pieces ------------------------------------------------------------------------------------------------

def redact(text: str, secrets: Iterable[str] = ()) -> tuple[str, int]:
    """`text` with secrets replaced by [redacted]: the given values wherever they appear, private key blocks,
    values of variables and options whose names say they are secret (API_TOKEN=..., --password ...). Returns the
    text and how many were replaced. Job scripts carry no secret by design (the environment file does): this
    catches what an admin's set-up lines or a site template put there."""
    count = 0
    for secret in sorted({s for s in secrets if s and len(s) >= 8}, key=len, reverse=True):
        count += text.count(secret)
        text = text.replace(secret, REDACTED)
    text, found = _PEM_BLOCK.subn(REDACTED, text)
    count += found
    replaced = 0

    def hide(match: re.Match) -> str:
        nonlocal replaced
        if match.group("value") == REDACTED:
            return match.group(0)
        replaced += 1
        return match.group("name") + REDACTED

    for pattern in (_SECRET_ASSIGNMENT, _SECRET_OPTION):
        text = pattern.sub(hide, text)
    return text, count + replaced


def iso(when: datetime | None) -> str | None:
    return when.astimezone(timezone.utc).isoformat(timespec="seconds") if when else None


def record_model(record: JobRecord) -> dict[str, Any]:
    """A ledger row as JSON (the request as submitted, the script by its hash only)."""
    model = {}
    for column in JobRecord.__table__.columns:
        value = getattr(record, column.key)
        model[column.key] = iso(value) if isinstance(value, datetime) else value
    model.pop("id", None)
    return model


def walltime_left(time_limit_s: int | None, started: datetime | None, now: datetime | None = None) -> int | None:
    """Seconds until the job's time limit, from its start; None without a limit or a start."""
    if time_limit_s is None or started is None:
        return None
    now = now or datetime.now(timezone.utc)
    return max(0, int(time_limit_s - (now - started).total_seconds()))


def request_from_record(record: JobRecord) -> JobRequest:
    """The JobRequest a ledger row was submitted with (JSON keeps tuples as lists)."""
    known = {f.name for f in dataclasses.fields(JobRequest)}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in (record.request or {}).items() if k in known}
    return JobRequest(**values)


# --- what the scheduler says, cached where it is dear ---------------------------------------------------------------

@dataclasses.dataclass
class _Cached:
    value: Any
    at: float
    key: Any = None


class SchedulerView:
    """Partition, times and queue position of jobs, asked of each adapter in one call per view and reused: a view
    repeated every few seconds (`hpchub-status --watch`) does not become a stream of scheduler queries."""

    def __init__(self) -> None:
        self._details: dict[JobKey, _Cached] = {}
        self._queue: dict[JobKey, _Cached] = {}

    async def details(self, spawners: list[BatchSpawner], live: dict[JobKey, JobStatus]) -> dict[JobKey, JobStatus]:
        """Details of each spawner's job, one `adapter.details` call per scheduler for the jobs not cached (or whose
        state moved on since)."""
        now = time.monotonic()
        wanted: dict[Any, tuple[Any, list[str]]] = {}
        for spawner in spawners:
            key = job_key(spawner)
            cached = self._details.get(key)
            state = live[key].state if key in live else None
            if cached is None or cached.key != state or now - cached.at > DETAILS_MAX_AGE:
                wanted.setdefault(spawner.poller, (spawner.adapter, []))[1].append(spawner.job_id)
        for poller, (adapter, ids) in wanted.items():
            try:
                found = await adapter.details(ids)
            except SchedulerError:
                continue    # the poller's status stands; the details come with a later view
            for job_id, status in found.items():
                if status.state is not JobState.UNKNOWN:
                    key = (poller, job_id)
                    self._details[key] = _Cached(status, now, live[key].state if key in live else None)
        self._forget_old(self._details, DETAILS_MAX_AGE * 2)
        return {key: c.value for key, c in self._details.items()}

    async def queue(self, spawner: BatchSpawner) -> dict[str, Any]:
        """A pending job's position in its partition and the scheduler's start estimate, each None where unknown."""
        key = job_key(spawner)
        now = time.monotonic()
        cached = self._queue.get(key)
        if cached is None or now - cached.at > QUEUE_MAX_AGE:
            try:
                position = await spawner.adapter.queue_position(spawner.job_id)
                estimate = (await spawner.adapter.estimate_start([spawner.job_id])).get(spawner.job_id)
            except SchedulerError as err:
                return {"position": None, "pending": None, "estimated_start": None, "error": str(err)}
            cached = self._queue[key] = _Cached({
                "position": position.position if position else None,
                "pending": position.pending if position else None,
                "estimated_start": iso(estimate)}, now)
        self._forget_old(self._queue, QUEUE_MAX_AGE * 4)
        return cached.value

    @staticmethod
    def _forget_old(cache: dict, age: float) -> None:
        now = time.monotonic()
        for key in [k for k, c in cache.items() if now - c.at > age]:
            del cache[key]


_view = SchedulerView()


def job_key(spawner: BatchSpawner) -> JobKey:
    """A job across the hub: its id with the poller of its scheduler (a hub may have several clusters of one kind,
    whose ids overlap; each has its own poller)."""
    return spawner.poller, spawner.job_id


async def live_status(spawner: BatchSpawner, max_age: float) -> JobStatus:
    """The job's status from the hub's shared poller, no older than `max_age`. A job the poller did not follow
    (its server is gone) is not left tracked."""
    poller = spawner.poller
    tracked = spawner.job_id in poller.tracked
    try:
        return await poller.refresh(spawner.job_id, max_age=max_age)
    finally:
        if not tracked:
            poller.untrack(spawner.job_id)


def job_model(spawner: BatchSpawner | None, record: JobRecord | None, status: JobStatus | None,
              details: JobStatus | None, queue: dict | None = None) -> dict[str, Any]:
    """One job: the scheduler's live word where there is one, the ledger's otherwise."""
    request = (record.request or {}) if record else {}
    state = status.state.value if status else (record.state if record else None)
    started = (details.started if details else None) or (record.started if record else None)
    time_limit = (details.time_limit_s if details else None) or request.get("walltime_s")
    running = state == JobState.RUNNING.value
    nodes = list(status.nodes) if status and status.nodes else (record.node.split(",") if record and record.node else [])
    return {
        "id": (spawner.job_id if spawner and spawner.job_id else None) or (record.job_id if record else None),
        "tag": record.tag if record else (spawner.job_tag if spawner else None),
        "cluster": record.cluster if record else (spawner.cluster_name if spawner else None),
        "state": state,
        "native_state": status.native_state if status else (record.native_state if record else ""),
        "reason": status.reason if status else (record.reason if record else ""),
        "exit_code": status.exit_code if status and status.exit_code is not None else (
            record.exit_code if record else None),
        "partition": (details.partition if details and details.partition else None) or request.get("partition"),
        "nodes": nodes,
        "submitted": iso((details.submitted if details else None) or (record.submitted if record else None)),
        "started": iso(started) if state != JobState.PENDING.value else None,
        "ended": iso(record.ended) if record else None,
        "time_limit_s": time_limit,
        "walltime_left_s": walltime_left(time_limit, started) if running else None,
        "queue": queue,
        "log_path": record.log_path if record else "",
        "note": record.note if record else "",
        "live": status is not None,
    }


# --- probing each hop ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Hop:
    name: str
    ok: bool
    detail: str
    fix: str = ""

    def model(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


async def http_get(url: str, timeout: float = HTTP_TIMEOUT) -> tuple[int | None, str]:
    """(HTTP status, "") or (None, why no answer came)."""
    try:
        response = await AsyncHTTPClient().fetch(url, request_timeout=timeout, connect_timeout=timeout,
                                                 follow_redirects=False, raise_error=False, validate_cert=True)
    except (OSError, HTTPClientError, asyncio.TimeoutError) as err:
        return None, f"{type(err).__name__}: {err}"
    if response.code == 599:    # tornado's "no HTTP answer"
        return None, str(response.error)
    return response.code, ""


async def tcp_connects(host: str, port: int, timeout: float = HTTP_TIMEOUT) -> str:
    """"" when something accepts a connection at host:port, else why not."""
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except (OSError, asyncio.TimeoutError) as err:
        return f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
    writer.close()
    return ""


def _public_base(proxy: Any) -> str:
    """Where the hub's proxy listens for browsers, as seen from the hub's host."""
    parts = urlsplit(proxy.public_url)
    host = parts.hostname or "127.0.0.1"
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    netloc = f"[{host}]" if ":" in host else host
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


async def probe(spawner: BatchSpawner, proxy: Any, log_hint: str) -> list[Hop]:
    """Each hop between the user and their server, in the order a request depends on them: the scheduler runs the
    job; the job's tunnel is up (reverse mode: the server is reached through it, so before the server); the server
    answers; the proxy routes to it; the proxy's answer is 200. Every hop is checked (all are informative); the
    first that fails is the one to fix."""
    hops: list[Hop] = []
    if not spawner.job_id:
        return [Hop("scheduler", False, "this server has no batch job",
                    "start the server (the hub's home page, or POST /hub/api/users/NAME/server)")]
    status = await live_status(spawner, PROBE_MAX_AGE)
    hops.append(_scheduler_hop(spawner, status, log_hint))
    tunnel = spawner.tunnel_status()
    server = spawner.server
    if tunnel["mode"] == "reverse":
        hops.append(_tunnel_hop(spawner, tunnel))
    if server is None or not server.port:
        hops.append(Hop("server", False, "the hub has no address for the server (its spawn is "
                        f"{spawner.pending or 'not finished'})",
                        "wait for the spawn to finish; if it does not, stop and start the server"))
    else:
        hops.append(await _server_hop(spawner, server, tunnel, log_hint))
    hops.append(await _route_hop(spawner, proxy))
    url = url_path_join(_public_base(proxy), spawner.user.url, url_escape_path(spawner.name), "api") \
        if spawner.name else url_path_join(_public_base(proxy), spawner.user.url, "api")
    code, why = await http_get(url)
    if code == 200:
        hops.append(Hop("http", True, f"GET {url} through the proxy: 200"))
    else:
        hops.append(Hop("http", False, f"GET {url} through the proxy: {code or why}",
                        "the hops above say why; if they all pass, the proxy itself is at fault: check that "
                        f"configurable-http-proxy runs and listens at {_public_base(proxy)}"))
    return hops


def _scheduler_hop(spawner: BatchSpawner, status: JobStatus, log_hint: str) -> Hop:
    job = f"job {spawner.job_id}"
    where = f" on {','.join(status.nodes)}" if status.nodes else ""
    if status.state is JobState.RUNNING:
        native = f" ({status.native_state})" if status.native_state not in ("", "RUNNING") else ""
        return Hop("scheduler", True, f"{job} is RUNNING{native}{where}")
    reason = f" ({status.reason})" if status.reason else ""
    if status.state is JobState.PENDING:
        return Hop("scheduler", False, f"{job} is still queued{reason}",
                   "the server starts when the job runs: wait, or ask for less (cores, memory, walltime) or another "
                   "partition; the reason is the scheduler's")
    if status.state is JobState.UNKNOWN:
        return Hop("scheduler", False, f"the scheduler did not say how {job} is{reason}",
                   "the scheduler's controller does not answer or forgot the job: the hub keeps the server meanwhile "
                   "(unknown is not gone); check the controller")
    exit_code = f", exit code {status.exit_code}" if status.exit_code is not None else ""
    killed = ""
    if status.exit_code is not None and status.exit_code > 128:
        killed = f" (signal {status.exit_code - 128}: the job's server or script was killed)"
    return Hop("scheduler", False, f"{job} ended: {status.native_state or status.state.value}{reason}{exit_code}{killed}",
               "the job ended behind the hub's back (cancelled, killed, out of walltime or memory); the hub stops "
               "the server at its next poll. Start a new server (stop the old one first if the hub still shows it: "
               f"DELETE /hub/api/users/{spawner.user.name}/server{'s/' + spawner.name if spawner.name else ''}); "
               f"{log_hint}")


def _tunnel_hop(spawner: BatchSpawner, tunnel: dict) -> Hop:
    if tunnel.get("up"):
        return Hop("tunnel", True, f"the job's tunnel is up; hub side {tunnel.get('endpoint')}")
    since = f" since {tunnel['last_change']}" if tunnel.get("last_change") else ""
    reason = f" ({tunnel['reason']})" if tunnel.get("reason") else ""
    return Hop("tunnel", False, f"the job's SSH tunnel to the hub's gateway is down{since}{reason}",
               f"the job's tunnel client reconnects by itself (the job ends if the tunnel stays down for "
               f"{spawner.tunnel_reconnect_timeout:g} s); if it stays down, check that the node reaches the gateway at "
               f"{spawner.gateway_address()}:{spawner.gateway_settings().port} and read the job log")


async def _server_hop(spawner: BatchSpawner, server: Any, tunnel: dict, log_hint: str) -> Hop:
    url = url_path_join(server.url, "api")
    if tunnel["mode"] == "direct":
        refused = await tcp_connects(server.ip or spawner.job_host, server.port)
        if refused:
            return Hop("server", False, f"nothing accepts connections at {server.ip}:{server.port} ({refused})",
                       "the server process in the job is gone although the job runs (killed, crashed, out of "
                       f"memory): {log_hint}; then stop and start the server")
    elif not tunnel.get("up"):
        return Hop("server", False, "not checked: the server is reached through its tunnel, which is down",
                   "bring the tunnel back (above)")
    code, why = await http_get(url)
    if code == 200:
        return Hop("server", True, f"GET {url}: 200" + (" (through the tunnel)" if tunnel["mode"] == "reverse" else ""))
    return Hop("server", False, f"GET {url}: {code or why}",
               f"the server does not answer as a Jupyter server should (starting, hung or gone): {log_hint}")


async def _route_hop(spawner: BatchSpawner, proxy: Any) -> Hop:
    try:
        route = await proxy.get_route(spawner.proxy_spec)
    except Exception as err:  # noqa: BLE001 - any failure to ask the proxy is this hop's failure
        return Hop("route", False, f"cannot ask the proxy for its routes: {err}",
                   "check that configurable-http-proxy runs and that the hub can reach its API")
    expected = spawner.server.host if spawner.server is not None else None
    if route is None:
        return Hop("route", False, f"the proxy has no route for {spawner.proxy_spec}",
                   "the hub adds it when the server is ready (and again when a job's tunnel comes back); a proxy that "
                   "restarted alone gets its routes back at the hub's next route check. Restarting the hub restores "
                   "them now (batch jobs keep running)")
    if expected is not None and route.get("target") != expected:
        return Hop("route", False, f"the route {spawner.proxy_spec} leads to {route.get('target')}, but the server is "
                   f"at {expected}", "a stale route: the hub corrects it at its next route check; restarting the hub "
                   "does it now (batch jobs keep running)")
    return Hop("route", True, f"{spawner.proxy_spec} -> {route.get('target')}")


# --- the handlers ---------------------------------------------------------------------------------------------------

class HpcHubAPIHandler(APIHandler):
    """Common ground: access checks, spawner lookups, JSON out."""

    def check_read(self, user_name: str, server_name: str | None = None) -> None:
        """403 unless the caller holds read:servers on the server (or on every server of the user)."""
        target = f"server={user_name}/{server_name}" if server_name is not None else f"user={user_name}"
        if not self.has_scope(f"read:servers!{target}"):
            raise web.HTTPError(403, f"you may not read the servers of {user_name}: that takes the read:servers scope "
                                     "on them (users have it on their own servers, admins on everyone's)")

    def find_spawner(self, user_name: str, server_name: str) -> Any:
        user = self.find_user(user_name)
        if user is None:
            raise web.HTTPError(404, f"no user {user_name}")
        if server_name not in user.orm_spawners and server_name not in user.spawners:
            raise web.HTTPError(404, f"{user_name} has no server {server_name!r}" if server_name else
                                f"{user_name} has no default server")
        return user.spawners[server_name]

    def batch_spawner(self, user_name: str, server_name: str) -> BatchSpawner:
        spawner = self.find_spawner(user_name, server_name)
        if not isinstance(spawner, BatchSpawner):
            raise web.HTTPError(404, f"{user_name}'s server {server_name!r} is not a batch job server")
        return spawner

    def max_age(self) -> float:
        try:
            age = float(self.get_argument("max_age", str(LIVE_MAX_AGE)))
        except ValueError:
            raise web.HTTPError(400, "max_age: a number of seconds") from None
        return min(max(age, MIN_MAX_AGE), 3600.0)

    async def record_for(self, spawner: BatchSpawner) -> JobRecord | None:
        """The ledger row of the server's current job, else of its latest."""
        if spawner.job_tag:
            record = await spawner.ledger.get(spawner.job_tag)
            if record is not None:
                return record
        latest = await spawner.ledger.history(spawner.user.name, spawner.name or "", limit=1)
        return latest[0] if latest else None

    async def chosen_record(self, spawner: BatchSpawner) -> JobRecord:
        """?tag=T: that job of this server; else the current or latest one. 404 when there is none."""
        tag = self.get_argument("tag", "")
        record = await spawner.ledger.get(tag) if tag else await self.record_for(spawner)
        if record is None or record.user != spawner.user.name or (record.server_name or "") != (spawner.name or ""):
            raise web.HTTPError(404, f"no job {tag!r} of this server" if tag else "this server has had no job")
        return record

    async def server_models(self, spawners: list[Any], *, history: int = 0) -> list[dict[str, Any]]:
        batch = [s for s in spawners if isinstance(s, BatchSpawner) and s.job_id]
        max_age = self.max_age()
        statuses = await asyncio.gather(*(live_status(s, max_age) for s in batch), return_exceptions=True)
        live = {job_key(s): st for s, st in zip(batch, statuses) if isinstance(st, JobStatus)}
        details = await _view.details(batch, live) if batch else {}
        routes = await self._routes()
        return list(await asyncio.gather(*(self.server_model_for(s, live, details, routes, history) for s in spawners)))

    async def _routes(self) -> dict[str, dict] | None:
        try:
            return await self.proxy.get_all_routes()
        except Exception as err:  # noqa: BLE001 - a report without routes beats no report
            self.log.warning("hpchub status: cannot read the proxy's routes: %s", err)
            return None

    async def server_model_for(self, spawner: Any, live: dict, details: dict, routes: dict | None,
                               history: int) -> dict[str, Any]:
        model = {k: v for k, v in self.server_model(spawner).items() if k != "state"}
        model["user"] = spawner.user.name
        server = spawner.server if spawner.active else None
        model["server_url"] = server.url if server is not None else None
        route = (routes or {}).get(spawner.proxy_spec)
        model["route"] = None if routes is None else {
            "path": spawner.proxy_spec, "present": route is not None,
            "target": route.get("target") if route else None,
            "matches": bool(route and server is not None and route.get("target") == server.host)}
        if not isinstance(spawner, BatchSpawner):
            model["job"] = None
            return model
        record = await self.record_for(spawner)
        key = job_key(spawner) if spawner.job_id else None
        status = live.get(key) if key else None
        queue = await _view.queue(spawner) if status is not None and status.state is JobState.PENDING else None
        model["cluster"] = spawner.cluster_name
        model["job"] = job_model(spawner if spawner.job_id else None, record, status,
                                 details.get(key) if key else None, queue)
        model["tunnel"] = spawner.tunnel_status() if spawner.job_id else {"mode": spawner.tunnel_mode}
        if history:
            rows = await spawner.ledger.history(spawner.user.name, spawner.name or "", limit=history)
            model["history"] = [record_model(r) for r in rows]
        return model

    def write_json(self, model: Any) -> None:
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(model))


def _shown(spawner: Any) -> bool:
    """A server worth showing: running, starting or stopping, or holding a job."""
    return bool(spawner.active or spawner.pending or getattr(spawner, "job_id", ""))


def _history_argument(handler: APIHandler) -> int:
    try:
        return min(max(int(handler.get_argument("history", "0")), 0), MAX_HISTORY)
    except ValueError:
        raise web.HTTPError(400, "history: a number of jobs") from None


class AllServersHandler(HpcHubAPIHandler):
    @web.authenticated
    async def get(self) -> None:
        readable = self.get_scope_filter("read:servers")
        spawners = [s for user in list(self.users.values()) for s in list(user.spawners.values())
                    if _shown(s) and s.orm_spawner is not None and readable(s.orm_spawner, kind="server")]
        self.write_json({"servers": await self.server_models(spawners, history=_history_argument(self))})


class UserServersHandler(HpcHubAPIHandler):
    @web.authenticated
    async def get(self, user_name: str) -> None:
        self.check_read(user_name)
        user = self.find_user(user_name)
        if user is None:
            raise web.HTTPError(404, f"no user {user_name}")
        history = _history_argument(self)
        # loaded spawners, and stopped ones whose saved state still names a job
        names = set(user.spawners) | {name for name, orm_spawner in user.orm_spawners.items()
                                      if orm_spawner.server is not None or (orm_spawner.state or {}).get("job_id")}
        shown = [s for s in (user.spawners[name] for name in sorted(names)) if _shown(s)]
        model: dict[str, Any] = {"user": user_name, "admin": user.admin,
                                 "servers": await self.server_models(shown)}
        if history:
            spawner = next((s for s in shown if isinstance(s, BatchSpawner)), None) or user.spawners[""]
            rows = await spawner.ledger.history(user_name, limit=history) if isinstance(spawner, BatchSpawner) else []
            model["history"] = [record_model(r) for r in rows]
        self.write_json(model)


class ServerHandler(HpcHubAPIHandler):
    @web.authenticated
    async def get(self, user_name: str, server_name: str = "") -> None:
        server_name = server_name or ""
        self.check_read(user_name, server_name)
        spawner = self.find_spawner(user_name, server_name)
        [model] = await self.server_models([spawner], history=_history_argument(self))
        self.write_json(model)


class LogHandler(HpcHubAPIHandler):
    """The end of the job's output file, read as the job's user through the spawner's runner (the hub may not read
    users' files itself, and on a submit host over SSH it could not)."""

    @web.authenticated
    async def get(self, user_name: str, server_name: str = "") -> None:
        server_name = server_name or ""
        self.check_read(user_name, server_name)
        spawner = self.batch_spawner(user_name, server_name)
        try:
            lines = int(self.get_argument("lines", "50"))
        except ValueError:
            raise web.HTTPError(400, "lines: a whole number") from None
        if not 1 <= lines <= MAX_LOG_LINES:
            raise web.HTTPError(400, f"lines: 1 to {MAX_LOG_LINES}")
        record = await self.chosen_record(spawner)
        if not record.log_path or "%" in record.log_path:
            raise web.HTTPError(404, f"job {record.job_id or record.tag} has no log file (it was never submitted)")
        text, error = await read_log_tail(spawner, record.log_path, lines)
        self.write_json({"job_id": record.job_id, "tag": record.tag, "path": record.log_path, "lines": lines,
                         "text": text, "error": error})


async def read_log_tail(spawner: BatchSpawner, path: str, lines: int) -> tuple[str, str]:
    """(the last `lines` lines, "") or ("", why they cannot be read). Reads at most MAX_LOG_BYTES."""
    try:
        result = await spawner.adapter.runner.run(["tail", "-c", str(MAX_LOG_BYTES), "--", path], user=spawner.run_as,
                                                  timeout=spawner.command_timeout)
    except SchedulerError as err:
        return "", f"cannot read {path}: {err}"
    except ValueError as err:     # the runner refuses the account
        return "", f"cannot read {path}: {err}"
    if result.returncode != 0:
        return "", f"cannot read {path}: {result.stderr.strip()}"
    kept = result.stdout.splitlines()[-lines:]
    return "\n".join(kept) + ("\n" if kept else ""), ""


class ScriptHandler(HpcHubAPIHandler):
    """The job script, rendered again from the request the ledger kept, with the spawner's current templates, and
    compared with the hash of the script that was submitted. The ledger keeps no script (schedulers keep theirs
    where others may read them; hpchub keeps the hash and the validated request it came from)."""

    @web.authenticated
    async def get(self, user_name: str, server_name: str = "") -> None:
        server_name = server_name or ""
        self.check_read(user_name, server_name)
        spawner = self.batch_spawner(user_name, server_name)
        record = await self.chosen_record(spawner)
        try:
            script = await render_again(spawner, record)
        except Exception as err:  # noqa: BLE001 - a request or template that no longer renders: say so
            raise web.HTTPError(409, f"the script of job {record.job_id or record.tag} cannot be rendered again: "
                                     f"{err}") from err
        same = script_hash(script) == record.script_sha256
        shown, redactions = redact(script, [spawner.api_token or ""])
        self.write_json({
            "job_id": record.job_id, "tag": record.tag, "script": shown, "redacted": redactions,
            "matches_submitted": same,
            "note": "identical to the submitted script (same SHA-256)" if same else
            "rendered with the hub's current settings and templates, which changed since the job was submitted: "
            "not byte for byte the script the scheduler received",
        })


async def render_again(spawner: BatchSpawner, record: JobRecord) -> str:
    """The script `spawner` renders for the ledger row's request: on that job's cluster, with its submission tag and
    environment file."""
    request = request_from_record(record)
    catalog = spawner.catalog
    cluster = record.cluster if catalog and record.cluster in catalog.clusters else spawner.job_cluster
    if record.tag == spawner.job_tag and spawner.job_env_file:
        env_file = spawner.job_env_file
    else:
        home = await spawner.user_home()
        env_file = os.path.join(spawner._format(spawner.job_run_dir, home), f"{record.tag}.env")
    # the script is rendered from the spawner's own attributes: set for this rendering only, with no await in
    # between, so nothing else sees them (as preview_script does)
    saved = spawner.job_cluster, spawner.job_tag, spawner.job_env_file
    spawner.job_cluster, spawner.job_tag, spawner.job_env_file = cluster, record.tag, env_file
    try:
        return spawner.render_script(request)
    finally:
        spawner.job_cluster, spawner.job_tag, spawner.job_env_file = saved


class ProbeHandler(HpcHubAPIHandler):
    @web.authenticated
    async def get(self, user_name: str, server_name: str = "") -> None:
        server_name = server_name or ""
        self.check_read(user_name, server_name)
        spawner = self.batch_spawner(user_name, server_name)
        target = f"{user_name}/{server_name}" if server_name else user_name
        hops = await probe(spawner, self.proxy, f"read the job's log (hpchub-status --log 50 {target})")
        failed = next((hop for hop in hops if not hop.ok), None)
        self.write_json({"user": user_name, "server": server_name, "job_id": spawner.job_id or None,
                         "ok": failed is None, "failed": failed.name if failed else None,
                         "fix": failed.fix if failed else "", "hops": [hop.model() for hop in hops]})


_USER = r"(?P<user_name>[^/]+)"
_SERVER = r"(?:/server|/servers/(?P<server_name>[^/]+))"
ROUTES: list[tuple[str, type]] = [
    (r"/api/hpchub/users", AllServersHandler),
    (rf"/api/hpchub/users/{_USER}", UserServersHandler),
    (rf"/api/hpchub/users/{_USER}{_SERVER}", ServerHandler),
    (rf"/api/hpchub/users/{_USER}{_SERVER}/log", LogHandler),
    (rf"/api/hpchub/users/{_USER}{_SERVER}/script", ScriptHandler),
    (rf"/api/hpchub/users/{_USER}{_SERVER}/probe", ProbeHandler),
]


def register(handlers: list = default_handlers) -> None:
    """Add the routes to JupyterHub's API handlers (once): importing batchspawner does it, so a plain
    `jupyterhub` with a batch spawner serves them too."""
    for route in ROUTES:
        if not any(existing[1] is route[1] for existing in handlers):
            handlers.append(route)


register()
