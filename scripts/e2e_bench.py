#!/usr/bin/env python3
"""livegrid serve against Parse Server's LiveQuery on PostgreSQL, end to end, in one run.

Starts a PostgreSQL of its own (initdb in a temporary folder, loopback only; installs the
Debian package when it is missing and the script runs as root), Parse Server with LiveQuery
(benches/peers/parse_server.mjs, npm parse-server) and `livegrid serve` (release build, its
embedded store, durable writes). Then, for each target and each write rate, runs
benches/e2e.rs: the same connections and subscriptions over WebSockets, the same writes
through each server's REST API, the same oracle of which subscriptions each write changes.

A rate is sustained when the writes were acknowledged at no less than 95% of the offered rate
and every notification arrived exactly once at the right subscription. A target stops after
two rates in a row it does not sustain. Reported per run: achieved writes/s, notifications/s,
lost and wrong notifications, write-to-client latency p50/p90/p99/max and its CDF, the peak
resident memory of the server process (for Parse: its Node process; PostgreSQL apart). After
the rate runs, on a fresh server of each, resident memory is read before and once 20,000
subscriptions have been in place for 20 s: memory per subscription.

Usage: scripts/e2e_bench.py [--subscriptions 2000] [--connections 100] [--fanout 10]
          [--seconds 10] [--parse-rates 25,50,...] [--livegrid-rates 25,50,...]
          [--memory-subscriptions 20000] [--memory-connections 200] [--memory-settle 20]
          [--out FILE.json]
"""

import argparse
import glob
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.request

from benchlib import BIN, PEERS, cargo_executable, ensure_peers, free_port, last_json, progress, write_results


def postgres_bin():
    def installed():
        # Newest major version last (by number: 9.6 before 15).
        return sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                      key=lambda path: [int(p) for p in path.split("/")[4].split(".") if p.isdigit()])

    found = installed()
    if not found:
        if os.geteuid() != 0:
            raise SystemExit("PostgreSQL is not installed: apt-get install postgresql (or run as root)")
        progress("installing PostgreSQL (apt-get install postgresql)")
        subprocess.run(["apt-get", "update", "-qq"], check=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", "postgresql"], check=True,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
        found = installed()
    return os.path.dirname(found[-1])


class Postgres:
    """A PostgreSQL cluster of its own on a loopback port, in a temporary folder."""

    def __init__(self, work):
        self.bin = postgres_bin()
        self.data = os.path.join(work, "pg")
        self.port = free_port()
        os.makedirs(self.data)
        # initdb refuses to run as root: as root, the cluster belongs to the postgres user.
        self.prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self.prefix:
            shutil.chown(work, "postgres")
            shutil.chown(self.data, "postgres")
        self.run("initdb", "-D", self.data, "-A", "trust", "-U", "bench", "--locale=C", "-E", "UTF8")
        options = f"-p {self.port} -k {self.data} -c listen_addresses=127.0.0.1"
        self.run("pg_ctl", "-D", self.data, "-o", options, "-w", "-l", os.path.join(self.data, "log"), "start")
        self.uri = f"postgres://bench@127.0.0.1:{self.port}/postgres"

    def run(self, program, *args, check=True):
        # From the cluster's folder: the postgres user may not enter the caller's (a clone in
        # /root or in a mktemp folder), and PostgreSQL 15 changes back to it when it starts.
        done = subprocess.run([*self.prefix, f"{self.bin}/{program}", *args], cwd=self.data, capture_output=True,
                              text=True)
        if check and done.returncode != 0:
            log = os.path.join(self.data, "log")
            tail = open(log).read()[-2000:] if os.path.exists(log) else ""
            raise SystemExit(f"{program} failed ({done.returncode}): {done.stderr[-2000:]}{tail}")

    def stop(self):
        self.run("pg_ctl", "-D", self.data, "-m", "fast", "stop", check=False)


def wait_for(process, ready, what, log, seconds=60):
    deadline = time.time() + seconds
    while time.time() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"{what} exited ({process.returncode}); its log: {open(log).read()[-3000:]}")
        if ready():
            return
        time.sleep(0.2)
    stop(process)
    raise SystemExit(f"{what} did not start in {seconds} s; its log: {open(log).read()[-3000:]}")


def http_ok(url):
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return response.status == 200
    except OSError:
        return False


def start_parse(work, postgres, classes):
    port = free_port()
    log = os.path.join(work, "parse.log")
    process = subprocess.Popen(
        ["node", os.path.join(PEERS, "parse_server.mjs"), "--port", str(port), "--database", postgres.uri,
         "--classes", str(classes), "--logs", os.path.join(work, "parse-logs")],
        stdout=open(log, "w"), stderr=subprocess.STDOUT, cwd=PEERS)
    wait_for(process, lambda: "ready" in open(log).read().splitlines(), "Parse Server", log)
    return process, port


