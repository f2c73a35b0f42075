#!/bin/bash
# Starts Postgres and returns only once it accepts connections.
# trimo-wait (from the base image) prints the service's last log lines if it never does.
set -euo pipefail

service postgresql start
trimo-wait postgres /var/log/postgresql/postgresql-15-main.log \
    pg_isready --quiet --host=localhost --port=5432
