"""Where a spawn's time goes, read from a hub's own log: the hub's share of the overhead apart from Slurm's.

Three moments per user, from the INFO lines that JupyterHub and each batchspawner write anyway:
  request    the spawn POST arrived (its completion line's time minus the duration it logs);
  submitted  sbatch returned the job id (hpchub: "Submitted job ID for USER"; upstream: "Job submitted");
  reported   the job's port report arrived (the POST /hub/api/batchspawner line, minus its duration);
  answered   the spawn POST completed: start() returned and JupyterHub added the route.
The hub's own time is (request -> submitted) + (reported -> answered); submitted -> reported is Slurm
starting the job plus the server starting and reporting (the job side, measured apart).
"""
from __future__ import annotations

import re
import statistics
from datetime import datetime
from pathlib import Path

TIME = re.compile(r"^\[\w (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+)")
SPAWN_DONE = re.compile(r"20[12] POST /hub/api/users/(\w+)/server \(.*?\) ([\d.]+)ms")
PORT_REPORT = re.compile(r"20[01] POST /hub/api/batchspawner \((\w+)@.*?\) ([\d.]+)ms")
HPCHUB_SUBMITTED = re.compile(r"Submitted job \S+ for (\w+)")
UPSTREAM_SUBMITTING = re.compile(r"Spawner submitting command: sudo -E -u (\w+) ")
UPSTREAM_SUBMITTED = "Job submitted. output:"


def _seconds(line: str) -> float | None:
    match = TIME.match(line)
    return datetime.strptime(match[1], "%Y-%m-%d %H:%M:%S.%f").timestamp() if match else None


def spawn_phases(log: Path) -> dict:
    """Medians and maxima of the hub's phases over every spawn the log shows from request to route."""
    request: dict[str, float] = {}
    answered: dict[str, float] = {}
    submitted: dict[str, float] = {}
    reported: dict[str, float] = {}
    submitting = ""
    for line in log.read_text(errors="replace").splitlines():
        at = _seconds(line)
        if at is None:
            continue
        if match := SPAWN_DONE.search(line):
            request[match[1]] = at - float(match[2]) / 1000
            answered[match[1]] = at
        elif match := PORT_REPORT.search(line):
            reported[match[1]] = at - float(match[2]) / 1000
        elif match := HPCHUB_SUBMITTED.search(line):
            submitted[match[1]] = at
        elif match := UPSTREAM_SUBMITTING.search(line):
            submitting = match[1]
        elif UPSTREAM_SUBMITTED in line and submitting:
            submitted[submitting] = at
    users = [u for u in answered if u in submitted and u in reported]
    if not users:
        return {"spawns": 0}
    phases = {
        "request_to_submitted_s": [submitted[u] - request[u] for u in users],
        "submitted_to_reported_s": [reported[u] - submitted[u] for u in users],
        "reported_to_routed_s": [answered[u] - reported[u] for u in users],
        "hub_own_s": [submitted[u] - request[u] + answered[u] - reported[u] for u in users],
    }
    return {"spawns": len(users),
            **{f"{name}_median": statistics.median(values) for name, values in phases.items()},
            **{f"{name}_max": max(values) for name, values in phases.items()}}
