"""Benchmarks 1 and 4 on one fleet of servers per stack.

1. Scheduler load: the fleet grows to each N (servers spawned through the hub's REST API, real jobs running
   the stand-in); once every server is routed and a settling pause has passed, slurmctld's RPC counters
   (`sdiag`) are read before and after a window of several poll intervals. The hub's RPCs are every RPC
   but sdiag's own and those slurmd and job steps send (bench/cluster.py NODE_MESSAGES, reported apart).
4. Hub restart: with the largest fleet running, the hub and its proxy are SIGKILLed and the hub started
   again on the same database; measured until every server's route is back in the new proxy, with the
   scheduler RPCs of that time.
"""
from __future__ import annotations

import asyncio
import time
from pathlib import Path

from cluster import PrivateSlurm
from stacks import RunningHub, Stack, kill_hub, spawn_all, start_hub, wait_routed


async def fleet(stack: Stack, *, slurm: PrivateSlurm, users: list[str], sizes: list[int], restart: bool,
                workdir: Path, standin: Path, poll_interval: float, window: float, settle: float,
                log) -> dict:
    result: dict = {"stack": stack.name, "poll_interval_s": poll_interval, "window_s": window, "sizes": []}
    hub = start_hub(stack, workdir, slurm_env=slurm.env(), standin=standin, poll_interval=poll_interval)
    try:
        async with hub:
            await hub.create_users(users[:max(sizes)])
            running = 0
            for n in sizes:
                started = time.monotonic()
                new = users[running:n]
                counts = await spawn_all(hub, new)
                waited, failed = await wait_routed(hub, set(users[:n]), timeout=600 + 2 * n)
                grow_s = time.monotonic() - started
                running = n
                log(f"{stack.name}: {n} servers routed ({len(new)} new in {grow_s:.1f} s, {counts['429']} HTTP 429, "
                    f"{failed} failed spawns retried); settling {settle:.0f} s")
                if not window:
                    continue           # only growing the fleet for the restart
                await asyncio.sleep(settle)
                entry = {"n": n, "grow_s": round(grow_s, 2), "spawn_429": counts["429"], "failed_spawns": failed,
                         "jobs": slurm.jobs(), **await measure_window(hub, slurm, window, poll_interval)}
                result["sizes"].append(entry)
                log(f"{stack.name}: N={n}: {entry['hub_rpcs']} RPCs in {entry['window_s']:.0f} s = "
                    f"{entry['rpcs_per_min']:.1f}/min, {entry['rpcs_per_interval']:.2f} per poll interval")
            if restart:
                result["restart"] = await restart_hub(hub, slurm, set(users[:running]), log)
    finally:
        kill_hub(hub)
        slurm.cancel_all()
    return result


async def measure_window(hub: RunningHub, slurm: PrivateSlurm, window: float, poll_interval: float) -> dict:
    queries_before = await hub.scheduler_queries()
    before = slurm.sdiag()
    await asyncio.sleep(window)
    delta = slurm.sdiag() - before
    queries_after = await hub.scheduler_queries()
    routed = len(await hub.routed_users())
    return {
        "window_s": round(delta.seconds, 2), "hub_rpcs": delta.hub,
        "rpcs_per_min": delta.hub * 60 / delta.seconds,
        "rpcs_per_interval": delta.hub * poll_interval / delta.seconds,
        "hpchub_queries": None if queries_before is None else queries_after - queries_before,
        "routed_after": routed, "sdiag": delta.as_dict(),
    }


async def restart_hub(hub: RunningHub, slurm: PrivateSlurm, names: set[str], log) -> dict:
    kill_hub(hub)
    before = slurm.sdiag()
    started = time.monotonic()
    launch = asyncio.ensure_future(asyncio.to_thread(hub.hub.launch, 900))
    api_up = None
    routed: set[str] = set()
    while not names <= routed:
        if launch.done() and api_up is None:
            launch.result()        # raises when the hub did not start
            api_up = time.monotonic() - started
        if time.monotonic() - started > 900:
            raise TimeoutError(f"{hub.stack.name}: {len(names - routed)} routes not restored 900 s after a restart")
        await asyncio.sleep(0.1)
        routed = await hub.routed_users()
    restored = time.monotonic() - started
    await launch                   # the scheduler calls of the restart include those until the API is up
    api_up = api_up if api_up is not None else time.monotonic() - started
    delta = slurm.sdiag() - before
    log(f"{hub.stack.name}: restart with {len(names)} servers: every route back after {restored:.2f} s "
        f"(API up after {api_up:.2f} s), {delta.hub} scheduler RPCs")
    return {"n": len(names), "routes_restored_s": round(restored, 3), "api_up_s": round(api_up, 3),
            "hub_rpcs": delta.hub, "sdiag": delta.as_dict(),
            "query_rpcs": sum(n for t, n in delta.by_type.items() if t.startswith("REQUEST_JOB_INFO"))}
