"""Runners against the real machine: processes, process groups, sudo to the test users."""
from __future__ import annotations

import asyncio
import os
import pwd
import time
from pathlib import Path

import pytest

from helpers import alive
from schedulers import CommandTimeout, LocalRunner, SchedulerUnavailable, SudoRunner
from schedulers.runner import SAFE_PATH

SECRET = "hpchub-test-secret-d41d8cd98f00"


def env_of(stdout: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in stdout.splitlines() if "=" in line)


async def wait_for_file(path: Path, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while not (path.exists() and path.read_text().strip()):
        assert time.monotonic() < deadline, f"{path} did not appear within {timeout} s"
        await asyncio.sleep(0.02)
    return path.read_text()


@pytest.mark.asyncio
async def test_local_runner_runs_argv_with_stdin():
    result = await LocalRunner().run(["cat"], stdin="script body\n", timeout=10)
    assert (result.returncode, result.stdout, result.stderr) == (0, "script body\n", "")
    assert result.argv == ("cat",)
    assert result.duration_s >= 0
    failed = await LocalRunner().run(["sh", "-c", "echo oops >&2; exit 3"], timeout=10)
    assert (failed.returncode, failed.stderr) == (3, "oops\n")


@pytest.mark.asyncio
async def test_local_runner_uses_a_minimal_environment(monkeypatch):
    monkeypatch.setenv("HPCHUB_TEST_SECRET", SECRET)
    monkeypatch.setenv("JUPYTERHUB_API_TOKEN", SECRET)
    result = await LocalRunner().run(["env"], timeout=10)
    me = pwd.getpwuid(os.geteuid())
    assert SECRET not in result.stdout
    assert env_of(result.stdout) == {"PATH": SAFE_PATH, "LANG": "C.UTF-8", "HOME": me.pw_dir, "USER": me.pw_name}


@pytest.mark.asyncio
async def test_local_runner_refuses_to_run_as_someone_else():
    me = pwd.getpwuid(os.geteuid()).pw_name
    assert LocalRunner.switches_user is False
    assert (await LocalRunner().run(["true"], user=me, timeout=10)).returncode == 0
    with pytest.raises(ValueError, match="alice"):
        await LocalRunner().run(["true"], user="alice", timeout=10)


@pytest.mark.asyncio
async def test_missing_executable_is_scheduler_unavailable(tmp_path):
    with pytest.raises(SchedulerUnavailable, match="squeue"):
        await LocalRunner(path=str(tmp_path)).run(["squeue", "-h"], timeout=10)
    with pytest.raises(SchedulerUnavailable, match="no-such-command"):
        await LocalRunner().run(["no-such-command"], timeout=10)


@pytest.mark.asyncio
async def test_timeout_kills_the_whole_process_group(tmp_path):
    pids = tmp_path / "pids"
    # the shell ignores TERM, its background child does not: TERM then KILL must take both
    script = f"sleep 300 & echo $$ $! > {pids}; trap '' TERM; wait"
    started = time.monotonic()
    with pytest.raises(CommandTimeout, match="did not finish within 0.5 s"):
        await LocalRunner(kill_grace_s=0.5).run(["bash", "-c", script], timeout=0.5)
    assert time.monotonic() - started < 5
    shell, child = map(int, pids.read_text().split())
    assert not alive(shell) and not alive(child)


@pytest.mark.asyncio
async def test_cancelled_run_kills_its_process_group(tmp_path):
    pids = tmp_path / "pids"
    task = asyncio.create_task(LocalRunner(kill_grace_s=0.5).run(
        ["bash", "-c", f"sleep 300 & echo $$ $! > {pids}; wait"], timeout=60))
    shell, child = map(int, (await wait_for_file(pids)).split())
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not alive(shell) and not alive(child)


@pytest.mark.parametrize("name", ["alice", "john.doe", "jane_doe2", "svc-hpc", "Bob", "user@example.org", "1234x",
                                  "machine$"])
def test_sudo_runner_accepts_real_user_names(name):
    assert SudoRunner().command(["squeue"], name) == ["sudo", "-n", "-H", "-u", name, "--", "squeue"]


@pytest.mark.parametrize("name", ["#0", "#1001", "-u", "--", "", "a b", "a/b", "a:b", "x\n"])
def test_sudo_runner_rejects_what_sudo_would_misread(name):
    with pytest.raises(ValueError, match="not a valid user name"):
        SudoRunner().command(["squeue"], name)


def test_sudo_runner_without_user_runs_as_the_hub():
    me = pwd.getpwuid(os.geteuid()).pw_name
    assert SudoRunner.switches_user is True
    assert SudoRunner().command(["squeue", "-h"], None) == ["squeue", "-h"]
    assert SudoRunner().command(["squeue", "-h"], me) == ["squeue", "-h"]


@pytest.mark.asyncio
async def test_sudo_runner_runs_as_the_user_without_the_hubs_secrets(test_users, monkeypatch):
    monkeypatch.setenv("HPCHUB_TEST_SECRET", SECRET)
    monkeypatch.setenv("JUPYTERHUB_API_TOKEN", SECRET)
    for user in test_users:
        result = await SudoRunner().run(["env"], user=user, timeout=20)
        assert result.returncode == 0, result.stderr
        assert SECRET not in result.stdout
        env = env_of(result.stdout)
        assert (env["USER"], env["HOME"]) == (user, pwd.getpwnam(user).pw_dir)
        assert result.argv == ("sudo", "-n", "-H", "-u", user, "--", "env")
    piped = await SudoRunner().run(["sh", "-c", "id -un; cat"], user="alice", stdin="on stdin\n", timeout=20)
    assert piped.stdout == "alice\non stdin\n"


@pytest.mark.asyncio
async def test_sudo_refusal_is_scheduler_unavailable(test_users):
    with pytest.raises(SchedulerUnavailable, match="unknown user"):
        await SudoRunner().run(["true"], user="no-such-user-hpchub", timeout=20)


@pytest.mark.asyncio
async def test_sudo_runner_timeout_kills_the_users_command(test_users, shared_dir):
    pid_file = shared_dir / "pid"
    with pytest.raises(CommandTimeout):
        await SudoRunner(kill_grace_s=0.5).run(["bash", "-c", f"echo $$ > {pid_file}; exec sleep 300"],
                                               user="alice", timeout=1)
    pid = int(pid_file.read_text())
    assert not alive(pid)
