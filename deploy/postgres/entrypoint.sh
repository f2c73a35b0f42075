#!/bin/sh
# First start: a cluster whose superuser is $POSTGRES_USER, with the password read from
# $POSTGRES_PASSWORD_FILE (a secret, never an environment variable) and database $POSTGRES_DB.
# Every start: PostgreSQL in the foreground as `postgres`, password logins from the network.
set -eu
user=${POSTGRES_USER:-trimo}
db=${POSTGRES_DB:-trimo}
as_postgres() { setpriv --reuid=postgres --regid=postgres --init-groups "$@"; }

chown postgres:postgres "$PGDATA"
chmod 0700 "$PGDATA"
if [ ! -s "$PGDATA/PG_VERSION" ]; then
    file=${POSTGRES_PASSWORD_FILE:-}
    if [ -z "$file" ] || [ ! -s "$file" ]; then
        echo "trimo-postgres: POSTGRES_PASSWORD_FILE must name a non-empty file (the database password)" >&2
        exit 1
    fi
    pwfile=$(mktemp)
    # initdb takes the first line only; a trailing newline in the secret file is not part of it.
    head -n 1 "$file" | tr -d '\r\n' >"$pwfile"
    chown postgres "$pwfile"
    as_postgres initdb --pgdata="$PGDATA" --username="$user" --pwfile="$pwfile" \
        --auth-local=peer --auth-host=scram-sha-256 --encoding=UTF8 >/dev/null
    rm -f "$pwfile"
    echo "CREATE DATABASE \"$db\" OWNER \"$user\";" \
        | as_postgres postgres --single -D "$PGDATA" postgres >/dev/null
    # Containers of the compose network reach it by name; the password is still required.
    echo "host all all all scram-sha-256" >>"$PGDATA/pg_hba.conf"
    echo "trimo-postgres: made the cluster in $PGDATA (user $user, database $db)"
fi
exec setpriv --reuid=postgres --regid=postgres --init-groups \
    postgres -D "$PGDATA" -c listen_addresses='*'
