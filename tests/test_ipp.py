"""ipyparallel engines as batch jobs launched from a notebook through the hub (hpchub.ipp + hpchub.engines), on the
real Slurm cluster: the notebook's kernel runs `ipp.Cluster(engine_launcher_class="hpchub")` inside its server's
job, the hub submits the engines with the server's settings, the admin's limit holds, and the engine jobs end
with their cluster or with their server."""
from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import sqlite3
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import requests
from tornado.httpclient import HTTPRequest
from tornado.websocket import websocket_connect

from hubtools import Browser, Hub, spawn_until_ready, user_model, wait_for
from test_e2e_hub import (ACTIVE_SLURM_STATES, LOGIN, PASSWORD, hub_factory, local_spool,  # noqa: F401 (fixtures)
                          squeue_state)

ENGINES = LOGIN + """
c.JupyterHub.spawner_class = "slurm"
c.SlurmSpawner.req_partition = "debug"
c.BatchSpawner.req_nprocs = 2
c.BatchSpawner.job_poll_interval = 3
c.HpcHubEngines.max_engines_per_user = 6
"""


class Kernel:
    """A kernel in a user's server, reached through the proxy like JupyterLab does (REST + websocket)."""

    def __init__(self, hub: Hub, user: str):
        self.hub, self.user = hub, user
        self.headers = {"Authorization": f"token {hub.service_token}"}
        self.base = f"{hub.url}/user/{user}/api/kernels"
        response = requests.post(self.base, json={"name": "python3"}, headers=self.headers, timeout=60)
        assert response.status_code == 201, response.text
        self.id = response.json()["id"]
        self.session = uuid.uuid4().hex

    def run(self, code: str, timeout: float = 240) -> str:
        """Execute `code`; its stdout. A Python error in the kernel fails the test with its traceback."""
        return asyncio.run(self._run(code, timeout))

    async def _run(self, code: str, timeout: float) -> str:
        url = self.base.replace("http://", "ws://") + f"/{self.id}/channels?session_id={self.session}"
        socket = await websocket_connect(HTTPRequest(url, headers=self.headers))
        msg_id = uuid.uuid4().hex
        socket.write_message(json.dumps({
            "header": {"msg_id": msg_id, "username": self.user, "session": self.session, "msg_type": "execute_request",
                       "version": "5.3"},
            "parent_header": {}, "metadata": {}, "channel": "shell",
            "content": {"code": code, "silent": False, "store_history": False, "user_expressions": {},
                        "allow_stdin": False, "stop_on_error": True},
        }))
        out, error = [], None
        deadline = time.monotonic() + timeout
        try:
            while True:
                raw = await asyncio.wait_for(socket.read_message(), max(0.1, deadline - time.monotonic()))
                assert raw is not None, "the kernel's websocket closed"
                message = json.loads(raw)
                if message.get("parent_header", {}).get("msg_id") != msg_id:
                    continue
                kind, content = message["header"]["msg_type"], message["content"]
                if kind == "stream":
                    out.append(content["text"])
                elif kind == "error":
                    error = "\n".join(content["traceback"])
                elif kind == "status" and content["execution_state"] == "idle":
                    break
        finally:
            socket.close()
        text = "".join(out)
        assert error is None, f"the kernel raised:\n{_plain(error)}\nstdout:\n{text}"
        return text

    def result(self, code: str, timeout: float = 240) -> dict:
        """Run `code`, which prints one line 'RESULT <json>'; that JSON."""
        out = self.run(code, timeout)
        match = re.search(r"^RESULT (.*)$", out, re.M)
        assert match, f"no RESULT line in:\n{out}"
        return json.loads(match.group(1))

    def close(self) -> None:
        requests.delete(f"{self.base}/{self.id}", headers=self.headers, timeout=30)


