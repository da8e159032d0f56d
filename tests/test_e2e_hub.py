"""The walking skeleton end to end: a real hpchub (JupyterHub + configurable-http-proxy) starts JupyterLab
in a real batch job (Slurm, then the local batch system), reached through the proxy; stop cancels it."""
from __future__ import annotations

import json
import os
import re
import select
import shutil
import sqlite3
import subprocess
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest
import requests

from helpers import controller_stopped
from hubtools import (HUB_BIN, Browser, Hub, assert_reachable_through_proxy, singleuser_processes,
                      spawn_until_ready, start_hub, user_model, wait_for)

PASSWORD = "hpchub-test-password"
LOGIN = f"""
c.JupyterHub.authenticator_class = "shared-password"
c.SharedPasswordAuthenticator.user_password = {PASSWORD!r}
c.Authenticator.allowed_users = {{"alice", "bob"}}
c.BatchSpawner.req_runtime = "00:10:00"
c.BatchSpawner.req_memory = "500M"
"""
ACTIVE_SLURM_STATES = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED"}


@pytest.fixture
def hub_factory(tmp_path: Path, proxy_installed: None):
    hubs: list[Hub] = []

    def make(extra: str, **kwargs) -> Hub:
        hub = start_hub(tmp_path / f"hub{len(hubs)}", extra, **kwargs)
        hubs.append(hub)
        return hub

    yield make
    for hub in hubs:
        hub.stop()


def squeue_state(job_id: str) -> str:
    out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True, timeout=10)
    return out.stdout.strip()


def hpchub_status(hub: Hub, user: str) -> subprocess.CompletedProcess:
    env = {"HPCHUB_URL": hub.url, "HPCHUB_API_TOKEN": hub.service_token, "PATH": "/usr/bin:/bin"}
    return subprocess.run([str(HUB_BIN.with_name("hpchub-status")), user], env=env, capture_output=True,
                          text=True, timeout=30)


def spawn_failure_message(hub: Hub, browser: Browser, user: str, timeout: float = 90) -> str:
    """Start a server that must fail; return the message the user is shown."""
    started = time.monotonic()
    response = browser.api("POST", f"/users/{user}/server")
    if response.status_code >= 400:
        return response.json()["message"]
    assert response.status_code == 202, response.text
    # a slow failure is reported at the end of the progress stream the spawn page listens to
    with browser.session.get(f"{hub.url}/hub/api/users/{user}/server/progress", stream=True, timeout=timeout,
                             headers={"X-XSRFToken": browser.xsrf("/hub/")}) as stream:
        for line in stream.iter_lines(decode_unicode=True):
            if line.startswith("data:"):
                event = json.loads(line[5:])
                if event.get("failed"):
                    return event["message"]
            assert time.monotonic() - started < timeout, "no failure reported in time"
    raise AssertionError("the progress stream ended without a failure")


