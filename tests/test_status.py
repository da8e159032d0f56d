"""hpchub-status and the hub API behind it (hpchub.api), on real hubs with real Slurm jobs: a running, a held and a
failed job in the table and in --json with their log tails; --probe naming the broken hop when the job was cancelled
behind the hub's back, when the server process was killed, and when the job's tunnel is down (reverse mode on the
namespace node n1); a user cannot read another's servers, an admin can. The pure pieces (redaction, walltime left,
where the URL and token come from, exit statuses) first."""
from __future__ import annotations

import json
import os
import signal
import subprocess
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import requests

from hpchub import status
from hpchub.api import REDACTED, redact, walltime_left
from hubtools import HUB_BIN, Browser, Hub, singleuser_processes, spawn_until_ready, start_hub, user_model, wait_for
from test_e2e_hub import LOGIN, PASSWORD, squeue_state
from test_e2e_tunnel import tunnel_hub  # noqa: F401 (fixture)
from test_netns_node import NODE_ADDR, netns_node  # noqa: F401 (fixture)

STATUS_BIN = HUB_BIN.with_name("hpchub-status")


# --- the pure pieces ------------------------------------------------------------------------------------------

def test_redaction_hides_secret_values_and_counts_them():
    script = ("#!/bin/bash\nexport WANDB_API_KEY=abc123\nexport HF_TOKEN='hf secret'\nmytool --password hunter22\n"
              "echo the-hubs-own-token-value\n-----BEGIN OPENSSH PRIVATE KEY-----\nAAAA\n"
              "-----END OPENSSH PRIVATE KEY-----\nexec server --key-env HPCHUB_TUNNEL_KEY\n")
    shown, count = redact(script, ["the-hubs-own-token-value", ""])
    for secret in ("abc123", "hf secret", "hunter22", "the-hubs-own-token-value", "AAAA"):
        assert secret not in shown
    assert count == 5 and shown.count(REDACTED) == 5
    assert "WANDB_API_KEY=[redacted]" in shown and "--key-env HPCHUB_TUNNEL_KEY" in shown
    assert redact(shown)[1] == 0, "redacting twice finds nothing more"


def test_walltime_left_counts_from_the_start():
    started = datetime(2026, 1, 1, 12, tzinfo=timezone.utc)
    assert walltime_left(3600, started, started + timedelta(minutes=10)) == 3000
    assert walltime_left(3600, started, started + timedelta(hours=2)) == 0
    assert walltime_left(None, started) is None and walltime_left(3600, None) is None


