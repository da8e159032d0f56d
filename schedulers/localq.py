"""localq: a tiny batch system for one machine, the embedded default scheduler (laptop, demo).

    python -m schedulers.localq submit --spool DIR [--grace S] < script   prints the job id
    python -m schedulers.localq query  --spool DIR ID...                  one JSON line per id
    python -m schedulers.localq cancel --spool DIR ID...
    python -m schedulers.localq find   --spool DIR --comment TAG             the ids of the jobs with TAG

It runs as whichever user submits (through sudo): it needs only the installed package and the spool.
The spool (mode 1777, like /tmp) holds one directory per job, made by the submitting user:

    job.json         the request: name, comment, output, chdir, time limit, ...  (submit)
    supervisor.json  pid and start ticks of the job's supervisor                 (submit)
    running.json     pid and start ticks of the job, start time, node            (supervisor)
    end.json         final state, exit code, reason, end time                    (supervisor)
    cancel           marker: cancellation requested                              (cancel)
    private/         mode 0700: the script, which holds secrets; removed when the job ends

Each file has one writer and appears atomically (rename), so a reader never sees half a state.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import select
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from typing import Any, Sequence

from .local import REJECTED

DIRECTIVE = "#LOCALQ"
OPTIONS = ("name", "comment", "output", "chdir", "time")
TICK_S = 0.2
# job.json without supervisor.json for this long: the submit died before its supervisor existed
LOST_AFTER_S = 10.0
_ID = re.compile(r"[0-9]{1,18}")


class Rejected(Exception):
    """The job script cannot be accepted; the message says why."""


def parse_directives(script: str) -> dict[str, str]:
    """`#LOCALQ --key=value` lines before the first command, like sbatch reads #SBATCH."""
    options: dict[str, str] = {}
    for number, line in enumerate(script.splitlines(), 1):
        stripped = line.strip()
        if not stripped:
            continue
        if not stripped.startswith("#"):
            break
        rest = line[len(DIRECTIVE):]
        if not line.startswith(DIRECTIVE) or rest[:1] not in ("", " ", "\t"):
            continue
        try:
            tokens = shlex.split(rest, comments=True)
        except ValueError as e:
            raise Rejected(f"line {number}: {e}: {line.strip()}") from None
        while tokens:
            token = tokens.pop(0)
            key, eq, value = token.partition("=")
            if not key.startswith("--") or key[2:] not in OPTIONS:
                known = ", ".join(f"--{o}" for o in OPTIONS)
                raise Rejected(f"line {number}: unknown directive {token!r} (known: {known})")
            if not eq:
                if not tokens:
                    raise Rejected(f"line {number}: {key} needs a value")
                value = tokens.pop(0)
            options[key[2:]] = value
    return options


def make_request(options: dict[str, str], *, home: str) -> dict[str, Any]:
    chdir = options.get("chdir", home)
    if not os.path.isabs(chdir):
        raise Rejected(f"--chdir must be an absolute path, not {chdir!r}")
    if not os.path.isdir(chdir):
        raise Rejected(f"--chdir directory {chdir!r} does not exist")
    time_limit = None
    if "time" in options:
        try:
            time_limit = int(options["time"])
        except ValueError:
            time_limit = 0
        if time_limit <= 0:
            raise Rejected(f"--time must be a positive number of seconds, not {options['time']!r}")
    return {"name": options.get("name", "localq"), "comment": options.get("comment", ""), "chdir": chdir,
            "time_limit": time_limit,
            "output": os.path.join(chdir, options.get("output", "localq-%j.out"))}


def submit(spool: str, script: str, grace: float) -> str:
    request = make_request(parse_directives(script), home=os.path.expanduser("~"))
    job_id, job_dir = _allocate(spool)
    try:
        private = os.path.join(job_dir, "private")
        os.mkdir(private, 0o700)
        _write(os.path.join(private, "script"), script, 0o700)
        request.update(id=job_id, output=request["output"].replace("%j", job_id), grace=grace,
                       submit_time=time.time())
        _write_json(os.path.join(job_dir, "job.json"), request)
        os.chmod(job_dir, 0o755)
    except BaseException:
        shutil.rmtree(job_dir, ignore_errors=True)
        raise
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        _detach_and_supervise(job_dir, request)
    _write_json(os.path.join(job_dir, "supervisor.json"), {"pid": pid, "ticks": _stat(pid)["ticks"]})
    return job_id


def _allocate(spool: str) -> tuple[str, str]:
    # mkdir is atomic: whoever creates the directory owns the id; the others take the next one
    while True:
        taken = [int(n) for n in os.listdir(spool) if _ID.fullmatch(n)]
        job_id = str(max(taken, default=0) + 1)
        job_dir = os.path.join(spool, job_id)
        try:
            os.mkdir(job_dir, 0o700)
        except FileExistsError:
            continue
        return job_id, job_dir


