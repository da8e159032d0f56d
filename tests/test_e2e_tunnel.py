"""Reverse mode end to end: JupyterLab in a real Slurm job on n1, a node in a network namespace that the hub
cannot reach, served through the job's SSH tunnel to the hub's gateway. The route follows the tunnel: gone
while it is down, back when the job's client reconnects, with the user's kernel still alive; a restarted
hub takes the running job's tunnel back."""
from __future__ import annotations

import os
import re
import socket
import subprocess
import time
from pathlib import Path

import pytest

from hubtools import Browser, Hub, assert_reachable_through_proxy, free_port, singleuser_processes, spawn_until_ready, \
    start_hub, user_model, wait_for
from test_e2e_hub import LOGIN, squeue_state
from test_netns_node import HOST_ADDR, NODE_ADDR, NS_PATH, SLURMD_PORT, netns_node  # noqa: F401 (fixture)

KEEPALIVE_S = 2


@pytest.fixture
def tunnel_hub(tmp_path: Path, proxy_installed, slurm_cluster, netns_node, test_users):  # noqa: F811
    hubs: list[Hub] = []
    gateway_port = free_port()
    config = LOGIN + f"""
c.JupyterHub.spawner_class = "slurm"
c.SlurmSpawner.req_partition = "netns"
c.BatchSpawner.tunnel = "reverse"
c.BatchSpawner.tunnel_gateway_ip = {HOST_ADDR!r}
c.BatchSpawner.tunnel_gateway_port = {gateway_port}
c.BatchSpawner.tunnel_keepalive_interval = {KEEPALIVE_S}
"""
    hub = start_hub(tmp_path / "hub", config)
    hubs.append(hub)
    hub.gateway_port = gateway_port
    yield hub
    for hub in hubs:
        hub.stop()


def routes(hub: Hub) -> dict[str, dict]:
    response = hub.api("GET", "/proxy")
    response.raise_for_status()
    return response.json()


def route_target(hub: Hub, user: str) -> str | None:
    route = routes(hub).get(f"/user/{user}/")
    return route["target"] if route else None


def namespace_listeners(pid: int) -> set[int]:
    """TCP ports listening in the network namespace of process `pid` (its /proc/PID/net/tcp is that
    namespace's table)."""
    ports = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A":       # LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def connects(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=2).close()
        return True
    except OSError:
        return False


def server_process(job_id: str) -> int:
    """The single-user server of the job (not the tunnel client, whose command line names it too)."""
    alice = Path("/home/alice").stat().st_uid
    [pid] = [pid for pid, env in singleuser_processes(alice) if env.get("SLURM_JOB_ID") == job_id
             and "hpchub-tunnel" not in Path(f"/proc/{pid}/cmdline").read_text()]
    return pid


def start_kernel(browser: Browser, user: str) -> str:
    headers = {"X-XSRFToken": browser.xsrf(f"/user/{user}/")}
    response = browser.session.post(f"{browser.url}/user/{user}/api/kernels", json={"name": "python3"},
                                    headers=headers, timeout=60)
    assert response.status_code == 201, response.text
    return response.json()["id"]


