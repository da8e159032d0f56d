"""Benchmark 3: a class starts at once. `users` users each POST a spawn at the same moment on a fresh hub.

A user whose request gets HTTP 429 (JupyterHub's concurrent_spawn_limit) retries after Retry-After (1 s
without it), as the spawn page does; each 429 is counted. The proxy's routing table is read every 0.25 s;
a newly routed server is fetched through the proxy and counts as reachable when the stand-in answers.
A user left with no server (running or pending) after its spawn was accepted has failed; every user not
reachable by the end (failed, refused other than with 429, or still waiting at the deadline) is an error. The rate is
reachable servers / (last reachable - start).

`scheduler_floor` is the same burst with no hub: every user's `sudo -u USER sbatch` at once, each job writing
its first line's time. What Slurm and sudo alone take on this machine bounds what any hub can reach.
"""
from __future__ import annotations

import asyncio
import os
import statistics
import time
from pathlib import Path

from cluster import PrivateSlurm
from stacks import Stack, kill_hub, start_hub

DEADLINE_S = 900


async def burst(stack: Stack, *, slurm: PrivateSlurm, users: list[str], workdir: Path, standin: Path,
                poll_interval: float, log) -> dict:
    hub = start_hub(stack, workdir, slurm_env=slurm.env(), standin=standin, poll_interval=poll_interval)
    try:
        async with hub:
            await hub.create_users(users)
            result = await _burst(hub, users)
            result["jobs_after"] = slurm.jobs()
    finally:
        kill_hub(hub)
        slurm.cancel_all()
    log(f"{stack.name}: {result['reachable']}/{len(users)} reachable in {result['all_reachable_s']:.1f} s = "
        f"{result['spawns_per_s']:.1f} spawns/s; {result['errors']} errors, {result['http_429']} HTTP 429")
    return {"stack": stack.name, **result}


async def _burst(hub, users: list[str]) -> dict:
    accepted: dict[str, float] = {}
    reached: dict[str, float] = {}
    rejected: dict[str, int] = {}
    failed: set[str] = set()
    http_429 = 0
    start = time.monotonic()

    async def request(name: str) -> None:
        nonlocal http_429
        while time.monotonic() - start < DEADLINE_S:
            status, retry = await hub.spawn(name)
            if status in (201, 202):
                accepted[name] = time.monotonic()
                return
            if status != 429:
                rejected[name] = status
                return
            http_429 += 1
            await asyncio.sleep(retry or 1.0)

    async def fetch(name: str) -> None:
        while time.monotonic() - start < DEADLINE_S:
            if await hub.through_proxy(name) is not None:
                reached[name] = time.monotonic() - start
                return
            await asyncio.sleep(0.25)

    requests = asyncio.gather(*(request(n) for n in users))
    fetching: dict[str, asyncio.Task] = {}
    last_failure_check = start
    while len(reached) + len(failed) + len(rejected) < len(users) and time.monotonic() - start < DEADLINE_S:
        for name in await hub.routed_users():
            if name not in fetching:
                fetching[name] = asyncio.ensure_future(fetch(name))
        if time.monotonic() - last_failure_check > 5:
            last_failure_check = time.monotonic()
            gone = await hub.users_without_server()
            failed |= {n for n in gone if n in accepted and n not in reached and n not in fetching}
        await asyncio.sleep(0.25)
    await requests
    for task in fetching.values():
        task.cancel()
    times = sorted(reached.values())
    last = times[-1] if times else float("nan")
    return {
        "users": len(users), "reachable": len(reached), "errors": len(users) - len(reached),
        "failed_spawns": len(failed), "rejected": rejected, "http_429": http_429, "spawn_codes": hub.spawn_codes,
        "all_reachable_s": last, "spawns_per_s": len(reached) / last if times else 0.0,
        "median_reachable_s": statistics.median(times) if times else None,
        "first_reachable_s": times[0] if times else None,
    }


async def scheduler_floor(slurm: PrivateSlurm, users: list[str], homes: dict[str, Path], log) -> dict:
    """All users submit at the same moment without a hub (`sudo -u USER env SLURM_CONF=... sbatch`, as both hubs
    submit); the rate is jobs started / time until the last job's first line."""
    markers = {name: homes[name] / ".bench-burst-floor" for name in users}
    for marker in markers.values():
        marker.unlink(missing_ok=True)
    env = {**os.environ, **slurm.env()}
    start = time.time()

    async def submit(name: str) -> float:
        process = await asyncio.create_subprocess_exec(
            *slurm.timestamp_job(name, homes[name], markers[name]),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE, env=env)
        _, stderr = await process.communicate()
        if process.returncode:
            raise RuntimeError(f"sbatch as {name} failed: {stderr.decode().strip()}")
        return time.time() - start

    submitted = await asyncio.gather(*(submit(name) for name in users))
    started: dict[str, float] = {}
    while len(started) < len(users):
        if time.time() - start > DEADLINE_S:
            raise TimeoutError(f"{len(users) - len(started)} plain sbatch jobs did not start within {DEADLINE_S} s")
        for name, marker in markers.items():
            if name not in started and marker.exists() and (text := marker.read_text().strip()):
                started[name] = float(text) - start
        await asyncio.sleep(0.1)
    slurm.cancel_all()
    for marker in markers.values():
        marker.unlink(missing_ok=True)
    times = sorted(started.values())
    result = {"users": len(users), "all_submitted_s": max(submitted), "all_started_s": times[-1],
              "median_started_s": statistics.median(times), "jobs_per_s": len(times) / times[-1]}
    log(f"Slurm alone, {len(users)} sbatch at once: all submitted after {result['all_submitted_s']:.1f} s, all started "
        f"after {result['all_started_s']:.1f} s = {result['jobs_per_s']:.1f} jobs/s")
    return result
