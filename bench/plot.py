"""`python bench/plot.py results.json plot.png`: slurmctld RPCs per minute against N, both stacks (log-log).

Runs in the benchmark's own environment (/opt/hpchub-baseline holds matplotlib; hpchub's does not need it).
"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(results_path: str, png_path: str) -> None:
    results = json.load(open(results_path))
    load = results["benchmarks"]["scheduler_load"]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for stack, style in (("baseline", "o-"), ("hpchub", "s-")):
        sizes = load[stack]["sizes"]
        ns = [s["n"] for s in sizes]
        rates = [max(s["rpcs_per_min"], 0.05) for s in sizes]   # a log axis has no zero
        label = "upstream batchspawner (poll() per server)" if stack == "baseline" else "hpchub (shared poller)"
        ax.plot(ns, rates, style, label=label)
        for n, r in zip(ns, rates):
            ax.annotate(f"{r:.1f}", (n, r), textcoords="offset points", xytext=(4, 6), fontsize=8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("servers tracked (N)")
    ax.set_ylabel("slurmctld RPCs per minute (sdiag)")
    interval = load["hpchub"]["poll_interval_s"]
    machine = results["environment"]["machine"]
    ax.set_title(f"Scheduler load, poll interval {interval:g} s for both\n"
                 f"{machine['cpus']} CPUs ({machine['cpu_model']}), {results['environment']['versions']['slurm']}",
                 fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path)


if __name__ == "__main__":
    main(*sys.argv[1:3])
