"""The user's journey end to end in a real browser (Playwright driving Debian's headless Chromium): an LDAP
user logs in, picks a profile in the spawn form and changes cores and walltime, watches the pending page
(job id, queued/running, the node), gets JupyterLab from a Slurm job on n1 (a node the hub cannot reach)
through the proxy and the job's SSH tunnel, runs a notebook cell whose output matches the job ledger, stops
the server from the hub's home page (the job leaves the queue), and an admin finds the user in the admin
panel. Each step's screenshot goes to the test's folder (its path is printed). The same journey over HTTP
only (requests and the kernel's websocket) runs on Grid Engine."""
from __future__ import annotations

import asyncio
import os
import re
import socket
import subprocess
from pathlib import Path

import pytest

from browser_journey import CHROMIUM, CHROMIUM_ARGS, Steps, progress_events, read_form, require_browser, \
    run_cell, wait_until
from hubtools import Browser, Hub, free_port, start_hub, user_model
from test_e2e_hub import ACTIVE_SLURM_STATES, ledger_rows, squeue_state
from test_e2e_profiles import ledger_requests, sge_listed
from test_ldap import A as LDAP_SERVER, BASE, CA, PASSWORDS, READER_DN, READER_PW, directory  # noqa: F401
from test_netns_node import HOST_ADDR, NS_PATH, netns_node  # noqa: F401 (fixture)

LAB_TIMEOUT_S = 90          # step 4: job start, tunnel, server start and JupyterLab's first paint
SERVER_START_TIMEOUT_S = 60  # the hub gives up on a server (a broken tunnel) after this, before step 4 does
# what the notebook cell prints, on each scheduler
SLURM_CELL = ("import os, socket; print(f\"JOB={os.environ['SLURM_JOB_ID']} NODE={os.environ['SLURMD_NODENAME']} "
              "CPUS={os.environ.get('SLURM_CPUS_PER_TASK')} HOST={socket.gethostname()} "
              "NETNS={os.stat('/proc/self/ns/net').st_ino}\")")
SGE_CELL = ("import os, socket; print(f\"JOB={os.environ['JOB_ID']} SLOTS={os.environ['NSLOTS']} "
            "HOST={socket.gethostname()}\")")


def journey_config(gateway: str, notebook_dir: Path) -> str:
    """LDAP logins (bob is an admin), a Slurm cluster whose jobs dial back through reverse tunnels, a Grid
    Engine cluster reached directly, and three profiles."""
    return f"""
c.JupyterHub.authenticator_class = "ldap"
c.LDAPAuthenticator.server_urls = [{LDAP_SERVER!r}]
c.LDAPAuthenticator.ca_file = {CA!r}
c.LDAPAuthenticator.user_search_base = "ou=people,{BASE}"
c.LDAPAuthenticator.search_bind_dn = {READER_DN!r}
c.LDAPAuthenticator.search_bind_password = {READER_PW!r}
c.LDAPAuthenticator.group_search_base = "ou=groups,{BASE}"
c.LDAPAuthenticator.allowed_groups = {{"researchers", "hpc-users"}}
c.Authenticator.admin_users = {{"bob"}}

c.JupyterHub.spawner_class = "batchspawner.BatchSpawner"
c.Spawner.notebook_dir = {str(notebook_dir)!r}
c.BatchSpawner.server_start_timeout = {SERVER_START_TIMEOUT_S}
c.BatchSpawner.tunnel_gateway_ip = {HOST_ADDR!r}
c.BatchSpawner.clusters = {{
    "hpc": {{"display_name": "Slurm test cluster", "scheduler": "slurm",
             "tunnel": {{"mode": "reverse", "gateway": {gateway!r}}},
             "partitions": {{"debug": {{"max_walltime": "01:00:00"}},
                            "netns": {{"max_walltime": "01:00:00", "max_cores": 4}}}}}},
    "grid": {{"display_name": "Grid Engine test cluster", "scheduler": "sge", "default_queue": "all.q",
              "partitions": {{"all.q": {{"max_walltime": "01:00:00", "parallel_environments": ["smp"]}}}}}},
}}
c.BatchSpawner.profiles = [
    {{"name": "debug", "display_name": "Slurm debug partition", "cluster": "hpc", "partitions": ["debug"],
      "defaults": {{"cores": 1, "memory": "500M", "walltime": "00:10:00"}}, "user_editable": ["walltime"]}},
    {{"name": "n1", "display_name": "Slurm node n1 (through a tunnel)", "cluster": "hpc", "partitions": ["netns"],
      "defaults": {{"cores": 1, "memory": "500M", "walltime": "00:10:00"}},
      "user_editable": ["cores", "memory", "walltime"]}},
    {{"name": "grid", "display_name": "Grid Engine", "cluster": "grid",
      "defaults": {{"partition": "all.q", "cores": 1, "memory": "2G", "walltime": "00:10:00"}},
      "user_editable": ["cores", "walltime"]}},
]
"""


