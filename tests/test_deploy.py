"""Production deployment on real services: the hub serving HTTPS itself from the TOML file's certificate,
and the example nginx site (deploy/nginx/hpchub.conf, rendered with the test's ports and paths) in front of a
real hub: HTTP redirected to HTTPS, login, a Slurm server, and code run in a kernel over the WebSocket."""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import requests

from conftest import IN_CI, require_service
from hubtools import (Browser, HUB_BIN, Hub, _hub_env, assert_reachable_through_proxy, execute_request, free_port,
                      hub_config, kernel_channels, spawn_until_ready, user_model, wait_for)
from test_e2e_hub import LOGIN, PASSWORD, hub_factory, squeue_state  # noqa: F401 (fixture)

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
NGINX_SITE = DEPLOY / "nginx" / "hpchub.conf"


@pytest.fixture
def certificate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key (PEM), the one certificate `requests` trusts."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(cert))     # it wins over a session's `verify`
    return cert, key


@pytest.fixture(scope="session")
def nginx_installed() -> str:
    path = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if Path(p).exists()), None)
    require_service("nginx", path is not None, "install Debian's nginx (scripts/setup-test-env.sh does)")
    return path


def render_site(*, http_port: int, https_port: int, hub_port: int, cert: Path, key: Path) -> str:
    """deploy/nginx/hpchub.conf with the test's ports and files: every example value replaced, each exactly
    where the example has it, so that the test runs the example and nothing else."""
    text = NGINX_SITE.read_text()
    replacements = [
        ("listen 80;", f"listen 127.0.0.1:{http_port};", 1),
        ("listen 443 ssl http2;", f"listen 127.0.0.1:{https_port} ssl http2;", 1),
        ("return 301 https://$host$request_uri;", f"return 301 https://$host:{https_port}$request_uri;", 1),
        ("server_name hub.example.org;", "server_name 127.0.0.1;", 2),
        ("/etc/hpchub/tls/fullchain.pem", str(cert), 1),
        ("/etc/hpchub/tls/privkey.pem", str(key), 1),
        ("proxy_pass http://127.0.0.1:8000;", f"proxy_pass http://127.0.0.1:{hub_port};", 1),
    ]
    for example, value, count in replacements:
        assert text.count(example) == count, f"{NGINX_SITE} no longer has {example!r} {count} time(s)"
        text = text.replace(example, value)
    return text


class Nginx:
    """A private nginx (its own prefix, pid, logs and temp files) running the rendered site."""

    def __init__(self, binary: str, prefix: Path, site: str):
        prefix.mkdir()
        (prefix / "logs").mkdir()
        (prefix / "hpchub.conf").write_text(site)
        self.conf = prefix / "nginx.conf"
        self.conf.write_text(f"""
pid {prefix}/nginx.pid;
error_log {prefix}/logs/error.log info;
worker_processes 1;
events {{ worker_connections 256; }}
http {{
    access_log {prefix}/logs/access.log;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    include {prefix}/hpchub.conf;
}}
""")
        self.prefix = prefix
        checked = subprocess.run([binary, "-t", "-c", str(self.conf), "-p", str(prefix)], capture_output=True,
                                 text=True, timeout=30)
        assert checked.returncode == 0, checked.stderr
        self.process = subprocess.Popen([binary, "-c", str(self.conf), "-p", str(prefix), "-g", "daemon off;"],
                                        stdout=subprocess.DEVNULL, stderr=open(prefix / "logs" / "stderr", "wb"))

    def log(self) -> str:
        return "".join(p.read_text(errors="replace") for p in sorted((self.prefix / "logs").iterdir()))

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()        # SIGTERM: nginx's fast shutdown
            self.process.wait(timeout=20)


@pytest.fixture
def nginx_factory(tmp_path: Path, nginx_installed: str):
    started: list[Nginx] = []

    def make(site: str, https_port: int) -> Nginx:
        nginx = Nginx(nginx_installed, tmp_path / f"nginx{len(started)}", site)
        started.append(nginx)
        wait_for(lambda: _listening(https_port, nginx), 20, "nginx to listen")
        return nginx

    yield make
    for nginx in started:
        nginx.stop()


def _listening(port: int, nginx: Nginx) -> bool:
    if nginx.process.poll() is not None:
        raise AssertionError(f"nginx exited with {nginx.process.returncode}:\n{nginx.log()}")
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except OSError:
        return False
    return True


async def execute(base_url: str, browser: Browser, user: str, kernel_id: str, code: str, cafile: Path) -> str:
    """Run `code` in the kernel over its WebSocket (wss through `base_url`); return what it printed."""
    conn = await kernel_channels(base_url, browser, user, kernel_id, ca_certs=str(cafile))
    msg_id, message = execute_request(user, code)
    conn.write_message(message)
    printed = []
    try:
        while True:
            raw = await asyncio.wait_for(conn.read_message(), 60)
            assert raw is not None, "the kernel's WebSocket closed"
            message = json.loads(raw)
            if message["parent_header"].get("msg_id") != msg_id:
                continue
            if message["msg_type"] == "stream":
                printed.append(message["content"]["text"])
            elif message["msg_type"] == "error":
                raise AssertionError(f"the code failed: {message['content']}")
            elif message["msg_type"] == "status" and message["content"]["execution_state"] == "idle":
                return "".join(printed)
    finally:
        conn.close()


