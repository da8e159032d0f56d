"""Shared test plumbing. A test that needs a real service asks for it through `require_service`:
without the service it is skipped on a developer's machine and fails under CI=true, never skips there."""
from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

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
def shared_dir():
    """A directory under /tmp that the test users can write to, e.g. for job output: commands and jobs
    run as those users, and pytest's tmp_path is root's alone."""
    path = Path(tempfile.mkdtemp(prefix="hpchub-test-", dir="/tmp"))
    path.chmod(0o1777)
    yield path
    shutil.rmtree(path, ignore_errors=True)
