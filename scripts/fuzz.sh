#!/usr/bin/env bash
# Fuzzes the API against its own OpenAPI spec with Schemathesis.
#
#   ./scripts/fuzz.sh
#
# With scripts/with-ymera.sh (a disposable `ymera all`, rate limits off),
# logs in as the admin and runs `schemathesis run` against
# $YMERA_HOST/api/v1/openapi.json with that token. Every response must be no
# 5xx (not_a_server_error) and conform to the spec: status code, content type,
# headers and body schema; schema-valid requests must be accepted
# (positive_data_acceptance) unless the server refuses them for a reason of
# state the spec cannot express (tests/fuzz/hooks.py lists those, precisely).
# The live feeds (/api/v1/ws, /api/v1/events/stream) are excluded: they
# stream until the client leaves, which a request/response fuzzer cannot do.
#
# When the only errors of a run are crashes of the Hypothesis engine itself
# (tests/fuzz/engine_errors.py tells them apart), each operation it crashed
# on is fuzzed again on its own, up to twice, and that run's result counts:
# such a crash says nothing about the API but cut its fuzzing short.
#
# Exits non-zero on any failure; the last line is the summary
# `fuzz: N test cases, F failures`. Reports (JUnit, NDJSON, the output,
# ymera's log) go to fuzz-results/<UTC timestamp>.
#
# Installs Schemathesis (pinned in tests/fuzz/requirements.txt) into
# .data/venv when missing. Knobs: YMERA_FUZZ_MAX_EXAMPLES (per operation and
# phase; 40), YMERA_FUZZ_MAX_TIME (seconds for the Schemathesis run; 75),
# YMERA_FUZZ_WORKERS (2), YMERA_FUZZ_SEED (random), YMERA_FUZZ_OUT.
# YMERA_FUZZ_HOST with YMERA_ADMIN_PASSWORD fuzzes a YMERA already running
# there instead (writes data into it!).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
cd "$ROOT"

log() { printf 'fuzz: %s\n' "$*"; }
die() { printf 'fuzz: ERROR: %s\n' "$*" >&2; exit 2; }

VENV="$ROOT/.data/venv"
REQS="$ROOT/tests/fuzz/requirements.txt"

# ------------------------------------------------- inside: against YMERA_HOST
if [ "${1:-}" = "--inside" ]; then
    : "${YMERA_HOST:?}" "${YMERA_ADMIN_PASSWORD:?}" "${YMERA_FUZZ_OUT:?}"
    mkdir -p "$YMERA_FUZZ_OUT"
    TOKEN="$("$VENV/bin/python" - "$YMERA_HOST" "${YMERA_ADMIN_USERNAME:-admin}" <<'EOF'
import json, os, sys, urllib.request
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
body = json.dumps({"username": sys.argv[2], "password": os.environ["YMERA_ADMIN_PASSWORD"]}).encode()
req = urllib.request.Request(sys.argv[1] + "/api/v1/auth/login", data=body,
                             headers={"content-type": "application/json"})
with opener.open(req, timeout=30) as r:
    print(json.load(r)["access_token"])
EOF
)" || die "cannot log in as ${YMERA_ADMIN_USERNAME:-admin} on $YMERA_HOST"

    seed=()
    [ -n "${YMERA_FUZZ_SEED:-}" ] && seed=(--seed "$YMERA_FUZZ_SEED")
    # Run from the report folder: Schemathesis keeps its cache (.schemathesis)
    # in the working directory, and it belongs with the reports, not in the tree.
    cd "$YMERA_FUZZ_OUT"
    # st LOG ARGS...: one Schemathesis run with every check, output in LOG.
    st() {
        local log="$1"; shift
        # Loopback only: keep any proxy settings of the environment out of the way.
        env -u HTTP_PROXY -u HTTPS_PROXY -u http_proxy -u https_proxy NO_PROXY='*' no_proxy='*' \
            PYTHONPATH="$ROOT/tests/fuzz${PYTHONPATH:+:$PYTHONPATH}" SCHEMATHESIS_HOOKS=hooks \
        "$VENV/bin/python" -m schemathesis.cli --no-color run \
            "$YMERA_HOST/api/v1/openapi.json" \
            -H "Authorization: Bearer $TOKEN" \
            --exclude-path /api/v1/ws --exclude-path /api/v1/events/stream \
            --checks not_a_server_error,status_code_conformance,content_type_conformance,response_headers_conformance,response_schema_conformance,positive_data_acceptance \
            --max-examples "${YMERA_FUZZ_MAX_EXAMPLES:-40}" \
            --workers "${YMERA_FUZZ_WORKERS:-2}" \
            --request-timeout 15 \
            "$@" 2>&1 | tee "$YMERA_FUZZ_OUT/$log"
        return "${PIPESTATUS[0]}"
    }
    set +e
    st schemathesis.log \
        --phases examples,fuzzing,stateful \
        --max-time "${YMERA_FUZZ_MAX_TIME:-75}" \
        --report junit,ndjson --report-dir "$YMERA_FUZZ_OUT" \
        "${seed[@]}"
    rc=$?
    set -e
    # A run with no check failure whose only errors are defects of the
    # Hypothesis engine itself (tests/fuzz/engine_errors.py) fuzzes each of
    # those operations again, up to twice, and its result stands for theirs:
    # the engine's crash cut their fuzzing short and says nothing of the API.
    failed="$(sed -n 's/^=* \([0-9][0-9]*\) failures\{0,1\}\b.*/\1/p' schemathesis.log | tail -n1)"
    if [ "$rc" != 0 ] && [ "${failed:-0}" = 0 ] \
        && ops="$("$VENV/bin/python" "$ROOT/tests/fuzz/engine_errors.py" schemathesis.log)" \
        && [ -n "$ops" ]; then
        rc=0
        n=0
        while IFS= read -r op; do
            n=$((n + 1))
            for attempt in 1 2; do
                printf 'fuzz: the Hypothesis engine crashed while fuzzing %s; fuzzing it again (%s of 2)\n' "$op" "$attempt" \
                    | tee -a engine-retries.txt
                set +e
                st "engine-retry-$n-$attempt.log" --include-name "$op" --phases examples,fuzzing --max-time 30
                op_rc=$?
                set -e
                [ "$op_rc" = 0 ] && { echo "fuzz: $op passed on its own run" | tee -a engine-retries.txt; break; }
                again="$("$VENV/bin/python" "$ROOT/tests/fuzz/engine_errors.py" "engine-retry-$n-$attempt.log" || true)"
                failed="$(sed -n 's/^=* \([0-9][0-9]*\) failures\{0,1\}\b.*/\1/p' "engine-retry-$n-$attempt.log" | tail -n1)"
                # Anything but the engine's crash again is a failure of ours.
                if [ "$attempt" = 2 ] || [ "${failed:-0}" != 0 ] || [ "$again" != "$op" ]; then
                    rc=$op_rc
                    break
                fi
            done
        done <<<"$ops"
    fi
    exit "$rc"
