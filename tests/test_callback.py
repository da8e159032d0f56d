"""The one hub endpoint a job calls (direct mode: its server's port) takes exactly `{"port": <1-65535>}`, only
from the token of a server whose spawn is pending, once. Upstream batchspawner's handler set any spawner
attribute named in the body; here nothing a job sends can change what the hub runs or where it connects,
beyond that one port."""
from __future__ import annotations

import re
from pathlib import Path

import requests

from hubtools import Browser, wait_for
from test_e2e_hub import LOGIN, PASSWORD, hub_factory, saved_state  # noqa: F401 (fixture)


def post(hub_url: str, token: str, body) -> requests.Response:
    return requests.post(f"{hub_url}/hub/api/batchspawner", json=body, timeout=10,
                         headers={"Authorization": f"token {token}"})


def test_the_port_callback_takes_one_typed_field_from_the_pending_servers_token(hub_factory, slurm_cluster,
                                                                                test_users):
    hub = hub_factory(LOGIN + 'c.JupyterHub.spawner_class = "slurm"\n'
                      'c.SlurmSpawner.req_extra_directives = ["--begin=now+300"]\n')
    browser = Browser(hub.url)
    browser.login("alice", PASSWORD)
    # JupyterHub's XSRF protection is on: a cookie-authenticated POST without the token is refused
    forged = browser.session.post(f"{hub.url}/hub/api/users/alice/server", timeout=10)
    assert forged.status_code == 403 and "xsrf" in forged.text.lower(), forged.text
    assert browser.api("POST", "/users/alice/server").status_code == 202
    state = wait_for(lambda: saved_state(hub, "alice").get("job_env_file") and saved_state(hub, "alice"), 30,
                     "the job's environment file")
    token = re.search(r"^export JUPYTERHUB_API_TOKEN=(\S+)$", Path(state["job_env_file"]).read_text(),
                      re.M).group(1).strip("'")

    # anything but exactly {"port": int in range} is refused, and changes nothing
    for body in ({"port": 8080, "ip": "203.0.113.9"}, {"port": 8080, "cmd": ["/bin/sh"]}, {"port": "8080"},
                 {"port": True}, {"port": 0}, {"port": 70000}, {"ip": "203.0.113.9"}, [8080], "8080"):
        response = post(hub.url, token, body)
        assert response.status_code == 400, (body, response.status_code, response.text)
    # a token that is not a pending server's: the hub's service token, and no token at all
    assert post(hub.url, hub.service_token, {"port": 8080}).status_code == 403
    assert requests.post(f"{hub.url}/hub/api/batchspawner", json={"port": 8080}, timeout=10).status_code == 403

    assert post(hub.url, token, {"port": 8080}).status_code == 201
    assert post(hub.url, token, {"port": 9090}).status_code == 409, "a second report was taken"
    assert saved_state(hub, "alice").get("job_port", 0) == 0, "the port is taken only once the job runs"

    assert browser.api("DELETE", "/users/alice/server").status_code in (202, 204)
    # the token died with the server
    wait_for(lambda: post(hub.url, token, {"port": 8080}).status_code == 403, 30, "the token to be revoked")
