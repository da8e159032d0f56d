"""Walltime and idleness on real Slurm: the time a job has left is shown (hub home page, inside JupyterLab)
and right within a minute; JupyterLab's plugin warns at the configured times; a job with a 3-minute limit is
signalled ahead of it and ends cleanly; an idle server is culled and its job leaves the queue, while one
running a long cell is not."""
from __future__ import annotations

import asyncio
import json
import re
import subprocess
import time
from datetime import datetime
from pathlib import Path


from hubtools import (Browser, assert_reachable_through_proxy, execute_request, kernel_channels, spawn_until_ready,
                      user_model, wait_for)
from test_e2e_hub import LOGIN, PASSWORD, hub_factory, squeue_state  # noqa: F401 (fixture)

PLUGIN = Path(__file__).resolve().parents[1] / "hpchub" / "labextension" / "static" / "remoteEntry.js"


def slurm_end(job_id: str) -> float:
    end = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%e"], capture_output=True, text=True,
                         timeout=10).stdout.strip()
    return datetime.fromisoformat(end).timestamp()      # local time, as squeue prints it


def job_record(job_id: str) -> str:
    return subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True, timeout=10).stdout


def test_walltime_left_is_shown_and_a_three_minute_job_ends_cleanly_before_its_limit(hub_factory, slurm_cluster,
                                                                                      test_users):
    hub = hub_factory(LOGIN + """
c.JupyterHub.spawner_class = "slurm"
c.SlurmSpawner.req_partition = "debug"
c.SlurmSpawner.req_runtime = "00:03:00"
c.BatchSpawner.walltime_warnings = [150, 100]
c.BatchSpawner.walltime_signal_lead = 60
c.HpcHub.cull_idle_timeout = 0
""")
    browser = Browser(hub.url)
    browser.login("alice", PASSWORD)
    server = spawn_until_ready(hub, browser, "alice")
    job_id = server["state"]["job_id"]
    assert_reachable_through_proxy(browser, "alice")
    assert "--signal=B:TERM@60" in subprocess.run(["scontrol", "write", "batch_script", job_id, "-"],
                                                  capture_output=True, text=True, timeout=10).stdout
    end = slurm_end(job_id)

    # inside JupyterLab: the server extension, and the plugin among the page's federated extensions
    info = browser.get("/user/alice/hpchub/walltime").json()
    assert abs(info["left_s"] - (end - time.time())) < 60, (info, end - time.time())
    assert info["warnings_s"] == [150, 100] and info["job_id"] == job_id
    lab = browser.get("/user/alice/lab").text
    assert '"name": "hpchub-walltime"' in lab or '"name":"hpchub-walltime"' in lab
    # on the hub's home page
    home = browser.get("/hub/home")
    [left] = re.findall(r'data-walltime-left-s="(\d+)"', home.text)
    assert abs(int(left) - (end - time.time())) < 60, (left, end - time.time())

    # Slurm signals the job a minute ahead (within its minute of resolution): the server shuts down cleanly,
    # the job completes before its limit and the hub sees the server gone
    wait_for(lambda: squeue_state(job_id) not in ("RUNNING", "COMPLETING"), 200, f"job {job_id} to end", 1)
    record = job_record(job_id)
    assert "JobState=COMPLETED" in record and "ExitCode=0:0" in record, record
    log = Path(re.search(r"StdOut=(\S+)", record).group(1)).read_text()
    assert "received signal 15, stopping" in log and "Shutting down" in log, log[-2000:]
    assert re.search(r"hpchub: job ended at \S+ with status 0", log), log[-500:]
    wait_for(lambda: "" not in user_model(hub, "alice")["servers"], 60, "the hub to see the server gone")


