#!/usr/bin/env bash
# An MLflow tracking server on PostgreSQL, for many jobs on many nodes (SQLite on a shared
# file system is refused: docs/cluster.md). Needs Debian's `postgresql` package and
# `pip install -e ".[server]"` (psycopg2-binary).
#
#   scripts/tracking-server.sh start     # PostgreSQL + `mlflow server`; prints the URI to export
#   scripts/tracking-server.sh restart   # the MLflow server only (PostgreSQL keeps running)
#   scripts/tracking-server.sh stop      # both
#   scripts/tracking-server.sh status
#
# Settings (environment): SSLPIPE_SERVER_DIR (default ./outputs/tracking-server: the database
# cluster, artefacts, logs, pid files), SSLPIPE_SERVER_HOST (127.0.0.1: loopback only; 0.0.0.0
# to serve the cluster's nodes), SSLPIPE_SERVER_PORT (5000), SSLPIPE_PG_PORT (5433),
# SSLPIPE_SERVER_AUTH=1 for MLflow's basic-auth app (users in <dir>/basic_auth.db; the admin
# password is MLflow's default until you change it). Jobs find the server through
# MLFLOW_TRACKING_URI=http://<host>:<port>; artefacts go through it (--serve-artifacts).
set -euo pipefail

DIR=$(realpath -m "${SSLPIPE_SERVER_DIR:-outputs/tracking-server}")
HOST=${SSLPIPE_SERVER_HOST:-127.0.0.1}
PORT=${SSLPIPE_SERVER_PORT:-5000}
PG_PORT=${SSLPIPE_PG_PORT:-5433}
PG_BIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1 || true)
PYTHON=${SSLPIPE_PYTHON:-python3}

die() { echo "tracking-server: $*" >&2; exit 1; }
[ -n "$PG_BIN" ] || die "PostgreSQL is not installed (Debian: apt-get install postgresql)"

# PostgreSQL refuses to run as root: as root, the database runs as Debian's `postgres` user,
# in a folder of its own (it may not be able to enter $DIR's parents).
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
if [ "$(id -u)" = 0 ]; then
    PGDATA=${SSLPIPE_PG_DIR:-/var/lib/postgresql/sslpipe/$(echo "$DIR" | md5sum | cut -c1-12)}
else
    PGDATA=${SSLPIPE_PG_DIR:-$DIR/pg}
fi

pg_start() {
    mkdir -p "$DIR"
    if [ ! -f "$PGDATA/PG_VERSION" ]; then
        mkdir -p "$PGDATA"
        if [ "$(id -u)" = 0 ]; then chown -R postgres "$(dirname "$PGDATA")"; fi
        as_pg "$PG_BIN/initdb" -D "$PGDATA" -U mlflow --auth=trust >"$DIR/initdb.log" 2>&1 \
            || die "initdb failed; see $DIR/initdb.log"
    fi
    if ! as_pg "$PG_BIN/pg_ctl" -D "$PGDATA" status >/dev/null 2>&1; then
        as_pg "$PG_BIN/pg_ctl" -D "$PGDATA" -l "$PGDATA/postgres.log" -w \
            -o "-p $PG_PORT -c listen_addresses=127.0.0.1 -k $PGDATA -c max_connections=200" start >/dev/null \
            || die "PostgreSQL did not start; see $PGDATA/postgres.log"
    fi
    as_pg "$PG_BIN/psql" -h 127.0.0.1 -p "$PG_PORT" -U mlflow -d postgres -tAc \
        "SELECT 1 FROM pg_database WHERE datname='mlflow'" | grep -q 1 \
        || as_pg "$PG_BIN/createdb" -h 127.0.0.1 -p "$PG_PORT" -U mlflow mlflow
}

server_start() {
    mkdir -p "$DIR/artifacts"
    local app=() store="postgresql+psycopg2://mlflow@127.0.0.1:$PG_PORT/mlflow"
    if [ "${SSLPIPE_SERVER_AUTH:-0}" = 1 ]; then
        app=(--app-name basic-auth)
        export MLFLOW_AUTH_CONFIG_PATH="$DIR/basic_auth.ini"
        printf '[mlflow]\ndefault_permission = READ\ndatabase_uri = sqlite:///%s/basic_auth.db\nadmin_username = admin\nadmin_password = password1234\nauthorization_function = mlflow.server.auth:authenticate_request_basic_auth\n' "$DIR" >"$MLFLOW_AUTH_CONFIG_PATH"
    fi
    nohup "$PYTHON" -m mlflow server --backend-store-uri "$store" --artifacts-destination "$DIR/artifacts" \
        --serve-artifacts --host "$HOST" --port "$PORT" --workers 4 "${app[@]}" >>"$DIR/server.log" 2>&1 &
    echo $! >"$DIR/server.pid"
    for _ in $(seq 1 120); do
        if "$PYTHON" -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:$PORT/health', timeout=2)" 2>/dev/null; then
            echo "MLflow server up: export MLFLOW_TRACKING_URI=http://$HOST:$PORT (store: PostgreSQL on port $PG_PORT, files: $DIR)"
            return 0
        fi
        kill -0 "$(cat "$DIR/server.pid")" 2>/dev/null || die "mlflow server exited; see $DIR/server.log"
        sleep 0.5
    done
    die "mlflow server did not answer on port $PORT within 60 s; see $DIR/server.log"
}

server_stop() {
    [ -f "$DIR/server.pid" ] || return 0
    local pid; pid=$(cat "$DIR/server.pid")
    # the server's workers are its process group's children: stop them all
    pkill -TERM -P "$pid" 2>/dev/null || true
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
    pkill -KILL -P "$pid" 2>/dev/null || true
    kill -KILL "$pid" 2>/dev/null || true
    # a port still held by an orphaned worker would stop the next start
    for _ in $(seq 1 40); do
        "$PYTHON" -c "import socket,sys; s=socket.socket(); sys.exit(s.connect_ex(('127.0.0.1', $PORT)) != 0)" || break
        sleep 0.25
    done
    rm -f "$DIR/server.pid"
}

case "${1:-}" in
    start) pg_start; server_start ;;
    restart) server_stop; server_start ;;
    stop) server_stop; as_pg "$PG_BIN/pg_ctl" -D "$PGDATA" -m fast stop >/dev/null 2>&1 || true; echo "stopped" ;;
    status)
        as_pg "$PG_BIN/pg_ctl" -D "$PGDATA" status >/dev/null 2>&1 && echo "PostgreSQL: running (port $PG_PORT)" || echo "PostgreSQL: stopped"
        [ -f "$DIR/server.pid" ] && kill -0 "$(cat "$DIR/server.pid")" 2>/dev/null \
            && echo "MLflow server: running (http://$HOST:$PORT)" || echo "MLflow server: stopped" ;;
    *) echo "usage: $0 start|restart|stop|status" >&2; exit 2 ;;
esac
