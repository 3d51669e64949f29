#!/usr/bin/env bash
# Runs the benchmark harness (crates/bench): starts the servers
# (scripts/setup.sh), then `cargo run --release -p bench -- "$@"`.
#   ./scripts/bench.sh                 # every row (under 15 minutes)
#   ./scripts/bench.sh --quick         # a reduced run (about a minute)
#   ./scripts/bench.sh get-by-id search
# The table goes to stdout, a JSON copy to bench-results/<timestamp>.json.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
cd "$ROOT"

./scripts/setup.sh
# shellcheck source=/dev/null
. ./.data/env
export YMERA_NATS_URL YMERA_DATABASE_URL

if [ "$#" -eq 0 ]; then
    set -- all
fi
# Build the harness and the ymera binary it runs together (one feature set,
# one build), so the harness need not build the binary itself.
cargo build --release -p bench -p ymera
BENCH_NO_BUILD=1 exec cargo run --release -p bench -- "$@"
