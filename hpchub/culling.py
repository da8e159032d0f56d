"""Idle culling, on by default in hpchub: the jupyterhub-idle-culler service, run by the hub.

A culled server is stopped like any other, so its batch job is cancelled and its node freed. The culler
skips pending servers (a job waiting in the queue is never culled for browser inactivity); a server with a
busy kernel reports itself active (jupyter-server counts busy kernels as activity), so a long cell keeps it.
"""
from __future__ import annotations

import sys

SERVICE_NAME = "hpchub-idle-culler"
#: what the culler needs, and no more: list users, read their servers' activity, stop servers
SCOPES = ["list:users", "read:users:activity", "read:servers", "delete:servers"]


def culler_service(*, timeout: int, every: int, max_age: int, concurrency: int = 10) -> dict:
    """The managed service running the culler with the hub's Python."""
    return {
        "name": SERVICE_NAME,
        "command": [sys.executable, "-m", "jupyterhub_idle_culler", f"--timeout={timeout}",
                    f"--cull-every={every}", f"--max-age={max_age}", f"--concurrency={concurrency}"],
    }


def culler_role() -> dict:
    return {"name": SERVICE_NAME, "scopes": list(SCOPES), "services": [SERVICE_NAME]}