def test_hub_url_and_token_come_from_flags_environment_then_files(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    assert status.api_url(None, {}) == "http://127.0.0.1:8000/hub/api"
    (tmp_path / "hpchub").mkdir()
    (tmp_path / "hpchub" / "url").write_text("https://hub.example.org/\n")
    assert status.api_url(None, {}) == "https://hub.example.org/hub/api"
    assert status.api_url(None, {"JUPYTERHUB_API_URL": "http://10.0.0.1:8081/hub/api"}) == "http://10.0.0.1:8081/hub/api"
    assert status.api_url(None, {"HPCHUB_URL": "http://h:1", "JUPYTERHUB_API_URL": "x"}) == "http://h:1/hub/api"
    assert status.api_url("http://flag", {"HPCHUB_URL": "http://h:1"}) == "http://flag/hub/api"

    with pytest.raises(status.HubError, match="no API token"):
        status.token(None, {})
    saved = tmp_path / "hpchub" / "token"
    saved.write_text("from-file\n")
    saved.chmod(0o644)
    with pytest.raises(status.HubError, match="chmod 600"):
        status.token(None, {})
    saved.chmod(0o600)
    assert status.token(None, {}) == "from-file"
    assert status.token(None, {"JUPYTERHUB_API_TOKEN": "in-server"}) == "in-server"
    assert status.token(None, {"HPCHUB_API_TOKEN": "mine", "JUPYTERHUB_API_TOKEN": "in-server"}) == "mine"


def test_exit_status_of_a_view():
    ready, waiting = {"name": "", "ready": True}, {"name": "gpu", "ready": False}
    cut_off = {"name": "", "ready": True, "tunnel": {"mode": "reverse", "up": False}}
    unrouted = {"name": "", "ready": True, "route": {"present": False}}
    assert status.exit_status({"servers": [cut_off, unrouted]}, None) == status.EXIT_NOT_READY
    assert status.exit_status({"servers": [ready, waiting]}, None) == status.EXIT_READY
    assert status.exit_status({"servers": [ready, waiting]}, "gpu") == status.EXIT_NOT_READY
    assert status.exit_status({"servers": []}, None) == status.EXIT_NOT_READY
    assert status.exit_status({"servers": [ready], "probe": {"ok": False}}, "") == status.EXIT_BROKEN


# --- real hubs ------------------------------------------------------------------------------------------------

@pytest.fixture
def hubs(tmp_path: Path, proxy_installed, slurm_cluster, test_users):
    """make(extra_config) -> Hub; every hub stopped and every job it left running cancelled at the end (Slurm's
    clusters here are "slurm" and "hpc", Grid Engine's "grid")."""
    started: list[Hub] = []

    def make(extra: str) -> Hub:
        hub = start_hub(tmp_path / f"hub{len(started)}", LOGIN + extra)
        started.append(hub)
        return hub

    yield make
    for hub in started:
        hub.stop()
        for cancel, clusters in ((["scancel"], {"slurm", "hpc"}), (["qdel"], {"sge", "grid"})):
            ids = [row["job_id"] for row in ledger(hub) if row["job_id"] and row["cluster"] in clusters
                   and row["state"] in ("PENDING", "RUNNING", "COMPLETING", "CANCELLING", "UNKNOWN")]
            if ids:
                subprocess.run([*cancel, *ids], capture_output=True, timeout=30)


def ledger(hub: Hub) -> list[dict]:
    import sqlite3

    path = hub.workdir / "data" / "hpchub_ledger.sqlite"
    if not path.exists():
        return []
    with sqlite3.connect(path) as db:
        db.row_factory = sqlite3.Row
        return [dict(row) for row in db.execute("SELECT * FROM hpchub_jobs")]


def run_status(hub: Hub, *args: str, token: str | None = None, home: Path | None = None,
               timeout: float = 60) -> subprocess.CompletedProcess:
    env = {"HPCHUB_URL": hub.url, "HPCHUB_API_TOKEN": token or hub.service_token, "PATH": "/usr/bin:/bin",
           "HOME": str(home or hub.workdir)}
    return subprocess.run([str(STATUS_BIN), *args], env=env, capture_output=True, text=True, timeout=timeout)


def status_json(hub: Hub, *args: str, token: str | None = None) -> tuple[int, dict]:
    result = run_status(hub, "--json", *args, token=token)
    assert result.stdout, result.stderr
    return result.returncode, json.loads(result.stdout)


def user_token(browser: Browser, user: str) -> str:
    """A token of the user's own, made in their browser session as on the hub's Token page."""
    response = browser.api("POST", f"/users/{user}/tokens", json={"note": "hpchub-status test", "expires_in": 3600})
    assert response.status_code == 201, response.text
    return response.json()["token"]


STATES = """
c.JupyterHub.spawner_class = "slurm"
c.JupyterHub.allow_named_servers = True
c.Spawner.poll_interval = 3600

def shape(spawner):
    if spawner.user.name == "bob":
        spawner.req_extra_directives = ["--hold"]
    elif spawner.name == "broken":
        spawner.req_prologue = ["echo 'hpchub-test: failing before the server starts' >&2", "exit 3"]

c.Spawner.pre_spawn_hook = shape
"""


def test_running_held_and_failed_jobs_in_the_table_and_json(hubs):
    hub = hubs(STATES)
    alice, bob = Browser(hub.url), Browser(hub.url)
    alice.login("alice", PASSWORD)
    bob.login("bob", PASSWORD)
    running = spawn_until_ready(hub, alice, "alice")["state"]
    assert bob.api("POST", "/users/bob/server").status_code == 202
    failure = _fail_named(hub, alice)
    assert "exit code 3" in failure
    held_id = wait_for(lambda: (user_model(hub, "bob")["servers"].get("", {}).get("state") or {}).get("job_id"), 30,
                       "bob's job id")
    wait_for(lambda: squeue_state(held_id) == "PENDING", 10, "bob's job to be held")

    # running: the table shows state, node, partition, walltime left, the log; --log its tail
    table = run_status(hub, "alice/", "--log", "300")
    assert table.returncode == 0, table.stderr
    node = running["job_host"]
    for text in (running["job_id"], "RUNNING", "ready", node, "debug", f"jupyterhub-{running['job_id']}.log",
                 "of 0:10:00", "/user/alice/", "direct", "hpchub: job started on"):
        assert text in table.stdout, (text, table.stdout)
    code, document = status_json(hub, "alice/")
    assert code == 0
    [model] = document["servers"]
    job = model["job"]
    assert (job["id"], job["state"], job["nodes"], job["partition"], job["time_limit_s"]) == (
        running["job_id"], "RUNNING", [node], "debug", 600)
    assert 0 < job["walltime_left_s"] <= 600 and job["started"] and job["submitted"] and job["live"]
    assert model["route"]["present"] and model["route"]["matches"] and model["tunnel"] == {"mode": "direct"}
    assert model["server_url"].startswith(f"http://{node}:")
    code, document = status_json(hub, "alice/", "--log", "300")
    assert "hpchub: job started on" in document["log"]["text"] and not document["log"]["error"]

    # --watch shows it again every second until Ctrl-C, which ends it with the last view's status
    watching = subprocess.Popen([str(STATUS_BIN), "alice/", "--json", "--watch", "1"], stdout=subprocess.PIPE,
                                text=True, env={"HPCHUB_URL": hub.url, "HPCHUB_API_TOKEN": hub.service_token,
                                                "PATH": "/usr/bin:/bin", "HOME": str(hub.workdir)})
    views = [json.loads(watching.stdout.readline()) for _ in range(2)]
    watching.send_signal(signal.SIGINT)
    assert watching.wait(timeout=30) == 0
    assert [v["servers"][0]["job"]["id"] for v in views] == [running["job_id"]] * 2

    # held: pending with the scheduler's reason and its place in the queue; not ready
    table = run_status(hub, "bob")
    assert table.returncode == 1 and held_id in table.stdout and "JobHeldUser" in table.stdout, table.stdout
    code, document = status_json(hub, "bob")
    [model] = document["servers"]
    assert code == 1 and model["pending"] == "spawn" and not model["ready"]
    assert (model["job"]["id"], model["job"]["state"], model["job"]["reason"]) == (held_id, "PENDING", "JobHeldUser")
    assert model["job"]["nodes"] == [] and model["job"]["started"] is None and model["job"]["queue"] is not None
    assert not model["route"]["present"]

    # failed: the ledger's word, with the exit code, the node and the log's last lines
    table = run_status(hub, "alice/broken", "--log", "3")
    assert table.returncode == 1
    for text in ("FAILED", "NonZeroExitCode", "exit code", "hpchub-test: failing before the server starts"):
        assert text in table.stdout, (text, table.stdout)
    code, document = status_json(hub, "alice/broken", "--log", "3")
    job = document["servers"][0]["job"]
    assert (job["state"], job["reason"], job["exit_code"]) == ("FAILED", "NonZeroExitCode", 3)
    assert len(job["nodes"]) == 1 and not job["live"]
    assert "hpchub-test: failing before the server starts" in document["log"]["text"]

    # the history lists both of alice's jobs, newest first; the script is the submitted one, re-rendered
    code, document = status_json(hub, "alice", "--history")
    assert [row["state"] for row in document["history"]] == ["FAILED", "RUNNING"]
    code, document = status_json(hub, "alice/", "--script")
    script = document["script"]
    assert script["matches_submitted"] and "#SBATCH --time=0-00:10:00" in script["script"]
    assert f"hpchub: JupyterLab for alice, submission {running['job_tag']}" in script["script"]

    # who may read what
    bobs_token = user_token(bob, "bob")
    refused = run_status(hub, "alice", token=bobs_token)
    assert refused.returncode == 2 and "403" in refused.stderr, refused
    for path in ("/hpchub/users/alice", "/hpchub/users/alice/server", "/hpchub/users/alice/server/log",
                 "/hpchub/users/alice/server/script", "/hpchub/users/alice/server/probe",
                 "/hpchub/users/nobody-at-all/server"):
        answer = requests.get(f"{hub.url}/hub/api{path}", headers={"Authorization": f"token {bobs_token}"}, timeout=30)
        assert answer.status_code == 403, (path, answer.status_code)
    mine = run_status(hub, token=bobs_token)        # no USER: the token's own
    assert mine.returncode == 1 and held_id in mine.stdout, mine
    code, everyone = status_json(hub, "--all", token=bobs_token)
    assert {m["user"] for m in everyone["servers"]} == {"bob"}
    code, everyone = status_json(hub, "--all")      # the admin service
    assert {(m["user"], m["name"]) for m in everyone["servers"]} == {("alice", ""), ("bob", "")}
    assert alice.api("GET", "/hpchub/users/alice/server").status_code == 200   # a user's own session
    assert alice.api("GET", "/hpchub/users/bob/server").status_code == 403

    assert bob.api("DELETE", "/users/bob/server").status_code in (202, 204)
    wait_for(lambda: squeue_state(held_id) not in ("PENDING", "RUNNING"), 30, "bob's held job to be cancelled")


def _fail_named(hub: Hub, browser: Browser) -> str:
    """Start alice's server "broken", whose job fails before its server starts; the message shown."""
    response = browser.api("POST", "/users/alice/servers/broken")
    if response.status_code >= 400:       # it failed within JupyterHub's slow_spawn_timeout
        return response.json()["message"]
    assert response.status_code == 202, response.text
    with browser.session.get(f"{hub.url}/hub/api/users/alice/servers/broken/progress", stream=True, timeout=90,
                             headers={"X-XSRFToken": browser.xsrf("/hub/")}) as stream:
        for line in stream.iter_lines(decode_unicode=True):
            if line.startswith("data:"):
                event = json.loads(line[5:])
                if event.get("failed"):
                    return event["message"]
    raise AssertionError("the progress stream ended without a failure")


# --- --probe ------------------------------------------------------------------------------------------------------

# a site template whose job outlives its server (the default one execs the server: killing it ends the job, which
# the probe reports as the scheduler hop, with the signal)
OUTLIVES_ITS_SERVER = """{% extends "slurm.sh.j2" %}
{% block start %}
{% for word in command %}{{ word|sh }} {% endfor %}&
wait $! || echo "hpchub-test: the server ended with status $?; the job goes on"
sleep 600
{% endblock %}
"""


def spawn_named_until_ready(hub: Hub, browser: Browser, user: str, name: str, timeout: float = 120) -> dict:
    response = browser.api("POST", f"/users/{user}/servers/{name}")
    assert response.status_code in (201, 202), response.text

    def ready() -> dict | None:
        server = user_model(hub, user)["servers"].get(name)
        if server is None:
            raise AssertionError(f"the spawn of {name} failed:\n{hub.log()[-3000:]}")
        return server if server["ready"] else None

    return wait_for(ready, timeout, f"{user}'s server {name} to be ready", interval=0.25)


def probe(hub: Hub, target: str) -> tuple[int, dict, str]:
    """(exit status, the probe's JSON, the table the person sees)."""
    code, document = status_json(hub, target, "--probe")
    table = run_status(hub, target, "--probe")
    assert table.returncode == code, (table.stdout, table.stderr)
    return code, document["probe"], table.stdout


def test_probe_names_the_cancelled_job_and_the_killed_server(hubs, tmp_path):
    templates = tmp_path / "templates"
    templates.mkdir()
    (templates / "outlives.sh.j2").write_text(OUTLIVES_ITS_SERVER)
    hub = hubs(f"""
c.JupyterHub.spawner_class = "slurm"
c.JupyterHub.allow_named_servers = True
c.Spawner.poll_interval = 3600
c.BatchSpawner.job_template = "outlives.sh.j2"
c.BatchSpawner.job_template_dirs = [{str(templates)!r}]
""")
    browser = Browser(hub.url)
    browser.login("alice", PASSWORD)
    killed = spawn_until_ready(hub, browser, "alice")["state"]["job_id"]
    cancelled = spawn_named_until_ready(hub, browser, "alice", "other")["state"]["job_id"]

    code, result, table = probe(hub, "alice/")
    assert code == 0 and result["ok"] and result["failed"] is None, result
    assert [hop["name"] for hop in result["hops"]] == ["scheduler", "server", "route", "http"]
    assert all(hop["ok"] for hop in result["hops"]) and "every hop answers" in table

    # (a) the job cancelled behind the hub's back
    subprocess.run(["scancel", cancelled], check=True, timeout=30)
    wait_for(lambda: squeue_state(cancelled) in ("", "CANCELLED"), 30, f"job {cancelled} to end", 0.2)
    code, result, table = probe(hub, "alice/other")
    assert code == status.EXIT_BROKEN and result["failed"] == "scheduler", json.dumps(result, indent=1)
    assert f"job {cancelled} ended: CANCELLED" in result["hops"][0]["detail"] and "Start a new server" in result["fix"]
    assert "broken hop: scheduler" in table and "CANCELLED" in table

    # (c) the server process killed, its job still running
    [pid] = [pid for pid, env in singleuser_processes(Path("/home/alice").stat().st_uid)
             if env.get("SLURM_JOB_ID") == killed]
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not Path(f"/proc/{pid}").exists(), 10, "the server process to go")
    code, result, table = probe(hub, "alice/")
    assert code == status.EXIT_BROKEN and result["failed"] == "server", result
    assert result["hops"][0]["ok"] and squeue_state(killed) == "RUNNING"
    assert "nothing accepts connections" in result["hops"][1]["detail"] and "log" in result["fix"]
    assert "broken hop: server" in table
    assert not result["hops"][3]["ok"], "the proxy's answer without a server cannot be 200"