def _plain(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


ALICE_IPYTHON = Path("/home/alice/.ipython")


def ledger_engines(hub: Hub, user: str) -> list[dict]:
    with sqlite3.connect(hub.workdir / "data" / "hpchub_ledger.sqlite") as db:
        db.row_factory = sqlite3.Row
        return [dict(row) for row in db.execute("SELECT * FROM hpchub_jobs WHERE user = ? AND tag LIKE '%-ipp-%' "
                                                "ORDER BY id", (user,))]


def slurm_jobs(user: str) -> set[str]:
    out = subprocess.run(["squeue", "-h", "-u", user, "-o", "%i"], capture_output=True, text=True, timeout=10).stdout
    return set(out.split())


def all_ended(job_ids: list[str]) -> bool:
    return all(squeue_state(job_id) not in ACTIVE_SLURM_STATES for job_id in job_ids)


START = """
import json, os, socket, ipyparallel as ipp
cluster = ipp.Cluster(engine_launcher_class="hpchub", n={n}, controller_ip="0.0.0.0",
                      controller_location=socket.gethostname())
print("CLUSTER", cluster.cluster_id)
rc = cluster.start_and_connect_sync()
"""

MAP = """
squares = rc[:].map_sync(lambda x: x * x, range(32))
engine_jobs = rc[:].apply_sync(lambda: __import__("os").environ.get("SLURM_JOB_ID"))
print("RESULT " + json.dumps({"squares": list(squares), "engine_jobs": engine_jobs, "engines": len(rc.ids),
                              "notebook_job": os.environ.get("SLURM_JOB_ID"),
                              "launcher_jobs": [job["job_id"] for job in cluster.engine_set.jobs]}))
"""

TOO_MANY = """
try:
    cluster.start_engines_sync(n=4)
except Exception as err:
    print("RESULT " + json.dumps({"refused": str(err)}))
else:
    print("RESULT " + json.dumps({"refused": None}))
"""

# the launcher on its own, for a controller that never existed (on loopback, and the engine fails at once)
BROKEN = """
import asyncio, io, logging, sys
from hpchub.ipp import HpcHubEngineSetLauncher
profile = os.path.expanduser("~/.ipython/profile_hpchub_test")
os.makedirs(profile + "/security", mode=0o700, exist_ok=True)
path = profile + "/security/ipcontroller-broken-engine.json"
with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as file:
    file.write(json.dumps({"interface": "tcp://127.0.0.1"}))
logged = io.StringIO()
log = logging.getLogger("hpchub-test-launcher")
log.addHandler(logging.StreamHandler(logged))
launcher = HpcHubEngineSetLauncher(profile_dir=profile, cluster_id="broken", poll_interval=1, log=log)
stopped = []
launcher.on_stop(stopped.append)
await launcher.start(1)
for _ in range(120):
    if stopped:
        break
    await asyncio.sleep(0.5)
print("RESULT " + json.dumps({"stop": stopped[0] if stopped else None, "out": logged.getvalue()}))
"""


@pytest.fixture
def leftovers():
    """Slurm job ids the test saw, and the ids of its ipyparallel clusters: at its end, whatever job is still queued
    or running (a failed test) is cancelled, and the files of the clusters whose kernel died are removed."""
    seen: dict[str, list[str]] = {"jobs": [], "clusters": []}
    yield seen
    if seen["jobs"]:
        subprocess.run(["scancel", *seen["jobs"]], capture_output=True, timeout=30)
    profile = ALICE_IPYTHON / "profile_default"
    for cluster_id in seen["clusters"]:
        for pattern in (f"security/cluster-{cluster_id}.json", f"security/ipcontroller-{cluster_id}-*.json",
                        f"log/ipcontroller-{cluster_id}-*.log", f"log/engines{cluster_id}.json"):
            for path in profile.glob(pattern):
                path.unlink(missing_ok=True)
    shutil.rmtree(ALICE_IPYTHON / "profile_hpchub_test", ignore_errors=True)


def test_engines_run_as_batch_jobs_submitted_by_the_hub_and_end_with_their_cluster_or_server(
        hub_factory, slurm_cluster, test_users, leftovers):
    hub = hub_factory(ENGINES)
    browser = Browser(hub.url)
    browser.login("alice", PASSWORD)
    server = spawn_until_ready(hub, browser, "alice")
    notebook_job, notebook_tag = server["state"]["job_id"], server["state"]["job_tag"]
    kernel = Kernel(hub, "alice")

    # 4 engines from the notebook: each in a Slurm job of its own, submitted by the hub
    started = time.monotonic()
    out = kernel.run(START.format(n=4))
    leftovers["clusters"] += re.findall(r"^CLUSTER (\S+)$", out, re.M)
    assert "cannot connect to it" not in out, out
    print(f"4 engines connected {time.monotonic() - started:.1f} s after the cluster was asked for")
    result = kernel.result(MAP)
    assert result["squares"] == [x * x for x in range(32)]
    assert result["notebook_job"] == notebook_job
    engine_jobs = result["launcher_jobs"]
    leftovers["jobs"].extend(engine_jobs)
    assert len(engine_jobs) == 4 and result["engines"] == 4
    assert sorted(result["engine_jobs"]) == sorted(engine_jobs) and notebook_job not in engine_jobs
    assert all(squeue_state(job_id) == "RUNNING" for job_id in engine_jobs)

    rows = ledger_engines(hub, "alice")
    assert sorted(r["job_id"] for r in rows) == sorted(engine_jobs)
    for row in rows:   # each row names its server: the server's name, and the server's job through the tag
        assert row["tag"].startswith(f"{notebook_tag}-ipp-") and row["server_name"] == ""
        assert json.loads(row["request"])["name"] == "ipengine-alice"
        assert json.loads(row["request"])["partition"] == "debug"
    job = subprocess.run(["scontrol", "show", "job", engine_jobs[0]], capture_output=True, text=True,
                         timeout=10).stdout
    assert "UserId=alice(" in job and "Partition=debug" in job

    # beyond the admin's limit: refused, naming it, and nothing is submitted
    before = slurm_jobs("alice")
    refused = kernel.result(TOO_MANY)["refused"]
    assert refused and "HpcHubEngines.max_engines_per_user" in refused and "at most 6" in refused, refused
    assert slurm_jobs("alice") == before

    # stopping the cluster cancels the engine jobs
    stop_asked = time.monotonic()
    kernel.run("cluster.stop_cluster_sync()")
    wait_for(lambda: all_ended(engine_jobs), 30, "the engine jobs to leave the queue", 0.2)
    print(f"engine jobs left the queue {time.monotonic() - stop_asked:.2f} s after stop_cluster")
    wait_for(lambda: all(r["state"] == "CANCELLED" for r in ledger_engines(hub, "alice")), 30,
             "the ledger to record the engines cancelled")
    rows = {r["job_id"]: r for r in ledger_engines(hub, "alice")}
    assert all(rows[j]["note"] == "cancelled: its ipyparallel cluster stopped" for j in engine_jobs)

    # an engine job that ends by itself (here: an unusable connection file) is reported to the cluster, with its
    # output, within a poll of the hub
    broken = kernel.result(BROKEN)
    assert broken["stop"]["exit_code"] == 1, broken
    [failed] = broken["stop"]["engines"].values()
    leftovers["jobs"].append(failed["job_id"])
    assert failed["state"] == "FAILED" and "Output of engine 0" in broken["out"] and "KeyError" in broken["out"]
    assert "The controller listens on 127.0.0.1 only" in broken["out"]
    assert [r["state"] for r in ledger_engines(hub, "alice") if r["job_id"] == failed["job_id"]] == ["FAILED"]
    wait_for(lambda: not list(Path("/home/alice/.hpchub/run").glob(f"{notebook_tag}-ipp-*.env")), 30,
             "the engine sets' environment files to be removed")

    # engines of a running cluster, then the notebook server stops: they are cancelled with it
    leftovers["clusters"] += re.findall(r"^CLUSTER (\S+)$", kernel.run(START.format(n=2)), re.M)
    second = kernel.result('print("RESULT " + json.dumps([job["job_id"] for job in cluster.engine_set.jobs]))')
    leftovers["jobs"].extend(second)
    assert len(second) == 2 and not set(second) & set(engine_jobs)
    assert all(squeue_state(job_id) == "RUNNING" for job_id in second)
    assert browser.api("DELETE", "/users/alice/server").status_code in (202, 204)
    wait_for(lambda: all_ended(second + [notebook_job]), 30, "the engine and server jobs to leave the queue", 0.2)
    wait_for(lambda: "" not in user_model(hub, "alice")["servers"], 30, "the hub to forget the server")
    wait_for(lambda: all(r["state"] == "CANCELLED" for r in ledger_engines(hub, "alice") if r["job_id"] in second),
             30, "the ledger to record the second set cancelled")
    rows = {r["job_id"]: r for r in ledger_engines(hub, "alice")}
    assert all(rows[j]["note"] == "cancelled: its notebook server stopped" for j in second)


@pytest.fixture
def connection_files():
    """Engine connection files in alice's home: one only she can read, one anyone can."""
    security = Path("/home/alice/.ipython/profile_default/security")
    made = []

    def make(mode: int) -> Path:
        security.mkdir(parents=True, exist_ok=True)
        for path in (security.parent.parent, security.parent, security):
            os.chown(path, *_owner("alice"))
        path = security / f"hpchub-test-{uuid.uuid4().hex[:8]}-engine.json"
        path.write_text(json.dumps({"interface": "tcp://127.0.0.1", "key": "not-a-real-key"}))
        os.chown(path, *_owner("alice"))
        path.chmod(mode)
        made.append(path)
        return path

    yield make
    for path in made:
        path.unlink(missing_ok=True)


def _owner(user: str) -> tuple[int, int]:
    stat = Path(f"/home/{user}").stat()
    return stat.st_uid, stat.st_gid


def test_the_engines_api_takes_a_fixed_schema_within_the_servers_bounds_from_its_own_token(
        hub_factory, slurm_cluster, test_users, connection_files, leftovers):
    hub = hub_factory(ENGINES)
    browser = Browser(hub.url)
    browser.login("alice", PASSWORD)
    server = spawn_until_ready(hub, browser, "alice")
    env_file = Path(server["state"]["job_env_file"])
    token = re.search(r"^export JUPYTERHUB_API_TOKEN=(\S+)$", env_file.read_text(), re.M).group(1).strip("'")
    private, shared = connection_files(0o600), connection_files(0o644)
    url = f"{hub.url}/hub/api/hpchub/engines"

    def post(body, with_token: str | None = token) -> requests.Response:
        headers = {"Authorization": f"token {with_token}"} if with_token else {}
        return requests.post(url, json=body, headers=headers, timeout=60)

    before = slurm_jobs("alice")
    good = {"n": 1, "connection_file": str(private)}
    refused = {
        "missing connection file": ({"n": 1}, "connection_file is missing"),
        "no engines": ({**good, "n": 0}, "n: 0"),
        "n as text": ({**good, "n": "2"}, "n: '2'"),
        "n as bool": ({**good, "n": True}, "n: True"),
        "a partition": ({**good, "partition": "long"}, "unknown fields ['partition']"),
        "directives": ({**good, "extra_directives": ["--exclusive"]}, "unknown fields ['extra_directives']"),
        "a command": ({**good, "command": ["/bin/sh"]}, "unknown fields ['command']"),
        "more cores than the server": ({**good, "cores": 3}, "more than this server's own 2"),
        "more memory than the server": ({**good, "memory": "1G"}, "more than this server's own 500 MB"),
        "longer than the server": ({**good, "walltime": "01:00:00"}, "longer than this server's own 00:10:00"),
        "not a walltime": ({**good, "walltime": "soon"}, "is not a walltime"),
        "outside the home": ({**good, "connection_file": "/etc/hpchub-engine.json"}, "inside /home/alice/"),
        "climbing out": ({**good, "connection_file": "/home/alice/../bob/x.json"}, "no '..'"),
        "relative": ({**good, "connection_file": ".ipython/x.json"}, "absolute path"),
        "shell syntax": ({**good, "connection_file": "/home/alice/$(id).json"}, "is not allowed"),
        "missing file": ({**good, "connection_file": "/home/alice/no-such-engine.json"}, "No such file"),
        "readable by others": ({**good, "connection_file": str(shared)}, "mode 644"),
        "not an object": ([1, str(private)], "expected a JSON object"),
    }
    for what, (body, message) in refused.items():
        response = post(body)
        assert response.status_code == 400 and message in response.json()["message"], (what, response.text)
    # beyond the admin's limit in one request: refused before anything is built
    response = post({**good, "n": 100000})
    assert response.status_code == 403 and "at most 6 engine jobs" in response.json()["message"], response.text
    # only the server's own token: not the hub's service token, not none, not alice's browser session
    assert post(good, hub.service_token).status_code == 403
    assert post(good, None).status_code == 403
    assert browser.api("POST", "/hpchub/engines", json=good).status_code == 403
    assert slurm_jobs("alice") == before, "a refused request submitted a job"
    assert ledger_engines(hub, "alice") == []

    # within bounds: accepted; the set is listed, its job carries the asked resources, and DELETE cancels it
    response = post({**good, "cores": 2, "memory": "300M", "walltime": "5"})
    assert response.status_code == 201, response.text
    engine_set = response.json()
    [engine] = engine_set["engines"]
    leftovers["jobs"].append(engine["job_id"])
    job = subprocess.run(["scontrol", "show", "job", engine["job_id"]], capture_output=True, text=True,
                         timeout=10).stdout
    assert "NumCPUs=2" in job and "TimeLimit=00:05:00" in job and re.search(r"mem=300M", job), job
    listed = requests.get(url, headers={"Authorization": f"token {token}"}, timeout=30).json()["sets"]
    assert [s["id"] for s in listed] == [engine_set["id"]]
    script = subprocess.run(["scontrol", "write", "batch_script", engine["job_id"], "-"], capture_output=True,
                            text=True, timeout=10).stdout
    assert f"--file={private}" in script and token not in script and "not-a-real-key" not in script
    assert requests.delete(f"{url}/{engine_set['id']}", headers={"Authorization": f"token {token}"},
                           timeout=60).status_code == 200
    assert squeue_state(engine["job_id"]) not in ACTIVE_SLURM_STATES
    assert requests.get(f"{url}/0000beef", headers={"Authorization": f"token {token}"}, timeout=30).status_code == 404


def test_engines_on_the_local_batch_system_by_the_same_path(local_spool, hub_factory, test_users, leftovers):
    """Another scheduler, same launcher and hub code: hpchub's local batch system (the embedded default's).
    (local_spool comes first so that the hub, which cancels its jobs as it stops, stops before the spool goes.)"""
    hub = hub_factory(LOGIN + f'c.JupyterHub.spawner_class = "local"\n'
                      f'c.LocalBatchSpawner.local_spool_dir = {str(local_spool)!r}\n')
    browser = Browser(hub.url)
    browser.login("alice", PASSWORD)
    spawn_until_ready(hub, browser, "alice")
    kernel = Kernel(hub, "alice")
    leftovers["clusters"] += re.findall(r"^CLUSTER (\S+)$", kernel.run(START.format(n=2)), re.M)
    result = kernel.result("""
jobs = rc[:].apply_sync(lambda: __import__("os").environ.get("LOCALQ_JOB_ID"))
print("RESULT " + json.dumps({"sum": sum(rc[:].map_sync(lambda x: x + 1, range(32))), "engine_jobs": jobs,
                              "notebook_job": os.environ.get("LOCALQ_JOB_ID"),
                              "launcher_jobs": [job["job_id"] for job in cluster.engine_set.jobs]}))
""")
    assert result["sum"] == sum(range(1, 33))
    assert sorted(result["engine_jobs"]) == sorted(result["launcher_jobs"]) and len(set(result["engine_jobs"])) == 2
    assert result["notebook_job"] not in result["engine_jobs"]
    # the kernel shuts down without stopping its cluster: ipyparallel stops it at exit, which cancels the engines
    kernel.close()
    wait_for(lambda: all(r["state"] == "CANCELLED" for r in ledger_engines(hub, "alice")), 30,
             "the local engine jobs to be cancelled")
    assert {r["note"] for r in ledger_engines(hub, "alice")} == {"cancelled: its ipyparallel cluster stopped"}
    assert browser.api("DELETE", "/users/alice/server").status_code in (202, 204)
    wait_for(lambda: "" not in user_model(hub, "alice")["servers"], 30, "the hub to stop the server")


PROFILES = LOGIN + """
c.JupyterHub.spawner_class = "batchspawner.BatchSpawner"
c.BatchSpawner.clusters = {"hpc": {"display_name": "Slurm test cluster", "scheduler": "slurm",
                                   "partitions": {"debug": {"max_walltime": "01:00:00"},
                                                  "long": {"max_walltime": "02:00:00"}}}}
c.BatchSpawner.profiles = [
    {"name": "standard", "display_name": "Standard", "cluster": "hpc", "partitions": ["debug", "long"],
     "defaults": {"partition": "debug", "cores": 1, "memory": "500M", "walltime": "00:10:00"},
     "bounds": {"cores": {"max": 2}}, "user_editable": ["partition", "cores", "memory", "walltime"]},
]
"""


def test_engines_take_the_servers_profile_choices(hub_factory, slurm_cluster, test_users, connection_files,
                                                  leftovers):
    """With profiles, the server's job is what the user chose: its engines get that partition and those bounds."""
    hub = hub_factory(PROFILES)
    browser = Browser(hub.url)
    browser.login("alice", PASSWORD)
    options = {"profile": "standard", "partition": "long", "cores": 2, "memory": "500M", "walltime": "00:20:00"}
    assert browser.api("POST", "/users/alice/server", json=options).status_code in (201, 202)
    server = wait_for(lambda: (user_model(hub, "alice")["servers"].get("") or {}).get("ready")
                      and user_model(hub, "alice")["servers"][""], 120, "alice's server")
    env_file = Path(server["state"]["job_env_file"])
    token = re.search(r"^export JUPYTERHUB_API_TOKEN=(\S+)$", env_file.read_text(), re.M).group(1).strip("'")
    headers = {"Authorization": f"token {token}"}
    url = f"{hub.url}/hub/api/hpchub/engines"
    body = {"n": 1, "connection_file": str(connection_files(0o600))}

    too_long = requests.post(url, json={**body, "walltime": "00:30:00"}, headers=headers, timeout=60)
    assert too_long.status_code == 400 and "this server's own 00:20:00" in too_long.json()["message"], too_long.text
    response = requests.post(url, json={**body, "cores": 2}, headers=headers, timeout=60)
    assert response.status_code == 201, response.text
    [engine] = response.json()["engines"]
    leftovers["jobs"].append(engine["job_id"])
    job = subprocess.run(["scontrol", "show", "job", engine["job_id"]], capture_output=True, text=True,
                         timeout=10).stdout
    assert "Partition=long" in job and "NumCPUs=2" in job and "TimeLimit=00:20:00" in job, job
    [row] = ledger_engines(hub, "alice")
    assert row["cluster"] == "hpc" and row["job_id"] == engine["job_id"]
    assert browser.api("DELETE", "/users/alice/server").status_code in (202, 204)
    wait_for(lambda: all_ended([engine["job_id"], server["state"]["job_id"]]), 30, "the jobs to end", 0.2)