def _detach_and_supervise(job_dir: str, request: dict[str, Any]) -> None:
    code = 1
    try:
        os.setsid()
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        os.closerange(3, 1 << 16)
        supervise(job_dir, request)
        code = 0
    except BaseException as e:
        _finish(job_dir, "FAILED", reason=f"localq supervisor error: {e!r}")
    finally:
        os._exit(code)


def supervise(job_dir: str, request: dict[str, Any]) -> None:
    stop: list[str] = []
    # a TERM to the supervisor (shutdown, an admin) ends its job cleanly instead of orphaning it
    signal.signal(signal.SIGTERM, lambda *_: stop.append("CANCELLED"))
    script = os.path.join(job_dir, "private", "script")
    if stop or os.path.exists(os.path.join(job_dir, "cancel")):
        return _finish(job_dir, "CANCELLED", reason="Cancelled")
    env = dict(os.environ, LOCALQ_JOB_ID=request["id"], LOCALQ_JOB_NAME=request["name"])
    try:
        out = os.open(request["output"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        proc = subprocess.Popen(["bash", script], cwd=request["chdir"], env=env, stdin=subprocess.DEVNULL,
                                stdout=out, stderr=out, start_new_session=True)
    except OSError as e:
        return _finish(job_dir, "FAILED", reason=f"cannot start the job: {e}")
    os.close(out)
    _write_json(os.path.join(job_dir, "running.json"), {
        "pid": proc.pid, "ticks": _stat(proc.pid)["ticks"], "start_time": time.time(),
        "node": socket.gethostname()})
    _wait(proc.pid, job_dir, request, stop)
    # the leader is a zombie until reaped, so its group id cannot be reused yet: clear out stragglers
    _signal_group(proc.pid, signal.SIGKILL)
    returncode = proc.wait()
    if not stop and os.path.exists(os.path.join(job_dir, "cancel")):
        stop.append("CANCELLED")  # cancel TERMs the job itself: it may end before _wait saw the marker
    exit_code = returncode if returncode >= 0 else 128 - returncode
    if stop:
        state, reason = stop[0], "Cancelled" if stop[0] == "CANCELLED" else "TimeLimit"
    elif returncode == 0:
        state, reason = "COMPLETED", ""
    elif returncode > 0:
        state, reason = "FAILED", "NonZeroExitCode"
    else:
        state, reason = "FAILED", f"Signal {signal.Signals(-returncode).name}"
    _finish(job_dir, state, reason=reason, exit_code=exit_code)


def _wait(pid: int, job_dir: str, request: dict[str, Any], stop: list[str]) -> None:
    """Until the job exits (without reaping it); on cancel or walltime, TERM its group, then KILL after the grace."""
    exited = os.pidfd_open(pid)
    deadline = time.monotonic() + request["time_limit"] if request["time_limit"] else None
    kill_at: float | None = None
    while not select.select([exited], [], [], TICK_S)[0]:
        now = time.monotonic()
        if kill_at is None and not stop:
            if os.path.exists(os.path.join(job_dir, "cancel")):
                stop.append("CANCELLED")
            elif deadline is not None and now >= deadline:
                stop.append("TIMEOUT")
        if stop and kill_at is None:
            _signal_group(pid, signal.SIGTERM)
            kill_at = now + request["grace"]
        elif kill_at is not None and now >= kill_at:
            _signal_group(pid, signal.SIGKILL)
    os.close(exited)


def _finish(job_dir: str, state: str, *, reason: str, exit_code: int | None = None) -> None:
    try:
        os.unlink(os.path.join(job_dir, "private", "script"))
    except FileNotFoundError:
        pass
    _write_json(os.path.join(job_dir, "end.json"),
                {"state": state, "reason": reason, "exit_code": exit_code, "end_time": time.time()})


def status(spool: str, job_id: str) -> dict[str, Any]:
    base = {"id": job_id, "state": "NOT_FOUND", "reason": "", "node": "", "exit_code": None}
    if not _ID.fullmatch(job_id):
        return dict(base, reason="not a localq job id")
    job_dir = os.path.join(spool, job_id)
    try:
        if _read_json(job_dir, "job.json") is None:
            return dict(base, reason="no such job in the spool")
        running = _read_json(job_dir, "running.json") or {}
        base.update(node=running.get("node", ""))
        end = _read_json(job_dir, "end.json")
        if end is None:
            supervisor = _read_json(job_dir, "supervisor.json")
            if supervisor is not None and _alive(supervisor["pid"], supervisor["ticks"]):
                if not running:
                    return dict(base, state="PENDING")
                cancelling = os.path.exists(os.path.join(job_dir, "cancel"))
                return dict(base, state="COMPLETING" if cancelling else "RUNNING")
            # it may have ended between the two reads
            end = _read_json(job_dir, "end.json")
            if end is None:
                if supervisor is None and time.time() - os.stat(job_dir).st_mtime < LOST_AFTER_S:
                    return dict(base, state="PENDING")
                return dict(base, state="FAILED",
                            reason="SupervisorLost: the localq supervisor ended without recording the job's end")
    except (OSError, ValueError, KeyError, TypeError) as e:
        return dict(base, state="UNKNOWN", reason=f"unreadable job state: {e}")
    return dict(base, state=end["state"], reason=end["reason"], exit_code=end["exit_code"])


def find(spool: str, comment: str) -> list[str]:
    """Ids of the jobs submitted with `--comment=COMMENT`, oldest first."""
    found = []
    for name in sorted((n for n in os.listdir(spool) if _ID.fullmatch(n)), key=int):
        try:
            job = _read_json(os.path.join(spool, name), "job.json")
        except (OSError, ValueError):
            continue
        if job is not None and job.get("comment") == comment:
            found.append(name)
    return found


def cancel(spool: str, job_id: str) -> None:
    """Ask the supervisor to stop the job and TERM the job's group now; a finished job is left alone."""
    if not _ID.fullmatch(job_id):
        return
    job_dir = os.path.join(spool, job_id)
    if _read_json(job_dir, "job.json") is None or os.path.exists(os.path.join(job_dir, "end.json")):
        return
    try:
        os.close(os.open(os.path.join(job_dir, "cancel"), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW,
                         0o644))
    except FileExistsError:
        pass
    running = _read_json(job_dir, "running.json")
    if running is None:
        return  # the supervisor checks the marker before it starts the job
    owner = os.stat(job_dir).st_uid
    # pid and start ticks come from a file the job's owner can write: signal only that owner's own job
    proc = _stat(running["pid"])
    if (proc is not None and proc["alive"] and proc["ticks"] == running["ticks"] and proc["uid"] == owner
            and proc["pgrp"] == running["pid"]):
        _signal_group(running["pid"], signal.SIGTERM)


def _stat(pid: int) -> dict[str, Any] | None:
    """State, process group, start ticks and owner of a process, from /proc (kill -0 lies on zombies)."""
    try:
        with open(f"/proc/{int(pid)}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        uid = os.stat(f"/proc/{int(pid)}").st_uid
    except (FileNotFoundError, ProcessLookupError):
        return None
    return {"alive": fields[0] not in ("Z", "X"), "pgrp": int(fields[2]), "ticks": int(fields[19]), "uid": uid}


def _alive(pid: int, ticks: int) -> bool:
    proc = _stat(pid)
    return proc is not None and proc["alive"] and proc["ticks"] == ticks


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def _read_json(job_dir: str, name: str) -> Any:
    try:
        fd = os.open(os.path.join(job_dir, name), os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    with os.fdopen(fd) as f:
        return json.load(f)


def _write_json(path: str, data: dict[str, Any]) -> None:
    _write(path, json.dumps(data), 0o644)


def _write(path: str, text: str, mode: int) -> None:
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, mode)
    os.rename(tmp, path)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="localq", description="A tiny batch system for one machine.")
    commands = parser.add_subparsers(dest="command", required=True)
    for name in ("submit", "query", "cancel", "find"):
        command = commands.add_parser(name)
        command.add_argument("--spool", required=True, help="the spool directory (mode 1777)")
        if name == "submit":
            command.add_argument("--grace", type=float, default=5.0,
                                 help="seconds between TERM and KILL when a job is cancelled or times out")
        elif name == "find":
            command.add_argument("--comment", required=True, help="list the jobs submitted with this comment")
        else:
            command.add_argument("ids", nargs="+", metavar="ID")
    args = parser.parse_args(argv)
    try:
        if args.command == "submit":
            print(submit(args.spool, sys.stdin.read(), args.grace))
        elif args.command == "find":
            for job_id in find(args.spool, args.comment):
                print(job_id)
        elif args.command == "query":
            for job_id in args.ids:
                print(json.dumps(status(args.spool, job_id)))
        else:
            failed = 0
            for job_id in args.ids:
                try:
                    cancel(args.spool, job_id)
                except OSError as e:
                    print(f"localq: cancel of job {job_id} failed: {e}", file=sys.stderr)
                    failed += 1
            return 1 if failed else 0
    except Rejected as e:
        print(f"localq: job rejected: {e}", file=sys.stderr)
        return REJECTED
    except OSError as e:
        print(f"localq: {args.command} failed: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
