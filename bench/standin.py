#!/usr/bin/python3 -IS
"""The light stand-in single-user server of hpchub's benchmarks: the same one for both stacks.

It does, for the hub, what `batchspawner-singleuser` + `jupyterhub-singleuser` do on the path the benchmarks
measure, and nothing else (no JupyterLab, no OAuth, no kernels), with Debian's Python, no site packages and
plain sockets only (about 4 MB of memory), so that a thousand of them fit on a small machine:

1. listens on a free port (the OS picks it) at the address of $JUPYTERHUB_SERVICE_URL (the spawner's ip);
2. reports that port to the hub as both batchspawners expect: POST $JUPYTERHUB_API_URL/batchspawner with
   `{"port": N}` and `Authorization: token $JUPYTERHUB_API_TOKEN` (retried while the hub is unreachable);
3. answers every HTTP request with 200 and a JSON body naming the user and server and carrying its
   timestamps (epoch seconds, this host's clock): `job_start` (the first line of the batch script, from
   $HPCHUB_BENCH_JOB_START, which the job's prologue sets), `listening` and `reported`. The hub's
   readiness check (an HTTP GET at the server's URL) and the benchmark's requests through the proxy get it.

SIGTERM (scancel) ends it. It replaces the batchspawner-singleuser wrapper of each stack too: both wrappers
import JupyterHub (about a CPU-second per job), which would make a 200-user burst on 2 CPUs measure Python
imports instead of the hubs.
"""
import json
import os
import signal
import socket
import sys
import time

REPORT_DEADLINE_S = 60.0


def split_url(url: str) -> tuple[str, int, str]:
    """http://host:port/path -> (host, port, path)."""
    rest = url.split("://", 1)[1]
    hostport, _, path = rest.partition("/")
    host, _, port = hostport.rpartition(":") if ":" in hostport else (hostport, "", "80")
    return host.strip("[]"), int(port or 80), "/" + path


def post_port(port: int) -> int:
    """One POST of the port to the hub: its HTTP status."""
    host, hub_port, path = split_url(os.environ["JUPYTERHUB_API_URL"].rstrip("/") + "/batchspawner")
    body = json.dumps({"port": port}).encode()
    head = (f"POST {path} HTTP/1.0\r\nHost: {host}:{hub_port}\r\nContent-Type: application/json\r\n"
            f"Authorization: token {os.environ['JUPYTERHUB_API_TOKEN']}\r\nContent-Length: {len(body)}\r\n\r\n")
    with socket.create_connection((host, hub_port), timeout=10) as conn:
        conn.sendall(head.encode() + body)
        answer = b""
        while b"\r\n" not in answer and (part := conn.recv(4096)):
            answer += part
    return int(answer.split(b" ", 2)[1])


def report_port(port: int) -> None:
    deadline, delay = time.monotonic() + REPORT_DEADLINE_S, 0.1
    while True:
        try:
            status = post_port(port)
            if status < 300:
                return
            if status < 500:
                sys.exit(f"standin: the hub refused the port: HTTP {status}")
            failure = f"HTTP {status}"
        except (OSError, ValueError, IndexError) as err:
            failure = str(err)
        if time.monotonic() + delay > deadline:
            sys.exit(f"standin: cannot report the port to the hub: {failure}")
        time.sleep(delay)
        delay = min(delay * 2, 2.0)


def serve(listener: socket.socket, body: bytes) -> None:
    response = (b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                b"Connection: close\r\n\r\n" % len(body)) + body
    while True:
        conn, _ = listener.accept()
        try:
            conn.settimeout(10)
            request = b""
            while b"\r\n\r\n" not in request and (part := conn.recv(65536)):
                request += part
            conn.sendall(response if not request.startswith(b"HEAD ") else response[:-len(body)])
        except OSError:
            pass
        finally:
            conn.close()


def main() -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    job_start = float(os.environ.get("HPCHUB_BENCH_JOB_START") or "nan")
    host, _, _ = split_url(os.environ["JUPYTERHUB_SERVICE_URL"])
    listener = socket.create_server((host or "0.0.0.0", 0), backlog=64)
    listening = time.time()
    port = listener.getsockname()[1]
    report_port(port)
    reported = time.time()
    body = json.dumps({
        "standin": True, "user": os.environ.get("JUPYTERHUB_USER"),
        "server": os.environ.get("JUPYTERHUB_SERVER_NAME", ""), "port": port,
        "job_start": job_start, "listening": listening, "reported": reported,
    }).encode()
    print(f"standin: {os.environ.get('JUPYTERHUB_USER')} listening on port {port}", flush=True)
    serve(listener, body)


if __name__ == "__main__":
    main()
