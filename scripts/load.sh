#!/usr/bin/env bash
# A Locust run (tests/load/locustfile.py) against a running YMERA, headless
# by default.
#
#   ./scripts/load.sh [USERS [SPAWN_RATE [DURATION]]] [LOCUST OPTION...]
#
# Any Locust option passes through and wins over the defaults below, e.g.
#   ./scripts/load.sh 200 20 5m --processes 4 --tags read write
#   ./scripts/load.sh --exclude-tags live prometheus
# and one option of this script's own:
#   --web-ui   keep Locust's web UI (http://127.0.0.1:8089) open while the
#              run starts by itself with these settings; it quits 10 s after
#              the run time, reports written as usual.
#
# Environment (arguments win over it):
#   YMERA_LOAD_HOST        base URL (default http://127.0.0.1:8000)
#   YMERA_LOAD_USERS       simulated users (default 50)
#   YMERA_LOAD_SPAWN_RATE  users started per second (default 10)
#   YMERA_LOAD_DURATION    run time, Locust syntax: 60s, 5m, 1h (default 60s)
#   YMERA_LOAD_USER / YMERA_LOAD_PASSWORD   the load admin (default admin /
#                          $YMERA_ADMIN_PASSWORD): each simulated user gets an
#                          account of its own, made (and deleted) with it
#   YMERA_LOAD_ACCOUNTS    pool (default) or shared: everyone logs in as the
#                          load user; writers then need editor or admin
#   YMERA_LOAD_OUT         report folder (default load-results/<UTC timestamp>)
#   YMERA_LOAD_LOGIN_PATIENCE  seconds a user waits out login 429s (default 180)
#
# Installs Locust (pinned in tests/load/requirements.txt) into .data/venv when
# missing. Writes Locust's CSV files (stats, history, failures, exceptions),
# its HTML report and ymera_traces.csv (the slowest and the failed requests
# with their trace ids) into the report folder, prints where, and exits
# non-zero when any request failed.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
cd "$ROOT"

HOST="${YMERA_LOAD_HOST:-http://127.0.0.1:8000}"
USERS="${YMERA_LOAD_USERS:-50}"
SPAWN_RATE="${YMERA_LOAD_SPAWN_RATE:-10}"
DURATION="${YMERA_LOAD_DURATION:-60s}"
# Up to three leading positional arguments; everything from the first
# option on is Locust's (or --web-ui).
for var in USERS SPAWN_RATE DURATION; do
    case "${1:-}" in ""|-*) break ;; esac
    printf -v "$var" '%s' "$1"
    shift
done
case "$DURATION" in *[smh]) ;; *) DURATION="${DURATION}s" ;; esac
MODE=(--headless --only-summary)
PASS=()
for arg in "$@"; do
    if [ "$arg" = --web-ui ]; then
        MODE=(--autostart --autoquit 10)
    else
        PASS+=("$arg")
    fi
done
OUT="${YMERA_LOAD_OUT:-$ROOT/load-results/$(date -u +%Y%m%dT%H%M%SZ)}"

log() { printf 'load: %s\n' "$*"; }
die() { printf 'load: ERROR: %s\n' "$*" >&2; exit 2; }

[ -n "${YMERA_LOAD_PASSWORD:-${YMERA_ADMIN_PASSWORD:-}}" ] \
    || die "set YMERA_LOAD_PASSWORD (or YMERA_ADMIN_PASSWORD) for user ${YMERA_LOAD_USER:-admin}"

# ---------------------------------------------------------------- Locust
VENV="$ROOT/.data/venv"
REQS="$ROOT/tests/load/requirements.txt"
LOCUST_VERSION="$(sed -n 's/^locust==//p' "$REQS")"
# Through the venv's python, not its `locust` script: a script's shebang
# names the path the venv had when it was installed, which a moved or
# shared .data folder no longer has.
LOCUST=("$VENV/bin/python" -m locust)
if ! "${LOCUST[@]}" --version 2>/dev/null | grep -q "locust $LOCUST_VERSION "; then
    mkdir -p "$ROOT/.data"
    if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c 'import pip' >/dev/null 2>&1; then
        rm -rf "$VENV"
        python3 -m venv "$VENV" || die "python3 -m venv failed (on Debian: apt-get install python3-venv)"
    fi
    log "installing Locust $LOCUST_VERSION into .data/venv"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-input -r "$REQS" \
        || die "pip install -r tests/load/requirements.txt failed"
fi

# ---------------------------------------------------------------- run
python_ok() {
    "$VENV/bin/python" - "$1" <<'EOF' 2>/dev/null
import sys, urllib.request
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
try:
    with opener.open(sys.argv[1], timeout=3) as r:
        sys.exit(0 if r.status == 200 else 1)
except Exception:
    sys.exit(1)
EOF
}
python_ok "${HOST%/}/readyz" || die "${HOST%/}/readyz does not answer 200: is YMERA running there?"

mkdir -p "$OUT"
log "$USERS users (spawn rate $SPAWN_RATE/s) for $DURATION against $HOST${PASS[*]:+ (locust ${PASS[*]})}"
set +e
# Loopback only: keep any proxy settings of the environment out of the way.
# The options passed through come last: Locust takes the last of a repeated
# option, so they win over these defaults.
env -u HTTP_PROXY -u HTTPS_PROXY -u http_proxy -u https_proxy NO_PROXY='*' no_proxy='*' \
YMERA_LOAD_OUT="$OUT" \
"${LOCUST[@]}" -f "$ROOT/tests/load/locustfile.py" "${MODE[@]}" \
    --host "$HOST" -u "$USERS" -r "$SPAWN_RATE" -t "$DURATION" --stop-timeout 10 \
    --csv "$OUT/ymera" --csv-full-history --html "$OUT/report.html" \
    --loglevel WARNING ${PASS[@]+"${PASS[@]}"} 2>&1 | tee "$OUT/locust.log"
rc=${PIPESTATUS[0]}
set -e

# Totals as the locustfile prints them when Locust quits: the stats CSV is
# written a moment earlier and may miss the last requests.
summary="$(sed -n 's/^locust: \([0-9]*\) requests, \([0-9]*\) failures$/\1 \2/p' "$OUT/locust.log" | tail -n1)"
requests="${summary% *}"; failures="${summary#* }"
log "reports in $OUT (report.html, ymera_stats.csv, ymera_stats_history.csv, ymera_failures.csv, ymera_traces.csv, locust.log)"
if [ -z "$summary" ]; then
    log "no statistics written (Locust exit code $rc)"
    exit 1
fi
log "$requests requests, $failures failures"
if [ "$rc" -ne 0 ] || [ "$failures" != 0 ]; then
    [ "$failures" != 0 ] && { log "failures:"; cat "$OUT/ymera_failures.csv" >&2; }
    exit 1
fi
