#!/usr/bin/env python3
"""Runs one benchmark command, shows its output as it comes, and records what it measured in a
results file: every Markdown table it prints (as rows of named columns), every JSON line, and
the LIVEGRID_* settings it ran with, next to the machine description.

Commands of one `scripts/bench.sh` run (LIVEGRID_BENCH_RUN) that record into the same file
add to it; a file from an earlier run is replaced.

Usage: scripts/bench_record.py --out FILE.json --kind KIND -- COMMAND [ARG...]
"""

import argparse
import json
import os
import subprocess
import sys

from benchlib import machine, progress


def cells(line):
    return [c.strip() for c in line.strip().strip("|").split("|")]


def parse(lines):
    """Markdown tables (a header, a |---| line, rows) and JSON object lines."""
    tables, objects, i = [], [], 0
    while i < len(lines):
        line = lines[i].strip()
        if line.startswith("{"):
            try:
                objects.append(json.loads(line))
            except json.JSONDecodeError:
                pass
        elif line.startswith("|") and i + 1 < len(lines) and lines[i + 1].strip().startswith("|---"):
            columns = cells(line)
            rows, i = [], i + 2
            while i < len(lines) and lines[i].strip().startswith("|"):
                rows.append(dict(zip(columns, cells(lines[i]))))
                i += 1
            tables.append({"columns": columns, "rows": rows})
            continue
        i += 1
    return tables, objects


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--kind", required=True)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    settings = {k: v for k, v in sorted(os.environ.items()) if k.startswith("LIVEGRID_") and k != "LIVEGRID_BENCH_RUN"}
    # Both streams: some tools print their summaries on stderr (livegrid replay).
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        for line in process.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            lines.append(line.rstrip("\n"))
    except BaseException:
        # Stopped (SIGTERM, Ctrl-C): the benchmark stops too, and nothing is recorded.
        process.terminate()
        process.wait()
        raise
    status = process.wait()
    tables, objects = parse(lines)
    run = os.environ.get("LIVEGRID_BENCH_RUN", "")
    document = None
    if os.path.exists(args.out):
        with open(args.out) as f:
            try:
                document = json.load(f)
            except json.JSONDecodeError:
                document = None
    if not document or document.get("run") != run or document.get("kind") != args.kind:
        document = {"kind": args.kind, "run": run, "machine": machine(), "commands": []}
    document["commands"].append({"command": " ".join(command), "settings": settings, "status": status,
                                 "tables": tables, "json": objects})
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(document, f, indent=1)
    progress(f"recorded {len(tables)} table(s) and {len(objects)} JSON line(s) in {args.out}")
    sys.exit(status)


if __name__ == "__main__":
    main()
