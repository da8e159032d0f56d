"""SSHRunner against the real test sshd (docker/sshd/sshd.sh): the service account hpchub-submit on
127.0.0.1:2222, which runs the test users' commands through sudo."""
from __future__ import annotations

import asyncio
import functools
import json
import os
import pwd
import re
import socket
import subprocess
import time
from pathlib import Path

import asyncssh
import pytest
import pytest_asyncio

import helpers
from conftest import require_service
from helpers import alive, wait_for
from schedulers import CommandTimeout, JobRequest, JobState, SchedulerUnavailable, SlurmAdapter
from schedulers.ssh import SSHRunner

HOST, PORT, ACCOUNT = "127.0.0.1", 2222, "hpchub-submit"
CLIENT_DIR = Path("/etc/hpchub-test-sshd/client")
KEY, KNOWN_HOSTS = CLIENT_DIR / "id_ed25519", CLIENT_DIR / "known_hosts"
SSHD_LOG = Path("/var/log/hpchub-test-sshd.log")
SECRET = "hpchub-test-secret-5f4dcc3b5aa7"
PRINT_ARGV = ["python3", "-c", "import sys, json; print(json.dumps(sys.argv[1:]))"]
# words a shell would split, expand, glob or end a command at: each must arrive as one argument, unchanged
AWKWARD = ["a b", "it's", 'say "hi"', "$(touch /tmp/hpchub-ssh-injected)", "`id`", "$HOME", "x\ny", "", "*", "~",
           "a;b|c&d>e", "\\", "--", "-n", "ünïcödé", " lead and trail "]


def sshd_answers() -> bool:
    try:
        with socket.create_connection((HOST, PORT), timeout=5) as sock:
            return sock.recv(64).startswith(b"SSH-2.0-")
    except OSError:
        return False


@pytest.fixture(scope="module")
def sshd() -> None:
    require_service("test sshd", sshd_answers() and os.access(KEY, os.R_OK) and KNOWN_HOSTS.is_file(),
                    "run `docker/sshd/sshd.sh start` as root (after docker/slurm-cluster/cluster.sh start)")


@pytest_asyncio.fixture
async def runner(sshd):
    runner = SSHRunner(HOST, port=PORT, username=ACCOUNT, client_keys=KEY, known_hosts=KNOWN_HOSTS, kill_grace_s=0.5)
    yield runner
    await runner.close()


def accepted_logins() -> int:
    """SSH connections the test sshd has accepted so far (its log has one line for each)."""
    return SSHD_LOG.read_text().count(f"Accepted publickey for {ACCOUNT} ")


def processes_with(word: str) -> dict[int, tuple[str, int]]:
    """pid -> (program, real uid) of the live processes whose command line contains `word`."""
    found = {}
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
            if entry.name.isdigit() and any(word in arg for arg in argv) and alive(int(entry.name)):
                uid = re.search(r"^Uid:\s+(\d+)", (entry / "status").read_text(), re.M)
                found[int(entry.name)] = (argv[0], int(uid.group(1)) if uid else -1)
        except OSError:
            continue
    return found


def write_known_hosts(path: Path) -> None:
    """A known_hosts entry for the test sshd's address, with a key that is not its host key."""
    other = asyncssh.generate_private_key("ssh-ed25519")
    path.write_text(f"[{HOST}]:{PORT} {other.export_public_key().decode().strip()}\n")


@pytest.fixture
def own_files(tmp_path) -> tuple[Path, Path]:
    """A client key and a known_hosts file of the test's own, for runners that need no sshd."""
    key, known_hosts = tmp_path / "id_ed25519", tmp_path / "known_hosts"
    asyncssh.generate_private_key("ssh-ed25519").write_private_key(str(key))
    write_known_hosts(known_hosts)
    return key, known_hosts


