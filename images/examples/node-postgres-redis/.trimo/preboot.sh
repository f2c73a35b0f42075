#!/bin/bash
# Starts Postgres and Redis, and returns only once both accept connections.
# trimo-wait (from the base image) prints the service's last log lines if it never does.
set -euo pipefail

service postgresql start
service redis-server start

trimo-wait postgres /var/log/postgresql/postgresql-15-main.log \
    pg_isready --quiet --host=localhost --port=5432
trimo-wait redis /var/log/redis/redis-server.log redis-cli -h localhost -p 6379 ping
