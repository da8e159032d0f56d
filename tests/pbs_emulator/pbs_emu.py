"""An emulation of PBS Professional's qsub, qstat, qdel and pbsnodes, for hpchub's tests: no PBS package exists for
Debian.

Jobs really run. Once a job fits the one emulated execution node, it is handed to `schedulers.localq`, which runs
it as a local process of the user who submitted it, ends it at its walltime and stops it on qdel (SIGTERM, then
SIGKILL after kill_delay). What the commands print, and their exit statuses, follow PBS Professional 2022 and
OpenPBS 22.05 (qstat.c, qdel.c, qsub.c, pbsnodes.c, pbs_error.h, pbs_json.c); docs/pbs-emulation.md lists the
sources and what is not emulated.

Install with `python pbs_emu.py install DEST [options]`: DEST/bin gets qsub, qstat, qdel, pbsnodes (their first line
set to a Python that can import `schedulers`), this module, pbs_format.py and pbs.conf:

    PBS_SERVER=pbsemu                  the server's name, in job ids ("12.pbsemu") and messages
    PBS_HOME=DEST/home                 the emulated server's state, below
    PBS_EMU_QUEUES=workq,debug         the queues; the first is the server's default_queue
    PBS_EMU_NCPUS=8, PBS_EMU_NGPUS=0   the execution node's resources
    PBS_EMU_MEM=16gb                   the execution node's memory
    PBS_EMU_KILL_DELAY=10              seconds from SIGTERM to SIGKILL (the queue's kill_delay)
    PBS_EMU_QATTR.QUEUE.NAME=VALUE     a queue attribute, as `qmgr -c "set queue QUEUE NAME=VALUE"` would set it:
                                       resources_max.walltime, resources_default.walltime, enabled, ...

The commands read $PBS_CONF_FILE, as PBS does, or else the pbs.conf beside this module (sudo clears the
environment). PBS_HOME holds:

    server_down   while this file exists, every command fails as when pbs_server cannot be reached
    sched.lock    flock()ed while a job is placed, so that two jobs never take the same CPUs
    jobs/SEQ/     one directory per job, made by its owner: job.json (what qsub was asked), queue.json (the
                  scheduler's comment and start estimate), run.json (when and where it started, its localq id),
                  deleted (qdel before it started)
    localq/       the localq spool the jobs run from

A job that does not fit when submitted waits in a detached process of its owner, which retries every
QUEUED_TICK_S until the job fits, is deleted or its directory is gone.
"""
from __future__ import annotations

import argparse
import fcntl
import getopt
import itertools
import json
import os
import pwd
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import pbs_format
from schedulers import localq
from schedulers.local import ensure_spool

PBS_VERSION = "2022.1.0 (hpchub emulator)"
QUEUED_TICK_S = 0.25
COMMANDS = ("qsub", "qstat", "qdel", "pbsnodes")

# PBS error numbers (pbs_error.h) and their texts; the commands exit with the number, which the shell sees
# modulo 256 (15001 -> 153)
PBSE_UNKJOBID, PBSE_PERM, PBSE_SYSTEM, PBSE_BADATVAL = 15001, 15007, 15010, 15014
PBSE_UNKQUE, PBSE_QUNOENB, PBSE_UNKRESC, PBSE_EXCQRESC, PBSE_HISTJOBID = 15018, 15021, 15035, 15036, 15139
# Exit_status values PBS sets itself (job.h)
JOB_EXEC_FAIL1, JOB_EXEC_KILL_WALLTIME = -1, -29
# substates of finished jobs (job.h): deleted, ended with status 0, ended otherwise
TERMINATED, FINISHED, FAILED = 91, 92, 93
_ENDED_AS = {TERMINATED: "terminated", FINISHED: "finished", FAILED: "failed"}
_LOCALQ_ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NOT_FOUND"}

# qsub's options; those outside EMULATED are refused rather than ignored
QSUB_GETOPT = "a:A:c:C:e:fhIj:J:k:l:m:M:N:o:p:P:q:r:R:S:u:v:VW:Xz"
EMULATED = set("AejklmMNoPqrz")
_CHUNK_RESOURCES = {"ncpus", "ngpus", "mem", "mpiprocs", "ompthreads", "host", "vnode"}
_JOB_RESOURCES = {"select", "place", "walltime", "ncpus", "ngpus", "mem"}
_JOB_ID = re.compile(r"([0-9]+)(?:\.(.+))?")
_SIZE = re.compile(r"([0-9]+)([kmgtp]?)([bw]?)", re.IGNORECASE)
_WALLTIME = re.compile(r"(?:(?:([0-9]+):)?([0-9]+):)?([0-9]+)(?:\.[0-9]+)?")
_QATTR = "PBS_EMU_QATTR."
# resource groups of a queue, in the order qstat -Q prints them; the rest of its attributes come before them
_QUEUE_RESOURCES = ("resources_max", "resources_min", "resources_default", "default_chunk", "resources_available")
# resources_max checked at qsub, and how to read them
_LIMITED = ("walltime", "ncpus", "ngpus", "mem", "nodect")


class Fail(Exception):
    """A command's error: the message for stderr and the PBS error number it exits with."""

    def __init__(self, message: str, errno: int):
        super().__init__(message)
        self.errno = errno


@dataclass(frozen=True)
class Config:
    server: str
    home: Path
    queues: tuple[str, ...]
    ncpus: int
    ngpus: int
    mem: str
    kill_delay: float
    #: queue -> its attributes as qmgr sets them ("resources_max.walltime" -> "01:00:00")
    queue_attributes: dict[str, dict[str, str]]

    @property
    def jobs(self) -> Path:
        return self.home / "jobs"

    @property
    def spool(self) -> str:
        return str(self.home / "localq")

    @property
    def down(self) -> bool:
        return (self.home / "server_down").exists()


