"""`hpchub-status [USER[/SERVER]]`: a server's batch job as the hub sees it, and where the path to it breaks.

Asks the hub's API (hpchub.api): the job's scheduler state and reason, partition, node, times, walltime left,
tunnel, proxy route, URL and log; `--log N`, `--script`, `--history`, and `--probe`, which checks each hop from
the scheduler to the proxy and names the first broken one with a fix. docs/status.md has the details.

The hub: --url, else $HPCHUB_URL, else $JUPYTERHUB_API_URL (set inside a server), else the first line of
~/.config/hpchub/url, else http://127.0.0.1:8000. The token: --token-file, else $HPCHUB_API_TOKEN, else
$JUPYTERHUB_API_TOKEN (inside a server), else ~/.config/hpchub/token (readable by its owner only).

Exit status: 0 ready (the server, or any of the user's, is ready and reachable: its tunnel up, its proxy route
present; with --probe: every hop passed), 1 not ready or no server, 2 the hub could not be asked (unreachable, refused the token, no such user or server, bad usage),
3 --probe found a broken hop.
"""
from __future__ import annotations

import argparse
import json
import os
import stat
import sys
import time
import urllib.error
import urllib.request
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

from rich.console import Console
from rich.table import Table
from rich.text import Text

EXIT_READY, EXIT_NOT_READY, EXIT_ERROR, EXIT_BROKEN = 0, 1, 2, 3
DEFAULT_URL = "http://127.0.0.1:8000"
TIMEOUT = 30


class HubError(Exception):
    """The hub could not be asked, or refused: the message says which and what to do."""


def config_dir() -> Path:
    return Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "hpchub"


def api_url(flag: str | None, env: dict[str, str] | None = None) -> str:
    """The hub's API base URL (ending in /hub/api), from the first place that gives one."""
    env = os.environ if env is None else env
    if flag or env.get("HPCHUB_URL"):
        return (flag or env["HPCHUB_URL"]).rstrip("/") + "/hub/api"
    if env.get("JUPYTERHUB_API_URL"):
        return env["JUPYTERHUB_API_URL"].rstrip("/")
    saved = config_dir() / "url"
    if saved.is_file():
        lines = saved.read_text().split()
        if lines:
            return lines[0].rstrip("/") + "/hub/api"
    return DEFAULT_URL + "/hub/api"


def token(flag: str | None, env: dict[str, str] | None = None) -> str:
    """The API token, from the first place that gives one; HubError when none does."""
    env = os.environ if env is None else env
    if flag:
        return _token_file(Path(flag))
    for name in ("HPCHUB_API_TOKEN", "JUPYTERHUB_API_TOKEN"):
        if env.get(name):
            return env[name].strip()
    saved = config_dir() / "token"
    if saved.is_file():
        return _token_file(saved)
    raise HubError("no API token: set $HPCHUB_API_TOKEN, or save one in ~/.config/hpchub/token (mode 0600). A user "
                   "gets a token from the hub's Token page (/hub/token); inside a server $JUPYTERHUB_API_TOKEN is used")


