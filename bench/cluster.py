"""The benchmark's own Slurm: a private slurmctld and slurmd's on this host, apart from the test cluster.

Its settings are the test cluster's (docker/slurm-cluster/slurm.conf.in: proctrack/linuxproc, task/none,
cons_tres, `SlurmdParameters=config_overrides`, several `slurmd -N` on one host, each node on its own port,
the node names in /etc/hosts), with its own cluster name, ports, state, spool and log directories under
the bench's work directory, and enough configured CPUs for every job of the largest benchmark. munged is
the machine's (shared, already running). Every Slurm command of the benchmark runs with SLURM_CONF set
to this cluster's slurm.conf: `env()` gives the variables.
"""
from __future__ import annotations

import math
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

CLUSTER_NAME = "hpchubbench"
CTLD_PORT = 6917                 # the test cluster uses 6817/6818 and 17001-17002
NODE_PORT_BASE = 27001
NODE_PREFIX = "hbn"              # hpchub bench node: hbn1, hbn2, ...
PARTITION = "bench"
HOSTS_MARK = "# hpchub-bench-node"
READY_TIMEOUT_S = 60

# RPCs that slurmd's and job steps send by themselves, and sdiag's own: not the hub's doing
NODE_MESSAGES = frozenset({
    "MESSAGE_NODE_REGISTRATION_STATUS", "MESSAGE_EPILOG_COMPLETE", "REQUEST_COMPLETE_BATCH_SCRIPT",
    "REQUEST_COMPLETE_PROLOG", "REQUEST_STEP_COMPLETE", "REQUEST_STEP_COMPLETE_AGGR", "REQUEST_JOB_STEP_CREATE",
    "REQUEST_JOB_ALLOCATION_INFO", "REQUEST_JOB_READY", "REQUEST_HET_JOB_ALLOC_INFO", "REQUEST_UPDATE_NODE",
})
OWN_MESSAGES = frozenset({"REQUEST_STATS_INFO"})

CONF_TEMPLATE = """\
# The private Slurm of hpchub's benchmarks (bench/cluster.py writes it at every start).
ClusterName={cluster}
SlurmctldHost={host}(127.0.0.1)
SlurmUser=slurm
SlurmdUser=root
SlurmctldPort={ctld_port}
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmdPidFile={root}/run/slurmd-%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
# no per-step sampling of /proc: a thousand steps doing it would load the machine being measured
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
MailProg=/bin/true
SwitchType=switch/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2,batch_sched_delay=0
SlurmdParameters=config_overrides
ReturnToService=2
SlurmctldTimeout=60
# a machine busy starting a thousand jobs answers pings late: do not mark nodes down for it
SlurmdTimeout=600
InactiveLimit=0
MinJobAge=300
MaxJobCount=50000
KillWait=5
Waittime=0
MessageTimeout=30
NodeName={prefix}[1-{nodes}] NodeHostname={host} NodeAddr=127.0.0.1 Port=[{node_port}-{node_port_last}] CPUs={cpus} RealMemory=64000 State=UNKNOWN
PartitionName={partition} Nodes={prefix}[1-{nodes}] Default=YES MaxTime=INFINITE State=UP
"""


@dataclass
class RpcCounts:
    """Cumulative slurmctld RPC counts from one `sdiag`."""
    by_type: dict[str, int]
    by_user: dict[str, int]
    at: float

    def __sub__(self, earlier: "RpcCounts") -> "RpcDelta":
        def diff(now: dict[str, int], before: dict[str, int]) -> dict[str, int]:
            return {k: v - before.get(k, 0) for k, v in now.items() if v - before.get(k, 0) > 0}
        return RpcDelta(diff(self.by_type, earlier.by_type), diff(self.by_user, earlier.by_user),
                        self.at - earlier.at)