def test_slurm_server_runs_in_a_job_and_stop_cancels_it(hub_factory, slurm_cluster, test_users):
    hub = hub_factory(LOGIN + 'c.JupyterHub.spawner_class = "slurm"\nc.SlurmSpawner.req_partition = "debug"\n')
    browser = Browser(hub.url)
    browser.login("alice", PASSWORD)
    server = spawn_until_ready(hub, browser, "alice")
    job_id = server["state"]["job_id"]
    assert squeue_state(job_id) == "RUNNING"
    assert_reachable_through_proxy(browser, "alice")

    alice = Path("/home/alice").stat().st_uid
    in_job = [pid for pid, env in singleuser_processes(alice) if env.get("SLURM_JOB_ID") == job_id]
    assert in_job, f"no jupyterhub-singleuser of alice carries SLURM_JOB_ID={job_id}"
    assert not [pid for pid, env in singleuser_processes(0) if env.get("SLURM_JOB_ID") == job_id], "ran as root"

    status = hpchub_status(hub, "alice")
    assert status.returncode == 0 and job_id in status.stdout, status
    [row] = ledger_rows(hub, "alice")
    assert (row["job_id"], row["state"], row["tag"]) == (job_id, "RUNNING", server["state"]["job_tag"])
    assert row["node"] == server["state"]["job_host"] and row["started"] and row["log_path"].endswith(f"-{job_id}.log")

    stop_requested = time.monotonic()
    assert browser.api("DELETE", "/users/alice/server").status_code in (202, 204)
    wait_for(lambda: squeue_state(job_id) not in ACTIVE_SLURM_STATES, 10, f"job {job_id} to leave the queue", 0.1)
    print(f"job {job_id} left the queue {time.monotonic() - stop_requested:.2f} s after the stop request")
    wait_for(lambda: "" not in user_model(hub, "alice")["servers"], 30, "the hub to forget the server")
    status = hpchub_status(hub, "alice")
    assert status.returncode == 1 and "no servers" in status.stdout, status
    [row] = ledger_rows(hub, "alice")
    assert row["state"] == "CANCELLED" and row["ended"] and row["note"] == "cancel requested", row


def saved_state(hub: Hub, user: str) -> dict:
    """The spawner state in the hub's database, where a restarted hub would find it."""
    with sqlite3.connect(hub.workdir / "data" / "jupyterhub.sqlite") as db:
        rows = db.execute("SELECT spawners.state FROM spawners JOIN users ON users.id = spawners.user_id "
                          "WHERE users.name = ? AND spawners.name = ''", (user,)).fetchall()
    return json.loads(rows[0][0]) if rows and rows[0][0] else {}


def ledger_rows(hub: Hub, user: str) -> list[dict]:
    """The user's rows in the hub's job ledger, newest first."""
    with sqlite3.connect(hub.workdir / "data" / "hpchub_ledger.sqlite") as db:
        db.row_factory = sqlite3.Row
        return [dict(row) for row in db.execute("SELECT * FROM hpchub_jobs WHERE user = ? ORDER BY id DESC", (user,))]


def test_job_id_is_saved_and_shown_while_the_job_waits(hub_factory, slurm_cluster, test_users):
    hub = hub_factory(LOGIN + 'c.JupyterHub.spawner_class = "slurm"\n'
                      'c.SlurmSpawner.req_extra_directives = ["--begin=now+120"]\n')
    browser = Browser(hub.url)
    browser.login("bob", PASSWORD)
    assert browser.api("POST", "/users/bob/server").status_code == 202
    job_id = wait_for(lambda: saved_state(hub, "bob").get("job_id"), 30, "the job id in the hub database")
    wait_for(lambda: squeue_state(job_id) == "PENDING", 10, f"job {job_id} to be pending")

    messages = []
    with browser.session.get(f"{hub.url}/hub/api/users/bob/server/progress", stream=True, timeout=30,
                             headers={"X-XSRFToken": browser.xsrf("/hub/")}) as stream:
        for line in stream.iter_lines(decode_unicode=True):
            if line.startswith("data:"):
                messages.append(json.loads(line[5:])["message"])
                if any("queued" in m for m in messages):
                    break
    assert f"Submitted batch job {job_id}" in messages
    [queued] = [m for m in messages if "queued" in m]
    # the --begin time is the scheduler's own estimate
    begin = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%S"], capture_output=True, text=True,
                           timeout=10).stdout.strip()
    expected = datetime.fromisoformat(begin).astimezone(timezone.utc)
    assert re.fullmatch(rf"Job {job_id} is queued \(BeginTime\): position 1 of \d+ pending in debug; the "
                        rf"scheduler expects it to start at {expected:%Y-%m-%d %H:%M} UTC\.", queued), queued

    assert browser.api("DELETE", "/users/bob/server").status_code in (202, 204)
    wait_for(lambda: squeue_state(job_id) not in ACTIVE_SLURM_STATES, 10, f"job {job_id} to leave the queue", 0.1)
    wait_for(lambda: not user_model(hub, "bob")["pending"] and "" not in user_model(hub, "bob")["servers"], 30,
             "the hub to forget the pending server")


