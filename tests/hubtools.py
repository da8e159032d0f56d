"""Run a real hpchub (JupyterHub + configurable-http-proxy) in a subprocess and drive it over HTTP like a
browser: log in with the form and its _xsrf token, call the REST API with the session cookie."""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import requests
from tornado.httpclient import HTTPRequest
from tornado.websocket import WebSocketClientConnection, websocket_connect

from helpers import wait_for  # also imported from here by test_e2e_hub

HUB_BIN = Path(sys.executable).with_name("hpchub")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Hub:
    url: str
    workdir: Path
    argv: list[str]
    env: dict[str, str]
    pipe_stdout: bool
    service_token: str
    process: subprocess.Popen | None = None

    @property
    def log_path(self) -> Path:
        return self.workdir / "hub.log"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def api(self, method: str, path: str, **kwargs) -> requests.Response:
        headers = {"Authorization": f"token {self.service_token}"}
        return requests.request(method, f"{self.url}/hub/api{path}", headers=headers, timeout=30, **kwargs)

    def launch(self, timeout: float = 60) -> None:
        """Start the hub process (again, with the same configuration) and wait until its API answers."""
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(self.argv, cwd=self.workdir, stdout=subprocess.PIPE if self.pipe_stdout
                                            else log, stderr=log, env=self.env, start_new_session=True)
        process = self.process

        def api_up() -> bool:
            if process.poll() is not None:
                raise AssertionError(f"hpchub exited with {process.returncode}:\n{self.log()[-4000:]}")
            try:
                return requests.get(f"{self.url}/hub/api/", timeout=2).status_code == 200
            except requests.RequestException:
                return False

        try:
            wait_for(api_up, timeout, "the hub's API")
        except BaseException:
            self.stop()
            raise

    def kill(self) -> None:
        """SIGKILL the hub and its proxy: nothing is cleaned up, as in a crash."""
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            # the whole session: runuser does not always pass SIGTERM on to the hub it started
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)


def own_ports(port: int, data_dir: Path) -> str:
    """The start of a test hub's jupyterhub_config.py: its own ports and data dir; its servers stop with it."""
    return f"""
c = get_config()  # noqa
c.JupyterHub.bind_url = "http://127.0.0.1:{port}"
c.JupyterHub.hub_bind_url = "http://127.0.0.1:{free_port()}"
c.ConfigurableHTTPProxy.api_url = "http://127.0.0.1:{free_port()}"
c.HpcHub.data_dir = {str(data_dir)!r}
c.JupyterHub.cleanup_servers = True
"""


def hub_config(extra: str, *, port: int, service_token: str, data_dir: Path) -> str:
    """A jupyterhub_config.py with its own ports and data dir, an admin service for the tests, plus `extra`."""
    return own_ports(port, data_dir) + f"""c.JupyterHub.services = [{{"name": "tester", "api_token": {service_token!r}}}]
c.JupyterHub.load_roles = [{{
    "name": "tester", "services": ["tester"],
    "scopes": ["admin:users", "admin:servers", "admin:server_state", "list:users", "read:users", "access:servers",
               "read:metrics", "proxy"],
}}]
c.Spawner.default_url = "/lab"
{extra}
"""