def load_config() -> Config:
    path = os.environ.get("PBS_CONF_FILE") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "pbs.conf")
    values = {}
    queue_attributes: dict[str, dict[str, str]] = {}
    with open(path) as f:
        for line in f:
            key, eq, value = line.strip().partition("=")
            if eq and key.startswith(_QATTR):
                queue, _, name = key[len(_QATTR):].partition(".")
                queue_attributes.setdefault(queue, {})[name] = value.strip()
            elif eq and not key.startswith("#"):
                values[key.strip()] = value.strip()
    return Config(server=values["PBS_SERVER"], home=Path(values["PBS_HOME"]),
                  queues=tuple(q for q in values.get("PBS_EMU_QUEUES", "workq").split(",") if q),
                  ncpus=int(values.get("PBS_EMU_NCPUS", "8")), ngpus=int(values.get("PBS_EMU_NGPUS", "0")),
                  mem=values.get("PBS_EMU_MEM", "16gb"), kill_delay=float(values.get("PBS_EMU_KILL_DELAY", "10")),
                  queue_attributes=queue_attributes)


def main(command: str, args: Sequence[str]) -> int:
    try:
        return {"qsub": qsub, "qstat": qstat, "qdel": qdel, "pbsnodes": pbsnodes}[command](load_config(), list(args))
    except Fail as e:
        print(e, file=sys.stderr)
        return e.errno & 0xFF


# ---- qsub -------------------------------------------------------------------------------------------------

def qsub(cfg: Config, args: list[str]) -> int:
    options, operands = _qsub_options(args, "qsub")
    if operands:
        with open(operands[0]) as f:
            script = f.read()
        default_name = os.path.basename(operands[0])
    else:
        script = sys.stdin.read()
        default_name = "STDIN"
    # directives in the script count less than the command line's options
    merged = _merge(_qsub_options(_directives(script), "directive")[0], options)
    if cfg.down:
        raise Fail(f"Connection refused\nqsub: cannot connect to server {cfg.server} (errno={PBSE_SYSTEM})",
                   PBSE_SYSTEM)
    job = _new_job(cfg, merged, default_name, args)
    _apply_queue(cfg, job)
    seq, job_dir = localq._allocate(str(cfg.jobs))  # the same atomic mkdir allocation as localq's ids
    os.chmod(job_dir, 0o755)  # at once: other users' commands read every job directory
    job_id = f"{seq}.{cfg.server}"
    _paths(job, seq, merged)
    _write_json(Path(job_dir) / "job.json", job)
    wrapped = _wrapped_script(job_id, job, script)
    if not _try_start(cfg, seq, job, wrapped):
        _wait_in_queue(seq, job, wrapped)
    if "z" not in merged:
        print(job_id)
    return 0


def _qsub_options(args: Sequence[str], where: str) -> tuple[dict[str, Any], list[str]]:
    if "--" in args:
        raise Fail("qsub: executables (qsub -- command) are not emulated by hpchub's PBS emulator", 2)
    try:
        pairs, operands = getopt.getopt(list(args), QSUB_GETOPT)
    except getopt.GetoptError as e:
        raise Fail(f"qsub: {e}\nusage: qsub [-A account] [-e path] [-j oe] [-l resource_list] [-N name] [-o path] "
                   "[-q destination] [script]", 2) from None
    options: dict[str, Any] = {"l": {}}
    for flag, value in pairs:
        letter = flag[1]
        if letter not in EMULATED:
            raise Fail(f"qsub: option {flag} is not emulated by hpchub's PBS emulator (docs/pbs-emulation.md)", 2)
        if letter == "l":
            options["l"].update(_resource_pairs(value))
        elif (letter == "N" and not _valid_name(value)) or (letter == "j" and value not in ("oe", "eo", "n")):
            raise Fail(f"qsub: illegal -{letter} value", 2)
        else:
            options[letter] = value
    if where == "directive" and operands:
        raise Fail(f"qsub: directive error: {' '.join(operands)}", 2)
    return options, operands


def _directives(script: str) -> list[str]:
    """The words of the `#PBS` lines before the first command, as qsub reads them."""
    words: list[str] = []
    for line in script.splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            break
        if line.startswith("#PBS") and line[4:5] in (" ", "\t"):
            words.extend(shlex.split(line[4:], comments=True))
    return words


def _merge(directives: dict[str, Any], command_line: dict[str, Any]) -> dict[str, Any]:
    merged = {**directives, **command_line}
    merged["l"] = {**directives["l"], **command_line["l"]}
    return merged


def _resource_pairs(value: str) -> dict[str, str]:
    pairs = {}
    for item in value.split(","):
        name, eq, setting = item.partition("=")
        if not eq or not name:
            raise Fail(f"qsub: illegal -l value\nqsub: {item}", 2)
        pairs[name] = setting
    return pairs


def _valid_name(name: str) -> bool:
    """check_job_name(): at most 236 characters of letters, digits and -_+, starting with a letter."""
    return 0 < len(name) <= 236 and name[0].isalpha() and all(c.isalnum() or c in "-_+" for c in name)


def _new_job(cfg: Config, options: dict[str, Any], default_name: str, args: Sequence[str]) -> dict[str, Any]:
    queue = (options.get("q") or "").partition("@")[0] or cfg.queues[0]
    if queue not in cfg.queues:
        raise Fail("qsub: Unknown queue", PBSE_UNKQUE)
    me = pwd.getpwuid(os.getuid())
    host = socket.gethostname()
    try:
        cwd = os.getcwd()
    except OSError:
        cwd = me.pw_dir
    environment = {"PBS_O_HOME": os.environ.get("HOME", me.pw_dir), "PBS_O_LANG": os.environ.get("LANG", ""),
                   "PBS_O_LOGNAME": me.pw_name, "PBS_O_PATH": os.environ.get("PATH", ""),
                   "PBS_O_MAIL": os.environ.get("MAIL", ""), "PBS_O_SHELL": os.environ.get("SHELL", me.pw_shell),
                   "PBS_O_WORKDIR": cwd, "PBS_O_SYSTEM": os.uname().sysname,
                   "PBS_O_QUEUE": options.get("q") or queue, "PBS_O_HOST": host}
    return {"name": options.get("N", default_name), "owner": me.pw_name, "home": me.pw_dir, "host": host,
            "cwd": cwd, "queue": queue, "account": options.get("A"),
            "project": options.get("P", "_pbs_project_default"),
            "join": options.get("j", "n"), "keep": options.get("k", "n"), "mail_points": options.get("m", "a"),
            "mail_users": options.get("M"), "rerunable": "False" if options.get("r") == "n" else "True",
            "ctime": int(time.time()), "variables": {k: v for k, v in environment.items() if v},
            "submit_arguments": " ".join(args), **_resources(options["l"])}


