"""Profiles end to end on a real hub, real Slurm and real Grid Engine: the spawn form is built from the
admin's profiles and the partitions' live limits; a spawn through the form and one through the REST API give
the same validated request; the preview is the script that is submitted; bad options get a 400 naming the
field and submit nothing; one user runs a server on each cluster (named servers)."""
from __future__ import annotations

import json
import re
import sqlite3
import subprocess

from hubtools import Browser, Hub, assert_reachable_through_proxy, user_model, wait_for
from test_e2e_hub import LOGIN, PASSWORD, hub_factory, squeue_state  # noqa: F401 (fixture)

CATALOG = """
c.JupyterHub.spawner_class = "batchspawner.BatchSpawner"
c.JupyterHub.allow_named_servers = True
c.BatchSpawner.clusters = {
    "hpc": {"display_name": "Slurm test cluster", "scheduler": "slurm",
            "partitions": {"debug": {"max_walltime": "01:00:00", "max_cores": 4, "max_memory": "4G"},
                           "long": {"max_walltime": "02:00:00"}}},
    "grid": {"display_name": "Grid Engine test cluster", "scheduler": "sge", "default_queue": "all.q",
             "partitions": {"all.q": {"max_walltime": "01:00:00", "parallel_environments": ["smp"]}}},
}
c.BatchSpawner.profiles = [
    {"name": "small", "display_name": "Small", "cluster": "hpc", "partitions": ["debug"],
     "defaults": {"cores": 1, "memory": "500M", "walltime": "00:10:00"},
     "bounds": {"walltime": {"max": "00:30:00"}}, "user_editable": ["walltime", "memory"]},
    {"name": "standard", "display_name": "Standard", "cluster": "hpc", "partitions": ["debug", "long"],
     "defaults": {"partition": "debug", "cores": 1, "memory": "500M", "walltime": "00:10:00"},
     "bounds": {"cores": {"max": 2}}, "user_editable": ["partition", "cores", "memory", "walltime"]},
    {"name": "staff", "display_name": "Staff only", "cluster": "hpc", "groups": ["staff"],
     "defaults": {"cores": 2, "memory": "500M", "walltime": "00:10:00"}},
    {"name": "grid", "display_name": "Grid Engine", "cluster": "grid",
     "defaults": {"partition": "all.q", "cores": 1, "memory": "500M", "walltime": "00:10:00"},
     "user_editable": ["cores"]},
]
"""


def ledger_requests(hub: Hub, user: str) -> list[dict]:
    """The requests recorded for `user`'s jobs, in order ([] when the hub never recorded a job)."""
    path = hub.workdir / "data" / "hpchub_ledger.sqlite"
    if not path.exists():
        return []
    with sqlite3.connect(path) as db:
        if not db.execute("SELECT name FROM sqlite_master WHERE name = 'hpchub_jobs'").fetchall():
            return []
        rows = db.execute("SELECT request, cluster FROM hpchub_jobs WHERE user = ? ORDER BY id", (user,)).fetchall()
    return [{**json.loads(request), "cluster": cluster} for request, cluster in rows]


def slurm_script(job_id: str) -> str:
    return subprocess.run(["scontrol", "write", "batch_script", job_id, "-"], capture_output=True, text=True,
                          timeout=10).stdout


def server_ready(hub: Hub, user: str, name: str) -> dict:
    def ready():
        server = user_model(hub, user)["servers"].get(name)
        if server is None:
            raise AssertionError(f"the spawn of {user}/{name} failed:\n{hub.log()[-3000:]}")
        return server if server["ready"] else None
    return wait_for(ready, 120, f"{user}/{name} to be ready", 0.25)


def stop(browser: Browser, hub: Hub, user: str, name: str) -> None:
    path = f"/users/{user}/servers/{name}" if name else f"/users/{user}/server"
    assert browser.api("DELETE", path).status_code in (202, 204)
    wait_for(lambda: name not in user_model(hub, user)["servers"], 30, f"{user}/{name} to stop")