PROFILE_NAMES = {"debug": "Slurm debug partition", "n1": "Slurm node n1 (through a tunnel)", "grid": "Grid Engine"}


@pytest.fixture
def journey_hub(tmp_path: Path, shared_dir: Path, proxy_installed, slurm_cluster, sge_cluster,
                netns_node, directory, test_users):  # noqa: F811
    """A hub for the journey; the notebooks go to a directory the test removes (not alice's home)."""
    notebooks = shared_dir / "notebooks"
    notebooks.mkdir(mode=0o1777)
    notebooks.chmod(0o1777)
    hub = start_hub(tmp_path / "hub", journey_config(f"{HOST_ADDR}:{free_port()}", notebooks))
    hub.notebooks = notebooks
    yield hub
    hub.stop()


@pytest.fixture
def step_folder(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    """Where the steps' screenshots go: $HPCHUB_TEST_ARTIFACTS/TEST_NAME when set (pytest keeps only its
    last three temporary directories), else the test's temporary directory."""
    artifacts = os.environ.get("HPCHUB_TEST_ARTIFACTS")
    return Path(artifacts) / request.node.name if artifacts else tmp_path / "screenshots"


def ledger_row(hub: Hub, user: str, job_id: str) -> dict:
    rows = [row for row in ledger_rows(hub, user) if row["job_id"] == job_id]
    assert rows, f"job {job_id} is not in the ledger ({ledger_rows(hub, user)})"
    return rows[0]


def route_target(hub: Hub, user: str) -> str | None:
    route = hub.api("GET", "/proxy").json().get(f"/user/{user}/")
    return route["target"] if route else None


def slurm_job(job_id: str) -> str:
    return subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True, timeout=10).stdout


# --- in a browser, on Slurm through the tunnel ------------------------------------------------------

# reports each line the pending page adds to its event log, as the page shows it
PROGRESS_OBSERVER = """
document.addEventListener("DOMContentLoaded", () => {
  const log = document.getElementById("progress-log");
  if (!log) { return; }
  new MutationObserver((records) => {
    for (const record of records) {
      for (const node of record.addedNodes) { window.hpchubProgress(node.textContent.trim()); }
    }
  }).observe(log, {childList: true});
});
"""


def test_browser_journey_on_a_tunnelled_slurm_node(journey_hub, step_folder):
    require_browser()
    from playwright.sync_api import sync_playwright

    hub = journey_hub
    steps = Steps(hub, step_folder)
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            _browser_journey(hub, steps, chromium)
        finally:
            chromium.close()
    print(f"browser journey: {steps.report()}")


