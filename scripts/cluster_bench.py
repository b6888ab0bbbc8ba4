#!/usr/bin/env python3
"""The grid on one process against the grid over two processes (timely's cluster mode, on
loopback), on the same generated workload with `livegrid replay`; then a cost model fitted to
those runs, and the throughput it projects at 1-256 workers (one per process) (a projection, not a measurement).

Runs (each one replay of the same files):
  1x1  one process, one worker
  1x2  one process, two workers
  1x2  two processes, one worker each (write partitions split over the processes)
  2x1  two processes, one worker each (query partitions split over the processes)

Reported per run: events/s, deltas/s, p50/p99 write-to-delta latency, and bytes sent between
the processes per event (both directions, counted on timely's network send threads).

The model: an event costs `serial` seconds on the feeding process (reading, sequencing,
routing: never split) and `match_cost` seconds of matching work that the grid splits over its
P workers, plus `byte_cost` seconds per byte crossing processes:
    t(P) = serial + match_cost / P + byte_cost * bytes_per_event(P)
fitted by least squares to the four runs (1/events_per_sec against 1, 1/P and the measured
bytes per event). Bytes per event at P processes: with write partitions (1xP) an event
crosses to another process with probability (P - 1) / P, so the two-process 1x2 figure times
2 (P - 1) / P; with query partitions (Px1) it goes to every other process, so the two-process
2x1 figure times (P - 1). On this 2-core machine two processes and the feeding threads share
two cores, so `byte_cost` also carries that contention: the projection errs low.

Usage: scripts/cluster_bench.py [--events N] [--queries Q] [--fanout F] [--repeat R] [--out FILE.json]
"""

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import time

from benchlib import BIN, free_port, last_json, progress, write_results