def test_nginx_example_site_fronts_the_hub_with_tls_and_kernel_websockets(hub_factory, nginx_factory, certificate,
                                                                          slurm_cluster, test_users):
    cert, key = certificate
    hub = hub_factory(LOGIN + 'c.JupyterHub.spawner_class = "slurm"\nc.SlurmSpawner.req_partition = "debug"\n'
                      'c.HpcHub.cull_idle_timeout = 0\n')
    http_port, https_port = free_port(), free_port()
    hub_port = int(hub.url.rsplit(":", 1)[1])
    nginx_factory(render_site(http_port=http_port, https_port=https_port, hub_port=hub_port, cert=cert, key=key),
                  https_port)
    public = f"https://127.0.0.1:{https_port}"

    # plain HTTP answers only with a redirect to the same page over HTTPS
    plain = requests.get(f"http://127.0.0.1:{http_port}/hub/login?next=%2Fhub%2Fhome", allow_redirects=False,
                         timeout=10)
    assert plain.status_code == 301 and plain.headers["Location"] == f"{public}/hub/login?next=%2Fhub%2Fhome"
    followed = requests.get(f"http://127.0.0.1:{http_port}/hub/login", timeout=10)
    assert followed.status_code == 200 and followed.url == f"{public}/hub/login" and "_xsrf" in followed.text
    assert followed.headers["Strict-Transport-Security"].startswith("max-age=")

    browser = Browser(public)
    browser.login("alice", PASSWORD)
    # the hub knows the browser came over HTTPS (X-Scheme through configurable-http-proxy): secure cookies
    login_cookie = next(c for c in browser.session.cookies if c.name == "jupyterhub-hub-login")
    assert login_cookie.secure, "the hub set its login cookie without Secure: it thinks the request was plain HTTP"

    server = spawn_until_ready(hub, browser, "alice")
    assert squeue_state(server["state"]["job_id"]) == "RUNNING"
    assert_reachable_through_proxy(browser, "alice")      # OAuth with the hub, all through nginx
    kernel = browser.session.post(f"{public}/user/alice/api/kernels", json={"name": "python3"}, timeout=60,
                                  headers={"X-XSRFToken": browser.xsrf("/user/alice/")})
    assert kernel.status_code == 201, kernel.text
    started = time.monotonic()
    printed = asyncio.run(execute(public, browser, "alice", kernel.json()["id"], "print(6*7)", cert))
    assert printed == "42\n", printed
    print(f"print(6*7) through nginx's WebSocket: {time.monotonic() - started:.2f} s")

    assert browser.api("DELETE", "/users/alice/server").status_code in (202, 204)


def test_the_hub_serves_https_itself_from_the_toml_files_certificate(tmp_path, certificate, proxy_installed):
    cert, key = certificate
    port = free_port()
    toml = tmp_path / "hpchub.toml"
    toml.write_text(f'[hub]\nbind_url = "https://127.0.0.1:{port}/"\nssl_cert = "{cert}"\nssl_key = "{key}"\n'
                    f'data_dir = "{tmp_path / "data"}"\ncull_idle_timeout = 0\n')
    argv = [str(HUB_BIN), "-f", str(toml), f"--JupyterHub.hub_bind_url=http://127.0.0.1:{free_port()}",
            f"--ConfigurableHTTPProxy.api_url=http://127.0.0.1:{free_port()}"]
    hub = Hub(f"https://127.0.0.1:{port}", tmp_path, argv, _hub_env(), True, "")
    hub.launch()
    try:
        login = requests.get(f"{hub.url}/hub/login", timeout=10)
        assert login.status_code == 200 and "_xsrf" in login.text
        with pytest.raises(requests.ConnectionError):
            requests.get(f"http://127.0.0.1:{port}/hub/login", timeout=10)     # no plain HTTP on the TLS port
    finally:
        hub.stop()


# --- the systemd unit -------------------------------------------------------------------------------

UNIT = DEPLOY / "systemd" / "hpchub.service"
UNIT_SECTIONS = {"Unit", "Service", "Install"}


def render_unit(*, bin_dir: Path, toml: Path, data_dir: Path) -> str:
    """deploy/systemd/hpchub.service with this machine's hpchub and the test's files."""
    text = UNIT.read_text()
    for example, value in (("/opt/hpchub/bin/", f"{bin_dir}/"), ("/etc/hpchub/hpchub.toml", str(toml)),
                           ("/var/lib/hpchub", str(data_dir))):
        assert example in text, f"{UNIT} no longer has {example!r}"
        text = text.replace(example, value)
    return text