@pytest.mark.asyncio
async def test_argv_arrives_verbatim(runner, shared_dir):
    injected = Path("/tmp/hpchub-ssh-injected")
    injected.unlink(missing_ok=True)
    result = await runner.run([*PRINT_ARGV, *AWKWARD], timeout=20)
    assert (result.returncode, result.stderr) == (0, "")
    assert json.loads(result.stdout) == AWKWARD
    printed = await runner.run(["printf", "%s\\n", *AWKWARD], timeout=20)
    assert printed.stdout == "".join(f"{word}\n" for word in AWKWARD)
    assert not injected.exists()
    # and through sudo as alice: one directory per awkward name, owned by alice
    names = [w for w in AWKWARD if w not in ("", "\\", "--", "-n") and "/" not in w]
    made = await runner.run(["mkdir", "--", *(str(shared_dir / name) for name in names)], user="alice", timeout=20)
    assert (made.returncode, made.stderr) == (0, "")
    assert made.argv[:6] == ("sudo", "-n", "-H", "-u", "alice", "--")
    assert sorted(p.name for p in shared_dir.iterdir()) == sorted(names)
    assert {p.owner() for p in shared_dir.iterdir()} == {"alice"}


@pytest.mark.asyncio
async def test_stdin_exit_codes_and_stderr(runner):
    script = "#!/bin/bash\necho \"it's $HOME\"\n" + "x" * 1_000_000 + "\n"
    echoed = await runner.run(["cat"], stdin=script, timeout=20)
    assert (echoed.returncode, echoed.stdout, echoed.stderr) == (0, script, "")
    assert (await runner.run(["cat"], stdin="", timeout=20)).stdout == ""
    assert (await runner.run(["cat"], timeout=20)).stdout == ""  # no stdin: end of file at once
    failed = await runner.run(["sh", "-c", "echo out; echo oops >&2; exit 3"], timeout=20)
    assert (failed.returncode, failed.stdout, failed.stderr) == (3, "out\n", "oops\n")
    assert failed.argv == ("sh", "-c", "echo out; echo oops >&2; exit 3") and failed.duration_s > 0
    with pytest.raises(SchedulerUnavailable, match="no-such-command"):
        await runner.run(["no-such-command", "--help"], timeout=20)


@pytest.mark.asyncio
async def test_timeout_signals_the_remote_command(runner, shared_dir):
    pids = shared_dir / "pids"
    # both the shell and its child ignore TERM: KILL must follow after kill_grace_s (0.5 s)
    started = time.monotonic()
    with pytest.raises(CommandTimeout, match=r"did not finish within 1 s") as error:
        await runner.run(["bash", "-c", f"trap '' TERM; sleep 300 & echo $$ $! > {pids}; wait"], timeout=1)
    assert 1.5 <= time.monotonic() - started < 5
    assert ACCOUNT in str(error.value)
    for pid in map(int, pids.read_text().split()):
        wait_for(lambda: not alive(pid), 5, f"remote process {pid} to end")
    assert (await runner.run(["true"], timeout=20)).returncode == 0  # the connection survives


@pytest.mark.asyncio
async def test_timeout_ends_a_users_command_run_through_sudo(runner, shared_dir, test_users):
    followed = shared_dir / "followed.log"
    followed.write_text("")
    task = asyncio.create_task(runner.run(["tail", "-f", "--", str(followed)], user="alice", timeout=2))
    running = await asyncio.to_thread(wait_for, lambda: processes_with(str(followed)), 10, "tail to start")
    assert ("tail", pwd.getpwnam("alice").pw_uid) in running.values()
    with pytest.raises(CommandTimeout):
        await task
    await asyncio.to_thread(wait_for, lambda: not processes_with(str(followed)), 5, "alice's tail to end")


@pytest.mark.asyncio
async def test_wrong_host_key_is_refused_before_any_command(sshd, tmp_path, shared_dir):
    known_hosts = tmp_path / "known_hosts"
    write_known_hosts(known_hosts)
    runner = SSHRunner(HOST, port=PORT, username=ACCOUNT, client_keys=KEY, known_hosts=known_hosts)
    marker = shared_dir / "ran"
    logins = accepted_logins()
    for _ in range(2):  # the second attempt falls in the back-off window and repeats the reason
        with pytest.raises(SchedulerUnavailable, match="host key of 127.0.0.1:2222 does not match") as error:
            await runner.run(["touch", str(marker)], timeout=20)
        assert str(known_hosts) in str(error.value)
    assert "next attempt in" in str(error.value)
    assert not marker.exists()
    assert accepted_logins() == logins
    await runner.close()


