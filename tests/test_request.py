"""Parsing admin-given memory and walltime into the request's units."""
from __future__ import annotations

import pytest

from batchspawner.request import parse_memory_mb, parse_walltime_s


@pytest.mark.parametrize("text,mb", [("4G", 4096), ("512M", 512), ("1.5GB", 1536), ("2048", 2048), ("1T", 1048576),
                                     ("4gib", 4096), ("", None)])
def test_memory(text, mb):
    assert parse_memory_mb(text) == mb


@pytest.mark.parametrize("text", ["4X", "-1G", "0.1K", "lots"])
def test_bad_memory(text):
    with pytest.raises(ValueError):
        parse_memory_mb(text)


@pytest.mark.parametrize("text,seconds", [
    ("90", 5400), ("90:30", 5430), ("01:30:00", 5400), ("2-00:00:00", 172800), ("1-12", 129600),
    ("1-12:30", 131400), ("", None),
])
def test_walltime_in_slurm_forms(text, seconds):
    assert parse_walltime_s(text) == seconds


@pytest.mark.parametrize("text", ["1:60:00", "1:00:60", "0", "1-2-3", "x", "1h"])
def test_bad_walltime(text):
    with pytest.raises(ValueError):
        parse_walltime_s(text)