@dataclass
class RpcDelta:
    by_type: dict[str, int]
    by_user: dict[str, int]
    seconds: float

    @property
    def hub(self) -> int:
        """RPCs the hubs caused: all but slurmd's own messages and the benchmark's sdiag calls."""
        return sum(n for t, n in self.by_type.items() if t not in NODE_MESSAGES | OWN_MESSAGES)

    @property
    def other(self) -> dict[str, int]:
        return {t: n for t, n in self.by_type.items() if t in NODE_MESSAGES}

    def as_dict(self) -> dict:
        return {"hub_rpcs": self.hub, "seconds": round(self.seconds, 3), "by_type": self.by_type,
                "by_user": self.by_user, "excluded_node_messages": self.other}


def parse_sdiag(text: str, at: float) -> RpcCounts:
    """The two RPC tables of `sdiag`: "by message type" and "by user" (name (id) count:N ...)."""
    section = None
    by_type: dict[str, int] = {}
    by_user: dict[str, int] = {}
    for line in text.splitlines():
        if line.startswith("Remote Procedure Call statistics by message type"):
            section = by_type
        elif line.startswith("Remote Procedure Call statistics by user"):
            section = by_user
        elif line and not line[0].isspace():
            section = None
        elif section is not None:
            m = re.match(r"\s+(\S+)\s+\(\s*\d+\)\s+count:(\d+)", line)
            if m:
                section[m.group(1)] = int(m.group(2))
    if not by_type:
        raise RuntimeError(f"sdiag printed no RPC statistics:\n{text[:2000]}")
    return RpcCounts(by_type, by_user, at)


