#!/usr/bin/env bash
# The production shape of YMERA on one machine, on loopback:
#   3 NATS servers as one JetStream cluster (the stream replicated R3),
#   PostgreSQL (scripts/setup.sh's server, a database of the cluster's own),
#   2 `ymera command-api`, 2 `ymera query-api`, 2 `ymera projector`
#   (today one owns the projection and the other is its hot standby),
#   nginx: writes to the command-api copies, reads (the live feed included)
#   to the query-api copies, each upstream with passive health checks.
#
#   ./scripts/cluster.sh up              start everything, wait until healthy
#   ./scripts/cluster.sh status          each process, its health, the partitions each projector
#                                        owns, and each partition's checkpoint and owner
#   ./scripts/cluster.sh restart NAME    restart one process with the same settings
#   ./scripts/cluster.sh down            stop everything, remove the cluster's data
#
# NAME is one of nats-1 nats-2 nats-3 command-api-1 command-api-2 query-api-1
# query-api-2 projector-1 projector-2 nginx.
#
# `up` writes $YMERA_CLUSTER_DIR/env (YMERA_URL, YMERA_ADMIN_USERNAME,
# YMERA_ADMIN_PASSWORD) and one pid file per process in
# $YMERA_CLUSTER_DIR/pids/<name>.pid; each process logs to
# $YMERA_CLUSTER_DIR/logs/<name>.log.
#
# Settings (environment; read by `up`, remembered for the other commands):
#   YMERA_CLUSTER_DIR        where it all lives (.data/cluster)
#   YMERA_CLUSTER_PORT_BASE  nginx listens here (18080); the processes take
#                            the next ports: base+1..6 the ymera copies,
#                            base+11..13 NATS clients, base+21..23 NATS routes,
#                            base+31..33 NATS monitoring
#   YMERA_CLUSTER_DB         the PostgreSQL database (ymera_cluster)
#   YMERA_CLUSTER_PARTITIONS the projection's partitions, shared by the two
#                            projectors (4; fixed for the cluster's life)
#   YMERA_DATABASE_URL       a PostgreSQL URL whose role may create databases
#                            (else scripts/setup.sh is run and .data/env read)
#   YMERA_BIN                the ymera binary (else a release build)
#   YMERA_CLUSTER_NATS_BIN   nats-server (.data/venv/bin/nats-server)
#   YMERA_ADMIN_PASSWORD     the first admin's password (else random)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
DIR="${YMERA_CLUSTER_DIR:-$ROOT/.data/cluster}"
SETTINGS="$DIR/settings"
NAMES=(nats-1 nats-2 nats-3 command-api-1 command-api-2 query-api-1 query-api-2
       projector-1 projector-2 nginx)

# psql quietly: no NOTICE for a database that is not there.
export PGOPTIONS="-c client_min_messages=warning"

log() { printf 'cluster: %s\n' "$*"; }
die() { printf 'cluster: ERROR: %s\n' "$*" >&2; exit 1; }

# --- where each process listens ------------------------------------------

