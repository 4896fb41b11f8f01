#!/usr/bin/env bash
# Starts (or stops) the engines a supernode fleet runs on, on loopback only:
#   PostgreSQL on 127.0.0.1:55432 (database and role `peerline`, no password on loopback)
#   a 3-master Redis Cluster on 127.0.0.1:57001-57003 (cluster bus on 47001-47003)
# Installs postgresql and redis-server from Debian's packages when missing. Idempotent:
# running engines are reused. Prints the URLs as shell exports, so
#   eval "$(bash scripts/fleet-services.sh start)"
# sets PEERLINE_TEST_PG_URL and PEERLINE_TEST_REDIS_URL for the tests.
# Usage: fleet-services.sh start|stop|status [--dir DIR]
set -euo pipefail

cmd="${1:-start}"
shift || true
# Not under $HOME: the postgres account must reach it, and root's home is closed to it.
dir="${PEERLINE_FLEET_DIR:-/var/tmp/peerline-fleet}"
while [ $# -gt 0 ]; do
    case "$1" in
    --dir) dir="$2"; shift 2 ;;
    *) echo "unknown argument: $1 (usage: fleet-services.sh start|stop|status [--dir DIR])" >&2; exit 2 ;;
    esac
done

PG_PORT=55432
REDIS_PORTS=(57001 57002 57003)
PG_URL="postgres://peerline@127.0.0.1:${PG_PORT}/peerline"
REDIS_URL="redis://127.0.0.1:${REDIS_PORTS[0]},127.0.0.1:${REDIS_PORTS[1]},127.0.0.1:${REDIS_PORTS[2]}"

log() { echo "fleet-services: $*" >&2; }

pg_bin() {
    local d
    d="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)"
    [ -n "$d" ] && [ -x "$d/postgres" ] && echo "$d"
}

install_missing() {
    local want=()
    [ -n "$(pg_bin)" ] || want+=(postgresql)
    command -v redis-server >/dev/null 2>&1 || want+=(redis-server)
    command -v redis-cli >/dev/null 2>&1 || want+=(redis-tools)
    if [ ${#want[@]} -gt 0 ]; then
        log "installing ${want[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq >&2 || true
        apt-get install -y -qq "${want[@]}" >&2
    fi
}

# PostgreSQL refuses to run as root: run it as the `postgres` account the package creates.
as_pg() {
    if [ "$(id -u)" = 0 ]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

start_pg() {
    local bin data="$dir/pg"
    bin="$(pg_bin)"
    if as_pg "$bin/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT" 2>/dev/null; then
        return
    fi
    mkdir -p "$dir"
    if [ "$(id -u)" = 0 ]; then chown postgres: "$dir" 2>/dev/null || true; chmod 755 "$dir"; fi
    if [ ! -f "$data/PG_VERSION" ]; then
        log "initialising PostgreSQL in $data"
        as_pg mkdir -p "$data"
        as_pg "$bin/initdb" -D "$data" -A trust -U postgres -E UTF8 >/dev/null
        cat <<EOF | as_pg tee -a "$data/postgresql.conf" >/dev/null
listen_addresses = '127.0.0.1'
port = $PG_PORT
unix_socket_directories = '$data'
max_connections = 300
fsync = on
synchronous_commit = on
EOF
    fi
    log "starting PostgreSQL on 127.0.0.1:$PG_PORT"
    as_pg "$bin/pg_ctl" -D "$data" -l "$data/server.log" -w -t 60 start >/dev/null
    as_pg "$bin/psql" -q -h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres -v ON_ERROR_STOP=1 <<'EOF' >/dev/null
DO $$ BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'peerline') THEN
    CREATE ROLE peerline LOGIN CREATEDB;
  END IF;
END $$;
EOF
    if ! as_pg "$bin/psql" -tA -h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres \
        -c "SELECT 1 FROM pg_database WHERE datname = 'peerline'" | grep -q 1; then
        as_pg "$bin/createdb" -h 127.0.0.1 -p "$PG_PORT" -U postgres -O peerline peerline
    fi
}

stop_pg() {
    local bin data="$dir/pg"
    bin="$(pg_bin)" || return 0
    [ -f "$data/postmaster.pid" ] && as_pg "$bin/pg_ctl" -D "$data" -m fast -w stop >/dev/null || true
}

redis_up() { redis-cli -h 127.0.0.1 -p "$1" ping 2>/dev/null | grep -q PONG; }

start_redis() {
    local p
    for p in "${REDIS_PORTS[@]}"; do
        if redis_up "$p"; then continue; fi
        mkdir -p "$dir/redis-$p"
        log "starting redis-server on 127.0.0.1:$p"
        redis-server --port "$p" --bind 127.0.0.1 --protected-mode no --daemonize yes \
            --cluster-enabled yes --cluster-port "$((p - 10000))" --cluster-config-file "$dir/redis-$p/nodes.conf" \
            --cluster-node-timeout 2000 --dir "$dir/redis-$p" --appendonly no --save '' \
            --logfile "$dir/redis-$p/redis.log" --pidfile "$dir/redis-$p/redis.pid"
    done
    for p in "${REDIS_PORTS[@]}"; do
        for _ in $(seq 1 50); do redis_up "$p" && break; sleep 0.1; done
        redis_up "$p" || { log "redis on port $p did not start (see $dir/redis-$p/redis.log)"; exit 1; }
    done
    if ! redis-cli -p "${REDIS_PORTS[0]}" cluster info | grep -q 'cluster_state:ok'; then
        local known
        known="$(redis-cli -p "${REDIS_PORTS[0]}" cluster info | sed -n 's/^cluster_known_nodes:\([0-9]*\).*/\1/p')"
        if [ "${known:-1}" = 1 ]; then
            log "creating the Redis Cluster"
            redis-cli --cluster create "127.0.0.1:${REDIS_PORTS[0]}" "127.0.0.1:${REDIS_PORTS[1]}" \
                "127.0.0.1:${REDIS_PORTS[2]}" --cluster-replicas 0 --cluster-yes >/dev/null
        fi
        for _ in $(seq 1 100); do
            redis-cli -p "${REDIS_PORTS[0]}" cluster info | grep -q 'cluster_state:ok' && break
            sleep 0.1
        done
        redis-cli -p "${REDIS_PORTS[0]}" cluster info | grep -q 'cluster_state:ok' \
            || { log "the Redis Cluster did not reach state ok"; exit 1; }
    fi
}

stop_redis() {
    local p
    for p in "${REDIS_PORTS[@]}"; do
        redis-cli -h 127.0.0.1 -p "$p" shutdown nosave >/dev/null 2>&1 || true
    done
}

case "$cmd" in
start)
    install_missing
    start_pg
    start_redis
    echo "export PEERLINE_TEST_PG_URL='$PG_URL'"
    echo "export PEERLINE_TEST_REDIS_URL='$REDIS_URL'"
    ;;
stop)
    stop_redis
    stop_pg
    ;;
status)
    bin="$(pg_bin || true)"
    if [ -n "$bin" ] && as_pg "$bin/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT" 2>/dev/null; then
        echo "postgresql: up ($PG_URL)"
    else
        echo "postgresql: down"
    fi
    for p in "${REDIS_PORTS[@]}"; do
        if redis_up "$p"; then echo "redis $p: up"; else echo "redis $p: down"; fi
    done
    ;;
*)
    echo "usage: fleet-services.sh start|stop|status [--dir DIR]" >&2
    exit 2
    ;;
esac
