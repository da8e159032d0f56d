"""`hpchub doctor` (hpchub-doctor) against the real services: a sound configuration passes every check and a test
job goes through Slurm as alice; a scheduler command that is not there, a wrong LDAP service password, a gateway
port closed by a firewall or taken by another program, and a bad setting each fail with what to fix."""
from __future__ import annotations

import json
import socket
import subprocess
import threading
from pathlib import Path

import pytest

from hpchub.doctor import SPAWNER_FILE_COMMANDS, check_programs, check_runner, check_sudo
from hubtools import HUB_BIN, free_port
from schedulers import SlurmAdapter
from schedulers.ssh import SSHRunner
from test_ldap import A, B, BASE, CA, READER_DN, READER_PW, directory  # noqa: F401 (fixture)
from test_runner_ssh import HOST, KEY, KNOWN_HOSTS, PORT, ACCOUNT, sshd, write_known_hosts  # noqa: F401 (fixture)

DOCTOR_BIN = HUB_BIN.with_name("hpchub-doctor")

SOUND = f"""
c.JupyterHub.spawner_class = "slurm"
c.Authenticator.allowed_users = {{"alice"}}
c.JupyterHub.authenticator_class = "ldap"
c.LDAPAuthenticator.server_urls = [{A!r}, {B!r}]
c.LDAPAuthenticator.ca_file = {CA!r}
c.LDAPAuthenticator.user_search_base = "ou=people,{BASE}"
c.LDAPAuthenticator.search_bind_dn = {READER_DN!r}
c.LDAPAuthenticator.search_bind_password = {READER_PW!r}
c.BatchSpawner.tunnel = "reverse"
c.BatchSpawner.tunnel_gateway_ip = "127.0.0.1"
c.BatchSpawner.req_runtime = "00:05:00"
"""


@pytest.fixture
def doctor(tmp_path: Path, slurm_cluster, test_users, directory, proxy_installed):  # noqa: F811
    """doctor(config, *args) -> (exit status, {check name: check}): hpchub-doctor -f on a jupyterhub_config.py."""
    data = tmp_path / "data"
    data.mkdir()

    def run(config: str, *args: str) -> tuple[int, dict[str, dict]]:
        path = tmp_path / "jupyterhub_config.py"
        path.write_text(f"c = get_config()  # noqa\nc.HpcHub.data_dir = {str(data)!r}\n{config}")
        result = subprocess.run([str(DOCTOR_BIN), "-f", str(path), "--json", *args], capture_output=True, text=True,
                                timeout=600, cwd=tmp_path)
        assert result.stdout, result.stderr
        return result.returncode, {check["name"]: check for check in json.loads(result.stdout)}

    return run


def failed(checks: dict[str, dict]) -> list[str]:
    return [name for name, check in checks.items() if check["status"] == "FAIL"]


def test_a_sound_configuration_passes_and_a_test_job_runs(doctor):
    port = free_port()
    code, checks = doctor(SOUND + f"c.BatchSpawner.tunnel_gateway_port = {port}\n", "--test-job", "alice")
    assert code == 0 and not failed(checks), checks
    assert "/usr/bin/sbatch" in checks["scheduler commands"]["detail"]
    assert "debug*" in checks["scheduler"]["detail"]
    assert checks["sudo as alice"]["status"] == "ok"
    assert checks[f"ldap {A}"]["status"] == checks[f"ldap {B}"]["status"] == "ok"
    assert checks[f"gateway 127.0.0.1:{port}"]["status"] == "ok"
    assert checks["proxy"]["detail"].startswith("configurable-http-proxy 5.")
    assert checks["hub database"]["status"] == checks["job ledger"]["status"] == "ok"
    job = checks["test job as alice"]
    assert job["status"] == "ok" and " ran on c" in job["detail"] and "queued" in job["detail"], job


def test_a_scheduler_command_that_is_not_there(doctor):
    code, checks = doctor(SOUND.replace('"slurm"', '"pbs"') + 'c.PBSSpawner.pbs_exec = "/opt/no-such-pbs"\n'
                          f"c.BatchSpawner.tunnel_gateway_port = {free_port()}\n")
    assert code == 1 and "scheduler commands" in failed(checks)
    check = checks["scheduler commands"]
    assert "/opt/no-such-pbs/bin/qsub (submit)" in check["detail"] and "pbs_exec" in check["fix"]
    assert checks["scheduler"]["status"] == "FAIL"       # and nothing answers there
    assert checks["sudo as alice"]["status"] == "ok"    # sudo is not the problem: the commands are missing


def test_a_wrong_ldap_password(doctor):
    code, checks = doctor(SOUND.replace(repr(READER_PW), repr("not-the-password"))
                          + f"c.BatchSpawner.tunnel_gateway_port = {free_port()}\n")
    assert code == 1 and sorted(failed(checks)) == sorted([f"ldap {A}", f"ldap {B}"]), checks
    for url in (A, B):
        assert "invalid credentials" in checks[f"ldap {url}"]["detail"]
        assert "search_bind_password" in checks[f"ldap {url}"]["fix"]


