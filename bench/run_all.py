#!/opt/hpchub/bin/python
"""hpchub's benchmarks, side by side with JupyterHub + upstream batchspawner, in one run (issue 11).

  1 load      slurmctld RPCs per minute (sdiag) while each stack tracks N running servers
  2 overhead  what the hub adds to one spawn: (request -> reachable) - (job start -> listening)
  3 burst     N users spawn at the same moment: spawns/s until all are reachable, errors, HTTP 429s
  4 restart   the hub killed and started again with N servers running: time to every route, scheduler RPCs
  5 tunnel    bench/tunnel.py (the SSH tunnel gateway against direct and OpenSSH paths)

Each of 1-4 runs hpchub (/opt/hpchub) and the baseline (/opt/hpchub-baseline, built by
scripts/install-bench-baseline.sh) one after the other on a private Slurm started for the run
(bench/cluster.py), with the same stand-in server (bench/standin.py) as the bench users bench0001...
(bench/users.py, removed at the end). Writes results.json, results.md and benchmarks-scheduler-load.png to
--out. As root (jobs are submitted as the users through sudo). Not part of the test suite.

Usage: /opt/hpchub/bin/python bench/run_all.py [--benchmarks load,overhead,burst,restart,tunnel]
         [--sizes 10,100,1000] [--poll-interval 30] [--window 90] [--overhead-spawns 20] [--burst-users 200]
"""
from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import burst  # noqa: E402
import load  # noqa: E402
import overhead  # noqa: E402
import report  # noqa: E402
import users  # noqa: E402
from cluster import PrivateSlurm  # noqa: E402
from stacks import BASELINE_STACK, STACKS  # noqa: E402

BENCHMARKS = ("load", "overhead", "burst", "restart", "tunnel")
STARTED = time.monotonic()