def _apply_queue(cfg: Config, job: dict[str, Any]) -> None:
    """What the server does with a job entering its queue: refuse it when the queue is not enabled or the job asks
    for more than the queue's resources_max; give it the queue's resources_default.walltime when it asked none."""
    attributes = cfg.queue_attributes.get(job["queue"], {})
    if attributes.get("enabled", "True").lower() in ("false", "f", "0", "n"):
        raise Fail("qsub: Queue is not enabled", PBSE_QUNOENB)
    default = attributes.get("resources_default.walltime")
    if job["walltime"] is None and default:
        job["walltime"] = _seconds(default)
        job["resources"] = dict(sorted({**job["resources"], "walltime": _hms(job["walltime"])}.items()))
    requested = {"walltime": job["walltime"], "ncpus": job["ncpus"], "ngpus": job["ngpus"],
                 "mem": sum(count * _bytes(chunk["mem"]) for count, chunk in job["chunks"] if "mem" in chunk),
                 "nodect": sum(count for count, _ in job["chunks"])}
    for name in _LIMITED:
        limit = attributes.get(f"resources_max.{name}")
        if limit is not None and requested[name] is not None and requested[name] > _amount(name, limit):
            raise Fail("qsub: Job exceeds queue resource limits", PBSE_EXCQRESC)


def _amount(name: str, value: str) -> int:
    return _seconds(value) if name == "walltime" else _bytes(value) if name == "mem" else int(value)


def _resources(requested: dict[str, str]) -> dict[str, Any]:
    """Resource_List and what the scheduler counts, from -l: `select` chunks, or old-style job-wide ncpus/mem."""
    for name in requested:
        if name not in _JOB_RESOURCES:
            raise Fail(f"qsub: Unknown resource: {name}", PBSE_UNKRESC)
    select = requested.get("select") or "1" + "".join(
        f":{name}={requested[name]}" for name in ("ncpus", "mem", "ngpus") if name in requested)
    chunks = []
    for spec in select.split("+"):
        count_text, *settings = spec.split(":")
        if not count_text.isdigit():  # "select=ncpus=2" means one chunk
            settings.insert(0, count_text)
            count_text = "1"
        chunk = {}
        for setting in settings:
            name, eq, value = setting.partition("=")
            if name not in _CHUNK_RESOURCES:
                raise Fail(f"qsub: Unknown resource: {name}", PBSE_UNKRESC)
            if not eq or not value:
                raise Fail("qsub: Illegal attribute or resource value Resource_List.select", PBSE_BADATVAL)
            chunk[name] = value
        chunks.append((int(count_text), chunk))
    ncpus = _total(chunks, "ncpus", 1)
    ngpus = _total(chunks, "ngpus", 0)
    mem = sum(count * _bytes(chunk["mem"]) for count, chunk in chunks if "mem" in chunk)
    listed = {"ncpus": str(ncpus), "nodect": str(sum(count for count, _ in chunks)),
              "place": requested.get("place", "pack"), "select": select}
    if mem:
        listed["mem"] = _size_text(mem)
    if ngpus:
        listed["ngpus"] = str(ngpus)
    walltime = None
    if "walltime" in requested:
        walltime = _seconds(requested["walltime"])
        listed["walltime"] = _hms(walltime)
    return {"resources": dict(sorted(listed.items())), "chunks": chunks, "ncpus": ncpus, "ngpus": ngpus,
            "walltime": walltime}


def _total(chunks: list[tuple[int, dict[str, str]]], name: str, default: int) -> int:
    try:
        return sum(count * int(chunk.get(name, default)) for count, chunk in chunks)
    except ValueError:
        raise Fail("qsub: Illegal attribute or resource value Resource_List.select", PBSE_BADATVAL) from None


def _bytes(size: str) -> int:
    match = _SIZE.fullmatch(size)
    if match is None:
        raise Fail("qsub: Illegal attribute or resource value Resource_List.select", PBSE_BADATVAL)
    number, scale, unit = match.groups()
    return int(number) * 1024 ** " kmgtp".index(scale.lower() or " ") * (8 if unit.lower() == "w" else 1)


def _size_text(size: int) -> str:
    for unit, scale in (("tb", 1024 ** 4), ("gb", 1024 ** 3), ("mb", 1024 ** 2), ("kb", 1024)):
        if size % scale == 0:
            return f"{size // scale}{unit}"
    return f"{size}b"


def _hms(seconds: int) -> str:
    return f"{seconds // 3600:02d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _seconds(walltime: str) -> int:
    match = _WALLTIME.fullmatch(walltime)
    seconds = 0 if match is None else sum(int(part or 0) * scale
                                          for part, scale in zip(match.groups(), (3600, 60, 1)))
    if seconds <= 0:
        raise Fail("qsub: Illegal attribute or resource value Resource_List.walltime", PBSE_BADATVAL)
    return seconds


def _paths(job: dict[str, Any], seq: str, options: dict[str, Any]) -> None:
    """Output and error paths: [host:]path, relative to the submission directory; a directory gets the
    default name, JOBNAME.oSEQ / JOBNAME.eSEQ."""
    for letter, kind in (("o", "output"), ("e", "error")):
        path = options.get(letter, "")
        if ":" in path and not path.startswith("/"):
            path = path.partition(":")[2]
        path = os.path.join(job["cwd"], path)
        if not options.get(letter) or path.endswith("/") or os.path.isdir(path):
            path = os.path.join(path, f"{job['name']}.{letter}{seq}")
        job[kind] = os.path.normpath(path)


