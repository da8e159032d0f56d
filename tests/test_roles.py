"""Admin operations from the TOML file, on a real hub and real Slurm, through the REST API and the proxy: a
teacher ([roles.NAME]) starts, opens and stops the server of a member of their course group and is refused
for anyone else (403 opening the server; 404 from the REST API, which tells nobody about users they may not
see); an admin with hub.admin_access opens any server; an ordinary user is refused the same way."""
from __future__ import annotations

import html
import re
from pathlib import Path

import pytest
import requests

from hubtools import HUB_BIN, Browser, Hub, _hub_env, free_port, own_ports, wait_for
from test_e2e_hub import PASSWORD, squeue_state

ADMIN_PASSWORD = "hpchub-test-admin-password-of-32-characters"   # the shared-password authenticator's rule

TOML = """
[hub]
admin_users = ["dave"]
admin_access = true
allowed_users = ["alice", "bob", "carol", "dave"]
cull_idle_timeout = 0

[roles.course101-teachers]
description = "Teachers of course 101"
groups = ["teachers101"]
member_groups = ["course101"]

[clusters.hpc]
scheduler = "slurm"

[profiles.small]
cluster = "hpc"
defaults = { partition = "debug", cores = 1, memory = "500M", walltime = "00:10:00" }
"""


def beside(port: int, data_dir: Path) -> str:
    """The jupyterhub_config.py beside the TOML file: the test's ports, a shared password, the groups."""
    return own_ports(port, data_dir) + f"""c.JupyterHub.authenticator_class = "shared-password"
c.SharedPasswordAuthenticator.user_password = {PASSWORD!r}
c.SharedPasswordAuthenticator.admin_password = {ADMIN_PASSWORD!r}
c.JupyterHub.load_groups = {{"teachers101": {{"users": ["carol"]}}, "course101": {{"users": ["alice"]}}}}
"""


@pytest.fixture
def hub(tmp_path: Path, proxy_installed, slurm_cluster, test_users):
    port = free_port()
    (tmp_path / "hpchub.toml").write_text(TOML)
    (tmp_path / "jupyterhub_config.py").write_text(beside(port, tmp_path / "data"))
    hub = Hub(f"http://127.0.0.1:{port}", tmp_path, [str(HUB_BIN), "-f", str(tmp_path / "hpchub.toml")], _hub_env(),
              False, "")
    hub.launch()
    yield hub
    hub.stop()


def logged_in(hub: Hub, user: str) -> Browser:
    browser = Browser(hub.url)
    browser.login(user, ADMIN_PASSWORD if user == "dave" else PASSWORD)
    return browser


def open_server(browser: Browser, user: str) -> requests.Response:
    """Open `user`'s JupyterLab as a browser does: OAuth with the hub, confirming the hub's "Authorize
    access" page when it shows one (someone else's server)."""
    page = browser.get(f"/user/{user}/lab")
    if page.status_code == 200 and "/hub/api/oauth2/authorize" in page.url:
        fields = re.findall(r'<input type="hidden" name="(\w+)" value="([^"]*)"', page.text)
        assert ("_xsrf", browser.xsrf("/hub/")) in fields or any(k == "_xsrf" for k, _ in fields), page.text
        page = browser.session.post(page.url, data=[(k, html.unescape(v)) for k, v in fields], timeout=60)
    return page