@pytest.fixture
def closed_port():
    """A free port that this host's firewall refuses (a table of the test's own in nftables), removed at the end."""
    port = free_port()
    table = f"hpchub_doctor_test_{port}"
    rules = (f"table inet {table} {{\n chain input {{\n  type filter hook input priority -10; policy accept;\n"
             f"  tcp dport {port} reject with tcp reset\n }}\n}}\n")
    subprocess.run(["nft", "-f", "-"], input=rules, text=True, check=True, timeout=30)
    yield port
    subprocess.run(["nft", "delete", "table", "inet", table], capture_output=True, timeout=30)


def test_a_gateway_port_closed_by_a_firewall(doctor, closed_port):
    code, checks = doctor(SOUND + f"c.BatchSpawner.tunnel_gateway_port = {closed_port}\n")
    assert code == 1 and failed(checks) == [f"gateway 127.0.0.1:{closed_port}"], checks
    check = checks[f"gateway 127.0.0.1:{closed_port}"]
    assert "is closed" in check["detail"] and "firewall" in check["fix"]


def test_a_gateway_port_taken_by_another_program(doctor):
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen(1)
        port = other.getsockname()[1]
        # it accepts and says something that is not SSH
        serving = threading.Thread(target=lambda: other.accept()[0].sendall(b"HTTP/1.0 200 OK\r\n"), daemon=True)
        serving.start()
        code, checks = doctor(SOUND + f"c.BatchSpawner.tunnel_gateway_port = {port}\n")
    check = checks[f"gateway 127.0.0.1:{port}"]
    assert code == 1 and check["status"] == "FAIL" and "taken by another program" in check["detail"], check


def test_a_bad_setting_names_itself(doctor):
    code, checks = doctor(SOUND + 'c.BatchSpawner.req_memory = "lots"\n')
    assert code == 1 and list(checks) == ["config"]
    assert checks["config"]["detail"].startswith("BatchSpawner.req_memory = 'lots': "), checks


@pytest.mark.asyncio
async def test_an_ssh_runner_with_the_wrong_host_key_and_with_the_right_one(sshd, tmp_path):  # noqa: F811
    """The runner check on a submit host over SSH (schedulers.ssh.SSHRunner): known_hosts decides."""
    wrong = tmp_path / "known_hosts"
    write_known_hosts(wrong)
    runner = SSHRunner(HOST, port=PORT, username=ACCOUNT, client_keys=KEY, known_hosts=wrong)
    try:
        check = await check_runner(runner)
    finally:
        await runner.close()
    assert check.failed and "host key of 127.0.0.1:2222 does not match" in check.detail
    assert "known_hosts" in check.fix and "ssh-keyscan" in check.fix
    runner = SSHRunner(HOST, port=PORT, username=ACCOUNT, client_keys=KEY, known_hosts=KNOWN_HOSTS)
    try:
        check = await check_runner(runner)
        programs = await check_programs(SlurmAdapter(runner))
        # the submit host's sudoers rule lets the account run Slurm's commands and the job files' as alice, no more
        allowed = await check_sudo("alice", ["sbatch", "scancel", *SPAWNER_FILE_COMMANDS], runner)
        refused = await check_sudo("alice", ["sbatch", "qsub"], runner)
    finally:
        await runner.close()
    assert check.status == "ok" and "SSHRunner to 127.0.0.1" in check.detail
    assert programs.status == "ok" and "/usr/bin/squeue" in programs.detail, programs
    assert allowed.status == "ok" and allowed.detail.startswith(f"{ACCOUNT} may run sbatch, scancel, mkdir"), allowed
    assert refused.failed and "qsub" in refused.detail and "sbatch" not in refused.detail, refused
    assert "sudoers rule" in refused.fix


CLUSTERS = """
c.JupyterHub.spawner_class = "batchspawner.BatchSpawner"
c.Authenticator.allowed_users = {"alice"}
c.BatchSpawner.clusters = {
    "hpc": {"display_name": "Slurm", "scheduler": "slurm", "partitions": {"debug": {"max_walltime": "01:00:00"}}},
    "grid": {"display_name": "Grid Engine", "scheduler": "sge", "default_queue": "all.q"},
}
c.BatchSpawner.profiles = [
    {"name": "small", "display_name": "Small", "cluster": "hpc", "defaults": {"cores": 1, "walltime": "00:10:00"}},
    {"name": "grid", "display_name": "Grid", "cluster": "grid", "defaults": {"cores": 1, "walltime": "00:10:00"}},
]
"""


def test_every_cluster_is_checked_and_runs_a_test_job(doctor, sge_cluster):
    code, checks = doctor(CLUSTERS, "--test-job", "alice")
    assert code == 0 and not failed(checks), checks
    assert "slurm answers: partitions debug*" in checks["scheduler [hpc]"]["detail"]
    assert checks["scheduler [grid]"]["detail"].startswith("sge answers: partitions all.q")
    assert "/usr/bin/qsub" in checks["scheduler commands [grid]"]["detail"] or "qsub" in \
        checks["scheduler commands [grid]"]["detail"]
    assert checks["sudo as alice [hpc]"]["status"] == checks["sudo as alice [grid]"]["status"] == "ok"
    assert " ran on c" in checks["test job as alice [hpc]"]["detail"]
    assert checks["test job as alice [grid]"]["status"] == "ok", checks["test job as alice [grid]"]