def test_known_hosts_is_required(own_files, tmp_path):
    key, known_hosts = own_files
    for missing in (None, "", tmp_path / "no-such-file", tmp_path):
        with pytest.raises(ValueError, match="known_hosts"):
            SSHRunner(HOST, port=PORT, username=ACCOUNT, client_keys=key, known_hosts=missing)
    with pytest.raises(ValueError, match="client_keys"):
        SSHRunner(HOST, port=PORT, username=ACCOUNT, client_keys=tmp_path / "no-key", known_hosts=known_hosts)


@pytest.mark.parametrize("name", ["#0", "-u", "", "a b", "x\n"])
def test_user_names_sudo_would_misread_are_refused(own_files, name):
    key, known_hosts = own_files
    runner = SSHRunner(HOST, port=PORT, username=ACCOUNT, client_keys=key, known_hosts=known_hosts)
    with pytest.raises(ValueError, match="not a valid user name"):
        runner.command(["squeue"], name)
    assert runner.command(["squeue"], ACCOUNT) == runner.command(["squeue"], None) == ["squeue"]


@pytest.mark.asyncio
async def test_unreachable_host_is_unavailable_and_retried_with_backoff(own_files):
    key, known_hosts = own_files
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind((HOST, 0))
        port = sock.getsockname()[1]
    runner = SSHRunner(HOST, port=port, username=ACCOUNT, client_keys=key, known_hosts=known_hosts,
                       backoff_s=(0.3, 0.3))
    with pytest.raises(SchedulerUnavailable, match=f"SSH connection to {ACCOUNT}@{HOST}:{port} failed"):
        await runner.run(["true"], timeout=20)
    with pytest.raises(SchedulerUnavailable, match="next attempt in 0.[0-3] s"):
        await runner.run(["true"], timeout=20)
    await asyncio.sleep(0.35)  # past the back-off: the next command tries again
    with pytest.raises(SchedulerUnavailable) as error:
        await runner.run(["true"], timeout=20)
    assert "next attempt" not in str(error.value)


@pytest.mark.asyncio
async def test_concurrent_commands_share_one_connection(sshd):
    # as many sessions as the test sshd's MaxSessions: sshd then often refuses a channel for a session
    # it has not reaped yet, and the runner must wait for it rather than fail
    runner = SSHRunner(HOST, port=PORT, username=ACCOUNT, client_keys=KEY, known_hosts=KNOWN_HOSTS, max_sessions=10)
    logins = accepted_logins()
    script = 'echo "$SSH_CONNECTION"; sleep 0.2'
    first = await asyncio.gather(*(runner.run(["sh", "-c", script], timeout=30) for _ in range(20)))
    again = await asyncio.gather(*(runner.run(["sh", "-c", script], timeout=30) for _ in range(5)))
    assert all(r.returncode == 0 for r in first + again)
    assert len({r.stdout for r in first + again}) == 1
    assert accepted_logins() == logins + 1
    await runner.close()
    reopened = await runner.run(["sh", "-c", script], timeout=30)  # close() ends the connection, not the runner
    assert reopened.stdout != first[0].stdout and accepted_logins() == logins + 2
    await runner.close()


