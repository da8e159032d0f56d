"""Turning admin settings (and, later, validated form values) into a scheduler-neutral JobRequest."""
from __future__ import annotations

import re

# ASCII digits only: \d would take other scripts' digits, which float() and int() read as numbers too
_MEMORY = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?\s*", re.IGNORECASE | re.ASCII)
_MEMORY_MB = {"K": 1 / 1024, "": 1, "M": 1, "G": 1024, "T": 1024 * 1024}
_WALLTIME = re.compile(r"\d+-\d+(?::\d+){0,2}|\d+(?::\d+){0,2}", re.ASCII)


def parse_memory_mb(text: str) -> int | None:
    """'4G', '512M', '1.5GB', '2048' (MB) -> megabytes; '' -> None (the scheduler's default)."""
    if not text.strip():
        return None
    match = _MEMORY.fullmatch(text)
    if not match:
        raise ValueError(f"{text!r} is not a memory size (examples: 512M, 4G, 1.5T)")
    megabytes = float(match.group(1)) * _MEMORY_MB[match.group(2).upper()]
    if megabytes < 1:
        raise ValueError(f"{text!r} is less than 1 MB")
    return int(round(megabytes))


def parse_walltime_s(text: str) -> int | None:
    """A walltime in Slurm's forms -> seconds; '' -> None (the partition's default).

    MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS (the bare and two-part forms mean minutes, as in Slurm).
    """
    text = text.strip()
    if not text:
        return None
    if not _WALLTIME.fullmatch(text):
        raise ValueError(f"{text!r} is not a walltime (examples: 90 (minutes), 01:30:00, 2-00:00:00, 1-12)")
    days_part, _, clock = text.rpartition("-")
    parts = [int(p) for p in clock.split(":")]
    days = int(days_part or 0)
    hours_given = bool(days_part) or len(parts) == 3
    if days_part:
        hours, minutes, seconds = (parts + [0, 0])[:3]
    elif len(parts) == 3:
        hours, minutes, seconds = parts
    else:
        hours, minutes, seconds = 0, parts[0], (parts + [0])[1]
    if seconds > 59 or (hours_given and minutes > 59):
        raise ValueError(f"{text!r}: minutes and seconds must be below 60")
    total = ((days * 24 + hours) * 60 + minutes) * 60 + seconds
    if total <= 0:
        raise ValueError(f"{text!r} is not a positive walltime")
    return total