def _browser_journey(hub: Hub, steps: Steps, chromium) -> None:
    alice = chromium.new_context(viewport={"width": 1280, "height": 900})
    shown: list[str] = []
    alice.expose_binding("hpchubProgress", lambda source, text: shown.append(text))
    alice.add_init_script(PROGRESS_OBSERVER)
    page = steps.page = alice.new_page()
    page.set_default_timeout(30_000)

    with steps.step(1, "log in as alice through the login page"):
        log_in(page, hub, "alice")

    with steps.step(2, "choose the n1 profile, change cores and walltime"):
        page.goto(f"{hub.url}/hub/spawn")
        for name, display in PROFILE_NAMES.items():
            label = page.locator(f'label[for="hpchub-profile-{name}"]')
            assert label.is_visible() and display in label.inner_text(), \
                f"the spawn form does not show the profile {display!r}"
        page.check("#hpchub-profile-n1")
        section = page.locator('[data-profile-section="n1"]')
        assert section.is_visible(), "choosing n1 did not show its fields"
        if not section.locator("details").evaluate("d => d.open"):
            section.locator("summary").click()
        page.fill("#hpchub-n1-cores", "2")
        page.fill("#hpchub-n1-walltime", "00:20:00")
        preview = page.locator("#hpchub-preview")
        if not wait_until(lambda: all(line in preview.inner_text() for line in
                                      ("#SBATCH --partition=netns", "#SBATCH --cpus-per-task=2",
                                       "#SBATCH --time=0-00:20:00")), 15):
            raise AssertionError(f"the script preview does not follow the form: {preview.inner_text()[:800]}")

    with steps.step(3, "the pending page shows the job id, queued/running and the node"):
        page.click('#spawn_form button[type="submit"]')
        page.wait_for_url(re.compile(r"/hub/spawn-pending/alice"))

        def seen_running() -> bool:
            page.wait_for_timeout(200)      # lets the page's reports (the binding) arrive
            return any(" is running on " in text or "failed" in text.lower() for text in shown) \
                or "/spawn-pending/" not in page.url
        if not wait_until(seen_running, 60, 0):
            raise AssertionError(f"no 'running' message within 60 s; the page's event log: {shown}")
        if "/spawn-pending/" in page.url:
            page.evaluate("() => { const d = document.getElementById('progress-details'); if (d) d.open = true; }")
        submitted = next((m for text in shown if (m := re.search(r"Submitted batch job (\d+)", text))), None)
        assert submitted, f"the pending page never showed the job id; its event log: {shown}"
        job_id = submitted.group(1)
        assert any(f"Job {job_id} is running on n1" in text for text in shown), \
            f"the pending page never said job {job_id} runs on n1; its event log: {shown}"
        queued = [text for text in shown if "queued" in text]
        print(f"step 3: job {job_id}; the page showed {len(shown)} messages ({len(queued)} queued): {shown}")

    with steps.step(4, "JupyterLab loads through the proxy and the SSH tunnel"):
        wait_for_lab(page, hub, "alice", shown)
        state = user_model(hub, "alice")["servers"][""]["state"]
        assert (state["job_id"], state["job_host"]) == (job_id, "n1"), f"the hub's server is {state}"
        target = route_target(hub, "alice")
        # the route leads to the tunnel's loopback end on the hub, not to the node
        assert target and re.fullmatch(r"http://127\.0\.0\.1:\d+", target), f"the proxy routes alice to {target}"

    with steps.step(5, "a notebook cell prints the job id, node and host, matching the ledger"):
        page.locator('.jp-LauncherCard[data-category="Notebook"]').first.click()
        editor = page.locator(".jp-NotebookPanel:visible .jp-Cell .cm-content").first
        editor.click()
        # a cell run before the kernel is connected is dropped: wait for the kernel as the status bar shows it
        page.get_by_text(re.compile(r"Python 3 \(ipykernel\) \| Idle")).first.wait_for(timeout=60_000)
        page.keyboard.insert_text(SLURM_CELL)
        page.keyboard.press("Shift+Enter")
        output = page.locator(".jp-NotebookPanel:visible .jp-OutputArea-output").first
        output.wait_for(timeout=60_000)
        printed = re.search(r"JOB=(\S+) NODE=(\S+) CPUS=(\S+) HOST=(\S+) NETNS=(\d+)", output.inner_text())
        assert printed, f"the cell's output is not what it prints: {output.inner_text()!r}"
        row = ledger_row(hub, "alice", job_id)
        assert (printed[1], printed[2]) == (row["job_id"], row["node"]) == (job_id, "n1"), \
            f"the cell printed job {printed[1]} on {printed[2]}; the ledger says job {row['job_id']} on {row['node']}"
        assert printed[3] == "2", f"the job has {printed[3]} CPUs per task, not the 2 chosen in the form"
        assert printed[4] == socket.gethostname(), f"host {printed[4]}: n1 is a namespace of this host"
        assert int(printed[5]) == os.stat(NS_PATH).st_ino, "the kernel does not run in n1's network namespace"
        assert "TimeLimit=00:20:00" in slurm_job(job_id), f"walltime not as chosen: {slurm_job(job_id)}"
        assert list(hub.notebooks.glob("*.ipynb")), f"no notebook was saved in {hub.notebooks}"

    with steps.step(6, "stop the server from the home page; the job leaves the queue"):
        page.goto(f"{hub.url}/hub/home")
        jobs = page.locator("#hpchub-jobs")
        assert job_id in jobs.inner_text() and "n1" in jobs.inner_text(), \
            f"the home page does not list job {job_id} on n1: {jobs.inner_text()!r}"
        steps.screenshot("06-home-before-stop")
        page.click("#stop")
        page.locator("#start", has_text="Start My Server").wait_for()
        page.reload()
        assert not page.locator("#stop").count() and not page.locator("#hpchub-jobs").count(), \
            f"after the stop the home page still offers Stop or lists a job: {page.inner_text('body')!r}"
        if not wait_until(lambda: squeue_state(job_id) not in ACTIVE_SLURM_STATES, 30):
            raise AssertionError(f"job {job_id} is still {squeue_state(job_id)} 30 s after the stop")
        if not wait_until(lambda: ledger_row(hub, "alice", job_id)["state"] == "CANCELLED", 10):
            raise AssertionError(f"the ledger says job {job_id} is {ledger_row(hub, 'alice', job_id)['state']}, "
                                 "not CANCELLED")

    bob = chromium.new_context(viewport={"width": 1280, "height": 900})
    page = steps.page = bob.new_page()
    page.set_default_timeout(30_000)
    with steps.step(7, "bob, an admin, sees alice in the admin panel"):
        log_in(page, hub, "bob")
        page.goto(f"{hub.url}/hub/admin")
        row = page.locator('[data-testid="user-row-name"]', has_text="alice")
        row.first.wait_for()
        assert user_model(hub, "bob")["admin"], "bob is not an admin"


