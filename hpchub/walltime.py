"""A Jupyter server extension, enabled in the job's server: how long the batch job has left.

`GET {base_url}hpchub/walltime` -> {"end": ISO time or null, "left_s": seconds or null, "warnings_s": [...],
"job_id": ...}. The job script records when it started (HPCHUB_JOB_STARTED) and the hub puts the walltime it
asked for (HPCHUB_WALLTIME_S) and the warning times (HPCHUB_WALLTIME_WARNINGS, seconds before the end) in the
job's environment. The JupyterLab plugin in hpchub/labextension shows the time left when JupyterLab opens
and a warning at each of those times.
"""
from __future__ import annotations

import json
import os
import time
from datetime import datetime, timezone
from typing import Mapping

from jupyter_server.base.handlers import APIHandler
from jupyter_server.utils import url_path_join
from tornado import web


def walltime_info(environ: Mapping[str, str], now: float) -> dict:
    """The job's end and the time left at `now` (epoch seconds), from its environment; nulls if unknown."""
    warnings = sorted((int(w) for w in environ.get("HPCHUB_WALLTIME_WARNINGS", "").split(",") if w.strip().isdigit()),
                      reverse=True)
    info = {"end": None, "left_s": None, "warnings_s": warnings,
            "job_id": environ.get("SLURM_JOB_ID") or environ.get("JOB_ID") or environ.get("PBS_JOBID")}
    try:
        started, walltime = int(environ["HPCHUB_JOB_STARTED"]), int(environ["HPCHUB_WALLTIME_S"])
    except (KeyError, ValueError):
        return info
    end = started + walltime
    info.update(end=datetime.fromtimestamp(end, timezone.utc).isoformat(timespec="seconds"),
                left_s=max(0, int(end - now)))
    return info


class WalltimeHandler(APIHandler):
    @web.authenticated
    def get(self) -> None:
        self.set_header("Cache-Control", "no-store")
        self.finish(json.dumps(walltime_info(os.environ, time.time())))


def _jupyter_server_extension_points() -> list[dict]:
    return [{"module": "hpchub.walltime"}]


def _load_jupyter_server_extension(serverapp) -> None:
    route = url_path_join(serverapp.web_app.settings["base_url"], "hpchub/walltime")
    serverapp.web_app.add_handlers(".*$", [(route, WalltimeHandler)])
