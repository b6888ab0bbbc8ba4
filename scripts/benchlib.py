"""What the benchmark scripts share: where things are, the machine description every results
file carries, writing results, installing the Node peers, free loopback ports, progress."""

import datetime
import json
import os
import platform
import signal
import socket
import subprocess
import sys

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

# A benchmark stopped with SIGTERM (or Ctrl-C) unwinds like an error, so that its `finally`
# blocks stop the servers and databases it started.
signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
BIN = os.path.join(ROOT, "target", "release", "livegrid")
PEERS = os.path.join(ROOT, "benches", "peers")
RESULTS = os.path.join(ROOT, "benches", "results")


def progress(message):
    """One line on stderr: what is running and how far it is."""
    stamp = datetime.datetime.now().strftime("%H:%M:%S")
    print(f"[{stamp}] {message}", file=sys.stderr, flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def last_json(text):
    """The last line of `text` that is a JSON object (the summary the tools print)."""
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(f"no summary in: {text[-2000:]}")


def _first_line(command):
    try:
        return subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip().splitlines()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        return None


def machine():
    """What the figures were measured on."""
    cpu = None
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    except OSError:
        pass
    memory = None
    try:
        with open("/proc/meminfo") as f:
            kib = int(next(line.split()[1] for line in f if line.startswith("MemTotal")))
            memory = round(kib / (1 << 20), 1)
    except (OSError, StopIteration, ValueError):
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": memory,
        "kernel": platform.release(),
        "os": _first_line(["sh", "-c", ". /etc/os-release && echo $PRETTY_NAME"]),
        "rustc": _first_line(["rustc", "--version"]),
        "node": _first_line(["node", "--version"]),
        # "-dirty" when the working tree had changes the commit does not hold.
        "commit": _first_line(["git", "-C", ROOT, "describe", "--always", "--dirty"]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def write_results(path, kind, payload):
    """Writes `payload` with the machine description and the command to `path` (JSON)."""
    if not path or path == "/dev/null":
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    document = {"kind": kind, "machine": machine(), "command": " ".join(sys.argv), **payload}
    with open(path, "w") as f:
        json.dump(document, f, indent=1)
    progress(f"results: {os.path.relpath(path, ROOT)}")


def ensure_peers():
    """Installs benches/peers' Node packages (sift, mingo, parse-server) from its lock file."""
    if all(os.path.isdir(os.path.join(PEERS, "node_modules", p)) for p in ("sift", "mingo", "parse-server")):
        return
    progress("installing the Node peers (npm ci in benches/peers)")
    subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=PEERS, check=True)


def cargo_executable(bench):
    """Builds `cargo bench --bench <bench>` and returns its executable."""
    done = subprocess.run(["cargo", "bench", "--quiet", "--bench", bench, "--no-run", "--message-format=json"],
                          cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"building the {bench} benchmark failed:\n{done.stderr[-4000:]}")
    out = done.stdout
    for line in out.splitlines():
        message = json.loads(line)
        if message.get("reason") == "compiler-artifact" and message.get("executable") \
                and message["target"]["name"] == bench:
            return message["executable"]
    raise RuntimeError(f"no executable for the {bench} benchmark")