class PrivateSlurm:
    """start() / stop() the benchmark's Slurm; `jobs`, `sdiag`, `cancel_all` run its commands."""

    def __init__(self, workdir: Path, *, cpus_needed: int, nodes: int = 4):
        self.root = workdir / "slurm"
        self.conf = self.root / "slurm.conf"
        self.nodes = [f"{NODE_PREFIX}{i}" for i in range(1, nodes + 1)]
        self.cpus_per_node = max(8, math.ceil(cpus_needed * 1.1 / nodes))
        self._procs: list[subprocess.Popen] = []

    def env(self) -> dict[str, str]:
        return {"SLURM_CONF": str(self.conf)}

    def timestamp_job(self, user: str, home: Path, marker: Path) -> list[str]:
        """argv submitting, as `user` and with no hub, a job whose first line writes the time into `marker`:
        `sudo -n -u USER env SLURM_CONF=... sbatch`, as both hubs submit."""
        return ["sudo", "-n", "-u", user, "--", "env", f"SLURM_CONF={self.conf}", "sbatch", "--parsable",
                "--output=/dev/null", f"--chdir={home}", "--wrap", f"date +%s.%N > {marker}; sleep 600"]

    def run(self, *argv: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=check,
                              env={**os.environ, **self.env()})

    # -- start and stop ------------------------------------------------------------------------
    def start(self) -> None:
        self._stop_leftovers()
        shutil.rmtree(self.root / "state", ignore_errors=True)   # each run starts from an empty cluster
        shutil.rmtree(self.root / "spool", ignore_errors=True)
        for name, owner in (("state", "slurm"), ("log", "slurm"), ("run", "slurm"), ("spool", "root")):
            (self.root / name).mkdir(parents=True, exist_ok=True)
            shutil.chown(self.root / name, owner, owner)
        for node in self.nodes:
            (self.root / "spool" / node).mkdir(exist_ok=True)
        for path in (self.root.parent, self.root):
            path.chmod(0o755)        # the jobs' users read slurm.conf
        host = socket.gethostname().split(".")[0]
        self.conf.write_text(CONF_TEMPLATE.format(
            cluster=CLUSTER_NAME, host=host, ctld_port=CTLD_PORT, root=self.root, prefix=NODE_PREFIX,
            nodes=len(self.nodes), node_port=NODE_PORT_BASE, node_port_last=NODE_PORT_BASE + len(self.nodes) - 1,
            cpus=self.cpus_per_node, partition=PARTITION))
        self.conf.chmod(0o644)
        self._write_hosts()
        self._launch("slurmctld", "slurmctld", "-D")
        for node in self.nodes:
            self._launch(f"slurmd-{node}", "slurmd", "-D", "-N", node)
        self._wait_ready()

    def _launch(self, name: str, *argv: str) -> None:
        with open(self.root / "log" / f"{name}.out", "ab") as out:
            self._procs.append(subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, cwd="/",
                                                env={**os.environ, **self.env()}, start_new_session=True))

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            dead = [p.args for p in self._procs if p.poll() is not None]
            if dead:
                raise RuntimeError(f"Slurm daemon exited: {dead}; see {self.root / 'log'}")
            states = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False, timeout=15)
            up = {line.split()[0] for line in states.stdout.splitlines() if line.split()[1:] in (["idle"], ["mix"])}
            if states.returncode == 0 and up >= set(self.nodes):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the benchmark's Slurm is not ready after {READY_TIMEOUT_S} s: "
                                   f"{states.stdout}{states.stderr}; see {self.root / 'log'}")
            time.sleep(0.5)

    def stop(self) -> None:
        for proc in reversed(self._procs):         # the slurmd's, then slurmctld
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)
        self._procs.clear()
        self._remove_hosts()

    def _stop_leftovers(self) -> None:
        """Daemons of an earlier run of the benchmark that did not stop (it was killed): by their pid files."""
        for pidfile in (self.root / "run").glob("*.pid") if (self.root / "run").is_dir() else ():
            try:
                pid = int(pidfile.read_text().split()[0])
                comm = Path(f"/proc/{pid}/comm").read_text().strip()
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except (OSError, ValueError, IndexError):
                pidfile.unlink(missing_ok=True)
                continue
            if comm in ("slurmctld", "slurmd") and (self.conf.as_posix().encode() in cmdline or
                                                    self._env_has_conf(pid)):
                os.kill(pid, signal.SIGTERM)
                for _ in range(100):
                    if not Path(f"/proc/{pid}").exists() or _zombie(pid):
                        break
                    time.sleep(0.1)
            pidfile.unlink(missing_ok=True)

    def _env_has_conf(self, pid: int) -> bool:
        try:
            return f"SLURM_CONF={self.conf}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            return False

    def _write_hosts(self) -> None:
        lines = [line for line in Path("/etc/hosts").read_text().splitlines() if not line.endswith(HOSTS_MARK)]
        lines += [f"127.0.0.1 {node} {HOSTS_MARK}" for node in self.nodes]
        _rewrite_in_place(Path("/etc/hosts"), "\n".join(lines) + "\n")

    def _remove_hosts(self) -> None:
        text = Path("/etc/hosts").read_text()
        kept = [line for line in text.splitlines() if not line.endswith(HOSTS_MARK)]
        if len(kept) != len(text.splitlines()):
            _rewrite_in_place(Path("/etc/hosts"), "\n".join(kept) + "\n")

    # -- commands ------------------------------------------------------------------------------
    def sdiag(self) -> RpcCounts:
        return parse_sdiag(self.run("sdiag").stdout, time.monotonic())

    def jobs(self) -> dict[str, int]:
        """Number of jobs in each state."""
        out = self.run("squeue", "-h", "-o", "%T").stdout.split()
        return {state: out.count(state) for state in set(out)}

    def cancel_all(self, timeout: float = 300) -> None:
        """Cancel every job of the partition and wait until none is left (running or completing)."""
        deadline = time.monotonic() + timeout
        # a thousand jobs' srun steps take slurmctld more than scancel's usual minute
        self.run("scancel", f"--partition={PARTITION}", check=False, timeout=timeout)
        while self.jobs():
            if time.monotonic() > deadline:
                raise RuntimeError(f"jobs left after scancel: {self.jobs()}")
            self.run("scancel", f"--partition={PARTITION}", check=False, timeout=max(1.0, deadline - time.monotonic()))
            time.sleep(1)

    def version(self) -> str:
        return self.run("sinfo", "--version").stdout.strip()


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def _rewrite_in_place(path: Path, text: str) -> None:
    # in place, not by rename: /etc/hosts may be a bind mount
    with open(path, "r+") as f:
        f.write(text)
        f.truncate()