def _wrapped_script(job_id: str, job: dict[str, Any], script: str) -> str:
    """The script localq runs: its directives, the job's PBS environment, then the user's script. Like PBS, the job
    starts in the owner's home directory."""
    first_chunk = job["chunks"][0][1]
    stdout = job["error"] if job["join"] == "eo" else job["output"]
    directives = {"name": job["name"], "comment": job_id, "chdir": job["home"], "output": stdout}
    if job["walltime"]:
        directives["time"] = str(job["walltime"])
    environment = {**job["variables"], "PBS_JOBID": job_id, "PBS_JOBNAME": job["name"], "PBS_QUEUE": job["queue"],
                   "PBS_ENVIRONMENT": "PBS_BATCH", "PBS_JOBDIR": job["home"],
                   "NCPUS": first_chunk.get("ncpus", "1"), "OMP_NUM_THREADS": first_chunk.get("ncpus", "1")}
    lines = [f"{localq.DIRECTIVE} --{key}={shlex.quote(value)}" for key, value in directives.items()]
    lines.append("umask 077")  # the job's umask attribute, 077 unless -W umask says otherwise
    lines += [f"export {name}={shlex.quote(value)}" for name, value in environment.items()]
    if job["join"] == "n":
        lines.append(f"exec 2>>{shlex.quote(job['error'])}")
    return "\n".join(lines) + "\n" + script


# ---- the scheduler ----------------------------------------------------------------------------------------