# port NAME: the HTTP port of a ymera copy or nginx, or a NATS node's client port.
port() {
    case "$1" in
        nginx) echo "$PORT_BASE" ;;
        command-api-1) echo $((PORT_BASE + 1)) ;;
        command-api-2) echo $((PORT_BASE + 2)) ;;
        query-api-1) echo $((PORT_BASE + 3)) ;;
        query-api-2) echo $((PORT_BASE + 4)) ;;
        projector-1) echo $((PORT_BASE + 5)) ;;
        projector-2) echo $((PORT_BASE + 6)) ;;
        nats-[123]) echo $((PORT_BASE + 10 + ${1#nats-})) ;;
        *) die "no process named '$1' (one of: ${NAMES[*]})" ;;
    esac
}
route_port() { echo $((PORT_BASE + 20 + ${1#nats-})); }
monitor_port() { echo $((PORT_BASE + 30 + ${1#nats-})); }

# health_url NAME: what answers 200 once the process is ready.
health_url() {
    case "$1" in
        nats-*) echo "http://127.0.0.1:$(monitor_port "$1")/healthz?js-enabled-only=true" ;;
        *) echo "http://127.0.0.1:$(port "$1")/readyz" ;;
    esac
}

nats_urls() {
    local urls=() n
    for n in 1 2 3; do urls+=("nats://127.0.0.1:$(port "nats-$n")"); done
    local IFS=,
    echo "${urls[*]}"
}

# --- processes ---------------------------------------------------------------

pid_file() { echo "$DIR/pids/$1.pid"; }

# alive NAME: the pid of NAME if it runs.
alive() {
    local f pid
    f="$(pid_file "$1")"
    [ -f "$f" ] || return 1
    pid="$(tr -dc '0-9' <"$f")"
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 1
    # Only a process we started: a reused pid is someone else's.
    grep -qa -- "$DIR" "/proc/$pid/environ" "/proc/$pid/cmdline" 2>/dev/null || return 1
    echo "$pid"
}

# launch NAME CMD...: starts CMD detached, logging, with its pid recorded.
launch() {
    local name="$1"
    shift
    mkdir -p "$DIR/pids" "$DIR/logs"
    echo "==== $(date -u +%FT%TZ) starting $name" >>"$DIR/logs/$name.log"
    YMERA_CLUSTER_PROCESS="$DIR/$name" setsid "$@" \
        >>"$DIR/logs/$name.log" 2>&1 </dev/null &
    echo $! >"$(pid_file "$name")"
}

start_nats() {
    local name="$1" n routes=()
    for n in 1 2 3; do routes+=("nats-route://127.0.0.1:$(route_port "nats-$n")"); done
    mkdir -p "$DIR/$name"
    cat >"$DIR/$name.conf" <<EOF
server_name: $name
listen: 127.0.0.1:$(port "$name")
http: 127.0.0.1:$(monitor_port "$name")
jetstream {
    store_dir: "$DIR/$name"
}
cluster {
    name: ymera
    listen: 127.0.0.1:$(route_port "$name")
    routes: [$(IFS=,; echo "${routes[*]}")]
}
EOF
    launch "$name" "$NATS_BIN" -c "$DIR/$name.conf"
}

start_ymera() {
    local name="$1" role="${1%-[0-9]}"
    # Each query process keeps a search index of its own (kept across a
    # restart, so the copy resumes it rather than reading the whole log).
    mkdir -p "$DIR/$name"
    launch "$name" env \
        YMERA_NATS_URL="$(nats_urls)" \
        YMERA_STREAM_REPLICAS=3 \
        YMERA_PARTITIONS="${PARTITIONS:-4}" \
        YMERA_DATABASE_URL="$DATABASE_URL" \
        YMERA_BIND="127.0.0.1:$(port "$name")" \
        YMERA_SEARCH_DIR="$DIR/$name/search" \
        YMERA_JWT_SECRET="$JWT_SECRET" \
        YMERA_ADMIN_USERNAME="$ADMIN_USERNAME" \
        YMERA_ADMIN_PASSWORD="$ADMIN_PASSWORD" \
        YMERA_TRUST_FORWARDED_FOR=true \
        RUST_LOG="${RUST_LOG:-info}" \
        "$BIN" "$role"
}

start_nginx() {
    mkdir -p "$DIR/nginx/logs"
    # Workers run unprivileged when nginx starts as root: they must reach
    # their temporary files under $DIR.
    chmod 755 "$DIR" "$DIR/nginx"
    write_nginx_conf >"$DIR/nginx/nginx.conf"
    nginx -t -q -p "$DIR/nginx" -c "$DIR/nginx/nginx.conf" || die "nginx refused its configuration"
    launch nginx nginx -p "$DIR/nginx" -c "$DIR/nginx/nginx.conf" -g 'daemon off;'
}

# The routing of deploy/nginx.conf, on loopback ports. Upstreams are checked
# passively (open-source nginx has no active checks): a copy that refuses a
# connection or fails is skipped for `fail_timeout`, and the request goes to
# the other copy, a write only if it never reached the first.
write_nginx_conf() {
    local c q
    c="$(port command-api-1) $(port command-api-2)"
    q="$(port query-api-1) $(port query-api-2)"
    cat <<EOF
worker_processes 1;
pid $DIR/nginx/nginx.pid;
error_log $DIR/logs/nginx.error.log warn;
events { worker_connections 1024; }
http {
    server_tokens off;
    default_type application/octet-stream;
    access_log $DIR/logs/nginx.access.log;
    client_body_temp_path $DIR/nginx/body;
    proxy_temp_path $DIR/nginx/proxy;
    fastcgi_temp_path $DIR/nginx/fastcgi;
    uwsgi_temp_path $DIR/nginx/uwsgi;
    scgi_temp_path $DIR/nginx/scgi;

    upstream command_api {
$(for p in $c; do echo "        server 127.0.0.1:$p max_fails=1 fail_timeout=2s;"; done)
        keepalive 16;
    }
    upstream query_api {
$(for p in $q; do echo "        server 127.0.0.1:$p max_fails=1 fail_timeout=2s;"; done)
        keepalive 16;
    }
$(nginx_routes)
}
EOF
}

# The server block shared with deploy/nginx.conf (kept identical by hand:
# the compose file names its upstreams the same way).
nginx_routes() {
    sed -n '/^    # --- routes: begin/,/^    # --- routes: end/p' "$ROOT/deploy/nginx.conf" \
        | sed "s/listen 80;/listen 127.0.0.1:$PORT_BASE;/"
}

# stop NAME: TERM, then KILL after 10 s.
stop() {
    local pid
    pid="$(alive "$1")" || { rm -f "$(pid_file "$1")"; return 0; }
    kill -CONT "$pid" 2>/dev/null || true
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    rm -f "$(pid_file "$1")"
}

start() {
    case "$1" in
        nats-*) start_nats "$1" ;;
        nginx) start_nginx ;;
        *) start_ymera "$1" ;;
    esac
}

healthy() { curl -fsS -o /dev/null --max-time 2 "$(health_url "$1")" 2>/dev/null; }

# wait_healthy NAME...: until each answers, or fail with its log's tail.
wait_healthy() {
    local name deadline=$((SECONDS + 90))
    for name in "$@"; do
        until healthy "$name"; do
            if ! alive "$name" >/dev/null; then
                tail -n 20 "$DIR/logs/$name.log" >&2 || true
                die "$name exited; its log: $DIR/logs/$name.log"
            fi
            [ "$SECONDS" -lt "$deadline" ] || die "$name not healthy after 90 s; its log: $DIR/logs/$name.log"
            sleep 0.2
        done
    done
}

load_settings() {
    [ -f "$SETTINGS" ] || die "no cluster in $DIR (run: $0 up)"
    # shellcheck source=/dev/null
    . "$SETTINGS"
}

# --- commands ----------------------------------------------------------------

up() {
    if [ -f "$SETTINGS" ]; then
        load_settings
    else
        PORT_BASE="${YMERA_CLUSTER_PORT_BASE:-18080}"
        DB="${YMERA_CLUSTER_DB:-ymera_cluster}"
        [[ "$DB" =~ ^[a-z_][a-z0-9_]*$ ]] || die "YMERA_CLUSTER_DB must be a plain lower-case name"
        PARTITIONS="${YMERA_CLUSTER_PARTITIONS:-4}"
        [[ "$PARTITIONS" =~ ^[1-9][0-9]?$ ]] || die "YMERA_CLUSTER_PARTITIONS must be 1 to 64"
        local admin_url="${YMERA_DATABASE_URL:-}"
        if [ -z "$admin_url" ]; then
            "$ROOT/scripts/setup.sh"
            # shellcheck source=/dev/null
            admin_url="$(. "$ROOT/.data/env" && echo "$YMERA_DATABASE_URL")"
        fi
        command -v nginx >/dev/null 2>&1 || install_nginx
        NATS_BIN="${YMERA_CLUSTER_NATS_BIN:-$ROOT/.data/venv/bin/nats-server}"
        [ -x "$NATS_BIN" ] || "$ROOT/scripts/setup.sh"
        BIN="${YMERA_BIN:-}"
        if [ -z "$BIN" ]; then
            log "building ymera (release)"
            (cd "$ROOT" && cargo build --release -q -p ymera)
            BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release/ymera"
        fi
        [ -x "$BIN" ] || die "no ymera binary at $BIN"
        local p
        for p in $(seq "$PORT_BASE" $((PORT_BASE + 33))); do
            if (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
                die "port $p is taken; choose another YMERA_CLUSTER_PORT_BASE"
            fi
        done
        psql "$admin_url" -qAtc "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null
        psql "$admin_url" -qAtc "CREATE DATABASE $DB" >/dev/null
        DATABASE_URL="$(printf '%s' "$admin_url" | sed -E "s#/[^/?]*(\\?|\$)#/$DB\\1#")"
        ADMIN_URL="$admin_url"
        JWT_SECRET="$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')"
        ADMIN_USERNAME="${YMERA_ADMIN_USERNAME:-admin}"
        ADMIN_PASSWORD="${YMERA_ADMIN_PASSWORD:-$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')}"
        mkdir -p "$DIR"
        local v
        for v in PORT_BASE DB PARTITIONS DATABASE_URL ADMIN_URL NATS_BIN BIN JWT_SECRET ADMIN_USERNAME ADMIN_PASSWORD; do
            printf '%s=%q\n' "$v" "${!v}"
        done >"$SETTINGS"
        chmod 600 "$SETTINGS"
    fi
    local name
    for name in nats-1 nats-2 nats-3; do alive "$name" >/dev/null || start "$name"; done
    wait_healthy nats-1 nats-2 nats-3
    # The first command-api creates the R3 stream and applies the migrations
    # before the others start.
    alive command-api-1 >/dev/null || start command-api-1
    wait_healthy command-api-1
    for name in command-api-2 query-api-1 query-api-2 projector-1 projector-2 nginx; do
        alive "$name" >/dev/null || start "$name"
    done
    wait_healthy "${NAMES[@]}"
    {
        echo "YMERA_URL=http://127.0.0.1:$PORT_BASE"
        echo "YMERA_ADMIN_USERNAME=$ADMIN_USERNAME"
        echo "YMERA_ADMIN_PASSWORD=$ADMIN_PASSWORD"
    } >"$DIR/env"
    log "up: http://127.0.0.1:$PORT_BASE (credentials in $DIR/env)"
}

install_nginx() {
    [ "$(id -u)" = 0 ] || die "nginx is missing; run as root or: sudo apt-get install -y nginx"
    log "apt-get install nginx"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx >/dev/null
}

status() {
    load_settings
    local name pid health lease
    printf '%-14s %-8s %-10s %s\n' NAME PID HEALTH PARTITIONS
    for name in "${NAMES[@]}"; do
        pid="$(alive "$name")" || pid=-
        if [ "$pid" = - ]; then
            health=down
        elif healthy "$name"; then
            health=ok
        else
            health=unhealthy
        fi
        lease=
        if [[ "$name" == projector-* ]] && [ "$pid" != - ]; then
            # The partitions whose leases this projector holds (by index),
            # or `standby` while it holds none.
            lease="$(curl -fsS --max-time 2 "http://127.0.0.1:$(port "$name")/health" 2>/dev/null \
                | grep -o '"partitions":\[[0-9,]*\]' | cut -d: -f2 | tr -d '[]')" || true
            lease="${lease:-standby}"
        fi
        printf '%-14s %-8s %-10s %s\n' "$name" "$pid" "$health" "$lease"
    done
    # Each partition's checkpoint and owner, from PostgreSQL itself: the
    # session holding the partition's lease names its process's pid.
    echo
    printf '%-14s %-12s %s\n' PARTITION CHECKPOINT OWNER
    local rows part seq owner who
    rows="$(psql "$DATABASE_URL" -qAt -F ' ' -c "SELECT name, last_seq, coalesce((SELECT a.application_name
        FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
        WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2
          AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
          AND l.classid::int8 = $((0x796d6c73)) AND l.objid::int8 = (hashtext(c.name)::int8 & 4294967295)
        LIMIT 1), '-') FROM ymera_read.projector_checkpoint c WHERE name = 'main' OR name LIKE 'main:%'
        ORDER BY length(name), name" 2>/dev/null)" || { echo "(PostgreSQL unreachable)"; return 0; }
    while read -r part seq owner; do
        [ -n "$part" ] || continue
        who=-
        if [[ "$owner" =~ pid\ ([0-9]+)$ ]]; then
            who="pid ${BASH_REMATCH[1]}"
            for name in projector-1 projector-2; do
                [ "$(alive "$name")" = "${BASH_REMATCH[1]}" ] && who="$name"
            done
        fi
        printf '%-14s %-12s %s\n' "$part" "$seq" "$who"
    done <<<"$rows"
}

down() {
    [ -d "$DIR" ] || { log "no cluster in $DIR"; return 0; }
    local name i
    if [ -f "$SETTINGS" ]; then
        load_settings
        for ((i = ${#NAMES[@]} - 1; i >= 0; i--)); do stop "${NAMES[$i]}"; done
        psql "$ADMIN_URL" -qAtc "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null \
            || log "could not drop database $DB"
    fi
    rm -rf "$DIR"
    log "down"
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    status) status ;;
    restart)
        [ -n "${2:-}" ] || die "usage: $0 restart NAME"
        load_settings
        port "$2" >/dev/null
        stop "$2"
        start "$2"
        wait_healthy "$2"
        log "restarted $2"
        ;;
    *) die "usage: $0 up|down|status|restart NAME" ;;
esac
