#!/bin/bash
# Starts Postgres, Redis and a Celery worker, and returns only once all three answer.
# trimo-wait (from the base image) prints the service's last log lines if it never does.
set -euo pipefail

WORKSPACE=/workspace
WORKER_LOG=/var/log/celery/worker.log

service postgresql start
service redis-server start
trimo-wait postgres /var/log/postgresql/postgresql-15-main.log \
    pg_isready --quiet --host=localhost --port=5432
trimo-wait redis /var/log/redis/redis-server.log redis-cli -h localhost -p 6379 ping

# The worker runs as the agent user: it executes the repository's code, which the agent edits, so
# it gets no more rights than the agent has. watchmedo restarts it when a .py file changes, so the
# tests after the agent's work exercise the edited tasks, not the ones loaded at boot.
# setsid and the redirections detach it from preboot, which must exit for the run to go on.
# The login shell gives the worker the same environment (/etc/profile.d/trimo.sh) as the tests.
setsid --fork runuser --login agent --command "cd $WORKSPACE && exec watchmedo auto-restart \
    --directory=. --recursive --patterns='*.py' --ignore-directories --signal=SIGTERM \
    -- python3 -m celery --app config worker --loglevel=INFO --concurrency=2 --hostname=trimo@%h" \
    >>"$WORKER_LOG" 2>&1 </dev/null
trimo-wait "celery worker" "$WORKER_LOG" runuser --login agent --command \
    "cd $WORKSPACE && python3 -m celery --app config inspect ping --timeout 2"
