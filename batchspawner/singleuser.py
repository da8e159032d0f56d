"""`batchspawner-singleuser CMD [ARGS...]`: run inside the job, before the single-user server.

Direct mode: picks a free port on the node, tells the hub (POST /hub/api/batchspawner with the server's own
token), then execs CMD with JUPYTERHUB_SERVICE_URL pointing at that port.
Tunnel mode (started by the tunnel client, which sets HPCHUB_TUNNEL_LOCAL): the server listens where the
tunnel leads (a private Unix socket, or a loopback port), reaches the hub API through the tunnel's local
port (HPCHUB_HUB_API_LOCAL), and reports nothing: the hub learns of it from the gateway.
The job environment is this program's: its own bin directory goes first on PATH, so
`jupyterhub-singleuser` and kernels come from the same place.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
import urllib.error
import urllib.request
from urllib.parse import urlsplit, urlunsplit

REPORT_DEADLINE_S = 120.0
JUPYTER_DEFAULT_PORT = 8888


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def report_port(api_url: str, token: str, port: int, deadline_s: float = REPORT_DEADLINE_S) -> None:
    """POST the port to the hub, retrying with backoff while the hub is unreachable or restarting."""
    request = urllib.request.Request(
        api_url.rstrip("/") + "/batchspawner",
        data=json.dumps({"port": port}).encode(),
        headers={"Authorization": f"token {token}", "Content-Type": "application/json"},
        method="POST",
    )
    deadline = time.monotonic() + deadline_s
    delay = 0.2
    while True:
        try:
            with urllib.request.urlopen(request, timeout=10):
                return
        except urllib.error.HTTPError as err:
            if err.code < 500:
                raise SystemExit(f"batchspawner-singleuser: the hub refused the port ({err.code}: {err.read()[:200]!r})")
            failure = f"HTTP {err.code}"
        except OSError as err:
            failure = str(err)
        if time.monotonic() + delay > deadline:
            raise SystemExit(f"batchspawner-singleuser: cannot reach the hub at {api_url}: {failure}")
        time.sleep(delay)
        delay = min(delay * 2, 5.0)


def _with_netloc(url: str, netloc: str) -> str:
    return urlunsplit(urlsplit(url)._replace(scheme="http", netloc=netloc))


def tunnelled(args: list[str], local: str, hub_api: str | None) -> list[str]:
    """Set the environment for a server behind the tunnel; returns the command to exec."""
    if hub_api:
        for name in ("JUPYTERHUB_API_URL", "JUPYTERHUB_ACTIVITY_URL"):
            if os.environ.get(name):
                os.environ[name] = _with_netloc(os.environ[name], hub_api)
    service_url = os.environ["JUPYTERHUB_SERVICE_URL"]
    if local.startswith("/"):
        # jupyter-server takes --sock only with its default port (8888) configured: the port is not used
        os.environ["JUPYTERHUB_SERVICE_URL"] = _with_netloc(service_url, f"127.0.0.1:{JUPYTER_DEFAULT_PORT}")
        args = [*args, f"--ServerApp.sock={local}", "--ServerApp.sock_mode=0600"]
    else:
        os.environ["JUPYTERHUB_SERVICE_URL"] = _with_netloc(service_url, local)
    print(f"batchspawner-singleuser: starting {args[0]} on {local} (through the tunnel)", flush=True)
    return args


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if not args:
        raise SystemExit("usage: batchspawner-singleuser CMD [ARGS...]  (for example jupyterhub-singleuser)")
    bin_dir = os.path.dirname(os.path.abspath(sys.executable))
    os.environ["PATH"] = os.pathsep.join([bin_dir, os.environ.get("PATH", os.defpath)])
    # started in the background by the job script, which makes a shell ignore SIGINT and SIGQUIT: the
    # server and its kernels must get them back (interrupting a kernel is a SIGINT)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGQUIT, signal.SIG_DFL)

    local = os.environ.get("HPCHUB_TUNNEL_LOCAL")
    if local:
        args = tunnelled(args, local, os.environ.get("HPCHUB_HUB_API_LOCAL"))
        os.execvp(args[0], args)

    service_url = urlsplit(os.environ["JUPYTERHUB_SERVICE_URL"])
    host = service_url.hostname or "127.0.0.1"
    port = free_port(host)
    report_port(os.environ["JUPYTERHUB_API_URL"], os.environ["JUPYTERHUB_API_TOKEN"], port)
    netloc = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    os.environ["JUPYTERHUB_SERVICE_URL"] = urlunsplit(service_url._replace(netloc=netloc))
    print(f"batchspawner-singleuser: starting {args[0]} on {netloc}", flush=True)
    os.execvp(args[0], args)


if __name__ == "__main__":
    main()
