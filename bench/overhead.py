"""Benchmark 2: what the hub adds to a spawn.

One spawn at a time (each a new user), on an otherwise idle hub:
  total     = spawn request (POST /hub/api/users/NAME/server) -> the stand-in answers GET /user/NAME/ through
              the proxy (the proxy's routing table is polled every 10 ms, so the hub is not loaded by it;
              then the server is fetched through the proxy);
  job side  = the job's first line (prologue timestamp) -> the stand-in listening (its own timestamp);
  overhead  = total - job side: everything that is not the job starting its server (the hub's submission,
              the scheduler starting the job, the hub noticing that it runs and that the server is up, the
              route), as the issue defines it.
The hub's own share (request -> sbatch returned, port report -> route) is read from its log (bench/hublog.py).
Clocks: the job runs on this host, so its timestamps and the benchmark's share one clock.

The overhead so defined includes what Slurm itself takes from a submission to the job's first line, which
no hub can remove: `scheduler_floor` measures it without a hub (sudo as the user, sbatch, the job writes
its first line's time), so that the hub's own part can be read off (overhead - floor).
"""
from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import time
from pathlib import Path

from cluster import PrivateSlurm
from hublog import spawn_phases
from stacks import Stack, kill_hub, start_hub

REACH_TIMEOUT_S = 120


async def overhead(stack: Stack, *, slurm: PrivateSlurm, users: list[str], spawns: int, workdir: Path,
                   standin: Path, poll_interval: float, log) -> dict:
    hub = start_hub(stack, workdir, slurm_env=slurm.env(), standin=standin, poll_interval=poll_interval)
    samples = []
    try:
        async with hub:
            await hub.create_users(users[:spawns])
            for name in users[:spawns]:
                t0 = time.time()
                status, _ = await hub.spawn(name)
                if status not in (201, 202):
                    raise RuntimeError(f"{stack.name}: spawning {name} answered {status}")
                deadline = time.monotonic() + REACH_TIMEOUT_S
                while name not in await hub.routed_users():
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"{stack.name}: {name} not routed after {REACH_TIMEOUT_S} s")
                    await asyncio.sleep(0.01)
                while (answer := await hub.through_proxy(name)) is None:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"{stack.name}: {name} routed but not answering")
                    await asyncio.sleep(0.01)
                t1 = time.time()
                total, job = t1 - t0, answer["listening"] - answer["job_start"]
                samples.append({"total_s": total, "job_side_s": job, "overhead_s": total - job,
                                "to_job_start_s": answer["job_start"] - t0, "listening_to_reachable_s": t1 - answer["listening"]})
                await asyncio.sleep(0.5)      # let the spawn's last bookkeeping finish before the next one
    finally:
        kill_hub(hub)
        slurm.cancel_all()
    result = {"stack": stack.name, "spawns": len(samples), "samples": samples,
              **{f"{key}_median": statistics.median(s[key] for s in samples) for key in samples[0]},
              **{f"{key}_p95": _p95([s[key] for s in samples]) for key in samples[0]},
              "hub_log": spawn_phases(workdir / "hub.log")}
    log(f"{stack.name}: overhead median {result['overhead_s_median']:.3f} s, p95 {result['overhead_s_p95']:.3f} s "
        f"(total {result['total_s_median']:.3f} s, job side {result['job_side_s_median']:.3f} s)")
    return result


def scheduler_floor(slurm: PrivateSlurm, user: str, home: Path, count: int = 10) -> dict:
    """Submission -> the job's first line with no hub: `sudo -u USER env SLURM_CONF=... sbatch`, as both hubs
    submit, of a job whose first line writes the time."""
    marker = home / ".bench-floor"
    samples = []
    for _ in range(count):
        marker.unlink(missing_ok=True)
        t0 = time.time()
        subprocess.run(slurm.timestamp_job(user, home, marker), check=True, capture_output=True, timeout=60,
                       env={**os.environ, **slurm.env()})
        deadline = time.monotonic() + 60
        while not (marker.exists() and marker.read_text().strip()):
            if time.monotonic() > deadline:
                raise TimeoutError("a plain sbatch job did not start within 60 s")
            time.sleep(0.005)
        samples.append(float(marker.read_text()) - t0)
        time.sleep(0.3)
    marker.unlink(missing_ok=True)
    slurm.cancel_all()
    return {"count": count, "median_s": statistics.median(samples), "p95_s": _p95(samples), "samples": samples}


def _p95(values: list[float]) -> float:
    """The 95th percentile (nearest rank)."""
    ordered = sorted(values)
    return ordered[max(0, -(-95 * len(ordered) // 100) - 1)]
