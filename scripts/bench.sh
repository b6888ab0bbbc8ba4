#!/usr/bin/env bash
# Runs the benchmarks whose figures README.md records.
# Usage: scripts/bench.sh [--quick|matcher|grid|replay|load|fanout|serve-fanout|writes|mongodb|cache|acl|aggregation|cluster|peers|all]
#   --quick  a smoke run of the peers and cluster comparisons on small workloads (after the
#            release build, a few minutes), results in benches/results/<date>-quick-*.json
#   matcher  criterion: filter evaluation and compilation
#   grid     events/s, write-to-delta latency and memory per query with 1k/10k/100k queries
#            (LIVEGRID_BENCH_QUERIES, LIVEGRID_BENCH_GRID, LIVEGRID_BENCH_RATE to vary it)
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
#            4-64 processes (scripts/cluster_bench.py; LIVEGRID_CLUSTER_EVENTS, _QUERIES)
#   peers    livegrid replay against brute-force matching in Node (sift, mingo) on the same
#            mixed workload files, 1,000, 10,000 and 100,000 queries (scripts/peers_bench.py;
#            installs the peers with npm ci; LIVEGRID_PEERS_QUERIES, LIVEGRID_PEERS_EVENTS)
#   writes   acknowledged single-document writes/s from 64 concurrent keep-alive clients,
#            durable (group commit) and periodic (LIVEGRID_WRITERS, LIVEGRID_WRITES_SECONDS)
set -euo pipefail
cd "$(dirname "$0")/.."