def test_a_scheduler_outage_loses_no_server(hub_factory, slurm_cluster, test_users):
    """slurmctld stopped for 30 s while a server runs: UNKNOWN is not gone. Nothing is stopped or cancelled,
    the route stays, and the hub's metrics count the batched queries it kept making. A stop asked for during
    the outage is carried out when the scheduler is back."""
    hub = hub_factory(LOGIN + 'c.JupyterHub.spawner_class = "slurm"\nc.Spawner.poll_interval = 5\n'
                      'c.BatchSpawner.job_poll_interval = 3\nc.BatchSpawner.command_timeout = 5\n')
    browser = Browser(hub.url)
    browser.login("alice", PASSWORD)
    job_id = spawn_until_ready(hub, browser, "alice")["state"]["job_id"]
    assert_reachable_through_proxy(browser, "alice")
    before = scheduler_queries(hub)
    with controller_stopped():
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert user_model(hub, "alice")["servers"][""]["ready"], "the hub gave up on the server"
            assert browser.get("/user/alice/api/status").status_code == 200
            time.sleep(2)
        [row] = ledger_rows(hub, "alice")
        assert row["state"] == "RUNNING" and row["reason"].startswith("scheduler unavailable"), row
        # a stop during the outage: the hub lets the server go, the cancel goes on until Slurm confirms it
        assert browser.api("DELETE", "/users/alice/server").status_code in (202, 204)
        wait_for(lambda: "" not in user_model(hub, "alice")["servers"], 60, "the hub to let the server go")
        assert ledger_rows(hub, "alice")[0]["state"] == "CANCELLING"
    wait_for(lambda: squeue_state(job_id) not in ACTIVE_SLURM_STATES, 90, "the cancel to reach Slurm", 0.5)
    wait_for(lambda: ledger_rows(hub, "alice")[0]["state"] == "CANCELLED", 30, "the ledger to record it")
    assert scheduler_queries(hub) > before >= 1


def scheduler_queries(hub: Hub) -> float:
    """hpchub_scheduler_queries_total for Slurm, from the hub's Prometheus endpoint."""
    metrics = requests.get(f"{hub.url}/hub/metrics", headers={"Authorization": f"token {hub.service_token}"},
                           timeout=10)
    metrics.raise_for_status()
    match = re.search(r'^hpchub_scheduler_queries_total\{scheduler="slurm"\} (\S+)$', metrics.text, re.M)
    assert match, "the hub's metrics have no hpchub_scheduler_queries_total"
    return float(match.group(1))


def test_the_port_report_ends_the_wait_for_the_scheduler(hub_factory, slurm_cluster, test_users):
    """A job that reports its port runs: the spawn goes on at once with one query for its node, instead of
    waiting for the poller's next (backed-off) check, here set 10 minutes away."""
    hub = hub_factory(LOGIN + 'c.JupyterHub.spawner_class = "slurm"\nc.SlurmSpawner.req_partition = "debug"\n'
                      "c.BatchSpawner.job_poll_fast_first = 600\nc.BatchSpawner.job_poll_fast_max = 600\n"
                      "c.BatchSpawner.job_poll_interval = 600\n")
    browser = Browser(hub.url)
    browser.login("alice", PASSWORD)
    requested = time.monotonic()
    server = spawn_until_ready(hub, browser, "alice", timeout=120)
    print(f"ready {time.monotonic() - requested:.1f} s after the request")
    assert squeue_state(server["state"]["job_id"]) == "RUNNING"
    assert server["state"]["job_host"], server["state"]
    assert scheduler_queries(hub) == 1  # the one asked when the port arrived
    assert_reachable_through_proxy(browser, "alice")


