#!/usr/bin/env bash
# Fuzzes the parsers that take untrusted input, each target for a bounded time (cargo-fuzz,
# libFuzzer; needs the nightly toolchain: `rustup toolchain install nightly` and
# `cargo install cargo-fuzz`).
# Usage: scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]   (default: 600 s, every target)
#   protocol_messages  WebSocket client messages (JSON)
#   query_parsing      filters, sorts and projections, compiled and evaluated
#   update_operators   update operators validated and applied
#   extended_json      Extended JSON parsed and written back
# Findings land in fuzz/artifacts/<target>/; each becomes a regression test.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
seconds="${1:-600}"
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  targets=(protocol_messages query_parsing update_operators extended_json)
fi
for target in "${targets[@]}"; do
  echo "== fuzz $target for ${seconds}s"
  mkdir -p "corpus/$target"
  cargo +nightly fuzz run "$target" "corpus/$target" -- -max_total_time="$seconds" -rss_limit_mb=2048 -timeout=10
done
