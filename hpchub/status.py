"""`hpchub-status [USER]`: what the hub knows about a user's servers and their batch jobs.

Reads the hub URL from $HPCHUB_URL (default http://127.0.0.1:8000) and a token from $JUPYTERHUB_API_TOKEN
(set inside a user's server) or $HPCHUB_API_TOKEN. Exit codes: 0 a server is ready, 1 none is ready,
2 the hub could not be asked.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from urllib.parse import quote

EXIT_READY, EXIT_NOT_READY, EXIT_ERROR = 0, 1, 2


def fetch_user(hub_url: str, token: str, user: str) -> dict:
    request = urllib.request.Request(
        f"{hub_url.rstrip('/')}/hub/api/users/{quote(user)}",
        headers={"Authorization": f"token {token}", "Accept": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=15) as response:
        return json.load(response)


def describe(model: dict) -> list[str]:
    lines = []
    for name, server in sorted(model.get("servers", {}).items()):
        state = server.get("state") or {}
        job = f"job {state['job_id']} on {state.get('job_host') or '?'}" if state.get("job_id") else "job ?"
        phase = "ready" if server.get("ready") else (server.get("pending") or "not ready")
        lines.append(f"{name or '(default)':12} {phase:10} {job:24} {server.get('url', '')}")
    return lines or ["no servers"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hpchub-status", description=__doc__.split("\n\n")[0])
    parser.add_argument("user", nargs="?", default=os.environ.get("JUPYTERHUB_USER"),
                        help="user to show (default: the user of this server, $JUPYTERHUB_USER)")
    parser.add_argument("--json", action="store_true", help="print the hub's user model as JSON")
    args = parser.parse_args(argv)
    hub_url = os.environ.get("HPCHUB_URL", "http://127.0.0.1:8000")
    token = os.environ.get("JUPYTERHUB_API_TOKEN") or os.environ.get("HPCHUB_API_TOKEN")
    if not args.user or not token:
        parser.print_usage(sys.stderr)
        print("hpchub-status: give a USER and set $HPCHUB_API_TOKEN (or run inside a server)", file=sys.stderr)
        return EXIT_ERROR
    try:
        model = fetch_user(hub_url, token, args.user)
    except urllib.error.HTTPError as err:
        print(f"hpchub-status: the hub at {hub_url} answered {err.code} for user {args.user!r}", file=sys.stderr)
        return EXIT_ERROR
    except OSError as err:
        print(f"hpchub-status: cannot reach the hub at {hub_url}: {err}", file=sys.stderr)
        return EXIT_ERROR
    print(json.dumps(model, indent=2) if args.json else "\n".join(describe(model)))
    ready = any(server.get("ready") for server in model.get("servers", {}).values())
    return EXIT_READY if ready else EXIT_NOT_READY


if __name__ == "__main__":
    sys.exit(main())