def test_the_jupyterlab_plugin_says_the_time_left_then_warns_at_each_time(tmp_path):
    """The plugin itself (hpchub/labextension), run by Node against a JupyterLab stand-in: the time left once
    when JupyterLab opens, then a warning at each warning time, each once."""
    driver = tmp_path / "drive.js"
    driver.write_text("""
const vm = require("vm"), fs = require("fs");
const answers = JSON.parse(process.argv[3]);
const notes = [];
let tick = null;
const window = {setInterval: (f) => { tick = f; }};
const settings = {baseUrl: "/user/alice/", fetch: async (url) => {
    if (url !== "/user/alice/hpchub/walltime") throw new Error("asked " + url);
    return {ok: true, json: async () => answers.shift()};
}};
const app = {serviceManager: {serverSettings: settings}, restored: Promise.resolve(),
             commands: {execute: async (id, args) => { notes.push([id, args.type, args.message]); }}};
vm.runInNewContext(fs.readFileSync(process.argv[2], "utf8"), {window, console, Promise, Date, Error});
(async () => {
    const plugin = (await window._JUPYTERLAB["hpchub-walltime"].get("./extension"))().default;
    plugin.activate(app);
    const settle = () => new Promise((r) => setTimeout(r, 20));
    await settle();
    while (answers.length) { tick(); await settle(); }
    console.log(JSON.stringify({id: plugin.id, notes}));
})();
""")
    end = "2026-11-22T12:00:00+00:00"
    answers = [{"left_s": left, "end": end, "warnings_s": [900, 300], "job_id": "42"}
               for left in (3000, 1800, 890, 880, 290, 100)]
    out = subprocess.run(["node", str(driver), str(PLUGIN), json.dumps(answers)], capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["id"] == "hpchub-walltime:plugin"
    kinds = [(command, kind) for command, kind, _ in result["notes"]]
    assert kinds == [("apputils:notify", "info"), ("apputils:notify", "warning"), ("apputils:notify", "warning")]
    messages = [message for _, _, message in result["notes"]]
    assert messages[0].startswith("Job 42 has 50 minutes of walltime left")
    assert messages[1].startswith("Job 42 ends in 15 minutes") and "save your work" in messages[1]
    assert messages[2].startswith("Job 42 ends in 5 minutes")


async def run_long_cell(browser: Browser, user: str, kernel_id: str) -> None:
    """Start a cell that sleeps ten minutes, printing nothing, and wait until the kernel says it is busy."""
    conn = await kernel_channels(browser.url, browser, user, kernel_id)
    msg_id, message = execute_request(user, "import time\ntime.sleep(600)")
    conn.write_message(message)
    while True:
        message = json.loads(await asyncio.wait_for(conn.read_message(), 30))
        if (message.get("msg_type") == "status" and message["parent_header"].get("msg_id") == msg_id
                and message["content"]["execution_state"] == "busy"):
            break
    conn.close()


def test_an_idle_server_is_culled_and_its_job_leaves_the_queue_but_a_long_cell_keeps_its_server(
        hub_factory, slurm_cluster, test_users):
    hub = hub_factory(LOGIN + """
c.JupyterHub.spawner_class = "slurm"
c.SlurmSpawner.req_partition = "debug"
c.HpcHub.cull_idle_timeout = 40
c.HpcHub.cull_every = 10
c.Spawner.environment = {"JUPYTERHUB_ACTIVITY_INTERVAL": "5", "HPCHUB_BUSY_KERNEL_INTERVAL": "5"}
""")
    idle, busy = Browser(hub.url), Browser(hub.url)
    idle.login("alice", PASSWORD)
    busy.login("bob", PASSWORD)
    idle_job = spawn_until_ready(hub, idle, "alice")["state"]["job_id"]
    busy_job = spawn_until_ready(hub, busy, "bob")["state"]["job_id"]
    assert_reachable_through_proxy(busy, "bob")
    started = busy.session.post(f"{hub.url}/user/bob/api/kernels", json={"name": "python3"}, timeout=60,
                                headers={"X-XSRFToken": busy.xsrf("/user/bob/")})
    assert started.status_code == 201, started.text
    asyncio.run(run_long_cell(busy, "bob", started.json()["id"]))
    culled_after = time.monotonic()

    wait_for(lambda: "" not in user_model(hub, "alice")["servers"], 120, "the idle server to be culled", 1)
    wait_for(lambda: squeue_state(idle_job) not in ("RUNNING", "COMPLETING", "PENDING"), 30,
             f"the culled server's job {idle_job} to leave the queue", 0.5)
    print(f"idle server culled {time.monotonic() - culled_after:.0f} s after the busy cell started")
    assert "hpchub-idle-culler" in hub.log() and "Culling server alice" in hub.log()
    # the busy server outlived the culler's timeout by far, and is still there
    time.sleep(max(0.0, culled_after + 70 - time.monotonic()))
    assert "" in user_model(hub, "bob")["servers"] and squeue_state(busy_job) == "RUNNING"
    assert "Culling server bob" not in hub.log()