def log_in(page, hub: Hub, user: str) -> None:
    page.goto(f"{hub.url}/hub/login")
    page.fill("#username_input", user)
    page.fill("#password_input", PASSWORDS[user])
    page.click("#login_submit")
    page.wait_for_load_state()
    if "/hub/login" in page.url:
        error = page.locator(".login_error")
        raise AssertionError(f"the login page refused {user}: "
                             f"{error.inner_text() if error.count() else page.inner_text('body')[:500]}")
    # the hub's session cookie names the user
    who = page.evaluate("() => fetch(jhdata.base_url + 'api/user', {headers: {'X-XSRFToken': jhdata.xsrf_token}})"
                        ".then(r => r.json())")
    assert who.get("name") == user, f"logged in as {who}, not {user}"


def wait_for_lab(page, hub: Hub, user: str, shown: list[str]) -> None:
    """JupyterLab's shell and launcher, or an AssertionError saying why not (the spawn failed, or what the
    page showed when time ran out)."""
    lab = page.locator(".jp-LabShell .jp-Launcher")

    def outcome() -> str | None:
        page.wait_for_timeout(250)
        if f"/user/{user}/lab" in page.url and lab.first.is_visible():
            return "lab"
        if page.locator("#progress-bar.bg-danger").count():
            return "failed"
        return None
    result = wait_until(outcome, LAB_TIMEOUT_S, 0)
    if result == "failed":
        raise AssertionError(f"JupyterLab did not load through the tunnel: the spawn failed; the pending page "
                             f"shows: {page.inner_text('#progress-message')!r}; its event log: {shown}")
    if result != "lab":
        raise AssertionError(f"JupyterLab did not load through the tunnel within {LAB_TIMEOUT_S} s; the page "
                             f"is {page.url}; the pending page's event log: {shown}")


# --- over HTTP only, on Grid Engine -------------------------------------------------------------

