#!/usr/bin/env bash
# Runs the benchmarks whose figures README.md records.
# Usage: scripts/bench.sh [--quick|matcher|grid|grid-sweep|replay|load|fanout|serve-fanout|writes|mongodb|cache|acl|aggregation|cluster|peers|e2e|plots|all]
#   all      (the default) every part below in one go, with progress lines; each part's figures
#            go to benches/results/<date>-<part>.json with the machine description, then the
#            plots to benches/results/plots (several hours on 2 cores)
#   --quick  a smoke run of the comparisons on small workloads: peers, Parse Server end to end,
#            cluster, then the plots (about 3 minutes after the builds); results in
#            benches/results/<date>-quick-*.json, plots in benches/results/plots-quick
#            (both ignored by git)
#   matcher  criterion: filter evaluation and compilation
#   grid     events/s, write-to-delta latency and memory per query with 1k/10k/100k queries
#            (LIVEGRID_BENCH_QUERIES, LIVEGRID_BENCH_GRID, LIVEGRID_BENCH_RATE to vary it);
#   grid-sweep  (part of `all`) the grid benchmark with 1k-1M queries on 1x1, then 10k and 100k
#            on 1x2 and 2x1
#   replay   livegrid replay end to end on a generated workload (JSON parsing included)
#   load     livegrid serve with 1,000 WebSocket connections and 10,000 subscriptions
#            (LIVEGRID_LOAD_RATE, LIVEGRID_LOAD_SECONDS, LIVEGRID_DURABILITY)
#   fanout   livegrid replay on the chat workload (10,000 queries, ~50 changed per write),
#            output to a file: deltas/s at saturation, then latency at a fixed rate
#            (LIVEGRID_FANOUT_RATE events/s, default 21,000)
#   serve-fanout  livegrid serve end to end with 50 subscriptions changed per write, and
#            with one connection that reads nothing (peak RSS, slow consumers cut)
#   mongodb  events/s through the MongoDB source (real driver, wire-level fixture)
#            (LIVEGRID_MONGODB_EVENTS, default 200,000)
#   acl      what object ACLs cost: the load benchmark (1,000 users x 10 subscriptions) with and
#            without ACLs, fan-out 1 at 10,000 writes/s and fan-out 10 at 2,000 writes/s
#   aggregation  live pipelines through the engine: 10,000 pipelines over 1,000,000 documents,
#            updates/s against re-running them, then the same $matches as plain queries
#            (LIVEGRID_PIPE_DOCS, LIVEGRID_PIPE_PIPELINES, LIVEGRID_PIPE_UPDATES, LIVEGRID_PIPE_GRID),
#            on a 1x2 grid, with 100,000 subscriptions; then group state on differential
#            dataflow against the live pipelines' on the same writes (100 pipelines over 10,000
#            and 100,000 documents; one group of 100,000 documents)
#   cache    cache invalidation: changes turned into purges and purge latency, adaptive vs
#            fixed TTL hit and stale-read rates, cache sketch size and false positives
#            (LIVEGRID_CACHE_BENCH=purge|ttl|sketch, LIVEGRID_CACHE_SECONDS, LIVEGRID_TTL_SECONDS)
#   cluster  the grid on one process against two processes (timely cluster mode on loopback):
#            1x1, 1x2 on one process, 1x2 and 2x1 on two; events/s, deltas/s, p99, bytes
#            between processes per event; a cost model fitted to them and its projection to
#            1-256 workers; 10,000 and 100,000 item queries and the chat workload at fan-out 50
#            (scripts/cluster_bench.py --suite; or one workload: LIVEGRID_CLUSTER_QUERIES, _FANOUT,
#            _EVENTS)
#   peers    livegrid replay against brute-force matching in Node (sift, mingo) on the same
#            mixed workload files, 1,000, 10,000 and 100,000 queries (scripts/peers_bench.py;
#            installs the peers with npm ci; LIVEGRID_PEERS_QUERIES, LIVEGRID_PEERS_EVENTS)
#   e2e      livegrid serve against Parse Server LiveQuery on PostgreSQL, end to end over
#            WebSockets: 2,000 subscriptions on 100 connections, REST writes at rising rates,
#            notifications/s, losses against an oracle, latency CDFs (scripts/e2e_bench.py;
#            starts PostgreSQL and Parse Server itself, installing them when missing)
#   plots    renders the newest results to benches/results/plots (scripts/plot_results.py)
#   writes   acknowledged single-document writes/s from 64 concurrent keep-alive clients,
#            durable (group commit) and periodic (LIVEGRID_WRITERS, LIVEGRID_WRITES_SECONDS)
set -euo pipefail
cd "$(dirname "$0")/.."

