"""What a run of the benchmarks prints and writes: the machine and versions, the tables with ratios, and the
goals of issue 11 with the measured figures (reported, never asserted)."""
from __future__ import annotations

import os
import platform
import subprocess
from datetime import datetime, timezone
from pathlib import Path

from stacks import BASELINE_STACK, HPCHUB_STACK


def _run(*argv: str, cwd: str | None = None) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=cwd).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "?"


def environment(slurm_version: str) -> dict:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor() or "?")
    mem_kb = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                  if line.startswith("MemTotal"))
    hpchub_src = _run(str(HPCHUB_STACK.venv / "bin" / "python"), "-c",
                      "import hpchub, os; print(os.path.dirname(os.path.dirname(hpchub.__file__)))")
    commit = _run("git", "rev-parse", "--short=12", "HEAD", cwd=hpchub_src)
    if _run("git", "status", "--porcelain", "--untracked-files=no", cwd=hpchub_src):
        commit += " (with uncommitted changes)"
    hpchub_versions, baseline_versions = HPCHUB_STACK.versions(), BASELINE_STACK.versions()
    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": {"cpus": os.cpu_count(), "cpu_model": model, "memory_gib": round(mem_kb / 2**20, 1),
                    "kernel": platform.release(), "load_average_at_start": os.getloadavg()},
        "versions": {
            "slurm": slurm_version,
            "hpchub": f"{hpchub_versions.get('hpchub', '?')} at commit {commit} ({hpchub_src})",
            "jupyterhub (hpchub)": hpchub_versions.get("jupyterhub", "?"),
            "jupyterhub (baseline)": baseline_versions.get("jupyterhub", "?"),
            "batchspawner (baseline, PyPI)": baseline_versions.get("batchspawner", "?"),
            "configurable-http-proxy": _run("configurable-http-proxy", "--version"),
            "node": _run("node", "--version"),
            "python": platform.python_version(),
        },
    }


def _ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None:
        return "n/a"
    if a == 0:
        return "inf" if b else "n/a"
    return f"{b / a:.1f}x"