RESTART = LOGIN + """
c.JupyterHub.spawner_class = "slurm"
c.JupyterHub.allow_named_servers = True
c.BatchSpawner.job_poll_interval = 5

def hold_some(spawner):
    if spawner.user.name == "bob" or spawner.name == "extra":
        spawner.req_extra_directives = ["--begin=now+40"]

c.Spawner.pre_spawn_hook = hold_some
"""


def jobs_with_tag(tag: str) -> list[str]:
    out = subprocess.run(["squeue", "-h", "--states=all", "-O", "JobID:12,Comment:40"], capture_output=True,
                         text=True, timeout=10).stdout
    return [line.split()[0] for line in out.splitlines() if line.split()[1:] == [tag]]


def test_hub_killed_and_restarted_keeps_running_and_queued_servers(hub_factory, slurm_cluster, test_users):
    """SIGKILL the hub (and its proxy) with a running, a queued and an orphaned job, then start it again."""
    hub = hub_factory(RESTART)
    alice, bob = Browser(hub.url), Browser(hub.url)
    alice.login("alice", PASSWORD)
    bob.login("bob", PASSWORD)
    running = spawn_until_ready(hub, alice, "alice")["state"]
    assert bob.api("POST", "/users/bob/server").status_code == 202
    assert alice.api("POST", "/users/alice/servers/extra").status_code == 202
    queued = wait_for(lambda: saved_state(hub, "bob").get("job_id") and saved_state(hub, "bob"), 30, "bob's job id")
    wait_for(lambda: squeue_state(queued["job_id"]) == "PENDING", 10, "bob's job to be pending")
    orphan = wait_for(lambda: ledger_rows(hub, "alice")[0]["job_id"] and ledger_rows(hub, "alice")[0], 30,
                      "the extra server's job")

    hub.kill()
    with sqlite3.connect(hub.workdir / "data" / "jupyterhub.sqlite") as db:  # the extra server is forgotten
        db.execute("UPDATE spawners SET state = NULL WHERE name = 'extra'")
    hub.launch()

    # the running server is adopted: reachable again through the new proxy, same job
    wait_for(lambda: alice.get("/user/alice/lab").status_code == 200, 60, "alice's server to answer again", 0.5)
    assert_reachable_through_proxy(alice, "alice")
    assert user_model(hub, "alice")["servers"][""]["state"]["job_id"] == running["job_id"]
    assert squeue_state(running["job_id"]) == "RUNNING"
    # the orphan is cancelled and recorded as such
    wait_for(lambda: squeue_state(orphan["job_id"]) not in ACTIVE_SLURM_STATES, 30, "the orphan to be cancelled")
    [record] = [r for r in ledger_rows(hub, "alice") if r["tag"] == orphan["tag"]]
    wait_for(lambda: [r for r in ledger_rows(hub, "alice") if r["tag"] == orphan["tag"]][0]["state"] == "CANCELLED",
             30, "the ledger to record the orphan cancelled")
    assert "orphan" in [r for r in ledger_rows(hub, "alice") if r["tag"] == orphan["tag"]][0]["note"]
    # the queued job was never forgotten: it starts later and its server becomes reachable, submitted once
    server = wait_for(lambda: (user_model(hub, "bob")["servers"].get("") or {}).get("ready") and
                      user_model(hub, "bob")["servers"][""], 120, "bob's queued server to start")
    assert server["state"]["job_id"] == queued["job_id"]
    assert_reachable_through_proxy(bob, "bob")
    assert jobs_with_tag(queued["job_tag"]) == [queued["job_id"]]
    assert len(ledger_rows(hub, "bob")) == 1


def sge_job_listed(job_id: str) -> bool:
    out = subprocess.run(["qstat", "-u", "*"], capture_output=True, text=True, timeout=30).stdout
    return any(line.split()[:1] == [job_id] for line in out.splitlines())


