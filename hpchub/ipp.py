"""The `hpchub` ipyparallel engine launcher: engines as batch jobs that the hub submits for this notebook server.

    import ipyparallel as ipp
    cluster = ipp.Cluster(engines="hpchub", n=8, controller_ip="0.0.0.0")
    rc = cluster.start_and_connect_sync()

It runs in the notebook's kernel, inside the server's batch job, and never calls the scheduler (compute nodes
often have no sbatch): it asks the hub (`POST /hub/api/hpchub/engines`) with the server's own token, and the hub
submits one job per engine with the admin's template and limits (hpchub.engines). The engines read the
controller's engine connection file (`ipengine --file=...`): it stays in the user's profile, readable by the
user only, and the key in it never travels. See docs/ipyparallel.md.
"""
from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import signal as signals
import threading
import time
import urllib.error
import urllib.request
from textwrap import indent
from typing import Any

from ipyparallel.cluster.launcher import EngineLauncher, LauncherError, NotRunning
from traitlets import Float, Integer, List, Unicode, default

#: signals that end an engine; only these can reach engines in batch jobs through the hub
_ENDING = {signals.SIGTERM, signals.SIGKILL, "TERM", "KILL", "SIGTERM", "SIGKILL"}


class HubRefused(LauncherError):
    """The hub answered the request with an error; `status` is the HTTP status, the message the hub's reason."""

    def __init__(self, status: int, message: str):
        super().__init__(f"the hub refused ({status}): {message}")
        self.status = status
        self.message = message


