#!/usr/bin/env bash
# Supernode capacity at full size, each scenario in its own run with its references
# (the login's crypto cost and a bare batched echo server) measured in the same run.
# Writes JSON reports and SVG plots to OUT (default bench-out/).
#
#   USERS=1000000 bash scripts/bench-capacity.sh
#
# Test mode: `peerline-load provision` issues certificates with the supernode's
# authority.key (only the operator has it) and writes accounts into its store; run it
# against a data dir made for benchmarking, never a production one.
set -euo pipefail
cd "$(dirname "$0")/.."
USERS=${USERS:-1000000}
HOLD=${HOLD:-120}            # seconds the million users are held (steady)
MAXLOAD_USERS=${MAXLOAD_USERS:-100000}
MAXLOAD_KEEPALIVE=${MAXLOAD_KEEPALIVE:-1}
OUT=${OUT:-bench-out}
BIN=${BIN:-${CARGO_TARGET_DIR:-target}/release}
SCENARIOS=${SCENARIOS:-"steady maxload halfload storm"}
# peerlined's UDP socket gets the system's default buffers (net.core.rmem_default, 208 KiB
# on Debian): at tens of thousands of datagrams per second a few milliseconds without
# the CPU overflow it. As root, the defaults are raised to RMEM bytes only while
# peerlined creates its socket, then restored (RMEM=0: keep the system's).
RMEM=${RMEM:-16777216}
mkdir -p "$OUT"
for b in peerlined peerline-load; do
    [ -x "$BIN/$b" ] || { echo "$BIN/$b missing: cargo build --release -p peerlined -p peerline-load" >&2; exit 1; }
done
sn_pid=""
old_r=""; old_w=""
restore() {
    if [ -n "$old_r" ]; then sysctl -qw net.core.rmem_default="$old_r" net.core.wmem_default="$old_w"; fi
    old_r=""
}
stop_sn() {
    restore
    # A supernode stuck in a long timer pass ignores SIGTERM: give it 10 s, then SIGKILL.
    if [ -n "$sn_pid" ]; then
        kill "$sn_pid" 2>/dev/null || true
        for _ in $(seq 100); do kill -0 "$sn_pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$sn_pid" 2>/dev/null || true
        wait "$sn_pid" 2>/dev/null || true
    fi
    sn_pid=""
}
port() { python3 -c 'import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
if [ -n "${DATA:-}" ] && [ -f "$DATA/load-users.bin" ]; then
    data=$DATA                    # a data dir provisioned by an earlier run: kept
    trap 'stop_sn' EXIT
else
    data=${DATA:-$(mktemp -d)/sn}
    [ -n "${DATA:-}" ] && trap 'stop_sn' EXIT || trap 'stop_sn; rm -rf "$(dirname "$data")"' EXIT
    "$BIN/peerlined" init --data "$data" --listen "127.0.0.1:$(port)" --admin "127.0.0.1:$(port)" >/dev/null
    # All simulated users come from 64 loopback addresses: per-source limits would measure
    # themselves, not the supernode (a storm's re-logins are all shed as "rate_limited").
    sed -i 's/^relay_listen = .*/relay_listen = "off"/; s/^max_sessions = .*/max_sessions = 2000000/; s/^rate_limits = .*/rate_limits = false/' "$data/peerlined.toml"
    "$BIN/peerline-load" provision --data "$data" --users "$USERS" --json | tee "$OUT/provision.json"
fi

start_sn() {
    rm -f "$data/sessions.snapshot"
    if [ "$RMEM" != 0 ] && [ "$(id -u)" = 0 ]; then
        old_r=$(sysctl -n net.core.rmem_default); old_w=$(sysctl -n net.core.wmem_default)
        sysctl -qw net.core.rmem_default="$RMEM" net.core.wmem_default="$RMEM"
    fi
    "$BIN/peerlined" run --data "$data" 2>"$OUT/peerlined-$1.log" &
    sn_pid=$!
    local ok=""
    # The pid file comes first; the log says when the UDP socket is bound.
    for _ in $(seq 400); do grep -q "supernode listening" "$OUT/peerlined-$1.log" 2>/dev/null && { ok=1; break; }; sleep 0.05; done
    restore
    [ -n "$ok" ] || { echo "peerlined did not start" >&2; exit 1; }
}

run() { # name, peerline-load arguments...
    local name=$1; shift
    start_sn "$name"
    # A run that misses (e.g. not every user logged in) still writes its report.
    "$BIN/peerline-load" "$@" --data "$data" --json --plot "$OUT/$name.svg" >"$OUT/$name.json" \
        || echo "$name: peerline-load exited with an error; its report is kept" >&2
    stop_sn
    python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); print(sys.argv[2], json.dumps({k: r[k] for k in ["users","logins_per_s","login_vs_crypto_bound","login_per_core_vs_crypto_bound","requests_vs_echo"]}), json.dumps(r["supernode"]), json.dumps(r["phase"]), json.dumps(r.get("storm")))' "$OUT/$name.json" "$name"
}

for s in $SCENARIOS; do
    case $s in
    steady)   # USERS held with keepalives every 25 s and the default request mix
        run steady steady --users "$USERS" --duration "$HOLD" --keepalive 25 ;;
    maxload)  # the request ceiling: fewer users, keepalives every second plus the mix
        run maxload steady --users "$MAXLOAD_USERS" --duration 30 --keepalive "$MAXLOAD_KEEPALIVE" \
            --presence-rate 5000 --lookup-rate 2000 --connect-rate 500 ;;
    halfload) # half the ceiling measured by maxload, for p99
        rate=$(python3 -c 'import json; print(json.load(open("'"$OUT"'/maxload.json"))["phase"]["requests_per_s"])')
        ka=$(python3 -c "print(max(0.05, $MAXLOAD_USERS / ($rate / 2 * 0.8)))")
        mix=$(python3 -c "print($rate / 2 * 0.2 / 3)")
        run halfload steady --users "$MAXLOAD_USERS" --duration 30 --keepalive "$ka" \
            --presence-rate "$mix" --lookup-rate "$mix" --connect-rate "$mix" ;;
    storm)    # USERS log in, then all drop and log in again at once
        run storm storm --users "$USERS" --duration 1800 --keepalive 25 ;;
    esac
done