def replay(work, grid, processes):
    files = ["--events", f"{work}/events.jsonl", "--queries", f"{work}/queries.jsonl", "--out", f"{work}/out.jsonl"]
    if os.path.exists(f"{work}/out.jsonl"):
        os.remove(f"{work}/out.jsonl")
    subprocess.run(["sync"])
    if processes == 1:
        done = subprocess.run([BIN, "replay", "--grid", grid, *files], capture_output=True, text=True, check=True)
        return last_json(done.stderr), []
    hosts = f"{work}/hosts.txt"
    with open(hosts, "w") as f:
        f.write("".join(f"127.0.0.1:{free_port()}\n" for _ in range(processes)))
    workers = [
        subprocess.Popen(
            [BIN, "replay", "--grid", grid, "--hostfile", hosts, "--process", str(p)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for p in range(1, processes)
    ]
    try:
        done = subprocess.run(
            [BIN, "replay", "--grid", grid, "--hostfile", hosts, "--process", "0", *files],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            check=True,
        )
        others = [last_json(w.communicate(timeout=120)[1]) for w in workers]
    finally:
        # On failure the other processes would wait for process 0 for ever.
        for w in workers:
            if w.poll() is None:
                w.kill()
                w.wait()
    return last_json(done.stderr), others


def least_squares(rows, ys):
    """Non-negative least squares for three coefficients, by normal equations; a coefficient
    that comes out negative is fixed at 0 and the rest fitted again."""
    active = [0, 1, 2]
    while True:
        n = len(active)
        a = [[sum(r[i] * r[j] for r in rows) for j in active] for i in active]
        b = [sum(r[i] * y for r, y in zip(rows, ys)) for i in active]
        # Gaussian elimination with partial pivoting.
        for c in range(n):
            pivot = max(range(c, n), key=lambda k: abs(a[k][c]))
            if abs(a[pivot][c]) < 1e-30:
                # A column without information (no bytes measured): leave it out.
                active = [i for i in active if i != active[c]]
                break
            a[c], a[pivot], b[c], b[pivot] = a[pivot], a[c], b[pivot], b[c]
            for k in range(c + 1, n):
                f = a[k][c] / a[c][c]
                a[k] = [x - f * y for x, y in zip(a[k], a[c])]
                b[k] -= f * b[c]
        if len(active) < n:
            continue
        x = [0.0] * n
        for c in reversed(range(n)):
            x[c] = (b[c] - sum(a[c][k] * x[k] for k in range(c + 1, n))) / a[c][c]
        if all(v >= 0 for v in x):
            out = [0.0, 0.0, 0.0]
            for i, v in zip(active, x):
                out[i] = v
            return out
        active = [i for i, v in zip(active, x) if v >= 0] or [0]


def run_workload(name, events, queries, fanout, repeat):
    """Replays one generated workload on the four layouts and fits the model to them."""
    progress(f"cluster: workload {name} ({queries} queries, {events} events, fan-out {fanout or 1})")
    work = tempfile.mkdtemp(prefix="livegrid-cluster-")
    try:
        return measure(work, events, queries, fanout, repeat)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def measure(work, events, queries, fanout, repeat):
    subprocess.run(
        [BIN, "workload", "--dir", work, "--events", str(events), "--queries", str(queries),
         "--fanout", str(fanout)],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    runs = []
    all_deltas = set()
    for grid, processes in [("1x1", 1), ("1x2", 1), ("1x2", 2), ("2x1", 2)]:
        tries = []
        for attempt in range(repeat):
            progress(f"cluster: {grid} on {processes} process(es), run {attempt + 1} of {repeat}")
            started = time.time()
            leader, others = replay(work, grid, processes)
            sent = leader.get("cluster_bytes_sent", 0) + sum(o.get("cluster_bytes_sent", 0) for o in others)
            tries.append({
                "grid": grid,
                "processes": processes,
                "events_per_sec": leader["events_per_sec"],
                "deltas_per_sec": leader["deltas_per_sec"],
                "p50_latency_ms": leader["p50_latency_ms"],
                "p99_latency_ms": leader["p99_latency_ms"],
                "deltas": leader["deltas"],
                "bytes_between_processes_per_event": round(sent / max(leader["events"], 1), 1),
                "wall_seconds": round(time.time() - started, 1),
            })
        all_deltas.update(r["deltas"] for r in tries)
        # The run with the median throughput stands for the configuration.
        tries.sort(key=lambda r: r["events_per_sec"])
        run = dict(tries[len(tries) // 2], events_per_sec_of_runs=[r["events_per_sec"] for r in tries])
        runs.append(run)
        print(json.dumps(run), flush=True)
    assert len(all_deltas) == 1, f"every run must produce the same number of deltas: {all_deltas}"

    # The cost model, fitted to all four runs.
    def workers(grid):
        q, w = grid.split("x")
        return int(q) * int(w)

    rows = [(1.0, 1.0 / workers(r["grid"]), r["bytes_between_processes_per_event"]) for r in runs]
    times = [1.0 / r["events_per_sec"] for r in runs]
    serial, match_cost, byte_cost = least_squares(rows, times)
    b_write = runs[2]["bytes_between_processes_per_event"]
    b_query = runs[3]["bytes_between_processes_per_event"]
    model = {"serial_us": serial * 1e6, "match_us": match_cost * 1e6, "byte_ns": byte_cost * 1e9}
    fitted = [round(1 / (serial + match_cost * x + byte_cost * b)) for (_, x, b) in rows]
    print(f"model: t(P) = {model['serial_us']:.2f} us + {model['match_us']:.2f} us / P "
          f"+ {model['byte_ns']:.3f} ns/byte x bytes(P); fitted events/s of the runs: {fitted}", flush=True)
    projection = []
    for p in [1, 2, 4, 8, 16, 32, 64, 128, 256]:
        by_writes = serial + match_cost / p + byte_cost * b_write * 2 * (p - 1) / p
        by_queries = serial + match_cost / p + byte_cost * b_query * (p - 1)
        projection.append({
            "processes": p,
            "events_per_sec_1xP": round(1 / by_writes),
            "events_per_sec_Px1": round(1 / by_queries),
        })
    print("projection (cost model, not measured):", flush=True)
    for row in projection:
        print(json.dumps(row), flush=True)
    return {"runs": runs, "model": model, "projection": projection, "events": events, "queries": queries,
            "fanout": fanout}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--queries", type=int, default=10_000)
    parser.add_argument("--fanout", type=int, default=0, help="the chat workload: subscriptions changed per write")
    parser.add_argument("--suite", action="store_true",
                        help="the three workloads of README: 10,000 and 100,000 item queries, and the chat "
                             "workload with fan-out 50 (100,000 events)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--repeat", type=int, default=3, help="runs per configuration (the median stands)")
    args = parser.parse_args()
    if args.suite:
        plan = [("items-10k-queries", args.events, 10_000, 0), ("items-100k-queries", args.events, 100_000, 0),
                ("chat-fanout-50", args.events // 2, 10_000, 50)]
    else:
        name = f"chat-fanout-{args.fanout}" if args.fanout else f"items-{args.queries}-queries"
        plan = [(name, args.events, args.queries, args.fanout)]
    workloads = {name: run_workload(name, events, queries, fanout, args.repeat)
                 for name, events, queries, fanout in plan}
    write_results(args.out, "cluster", {"workloads": workloads})


if __name__ == "__main__":
    main()
