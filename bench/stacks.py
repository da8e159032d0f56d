"""The two stacks the benchmarks compare, each a real hub (JupyterHub + configurable-http-proxy) run as root
on the benchmark's private Slurm, and an HTTP client that drives a hub like its users' browsers would.

- hpchub: `hpchub` from /opt/hpchub (the project's code), its SlurmSpawner with the shared poller.
- baseline: `jupyterhub` with upstream batchspawner's SlurmSpawner (PyPI, its own venv).

Both: the same stand-in server (bench/standin.py), the same prologue line, the same poll interval
(hpchub's `BatchSpawner.job_poll_interval` = the baseline's `Spawner.poll_interval`), the same walltime,
JupyterHub's NullAuthenticator (users exist through the admin API; spawns are REST calls with an admin
service's token) and every other setting at each stack's default.
"""
from __future__ import annotations

import asyncio
import os
import re
import secrets
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from hubtools import Hub, free_port  # noqa: E402  (the tests' hub process handling)

PROLOGUE = "export HPCHUB_BENCH_JOB_START=$(date +%s.%N)"
RUNTIME = "04:00:00"
HPCHUB_VENV = Path("/opt/hpchub")
BASELINE_VENV = Path("/opt/hpchub-baseline")

COMMON = """
c = get_config()  # noqa
c.JupyterHub.bind_url = "http://127.0.0.1:{port}"
c.JupyterHub.hub_bind_url = "http://127.0.0.1:{hub_port}"
c.ConfigurableHTTPProxy.api_url = "http://127.0.0.1:{proxy_api_port}"
c.ConfigurableHTTPProxy.auth_token = {proxy_token!r}
# the benchmark asks the proxy for its routes many times a second: no log line for each
c.ConfigurableHTTPProxy.command = ["configurable-http-proxy", "--log-level=warn"]
c.ConfigurableHTTPProxy.pid_file = {workdir!r} + "/proxy.pid"
c.JupyterHub.db_url = "sqlite:///" + {workdir!r} + "/jupyterhub.sqlite"
c.JupyterHub.cookie_secret_file = {workdir!r} + "/cookie_secret"
c.JupyterHub.pid_file = {workdir!r} + "/hub.pid"
c.JupyterHub.authenticator_class = "null"
c.JupyterHub.cleanup_servers = False
c.JupyterHub.services = [{{"name": "bench", "api_token": {token!r}}}]
c.JupyterHub.load_roles = [{{"name": "bench", "services": ["bench"],
    "scopes": ["admin:users", "admin:servers", "list:users", "read:users", "read:metrics"]}}]
c.Spawner.cmd = [{standin!r}]
c.Spawner.default_url = ""
c.Spawner.poll_interval = {poll_interval!r}
"""

HPCHUB = """
import os
from batchspawner import SlurmSpawner
from schedulers import SudoRunner

BENCH_SLURM_CONF = os.environ["SLURM_CONF"]

class SlurmConfSudoRunner(SudoRunner):
    # hpchub's runners hand scheduler commands a fixed environment, so the benchmark's private slurm.conf
    # is given to them explicitly: `sudo -n -H -u USER -- env SLURM_CONF=... argv`
    def environment(self):
        return {{**super().environment(), "SLURM_CONF": BENCH_SLURM_CONF}}

    def command(self, argv, user):
        full = super().command(argv, user)
        if full[:1] == ["sudo"]:
            at = full.index("--") + 1
            full[at:at] = ["env", "SLURM_CONF=" + BENCH_SLURM_CONF]
        return full

class BenchSlurmSpawner(SlurmSpawner):
    def make_runner(self):
        return SlurmConfSudoRunner()

c.JupyterHub.spawner_class = BenchSlurmSpawner
c.HpcHub.data_dir = {workdir!r} + "/data"
c.BatchSpawner.job_poll_interval = {poll_interval!r}
c.BatchSpawner.req_prologue = [{prologue!r}]
c.BatchSpawner.req_runtime = {runtime!r}
c.BatchSpawner.batchspawner_singleuser_cmd = []   # the stand-in reports its port itself
"""

BASELINE = """
c.JupyterHub.spawner_class = "batchspawner.SlurmSpawner"
# upstream runs `sudo -E ... sbatch` with the spawner's environment: SLURM_CONF must be in it (JupyterHub 6
# keeps only JUPYTERHUB_SINGLEUSER_APP by default)
c.Spawner.env_keep = ["JUPYTERHUB_SINGLEUSER_APP", "PATH", "LANG", "SLURM_CONF"]
c.SlurmSpawner.req_prologue = {prologue!r}
# the job's `srun` step gets only the exported variables: the prologue's timestamp must be one of them
c.SlurmSpawner.req_keepvars_extra = "HPCHUB_BENCH_JOB_START"
c.SlurmSpawner.req_runtime = {runtime!r}
c.SlurmSpawner.batchspawner_singleuser_cmd = ""   # the stand-in reports its port itself
"""