@pytest.fixture
def gateway_blocked():
    """block(port) drops the node's packets to the hub's gateway port (a table of the test's own in the host's
    nftables), so that its tunnel cannot come back; removed at the end."""
    tables: list[str] = []

    def block(port: int) -> None:
        table = f"hpchub_status_test_{port}"
        rules = (f"table inet {table} {{\n chain input {{\n  type filter hook input priority -10; policy accept;\n"
                 f"  ip saddr {NODE_ADDR} tcp dport {port} drop\n }}\n}}\n")
        subprocess.run(["nft", "-f", "-"], input=rules, text=True, check=True, timeout=30)
        tables.append(table)

    def unblock() -> None:
        while tables:
            subprocess.run(["nft", "delete", "table", "inet", tables.pop()], capture_output=True, timeout=30)

    block.unblock = unblock
    yield block
    unblock()


def test_probe_names_a_tunnel_that_is_down(tunnel_hub, gateway_blocked):  # noqa: F811
    hub = tunnel_hub
    browser = Browser(hub.url)
    browser.login("alice", PASSWORD)
    job_id = spawn_until_ready(hub, browser, "alice")["state"]["job_id"]
    code, result, _ = probe(hub, "alice/")
    assert code == 0 and [hop["name"] for hop in result["hops"]] == ["scheduler", "tunnel", "server", "route", "http"]
    code, document = status_json(hub, "alice/")
    tunnel = document["servers"][0]["tunnel"]
    assert tunnel["mode"] == "reverse" and tunnel["up"] and tunnel["endpoint"].startswith("127.0.0.1:")

    # the connection cut at the gateway, and the node kept from dialling it again
    gateway_blocked(hub.gateway_port)
    killed = subprocess.run(["ss", "-K", "dst", NODE_ADDR, "sport", "=", f":{hub.gateway_port}"],
                            capture_output=True, text=True, timeout=10)
    assert killed.returncode == 0 and NODE_ADDR in killed.stdout, killed.stdout + killed.stderr
    wait_for(lambda: not status_json(hub, "alice/")[1]["servers"][0]["tunnel"]["up"], 15, "the tunnel to be down")
    code, result, table = probe(hub, "alice/")
    assert code == status.EXIT_BROKEN and result["failed"] == "tunnel", result
    assert result["hops"][0]["ok"] and squeue_state(job_id) == "RUNNING"
    assert "tunnel to the hub's gateway is down" in result["hops"][1]["detail"]
    assert f":{hub.gateway_port}" in result["fix"] and "broken hop: tunnel" in table
    table = run_status(hub, "alice/")
    assert table.returncode == 1 and "reverse: DOWN" in table.stdout and "not reachable" in table.stdout, table.stdout

    # unblocked, the job's client comes back by itself and every hop answers again
    gateway_blocked.unblock()
    wait_for(lambda: status_json(hub, "alice/", "--probe")[0] == 0, 90, "the probe to pass again", interval=2)


