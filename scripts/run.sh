#!/usr/bin/env bash
# Starts the servers (scripts/setup.sh), then runs the whole YMERA system
# (`ymera all`) in dev mode. Extra arguments go to `ymera all`.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
cd "$ROOT"

./scripts/setup.sh
# shellcheck source=/dev/null
. ./.data/env
export YMERA_NATS_URL YMERA_DATABASE_URL
# Dev mode: the binary generates and prints the first admin password.
if [ -z "${YMERA_DEV+set}" ]; then
    export YMERA_DEV=1
fi

exec cargo run --release -p ymera -- all "$@"