def test_http_journey_on_grid_engine(journey_hub):
    hub = journey_hub
    steps = Steps(hub)
    alice = Browser(hub.url)

    with steps.step(1, "log in as alice through the login form"):
        alice.login("alice", PASSWORDS["alice"])
        assert alice.api("GET", "/user").json()["name"] == "alice"

    with steps.step(2, "the form shows the profiles; choose grid, change cores and walltime"):
        form_page = alice.get("/hub/spawn")
        assert form_page.status_code == 200, form_page.status_code
        form = read_form(form_page.text)
        assert form.profiles == list(PROFILE_NAMES), f"the form offers {form.profiles}"
        for display in PROFILE_NAMES.values():
            assert display in form_page.text, f"the form does not show {display!r}"
        posted = {"_xsrf": alice.xsrf("/hub/"), "profile": "grid",
                  **{k: v for k, v in form.values.items() if k.startswith("grid.")},
                  "grid.cores": "2", "grid.walltime": "00:15:00"}
        response = alice.session.post(f"{hub.url}/hub/spawn/alice", data=posted, timeout=60, allow_redirects=False)
        assert response.status_code == 302 and "/hub/spawn-pending/alice" in response.headers["Location"], \
            f"the form post answered {response.status_code}: {response.text[-1000:]}"

    with steps.step(3, "the progress stream shows the job id and the node"):
        events = progress_events(alice, "alice", 90)
        messages = [event.get("message", "") for event in events]
        assert events and events[-1].get("ready"), f"the spawn did not become ready; progress: {messages}"
        submitted = next((m for text in messages if (m := re.search(r"Submitted batch job (\d+)", text))), None)
        assert submitted, f"no job id in the progress messages: {messages}"
        job_id = submitted.group(1)
        node = user_model(hub, "alice")["servers"][""]["state"]["job_host"]
        assert any(f"Job {job_id} is running on {node}" in text for text in messages), \
            f"no 'running on {node}' message: {messages}"

    with steps.step(4, "JupyterLab answers through the proxy"):
        lab = alice.get("/user/alice/lab")      # OAuth with the hub happens in the redirects
        assert lab.status_code == 200 and "JupyterLab" in lab.text, f"/user/alice/lab: {lab.status_code} {lab.url}"

    with steps.step(5, "a notebook cell prints the job id and host, matching the ledger"):
        headers = {"X-XSRFToken": alice.xsrf("/user/alice/")}
        notebook = alice.session.post(f"{hub.url}/user/alice/api/contents", json={"type": "notebook"},
                                      headers=headers, timeout=30)
        assert notebook.status_code == 201, f"creating a notebook: {notebook.status_code} {notebook.text}"
        session = alice.session.post(f"{hub.url}/user/alice/api/sessions", headers=headers, timeout=60, json={
            "path": notebook.json()["path"], "type": "notebook", "kernel": {"name": "python3"}})
        assert session.status_code == 201, f"starting its kernel: {session.status_code} {session.text}"
        out = asyncio.run(run_cell(alice, "alice", session.json()["kernel"]["id"], SGE_CELL))
        printed = re.search(r"JOB=(\S+) SLOTS=(\S+) HOST=(\S+)", out)
        assert printed, f"the cell printed {out!r}"
        row = ledger_row(hub, "alice", job_id)
        assert (printed[1], printed[3]) == (row["job_id"], row["node"]), \
            f"the cell printed job {printed[1]} on {printed[3]}; the ledger says job {row['job_id']} on {row['node']}"
        assert printed[2] == "2", f"the job has {printed[2]} slots, not the 2 chosen in the form"
        [request] = [r for r in ledger_requests(hub, "alice") if r["tag"] == row["tag"]]
        assert (request["cores"], request["walltime_s"], request["cluster"]) == (2, 900, "grid"), request

    with steps.step(6, "stop the server as the home page does; the job leaves the queue"):
        home = alice.get("/hub/home")
        assert 'id="stop"' in home.text and f"<td>{job_id}</td>" in home.text, \
            f"the home page has no Stop button or does not list job {job_id}"
        assert alice.api("DELETE", "/users/alice/server").status_code in (202, 204)
        if not wait_until(lambda: not sge_listed(job_id), 30):
            raise AssertionError(f"job {job_id} is still in qstat 30 s after the stop")
        if not wait_until(lambda: ledger_row(hub, "alice", job_id)["state"] == "CANCELLED", 10):
            raise AssertionError(f"the ledger says job {job_id} is {ledger_row(hub, 'alice', job_id)['state']}, "
                                 "not CANCELLED")

    with steps.step(7, "bob, an admin, sees alice through the admin panel's API; alice may not"):
        assert alice.get("/hub/admin").status_code == 403, "alice, not an admin, may open the admin panel"
        bob = Browser(hub.url)
        bob.login("bob", PASSWORDS["bob"])
        assert bob.get("/hub/admin").status_code == 200, "bob cannot open the admin panel"
        users = bob.api("GET", "/users")
        assert users.status_code == 200 and "alice" in [u["name"] for u in users.json()], users.text[:500]
    print(f"HTTP journey: {steps.report()}")