def test_form_and_rest_give_the_same_request_and_the_preview_is_the_script(hub_factory, slurm_cluster,
                                                                            sge_cluster, test_users):
    hub = hub_factory(LOGIN + CATALOG)
    browser = Browser(hub.url)
    browser.login("alice", PASSWORD)

    form = browser.get("/hub/spawn")
    assert form.status_code == 200
    for shown in ("Small", "Standard", "Grid Engine", "debug", "long"):
        assert shown in form.text, shown
    assert "Staff only" not in form.text and "staff" not in re.findall(r'value="([^"]+)"', form.text)

    options = {"profile": "standard", "partition": "debug", "cores": "2", "memory": "500M", "walltime": "00:20:00"}
    preview = browser.session.post(f"{hub.url}/hub/api/batchspawner/preview", json=options, timeout=30,
                                   headers={"X-XSRFToken": browser.xsrf("/hub/")})
    assert preview.status_code == 200, preview.text
    previewed = preview.json()["script"]
    assert "#SBATCH --cpus-per-task=2" in previewed and "#SBATCH --time=0-00:20:00" in previewed

    # through the form, as the browser posts it
    posted = {"_xsrf": browser.xsrf("/hub/"), "profile": "standard",
              **{f"standard.{k}": v for k, v in options.items() if k != "profile"}}
    response = browser.session.post(f"{hub.url}/hub/spawn/alice", data=posted, timeout=60, allow_redirects=False)
    assert response.status_code in (200, 302), response.text[-2000:]
    server = server_ready(hub, "alice", "")
    by_form = server["state"]
    submitted = slurm_script(by_form["job_id"])
    assert submitted == previewed.replace("preview", by_form["job_tag"]), "the preview is not the submitted script"
    assert_reachable_through_proxy(browser, "alice")
    stop(browser, hub, "alice", "")

    # through the REST API, with JSON types
    rest = browser.api("POST", "/users/alice/servers/rest",
                       json={"profile": "standard", "partition": "debug", "cores": 2, "memory": "500M",
                             "walltime": "00:20:00"})
    assert rest.status_code in (201, 202), rest.text
    by_rest = server_ready(hub, "alice", "rest")["state"]
    stop(browser, hub, "alice", "rest")

    form_request, rest_request = ledger_requests(hub, "alice")
    assert form_request["tag"] == by_form["job_tag"] and rest_request["tag"] == by_rest["job_tag"]
    assert {**form_request, "tag": ""} == {**rest_request, "tag": ""}
    assert form_request["cores"] == 2 and form_request["walltime_s"] == 1200 and form_request["cluster"] == "hpc"


REFUSED = [
    ({"profile": "small", "walltime": "05:00:00"}, "walltime"),                       # over the profile's bound
    ({"profile": "standard", "partition": "debug", "walltime": "02:00:00"}, "walltime"),  # over debug's cap
    ({"profile": "small", "colour": "blue"}, "colour"),                                 # unknown field
    ({"profile": "staff"}, "profile"),                                                  # not alice's
    ({"profile": "standard", "cores": True}, "cores"),                                  # wrong type
    ({"profile": "standard", "cores": "two"}, "cores"),
    ({"profile": "standard", "walltime": "00:10:00\n#SBATCH --qos=high"}, "walltime"),  # a line break
    ({"profile": "small", "partition": "long"}, "partition"),                           # not user-editable
    ({"profile": "grid", "extra_directives": ["-l exclusive"]}, "extra_directives"),    # admin only
]


def test_bad_options_get_400_naming_the_field_and_nothing_is_submitted(hub_factory, slurm_cluster, test_users):
    hub = hub_factory(LOGIN + CATALOG)
    browser = Browser(hub.url)
    browser.login("alice", PASSWORD)
    before = alices_jobs()
    for options, field in REFUSED:
        response = browser.api("POST", "/users/alice/server", json=options)
        assert response.status_code == 400, (options, response.text)
        message = response.json()["message"]
        assert message.startswith(f"{field}:"), (options, message)
        wait_for(lambda: not user_model(hub, "alice")["pending"], 10, "the refused spawn to be forgotten")
    assert ledger_requests(hub, "alice") == [], "a job was recorded for refused options"
    assert "" not in user_model(hub, "alice")["servers"]
    assert alices_jobs() <= before, f"new jobs of alice: {alices_jobs() - before}"


