"""A Jupyter server extension, enabled in the job's server: a kernel that is running a cell counts as activity.

jupyter-server's last activity is the last message a kernel sent; a cell that computes for hours without
printing sends none, and the hub's idle culler would stop the server (and cancel the job) under it. Every
HPCHUB_BUSY_KERNEL_INTERVAL seconds (default 60; keep it below the culler's timeout) a busy kernel renews
the `hpchub_busy_kernels_last_activity` setting, which jupyter-server adds to its last activity (any
setting ending in `_last_activity` counts), and so to what the server reports to the hub.
"""
from __future__ import annotations

import os
from datetime import datetime, timezone

from tornado.ioloop import PeriodicCallback

SETTING = "hpchub_busy_kernels_last_activity"


def busy(kernel_manager) -> bool:
    """Whether any kernel is executing now, as its last status message said."""
    return any(getattr(kernel_manager.get_kernel(kernel_id), "execution_state", "") == "busy"
               for kernel_id in kernel_manager.list_kernel_ids())


def _jupyter_server_extension_points() -> list[dict]:
    return [{"module": "hpchub.busy_kernels"}]


def _load_jupyter_server_extension(serverapp) -> None:
    settings = serverapp.web_app.settings
    interval = float(os.environ.get("HPCHUB_BUSY_KERNEL_INTERVAL", "60"))

    def renew() -> None:
        if busy(serverapp.kernel_manager):
            settings[SETTING] = datetime.now(timezone.utc)

    callback = PeriodicCallback(renew, interval * 1000)
    callback.start()
    settings["hpchub_busy_kernels_callback"] = callback    # kept referenced for the server's life
