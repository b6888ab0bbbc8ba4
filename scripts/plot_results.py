#!/usr/bin/env python3
"""Renders the benchmark results in benches/results to plots (SVG and PNG) in
benches/results/plots:

- peers-throughput: events/s against the number of queries (log-log), livegrid against
  each brute-force peer, from a peers results file (scripts/peers_bench.py --out);
- cluster-projection: measured events/s of one and two processes and the cost model's
  projection to 64 processes (labelled as a projection), from a cluster results file
  (scripts/cluster_bench.py --out, or the combined file with several workloads).

Needs matplotlib (`pip install matplotlib`).

Usage: scripts/plot_results.py [--peers FILE] [--cluster FILE] [--out DIR]
"""

import argparse
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def plot_peers(path, out):
    rows = json.load(open(path))["rows"]
    queries = [r["queries"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label, style in [
        ("livegrid_events_per_sec", "livegrid", "o-"),
        ("sift_events_per_sec", "sift (brute force)", "s--"),
        ("mingo_events_per_sec", "mingo (brute force)", "^--"),
    ]:
        ax.plot(queries, [r[key] for r in rows], style, label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("registered queries")
    ax.set_ylabel("events/s (writes after registration)")
    ax.set_title(f"{rows[0]['kind']} workload: matching throughput")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    for ext in ("svg", "png"):
        fig.savefig(os.path.join(out, f"peers-throughput.{ext}"), dpi=110)
    plt.close(fig)


def plot_cluster(path, out):
    data = json.load(open(path))
    workloads = data["workloads"] if "workloads" in data else {"workload": data}
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, w in workloads.items():
        projection = w["projection"]
        line = ax.plot([p["processes"] for p in projection], [p["events_per_sec_1xP"] for p in projection], "--",
                       label=f"{name}: projection, 1xP")
        measured = [r for r in w["runs"] if r["processes"] > 1 and r["grid"] == "1x2"]
        single = [r for r in w["runs"] if r["processes"] == 1 and r["grid"] == "1x1"]
        ax.plot([1] + [2 for _ in measured], [r["events_per_sec"] for r in single + measured], "o",
                color=line[0].get_color(), label=f"{name}: measured")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("processes (one worker each)")
    ax.set_ylabel("events/s")
    ax.set_title("Cluster: measured (1-2 processes), projected (cost model)", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    for ext in ("svg", "png"):
        fig.savefig(os.path.join(out, f"cluster-projection.{ext}"), dpi=110)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser()
    results = os.path.join(ROOT, "benches", "results")
    parser.add_argument("--peers", default=os.path.join(results, "2026-12-02-peers-mixed.json"))
    parser.add_argument("--cluster", default=os.path.join(results, "2026-12-02-cluster.json"))
    parser.add_argument("--out", default=os.path.join(results, "plots"))
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    plot_peers(args.peers, args.out)
    plot_cluster(args.cluster, args.out)
    print(f"wrote peers-throughput and cluster-projection (SVG and PNG) to {args.out}")


if __name__ == "__main__":
    main()