@dataclass(frozen=True)
class Stack:
    name: str
    venv: Path
    hub_command: str
    config: str

    def versions(self) -> dict[str, str]:
        import subprocess
        code = ("import importlib.metadata as m\n"
                "for p in ('jupyterhub', 'batchspawner', 'hpchub'):\n"
                "    try: print(p, m.version(p))\n"
                "    except m.PackageNotFoundError: pass\n")
        out = subprocess.run([str(self.venv / "bin" / "python"), "-c", code], capture_output=True, text=True,
                             timeout=60, check=True).stdout
        return dict(line.split(" ", 1) for line in out.splitlines())


HPCHUB_STACK = Stack("hpchub", HPCHUB_VENV, "hpchub", HPCHUB)
BASELINE_STACK = Stack("baseline", BASELINE_VENV, "jupyterhub", BASELINE)
STACKS = (HPCHUB_STACK, BASELINE_STACK)


@dataclass
class RunningHub:
    """A hub of one stack, its HTTP client and the proxy's API."""
    stack: Stack
    hub: Hub
    token: str
    proxy_api: str
    proxy_token: str
    session: aiohttp.ClientSession | None = None
    metrics_path: str = "/hub/metrics"
    spawn_codes: dict[int, int] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return self.hub.url

    async def __aenter__(self) -> "RunningHub":
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=400, force_close=False),
                                             timeout=aiohttp.ClientTimeout(total=120))
        return self

    async def __aexit__(self, *exc) -> None:
        await self.session.close()

    # -- the hub's REST API -----------------------------------------------------------------------
    async def api(self, method: str, path: str, **kwargs) -> tuple[int, dict | list | None, dict]:
        async with self.session.request(method, f"{self.url}/hub/api{path}",
                                        headers={"Authorization": f"token {self.token}"}, **kwargs) as r:
            body = await r.json(content_type=None) if r.status != 204 else None
            return r.status, body, dict(r.headers)

    async def create_users(self, names: list[str]) -> None:
        for i in range(0, len(names), 500):
            status, body, _ = await self.api("POST", "/users", json={"usernames": names[i:i + 500]})
            if status not in (201, 409):
                raise RuntimeError(f"creating users: {status} {body}")

    async def spawn(self, name: str) -> tuple[int, float | None]:
        """POST the user's default server: (HTTP status, the Retry-After seconds of a 429)."""
        status, body, headers = await self.api("POST", f"/users/{name}/server")
        self.spawn_codes[status] = self.spawn_codes.get(status, 0) + 1
        retry = headers.get("Retry-After")
        return status, float(retry) if retry else None

    async def users_without_server(self) -> set[str]:
        """Users with neither a running nor a pending server (a failed spawn leaves its user so)."""
        found: set[str] = set()
        offset = 0
        while True:
            status, body, _ = await self.api("GET", f"/users?state=inactive&offset={offset}&limit=200")
            if status != 200:
                raise RuntimeError(f"listing users: {status} {body}")
            items = body["items"] if isinstance(body, dict) else body
            found.update(u["name"] for u in items)
            if len(items) < 200:
                return found
            offset += 200

    async def scheduler_queries(self) -> float | None:
        """hpchub's own count of batched scheduler queries (its Prometheus metric); None for the baseline."""
        async with self.session.get(f"{self.url}{self.metrics_path}",
                                    headers={"Authorization": f"token {self.token}"}) as r:
            text = await r.text()
        total = [float(m.group(1)) for m in re.finditer(r'^hpchub_scheduler_queries_total\{[^}]*\} (\S+)$', text, re.M)]
        return sum(total) if total else None

    # -- the proxy ----------------------------------------------------------------------------------
    async def routed_users(self) -> set[str]:
        """Users whose server has a route in configurable-http-proxy (empty while the proxy is down)."""
        try:
            async with self.session.get(f"{self.proxy_api}/api/routes",
                                        headers={"Authorization": f"token {self.proxy_token}"},
                                        timeout=aiohttp.ClientTimeout(total=10)) as r:
                routes = await r.json()
        except (aiohttp.ClientError, asyncio.TimeoutError):
            return set()
        return {m.group(1) for path in routes if (m := re.fullmatch(r"/user/([^/]+)/?", path))}

    async def through_proxy(self, name: str) -> dict | None:
        """The stand-in's answer to GET /user/NAME/ through the proxy, or None while it does not answer."""
        try:
            async with self.session.get(f"{self.url}/user/{name}/", allow_redirects=False,
                                        timeout=aiohttp.ClientTimeout(total=30)) as r:
                if r.status != 200:
                    return None
                body = await r.json(content_type=None)
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
            return None
        return body if isinstance(body, dict) and body.get("standin") and body.get("user") == name else None