class HpcHubEngineSetLauncher(EngineLauncher):
    """Start a set of ipyparallel engines as batch jobs, submitted by hpchub for the notebook server this runs in.

    Select it with `ipp.Cluster(engines="hpchub")` (or `engine_launcher_class="hpchub"`). The engines connect to
    the controller this notebook started: it must listen on an address their nodes can reach (controller_ip,
    and controller_location where the node's host name does not lead there)."""

    entrypoint_name = "hpchub"

    hub_api_url = Unicode(
        config=True,
        help="The hub's API URL as this server reaches it. Default: $JUPYTERHUB_API_URL.",
    )

    @default("hub_api_url")
    def _default_hub_api_url(self) -> str:
        return os.environ.get("JUPYTERHUB_API_URL", "")

    api_token = Unicode(
        config=True,
        help="This server's own API token, which the hub accepts for engine requests. Default: "
        "$JUPYTERHUB_API_TOKEN. Never written to the cluster file.",
    )

    @default("api_token")
    def _default_api_token(self) -> str:
        return os.environ.get("JUPYTERHUB_API_TOKEN", "")

    cores = Integer(
        None,
        allow_none=True,
        min=1,
        config=True,
        help="Cores of each engine job, at most the server's own; None: the hub's default "
        "(HpcHubEngines.default_cores).",
    )
    memory = Unicode(
        "",
        config=True,
        help="Memory of each engine job, e.g. '2G', at most the server's own; empty: the hub's default.",
    )
    walltime = Unicode(
        "",
        config=True,
        help="Walltime of each engine job (HH:MM:SS, D-HH:MM:SS, minutes), at most the server's own; empty: the "
        "hub's default (the server's walltime).",
    )
    poll_interval = Float(
        10.0,
        min=0.5,
        config=True,
        help="Seconds between questions to the hub about the engine jobs; when all have ended (walltime, "
        "failure, the server stopped) the cluster is told, with their output.",
    )
    request_timeout = Float(
        120.0,
        min=1.0,
        config=True,
        help="Seconds a request to the hub may take (it submits every engine's job before answering).",
    )
    connection_file_timeout = Float(
        60.0,
        min=0.0,
        config=True,
        help="Seconds to wait for the controller's engine connection file to appear.",
    )

    #: the hub's id of this engine set, and its jobs as the hub reported them ({"index", "job_id", "log_path"})
    hub_set_id = Unicode("").tag(to_dict=True)
    jobs = List().tag(to_dict=True)

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self._watching = threading.Event()

    def find_args(self) -> list[str]:
        return ["ipengine", f"--file={self.connection_files['engine']}"]

    # -- the launcher API ----------------------------------------------------------------------
    async def start(self, n: int = 1) -> list[str]:
        """Ask the hub for `n` engine jobs; returns their job ids once submitted (they may still be queued)."""
        if not self.hub_api_url or not self.api_token:
            raise LauncherError("the hpchub engine launcher runs in a notebook server started by hpchub: "
                                "$JUPYTERHUB_API_URL and $JUPYTERHUB_API_TOKEN are not set")
        self.n = n
        connection_file = self.connection_files["engine"]
        await self._wait_for(connection_file)
        self._warn_if_unreachable(connection_file)
        body: dict[str, Any] = {"n": n, "connection_file": connection_file}
        if self.cores is not None:
            body["cores"] = self.cores
        if self.memory:
            body["memory"] = self.memory
        if self.walltime:
            body["walltime"] = self.walltime
        _, reply = await self._call("POST", "", body)
        self.hub_set_id = reply["id"]
        self.jobs = [{key: engine[key] for key in ("index", "job_id", "log_path")} for engine in reply["engines"]]
        job_ids = [job["job_id"] for job in self.jobs]
        self.log.info("hpchub submitted %d engine jobs (set %s): %s", n, self.hub_set_id, ", ".join(job_ids))
        self.notify_start({"hub_set_id": self.hub_set_id, "job_ids": job_ids})
        self._watch()
        return job_ids

    async def stop(self) -> dict:
        """Cancel the engine jobs through the hub; returns once the hub confirmed they ended or took the cancel."""
        self._watching.clear()
        if self.state == "after" or not self.hub_set_id:
            return self.stop_data or {}
        try:
            status, reply = await self._call("DELETE", f"/{self.hub_set_id}")
        except HubRefused as err:
            if err.status not in (403, 404, 409):
                raise
            # the server's token no longer works, or the hub forgot the set: the hub ended the jobs with the server
            data = {"hub_set_id": self.hub_set_id, "exit_code": None, "reason": err.message}
        else:
            data = self._stop_data(reply, requested=True)
            if status == 202:
                self.log.warning("The scheduler has not yet confirmed that engine jobs %s ended; the hub keeps "
                                 "cancelling them", ", ".join(job["job_id"] for job in self.jobs))
        return self.notify_stop(data)

    async def signal(self, sig: Any) -> None:
        """SIGTERM and SIGKILL end the engine jobs (as `stop`). Other signals cannot travel through the hub:
        `Client.send_signal(sig, targets)` delivers them to engines anywhere through each engine's nanny."""
        if sig in _ENDING:
            await self.stop()
            return
        raise LauncherError(f"signal {sig!r} cannot reach engines in batch jobs through hpchub; use "
                            "Client.send_signal(sig, targets), which each engine's nanny delivers")

    def get_output(self, remove: bool = False) -> str:
        """The engine jobs' output files (in the user's home, which the notebook's node sees)."""
        parts = []
        for job in self.jobs:
            path = job.get("log_path") or ""
            try:
                with open(path, errors="replace") as file:
                    text = file.read()
            except OSError:
                continue
            if remove:
                try:
                    os.remove(path)
                except OSError:
                    pass
            if self.output_limit:
                text = "".join(text.splitlines(True)[-self.output_limit:])
            if text:
                parts.append(f"Output of engine {job['index']} (job {job['job_id']}):\n" + indent(text, "  "))
        return "\n".join(parts)

    @classmethod
    def from_dict(cls, d: dict, **kwargs: Any) -> HpcHubEngineSetLauncher:
        """A launcher for a set started earlier (a cluster file); NotRunning when none of its jobs is active."""
        self = super().from_dict(d, **kwargs)
        if not self.hub_set_id:
            raise NotRunning("no engine set was started")
        try:
            _, reply = self._request("GET", f"/{self.hub_set_id}")
        except HubRefused as err:
            raise NotRunning(f"engine set {self.hub_set_id}: {err.message}") from None
        if not reply["active"]:
            raise NotRunning(f"every job of engine set {self.hub_set_id} has ended")
        self._watch()
        return self

    # -- the hub ---------------------------------------------------------------------------------
    async def _call(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
        try:
            return await asyncio.to_thread(self._request, method, path, body)
        except RuntimeError as err:
            if "shutdown" not in str(err):
                raise
            # the interpreter is exiting (ipyparallel stops its clusters then) and takes no new threads: nothing
            # was sent yet, so ask from this one
            return self._request(method, path, body)

    def _request(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
        request = urllib.request.Request(
            f"{self.hub_api_url.rstrip('/')}/hpchub/engines{path}",
            data=json.dumps(body).encode() if body is not None else None,
            headers={"Authorization": f"token {self.api_token}", "Content-Type": "application/json",
                     "Accept": "application/json"},
            method=method,
        )
        # the hub's internal URL, as the server itself reaches it: never through the user's HTTP proxy
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(request, timeout=self.request_timeout) as response:
                return response.status, json.load(response)
        except urllib.error.HTTPError as err:
            raise HubRefused(err.code, _hub_message(err)) from None
        except OSError as err:
            raise LauncherError(f"cannot reach the hub at {self.hub_api_url}: {err}") from None

    # -- watching the jobs ----------------------------------------------------------------------
    def _watch(self) -> None:
        """In a thread: a cluster started from a script runs its coroutines in loops that end with each call."""
        self._watching.set()
        threading.Thread(target=self._watch_loop, name=f"hpchub-engines-{self.hub_set_id}", daemon=True).start()

    def _watch_loop(self) -> None:
        while self._watching.is_set():
            time.sleep(self.poll_interval)
            if not self._watching.is_set():
                return
            try:
                _, reply = self._request("GET", f"/{self.hub_set_id}")
            except HubRefused as err:
                if err.status in (403, 404, 409):
                    self._deliver_stop({"hub_set_id": self.hub_set_id, "exit_code": None, "reason": err.message})
                    return
                self.log.warning("Asking the hub about engine set %s: %s", self.hub_set_id, err)
                continue
            except LauncherError as err:
                self.log.debug("%s", err)   # a hub restart: ask again later
                continue
            if not reply["active"]:
                self._deliver_stop(self._stop_data(reply, requested=False))
                return

    def _deliver_stop(self, data: dict) -> None:
        self._watching.clear()
        loop = getattr(self.loop, "asyncio_loop", None)
        if loop is not None and loop.is_running():
            self.loop.add_callback(self.notify_stop, data)
        else:
            self.notify_stop(data)

    def _stop_data(self, reply: dict, *, requested: bool) -> dict:
        engines = {str(e["index"]): {"job_id": e["job_id"], "state": e["state"], "exit_code": e["exit_code"]}
                   for e in reply["engines"]}
        exit_code = None
        if not requested:
            failed = [e for e in reply["engines"] if e["state"] not in ("COMPLETED", "CANCELLED")]
            exit_code = next((e["exit_code"] for e in failed if e["exit_code"]), 1 if failed else 0)
        return {"hub_set_id": self.hub_set_id, "engines": engines, "exit_code": exit_code}

    # -- the controller -----------------------------------------------------------------------
    async def _wait_for(self, path: str) -> None:
        deadline = time.monotonic() + self.connection_file_timeout
        while not os.path.exists(path):
            if time.monotonic() > deadline:
                raise LauncherError(f"the controller's engine connection file {path} did not appear within "
                                    f"{self.connection_file_timeout} s; start the controller first")
            await asyncio.sleep(0.1)

    def _warn_if_unreachable(self, path: str) -> None:
        """Engines run on other nodes: a controller on the loopback interface is out of their reach unless the
        nodes share this node's network."""
        try:
            with open(path) as file:
                interface = json.load(file).get("interface", "")
        except (OSError, ValueError):
            return
        host = interface.partition("://")[2]
        try:
            loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
        except ValueError:
            return
        if loopback:
            self.log.warning(
                "The controller listens on %s only: engine jobs on other nodes cannot connect to it. Start the "
                "cluster with controller_ip='0.0.0.0' or this node's cluster-network address "
                "(hpchub's docs/ipyparallel.md).", host)


def _hub_message(err: urllib.error.HTTPError) -> str:
    try:
        return json.load(err).get("message") or err.reason
    except (ValueError, AttributeError, OSError):
        return str(err.reason)