def alices_jobs() -> set[str]:
    """Ids of alice's jobs Slurm knows (jobs of earlier tests may still be completing)."""
    squeue = subprocess.run(["squeue", "-h", "-u", "alice", "-o", "%i"], capture_output=True, text=True, timeout=10)
    return set(squeue.stdout.split())


def sge_listed(job_id: str) -> bool:
    out = subprocess.run(["qstat", "-u", "*"], capture_output=True, text=True, timeout=30).stdout
    return any(line.split()[:1] == [job_id] for line in out.splitlines())


def test_one_user_runs_a_server_on_slurm_and_one_on_grid_engine(hub_factory, slurm_cluster, sge_cluster,
                                                                test_users):
    hub = hub_factory(LOGIN + CATALOG)
    browser = Browser(hub.url)
    browser.login("bob", PASSWORD)
    for name, profile in (("onslurm", "small"), ("onsge", "grid")):
        response = browser.api("POST", f"/users/bob/servers/{name}", json={"profile": profile})
        assert response.status_code in (201, 202), response.text
    on_slurm = server_ready(hub, "bob", "onslurm")["state"]
    on_sge = server_ready(hub, "bob", "onsge")["state"]
    assert (on_slurm["job_cluster"], on_sge["job_cluster"]) == ("hpc", "grid")
    assert squeue_state(on_slurm["job_id"]) == "RUNNING" and sge_listed(on_sge["job_id"])
    for name in ("onslurm", "onsge"):
        lab = browser.get(f"/user/bob/{name}/lab")          # OAuth with the hub happens in the redirects
        assert lab.status_code == 200 and "JupyterLab" in lab.text, (name, lab.status_code)
        status = browser.get(f"/user/bob/{name}/api/status")
        assert status.status_code == 200 and "started" in status.json(), (name, status.status_code)
    [slurm_row, sge_row] = ledger_requests(hub, "bob")
    assert (slurm_row["cluster"], sge_row["cluster"]) == ("hpc", "grid")
    for name in ("onslurm", "onsge"):
        stop(browser, hub, "bob", name)
    wait_for(lambda: not sge_listed(on_sge["job_id"]), 20, "the Grid Engine job to leave qstat")


def test_a_profiles_shared_folder_shows_its_files_and_refuses_writes(hub_factory, slurm_cluster, test_users,
                                                                      world):
    course = world / "course-material"
    course.mkdir()
    (course / "week1.ipynb").write_text('{"cells": [], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}')
    course.chmod(0o755)
    hub = hub_factory(LOGIN + CATALOG + f"""
c.BatchSpawner.profiles = c.BatchSpawner.profiles + [
    {{"name": "course", "display_name": "Course", "cluster": "hpc", "partitions": ["debug"],
      "defaults": {{"cores": 1, "memory": "500M", "walltime": "00:10:00"}},
      "shared_folders": [{{"path": {str(course)!r}, "name": "course", "read_only": True}}]}},
]
""")
    browser = Browser(hub.url)
    browser.login("alice", PASSWORD)
    assert browser.api("POST", "/users/alice/server", json={"profile": "course"}).status_code in (201, 202)
    server_ready(hub, "alice", "")
    assert_reachable_through_proxy(browser, "alice")
    listing = browser.get("/user/alice/api/contents/shared/course")
    assert listing.status_code == 200, listing.text
    assert [item["name"] for item in listing.json()["content"]] == ["week1.ipynb"]
    headers = {"X-XSRFToken": browser.xsrf("/user/alice/")}
    write = browser.session.put(f"{hub.url}/user/alice/api/contents/shared/course/mine.txt", headers=headers,
                                json={"type": "file", "format": "text", "content": "x"}, timeout=30)
    assert write.status_code == 403 and "read-only" in write.text, (write.status_code, write.text)
    delete = browser.session.delete(f"{hub.url}/user/alice/api/contents/shared/course/week1.ipynb",
                                    headers=headers, timeout=30)
    assert delete.status_code == 403 and (course / "week1.ipynb").exists()
    stop(browser, hub, "alice", "")