def start_hub(stack: Stack, workdir: Path, *, slurm_env: dict[str, str], standin: Path, poll_interval: float,
              timeout: float = 120) -> RunningHub:
    """A fresh hub of `stack` in `workdir` (its database, logs and proxy), up and answering."""
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    token, proxy_token = secrets.token_hex(32), secrets.token_hex(32)
    port, proxy_api_port = free_port(), free_port()
    values = dict(port=port, hub_port=free_port(), proxy_api_port=proxy_api_port, proxy_token=proxy_token,
                  workdir=str(workdir), token=token, standin=str(standin), poll_interval=float(poll_interval),
                  prologue=PROLOGUE, runtime=RUNTIME)
    (workdir / "jupyterhub_config.py").write_text(COMMON.format(**values) + stack.config.format(**values))
    env = {"PATH": f"{stack.venv / 'bin'}:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin", "LANG": "C.UTF-8",
           "HOME": "/root", **slurm_env}
    argv = [str(stack.venv / "bin" / stack.hub_command), "-f", str(workdir / "jupyterhub_config.py")]
    hub = Hub(f"http://127.0.0.1:{port}", workdir, argv, env, False, token)
    hub.launch(timeout)
    return RunningHub(stack, hub, token, f"http://127.0.0.1:{proxy_api_port}", proxy_token)


async def wait_routed(hub: RunningHub, names: set[str], *, timeout: float, interval: float = 0.5,
                      retry_failed: bool = True) -> tuple[float, int]:
    """Wait until every user in `names` has a route; a user left without a server (its spawn failed) is
    spawned again when `retry_failed`. Returns (seconds waited, spawns that failed)."""
    started = time.monotonic()
    failed = 0
    last_check = started
    while not names <= (routed := await hub.routed_users()):
        now = time.monotonic()
        if now - started > timeout:
            raise TimeoutError(f"{hub.stack.name}: {len(names - routed)} of {len(names)} servers not routed after "
                               f"{timeout:.0f} s; see {hub.hub.log_path}")
        if retry_failed and now - last_check > 15:
            last_check = now
            lost = (names - routed) & await hub.users_without_server()
            failed += len(lost)
            await spawn_all(hub, sorted(lost))
        await asyncio.sleep(interval)
    return time.monotonic() - started, failed


async def spawn_all(hub: RunningHub, names: list[str], *, concurrency: int = 50) -> dict[str, int]:
    """POST a server for each user, `concurrency` requests at a time, waiting out HTTP 429s as a browser's
    retry would (Retry-After, else 1 s). Returns {"accepted": n, "429": n, "errors": n}."""
    counts = {"accepted": 0, "429": 0, "errors": 0}
    limit = asyncio.Semaphore(concurrency)

    async def one(name: str) -> None:
        while True:
            async with limit:
                status, retry = await hub.spawn(name)
            if status in (201, 202):
                counts["accepted"] += 1
                return
            if status == 429:
                counts["429"] += 1
                await asyncio.sleep(retry or 1.0)
                continue
            counts["errors"] += 1
            return

    await asyncio.gather(*(one(n) for n in names))
    return counts


def kill_hub(hub: RunningHub) -> None:
    """SIGKILL the hub and its proxy, as in a crash of the hub's host: nothing is cleaned up (the jobs go on).
    JupyterHub starts configurable-http-proxy in a session of its own, so the proxy is killed by the pid
    its pid file names."""
    if hub.hub.process is not None and hub.hub.process.poll() is None:
        hub.hub.kill()
    pid_file = hub.hub.workdir / "proxy.pid"
    try:
        pid = int(pid_file.read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return
    if b"configurable-http-proxy" in cmdline:
        os.kill(pid, signal.SIGKILL)
        while Path(f"/proc/{pid}").exists() and not _zombie(pid):
            time.sleep(0.05)
    pid_file.unlink(missing_ok=True)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def hub_log_tail(hub: RunningHub, lines: int = 30) -> str:
    try:
        return "\n".join(hub.hub.log().splitlines()[-lines:])
    except OSError:
        return ""


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and its reaped children (from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = sum(int(f) for f in fields[11:15])
    return ticks / os.sysconf("SC_CLK_TCK")
