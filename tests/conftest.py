"""Shared test plumbing. A test that needs a real service asks for it through `require_service`:
without the service it is skipped on a developer's machine and fails under CI=true, never skips there."""
from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require_service(name: str, available: bool, how: str) -> None:
    """Fail (CI) or skip (elsewhere) when `name` is not available; `how` says how to start it."""
    if available:
        return
    message = f"{name} is not available: {how}"
    if IN_CI:
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def _slurm_up() -> bool:
    if not shutil.which("scontrol"):
        return False
    try:
        out = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "is UP" in out


def _sge_up() -> bool:
    if not shutil.which("qstat"):
        return False
    try:
        return subprocess.run(["qstat"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.fixture(scope="session")
def sge_cluster() -> None:
    """The test Grid Engine of docker/sge-cluster/cluster.sh, up and answering."""
    require_service("SGE", _sge_up(), "run `docker/sge-cluster/cluster.sh start` as root")


@pytest.fixture(scope="session")
def slurm_cluster() -> None:
    """The test Slurm cluster of docker/slurm-cluster/cluster.sh, up and answering."""
    require_service("Slurm", _slurm_up(), "run `docker/slurm-cluster/cluster.sh start` as root")


@pytest.fixture(scope="session")
def test_users() -> tuple[str, str]:
    """Ordinary Unix users created by the cluster script; commands reach them through sudo."""
    users = ("alice", "bob")
    present = all(_has_user(u) for u in users) and shutil.which("sudo") is not None and os.geteuid() == 0
    require_service("test users", present, "run `docker/slurm-cluster/cluster.sh start` as root (creates "
                    "alice and bob, installs sudo); the tests run as root")
    return users


def _has_user(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


@pytest.fixture
def counting(test_users):
    """A CountingRunner: runs commands as the test users (through sudo) and records them."""
    # imported here: test_ci_policy runs this file without the modules beside it
    from helpers import CountingRunner
    from schedulers import SudoRunner

    return CountingRunner(SudoRunner())


def _directory(mode: int) -> Iterator[Path]:
    """A new directory under /tmp with `mode`, removed at the end: commands and jobs run as the test users,
    and pytest's tmp_path is root's alone."""
    path = Path(tempfile.mkdtemp(prefix="hpchub-test-", dir="/tmp"))
    path.chmod(mode)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def world() -> Iterator[Path]:
    """A directory the test users can read, for programs they run (the tests' own Python, an emulator)."""
    yield from _directory(0o755)


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory the test users can write to, e.g. for job output."""
    yield from _directory(0o1777)


@pytest.fixture(scope="session")
def proxy_installed() -> None:
    require_service("configurable-http-proxy", shutil.which("configurable-http-proxy") is not None,
                    "run scripts/setup-test-env.sh (npm install -g configurable-http-proxy)")