what="${1:-all}"
day=$(date +%F)
# One id per invocation: the parts of one run add to their results files, a new run replaces them.
export LIVEGRID_BENCH_RUN="${LIVEGRID_BENCH_RUN:-$(date +%s)}"
# The workload folder of the part running, removed however the script ends.
dir=""
trap '[ -z "$dir" ] || rm -rf "$dir"' EXIT
# Runs a benchmark command and records its tables and JSON lines in benches/results/<date>-<kind>.json.
record() {
  local kind="$1"; shift
  python3 scripts/bench_record.py --kind "$kind" --out "benches/results/$day-$kind.json" -- "$@"
}
ensure_matplotlib() {
  python3 -c "import matplotlib" 2>/dev/null && return
  # Debian's package as root; otherwise pip, for this user.
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-matplotlib
  else
    python3 -m pip install --quiet --user matplotlib
  fi
}
run_matcher() {
  echo "== matcher: filter evaluation and compilation (criterion)"
  cargo bench -p livegrid-matcher --bench matcher
}
run_grid() {
  echo "== grid: throughput, latency, memory per registered query"
  record grid cargo bench --bench grid
}
# The full grid sweep of `all`: 1k to 1M queries on one worker, then the other shapes.
run_grid_sweep() {
  echo "== grid: 1,000 to 1,000,000 queries on 1x1"
  LIVEGRID_BENCH_QUERIES=1000,10000,100000,1000000 record grid cargo bench --bench grid
  for grid in 1x2 2x1; do
    echo "== grid: 10,000 and 100,000 queries on $grid"
    LIVEGRID_BENCH_QUERIES=10000,100000 LIVEGRID_BENCH_GRID=$grid record grid cargo bench --bench grid
  done
}
# Generates a workload with the given `livegrid workload` flags and replays it on each grid,
# recording the summaries under the kind given first.
replay_workload() {
  local kind="$1" grids="$2"; shift 2
  cargo build --release --quiet
  dir=$(mktemp -d)
  target/release/livegrid workload --dir "$dir" --events 200000 --queries 10000 "$@"
  for grid in $grids; do
    # Each run starts with the previous run's output on disk, not still being written back.
    rm -f "$dir/out.jsonl"; sync
    record "$kind" target/release/livegrid replay --events "$dir/events.jsonl" --queries "$dir/queries.jsonl" --out "$dir/out.jsonl" --grid "$grid"
  done
  rm -rf "$dir"
}
run_replay() {
  echo "== replay: 200,000 change events, 10,000 queries, end to end"
  replay_workload replay "1x1 1x2 2x1"
}
run_load() {
  echo "== load: livegrid serve, 1,000 connections, 10,000 subscriptions"
  for durability in durable periodic; do
    LIVEGRID_DURABILITY=$durability record load cargo bench --bench load
  done
}
run_fanout() {
  echo "== fanout: 200,000 chat events, 10,000 queries, each write changes ~50 results"
  replay_workload fanout "1x2 1x1" --fanout 50
  echo "== fanout at a fixed rate (about half of saturation on 1x2): latency"
  cargo build --release --quiet
  dir=$(mktemp -d)
  target/release/livegrid workload --dir "$dir" --events 200000 --queries 10000 --fanout 50
  sync
  record fanout target/release/livegrid replay --events "$dir/events.jsonl" --queries "$dir/queries.jsonl" --out "$dir/out.jsonl" --grid 1x2 --rate "${LIVEGRID_FANOUT_RATE:-21000}"
  rm -rf "$dir"
}
run_serve_fanout() {
  echo "== serve-fanout: livegrid serve, 1,000 connections x 10 subscriptions, 50 per write"
  for rate in 1000 3000; do
    LIVEGRID_LOAD_FANOUT=50 LIVEGRID_LOAD_RATE=$rate record serve-fanout cargo bench --bench load
  done
  echo "== serve-fanout with one connection that reads nothing (it subscribes to every write)"
  LIVEGRID_LOAD_FANOUT=50 LIVEGRID_LOAD_RATE=1000 LIVEGRID_LOAD_SECONDS=20 LIVEGRID_LOAD_SILENT=1 record serve-fanout cargo bench --bench load
}
run_mongodb() {
  echo "== mongodb: events/s through the MongoDB source (driver + fixture on loopback)"
  record mongodb cargo bench --bench mongodb
}
run_acl() {
  echo "== acl: 1,000 users x 10 subscriptions, with and without object ACLs (CPU, memory)"
  for acl in 0 1; do
    sync; LIVEGRID_LOAD_ACL=$acl LIVEGRID_LOAD_SECONDS=10 record acl cargo bench --bench load
  done
  for acl in 0 1; do
    sync; LIVEGRID_LOAD_ACL=$acl LIVEGRID_LOAD_FANOUT=10 LIVEGRID_LOAD_RATE=2000 LIVEGRID_LOAD_SECONDS=10 record acl cargo bench --bench load
  done
}
run_aggregation() {
  echo "== aggregation: live pipelines through the engine, 10,000 pipelines over 1,000,000 documents"
  record aggregation cargo bench --bench pipelines
  echo "== aggregation: the same \$matches as plain queries"
  LIVEGRID_PIPE_PLAIN=1 record aggregation cargo bench --bench pipelines
  echo "== aggregation: the same on a 1x2 grid"
  LIVEGRID_PIPE_GRID=1x2 record aggregation cargo bench --bench pipelines
  echo "== aggregation: 100,000 subscriptions to the 10,000 pipelines"
  LIVEGRID_PIPE_SUBSCRIPTIONS=100000 record aggregation cargo bench --bench pipelines
  echo "== aggregation: group state on differential dataflow against the live pipelines' (100 pipelines)"
  for docs in 10000 100000; do
    LIVEGRID_AGG_DOCS=$docs record aggregation cargo bench --bench aggregation
  done
  echo "== aggregation: one group of every document, 1,000 and 1,000,000 distinct values"
  for prices in 1000 1000000; do
    LIVEGRID_AGG_GROUPS=one LIVEGRID_AGG_DOCS=100000 LIVEGRID_AGG_PRICES=$prices record aggregation cargo bench --bench aggregation
  done
}
run_cache() {
  echo "== cache: purges, adaptive TTLs, the cache sketch"
  record cache cargo bench --bench cache
}
run_writes() {
  echo "== writes: 64 concurrent keep-alive writers, each durability mode"
  for durability in durable periodic; do
    LIVEGRID_DURABILITY=$durability record writes cargo bench --bench writes
  done
}
run_cluster() {
  echo "== cluster: one process against two, and the projection"
  cargo build --release --quiet --bin livegrid
  if [ -n "${LIVEGRID_CLUSTER_QUERIES:-}" ]; then
    set -- --queries "$LIVEGRID_CLUSTER_QUERIES" --fanout "${LIVEGRID_CLUSTER_FANOUT:-0}"
  else
    set -- --suite
  fi
  python3 scripts/cluster_bench.py --events "${LIVEGRID_CLUSTER_EVENTS:-200000}" "$@" \
    --out "${LIVEGRID_CLUSTER_OUT:-benches/results/$day-cluster.json}"
}
run_peers() {
  echo "== peers: livegrid against brute-force matching (sift, mingo) on the mixed workload"
  cargo build --release --quiet --bin livegrid
  python3 scripts/peers_bench.py --queries "${LIVEGRID_PEERS_QUERIES:-1000,10000,100000}" \
    --events "${LIVEGRID_PEERS_EVENTS:-50000}" --peer-seconds 10 --out "${LIVEGRID_PEERS_OUT:-benches/results/$day-peers-mixed.json}"
}
run_e2e() {
  echo "== e2e: livegrid serve against Parse Server LiveQuery on PostgreSQL, end to end"
  cargo build --release --quiet --bin livegrid
  python3 scripts/e2e_bench.py --out "${LIVEGRID_E2E_OUT:-benches/results/$day-e2e.json}"
}
run_plots() {
  echo "== plots: benches/results/plots"
  ensure_matplotlib
  python3 scripts/plot_results.py
}
run_quick() {
  local began=$SECONDS
  echo "== [1/5 $(date +%T)] quick: release builds (livegrid, the end-to-end harness)"
  cargo build --release --quiet --bin livegrid
  cargo bench --quiet --bench e2e --no-run
  local started=$SECONDS
  echo "== [2/5 $(date +%T)] quick: peers (mixed workload, 1,000 and 10,000 queries, peers stopped after 5 s)"
  python3 scripts/peers_bench.py --queries 1000,10000 --docs 5000 --events 20000 --peer-seconds 5 \
    --out "benches/results/$day-quick-peers.json"
  echo "== [3/5 $(date +%T)] quick: Parse Server LiveQuery against livegrid serve (2,000 subscriptions, 3 s per rate)"
  python3 scripts/e2e_bench.py --seconds 3 --parse-rates 25,50 --livegrid-rates 25,50,5000 \
    --memory-subscriptions 5000 --memory-settle 12 --out "benches/results/$day-quick-e2e.json"
  echo "== [4/5 $(date +%T)] quick: cluster (one process against two, 50,000 events, 5,000 queries, one run each)"
  python3 scripts/cluster_bench.py --events 50000 --queries 5000 --repeat 1 \
    --out "benches/results/$day-quick-cluster.json"
  echo "== [5/5 $(date +%T)] quick: plots"
  ensure_matplotlib
  python3 scripts/plot_results.py --quick
  echo "== quick: done in $((SECONDS - started)) s after the builds ($((SECONDS - began)) s in all)"
}
# Every part, numbered, with the time each starts.
run_all() {
  local parts=(matcher grid_sweep replay fanout serve_fanout load writes mongodb cache acl aggregation cluster peers e2e plots)
  local i=0 started=$SECONDS failed=()
  for part in "${parts[@]}"; do
    i=$((i + 1))
    echo "#### [$i/${#parts[@]} $(date +%T), $(( (SECONDS - started) / 60 )) min in] ${part//_/-}"
    # Each part in its own shell (so that `set -e` holds in it): one that fails is reported
    # at the end, and the others still run.
    bash scripts/bench.sh "${part//_/-}" || { echo "#### ${part//_/-} FAILED"; failed+=("${part//_/-}"); }
  done
  echo "#### all done in $(( (SECONDS - started) / 60 )) min; results in benches/results/$day-*.json"
  if [ ${#failed[@]} -gt 0 ]; then
    echo "#### failed: ${failed[*]}" >&2
    return 1
  fi
}
case "$what" in
  --quick) run_quick ;;
  matcher) run_matcher ;;
  grid) run_grid ;;
  grid-sweep) run_grid_sweep ;;
  replay) run_replay ;;
  load) run_load ;;
  writes) run_writes ;;
  mongodb) run_mongodb ;;
  fanout) run_fanout ;;
  serve-fanout) run_serve_fanout ;;
  cache) run_cache ;;
  acl) run_acl ;;
  aggregation) run_aggregation ;;
  cluster) run_cluster ;;
  peers) run_peers ;;
  e2e) run_e2e ;;
  plots) run_plots ;;
  all) run_all ;;
  *) echo "usage: scripts/bench.sh [--quick|matcher|grid|grid-sweep|replay|load|fanout|serve-fanout|writes|mongodb|cache|acl|aggregation|cluster|peers|e2e|plots|all]" >&2; exit 2 ;;
esac