fi

# ------------------------------------------------------------- Schemathesis
ST_VERSION="$(sed -n 's/^schemathesis==//p' "$REQS")"
if ! "$VENV/bin/python" -m schemathesis.cli --version 2>/dev/null | grep -q "version $ST_VERSION\$"; then
    mkdir -p "$ROOT/.data"
    if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c 'import pip' >/dev/null 2>&1; then
        rm -rf "$VENV"
        python3 -m venv "$VENV" || die "python3 -m venv failed (on Debian: apt-get install python3-venv)"
    fi
    log "installing Schemathesis $ST_VERSION into .data/venv"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-input -r "$REQS" \
        || die "pip install -r tests/fuzz/requirements.txt failed"
fi

# -------------------------------------------------------------------- run
started=$SECONDS
export YMERA_FUZZ_OUT="${YMERA_FUZZ_OUT:-$ROOT/fuzz-results/$(date -u +%Y%m%dT%H%M%SZ)}"
mkdir -p "$YMERA_FUZZ_OUT"
YMERA_FUZZ_OUT="$(cd "$YMERA_FUZZ_OUT" && pwd -P)"
set +e
if [ -n "${YMERA_FUZZ_HOST:-}" ]; then
    YMERA_HOST="${YMERA_FUZZ_HOST%/}" "$0" --inside
else
    # Rate limits off: the fuzzer is one client sending thousands of requests.
    YMERA_RATE_LIMIT_PER_USER=0 YMERA_RATE_LIMIT_PER_IP=0 YMERA_LOGIN_ATTEMPTS_PER_MINUTE=100000 \
    YMERA_WITH_LOG_PREFIX=fuzz YMERA_WITH_KEEP_LOGS="$YMERA_FUZZ_OUT" \
        ./scripts/with-ymera.sh "$0" --inside
fi
rc=$?
set -e

# Schemathesis's own summary: "Test cases:" then "  N generated, ..." and
# a last line "== F failures, ... in 61.2s ==" (or "== N passed ... ==").
out="$YMERA_FUZZ_OUT/schemathesis.log"
cases="$(sed -n '/^Test cases:/{n;s/^ *\([0-9][0-9]*\) generated.*/\1/p}' "$out" 2>/dev/null | tail -n1)"
failures="$(sed -n 's/^=* \([0-9][0-9]*\) failures\{0,1\}\b.*/\1/p' "$out" 2>/dev/null | tail -n1)"
errors="$(sed -n 's/^=* .*\b\([0-9][0-9]*\) errors\{0,1\}\b.*/\1/p' "$out" 2>/dev/null | tail -n1)"
[ -n "$cases" ] || cases=0
[ -n "$failures" ] || failures=0
[ "$rc" = 0 ] || [ "$failures" != 0 ] || failures="unknown (exit $rc)"
extra=""
[ -n "$errors" ] && [ "$errors" != 0 ] && extra=", $errors errors"
[ -s "$YMERA_FUZZ_OUT/engine-retries.txt" ] \
    && extra="$extra, $(grep -c 'fuzzing it again' "$YMERA_FUZZ_OUT/engine-retries.txt") reruns after a crash of the Hypothesis engine (engine-retries.txt)"
[ "$cases" != 0 ] || { log "Schemathesis ran no test case"; rc=1; }
echo "fuzz: $cases test cases, $failures failures$extra ($((SECONDS - started)) s; reports in ${YMERA_FUZZ_OUT#"$ROOT"/})"
[ "$rc" = 0 ] || exit 1