what="${1:-all}"
run_matcher() {
  echo "== matcher: filter evaluation and compilation (criterion)"
  cargo bench -p livegrid-matcher --bench matcher
}
run_grid() {
  echo "== grid: throughput, latency, memory per registered query"
  cargo bench --bench grid
}
# Generates a workload with the given `livegrid workload` flags and replays it on each grid.
replay_workload() {
  local grids="$1"; shift
  cargo build --release --quiet
  dir=$(mktemp -d)
  target/release/livegrid workload --dir "$dir" --events 200000 --queries 10000 "$@"
  for grid in $grids; do
    # Each run starts with the previous run's output on disk, not still being written back.
    rm -f "$dir/out.jsonl"; sync
    target/release/livegrid replay --events "$dir/events.jsonl" --queries "$dir/queries.jsonl" --out "$dir/out.jsonl" --grid "$grid"
  done
  rm -rf "$dir"
}
run_replay() {
  echo "== replay: 200,000 change events, 10,000 queries, end to end"
  replay_workload "1x1 1x2 2x1"
}
run_load() {
  echo "== load: livegrid serve, 1,000 connections, 10,000 subscriptions"
  for durability in durable periodic; do
    LIVEGRID_DURABILITY=$durability cargo bench --bench load
  done
}
run_fanout() {
  echo "== fanout: 200,000 chat events, 10,000 queries, each write changes ~50 results"
  replay_workload "1x2 1x1" --fanout 50
  echo "== fanout at a fixed rate (about half of saturation on 1x2): latency"
  cargo build --release --quiet
  dir=$(mktemp -d)
  target/release/livegrid workload --dir "$dir" --events 200000 --queries 10000 --fanout 50
  sync
  target/release/livegrid replay --events "$dir/events.jsonl" --queries "$dir/queries.jsonl" --out "$dir/out.jsonl" --grid 1x2 --rate "${LIVEGRID_FANOUT_RATE:-21000}"
  rm -rf "$dir"
}
run_serve_fanout() {
  echo "== serve-fanout: livegrid serve, 1,000 connections x 10 subscriptions, 50 per write"
  for rate in 1000 3000; do
    LIVEGRID_LOAD_FANOUT=50 LIVEGRID_LOAD_RATE=$rate cargo bench --bench load
  done
  echo "== serve-fanout with one connection that reads nothing (it subscribes to every write)"
  LIVEGRID_LOAD_FANOUT=50 LIVEGRID_LOAD_RATE=1000 LIVEGRID_LOAD_SECONDS=20 LIVEGRID_LOAD_SILENT=1 cargo bench --bench load
}
run_mongodb() {
  echo "== mongodb: events/s through the MongoDB source (driver + fixture on loopback)"
  cargo bench --bench mongodb
}
run_acl() {
  echo "== acl: 1,000 users x 10 subscriptions, with and without object ACLs (CPU, memory)"
  for acl in 0 1; do
    sync; LIVEGRID_LOAD_ACL=$acl LIVEGRID_LOAD_SECONDS=10 cargo bench --bench load
  done
  for acl in 0 1; do
    sync; LIVEGRID_LOAD_ACL=$acl LIVEGRID_LOAD_FANOUT=10 LIVEGRID_LOAD_RATE=2000 LIVEGRID_LOAD_SECONDS=10 cargo bench --bench load
  done
}
run_aggregation() {
  echo "== aggregation: live pipelines through the engine, 10,000 pipelines over 1,000,000 documents"
  cargo bench --bench pipelines
  echo "== aggregation: the same \$matches as plain queries"
  LIVEGRID_PIPE_PLAIN=1 cargo bench --bench pipelines
  echo "== aggregation: the same on a 1x2 grid"
  LIVEGRID_PIPE_GRID=1x2 cargo bench --bench pipelines
  echo "== aggregation: 100,000 subscriptions to the 10,000 pipelines"
  LIVEGRID_PIPE_SUBSCRIPTIONS=100000 cargo bench --bench pipelines
  echo "== aggregation: group state on differential dataflow against the live pipelines' (100 pipelines)"
  for docs in 10000 100000; do
    LIVEGRID_AGG_DOCS=$docs cargo bench --bench aggregation
  done
  echo "== aggregation: one group of every document, 1,000 and 1,000,000 distinct values"
  for prices in 1000 1000000; do
    LIVEGRID_AGG_GROUPS=one LIVEGRID_AGG_DOCS=100000 LIVEGRID_AGG_PRICES=$prices cargo bench --bench aggregation
  done
}
run_cache() {
  echo "== cache: purges, adaptive TTLs, the cache sketch"
  cargo bench --bench cache
}
run_writes() {
  echo "== writes: 64 concurrent keep-alive writers, each durability mode"
  for durability in durable periodic; do
    LIVEGRID_DURABILITY=$durability cargo bench --bench writes
  done
}
run_cluster() {
  echo "== cluster: one process against two, and the projection"
  cargo build --release --quiet --bin livegrid
  python3 scripts/cluster_bench.py --events "${LIVEGRID_CLUSTER_EVENTS:-200000}" \
    --queries "${LIVEGRID_CLUSTER_QUERIES:-10000}" --out "${LIVEGRID_CLUSTER_OUT:-/dev/null}"
}
run_peers() {
  echo "== peers: livegrid against brute-force matching (sift, mingo) on the mixed workload"
  cargo build --release --quiet --bin livegrid
  python3 scripts/peers_bench.py --queries "${LIVEGRID_PEERS_QUERIES:-1000,10000,100000}" \
    --events "${LIVEGRID_PEERS_EVENTS:-50000}" --out "${LIVEGRID_PEERS_OUT:-/dev/null}"
}
run_quick() {
  echo "== quick: release build"
  cargo build --release --quiet --bin livegrid
  local day; day=$(date +%F)
  echo "== quick: peers (mixed workload, 1,000 and 10,000 queries, peers stopped after 5 s)"
  python3 scripts/peers_bench.py --queries 1000,10000 --docs 5000 --events 20000 --peer-seconds 5 \
    --out "benches/results/$day-quick-peers.json"
  echo "== quick: cluster (one process against two, 50,000 events, 5,000 queries, one run each)"
  python3 scripts/cluster_bench.py --events 50000 --queries 5000 --repeat 1 \
    --out "benches/results/$day-quick-cluster.json"
}
case "$what" in
  --quick) run_quick ;;
  matcher) run_matcher ;;
  grid) run_grid ;;
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
  all) run_matcher; run_grid; run_replay; run_fanout; run_serve_fanout; run_load; run_writes; run_mongodb; run_cache; run_acl; run_aggregation; run_cluster; run_peers ;;
  *) echo "usage: scripts/bench.sh [--quick|matcher|grid|replay|load|fanout|serve-fanout|writes|mongodb|cache|acl|aggregation|cluster|peers|all]" >&2; exit 2 ;;
esac
