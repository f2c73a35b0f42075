#!/bin/bash
# Starts Postgres, Redis and a Celery worker, and returns only once all three answer.
set -euo pipefail

READY_SECONDS=60
WORKSPACE=/workspace
WORKER_LOG=/var/log/celery/worker.log

# Runs a probe once a second until it succeeds; on timeout prints the service's log tail so the
# run's report says why the service is not up.
wait_until_ready() {
    local name=$1 log=$2
    shift 2
    local deadline=$((SECONDS + READY_SECONDS))
    until "$@" >/dev/null 2>&1; do
        if ((SECONDS >= deadline)); then
            echo "preboot: $name did not answer within ${READY_SECONDS}s; last log lines:" >&2
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

# The login shell gives the worker the same environment (/etc/profile.d/trimo.sh) as the tests.
as_agent() {
    runuser --login agent --command "cd $WORKSPACE && $1"
}

worker_answers() {
    as_agent "python3 -m celery --app config inspect ping --timeout 2"
}

service postgresql start
service redis-server start
wait_until_ready postgres /var/log/postgresql/postgresql-15-main.log \
    pg_isready --quiet --host=localhost --port=5432
wait_until_ready redis /var/log/redis/redis-server.log redis_answers

# The worker runs as the agent user: it executes the repository's code, which the agent edits, so
# it gets no more rights than the agent has. watchmedo restarts it when a .py file changes, so the
# tests after the agent's work exercise the edited tasks, not the ones loaded at boot.
# setsid and the redirections detach it from preboot, which must exit for the run to go on.
setsid --fork runuser --login agent --command "cd $WORKSPACE && exec watchmedo auto-restart \
    --directory=. --recursive --patterns='*.py' --ignore-directories --signal=SIGTERM \
    -- python3 -m celery --app config worker --loglevel=INFO --concurrency=2 --hostname=trimo@%h" \
    >>"$WORKER_LOG" 2>&1 </dev/null
wait_until_ready "celery worker" "$WORKER_LOG" worker_answers
