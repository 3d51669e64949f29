#!/usr/bin/env bash
# Runs a command against a disposable YMERA:
#
#   ./scripts/with-ymera.sh <command> [args...]
#
# Builds the debug `ymera` (or uses $YMERA_BIN), starts `ymera all` on a free
# 127.0.0.1 port with a database, stream, subject prefix, JWT secret and admin
# password of its own, waits until /readyz answers 200 and warms the database
# pool, then runs the command with
#
#   YMERA_HOST            http://127.0.0.1:<port>
#   YMERA_ADMIN_USERNAME  admin
#   YMERA_ADMIN_PASSWORD  the admin's (random) password
#   YMERA_LOG             ymera's log file (deleted afterwards)
#
# in its environment, in a process group of its own (so that a signal to this
# script stops it at once). Afterwards it stops ymera with SIGTERM (KILL after
# 20 s) and drops the database and the stream, whatever happened.
#
# Exits with the command's exit code; when the command succeeded but ymera
# did not start, become ready or stop cleanly, non-zero all the same.
# Everything else of the environment reaches ymera as it is (rate limits:
# YMERA_RATE_LIMIT_PER_USER, ...). Assumes scripts/setup.sh already ran (NATS
# and PostgreSQL up, .data/env written).
#
# Knobs: YMERA_BIN (skip the build and use this binary),
#        YMERA_WITH_LOG_PREFIX (prefix of this script's lines; "with-ymera"),
#        YMERA_WITH_KEEP_LOGS (a folder: ymera.log and ymera-warnings.log,
#        its ERROR and WARN lines, are copied there after the stop).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
cd "$ROOT"

PREFIX="${YMERA_WITH_LOG_PREFIX:-with-ymera}"
log() { printf '%s: %s\n' "$PREFIX" "$*"; }
die() { printf '%s: ERROR: %s\n' "$PREFIX" "$*" >&2; exit 1; }

[ "$#" -gt 0 ] || die "usage: scripts/with-ymera.sh <command> [args...]"

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
if [ -n "${YMERA_BIN:-}" ]; then
    BIN="$YMERA_BIN"
else
    log "cargo build -p ymera"
    cargo build -q -p ymera
    BIN="${CARGO_TARGET_DIR:-$ROOT/target}/debug/ymera"
fi
[ -x "$BIN" ] || die "no binary at $BIN"

# ------------------------------------------------------- isolated resources
SUFFIX="$(od -An -N6 -tx1 /dev/urandom | tr -d ' \n')"
DB_NAME="ymera_tmp_$SUFFIX"
ADMIN_URL="${YMERA_DATABASE_URL%/*}/postgres"
export YMERA_DATABASE_URL="${YMERA_DATABASE_URL%/*}/$DB_NAME"
export YMERA_STREAM="YMERA_TMP_$SUFFIX"
export YMERA_SUBJECT_PREFIX="ymera_tmp_$SUFFIX"
export YMERA_NATS_URL
export YMERA_JWT_SECRET
YMERA_JWT_SECRET="$(od -An -N32 -tx1 /dev/urandom | tr -d ' \n')"
export YMERA_ADMIN_USERNAME=admin
export YMERA_ADMIN_PASSWORD
YMERA_ADMIN_PASSWORD="load-$(od -An -N12 -tx1 /dev/urandom | tr -d ' \n')"
unset YMERA_DEV YMERA_LOAD_USER YMERA_LOAD_PASSWORD OTEL_EXPORTER_OTLP_TRACES_ENDPOINT

PORT="$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
export YMERA_BIND="127.0.0.1:$PORT"
export YMERA_HOST="http://127.0.0.1:$PORT"
WORK="$(mktemp -d /tmp/ymera-with.XXXXXX)"
# The search index of this throwaway process, removed with $WORK.
export YMERA_SEARCH_DIR="$WORK/search"
export YMERA_LOG="$WORK/ymera.log"

YMERA_PID=""
CMD_PID=""
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

keep_logs() {
    [ -n "${YMERA_WITH_KEEP_LOGS:-}" ] || return 0
    mkdir -p "$YMERA_WITH_KEEP_LOGS" 2>/dev/null || return 0
    grep -E ' (ERROR|WARN) ' "$YMERA_LOG" >"$YMERA_WITH_KEEP_LOGS/ymera-warnings.log" 2>/dev/null || true
    cp "$YMERA_LOG" "$YMERA_WITH_KEEP_LOGS/ymera.log" 2>/dev/null || true
}

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if [ -n "$CMD_PID" ]; then
        kill -TERM -- "-$CMD_PID" 2>/dev/null || true
        wait "$CMD_PID" 2>/dev/null || true
    fi
    stop_ymera || true
    keep_logs
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
log "starting ymera all on $YMERA_HOST (database $DB_NAME, stream $YMERA_STREAM)"
"$BIN" all >"$YMERA_LOG" 2>&1 &
YMERA_PID=$!

ready=0
for _ in $(seq 600); do   # 60 s
    if ! kill -0 "$YMERA_PID" 2>/dev/null; then
        break
    fi
    if "$PY" - "$YMERA_HOST/readyz" <<'EOF' 2>/dev/null
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
    die "ymera did not become ready on $YMERA_HOST/readyz"
fi
log "ready after $((SECONDS - started)) s"

# Warm the PostgreSQL pool before the command starts. The pool opens its
# connections lazily and gives up on one after YMERA_DB_ACQUIRE_TIMEOUT_MS
# (1 s); on a fresh debug-build process a burst of logins (Argon2 on every
# core) starves the opening of new connections, and some requests get 503 "the
# database is unavailable". A running system has its pool open already; the
# commands run here measure that, not the cold start.
pool="$("$PY" - "$YMERA_HOST" <<'EOF' 2>/dev/null || true
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

# ---------------------------------------------------------------- command
# In its own process group, waited for in the background, so that a signal
# to this script stops the command and cleans up at once.
set +e
setsid "$@" &
CMD_PID=$!
wait "$CMD_PID"
cmd_rc=$?
CMD_PID=""
set -e

stop_rc=0
stop_ymera || stop_rc=$?
if [ "$stop_rc" != 0 ]; then
    echo "---- tail of ymera's log ----" >&2
    tail -n 40 "$YMERA_LOG" >&2 || true
    log "ymera did not stop cleanly on SIGTERM (exit $stop_rc)"
fi
[ "$cmd_rc" != 0 ] && exit "$cmd_rc"
[ "$stop_rc" = 0 ] || exit 1
exit 0
