#!/usr/bin/env bash
# Load smoke test for CI: builds the debug `ymera`, starts `ymera all` on a
# free 127.0.0.1 port with a stream, subject prefix and database of its own,
# runs Locust (tests/load) headless against it, stops it with SIGTERM, and
# cleans everything up whatever happens.
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
die() { printf 'load smoke: ERROR: %s\n' "$*" >&2; exit 1; }

started=$SECONDS
[ -f .data/env ] || die ".data/env is missing: run scripts/setup.sh first"
# shellcheck source=/dev/null
. ./.data/env
: "${YMERA_NATS_URL:?}" "${YMERA_DATABASE_URL:?}"

PSQL="$(command -v psql || true)"
if [ -z "$PSQL" ]; then
    PSQL="$(printf '%s\n' /usr/lib/postgresql/*/bin/psql | sort -V | tail -n1)"
    [ -x "$PSQL" ] || die "psql not found"
fi
PY=python3
[ -x .data/venv/bin/python ] && PY=.data/venv/bin/python

# ------------------------------------------------------------------ build
log "cargo build -p ymera"
cargo build -q -p ymera
BIN="${CARGO_TARGET_DIR:-$ROOT/target}/debug/ymera"
[ -x "$BIN" ] || die "no binary at $BIN"

# ------------------------------------------------------- isolated resources
SUFFIX="$(od -An -N6 -tx1 /dev/urandom | tr -d ' \n')"
DB_NAME="ymera_load_$SUFFIX"
ADMIN_URL="${YMERA_DATABASE_URL%/*}/postgres"
export YMERA_DATABASE_URL="${YMERA_DATABASE_URL%/*}/$DB_NAME"
export YMERA_STREAM="YMERA_LOAD_$SUFFIX"
export YMERA_SUBJECT_PREFIX="ymera_load_$SUFFIX"
export YMERA_NATS_URL
export YMERA_JWT_SECRET
YMERA_JWT_SECRET="$(od -An -N32 -tx1 /dev/urandom | tr -d ' \n')"
export YMERA_ADMIN_USERNAME=admin
export YMERA_ADMIN_PASSWORD
YMERA_ADMIN_PASSWORD="load-$(od -An -N12 -tx1 /dev/urandom | tr -d ' \n')"
unset YMERA_DEV YMERA_LOAD_USER YMERA_LOAD_PASSWORD OTEL_EXPORTER_OTLP_TRACES_ENDPOINT

PORT="$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
export YMERA_BIND="127.0.0.1:$PORT"
HOST="http://127.0.0.1:$PORT"
WORK="$(mktemp -d /tmp/ymera-load-smoke.XXXXXX)"
YMERA_LOG="$WORK/ymera.log"
OUT="$ROOT/load-results/smoke-$(date -u +%Y%m%dT%H%M%SZ)"

YMERA_PID=""
LOAD_PID=""
DB_CREATED=0

# Deletes this run's JetStream stream with a raw NATS request
# ($JS.API.STREAM.DELETE.<name>), so no client library is needed.
delete_stream() {
    "$PY" - "$YMERA_NATS_URL" "$YMERA_STREAM" <<'EOF'
import json, socket, sys
from urllib.parse import urlparse
u = urlparse(sys.argv[1]); stream = sys.argv[2]
s = socket.create_connection((u.hostname or "127.0.0.1", u.port or 4222), timeout=5)
f = s.makefile("rb")
f.readline()  # INFO
s.sendall(b'CONNECT {"verbose":false,"pedantic":false}\r\nSUB _INBOX.smoke 1\r\n'
          + f"PUB $JS.API.STREAM.DELETE.{stream} _INBOX.smoke 0\r\n\r\nPING\r\n".encode())
while True:
    line = f.readline()
    if not line:
        sys.exit("connection closed")
    if line.startswith(b"PING"):
        s.sendall(b"PONG\r\n")
    elif line.startswith(b"MSG"):
        size = int(line.split()[-1])
        reply = json.loads(f.read(size + 2)[:size] or b"{}")
        sys.exit(0 if reply.get("success") else f"stream delete: {reply}")
    elif line.startswith(b"-ERR"):
        sys.exit(line.decode().strip())
EOF
}

