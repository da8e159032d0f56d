"""The suite's rule for missing services: skipped on a developer's machine, failed under CI=true."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

NEEDS_A_MISSING_SERVICE = '''
from conftest import require_service

def test_needs_an_imaginary_service():
    require_service("imaginary-service", False, "start the imaginary service")
'''


def run_suite(directory: Path, ci: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci is not None:
        env["CI"] = ci
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(directory)],
                          cwd=directory, env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture
def suite(tmp_path: Path) -> Path:
    shutil.copy(Path(__file__).with_name("conftest.py"), tmp_path / "conftest.py")
    (tmp_path / "test_missing.py").write_text(NEEDS_A_MISSING_SERVICE)
    return tmp_path


@pytest.mark.parametrize("ci", ["true", "1"])
def test_a_missing_service_fails_under_ci(suite, ci):
    result = run_suite(suite, ci)
    assert result.returncode == 1, result.stdout
    assert "1 failed" in result.stdout and "skipped" not in result.stdout
    assert "imaginary-service is not available: start the imaginary service" in result.stdout


def test_a_missing_service_skips_outside_ci(suite):
    result = run_suite(suite, None)
    assert result.returncode == 0, result.stdout
    assert "1 skipped" in result.stdout
