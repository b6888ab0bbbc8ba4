#!/usr/bin/env bash
# The project's test command (what CI runs): formatting, lints with warnings denied, every test.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy (warnings denied)"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== cargo test"
cargo test --workspace --locked
echo "== JavaScript client: unit tests (node --test)"
(cd clients/js && npm ci --no-audit --no-fund --loglevel=error && npm test)
echo "== JavaScript client: the playground in headless Chromium"
(cd clients/js && LIVEGRID_BIN="$PWD/../../target/debug/livegrid" npm run e2e)
