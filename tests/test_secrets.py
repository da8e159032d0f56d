"""Secrets given to a job (the server's API token; in reverse mode the tunnel key) stay out of every place
other users or the scheduler's operators can read: argv of any process, the scheduler's views of the job
(Slurm's job record, stored environment and script; Grid Engine's job description and spool; the PBS
emulation's `qstat -f`), and the hub's log at debug level. The token is scoped to its server and dies with
it; so does the tunnel key."""
from __future__ import annotations

import asyncio
import json
import re
import subprocess
from pathlib import Path

import asyncssh
import pytest
import requests

from hubtools import Browser, Hub, assert_reachable_through_proxy, free_port, spawn_until_ready, user_model, wait_for
from test_e2e_hub import LOGIN, PASSWORD, hub_factory, squeue_state  # noqa: F401 (fixture)
from test_netns_node import HOST_ADDR, netns_node  # noqa: F401 (fixture)
from test_scheduler_pbs import pbs  # noqa: F401 (fixture)

DEBUG = 'c.JupyterHub.log_level = "DEBUG"\nc.Spawner.debug = True\n'


def job_secrets(env_file: Path) -> dict[str, str]:
    """The secrets in a job's environment file (read as root), each as a string to search for."""
    text = env_file.read_text()
    found = {"token": re.search(r"^export JUPYTERHUB_API_TOKEN=(\S+)$", text, re.M).group(1).strip("'")}
    key = re.search(r"-----BEGIN OPENSSH PRIVATE KEY-----\n(.+?)\n-----END", text, re.S)
    if key:
        # a line from the middle of the key's body: unique to this key
        lines = key.group(1).splitlines()
        found["tunnel key"] = lines[len(lines) // 2]
    assert all(len(value) >= 32 for value in found.values()), found
    return found


def all_argv() -> str:
    """The command lines of every process on this host."""
    argv = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv.append(cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace"))
        except (FileNotFoundError, ProcessLookupError):
            pass
    return "\n".join(argv)


def run(*argv: str) -> str:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, (argv, result.stderr)
    return result.stdout


def assert_absent(secrets: dict[str, str], places: dict[str, str]) -> None:
    leaks = [f"{what} in {where}" for where, text in places.items() for what, value in secrets.items()
             if value in text]
    assert not leaks, f"secrets leaked: {leaks}"
    assert all(text for text in places.values()), [where for where, text in places.items() if not text]


def token_scopes(hub: Hub, token: str) -> requests.Response:
    return requests.get(f"{hub.url}/hub/api/user", headers={"Authorization": f"token {token}"}, timeout=10)


def test_slurm_reverse_mode_secrets_never_leave_the_job_file(hub_factory, slurm_cluster, netns_node,  # noqa: F811
                                                             test_users):
    gateway_port = free_port()
    hub = hub_factory(LOGIN + DEBUG + f"""
c.JupyterHub.spawner_class = "slurm"
c.SlurmSpawner.req_partition = "netns"
c.BatchSpawner.tunnel = "reverse"
c.BatchSpawner.tunnel_gateway_ip = {HOST_ADDR!r}
c.BatchSpawner.tunnel_gateway_port = {gateway_port}
""")
    browser = Browser(hub.url)
    browser.login("alice", PASSWORD)
    server = spawn_until_ready(hub, browser, "alice")
    assert_reachable_through_proxy(browser, "alice")
    job_id, env_file = server["state"]["job_id"], Path(server["state"]["job_env_file"])
    secrets = job_secrets(env_file)
    assert set(secrets) == {"token", "tunnel key"}
    assert env_file.parent.stat().st_mode & 0o777 == 0o700 and env_file.parent.stat().st_uid == env_file.stat().st_uid

    [job_dir] = Path("/var/lib/slurm/slurmctld").glob(f"hash.*/job.{job_id}")
    log_path = Path(re.search(r"StdOut=(\S+)", run("scontrol", "show", "job", job_id)).group(1))
    assert_absent(secrets, {
        "argv of every process": all_argv(),
        "scontrol show job -dd": run("scontrol", "show", "job", "-dd", job_id),
        "squeue --format=%all": run("squeue", "-j", job_id, "--format=%all"),
        "the script Slurm keeps": run("scontrol", "write", "batch_script", job_id, "-"),
        "the environment Slurm keeps": (job_dir / "environment").read_bytes().decode(errors="replace"),
        "the hub's debug log": hub.log(),
        "the job's debug log": log_path.read_text(),
    })
    assert "PRIVATE KEY" not in hub.log() and "PRIVATE KEY" not in all_argv()

    # the token is the server's: it names alice and may access her server, nothing of anyone else's
    model = token_scopes(hub, secrets["token"])
    assert model.status_code == 200 and model.json()["name"] == "alice", model.text
    scopes = set(model.json()["scopes"])
    assert "access:servers!server=alice/" in scopes and not any(s.startswith("admin") for s in scopes), scopes
    key_text = re.search(r"(-----BEGIN OPENSSH PRIVATE KEY-----.+?-----END OPENSSH PRIVATE KEY-----)",
                         env_file.read_text(), re.S).group(1)

    assert browser.api("DELETE", "/users/alice/server").status_code in (202, 204)
    wait_for(lambda: "" not in user_model(hub, "alice")["servers"], 30, "the server to stop")
    # both secrets die with the server
    assert token_scopes(hub, secrets["token"]).status_code == 403
    with pytest.raises((asyncssh.PermissionDenied, asyncssh.DisconnectError)):
        asyncio.run(_login(HOST_ADDR, gateway_port, server["state"]["job_tag"], key_text))
    assert not env_file.exists()


async def _login(host: str, port: int, tag: str, key_text: str) -> None:
    # the gateway's identity is not in question here: only whether it still takes the key
    conn = await asyncssh.connect(host, port, username=tag, known_hosts=None, agent_path=None, config=[],
                                  client_keys=[asyncssh.import_private_key(key_text)], connect_timeout=5)
    conn.close()


def test_grid_engine_secrets_stay_out_of_its_views_and_spool(hub_factory, sge_cluster, test_users):  # noqa: F811
    hub = hub_factory(LOGIN + DEBUG + 'c.JupyterHub.spawner_class = "sge"\n')
    browser = Browser(hub.url)
    browser.login("bob", PASSWORD)
    server = spawn_until_ready(hub, browser, "bob")
    job_id, env_file = server["state"]["job_id"], Path(server["state"]["job_env_file"])
    secrets = job_secrets(env_file)
    spool = Path("/var/spool/gridengine/execd")
    [script] = spool.glob(f"*/job_scripts/{job_id}")
    active = "\n".join(p.read_text(errors="replace") for p in spool.glob(f"*/active_jobs/{job_id}.*/*") if p.is_file())
    assert_absent(secrets, {
        "argv of every process": all_argv(),
        "qstat -j": run("qstat", "-j", job_id),
        "qstat -xml -j": run("qstat", "-xml", "-j", job_id),
        "the job script in the spool": script.read_text(),
        "the job's files in the execd spool (environment, config)": active,
        "the hub's debug log": hub.log(),
    })
    assert browser.api("DELETE", "/users/bob/server").status_code in (202, 204)
    wait_for(lambda: "" not in user_model(hub, "bob")["servers"], 30, "the server to stop")
    assert token_scopes(hub, secrets["token"]).status_code == 403


def test_pbs_emulation_secrets_stay_out_of_qstat(hub_factory, pbs, test_users):  # noqa: F811
    """On the PBS emulation (no PBS package exists here; see docs/pbs-emulation.md): `qstat -f` and its JSON
    (Variable_List included) and the emulator's stored job carry no secret."""
    hub = hub_factory(LOGIN + DEBUG + f'c.JupyterHub.spawner_class = "pbs"\nc.PBSSpawner.pbs_exec = {str(pbs.root)!r}\n')
    browser = Browser(hub.url)
    browser.login("alice", PASSWORD)
    server = spawn_until_ready(hub, browser, "alice")
    job_id, env_file = server["state"]["job_id"], Path(server["state"]["job_env_file"])
    secrets = job_secrets(env_file)
    stored = "\n".join(p.read_text(errors="replace") for p in pbs.home.rglob("*") if p.is_file())
    full = pbs.run("qstat", "-f", job_id)
    as_json = pbs.run("qstat", "-f", "-F", "json", job_id)
    assert full.returncode == 0 and as_json.returncode == 0, full.stderr + as_json.stderr
    assert "Variable_List" in full.stdout and json.loads(as_json.stdout)["Jobs"]
    assert_absent(secrets, {
        "argv of every process": all_argv(),
        "qstat -f": full.stdout,
        "qstat -f -F json": as_json.stdout,
        "the emulated server's job store": stored,
        "the hub's debug log": hub.log(),
    })
    assert browser.api("DELETE", "/users/alice/server").status_code in (202, 204)
    wait_for(lambda: "" not in user_model(hub, "alice")["servers"], 30, "the server to stop")
    assert token_scopes(hub, secrets["token"]).status_code == 403