@pytest.mark.asyncio
async def test_a_dropped_connection_is_replaced(runner):
    before = (await runner.run(["sh", "-c", 'echo "$SSH_CONNECTION"'], timeout=20)).stdout.split()
    client_port = before[1]
    # the sshd process serving this connection (its [priv] half: ending it closes the connection)
    out = subprocess.run(["ss", "-Htnp", "state", "established", f"( sport = :{PORT} and dport = :{client_port} )"],
                         capture_output=True, text=True, timeout=10).stdout
    served_by = {int(pid) for pid in re.findall(r"pid=(\d+)", out)}
    assert served_by, out
    for pid in served_by:
        os.kill(pid, 15)
    await asyncio.to_thread(wait_for, lambda: all(not alive(p) for p in served_by), 5, "the connection to drop")
    after = await runner.run(["sh", "-c", 'echo "$SSH_CONNECTION"'], timeout=20)
    assert after.returncode == 0 and after.stdout.split()[1] != client_port


@pytest.mark.asyncio
async def test_the_hubs_environment_is_not_sent(runner, monkeypatch):
    for name in ("HPCHUB_TEST_SECRET", "JUPYTERHUB_API_TOKEN"):
        monkeypatch.setenv(name, SECRET)
    monkeypatch.setenv("LANG", "de_DE.UTF-8")
    monkeypatch.setenv("LC_ALL", "de_DE.UTF-8")
    result = await runner.run(["env"], timeout=20)
    assert SECRET not in result.stdout + result.stderr
    env = dict(line.split("=", 1) for line in result.stdout.splitlines())
    # the test sshd accepts HPCHUB_*, LANG and LC_*: that none arrived shows that none was sent
    assert not [name for name in env if name.startswith(("HPCHUB_", "LANG", "LC_", "JUPYTERHUB"))]
    assert env["USER"] == ACCOUNT and env["SSH_CONNECTION"].startswith("127.0.0.1 ")


@pytest.mark.asyncio
async def test_runs_as_the_user_through_the_service_accounts_sudo(runner, test_users):
    for user in test_users:
        result = await runner.run(["id", "-un"], user=user, timeout=20)
        assert (result.returncode, result.stdout, result.stderr) == (0, f"{user}\n", "")
        assert result.argv == ("sudo", "-n", "-H", "-u", user, "--", "id", "-un")
    assert (await runner.run(["id", "-un"], timeout=20)).stdout == f"{ACCOUNT}\n"
    # the sudoers rule names exact commands: anything else is refused, not asked for a password
    for argv in (["id", "-u"], ["cat", "/etc/hostname"]):
        refused = f"could not run '{argv[0]}' as alice: sudo: a password is required"
        with pytest.raises(SchedulerUnavailable, match=refused):
            await runner.run(argv, user="alice", timeout=20)
    with pytest.raises(SchedulerUnavailable, match="sudo: unknown user"):
        await runner.run(["squeue"], user="no-such-user-hpchub", timeout=20)


@pytest.mark.asyncio
async def test_slurm_through_ssh_as_alice(runner, slurm_cluster, test_users, shared_dir):
    adapter = SlurmAdapter(runner)
    wait_until = functools.partial(helpers.wait_until, timeout=60.0, interval=0.2)
    request = JobRequest(name="hpchub-ssh-test", tag="hpchub-ssh-test")

    def script(body: str) -> str:
        return (f"#!/bin/bash\n#SBATCH --job-name=hpchub-ssh-test\n#SBATCH --output={shared_dir}/slurm-%j.out\n"
                f"#SBATCH --time=5\n{body}\n")

    done = await adapter.submit(script("id -un"), request, user="alice")
    sleeper = await adapter.submit(script("sleep 300"), request, user="alice")
    try:
        statuses = await wait_until(lambda: adapter.query([done, sleeper]),
                                    lambda s: s[done].state.is_terminal and s[sleeper].state is JobState.RUNNING)
        assert (statuses[done].state, statuses[done].exit_code) == (JobState.COMPLETED, 0)
        assert (shared_dir / f"slurm-{done}.out").read_text() == "alice\n"
        await adapter.cancel([sleeper], user="alice")
        statuses = await wait_until(lambda: adapter.query([sleeper]),
                                    lambda s: s[sleeper].state is JobState.CANCELLED)
        assert statuses[sleeper].native_state == "CANCELLED"
    finally:
        subprocess.run(["scancel", done, sleeper], capture_output=True, timeout=30)