def test_grid_engine_by_changing_one_name_and_no_token_in_the_job_script(hub_factory, sge_cluster, test_users):
    hub = hub_factory(LOGIN + 'c.JupyterHub.spawner_class = "sge"\n')
    browser = Browser(hub.url)
    browser.login("alice", PASSWORD)
    server = spawn_until_ready(hub, browser, "alice")
    job_id, env_file = server["state"]["job_id"], Path(server["state"]["job_env_file"])
    assert sge_job_listed(job_id)
    assert_reachable_through_proxy(browser, "alice")
    alice = Path("/home/alice").stat().st_uid
    assert [pid for pid, env in singleuser_processes(alice) if env.get("JOB_ID") == job_id]

    # the token reaches the job through a file only alice can read, never the script Grid Engine
    # leaves world-readable on the node, nor the job's description
    assert env_file.stat().st_uid == alice and env_file.parent.stat().st_mode & 0o777 == 0o700
    token = re.search(r"^export JUPYTERHUB_API_TOKEN=(\S+)$", env_file.read_text(), re.M).group(1).strip("'")
    [script] = Path("/var/spool/gridengine/execd").glob(f"*/job_scripts/{job_id}")
    assert token not in script.read_text() and "JUPYTERHUB_API_TOKEN" not in script.read_text()
    described = subprocess.run(["qstat", "-j", job_id], capture_output=True, text=True, timeout=30).stdout
    assert job_id in described and token not in described

    assert browser.api("DELETE", "/users/alice/server").status_code in (202, 204)
    wait_for(lambda: not sge_job_listed(job_id), 10, f"job {job_id} to leave qstat", 0.2)
    wait_for(lambda: not env_file.exists(), 10, "the environment file to be removed")


@pytest.fixture
def local_spool():
    # under /tmp, not pytest's 0700 tmp dir: the jobs run as alice and create their job dirs here
    parent = Path(tempfile.mkdtemp(prefix="hpchub-test-spool-"))
    parent.chmod(0o755)
    yield parent / "spool"
    shutil.rmtree(parent, ignore_errors=True)


def test_local_server_runs_in_a_local_job_as_the_user(local_spool, hub_factory, test_users):
    # local_spool first: torn down after the hubs, so that a hub stopping its server still finds the job
    hub = hub_factory(LOGIN + f'c.JupyterHub.spawner_class = "local"\nc.LocalBatchSpawner.local_spool_dir = {str(local_spool)!r}\n')
    browser = Browser(hub.url)
    browser.login("alice", PASSWORD)
    server = spawn_until_ready(hub, browser, "alice")
    job_id = server["state"]["job_id"]
    assert_reachable_through_proxy(browser, "alice")

    alice = Path("/home/alice").stat().st_uid
    in_job = [pid for pid, env in singleuser_processes(alice) if env.get("LOCALQ_JOB_ID") == job_id]
    assert in_job, f"no jupyterhub-singleuser of alice runs in local job {job_id}"

    assert browser.api("DELETE", "/users/alice/server").status_code in (202, 204)
    wait_for(lambda: not singleuser_processes(alice), 10, "alice's server process to end")


FAILING = LOGIN + """
c.JupyterHub.spawner_class = "slurm"

def break_the_job(spawner):
    if spawner.user.name == "alice":
        spawner.req_prologue = ["echo 'hpchub-test: failing before the server starts' >&2", "exit 3"]
    else:
        spawner.req_partition = "no-such-partition"

c.Spawner.pre_spawn_hook = break_the_job
"""