stop_ymera() {
    # SIGTERM, then up to 20 s for the graceful shutdown; KILL after that.
    [ -n "$YMERA_PID" ] || return 0
    local pid=$YMERA_PID rc=0
    YMERA_PID=""
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 200); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        log "ymera (pid $pid) still running 20 s after SIGTERM: killing it"
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
        return 1
    fi
    wait "$pid" 2>/dev/null || rc=$?
    return "$rc"
}

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if [ -n "$LOAD_PID" ]; then
        kill -TERM -- "-$LOAD_PID" 2>/dev/null || true
        wait "$LOAD_PID" 2>/dev/null || true
    fi
    stop_ymera || true
    if [ "$DB_CREATED" = 1 ]; then
        "$PSQL" -X -w -q -d "$ADMIN_URL" -c "DROP DATABASE IF EXISTS \"$DB_NAME\" WITH (FORCE)" \
            >/dev/null 2>&1 || log "warning: could not drop database $DB_NAME"
    fi
    delete_stream >/dev/null 2>&1 || true
    rm -rf "$WORK"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

"$PSQL" -X -w -q -v ON_ERROR_STOP=1 -d "$ADMIN_URL" -c "CREATE DATABASE \"$DB_NAME\"" >/dev/null \
    || die "cannot create database $DB_NAME"
DB_CREATED=1

# ------------------------------------------------------------------ start
log "starting ymera all on $HOST (database $DB_NAME, stream $YMERA_STREAM)"
"$BIN" all >"$YMERA_LOG" 2>&1 &
YMERA_PID=$!

ready=0
for _ in $(seq 600); do   # 60 s
    if ! kill -0 "$YMERA_PID" 2>/dev/null; then
        break
    fi
    if "$PY" - "$HOST/readyz" <<'EOF' 2>/dev/null
import sys, urllib.request
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
try:
    with opener.open(sys.argv[1], timeout=2) as r:
        sys.exit(0 if r.status == 200 else 1)
except Exception:
    sys.exit(1)
EOF
    then
        ready=1
        break
    fi
    sleep 0.1
done
if [ "$ready" != 1 ]; then
    echo "---- tail of ymera's log ----" >&2
    tail -n 40 "$YMERA_LOG" >&2 || true
    die "ymera did not become ready on $HOST/readyz"
fi
log "ready after $((SECONDS - started)) s"

# Warm the PostgreSQL pool before the users log in. The pool opens its
# connections lazily and gives up on one after YMERA_DB_ACQUIRE_TIMEOUT_MS
# (1 s); on a fresh debug-build process a burst of logins (Argon2 on every
# core) starves the opening of new connections, and some logins get 503 "the
# database is unavailable". A running system has its pool open already; the
# smoke measures that, not the cold start.
pool="$("$PY" - "$HOST" <<'EOF' 2>/dev/null || true
import re, sys, urllib.request
from concurrent.futures import ThreadPoolExecutor
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
def get(path):
    try:
        with opener.open(sys.argv[1] + path, timeout=10) as r:
            return r.read().decode()
    except Exception:
        return ""
for _ in range(3):
    with ThreadPoolExecutor(32) as ex:
        list(ex.map(get, ["/health"] * 32))
m = re.search(r"^ymera_db_pool_connections (\S+)", get("/metrics"), re.M)
print(int(float(m.group(1))) if m else "?")
EOF
)"
log "database pool warmed: ${pool:-?} connections open"

# ------------------------------------------------------------------- load
# In its own process group, waited for in the background, so that a signal
# to this script stops Locust and cleans up at once.
set +e
YMERA_LOAD_HOST="$HOST" YMERA_LOAD_USER=admin YMERA_LOAD_PASSWORD="$YMERA_ADMIN_PASSWORD" \
    YMERA_LOAD_OUT="$OUT" setsid ./scripts/load.sh "$USERS" "$SPAWN_RATE" "$DURATION" &
LOAD_PID=$!
wait "$LOAD_PID"
load_rc=$?
LOAD_PID=""
set -e

stop_rc=0
stop_ymera || stop_rc=$?
if [ "$stop_rc" != 0 ]; then
    echo "---- tail of ymera's log ----" >&2
    tail -n 40 "$YMERA_LOG" >&2 || true
fi
grep -E ' (ERROR|WARN) ' "$YMERA_LOG" >"$OUT/ymera-warnings.log" 2>/dev/null || true
cp "$YMERA_LOG" "$OUT/ymera.log" 2>/dev/null || true

counts="$(sed -n 's/^locust: \([0-9]*\) requests, \([0-9]*\) failures$/\1 \2/p' "$OUT/locust.log" 2>/dev/null | tail -n1)"
requests="${counts% *}"; failures="${counts#* }"
[ -n "$counts" ] || { requests=0; failures="unknown"; }

status=0
[ "$load_rc" = 0 ] || status=1
[ "$stop_rc" = 0 ] || { log "ymera did not stop cleanly on SIGTERM (exit $stop_rc)"; status=1; }
[ "$requests" != 0 ] || { log "Locust made no request"; status=1; }
echo "load smoke: $requests requests, $failures failures ($((SECONDS - started)) s; reports in ${OUT#"$ROOT"/})"
exit "$status"
