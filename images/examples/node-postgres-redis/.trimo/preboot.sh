#!/bin/bash
# Starts Postgres and Redis, and returns only once both accept connections.
set -euo pipefail

READY_SECONDS=30

# Runs a probe once a second until it succeeds; on timeout prints the service's log tail so the
# run's report says why the service is not up.
wait_until_ready() {
    local name=$1 log=$2
    shift 2
    local deadline=$((SECONDS + READY_SECONDS))
    until "$@" >/dev/null 2>&1; do
        if ((SECONDS >= deadline)); then
            echo "preboot: $name did not accept connections within ${READY_SECONDS}s; last log lines:" >&2
            tail -n 20 "$log" >&2 || true
            return 1
        fi
        sleep 1
    done
    echo "preboot: $name is ready"
}

redis_answers() {
    [[ "$(redis-cli -h localhost -p 6379 ping)" == "PONG" ]]
}

service postgresql start
service redis-server start

wait_until_ready postgres /var/log/postgresql/postgresql-15-main.log \
    pg_isready --quiet --host=localhost --port=5432
wait_until_ready redis /var/log/redis/redis-server.log redis_answers