def start_hub(workdir: Path, extra_config: str | None, *, user: str | None = None, args: tuple[str, ...] = (),
              env: dict[str, str] | None = None, timeout: float = 60) -> Hub:
    """Start hpchub (as `user` via runuser when given) and wait until its API answers.

    With `extra_config` it runs `hpchub -f config` on its own ports with an admin service for the tests;
    with None it runs on the embedded default (no config file), plus `args`."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    token = secrets.token_hex(32)
    argv = [str(HUB_BIN), *args]
    if extra_config is not None:
        config = workdir / "jupyterhub_config.py"
        config.write_text(hub_config(extra_config, port=port, service_token=token, data_dir=workdir / "data"))
        argv += ["-f", str(config)]
    else:
        argv += [f"--port={port}", f"--JupyterHub.hub_bind_url=http://127.0.0.1:{free_port()}",
                 f"--ConfigurableHTTPProxy.api_url=http://127.0.0.1:{free_port()}"]
    if user:
        for path in workdir.iterdir():
            shutil.chown(path, user)
        shutil.chown(workdir, user)
        argv = ["runuser", "-u", user, "--", *argv]
    hub = Hub(f"http://127.0.0.1:{port}", workdir, argv, {**_hub_env(), **(env or {})}, extra_config is None, token)
    hub.launch(timeout)
    return hub


def _hub_env() -> dict[str, str]:
    keep = {k: v for k, v in os.environ.items() if k in ("LANG", "LC_ALL", "TZ")}
    return {**keep, "PATH": f"{Path(sys.executable).parent}:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"}


class Browser:
    """A requests session that logs in and uses the hub the way the web pages do."""

    def __init__(self, hub_url: str):
        self.url = hub_url
        self.session = requests.Session()

    def login(self, username: str, password: str) -> None:
        page = self.session.get(f"{self.url}/hub/login", timeout=10)
        page.raise_for_status()
        match = re.search(r'name="_xsrf" value="([^"]+)"', page.text)
        assert match, "no _xsrf token on the login page"
        response = self.session.post(
            f"{self.url}/hub/login",
            data={"username": username, "password": password, "_xsrf": match.group(1)},
            allow_redirects=False, timeout=10,
        )
        assert response.status_code == 302, f"login as {username} failed: {response.status_code}"

    def xsrf(self, path: str) -> str:
        """The _xsrf cookie for `path` (the hub and each server set their own)."""
        best = None
        for cookie in self.session.cookies:
            if cookie.name == "_xsrf" and path.startswith(cookie.path or "/"):
                if best is None or len(cookie.path or "") > len(best.path or ""):
                    best = cookie
        assert best is not None, f"no _xsrf cookie for {path}"
        return best.value

    def api(self, method: str, path: str, **kwargs) -> requests.Response:
        headers = {"X-XSRFToken": self.xsrf("/hub/")}
        return self.session.request(method, f"{self.url}/hub/api{path}", headers=headers, timeout=60, **kwargs)

    def get(self, path: str, **kwargs) -> requests.Response:
        return self.session.get(f"{self.url}{path}", timeout=60, **kwargs)


def user_model(hub: Hub, user: str) -> dict:
    response = hub.api("GET", f"/users/{user}")
    response.raise_for_status()
    return response.json()


def spawn_until_ready(hub: Hub, browser: Browser, user: str, timeout: float = 180) -> dict:
    """Start the user's default server as the user would; return the server model once ready."""
    response = browser.api("POST", f"/users/{user}/server")
    assert response.status_code in (201, 202), response.text

    def ready() -> dict | None:
        server = user_model(hub, user)["servers"].get("")
        if server is None:
            raise AssertionError(f"the spawn failed:\n{hub.log()[-3000:]}")
        return server if server["ready"] else None

    return wait_for(ready, timeout, f"{user}'s server to be ready", interval=0.25)


def assert_reachable_through_proxy(browser: Browser, user: str) -> None:
    lab = browser.get(f"/user/{user}/lab")  # OAuth with the hub happens in the redirects
    assert lab.status_code == 200 and "JupyterLab" in lab.text, (lab.status_code, lab.url)
    status = browser.get(f"/user/{user}/api/status")
    assert status.status_code == 200, status.text
    assert "started" in status.json()


def singleuser_processes(uid: int) -> list[tuple[int, dict[str, str]]]:
    """(pid, environment) of every jupyterhub-singleuser process of `uid` on this host."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if entry.stat().st_uid != uid:
                continue
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            if not any(arg.endswith(b"jupyterhub-singleuser") for arg in cmdline):
                continue
            raw = (entry / "environ").read_bytes()
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        env = dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)
        found.append((int(entry.name), env))
    return found


async def kernel_channels(base_url: str, browser: Browser, user: str, kernel_id: str,
                          ca_certs: str | None = None) -> WebSocketClientConnection:
    """The kernel's websocket as JupyterLab opens it (ws:// or wss:// for `base_url`), with the browser's
    cookies."""
    cookies = "; ".join(f"{c.name}={c.value}" for c in browser.session.cookies)
    url = re.sub(r"^http", "ws", base_url) + f"/user/{user}/api/kernels/{kernel_id}/channels"
    return await websocket_connect(HTTPRequest(url, headers={"Cookie": cookies}, ca_certs=ca_certs))


def execute_request(user: str, code: str) -> tuple[str, str]:
    """A Jupyter execute_request for `code` on the shell channel: (its msg_id, the message to send)."""
    msg_id = uuid.uuid4().hex
    return msg_id, json.dumps({
        "header": {"msg_id": msg_id, "username": user, "session": uuid.uuid4().hex, "msg_type": "execute_request",
                   "version": "5.3", "date": datetime.now().isoformat()},
        "parent_header": {}, "metadata": {}, "channel": "shell", "buffers": [],
        "content": {"code": code, "silent": False, "store_history": True, "user_expressions": {},
                    "allow_stdin": False, "stop_on_error": True},
    })