def test_a_job_that_fails_early_fails_the_spawn_with_the_reason(hub_factory, slurm_cluster, test_users):
    hub = hub_factory(FAILING)
    alice = Browser(hub.url)
    alice.login("alice", PASSWORD)
    started = time.monotonic()
    message = spawn_failure_message(hub, alice, "alice")
    assert "ended before the server started" in message and "exit code 3" in message, message
    assert "hpchub-test: failing before the server starts" in message, "the log tail is missing: " + message
    assert time.monotonic() - started < 60

    bob = Browser(hub.url)
    bob.login("bob", PASSWORD)
    message = spawn_failure_message(hub, bob, "bob")
    assert "refused the job" in message and "invalid partition" in message.lower(), message
    for user in ("alice", "bob"):
        assert "" not in user_model(hub, user)["servers"]
    [failed] = ledger_rows(hub, "alice")
    assert (failed["state"], failed["exit_code"], failed["reason"]) == ("FAILED", 3, "NonZeroExitCode"), failed
    [rejected] = ledger_rows(hub, "bob")
    assert rejected["state"] == "REJECTED" and rejected["job_id"] is None and "partition" in rejected["reason"]


def test_jobs_never_run_as_root(hub_factory, slurm_cluster, test_users):
    hub = hub_factory(LOGIN + 'c.JupyterHub.spawner_class = "slurm"\nc.BatchSpawner.runner = "local"\n')
    browser = Browser(hub.url)
    browser.login("alice", PASSWORD)
    before = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, timeout=10).stdout
    message = spawn_failure_message(hub, browser, "alice")
    assert "does not run jobs as root" in message, message
    after = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, timeout=10).stdout
    assert after == before, "a job was submitted"


def read_banner(hub: Hub, timeout: float = 30) -> dict[str, str]:
    """The URL, user and password hpchub prints on stdout once it is up."""
    found: dict[str, str] = {}
    deadline = time.monotonic() + timeout
    assert hub.process.stdout is not None
    fd, text = hub.process.stdout.fileno(), ""
    while "password" not in found:
        # os.read, not readline: a buffered reader can hold the banner while select sees nothing new
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        assert ready, f"no banner within {timeout} s:\n{text}\n{hub.log()[-3000:]}"
        chunk = os.read(fd, 65536).decode(errors="replace")
        assert chunk, f"hpchub closed its stdout:\n{hub.log()[-3000:]}"
        text += chunk
        for key, pattern in (("url", r"hpchub is running at (\S+)"), ("user", r"log in as:\s+(\S+)"),
                             ("password", r"password:\s+(\S+)")):
            match = re.search(pattern, text)
            if match:
                found[key] = match.group(1)
    return found


def test_embedded_default_runs_without_config_as_an_ordinary_user(proxy_installed, test_users):
    """What README's first command runs: no config file, no root, the local batch system, a demo login."""
    workdir = Path(tempfile.mkdtemp(prefix="hpchub-test-demo-"))
    workdir.chmod(0o755)
    hub = start_hub(workdir / "hub", None, user="bob", env={"HPCHUB_DATA_DIR": str(workdir / "hub" / "data")})
    try:
        banner = read_banner(hub)
        assert banner["url"].rstrip("/") == hub.url and banner["user"] == "demo"
        assert banner["password"] not in hub.log(), "the password reached the log"

        intruder = Browser(hub.url)
        with pytest.raises(AssertionError, match="login as demo failed"):
            intruder.login("demo", "not-the-password")

        browser = Browser(hub.url)
        browser.login("demo", banner["password"])
        response = browser.api("POST", "/users/demo/server")
        assert response.status_code in (201, 202), response.text
        wait_for(lambda: browser.api("GET", "/users/demo").json()["servers"].get("", {}).get("ready"), 120,
                 "the demo server to be ready", 0.25)
        assert_reachable_through_proxy(browser, "demo")
        bob = Path("/home/bob").stat().st_uid
        assert any("LOCALQ_JOB_ID" in env for _, env in singleuser_processes(bob)), "no local job runs as bob"
        assert browser.api("DELETE", "/users/demo/server").status_code in (202, 204)
        wait_for(lambda: not singleuser_processes(bob), 10, "the demo server process to end")
    finally:
        hub.stop()
        shutil.rmtree(workdir, ignore_errors=True)
