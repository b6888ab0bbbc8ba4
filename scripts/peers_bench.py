#!/usr/bin/env python3
"""livegrid against brute-force matching peers on the very same workload files.

For each number of queries, one `livegrid workload` (the mixed kind by default) is replayed by
`livegrid replay` (release build: live results and deltas; timed from when every query is
registered and in the grid, `writes_only_events_per_sec`) and matched by the Node peers in benches/peers (sift and mingo: every
change tested against every subscription of its collection, before and after the write, the
way Meteor- and Parse-style servers do; only events after registration timed). Reported:
events/s of each, and the ratio livegrid / the faster peer.

Usage: scripts/peers_bench.py [--kind mixed] [--queries 1000,10000] [--docs 10000]
                              [--events 50000] [--peer-seconds 30] [--out FILE.json]
"""

import argparse
import json
import os
import shutil
import subprocess
import tempfile

from benchlib import BIN, PEERS, ensure_peers, last_json, progress, write_results


def measure(args, queries, work):
    """One workload size: livegrid replay, then each peer, on the same files."""
    subprocess.run(
        [BIN, "workload", "--kind", args.kind, "--out", work, "--docs", str(args.docs),
         "--events", str(args.events), "--queries", str(queries)],
        check=True, stderr=subprocess.DEVNULL,
    )
    files = ["--events", f"{work}/events.jsonl", "--queries", f"{work}/queries.jsonl"]
    progress(f"peers: {args.kind}, {queries} queries: livegrid replay")
    done = subprocess.run([BIN, "replay", *files, "--out", f"{work}/out.jsonl"], capture_output=True, text=True,
                          check=True)
    livegrid = last_json(done.stderr)
    # The writes after every query is registered, as for the peers (which read no initial
    # results): livegrid's clock restarts once the queries are in the grid.
    row = {"kind": args.kind, "queries": queries, "docs": args.docs, "events": args.events,
           "livegrid_events_per_sec": livegrid["writes_only_events_per_sec"],
           "livegrid_events_timed": livegrid["writes_only_events"],
           "livegrid_all_events_per_sec": livegrid["events_per_sec"], "livegrid_deltas": livegrid["deltas"]}
    for engine in ["sift", "mingo"]:
        progress(f"peers: {args.kind}, {queries} queries: {engine}")
        peer = subprocess.run(
            ["node", os.path.join(PEERS, "match.mjs"), *files, "--engine", engine,
             "--max-seconds", str(args.peer_seconds)],
            capture_output=True, text=True, check=True,
        )
        summary = last_json(peer.stdout)
        row[f"{engine}_events_per_sec"] = summary["events_per_sec"]
        row[f"{engine}_events_timed"] = summary["events"]
    faster = max(row["sift_events_per_sec"], row["mingo_events_per_sec"])
    row["ratio_to_faster_peer"] = round(row["livegrid_events_per_sec"] / max(faster, 1), 1)
    print(json.dumps(row), flush=True)
    return row


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--kind", default="mixed")
    parser.add_argument("--queries", default="1000,10000")
    parser.add_argument("--docs", type=int, default=10_000)
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--peer-seconds", type=float, default=30, help="time limit of one peer run")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    ensure_peers()
    rows = []
    for queries in [int(q) for q in args.queries.split(",")]:
        work = tempfile.mkdtemp(prefix="livegrid-peers-")
        try:
            rows.append(measure(args, queries, work))
        finally:
            shutil.rmtree(work, ignore_errors=True)
    write_results(args.out, "peers", {"rows": rows})


if __name__ == "__main__":
    main()
