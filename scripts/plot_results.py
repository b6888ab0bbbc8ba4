#!/usr/bin/env python3
"""Renders the benchmark results in benches/results to plots (SVG and PNG):

- peers-throughput: events/s against the number of queries (log-log), livegrid against each
  brute-force peer (scripts/peers_bench.py);
- e2e-throughput: notifications/s delivered against the offered write rate, livegrid serve
  against Parse Server LiveQuery, end to end (scripts/e2e_bench.py); hollow markers are rates
  a system did not sustain;
- e2e-latency-cdf: write-to-client latency CDFs of both at the rates both sustain, and of
  livegrid at its highest sustained rate;
- scaling-projection: the measured events/s of one and two processes and the cost model's
  projection to 1-256 workers, one per process, with write partitions (1xP) and with query
  partitions (Px1), labelled as a projection (scripts/cluster_bench.py).

By default each plot reads the newest results file of its kind (`<date>-<kind>.json`);
`--quick` reads the newest `<date>-quick-<kind>.json` files and writes to plots-quick.
Needs matplotlib (scripts/bench.sh installs it with pip when it is missing).

Usage: scripts/plot_results.py [--quick] [--peers FILE] [--e2e FILE] [--cluster FILE] [--out DIR]
"""

import argparse
import glob
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

plt.rcParams["svg.hashsalt"] = "livegrid"  # stable element ids in the SVG files

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benches", "results")


def newest(kind, quick):
    """The newest results file of `kind` (dates sort by name)."""
    pattern = f"*-quick-{kind}*.json" if quick else f"*-{kind}*.json"
    files = sorted(f for f in glob.glob(os.path.join(RESULTS, pattern)) if quick or "-quick-" not in f)
    return files[-1] if files else None


def finish(fig, ax, out, name, xlabel, ylabel, title, xbase=10, ylog=True, title_size=10, legend_size=8):
    """Labels, log axes (x in base `xbase`; y unless `ylog` is false), grid and legend, then
    writes the plot as `name`.svg and .png."""
    ax.set_xscale("log", base=xbase)
    if ylog:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=title_size)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=legend_size)
    fig.tight_layout()
    for ext in ("svg", "png"):
        # No date in the files: the same results render to the same bytes.
        fig.savefig(os.path.join(out, f"{name}.{ext}"), dpi=110, metadata={"Date": None} if ext == "svg" else None)
    plt.close(fig)
    print(f"wrote {name}.svg and {name}.png")


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
    finish(fig, ax, out, "peers-throughput", "registered queries", "events/s (writes after registration)",
           f"{rows[0]['kind']} workload: matching throughput", title_size=12, legend_size=10)


STYLE = {"livegrid": ("tab:blue", "o"), "parse": ("tab:red", "s")}
LABEL = {"livegrid": "livegrid serve", "parse": "Parse Server LiveQuery (PostgreSQL)"}


def plot_e2e(path, out):
    data = json.load(open(path))
    runs, setup = data["runs"], data["setup"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for target in ("parse", "livegrid"):
        mine = [r for r in runs if r["target"] == target]
        if not mine:
            continue
        color, marker = STYLE[target]
        ax.plot([r["offered_writes_per_sec"] for r in mine], [r["notifications_per_sec"] for r in mine], "-",
                color=color, label=LABEL[target])
        for r in mine:
            ax.plot(r["offered_writes_per_sec"], r["notifications_per_sec"], marker, color=color,
                    fillstyle="full" if r["sustained"] else "none")
    finish(fig, ax, out, "e2e-throughput", "offered writes/s (REST, one document each)", "notifications/s delivered",
           f"{setup['subscriptions']:,} subscriptions, {setup['connections']} connections, "
           f"fan-out {setup['fanout']} (hollow: not sustained)", title_size=9)

    fig, ax = plt.subplots(figsize=(6, 4))
    sustained = {}
    for r in runs:
        if r["sustained"]:
            sustained.setdefault(r["offered_writes_per_sec"], {})[r["target"]] = r
    common = [rate for rate, both in sorted(sustained.items()) if len(both) == 2]
    shades = {rate: 0.35 + 0.65 * i / max(len(common) - 1, 1) for i, rate in enumerate(common)}
    for rate in common:
        for target in ("parse", "livegrid"):
            cdf = sustained[rate][target]["cdf_ms"]
            ax.plot([p[0] for p in cdf], [p[1] for p in cdf], color=STYLE[target][0], alpha=shades[rate],
                    label=f"{LABEL[target].split(' (')[0]}, {rate} writes/s")
    top = max((r for r in runs if r["target"] == "livegrid" and r["sustained"]),
              key=lambda r: r["offered_writes_per_sec"], default=None)
    if top is not None and top["offered_writes_per_sec"] not in common:
        cdf = top["cdf_ms"]
        ax.plot([p[0] for p in cdf], [p[1] for p in cdf], "k--",
                label=f"livegrid serve, {top['offered_writes_per_sec']:,} writes/s (highest sustained)")
    finish(fig, ax, out, "e2e-latency-cdf", "write-to-client latency (ms)", "fraction of notifications",
           "End-to-end latency CDF", ylog=False, legend_size=6)


def plot_scaling(path, out):
    data = json.load(open(path))
    workloads = data["workloads"] if "workloads" in data else {"workload": data}
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for name, w in workloads.items():
        model, runs, projection = w["model"], w["runs"], w["projection"]
        workers = [row["processes"] for row in projection]
        label = f"{name} (t = {model['serial_us']:.1f} us + {model['match_us']:.1f} us / P + bytes)"
        line = ax.plot(workers, [row["events_per_sec_1xP"] for row in projection], "--",
                       label=f"{label}: projection, 1xP (write partitions)")
        color = line[0].get_color()
        ax.plot(workers, [row["events_per_sec_Px1"] for row in projection], ":", color=color,
                label=f"{name}: projection, Px1 (query partitions)")
        single = next(r for r in runs if r["processes"] == 1 and r["grid"] == "1x1")
        by_write = next(r for r in runs if r["processes"] == 2 and r["grid"] == "1x2")
        by_query = next(r for r in runs if r["processes"] == 2 and r["grid"] == "2x1")
        ax.plot([1, 2, 2], [single["events_per_sec"], by_write["events_per_sec"], by_query["events_per_sec"]], "o",
                color=color, label=f"{name}: measured")
    finish(fig, ax, out, "scaling-projection", "workers (one per process)", "events/s",
           "Scaling: measured on 1-2 processes, PROJECTED to 256 (cost model)", xbase=2, title_size=9,
           legend_size=6)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="plot the newest --quick results")
    parser.add_argument("--peers")
    parser.add_argument("--e2e")
    parser.add_argument("--cluster")
    parser.add_argument("--out")
    args = parser.parse_args()
    out = args.out or os.path.join(RESULTS, "plots-quick" if args.quick else "plots")
    os.makedirs(out, exist_ok=True)
    for kind, given, plot in [("peers", args.peers, plot_peers), ("e2e", args.e2e, plot_e2e),
                              ("cluster", args.cluster, plot_scaling)]:
        path = given or newest(kind, args.quick)
        if path is None:
            print(f"no {kind} results to plot")
            continue
        print(f"{kind}: {os.path.relpath(path)}")
        plot(path, out)


if __name__ == "__main__":
    main()
