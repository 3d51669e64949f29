#!/usr/bin/env bash
# Stops the NATS server and the PostgreSQL cluster that scripts/setup.sh started.
# Harmless when they are not running; servers it did not start are left alone.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
cd "$ROOT"
DATA="$ROOT/.data"

log() { printf 'stop: %s\n' "$*"; }

# --- NATS ------------------------------------------------------------------
NATS_PID_FILE="$DATA/nats.pid"
if [ -f "$NATS_PID_FILE" ]; then
    pid="$(tr -dc '0-9' <"$NATS_PID_FILE")"
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null \
        && tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q nats-server; then
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 1 100); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$pid" 2>/dev/null; then
            kill -KILL "$pid" 2>/dev/null || true
            log "NATS (pid $pid) did not stop in 10 s; killed it"
        else
            log "stopped NATS (pid $pid)"
        fi
    fi
    rm -f "$NATS_PID_FILE"
fi

# --- PostgreSQL --------------------------------------------------------------
PG_BASE="$DATA"
[ -f "$DATA/pg.base" ] && PG_BASE="$(cat "$DATA/pg.base")"
PGDATA_DIR="$PG_BASE/pg"
if [ -f "$PGDATA_DIR/PG_VERSION" ] && [ -f "$PGDATA_DIR/postmaster.pid" ]; then
    PG_MAJOR="$(cat "$PGDATA_DIR/PG_VERSION")"
    PG_CTL="/usr/lib/postgresql/$PG_MAJOR/bin/pg_ctl"
    if [ -x "$PG_CTL" ]; then
        as_pg() {
            if [ "$(id -u)" = 0 ]; then
                (cd / && runuser -u postgres -- env HOME=/tmp "$@")
            else
                "$@"
            fi
        }
        if as_pg "$PG_CTL" -D "$PGDATA_DIR" status >/dev/null 2>&1; then
            as_pg "$PG_CTL" -D "$PGDATA_DIR" -m fast -w -t 60 stop >/dev/null
            log "stopped PostgreSQL $PG_MAJOR (${PGDATA_DIR#"$ROOT"/})"
        fi
    fi
fi
