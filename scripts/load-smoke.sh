#!/usr/bin/env bash
# Load smoke test for CI: with scripts/with-ymera.sh (the debug `ymera all` on
# a free 127.0.0.1 port with a stream, subject prefix and database of its own,
# stopped with SIGTERM and cleaned up whatever happens), runs Locust
# (tests/load) headless against it.
#
# Fails (non-zero) when ymera does not start or become ready, when any
# request failed, or when ymera does not stop cleanly. Assumes
# scripts/setup.sh already ran (NATS and PostgreSQL up, .data/env written).
#
# Knobs: YMERA_SMOKE_USERS (20), YMERA_SMOKE_DURATION (20s),
#        YMERA_SMOKE_SPAWN_RATE (10).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
cd "$ROOT"

USERS="${YMERA_SMOKE_USERS:-20}"
DURATION="${YMERA_SMOKE_DURATION:-20s}"
SPAWN_RATE="${YMERA_SMOKE_SPAWN_RATE:-10}"

log() { printf 'load smoke: %s\n' "$*"; }

started=$SECONDS
OUT="$ROOT/load-results/smoke-$(date -u +%Y%m%dT%H%M%SZ)"

set +e
# shellcheck disable=SC2016 # expanded by the inner shell, inside with-ymera.sh
YMERA_WITH_LOG_PREFIX="load smoke" YMERA_WITH_KEEP_LOGS="$OUT" \
    ./scripts/with-ymera.sh bash -c '
        YMERA_LOAD_HOST="$YMERA_HOST" YMERA_LOAD_USER="$YMERA_ADMIN_USERNAME" \
        YMERA_LOAD_PASSWORD="$YMERA_ADMIN_PASSWORD" YMERA_LOAD_OUT="$1" \
            exec ./scripts/load.sh "$2" "$3" "$4"' \
        load-smoke "$OUT" "$USERS" "$SPAWN_RATE" "$DURATION"
rc=$?
set -e

counts="$(sed -n 's/^locust: \([0-9]*\) requests, \([0-9]*\) failures$/\1 \2/p' "$OUT/locust.log" 2>/dev/null | tail -n1)"
requests="${counts% *}"; failures="${counts#* }"
[ -n "$counts" ] || { requests=0; failures="unknown"; }

status=0
[ "$rc" = 0 ] || status=1
[ "$requests" != 0 ] || { log "Locust made no request"; status=1; }
echo "load smoke: $requests requests, $failures failures ($((SECONDS - started)) s; reports in ${OUT#"$ROOT"/})"
exit "$status"
