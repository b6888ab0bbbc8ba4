#!/usr/bin/env bash
# Runs the benchmarks whose figures README.md records. Usage: scripts/bench.sh [matcher|all]
set -euo pipefail
cd "$(dirname "$0")/.."

what="${1:-all}"
case "$what" in
  matcher|all)
    echo "== matcher: filter evaluation and compilation (criterion)"
    cargo bench -p livegrid-matcher --bench matcher
    ;;&
  matcher|all) ;;
  *)
    echo "usage: scripts/bench.sh [matcher|all]" >&2
    exit 2
    ;;
esac
