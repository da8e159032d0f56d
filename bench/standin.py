#!/usr/bin/python3 -I
"""The light stand-in single-user server of hpchub's benchmarks: the same one for both stacks.

It does, for the hub, what `batchspawner-singleuser` + `jupyterhub-singleuser` do on the path the benchmarks
measure, and nothing else (no JupyterLab, no OAuth, no kernels), with Debian's Python and the standard
library only, so that a thousand of them fit on a 2-CPU machine:

1. listens on a free port (the OS picks it) at the address of $JUPYTERHUB_SERVICE_URL (the spawner's ip);
2. reports that port to the hub as both batchspawners expect: POST $JUPYTERHUB_API_URL/batchspawner with
   `{"port": N}` and `Authorization: token $JUPYTERHUB_API_TOKEN` (retried while the hub is unreachable);
3. answers every GET or HEAD with 200 and a JSON body naming the user and server and carrying its
   timestamps (epoch seconds, this host's clock): `job_start` (the first line of the batch script, from
   $HPCHUB_BENCH_JOB_START, which the job's prologue sets), `listening` and `reported`. The hub's
   readiness check (an HTTP GET at the server's URL) and the benchmark's requests through the proxy get it.

SIGTERM (scancel) ends it. It replaces the batchspawner-singleuser wrapper of each stack too: both wrappers
import JupyterHub (about a CPU-second per job), which would make a 200-user burst on 2 CPUs measure Python
imports instead of the hubs.
"""
import http.server
import json
import os
import signal
import sys
import time
import urllib.error
import urllib.request
from urllib.parse import urlsplit

REPORT_DEADLINE_S = 60.0


def report_port(port: int) -> None:
    request = urllib.request.Request(
        os.environ["JUPYTERHUB_API_URL"].rstrip("/") + "/batchspawner",
        data=json.dumps({"port": port}).encode(), method="POST",
        headers={"Authorization": f"token {os.environ['JUPYTERHUB_API_TOKEN']}", "Content-Type": "application/json"},
    )
    deadline, delay = time.monotonic() + REPORT_DEADLINE_S, 0.1
    while True:
        try:
            with urllib.request.urlopen(request, timeout=10):
                return
        except urllib.error.HTTPError as err:
            if err.code < 500:
                sys.exit(f"standin: the hub refused the port: {err.code} {err.read()[:200]!r}")
            failure = f"HTTP {err.code}"
        except OSError as err:
            failure = str(err)
        if time.monotonic() + delay > deadline:
            sys.exit(f"standin: cannot report the port to the hub: {failure}")
        time.sleep(delay)
        delay = min(delay * 2, 2.0)


class Handler(http.server.BaseHTTPRequestHandler):
    body = b"{}"

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(self.body)

    do_HEAD = do_GET

    def log_message(self, format: str, *args) -> None:   # no line per request in the job's output
        pass


def main() -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    job_start = float(os.environ.get("HPCHUB_BENCH_JOB_START") or "nan")
    service = urlsplit(os.environ["JUPYTERHUB_SERVICE_URL"])
    server = http.server.HTTPServer((service.hostname or "0.0.0.0", 0), Handler)
    listening = time.time()
    port = server.server_address[1]
    report_port(port)
    reported = time.time()
    Handler.body = json.dumps({
        "standin": True, "user": os.environ.get("JUPYTERHUB_USER"),
        "server": os.environ.get("JUPYTERHUB_SERVER_NAME", ""), "port": port,
        "job_start": job_start, "listening": listening, "reported": reported,
    }).encode()
    print(f"standin: {os.environ.get('JUPYTERHUB_USER')} listening on port {port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