def start_livegrid(work, store):
    port = free_port()
    log = os.path.join(work, f"livegrid-{store}.log")
    process = subprocess.Popen([BIN, "serve", "--listen", f"127.0.0.1:{port}", "--data", os.path.join(work, store)],
                               stdout=open(log, "w"), stderr=subprocess.STDOUT)
    wait_for(process, lambda: http_ok(f"http://127.0.0.1:{port}/healthz"), "livegrid serve", log)
    return process, port


def stop(process):
    """SIGTERM, then SIGKILL after 5 s (Parse Server waits for its sockets to close)."""
    process.terminate()
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def rss_mib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024
    except (OSError, StopIteration):
        return 0.0


class PeakMemory:
    """Samples a process's resident memory every 100 ms while a run lasts."""

    def __init__(self, pid):
        self.pid, self.peak, self.done = pid, 0.0, threading.Event()
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()

    def sample(self):
        while not self.done.wait(0.1):
            self.peak = max(self.peak, rss_mib(self.pid))

    def stop(self):
        self.done.set()
        self.thread.join()
        return round(self.peak, 1)


def harness_env(name, port, run, **settings):
    """The environment of one benches/e2e.rs run against `name` on `port`, collection `run`:
    each setting `X` becomes LIVEGRID_E2E_X."""
    return {**os.environ, "LIVEGRID_E2E_TARGET": name, "LIVEGRID_E2E_HOST": f"127.0.0.1:{port}",
            "LIVEGRID_E2E_RUN": str(run), **{f"LIVEGRID_E2E_{k}": str(v) for k, v in settings.items()}}


def run_target(name, pid, port, rates, args, executable, first_run):
    runs, misses = [], 0
    for i, rate in enumerate(rates):
        progress(f"{name}: {rate} writes/s for {args.seconds} s ({i + 1} of {len(rates)} rates)")
        env = harness_env(name, port, first_run + i, RATE=rate, SECONDS=args.seconds,
                          SUBSCRIPTIONS=args.subscriptions, CONNECTIONS=args.connections, FANOUT=args.fanout)
        memory = PeakMemory(pid)
        done = subprocess.run([executable], env=env, capture_output=True, text=True, timeout=600)
        peak = memory.stop()
        if done.returncode != 0:
            raise SystemExit(f"the e2e harness failed against {name}: {done.stderr[-3000:]}")
        run = last_json(done.stdout)
        run["server_peak_rss_mib"] = peak
        runs.append(run)
        progress(f"{name}: {rate} writes/s -> {run['achieved_writes_per_sec']:.0f} acknowledged/s, "
                 f"{run['notifications_per_sec']:.0f} notifications/s, lost {run['lost']}, wrong {run['wrong']}, "
                 f"p50 {run['p50_ms']} ms, p99 {run['p99_ms']} ms, "
                 f"{'sustained' if run['sustained'] else 'NOT sustained'}")
        misses = 0 if run["sustained"] else misses + 1
        if misses == 2:
            break
    return runs


def measure_memory(name, pid, port, args, executable, run):
    """The server's resident memory before, at its peak while `--memory-subscriptions`
    subscriptions arrive, and `--memory-settle` seconds after they are all in place (once
    allocators have returned what the burst took: livegrid's keeps freed memory 10 s), per
    subscription."""
    progress(f"{name}: memory with {args.memory_subscriptions} subscriptions on {args.memory_connections} "
             f"connections, read {args.memory_settle:g} s after the last")
    env = harness_env(name, port, run, RATE=10, SECONDS=1, SUBSCRIPTIONS=args.memory_subscriptions,
                      CONNECTIONS=args.memory_connections, FANOUT=args.fanout, HOLD=args.memory_settle + 3)
    before = rss_mib(pid)
    peak = PeakMemory(pid)
    process = subprocess.Popen([executable], env=env, stdout=subprocess.PIPE, text=True)
    settled = None
    for line in process.stdout:
        if '"subscribed"' in line:
            time.sleep(args.memory_settle)
            settled = rss_mib(pid)
            break
    rest, _ = process.communicate(timeout=600)
    highest = peak.stop()
    if process.returncode != 0 or settled is None:
        raise SystemExit(f"the memory run against {name} failed")
    check = last_json(rest)
    memory = {"target": name, "subscriptions": args.memory_subscriptions, "connections": args.memory_connections,
              "settle_seconds": args.memory_settle, "rss_before_mib": round(before, 1),
              "rss_peak_mib": highest, "rss_settled_mib": round(settled, 1),
              "bytes_per_subscription": round((settled - before) * (1 << 20) / args.memory_subscriptions),
              "lost": check["lost"], "wrong": check["wrong"]}
    progress(f"{name}: {memory['bytes_per_subscription']} bytes per subscription "
             f"({memory['rss_before_mib']} -> {memory['rss_settled_mib']} MiB, peak {highest} MiB)")
    return memory