def test_notebook_on_an_unreachable_node_answers_through_the_tunnel(tunnel_hub):
    hub = tunnel_hub
    browser = Browser(hub.url)
    browser.login("alice", "hpchub-test-password")
    server = spawn_until_ready(hub, browser, "alice")
    job_id = server["state"]["job_id"]
    assert squeue_state(job_id) == "RUNNING" and server["state"]["job_host"] == "n1"
    assert_reachable_through_proxy(browser, "alice")

    # the server runs in the node's namespace, on a Unix socket, and listens on no address the hub reaches
    pid = server_process(job_id)
    assert os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat(NS_PATH).st_ino, "the server is not in n1's namespace"
    assert any(arg.startswith("--ServerApp.sock=") for arg in Path(f"/proc/{pid}/cmdline").read_text().split("\0"))
    # every port listening in the node but slurmd's (open to the controller by design)
    in_node = namespace_listeners(pid) - {SLURMD_PORT}
    assert in_node, "nothing listens in the node (the tunnel client's hub API port should)"
    reachable = [port for port in in_node if connects(NODE_ADDR, port)]
    assert not reachable, f"ports of the node the hub can reach directly: {reachable}"
    # the route leads to the gateway's loopback endpoint for this job
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+", route_target(hub, "alice")), routes(hub)

    # the job's key is in neither the script Slurm keeps nor the hub's log: the job reads it from its 0600 file
    script = subprocess.run(["scontrol", "write", "batch_script", job_id, "-"], capture_output=True, text=True,
                            timeout=10).stdout
    assert "--key-env" in script and "PRIVATE KEY" not in script, script
    assert "PRIVATE KEY" not in hub.log()

    assert browser.api("DELETE", "/users/alice/server").status_code in (202, 204)
    wait_for(lambda: squeue_state(job_id) in ("", "COMPLETED", "CANCELLED"), 30, f"job {job_id} to end", 0.2)
    wait_for(lambda: route_target(hub, "alice") is None, 10, "the route to go")
    # the gateway, in the hub's log, closed the job's tunnel when its credential was revoked
    assert f"closing the tunnel connection of job {server['state']['job_tag']}" in hub.log()


def spawned_with_a_kernel(hub: Hub) -> tuple[Browser, str, str]:
    """alice's server through the tunnel, reached once, with a kernel: (browser, job id, kernel id)."""
    browser = Browser(hub.url)
    browser.login("alice", "hpchub-test-password")
    job_id = spawn_until_ready(hub, browser, "alice")["state"]["job_id"]
    assert_reachable_through_proxy(browser, "alice")
    return browser, job_id, start_kernel(browser, "alice")


def test_a_dropped_tunnel_takes_the_route_and_brings_it_back_with_the_kernel_alive(tunnel_hub):
    hub = tunnel_hub
    browser, job_id, kernel = spawned_with_a_kernel(hub)
    before = route_target(hub, "alice")

    # cut the job's SSH connection at the gateway's end, as a network failure would
    dropped = time.monotonic()
    killed = subprocess.run(["ss", "-K", "dst", NODE_ADDR, "sport", "=", f":{hub.gateway_port}"],
                            capture_output=True, text=True, timeout=10)
    assert killed.returncode == 0 and NODE_ADDR in killed.stdout, killed.stdout + killed.stderr

    wait_for(lambda: route_target(hub, "alice") is None, 5, "the route to go with the tunnel", 0.05)
    gone = time.monotonic() - dropped
    restored = wait_for(lambda: route_target(hub, "alice"), 10, "the route to come back", 0.05)
    back = time.monotonic() - dropped
    print(f"route removed {gone:.2f} s and restored {back:.2f} s after the connection was cut "
          f"({before} -> {restored})")
    assert back < 5, f"the tunnel took {back:.1f} s to come back"

    kernels = browser.get(f"/user/alice/api/kernels/{kernel}")
    assert kernels.status_code == 200 and kernels.json()["id"] == kernel, kernels.text
    assert_reachable_through_proxy(browser, "alice")
    assert squeue_state(job_id) == "RUNNING"
    assert "Tunnel of job" in hub.log() and "route restored" in hub.log()


def test_a_restarted_hub_takes_back_the_running_jobs_tunnel(tunnel_hub):
    hub = tunnel_hub
    browser, job_id, kernel = spawned_with_a_kernel(hub)

    hub.kill()
    hub.launch()
    target = wait_for(lambda: route_target(hub, "alice"), 30, "the route after the restart", 0.1)
    assert not target.endswith(":0")
    wait_for(lambda: browser.get(f"/user/alice/api/kernels/{kernel}").status_code == 200, 30,
             "the kernel through the new tunnel", 0.2)
    assert squeue_state(job_id) == "RUNNING"
    assert user_model(hub, "alice")["servers"][""]["state"]["job_id"] == job_id