def _token_file(path: Path) -> str:
    try:
        mode = path.stat().st_mode
        text = path.read_text().strip()
    except OSError as err:
        raise HubError(f"cannot read the token file {path}: {err.strerror}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise HubError(f"the token file {path} may be read by others: chmod 600 {path}")
    if not text:
        raise HubError(f"the token file {path} is empty")
    return text


class Hub:
    def __init__(self, api: str, api_token: str):
        self.api = api
        self._token = api_token

    def get(self, path: str, **params: Any) -> Any:
        query = urlencode({k: v for k, v in params.items() if v not in (None, False)})
        url = f"{self.api}{path}" + (f"?{query}" if query else "")
        request = urllib.request.Request(url, headers={"Authorization": f"token {self._token}",
                                                       "Accept": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
                return json.load(response)
        except urllib.error.HTTPError as err:
            raise HubError(f"the hub answered {err.code} for {path}: {_message(err)}" + _hint(err.code)) from None
        except (OSError, ValueError) as err:
            raise HubError(f"cannot reach the hub at {self.api}: {getattr(err, 'reason', err)}") from None


def _message(err: urllib.error.HTTPError) -> str:
    try:
        return json.loads(err.read().decode(errors="replace")).get("message") or err.reason
    except ValueError:
        return str(err.reason)


def _hint(code: int) -> str:
    if code == 403:
        return " (a user reads their own servers; admins read everyone's)"
    if code == 404:
        return " (is hpchub's API on this hub? it comes with the batch spawner)"
    return ""


# --- the target -----------------------------------------------------------------------------------------------------

def server_path(user: str, server: str | None) -> str:
    base = f"/hpchub/users/{quote(user, safe='')}"
    if server is None:
        return base
    return f"{base}/servers/{quote(server, safe='')}" if server else f"{base}/server"


def whoami(hub: Hub) -> str:
    model = hub.get("/user")
    if model.get("kind") != "user":
        raise HubError(f"this token is {model.get('kind', 'not a user')} {model.get('name', '')!r}'s, which has no "
                       "servers: give USER, or --all")
    return model["name"]


# --- showing --------------------------------------------------------------------------------------------------------

def _local(iso: str | None) -> str:
    if not iso:
        return ""
    return datetime.fromisoformat(iso).astimezone().strftime("%Y-%m-%d %H:%M:%S")


def duration(seconds: int | None) -> str:
    if seconds is None:
        return ""
    days, rest = divmod(int(seconds), 86400)
    text = f"{rest // 3600:d}:{rest % 3600 // 60:02d}:{rest % 60:02d}"
    return f"{days}-{text}" if days else text


def _server_label(model: dict) -> str:
    return model.get("name") or "(default)"


def _tunnel(model: dict) -> str:
    tunnel = model.get("tunnel") or {}
    if not tunnel or tunnel.get("mode") == "direct":
        return tunnel.get("mode", "")
    if tunnel.get("up"):
        return f"reverse: up ({tunnel.get('endpoint')})"
    since = f" since {_local(tunnel['last_change'])}" if tunnel.get("last_change") else ""
    reason = f": {tunnel['reason']}" if tunnel.get("reason") else ""
    return f"reverse: DOWN{since}{reason}" if model.get("job") and model["job"].get("id") else "reverse"


def _route(model: dict) -> str:
    route = model.get("route")
    if route is None:
        return "(proxy not asked)"
    if not route["present"]:
        return f"{route['path']}: none" + (" (missing!)" if model.get("ready") else "")
    mark = "" if route["matches"] or not model.get("ready") else " (stale: the server is elsewhere!)"
    return f"{route['path']} -> {route['target']}{mark}"


def reachable(model: dict) -> bool:
    """Ready in the hub, and the path there open: the job's tunnel up (reverse mode), the proxy's route present."""
    tunnel = model.get("tunnel") or {}
    route = model.get("route")
    return bool(model.get("ready") and not (tunnel.get("mode") == "reverse" and not tunnel.get("up"))
                and (route is None or route["present"]))


def _state(model: dict) -> str:
    job = model.get("job") or {}
    state = job.get("state") or ""
    if job.get("native_state") and job["native_state"] != state:
        state += f" ({job['native_state']})"
    if model.get("pending"):
        state += f", hub: {model['pending']} pending"
    elif reachable(model):
        state += ", ready"
    elif model.get("ready"):
        state += ", ready in the hub but not reachable"
    return state


def _walltime(job: dict) -> str:
    left = duration(job.get("walltime_left_s"))
    limit = duration(job.get("time_limit_s"))
    if left and limit:
        return f"{left} of {limit}"
    return left or (f"limit {limit}" if limit else "")


def _queue(job: dict) -> str:
    queue = job.get("queue") or {}
    parts = []
    if queue.get("position"):
        parts.append(f"position {queue['position']} of {queue['pending']} pending")
    if queue.get("estimated_start"):
        parts.append(f"expected start {_local(queue['estimated_start'])}")
    return "; ".join(parts)


def detail_table(model: dict) -> Table:
    job = model.get("job") or {}
    table = Table(title=f"{model['user']}/{model.get('name') or ''} ({'named server' if model.get('name') else 'default server'})",
                  show_header=False, title_justify="left", box=None, padding=(0, 2, 0, 0))
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    rows = [
        ("server", _server_label(model)), ("cluster", model.get("cluster") or ""),
        ("job", f"{job.get('id') or '(none)'}" + (f"  tag {job['tag']}" if job.get("tag") else "")),
        ("state", _state(model)), ("reason", job.get("reason") or ""),
        ("exit code", "" if job.get("exit_code") is None else str(job["exit_code"])),
        ("partition", job.get("partition") or ""), ("node", ",".join(job.get("nodes") or [])),
        ("submitted", _local(job.get("submitted"))), ("started", _local(job.get("started"))),
        ("ended", _local(job.get("ended")) if job.get("state") not in ("RUNNING", "PENDING") else ""),
        ("walltime left", _walltime(job)), ("queue", _queue(job)), ("tunnel", _tunnel(model)),
        ("route", _route(model)), ("URL", model.get("full_url") or model.get("url") or ""),
        ("server at", model.get("server_url") or ""), ("log", job.get("log_path") or ""),
        ("note", job.get("note") or ""),
    ]
    for key, value in rows:
        if value:
            table.add_row(key, Text(value))
    return table


def summary_table(models: list[dict], *, with_user: bool) -> Table:
    table = Table(show_lines=False, header_style="bold", box=None, padding=(0, 2, 0, 0))
    columns = (["user"] if with_user else []) + ["server", "cluster", "job", "state", "reason", "partition", "node",
                                                 "started", "left", "tunnel", "route"]
    for column in columns:
        table.add_column(column, overflow="fold")
    for model in models:
        job = model.get("job") or {}
        row = ([model["user"]] if with_user else []) + [
            _server_label(model), model.get("cluster") or "", job.get("id") or "", _state(model),
            job.get("reason") or "", job.get("partition") or "", ",".join(job.get("nodes") or []),
            _local(job.get("started")), duration(job.get("walltime_left_s")), _tunnel(model), _route(model)]
        table.add_row(*(Text(str(value)) for value in row))
    return table


def history_table(rows: list[dict]) -> Table:
    table = Table(title="history", title_justify="left", header_style="bold", box=None, padding=(0, 2, 0, 0))
    for column in ("job", "server", "cluster", "state", "reason / note", "node", "submitted", "started", "ended",
                   "exit"):
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*(Text(str(v)) for v in (
            row.get("job_id") or "-", row.get("server_name") or "(default)", row.get("cluster") or "",
            row.get("state") or "", "; ".join(x for x in (row.get("reason"), row.get("note")) if x),
            row.get("node") or "", _local(row.get("submitted")), _local(row.get("started")), _local(row.get("ended")),
            "" if row.get("exit_code") is None else row["exit_code"])))
    return table


def probe_table(result: dict) -> Table:
    table = Table(title=f"probe of {result['user']}/{result['server']} (job {result.get('job_id') or '-'})",
                  title_justify="left", header_style="bold", box=None, padding=(0, 2, 0, 0))
    for column in ("hop", "", "what the hub found"):
        table.add_column(column, overflow="fold")
    for hop in result["hops"]:
        table.add_row(Text(hop["name"]), Text("ok" if hop["ok"] else "FAIL", style="green" if hop["ok"] else "bold red"),
                      Text(hop["detail"]))
    return table


# --- one view -------------------------------------------------------------------------------------------------------

def collect(hub: Hub, args: argparse.Namespace, user: str | None, server: str | None) -> dict[str, Any]:
    """Everything this invocation shows, as one JSON-able document."""
    history = args.history or None
    if args.all:
        return {"servers": hub.get("/hpchub/users")["servers"]}
    assert user is not None
    if server is None:
        found = hub.get(server_path(user, None), history=history)
        document: dict[str, Any] = {"user": user, "servers": found["servers"]}
        if history:
            document["history"] = found.get("history", [])
    else:
        model = hub.get(server_path(user, server), history=history)
        document = {"user": user, "servers": [model]}
        if history:
            document["history"] = model.get("history", [])
    one = server if server is not None else ""
    if args.log:
        document["log"] = hub.get(server_path(user, one) + "/log", lines=args.log)
    if args.script:
        document["script"] = hub.get(server_path(user, one) + "/script")
    if args.probe:
        document["probe"] = hub.get(server_path(user, one) + "/probe")
    return document


def exit_status(document: dict[str, Any], server: str | None) -> int:
    if "probe" in document:
        return EXIT_READY if document["probe"]["ok"] else EXIT_BROKEN
    servers = document["servers"]
    if server is not None:
        servers = [s for s in servers if (s.get("name") or "") == server]
    return EXIT_READY if any(reachable(s) for s in servers) else EXIT_NOT_READY


def show(console: Console, document: dict[str, Any], *, all_users: bool) -> None:
    servers = document["servers"]
    if not servers:
        console.print("no servers" + ("" if all_users else f" for {document.get('user')}"), highlight=False)
    elif len(servers) == 1 and not all_users:
        console.print(detail_table(servers[0]))
    else:
        console.print(summary_table(servers, with_user=all_users))
        for model in servers:
            job = model.get("job") or {}
            console.print(Text(f"  {model['user']}/{model.get('name') or ''}: {model.get('full_url') or model['url']}"
                               + (f"  log {job['log_path']}" if job.get("log_path") else "")))
    if document.get("history") is not None:
        console.print()
        console.print(history_table(document["history"]) if document["history"] else "no jobs in the ledger")
    if "log" in document:
        log = document["log"]
        console.print()
        console.print(Text(f"last {log['lines']} lines of {log['path']} (job {log.get('job_id') or '-'}):",
                           style="bold"))
        console.print(Text(log["text"] if not log["error"] else log["error"]), end="")
    if "script" in document:
        script = document["script"]
        console.print()
        console.print(Text(f"job script of job {script.get('job_id') or '-'} ({script['note']}; "
                           f"{script['redacted']} value(s) redacted):", style="bold"))
        console.print(Text(script["script"]), end="")
    if "probe" in document:
        probe = document["probe"]
        console.print()
        console.print(probe_table(probe))
        if probe["ok"]:
            console.print("every hop answers: the server is reachable through the proxy", highlight=False)
        else:
            console.print(Text(f"broken hop: {probe['failed']}", style="bold red"))
            console.print(Text(f"fix: {probe['fix']}"))


def parse_target(text: str | None) -> tuple[str | None, str | None]:
    if text is None:
        return None, None
    user, slash, server = text.partition("/")
    return user, (server if slash else None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hpchub-status", description=__doc__.split("\n\n")[0],
                                     epilog="Exit status: 0 ready, 1 not ready or no server, 2 the hub could not be "
                                            "asked, 3 --probe found a broken hop. See docs/status.md.")
    parser.add_argument("target", nargs="?", metavar="USER[/SERVER]",
                        help="whose server (default: $JUPYTERHUB_USER inside a server, else the token's user); "
                             "USER/ is the default server, USER/NAME a named one")
    parser.add_argument("--all", action="store_true", help="every server you may read (admins: everyone's)")
    parser.add_argument("--json", action="store_true", help="print the hub's answer as JSON")
    parser.add_argument("--watch", nargs="?", type=float, const=5.0, metavar="SECONDS",
                        help="show again every SECONDS (default 5) until Ctrl-C")
    parser.add_argument("--log", type=int, metavar="N", help="the last N lines of the job's output")
    parser.add_argument("--script", action="store_true", help="the job script (secrets redacted)")
    parser.add_argument("--history", nargs="?", type=int, const=20, default=0, metavar="N",
                        help="the last N jobs (default 20) from the hub's job ledger")
    parser.add_argument("--probe", action="store_true",
                        help="check each hop (scheduler, tunnel, server, proxy route, HTTP) and name the first broken one")
    parser.add_argument("--url", help="the hub's URL (default: $HPCHUB_URL, $JUPYTERHUB_API_URL, ~/.config/hpchub/url, "
                                      f"{DEFAULT_URL})")
    parser.add_argument("--token-file", help="file holding the API token (default: $HPCHUB_API_TOKEN, "
                                             "$JUPYTERHUB_API_TOKEN, ~/.config/hpchub/token)")
    args = parser.parse_args(argv)
    if args.all and (args.target or args.log or args.script or args.probe):
        parser.error("--all shows every server: it takes no USER, --log, --script or --probe")
    if args.log is not None and not 1 <= args.log <= 5000:
        parser.error("--log: 1 to 5000 lines")
    if args.watch is not None and args.watch < 1:
        parser.error("--watch: at least 1 second")
    console = Console(highlight=False, soft_wrap=False, width=None if sys.stdout.isatty() else 200)
    errors = Console(stderr=True, highlight=False)
    try:
        hub = Hub(api_url(args.url), token(args.token_file))
        user, server = parse_target(args.target)
        if not args.all and user is None:
            user = os.environ.get("JUPYTERHUB_USER") or whoami(hub)
        if (args.log or args.script or args.probe) and server is None:
            server = ""
        return _run(hub, args, user, server, console)
    except HubError as err:
        errors.print(Text(f"hpchub-status: {err}"))
        return EXIT_ERROR


def _run(hub: Hub, args: argparse.Namespace, user: str | None, server: str | None, console: Console) -> int:
    status = EXIT_NOT_READY
    try:
        return _show_until_stopped(hub, args, user, server, console)
    except KeyboardInterrupt:   # Ctrl-C ends --watch: the status of the last view
        return getattr(args, "last_status", status)


def _show_until_stopped(hub: Hub, args: argparse.Namespace, user: str | None, server: str | None,
                        console: Console) -> int:
    while True:
        document = collect(hub, args, user, server)
        status = args.last_status = exit_status(document, server)
        if args.json:
            print(json.dumps(document, indent=None if args.watch else 2), flush=True)
        else:
            if args.watch:
                console.clear()
                console.print(Text(f"{_where(hub)}  {datetime.now():%H:%M:%S}  (every {args.watch:g} s, Ctrl-C to "
                                   "stop)", style="dim"))
            show(console, document, all_users=args.all)
        if not args.watch:
            return status
        time.sleep(args.watch)


def _where(hub: Hub) -> str:
    parts = urlsplit(hub.api)
    return f"{parts.scheme}://{parts.netloc}"


if __name__ == "__main__":
    sys.exit(main())