def test_a_teacher_manages_the_servers_of_their_course_members_only(hub):
    teacher, member, other, admin = (logged_in(hub, u) for u in ("carol", "alice", "bob", "dave"))

    # carol sees her course's members only
    listed = teacher.api("GET", "/users")
    assert listed.status_code == 200 and [u["name"] for u in listed.json()] == ["alice"], listed.text
    # starts alice's server (it runs as alice, in alice's job)
    started = teacher.api("POST", "/users/alice/server")
    assert started.status_code in (201, 202), started.text

    def ready() -> dict | None:
        server = teacher.api("GET", "/users/alice").json()["servers"].get("")
        assert server is not None, f"alice's server failed:\n{hub.log()[-3000:]}"
        return server if server["ready"] else None
    wait_for(ready, 120, "alice's server to be ready", 0.5)
    job_id = admin.api("GET", "/users/alice").json()["servers"][""]["state"]["job_id"]
    assert squeue_state(job_id) == "RUNNING"

    # opens it: OAuth with the hub grants carol access to alice's server
    lab = open_server(teacher, "alice")
    assert lab.status_code == 200 and "JupyterLab" in lab.text, (lab.status_code, lab.url)
    status = teacher.get("/user/alice/api/status")
    assert status.status_code == 200 and "started" in status.json(), (status.status_code, status.url)
    assert open_server(admin, "alice").status_code == 200                # hub.admin_access
    assert admin.get("/user/alice/api/status").status_code == 200
    # bob, an ordinary user, may neither open nor stop it
    assert open_server(other, "alice").status_code == 403
    assert other.get("/user/alice/api/status").status_code == 403
    # (the REST API answers 404 to whoever may not even see the user: JupyterHub tells nobody who exists)
    assert other.api("DELETE", "/users/alice/server").status_code == 404
    assert other.api("POST", "/users/alice/server").status_code == 404
    assert other.api("GET", "/users/alice").status_code == 404
    # carol has no power over bob, who is not in her course
    assert teacher.api("POST", "/users/bob/server").status_code == 404
    assert other.api("POST", "/users/bob/server").status_code in (201, 202)
    wait_for(lambda: (other.api("GET", "/users/bob").json()["servers"].get("") or {}).get("ready"), 120,
             "bob's own server to be ready", 0.5)
    assert open_server(teacher, "bob").status_code == 403
    assert teacher.api("DELETE", "/users/bob/server").status_code == 404
    assert other.api("DELETE", "/users/bob/server").status_code in (202, 204)
    assert teacher.get("/hub/admin").status_code == 200                 # the admin page, showing alice only

    stopped = teacher.api("DELETE", "/users/alice/server")
    assert stopped.status_code in (202, 204), stopped.text
    wait_for(lambda: "" not in member.api("GET", "/users/alice").json()["servers"], 30, "alice's server to stop")
    wait_for(lambda: squeue_state(job_id) not in ("RUNNING", "COMPLETING"), 30, f"job {job_id} to leave the queue")


def test_roles_are_checked_and_become_jupyterhub_roles(tmp_path):
    from hpchub.config import check, load

    good = tmp_path / "good.toml"
    good.write_text('[roles.ta]\ngroups = ["teachers101"]\nusers = ["erin"]\nmember_groups = ["course101", "lab"]\n')
    [role] = load(str(good)).config.JupyterHub.load_roles
    assert role["groups"] == ["teachers101"] and role["users"] == ["erin"]
    assert set(role["scopes"]) == {"admin-ui", *(f"{scope}!group={group}" for group in ("course101", "lab") for scope
                                                  in ("list:users", "read:users", "read:servers", "servers",
                                                      "access:servers"))}
    assert "role ta: group teachers101, erin may start, stop and open the servers of the members of course101, lab" \
        in check(str(good))[1]

    bad = tmp_path / "bad.toml"
    bad.write_text('[roles.admin]\ngroups = ["x"]\nmember_groups = ["y"]\n'
                   '[roles.nobody]\nmember_groups = ["y"]\n'
                   '[roles.typo]\ngroups = ["x"]\nmember_group = ["y"]\n'
                   '[roles.empty]\ngroups = ["x"]\nmember_groups = []\n'
                   '[roles.spaces]\ngroups = ["a b"]\nmember_groups = ["y"]\n')
    status, report = check(str(bad))
    assert status == 1
    for expected in ('roles.admin = "admin": JupyterHub\'s or hpchub\'s own role',
                     "roles.nobody: nobody has this role",
                     'roles.typo.member_group: unknown key; did you mean "member_groups"?',
                     "roles.typo.member_groups: missing",
                     "roles.empty.member_groups = []: empty: the role would grant nothing",
                     "roles.spaces.groups"):
        assert expected in report, (expected, report)


def test_ldap_roles_turn_on_group_sync(tmp_path):
    from hpchub.config import load

    toml = tmp_path / "hpchub.toml"
    toml.write_text('[hub]\nauthenticator = "ldap"\n[ldap]\nserver_urls = ["ldap://127.0.0.1:389"]\n'
                    'bind_dn_templates = ["uid={username},ou=people,dc=example,dc=org"]\n'
                    'group_search_base = "ou=groups,dc=example,dc=org"\n'
                    '[roles.ta]\ngroups = ["teachers101"]\nmember_groups = ["course101"]\n')
    assert load(str(toml)).config.Authenticator.manage_groups is True
