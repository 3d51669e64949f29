#!/usr/bin/env bash
# The project's one test command: starts the servers (scripts/setup.sh), drops
# per-test databases left over from earlier runs, then runs the Rust tests.
# Extra arguments go to the test runner (cargo nextest run / cargo test).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
cd "$ROOT"

./scripts/setup.sh

# A cold, one-shot build gains nothing from incremental compilation, whose
# caches take gigabytes beside the artefacts (a CI run once ran out of disk).
# Keep it for repeated local runs.
if [ -n "${CI:-}" ]; then
    export CARGO_INCREMENTAL=0
fi
# The builds, the test databases and the JetStream store take several GiB;
# say so up front rather than fail midway.
free_kib="$(df -Pk "$ROOT" | awk 'NR == 2 { print $4 }')"
if [ "${free_kib:-0}" -lt $((8 * 1024 * 1024)) ]; then
    echo "test: warning: only $((free_kib / 1024)) MiB free on $(df -P "$ROOT" | awk 'NR == 2 { print $6 }'); the run needs about 8 GiB" >&2
fi
# shellcheck source=/dev/null
. ./.data/env
export YMERA_NATS_URL YMERA_DATABASE_URL
export YMERA_TEST_NATS_URL="$YMERA_NATS_URL"
export YMERA_TEST_DATABASE_URL="$YMERA_DATABASE_URL"
# A NATS server of their own for tests that pause it (SIGSTOP).
export YMERA_TEST_NATS_BIN="$ROOT/.data/venv/bin/nats-server"

# Leftover per-test databases (ymera_test_*) from earlier runs.
PSQL="$(command -v psql || true)"
if [ -z "$PSQL" ]; then
    PSQL="$(printf '%s\n' /usr/lib/postgresql/*/bin/psql | sort -V | tail -n1)"
    [ -x "$PSQL" ] || PSQL=""
fi
if [ -n "$PSQL" ]; then
    "$PSQL" -X -w -q -v ON_ERROR_STOP=1 -d "${YMERA_DATABASE_URL%/*}/postgres" >/dev/null <<'SQL' \
        || echo "test: warning: could not drop leftover ymera_test_* databases" >&2
SELECT format('DROP DATABASE IF EXISTS %I WITH (FORCE)', datname)
  FROM pg_database WHERE datname LIKE 'ymera\_test\_%'
\gexec
SQL
else
    echo "test: warning: psql not found; leftover ymera_test_* databases not dropped" >&2
fi

# The ymera binary: the projector crash test runs it as a child process,
# and the load smoke runs the whole system from it.
cargo build -p ymera

# A short headless Locust run (20 users, 20 s) against `ymera all`: any
# failed request fails the test command.
./scripts/load-smoke.sh

# Schemathesis against the served OpenAPI spec: no 5xx, no response that
# breaks the spec, no valid request refused. A fixed seed keeps the test
# command repeatable; run ./scripts/fuzz.sh alone (random seed) to explore.
YMERA_FUZZ_SEED="${YMERA_FUZZ_SEED:-153299784098794556798863464346300330567}" ./scripts/fuzz.sh

# The benchmark harness, reduced (--quick, debug build, under a minute): a
# smoke test that fails only when a row errors, never on a ratio (the
# machine is noisy and a debug build is slow). The figures that count come
# from ./scripts/bench.sh (release).
cargo build -p bench
BENCH_NO_BUILD=1 cargo run -q -p bench -- --quick

if cargo nextest --version >/dev/null 2>&1; then
    exec cargo nextest run --workspace --no-fail-fast "$@"
else
    exec cargo test --workspace --no-fail-fast "$@"
fi