def test_a_profile_server_on_grid_engine(hubs, sge_cluster):
    """With clusters and profiles: the job's cluster and queue, the script rendered again on that cluster equal to
    the submitted one, every hop passing."""
    from test_e2e_profiles import CATALOG

    hub = hubs(CATALOG)
    browser = Browser(hub.url)
    browser.login("alice", PASSWORD)
    response = browser.api("POST", "/users/alice/servers/grid", json={"profile": "grid"})
    assert response.status_code in (201, 202), response.text
    server = wait_for(lambda: (user_model(hub, "alice")["servers"].get("grid") or {}).get("ready") and
                      user_model(hub, "alice")["servers"]["grid"], 120, "the Grid Engine server")
    code, document = status_json(hub, "alice/grid", "--script", "--probe")
    [model] = document["servers"]
    assert code == 0 and model["cluster"] == "grid", document
    job = model["job"]
    assert (job["id"], job["state"], job["native_state"], job["partition"]) == (
        server["state"]["job_id"], "RUNNING", "r", "all.q")
    assert job["nodes"] and job["started"] and 0 < job["walltime_left_s"] <= 600
    assert document["script"]["matches_submitted"] and "#$ -q all.q" in document["script"]["script"]
    assert document["probe"]["ok"], document["probe"]
    assert browser.api("DELETE", "/users/alice/servers/grid").status_code in (202, 204)
