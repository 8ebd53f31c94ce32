# Sourced by .ci/run: start_postgres starts a throwaway PostgreSQL 15 cluster (Debian's package)
# in a temporary folder, listening on 127.0.0.1 and a socket in that folder only, exports its
# URL as MEDTL_TEST_PG_URL for the tests, and stops and deletes it when the shell exits.
# PostgreSQL refuses to run as root, so as root the cluster belongs to a system user medtl-ci.
PG_BIN=${PG_BIN:-/usr/lib/postgresql/15/bin}

start_postgres() {
    if [ ! -x "$PG_BIN/initdb" ] && [ "$(id -u)" = 0 ]; then
        apt-get update -qq && apt-get install -y -qq postgresql-15 >/dev/null || true
    fi
    if [ ! -x "$PG_BIN/initdb" ]; then
        echo "PostgreSQL 15 not found in $PG_BIN: the PostgreSQL tests will be skipped" >&2
        return 0
    fi
    local as=() port
    PG_DIR=$(mktemp -d /tmp/medtl-pg.XXXXXX)
    if [ "$(id -u)" = 0 ]; then
        id medtl-ci >/dev/null 2>&1 || useradd --system --no-create-home --shell /usr/sbin/nologin medtl-ci
        chown medtl-ci "$PG_DIR"
        as=(runuser -u medtl-ci --)
    fi
    port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    "${as[@]}" "$PG_BIN/initdb" -D "$PG_DIR/data" -U medtl -A trust --no-sync >"$PG_DIR/initdb.log" 2>&1
    "${as[@]}" "$PG_BIN/pg_ctl" -D "$PG_DIR/data" -l "$PG_DIR/server.log" -w -o \
        "-c listen_addresses=127.0.0.1 -p $port -k $PG_DIR -c fsync=off -c max_connections=200" start >/dev/null
    trap stop_postgres EXIT
    "${as[@]}" "$PG_BIN/createdb" -h 127.0.0.1 -p "$port" -U medtl medtl
    export MEDTL_TEST_PG_URL="postgresql://medtl@127.0.0.1:$port/medtl"
    echo "PostgreSQL for the tests: $MEDTL_TEST_PG_URL" >&2
}

stop_postgres() {
    local as=()
    [ "$(id -u)" = 0 ] && as=(runuser -u medtl-ci --)
    "${as[@]}" "$PG_BIN/pg_ctl" -D "$PG_DIR/data" -m immediate stop >/dev/null 2>&1 || true
    rm -rf "$PG_DIR"
}
