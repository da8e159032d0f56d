"""The test Slurm cluster of docker/slurm-cluster/cluster.sh, as the rest of the suite relies on it:
configured from slurm.conf.in, idempotent to start, its partitions there, and jobs of ordinary
users running on the nodes c1 and c2 (and n1, in netns.sh's namespace, when that exists)."""
from __future__ import annotations

import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from conftest import require_service
from helpers import wait_for

REPO = Path(__file__).resolve().parents[1]
CLUSTER_DIR = REPO / "docker" / "slurm-cluster"
CLUSTER_SH = CLUSTER_DIR / "cluster.sh"
TEMPLATE = CLUSTER_DIR / "slurm.conf.in"
SLURM_CONF = Path("/etc/slurm/slurm.conf")
NETNS = Path("/run/netns/hpchub-n1")
NETNS_PREFIX = os.environ.get("HPCHUB_NETNS_PREFIX", "10.251.0")
# cluster.sh adds n1 when the namespace exists (the test set-up always makes it)
NODES = ("c1", "c2", "n1") if NETNS.exists() else ("c1", "c2")
CONTROLLER_ADDR = os.environ.get("HPCHUB_CONTROLLER_ADDR",
                                 f"{NETNS_PREFIX}.1" if NETNS.exists() else "127.0.0.1")
NODE_ADDRS = {n: f"{NETNS_PREFIX}.11" if n == "n1" else CONTROLLER_ADDR for n in NODES}
PIDFILES = {
    "munged": Path("/run/munge/munged.pid"),
    "slurmctld": Path("/run/slurm/slurmctld.pid"),
    **{f"slurmd-{n}": Path(f"/run/slurm/slurmd-{n}.pid") for n in NODES},
}

def run(*argv: str, timeout: float = 30, **kwargs) -> subprocess.CompletedProcess[str]:
    """Run argv (no shell), output captured; stdin is empty unless `input` is given."""
    if "input" not in kwargs:
        kwargs["stdin"] = subprocess.DEVNULL
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kwargs)


def render_template() -> str:
    """slurm.conf.in rendered the way cluster.sh renders it."""
    host = run("hostname", "-s").stdout.strip()
    return (TEMPLATE.read_text().replace("@CLUSTER_HOST@", host).replace("@CONTROLLER_ADDR@", CONTROLLER_ADDR)
            .replace("@NETNS_NODE_ADDR@", f"{NETNS_PREFIX}.11").replace("@NODE_HOSTNAMES@", host)
            .replace("@NODE_ADDRS@", CONTROLLER_ADDR)
            .replace("@ACCOUNTING_STORAGE_TYPE@", "accounting_storage/none"))


def node_states() -> dict[str, str]:
    out = run("sinfo", "-h", "-N", "-o", "%N %t").stdout
    return dict(line.split() for line in out.splitlines() if line.strip())


def nodes_up() -> bool:
    states = node_states()
    return all(states.get(n) in ("idle", "mix", "alloc", "plnd") for n in NODES)


def daemon_pids() -> dict[str, str]:
    return {name: f.read_text().strip() if f.exists() else "" for name, f in PIDFILES.items()}


def require_root() -> None:
    require_service("root", os.geteuid() == 0, "cluster.sh must run as root: run the tests as root")


def test_rendered_conf_is_the_template(slurm_cluster):
    rendered = render_template()
    assert not re.search(r"@[A-Za-z_]+@", rendered), "placeholder left after rendering slurm.conf.in"
    assert SLURM_CONF.read_text() == rendered, (
        f"{SLURM_CONF} is not {TEMPLATE} rendered: run `{CLUSTER_SH} start`")
    config = run("scontrol", "show", "config").stdout
    assert re.search(r"^ClusterName\s*=\s*hpchub$", config, re.M), "slurmctld does not run the hpchub config"


def test_node_names_resolve(slurm_cluster):
    for node in NODES:
        assert socket.gethostbyname(node) == NODE_ADDRS[node]


def test_start_again_is_a_quick_no_op(slurm_cluster):
    require_root()
    # the first run converges (it restarts the daemons if this checkout's template differs from what
    # runs); the second must find nothing to do. Output through pipes: no daemon may hold them.
    first = run(str(CLUSTER_SH), "start", timeout=180)
    assert first.returncode == 0, first.stderr
    before = daemon_pids()
    assert all(before.values()), f"pid files missing: {before}"
    t0 = time.monotonic()
    second = run(str(CLUSTER_SH), "start", timeout=120)
    elapsed = time.monotonic() - t0
    assert second.returncode == 0, second.stderr
    assert "nothing to start" in second.stdout, second.stdout + second.stderr
    assert "ready" in second.stdout and len(second.stdout.strip().splitlines()) == 1, second.stdout
    assert elapsed < 10, f"a no-op start took {elapsed:.1f} s"
    assert daemon_pids() == before, "a no-op start restarted daemons"
    assert nodes_up(), node_states()
    status = run(str(CLUSTER_SH), "status")
    assert status.returncode == 0, status.stdout + status.stderr


def test_partitions(slurm_cluster):
    out = run("sinfo", "-h", "-o", "%P|%a|%l|%D|%N").stdout
    parts = {p.split("|")[0]: p.split("|")[1:] for p in out.splitlines()}
    assert parts == {
        "debug*": ["up", "1:00:00", "2", "c[1-2]"],   # the star marks the default partition
        "long": ["up", "7-00:00:00", "2", "c[1-2]"],
        "netns": ["up", "1:00:00", "1", "n1"],
    }, out


def test_job_runs_as_alice_on_a_node(slurm_cluster, test_users):
    alice = pwd.getpwnam("alice")
    workdir = Path(tempfile.mkdtemp(prefix="hpchub-cluster-test-"))
    job_id = ""
    try:
        os.chown(workdir, alice.pw_uid, alice.pw_gid)
        script = ('#!/bin/bash\n'
                  'echo "user=$(id -un) node=$SLURMD_NODENAME partition=$SLURM_JOB_PARTITION"\n'
                  'echo done\n')
        submit = run("sudo", "-n", "-u", "alice", "--", "sbatch", "--parsable", "--job-name=hpchub-cluster-test",
                     "--time=00:02:00", f"--chdir={workdir}", f"--output={workdir}/out-%j.txt",
                     input=script, cwd=workdir)
        assert submit.returncode == 0, submit.stderr
        job_id = submit.stdout.strip().split(";")[0]
        assert job_id.isdigit(), submit.stdout
        out_file = workdir / f"out-{job_id}.txt"

        def finished() -> str:
            text = out_file.read_text() if out_file.exists() else ""
            return text if text.endswith("done\n") else ""

        text = wait_for(finished, 60, f"the output of job {job_id}", interval=0.1)
        assert re.fullmatch(r"user=alice node=c[12] partition=debug\ndone\n", text), text
        assert out_file.stat().st_uid == alice.pw_uid

        def final_state() -> str:
            info = run("scontrol", "show", "job", job_id).stdout
            state = re.search(r"JobState=(\S+)", info)
            return info if state and state.group(1) not in ("PENDING", "RUNNING", "COMPLETING", "CONFIGURING") else ""

        info = wait_for(final_state, 30, f"job {job_id} to finish", interval=0.1)
        assert "JobState=COMPLETED" in info and "ExitCode=0:0" in info, info
        assert re.search(r"UserId=alice\(", info), info
        assert re.search(r"\bNodeList=c[12]\b", info), info
        job_id = ""
    finally:
        if job_id:
            run("scancel", job_id)
        shutil.rmtree(workdir, ignore_errors=True)