def markdown(results: dict) -> str:
    env, settings, bench = results["environment"], results["settings"], results["benchmarks"]
    m = env["machine"]
    out = [f"# hpchub benchmarks, {env['date']}", "",
           f"Machine: {m['cpus']} CPUs ({m['cpu_model']}), {m['memory_gib']} GiB, Linux {m['kernel']}, "
           f"load average at start {', '.join(f'{x:.2f}' for x in m['load_average_at_start'])} (shared machine).", "",
           "| component | version |", "| --- | --- |",
           *(f"| {k} | {v} |" for k, v in env["versions"].items()), "",
           f"Settings: {settings['description']}", ""]
    goals: list[tuple[str, str, str]] = []

    if "scheduler_load" in bench:
        load = bench["scheduler_load"]
        interval = load["hpchub"]["poll_interval_s"]
        out += ["## 1. Scheduler load", "",
                f"slurmctld RPCs (sdiag deltas, sdiag's own and slurmd's messages excluded) over a "
                f"{load['hpchub']['window_s']:.0f} s window while each stack tracks N running servers; poll interval "
                f"{interval:g} s for both (hpchub `BatchSpawner.job_poll_interval`, baseline `Spawner.poll_interval`).", "",
                "| N | hpchub RPCs/min | baseline RPCs/min | baseline / hpchub | hpchub RPCs per interval | "
                "baseline RPCs per interval | hpchub batched queries | time to grow (hpchub / baseline) |",
                "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        base = {s["n"]: s for s in load["baseline"]["sizes"]} if "baseline" in load else {}
        for s in load["hpchub"]["sizes"]:
            b = base.get(s["n"])
            out.append(f"| {s['n']} | {s['rpcs_per_min']:.2f} | {b['rpcs_per_min'] if b else float('nan'):.1f} | "
                       f"{_ratio(s['rpcs_per_min'], b['rpcs_per_min'] if b else None)} | {s['rpcs_per_interval']:.2f} | "
                       f"{b['rpcs_per_interval'] if b else float('nan'):.1f} | {s['hpchub_queries']} | "
                       f"{s['grow_s']:.0f} s / {b['grow_s'] if b else float('nan'):.0f} s |")
        out += ["", "RPC types in the window at the largest N:", ""]
        for stack in ("hpchub", "baseline"):
            if stack in load and load[stack]["sizes"]:
                last = load[stack]["sizes"][-1]
                types = ", ".join(f"{t} {n}" for t, n in sorted(last["sdiag"]["by_type"].items(), key=lambda x: -x[1]))
                out.append(f"- {stack} (N={last['n']}): {types}")
        out += ["", "![RPCs per minute against N](benchmarks-scheduler-load.png)", ""]
        worst = max(s["rpcs_per_interval"] for s in load["hpchub"]["sizes"])
        goals.append(("RPCs per poll interval <= 2 at any N", f"at most {worst:.2f}", _yes(worst <= 2)))
        largest = load["hpchub"]["sizes"][-1]
        if largest["n"] in base:
            factor = base[largest["n"]]["rpcs_per_min"] / max(largest["rpcs_per_min"], 1e-9)
            goals.append((f">= 500x fewer RPCs than the baseline at N={largest['n']} (goal stated for N=1000)",
                          f"{factor:.0f}x", _yes(factor >= 500)))

    if "overhead" in bench:
        o = bench["overhead"]
        out += ["## 2. Hub overhead per spawn", "",
                f"{o['hpchub']['spawns']} spawns one after another per stack. overhead = (spawn request -> reachable "
                "through the proxy) - (job's first line -> server listening).", "",
                "| stack | total median | job side median | overhead median | overhead p95 | request -> job start "
                "median | listening -> reachable median |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for stack in ("hpchub", "baseline"):
            if stack in o:
                r = o[stack]
                out.append(f"| {stack} | {r['total_s_median']:.3f} s | {r['job_side_s_median']:.3f} s | "
                           f"{r['overhead_s_median']:.3f} s | {r['overhead_s_p95']:.3f} s | "
                           f"{r['to_job_start_s_median']:.3f} s | {r['listening_to_reachable_s_median']:.3f} s |")
        phases = {st: o[st]["hub_log"] for st in ("hpchub", "baseline") if o.get(st, {}).get("hub_log", {}).get("spawns")}
        if phases:
            out += ["", "From each hub's log (bench/hublog.py), medians: the hub's own time is request -> sbatch returned "
                    "plus port report -> route added; between them Slurm starts the job and the server reports.", "",
                    "| stack | request -> sbatch returned | sbatch returned -> port report | port report -> route | hub's own time |",
                    "| --- | ---: | ---: | ---: | ---: |"]
            out += [f"| {st} | {p['request_to_submitted_s_median']:.3f} s | {p['submitted_to_reported_s_median']:.3f} s | "
                    f"{p['reported_to_routed_s_median']:.3f} s | {p['hub_own_s_median']:.3f} s |" for st, p in phases.items()]
        floor = bench.get("scheduler_floor")
        if floor:
            out += ["", f"Slurm alone, without a hub (`sudo -u USER sbatch --wrap` -> the job's first line, {floor['count']} jobs, "
                    f"one after another): median {floor['median_s']:.3f} s, p95 {floor['p95_s']:.3f} s."]
        own = {st: f"; the hub's own time {p['hub_own_s_median']:.3f} s" for st, p in phases.items()}
        goals.append(("hub overhead <= 0.3 s median", f"{o['hpchub']['overhead_s_median']:.3f} s{own.get('hpchub', '')}",
                      _yes(o["hpchub"]["overhead_s_median"] <= 0.3)))
        if "baseline" in o:
            out += ["", f"Baseline / hpchub overhead: median {_ratio(o['hpchub']['overhead_s_median'], o['baseline']['overhead_s_median'])}, "
                    f"p95 {_ratio(o['hpchub']['overhead_s_p95'], o['baseline']['overhead_s_p95'])}."]
            goals.append(("overhead <= half the baseline's (median)",
                          f"{o['hpchub']['overhead_s_median']:.3f} s vs {o['baseline']['overhead_s_median']:.3f} s"
                          + (f" (the hubs' own time: {phases['hpchub']['hub_own_s_median']:.3f} s vs "
                             f"{phases['baseline']['hub_own_s_median']:.3f} s)" if len(phases) == 2 else ""),
                          _yes(o["hpchub"]["overhead_s_median"] <= o["baseline"]["overhead_s_median"] / 2)))
        out.append("")

    if "burst" in bench:
        b = bench["burst"]
        out += ["## 3. Class-start burst", "",
                "All users POST a spawn at the same moment on a fresh hub; HTTP 429s are retried after Retry-After.", "",
                "| stack | users | reachable | all reachable after | spawns/s | median reachable after | errors | HTTP 429 |",
                "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for stack in ("hpchub", "baseline"):
            if stack in b:
                r = b[stack]
                out.append(f"| {stack} | {r['users']} | {r['reachable']} | {r['all_reachable_s']:.1f} s | "
                           f"{r['spawns_per_s']:.1f} | {r['median_reachable_s'] or float('nan'):.1f} s | {r['errors']} | "
                           f"{r['http_429']} |")
        floor = bench.get("burst_floor")
        if floor:
            out += ["", f"Slurm alone, without a hub ({floor['users']} `sudo -u USER sbatch` at once, each job writing its "
                    f"first line's time): all submitted after {floor['all_submitted_s']:.1f} s, all started after "
                    f"{floor['all_started_s']:.1f} s = {floor['jobs_per_s']:.1f} jobs/s (median started after "
                    f"{floor['median_started_s']:.1f} s): the most any hub could reach here."]
        if "baseline" in b:
            out += ["", f"hpchub / baseline spawn rate: {_ratio(b['baseline']['spawns_per_s'], b['hpchub']['spawns_per_s'])}."]
        h = b["hpchub"]
        goals.append(("burst >= 20 spawns/s with 0 errors", f"{h['spawns_per_s']:.1f} spawns/s, {h['errors']} errors",
                      _yes(h["spawns_per_s"] >= 20 and h["errors"] == 0)))
        out.append("")

    if "restart" in bench:
        r = bench["restart"]
        out += ["## 4. Hub restart", "",
                "With N servers running, the hub and its proxy are SIGKILLed, then the hub is started again on the same "
                "database; until every route is back in the new proxy.", "",
                "| stack | N | every route back after | hub API up after | scheduler RPCs | of which job queries |",
                "| --- | ---: | ---: | ---: | ---: | ---: |"]
        for stack in ("hpchub", "baseline"):
            if stack in r:
                x = r[stack]
                out.append(f"| {stack} | {x['n']} | {x['routes_restored_s']:.2f} s | {x['api_up_s']:.2f} s | "
                           f"{x['hub_rpcs']} | {x['query_rpcs']} |")
        if "baseline" in r:
            out += ["", f"Baseline / hpchub: time {_ratio(r['hpchub']['routes_restored_s'], r['baseline']['routes_restored_s'])}, "
                    f"scheduler RPCs {_ratio(r['hpchub']['hub_rpcs'], r['baseline']['hub_rpcs'])}."]
        h = r["hpchub"]
        goals.append((f"restart <= 5 s with one scheduler query (N={h['n']})",
                      f"{h['routes_restored_s']:.2f} s, {h['query_rpcs']} job-query RPCs ({h['hub_rpcs']} RPCs in all)",
                      _yes(h["routes_restored_s"] <= 5 and h["query_rpcs"] <= 1)))
        out.append("")

    if "tunnel" in bench:
        t = bench["tunnel"]
        out += ["## 5. Tunnel (bench/tunnel.py)", "", t["settings"], "",
                "| path | RTT median | RTT p99 | connect + RTT median | MB/s |", "| --- | ---: | ---: | ---: | ---: |"]
        for name, x in t["paths"].items():
            out.append(f"| {name} | {x['rtt_median_us']:.0f} us | {x['rtt_p99_us']:.0f} us | "
                       f"{x['connect_median_ms']:.2f} ms | {x['mb_per_s']:.0f} |")
        out.append("")

    if goals:
        out += ["## Goals of issue 11 (reported, not asserted)", "", "| goal | measured | met |", "| --- | --- | --- |",
                *(f"| {g} | {v} | {ok} |" for g, v, ok in goals), ""]
    return "\n".join(out)


def _yes(ok: bool) -> str:
    return "yes" if ok else "**no**"