def log(message: str) -> None:
    print(f"[bench {time.monotonic() - STARTED:7.1f} s] {message}", flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--benchmarks", default=",".join(BENCHMARKS), help="comma-separated subset of " + ", ".join(BENCHMARKS))
    p.add_argument("--stacks", default="hpchub,baseline", help="hpchub, baseline or both (the default)")
    p.add_argument("--sizes", default="10,100,1000", help="N for the scheduler load (default 10,100,1000)")
    p.add_argument("--restart-n", type=int, help="servers running at the restart (default: the largest size)")
    p.add_argument("--poll-interval", type=float, default=30.0,
                   help="seconds, for both stacks: hpchub's job_poll_interval and the baseline's Spawner.poll_interval "
                        "(30, the default of both)")
    p.add_argument("--window", type=float, help="seconds of each RPC measurement (default 3 poll intervals)")
    p.add_argument("--settle", type=float, default=10.0, help="seconds between a fleet being routed and its window")
    p.add_argument("--overhead-spawns", type=int, default=20)
    p.add_argument("--burst-users", type=int, default=200)
    p.add_argument("--tunnel-args", default="", help="arguments for bench/tunnel.py, e.g. '--repeat 1 --megabytes 64'")
    p.add_argument("--workdir", type=Path, default=Path("/var/tmp/hpchub-bench"),
                   help="the private Slurm, the hubs, the users' homes (default /var/tmp/hpchub-bench)")
    p.add_argument("--out", type=Path, help="where results go (default WORKDIR/results)")
    p.add_argument("--keep-users", action="store_true", help="leave the bench users for the next run")
    args = p.parse_args(argv)
    args.benchmarks = [b for b in args.benchmarks.split(",") if b]
    if unknown := set(args.benchmarks) - set(BENCHMARKS):
        p.error(f"--benchmarks: unknown {', '.join(sorted(unknown))}; choose from {', '.join(BENCHMARKS)}")
    names = {s.name: s for s in STACKS}
    try:
        args.stacks = [names[s] for s in args.stacks.split(",") if s]
    except KeyError as err:
        p.error(f"--stacks: unknown {err}; choose from hpchub, baseline")
    args.sizes = sorted(int(n) for n in args.sizes.split(",") if n)
    args.restart_n = args.restart_n or max(args.sizes)
    args.window = args.window or 3 * args.poll_interval
    args.out = args.out or args.workdir / "results"
    return args


def description(args: argparse.Namespace) -> str:
    return (f"poll interval {args.poll_interval:g} s for both stacks (hpchub `BatchSpawner.job_poll_interval`, "
            f"baseline `Spawner.poll_interval`); RPC window {args.window:g} s after a {args.settle:g} s pause; "
            f"scheduler-load N = {', '.join(map(str, args.sizes))}; restart with {args.restart_n} servers; "
            f"{args.overhead_spawns} spawns for the overhead; {args.burst_users} users in the burst; every other "
            "setting at each stack's default (JupyterHub's concurrent_spawn_limit is 100 for the baseline, 0 for "
            "hpchub, which bounds submissions with max_concurrent_submissions = 20). Stand-in server: bench/standin.py. "
            "Private Slurm: bench/cluster.py.")


async def run(args: argparse.Namespace, slurm: PrivateSlurm, names: list[str], standin: Path) -> dict:
    bench: dict = {}
    common = dict(slurm=slurm, standin=standin, poll_interval=args.poll_interval, log=log)
    if "load" in args.benchmarks or "restart" in args.benchmarks:
        sizes = args.sizes if "load" in args.benchmarks else [args.restart_n]
        for stack in args.stacks:
            log(f"== scheduler load{' and restart' if 'restart' in args.benchmarks else ''}: {stack.name}")
            result = await load.fleet(stack, users=names, sizes=[n for n in sizes if n <= max(sizes)],
                                      restart="restart" in args.benchmarks, workdir=args.workdir / "hubs" / f"load-{stack.name}",
                                      window=args.window if "load" in args.benchmarks else 0, settle=args.settle, **common)
            if "load" in args.benchmarks:
                bench.setdefault("scheduler_load", {})[stack.name] = result
            if "restart" in result:
                bench.setdefault("restart", {})[stack.name] = result["restart"]
    if "overhead" in args.benchmarks:
        floor = overhead.scheduler_floor(slurm, names[0], Path(users.home(names[0])))
        bench["scheduler_floor"] = floor
        log(f"Slurm alone, sbatch -> the job's first line: median {floor['median_s']:.3f} s, p95 {floor['p95_s']:.3f} s")
        for stack in args.stacks:
            log(f"== overhead: {stack.name}")
            bench.setdefault("overhead", {})[stack.name] = await overhead.overhead(
                stack, users=names, spawns=args.overhead_spawns, workdir=args.workdir / "hubs" / f"overhead-{stack.name}",
                **common)
    if "burst" in args.benchmarks:
        burst_users = names[:args.burst_users]
        bench["burst_floor"] = await burst.scheduler_floor(
            slurm, burst_users, {name: Path(users.home(name)) for name in burst_users}, log)
        for stack in args.stacks:
            log(f"== burst: {stack.name}")
            bench.setdefault("burst", {})[stack.name] = await burst.burst(
                stack, users=names[:args.burst_users], workdir=args.workdir / "hubs" / f"burst-{stack.name}", **common)
    return bench


async def tunnel(args: argparse.Namespace) -> dict:
    """bench/tunnel.py's own benchmark, called as it is: its printed table stays, its figures are kept."""
    spec = importlib.util.spec_from_file_location("bench_tunnel", HERE / "tunnel.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)    # it takes bench/ off sys.path, so that `tunnel` is the package
    kept: dict = {}
    printed = module.report

    def keep(results: dict, targs: argparse.Namespace) -> None:
        kept.update(results)
        printed(results, targs)

    module.report = keep
    parser = argparse.ArgumentParser()
    for option, default in (("--round-trips", 2000), ("--connects", 200), ("--megabytes", 256), ("--repeat", 3)):
        parser.add_argument(option, type=int, default=default)
    targs = parser.parse_args(args.tunnel_args.split())
    log("== tunnel (bench/tunnel.py)")
    await module.bench(targs)
    return {"settings": f"{targs.round_trips} round trips of 64 B on one connection, {targs.connects} new connections, "
                        f"{targs.megabytes} MiB bulk; medians of {targs.repeat} turns per path.", "paths": kept}


def main() -> None:
    args = parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root: jobs are submitted as the bench users through sudo, and Slurm daemons start")
    if any(s is BASELINE_STACK for s in args.stacks) and not (BASELINE_STACK.venv / "bin" / "jupyterhub").exists():
        raise SystemExit(f"{BASELINE_STACK.venv} is missing: run scripts/install-bench-baseline.sh first")
    args.out.mkdir(parents=True, exist_ok=True)
    needs = [args.burst_users * ("burst" in args.benchmarks), args.overhead_spawns * ("overhead" in args.benchmarks),
             max(args.sizes) * ("load" in args.benchmarks), args.restart_n * ("restart" in args.benchmarks)]
    slurm = PrivateSlurm(args.workdir, cpus_needed=max(needs + [1]))
    results: dict = {"settings": {**{k: v for k, v in vars(args).items() if k not in ("stacks", "workdir", "out")},
                                  "stacks": [s.name for s in args.stacks], "description": description(args)}}
    hub_benchmarks = [b for b in args.benchmarks if b != "tunnel"]
    try:
        if hub_benchmarks:
            log(f"starting the private Slurm ({len(slurm.nodes)} nodes x {slurm.cpus_per_node} CPUs) in {slurm.root}")
            slurm.start()
            results["environment"] = report.environment(slurm.version())
            log(f"creating bench users ({max(needs)})")
            names = users.ensure(max(needs), args.workdir / "home")
            standin = args.workdir / "standin.py"
            shutil.copyfile(HERE / "standin.py", standin)
            standin.chmod(0o755)
            results["benchmarks"] = asyncio.run(run(args, slurm, names, standin))
            # on disk before the clean-up, which may fail on a machine a thousand jobs left slow
            (args.out / "results.json").write_text(json.dumps(results, indent=1, default=str))
        else:
            results["environment"] = report.environment(slurm.version())
            results["benchmarks"] = {}
        if "tunnel" in args.benchmarks:
            results["benchmarks"]["tunnel"] = asyncio.run(tunnel(args))
    finally:
        if hub_benchmarks:
            slurm.stop()
            if not args.keep_users:
                log(f"removed {users.remove(args.workdir / 'home')} bench users")
    (args.out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    markdown = report.markdown(results)
    (args.out / "results.md").write_text(markdown)
    if "scheduler_load" in results["benchmarks"] and len(args.stacks) == 2:
        subprocess.run([str(BASELINE_STACK.venv / "bin" / "python"), str(HERE / "plot.py"), str(args.out / "results.json"),
                        str(args.out / "benchmarks-scheduler-load.png")], check=True, timeout=120)
    print("\n" + markdown)
    log(f"results in {args.out}")


if __name__ == "__main__":
    main()