@contextmanager
def _scheduler_lock(cfg: Config) -> Iterator[None]:
    fd = os.open(cfg.home / "sched.lock", os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _try_start(cfg: Config, seq: str, job: dict[str, Any], wrapped: str) -> bool:
    """One scheduling attempt for a queued job; True once it has left the queue (started, deleted or gone)."""
    job_dir = cfg.jobs / seq
    with _scheduler_lock(cfg):
        if not job_dir.is_dir() or (job_dir / "deleted").exists():
            return True
        running = _running(cfg)
        comment, estimate = _blocked(cfg, job, running)
        if comment:
            queued = {"comment": comment, "estimated_start": estimate}
            if _read_json(job_dir / "queue.json") != queued:
                _write_json(job_dir / "queue.json", queued)
            return False
        taken = {slot for run in running for slot in run["slots"]}
        free_slots = (slot for slot in itertools.count() if slot not in taken)
        node = socket.gethostname().split(".")[0]
        hosts, vnodes, slots = [], [], []
        for count, chunk in job["chunks"]:
            for _ in range(count):
                slots.append(next(free_slots))
                hosts.append(f"{node}/{slots[-1]}*{chunk.get('ncpus', '1')}")
                vnodes.append(f"({node}:" + ":".join(f"{name}={_vnode_value(name, value)}"
                                                     for name, value in {"ncpus": "1", **chunk}.items()
                                                     if name in ("ncpus", "mem", "ngpus")) + ")")
        localq_id = localq.submit(cfg.spool, wrapped, cfg.kill_delay)
        _write_json(job_dir / "run.json", {
            "localq_id": localq_id, "stime": int(time.time()), "slots": slots, "exec_host": "+".join(hosts),
            "exec_vnode": "+".join(vnodes), "ncpus": job["ncpus"], "ngpus": job["ngpus"],
            "walltime": job["walltime"]})
        return True


def _vnode_value(name: str, value: str) -> str:
    return f"{_bytes(value) // 1024}kb" if name == "mem" else value


def _running(cfg: Config) -> list[dict[str, Any]]:
    """The run records of the jobs that hold resources (started and not ended), each with its job's "seq", in
    submission order."""
    running = []
    for name in sorted((n for n in os.listdir(cfg.jobs) if n.isdigit()), key=int):
        run = _read_json(cfg.jobs / name / "run.json")
        if run is not None and localq.status(cfg.spool, run["localq_id"])["state"] not in _LOCALQ_ENDED:
            running.append({**run, "seq": name})
    return running


def _blocked(cfg: Config, job: dict[str, Any], running: list[dict[str, Any]]) -> tuple[str | None, int | None]:
    """The scheduler's comment on a job that does not fit now, and when it should; (None, None) when it fits."""
    for resource, total in (("ncpus", cfg.ncpus), ("ngpus", cfg.ngpus)):
        need = job[resource]
        available = total - sum(run[resource] for run in running)
        shortage = f"Insufficient amount of resource: {resource} (R: {need} A: {available} T: {total})"
        if need > total:
            return f"Can Never Run: {shortage}", None
        if need > available:
            return f"Not Running: {shortage}", _estimate(cfg, job, running)
    return None, None


def _estimate(cfg: Config, job: dict[str, Any], running: list[dict[str, Any]]) -> int | None:
    """When enough running jobs will have reached their walltime for this one to fit; unknown while any of them
    has no walltime."""
    if any(run["walltime"] is None for run in running):
        return None
    free = {resource: total - sum(run[resource] for run in running)
            for resource, total in (("ncpus", cfg.ncpus), ("ngpus", cfg.ngpus))}
    for run in sorted(running, key=lambda r: r["stime"] + r["walltime"]):
        free = {resource: amount + run[resource] for resource, amount in free.items()}
        if all(job[resource] <= amount for resource, amount in free.items()):
            return run["stime"] + run["walltime"]
    return None


def _wait_in_queue(seq: str, job: dict[str, Any], wrapped: str) -> None:
    """Keep trying to start the job from a detached process of its owner, so that it runs as the owner. The script,
    which may hold secrets, reaches it through a pipe."""
    waiter = subprocess.Popen([sys.executable, os.path.abspath(__file__), "queued", seq], stdin=subprocess.PIPE,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    assert waiter.stdin is not None
    with waiter.stdin:
        waiter.stdin.write(json.dumps({"job": job, "script": wrapped}).encode())


def _queued_main(seq: str) -> int:
    cfg = load_config()
    queued = json.load(sys.stdin)
    while not _try_start(cfg, seq, queued["job"], queued["script"]):
        time.sleep(QUEUED_TICK_S)
    return 0


# ---- what qstat shows -------------------------------------------------------------------------------------

def job_attributes(cfg: Config, seq: str) -> list[tuple[str, Any]] | None:
    """A job's attributes as the server reports them, in its order; None for a job the server does not know."""
    job_dir = cfg.jobs / seq
    job = _read_json(job_dir / "job.json")
    if job is None:
        return None
    run = _read_json(job_dir / "run.json")
    queued = _read_json(job_dir / "queue.json") or {}
    comment, end, exit_status, session = queued.get("comment"), None, None, None
    if run is None:
        end = _mtime(job_dir / "deleted")
        state, substate = ("Q", 10) if end is None else ("F", TERMINATED)
    else:
        localq_dir = os.path.join(cfg.spool, run["localq_id"])
        status = localq.status(cfg.spool, run["localq_id"])
        session = (localq._read_json(localq_dir, "running.json") or {}).get("pid")
        started = time.strftime("%a %b %d at %H:%M", time.localtime(run["stime"]))
        comment = f"Job run at {started} on {run['exec_vnode']}"
        if status["state"] in _LOCALQ_ENDED:
            ended = localq._read_json(localq_dir, "end.json") or {}
            end = int(ended.get("end_time", time.time()))
            exit_status, substate = _exit_status(status["state"], status["exit_code"], status["reason"])
            state = "F"
            comment += f" and {_ENDED_AS[substate]}"
        else:
            state, substate = ("E", 50) if status["state"] == "COMPLETING" else ("R", 42)
    host, owner = job["host"], job["owner"]
    attributes: list[tuple[str, Any]] = [("Job_Name", job["name"]), ("Job_Owner", f"{owner}@{host}")]
    if run is not None:
        elapsed = int((end or time.time()) - run["stime"])
        attributes.append(("resources_used", {
            "cpupercent": "0", "cput": "00:00:00", "mem": "0kb", "ncpus": str(run["ncpus"]), "vmem": "0kb",
            "walltime": _hms(elapsed)}))
    attributes += [("job_state", state), ("queue", job["queue"]), ("server", cfg.server)]
    if job["account"]:
        attributes.append(("Account_Name", job["account"]))
    attributes += [("Checkpoint", "u"), ("ctime", time.ctime(job["ctime"])), ("Error_Path", f"{host}:{job['error']}")]
    if run is not None:
        attributes += [("exec_host", run["exec_host"]), ("exec_vnode", run["exec_vnode"])]
    attributes += [("Hold_Types", "n"), ("Join_Path", job["join"]), ("Keep_Files", job["keep"]),
                   ("Mail_Points", job["mail_points"])]
    if job["mail_users"]:
        attributes.append(("Mail_Users", job["mail_users"]))
    changed = max(t for t in (job["ctime"], run and run["stime"], end) if t)
    attributes += [("mtime", time.ctime(changed)), ("Output_Path", f"{host}:{job['output']}"), ("Priority", "0"),
                   ("qtime", time.ctime(job["ctime"])), ("Rerunable", job["rerunable"]),
                   ("Resource_List", job["resources"])]
    if run is not None:
        attributes.append(("stime", time.ctime(run["stime"])))
    if end is not None:
        attributes.append(("obittime", time.ctime(end)))
    if session is not None:
        attributes.append(("session_id", str(session)))
    if run is not None:
        attributes.append(("jobdir", job["home"]))
    attributes += [("substate", str(substate)), ("Variable_List", job["variables"])]
    if comment:
        attributes.append(("comment", comment))
    attributes.append(("etime", time.ctime(job["ctime"])))
    if state == "Q" and queued.get("estimated_start"):
        attributes.append(("estimated", {"start_time": time.ctime(queued["estimated_start"])}))
    if run is not None:
        attributes.append(("run_count", "1"))
    if exit_status is not None:
        attributes.append(("Exit_status", str(exit_status)))
    if job["submit_arguments"]:
        attributes.append(("Submit_arguments", job["submit_arguments"]))
    if end is not None:
        attributes.append(("history_timestamp", str(end)))
    attributes += [("project", job["project"]), ("Submit_Host", host)]
    return attributes


def _exit_status(state: str, code: int | None, reason: str) -> tuple[int | None, int]:
    """Exit_status and substate of a job localq ran. PBS reports a job whose shell a signal killed as 256 + the
    signal (localq, like a shell, as 128 + it), and one that outran its walltime as JOB_EXEC_KILL_WALLTIME."""
    if state == "TIMEOUT":
        return JOB_EXEC_KILL_WALLTIME, FAILED
    if code is not None and code > 128 and (state == "CANCELLED" or reason.startswith("Signal")):
        code += 128
    if state == "CANCELLED":
        return code, TERMINATED
    if code is None:  # it could not start, or its supervisor was lost
        return JOB_EXEC_FAIL1, FAILED
    return code, FINISHED if code == 0 else FAILED


# ---- qstat ------------------------------------------------------------------------------------------------

def qstat(cfg: Config, args: list[str]) -> int:
    try:
        pairs, operands = getopt.getopt(args, "BfF:Qx")
    except getopt.GetoptError as e:
        raise Fail(f"qstat: {e} (hpchub's PBS emulator emulates qstat [-f [-F json]] [-x] [job_id...] and "
                   "qstat -Q|-B -f [-F json])", 2) from None
    flags = dict(pairs)
    output = flags.get("-F", "").lower()
    if output not in ("", "json") or (output and "-f" not in flags):
        raise Fail(f"qstat: -F {output} is not emulated; hpchub's PBS emulator emulates -f [-F json]", 2)
    if "-Q" in flags or "-B" in flags:
        return _qstat_server_or_queues(cfg, "Queue" if "-Q" in flags else "Server", flags, operands)
    history = "-x" in flags
    failed = 0
    jobs: list[pbs_format.Job] = []
    if cfg.down:
        message = f"Connection refused\nqstat: cannot connect to server {cfg.server} (errno={PBSE_SYSTEM})\n"
        sys.stderr.write(message * max(1, len(operands)))  # one connection attempt per operand
        failed = -1  # qstat exits with the failed connection's -1
        operands = []
    elif not operands:
        for seq in sorted((n for n in os.listdir(cfg.jobs) if n.isdigit()), key=int):
            attributes = job_attributes(cfg, seq)
            if attributes is not None and (history or dict(attributes)["job_state"] != "F"):
                jobs.append((f"{seq}.{cfg.server}", attributes))
    for operand in operands:
        match = _JOB_ID.fullmatch(operand)
        if match is None:
            print(f"qstat: illegally formed job identifier: {operand}", file=sys.stderr)
            failed = 1
            continue
        job_id = f"{match.group(1)}.{match.group(2) or cfg.server}"
        attributes = job_attributes(cfg, match.group(1)) if _ours(cfg, match.group(2)) else None
        if attributes is None:
            print(f"qstat: Unknown Job Id {job_id}", file=sys.stderr)
            failed = PBSE_UNKJOBID
        elif dict(attributes)["job_state"] == "F" and not history:
            print(f"qstat: {job_id} Job has finished, use -x or -H to obtain historical job information",
                  file=sys.stderr)
            failed = PBSE_HISTJOBID
        else:
            jobs.append((f"{match.group(1)}.{cfg.server}", attributes))
    if output == "json":
        sys.stdout.write(pbs_format.json_document(int(time.time()), PBS_VERSION, cfg.server, "Jobs", jobs))
    elif "-f" in flags:
        sys.stdout.write(pbs_format.full_text(jobs, header="Job Id: "))
    else:
        sys.stdout.write(pbs_format.table(jobs))
    return failed & 0xFF


def _qstat_server_or_queues(cfg: Config, kind: str, flags: dict[str, str], operands: list[str]) -> int:
    """`qstat -Q -f [-F json] [queue...]` and `qstat -B -f [-F json]`."""
    if "-f" not in flags or "-x" in flags or (kind == "Server" and operands):
        raise Fail(f"qstat: hpchub's PBS emulator emulates qstat -{kind[0]} -f [-F json]"
                   f"{' [queue...]' if kind == 'Queue' else ''} only", 2)
    if cfg.down:
        sys.stdout.write(pbs_format.json_document(int(time.time()), PBS_VERSION, cfg.server, kind, [])
                         if flags.get("-F") else "")
        sys.stderr.write(f"Connection refused\nqstat: cannot connect to server {cfg.server} (errno={PBSE_SYSTEM})\n")
        return -1 & 0xFF
    jobs = _job_summaries(cfg)
    failed = 0
    if kind == "Server":
        objects = [(cfg.server, server_attributes(cfg, jobs))]
    else:
        objects = []
        for queue in operands or cfg.queues:
            if queue.partition("@")[0] not in cfg.queues:
                print(f"qstat: Unknown queue {queue}", file=sys.stderr)
                failed = PBSE_UNKQUE
            else:
                objects.append((queue.partition("@")[0], queue_attributes(cfg, queue.partition("@")[0], jobs)))
    if flags.get("-F"):
        sys.stdout.write(pbs_format.json_document(int(time.time()), PBS_VERSION, cfg.server, kind, objects))
    else:
        sys.stdout.write(pbs_format.full_text(objects, header=f"{kind}: "))
    return failed & 0xFF


def _job_summaries(cfg: Config) -> list[dict[str, Any]]:
    """Every job's queue, state and Resource_List, for the counts qstat -Q and -B show."""
    summaries = []
    for seq in sorted((n for n in os.listdir(cfg.jobs) if n.isdigit()), key=int):
        attributes = job_attributes(cfg, seq)
        if attributes is not None:
            job = dict(attributes)
            summaries.append({"queue": job["queue"], "state": job["job_state"], "resources": job["Resource_List"]})
    return summaries


def _state_count(jobs: list[dict[str, Any]]) -> str:
    """"Transit:0 Queued:1 Held:0 Waiting:0 Running:2 Exiting:0 Begun:0 " (the trailing space is qstat's)."""
    counts = {"T": 0, "Q": 0, "H": 0, "W": 0, "R": 0, "E": 0, "B": 0}
    for job in jobs:
        if job["state"] in counts:
            counts[job["state"]] += 1
    names = {"T": "Transit", "Q": "Queued", "H": "Held", "W": "Waiting", "R": "Running", "E": "Exiting", "B": "Begun"}
    return "".join(f"{names[state]}:{count} " for state, count in counts.items())


def _assigned(jobs: list[dict[str, Any]]) -> dict[str, str]:
    """resources_assigned of the running jobs among `jobs`, as the server sums it."""
    running = [job["resources"] for job in jobs if job["state"] in ("R", "E")]
    mem = sum(_bytes(r["mem"]) for r in running if "mem" in r)
    return {"mem": f"{mem // 1024}kb", "mpiprocs": "0", "ncpus": str(sum(int(r.get("ncpus", 0)) for r in running)),
            "nodect": str(sum(int(r.get("nodect", 0)) for r in running))}


def queue_attributes(cfg: Config, queue: str, jobs: list[dict[str, Any]]) -> list[tuple[str, Any]]:
    """A queue's attributes in qstat -Q -f's order: type, counts, the attributes set on it, its resource groups,
    what its jobs hold, enabled and started."""
    mine = [job for job in jobs if job["queue"] == queue and job["state"] != "F"]
    configured = cfg.queue_attributes.get(queue, {})
    attributes: list[tuple[str, Any]] = [("queue_type", "Execution")]
    if "Priority" in configured:
        attributes.append(("Priority", configured["Priority"]))
    attributes += [("total_jobs", str(len(mine))), ("state_count", _state_count(mine))]
    attributes += [(name, value) for name, value in configured.items()
                   if "." not in name and name not in ("Priority", "enabled", "started")]
    for group in _QUEUE_RESOURCES:
        resources = {name.partition(".")[2]: value for name, value in sorted(configured.items())
                     if name.startswith(f"{group}.")}
        if resources:
            attributes.append((group, resources))
    attributes += [("resources_assigned", _assigned(mine)), ("enabled", configured.get("enabled", "True")),
                   ("started", configured.get("started", "True"))]
    return attributes


def server_attributes(cfg: Config, jobs: list[dict[str, Any]]) -> list[tuple[str, Any]]:
    """The server's attributes in qstat -B -f's order (those a default installation sets)."""
    unfinished = [job for job in jobs if job["state"] != "F"]
    return [("server_state", "Active"), ("server_host", socket.gethostname()), ("scheduling", "True"),
            ("total_jobs", str(len(unfinished))), ("state_count", _state_count(unfinished)),
            ("default_queue", cfg.queues[0]), ("log_events", "511"), ("mail_from", "adm"),
            ("query_other_jobs", "True"), ("resources_default", {"ncpus": "1"}), ("default_chunk", {"ncpus": "1"}),
            ("resources_assigned", _assigned(unfinished)), ("scheduler_iteration", "600"), ("flatuid", "True"),
            ("resv_enable", "True"), ("node_fail_requeue", "310"), ("max_array_size", "10000"),
            ("pbs_license_min", "0"), ("pbs_license_max", "2147483647"), ("pbs_license_linger_time", "31536000"),
            ("license_count", "Avail_Global:1000000 Avail_Local:1000000 Used:0 High_Use:0"),
            ("pbs_version", PBS_VERSION.partition(" ")[0]), ("eligible_time_enable", "False"),
            ("max_concurrent_provision", "5"), ("max_job_sequence_id", "9999999")]


# ---- pbsnodes ---------------------------------------------------------------------------------------------

def pbsnodes(cfg: Config, args: list[str]) -> int:
    """`pbsnodes -a [-v] [-F json]`: the one execution node, this host."""
    try:
        pairs, operands = getopt.getopt(args, "avF:")
    except getopt.GetoptError:
        pairs, operands = [("-?", "")], []
    flags = dict(pairs)
    if "-a" not in flags or operands or set(flags) - {"-a", "-v", "-F"} or \
            flags.get("-F", "json").lower() not in ("json", "default"):
        raise Fail(f"usage:\t{sys.argv[0]} -a[v][S[j][L]][-F format][-D delim][-s server]\n"
                   "(hpchub's PBS emulator emulates pbsnodes -a [-v] [-F json])", 1)
    if cfg.down:
        raise Fail(f"Connection refused\n{sys.argv[0]}: cannot connect to server {cfg.server}, error={PBSE_SYSTEM}",
                   1)
    node = socket.gethostname().split(".")[0]
    attributes = node_attributes(cfg, node)
    if flags.get("-F", "").lower() == "json":
        sys.stdout.write(pbs_format.json_document(int(time.time()), PBS_VERSION, cfg.server, "nodes",
                                                  [(node, attributes)]))
    else:
        sys.stdout.write(pbs_format.node_text([(node, attributes)]))
    return 0


def node_attributes(cfg: Config, node: str) -> list[tuple[str, Any]]:
    """The execution node as pbs_server reports it: "free" while any CPU is, "job-busy" when all are assigned."""
    running = _running(cfg)
    ncpus = sum(run["ncpus"] for run in running)
    ngpus = sum(run["ngpus"] for run in running)
    available = {"arch": "linux", "host": node, "mem": f"{_bytes(cfg.mem) // 1024}kb", "ncpus": str(cfg.ncpus)}
    if cfg.ngpus:
        available["ngpus"] = str(cfg.ngpus)
    available["vnode"] = node
    changed = max((run["stime"] for run in running), default=int(cfg.home.stat().st_mtime))
    attributes: list[tuple[str, Any]] = [
        ("Mom", socket.gethostname()), ("Port", "15002"), ("pbs_version", PBS_VERSION.partition(" ")[0]),
        ("ntype", "PBS"), ("state", "job-busy" if ncpus >= cfg.ncpus else "free"), ("pcpus", str(cfg.ncpus))]
    if running:
        # one entry per CPU a job holds, as the server sends it; pbs_format writes JSON with each job once
        attributes.append(("jobs", ", ".join(f"{run['seq']}.{cfg.server}/{slot}" for run in running
                                             for slot in range(run["ncpus"]))))
    assigned = {"ncpus": str(ncpus)}
    if ngpus:
        assigned["ngpus"] = str(ngpus)
    attributes += [("resources_available", available), ("resources_assigned", assigned), ("resv_enable", "True"),
                   ("sharing", "default_shared"), ("last_state_change_time", str(changed))]
    if running:
        attributes.append(("last_used_time", str(changed)))
    return attributes


def _ours(cfg: Config, server: str | None) -> bool:
    """A job id names this server when its suffix is the server's name, alone or with a domain."""
    return server is None or server == cfg.server or server.startswith(cfg.server + ".")


# ---- qdel -------------------------------------------------------------------------------------------------

def qdel(cfg: Config, args: list[str]) -> int:
    try:
        pairs, operands = getopt.getopt(args, "W:x")
    except getopt.GetoptError:
        pairs, operands = [("-?", "")], []
    if not operands or any(flag != "-W" or value != "force" for flag, value in pairs):
        raise Fail("usage:\n\tqdel [-W force|suppress_email=X] [-x] job_identifier...\n\tqdel --version\n"
                   "(hpchub's PBS emulator emulates qdel [-W force] job_identifier...)", 2)
    failed = 0
    matches = []
    for operand in operands:
        match = _JOB_ID.fullmatch(operand)
        if match is None:
            print(f"qdel: illegally formed job identifier: {operand}", file=sys.stderr)
            failed = 1
        else:
            matches.append(match)
    if cfg.down:
        raise Fail(f"Connection refused\nCouldn't connect to cluster: {cfg.server}", PBSE_SYSTEM)
    for match in matches:
        job_id = f"{match.group(1)}.{match.group(2) or cfg.server}"
        error = _delete(cfg, match.group(1)) if _ours(cfg, match.group(2)) else (PBSE_UNKJOBID, "Unknown Job Id")
        if error is not None:
            print(f"qdel: {error[1]} {job_id}", file=sys.stderr)
            failed = error[0]
    return failed & 0xFF


def _delete(cfg: Config, seq: str) -> tuple[int, str] | None:
    """Delete one job: (PBS error number, text) when it cannot be."""
    job_dir = cfg.jobs / seq
    if _read_json(job_dir / "job.json") is None:
        return PBSE_UNKJOBID, "Unknown Job Id"
    if os.geteuid() not in (0, job_dir.stat().st_uid):
        return PBSE_PERM, "Unauthorized Request "
    with _scheduler_lock(cfg):
        run = _read_json(job_dir / "run.json")
        if run is None:
            try:
                os.close(os.open(job_dir / "deleted", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
            except FileExistsError:
                return PBSE_HISTJOBID, "Job has finished"
            return None
        if localq.status(cfg.spool, run["localq_id"])["state"] in _LOCALQ_ENDED:
            return PBSE_HISTJOBID, "Job has finished"
        localq.cancel(cfg.spool, run["localq_id"])
    return None


# ---- files ------------------------------------------------------------------------------------------------

def _read_json(path: Path) -> Any:
    return localq._read_json(str(path.parent), path.name)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    localq._write_json(str(path), data)


def _mtime(path: Path) -> int | None:
    try:
        return int(path.stat().st_mtime)
    except FileNotFoundError:
        return None


# ---- installation -----------------------------------------------------------------------------------------

def install(dest: Path, *, python: str, server: str, queues: Sequence[str], ncpus: int, ngpus: int, mem: str,
            kill_delay: float, queue_attributes: Sequence[str] = ()) -> Path:
    """Install the commands into DEST/bin, with DEST/home as PBS_HOME; returns DEST/bin. Everything is
    world-readable: the commands run as the users who submit."""
    here = Path(__file__).resolve().parent
    bin_dir, home = dest / "bin", dest / "home"
    for directory in (dest, bin_dir, home):
        directory.mkdir(mode=0o755, exist_ok=True)
        directory.chmod(0o755)
    for command in COMMANDS:
        body = (here / command).read_text().split("\n", 1)[1]
        (bin_dir / command).write_text(f"#!{python}\n{body}")
        (bin_dir / command).chmod(0o755)
    for module in ("pbs_emu.py", "pbs_format.py"):
        shutil.copyfile(here / module, bin_dir / module)
        (bin_dir / module).chmod(0o644)
    settings = "".join(f"{_QATTR}{_queue_attribute(setting, queues)}\n" for setting in queue_attributes)
    (bin_dir / "pbs.conf").write_text(
        f"PBS_SERVER={server}\nPBS_HOME={home}\nPBS_EMU_QUEUES={','.join(queues)}\nPBS_EMU_NCPUS={ncpus}\n"
        f"PBS_EMU_NGPUS={ngpus}\nPBS_EMU_MEM={mem}\nPBS_EMU_KILL_DELAY={kill_delay:g}\n{settings}")
    (bin_dir / "pbs.conf").chmod(0o644)
    for spool in ("jobs", "localq"):
        ensure_spool(str(home / spool))
    (home / "sched.lock").touch(0o644)
    return bin_dir


def _queue_attribute(setting: str, queues: Sequence[str]) -> str:
    """"debug:resources_max.walltime=01:00:00" -> "debug.resources_max.walltime=01:00:00", for a known queue."""
    queue, colon, assignment = setting.partition(":")
    name, eq, value = assignment.partition("=")
    if not colon or not eq or queue not in queues or not name or not value:
        raise SystemExit(f"--queue-attr {setting!r}: expected QUEUE:NAME=VALUE with QUEUE one of {', '.join(queues)}")
    return f"{queue}.{name}={value}"


def _install_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="pbs_emu.py install", description="Install hpchub's PBS emulator.")
    parser.add_argument("dest", type=Path, help="directory to install into (DEST/bin, DEST/home)")
    parser.add_argument("--python", default=sys.executable,
                        help="a Python every user can run that imports `schedulers` (default: this one)")
    parser.add_argument("--server", default="pbsemu", help="the server name in job ids")
    parser.add_argument("--queues", default="workq", help="comma-separated queue names; the first is the default")
    parser.add_argument("--ncpus", type=int, default=8, help="CPUs of the execution node")
    parser.add_argument("--ngpus", type=int, default=0, help="GPUs of the execution node")
    parser.add_argument("--mem", default="16gb", help="memory of the execution node (a PBS size: 16gb, 512mb)")
    parser.add_argument("--queue-attr", action="append", default=[], metavar="QUEUE:NAME=VALUE",
                        help="a queue attribute, e.g. debug:resources_max.walltime=01:00:00 (repeat for more)")
    parser.add_argument("--kill-delay", type=float, default=10.0, help="seconds from SIGTERM to SIGKILL")
    args = parser.parse_args(argv)
    print(install(args.dest.resolve(), python=args.python, server=args.server, queues=args.queues.split(","),
                  ncpus=args.ncpus, ngpus=args.ngpus, mem=args.mem, kill_delay=args.kill_delay,
                  queue_attributes=args.queue_attr))
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["queued"] and len(sys.argv) == 3:
        sys.exit(_queued_main(sys.argv[2]))
    if sys.argv[1:2] != ["install"]:
        sys.exit("usage: python pbs_emu.py install DEST [options]  (then run DEST/bin/qsub, qstat, qdel, pbsnodes)")
    sys.exit(_install_main(sys.argv[2:]))