def summarize(runs):
    best = {}
    for run in runs:
        if run["sustained"]:
            target = run["target"]
            best[target] = max(best.get(target, 0), run["notifications_per_sec"])
    by_rate = {}
    for run in runs:
        if run["sustained"]:
            by_rate.setdefault(run["offered_writes_per_sec"], {})[run["target"]] = run["p99_ms"]
    common = {rate: p99s for rate, p99s in sorted(by_rate.items()) if len(p99s) == 2}
    summary = {
        "max_sustained_notifications_per_sec": best,
        "ratio": round(best.get("livegrid", 0) / best["parse"], 1) if best.get("parse") else None,
        "p99_ms_at_rates_both_sustain": common,
        "livegrid_p99_below_parse_at_every_common_rate":
            all(p["livegrid"] < p["parse"] for p in common.values()) if common else None,
        "lost": sum(run["lost"] for run in runs),
        "wrong": sum(run["wrong"] for run in runs),
    }
    return summary


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--subscriptions", type=int, default=2000)
    parser.add_argument("--connections", type=int, default=100)
    parser.add_argument("--fanout", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--parse-rates", default="25,50,60,70,80,90,100,125,150,200")
    parser.add_argument("--livegrid-rates", default="25,50,60,70,80,90,100,125,150,200,1000,2500,5000,7500,10000,12500,15000,17500,20000,25000")
    parser.add_argument("--memory-subscriptions", type=int, default=20000)
    parser.add_argument("--memory-connections", type=int, default=200)
    parser.add_argument("--memory-settle", type=float, default=20)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    parse_rates = [int(r) for r in args.parse_rates.split(",") if r]
    livegrid_rates = [int(r) for r in args.livegrid_rates.split(",") if r]

    ensure_peers()
    progress("building the e2e harness (cargo bench --bench e2e --no-run)")
    executable = cargo_executable("e2e")
    work = tempfile.mkdtemp(prefix="livegrid-e2e-")
    postgres = parse = livegrid = None
    runs, memory = [], []
    try:
        progress("starting PostgreSQL and Parse Server (LiveQuery)")
        postgres = Postgres(work)
        parse, parse_port = start_parse(work, postgres, len(parse_rates) + 1)
        runs += run_target("parse", parse.pid, parse_port, parse_rates, args, executable, 0)
        # Memory on a fresh server: its baseline holds nothing from the rate runs, and the
        # rate runs do not start on a server that has just held 20,000 subscriptions (Parse
        # answered about three times slower after it).
        stop(parse)
        parse, parse_port = start_parse(work, postgres, len(parse_rates) + 1)
        memory.append(measure_memory("parse", parse.pid, parse_port, args, executable, len(parse_rates)))
        stop(parse)
        parse = None
        postgres.stop()
        postgres = None
        progress("starting livegrid serve")
        livegrid, livegrid_port = start_livegrid(work, "store")
        runs += run_target("livegrid", livegrid.pid, livegrid_port, livegrid_rates, args, executable, 0)
        stop(livegrid)
        livegrid, livegrid_port = start_livegrid(work, "store-memory")
        memory.append(measure_memory("livegrid", livegrid.pid, livegrid_port, args, executable, len(livegrid_rates)))
    finally:
        for process in (parse, livegrid):
            if process is not None:
                stop(process)
        if postgres is not None:
            postgres.stop()
        shutil.rmtree(work, ignore_errors=True)
    summary = summarize(runs)
    print(json.dumps(summary), flush=True)
    write_results(args.out, "e2e", {
        "setup": {"subscriptions": args.subscriptions, "connections": args.connections, "fanout": args.fanout,
                  "seconds_per_rate": args.seconds, "writers": int(os.environ.get("LIVEGRID_E2E_WRITERS", 64)),
                  "parse": "parse-server (benches/peers/package-lock.json) with LiveQuery in one Node process, "
                           "PostgreSQL from Debian with its defaults (fsync, synchronous_commit on)",
                  "livegrid": "livegrid serve, embedded store, --durability durable (group commit)"},
        "runs": runs,
        "memory": memory,
        "summary": summary,
    })


if __name__ == "__main__":
    main()