def unit_entries(text: str) -> list[tuple[str, str, str]]:
    """(section, key, value) of each setting; AssertionError on a line that is none of the unit file's
    forms (the syntax check where systemd-analyze is missing)."""
    entries, section = [], None
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped[0] in "#;":
            continue
        if stripped.startswith("["):
            assert stripped.endswith("]") and stripped[1:-1] in UNIT_SECTIONS, f"line {number}: {line}"
            section = stripped[1:-1]
            continue
        key, sep, value = stripped.partition("=")
        assert section and sep and key.isidentifier() and value.strip(), f"line {number}: {line}"
        entries.append((section, key, value.strip()))
    return entries


def test_the_systemd_unit_verifies(tmp_path):
    unit = tmp_path / "hpchub.service"
    unit.write_text(render_unit(bin_dir=HUB_BIN.parent, toml=tmp_path / "hpchub.toml", data_dir=tmp_path / "data"))
    settings = {(section, key): value for section, key, value in unit_entries(unit.read_text())}
    assert settings[("Service", "User")] == "hpchub" and settings[("Service", "Restart")] == "on-failure"
    assert settings[("Service", "ExecStart")] == f"{HUB_BIN} -f {tmp_path / 'hpchub.toml'}"
    assert settings[("Service", "NoNewPrivileges")] == "no", "sudo needs setuid: NoNewPrivileges must stay off"
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        require_service("systemd-analyze", not IN_CI, "install Debian's systemd (scripts/setup-test-env.sh does)")
        return      # outside CI: the syntax check above is what can be done
    verified = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert verified.returncode == 0 and not verified.stderr.strip(), verified.stderr


SLURM_TOML = """
[clusters.hpc]
scheduler = "slurm"

[profiles.small]
cluster = "hpc"
defaults = { partition = "debug", cores = 1, memory = "500M", walltime = "00:10:00" }
"""


def unit_command(unit_text: str, key: str) -> list[str]:
    [value] = [value for section, k, value in unit_entries(unit_text) if (section, k) == ("Service", key)]
    return value.split()


def unit_environment(unit_text: str) -> dict[str, str]:
    pairs = [value.partition("=") for section, key, value in unit_entries(unit_text) if key == "Environment"]
    return {name: value for name, _, value in pairs}


def test_the_units_command_stopped_as_systemd_does_leaves_the_job_running_and_adopts_it_again(
        tmp_path, proxy_installed, slurm_cluster, test_users):
    """The unit's ExecStartPre and ExecStart with a TOML file (a Slurm cluster); SIGTERM to the hub alone
    (KillMode=mixed); its proxy ends with it, the job keeps running, and the hub started again adopts it."""
    workdir, data = tmp_path / "hub", tmp_path / "hub" / "data"
    workdir.mkdir()
    toml = workdir / "hpchub.toml"
    toml.write_text(SLURM_TOML)
    token, port = uuid.uuid4().hex, free_port()
    beside = hub_config(LOGIN + "c.HpcHub.cull_idle_timeout = 0\n", port=port, service_token=token, data_dir=data)
    assert "c.JupyterHub.cleanup_servers = True\n" in beside
    (workdir / "jupyterhub_config.py").write_text(beside.replace("c.JupyterHub.cleanup_servers = True\n", ""))
    unit = render_unit(bin_dir=HUB_BIN.parent, toml=toml, data_dir=data)
    env = {**_hub_env(), **unit_environment(unit)}

    checked = subprocess.run(unit_command(unit, "ExecStartPre"), env=env, capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0 and "profile small: on hpc" in checked.stdout, checked.stderr
    hub = Hub(f"http://127.0.0.1:{port}", workdir, unit_command(unit, "ExecStart"), env, False, token)
    hub.launch()
    try:
        browser = Browser(hub.url)
        browser.login("alice", PASSWORD)
        job_id = spawn_until_ready(hub, browser, "alice")["state"]["job_id"]

        hub.process.send_signal(signal.SIGTERM)           # systemctl stop, KillMode=mixed
        hub.process.wait(timeout=60)                      # TimeoutStopSec
        wait_for(lambda: not _group_alive(hub.process.pid), 10, "the hub's proxy to end with it")
        assert squeue_state(job_id) == "RUNNING", "stopping the hub cancelled the job"

        hub.launch()                                      # systemctl start
        wait_for(lambda: browser.get("/user/alice/lab").status_code == 200, 60, "alice's server to answer again",
                 0.5)
        assert_reachable_through_proxy(browser, "alice")
        assert user_model(hub, "alice")["servers"][""]["state"]["job_id"] == job_id
        assert browser.api("DELETE", "/users/alice/server").status_code in (202, 204)
        wait_for(lambda: squeue_state(job_id) not in ("RUNNING", "COMPLETING"), 30, f"job {job_id} to end")
    finally:
        hub.stop()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True
