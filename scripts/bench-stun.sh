#!/usr/bin/env bash
# STUN Binding capacity side by side, in one run on one box: peerlined's STUN (on its
# supernode port), peerline-load's minimal batched STUN responder, and coturn
# (`turnserver --stun-only` from Debian's coturn package), each measured by
# `peerline-load stun` for DUR seconds, ROUNDS times interleaved; prints every run as a
# JSON line and the medians of answers per server core-second.
#
#   bash scripts/bench-stun.sh                 # release build in $CARGO_TARGET_DIR or target/
#   DUR=10 ROUNDS=3 bash scripts/bench-stun.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DUR=${DUR:-10}
ROUNDS=${ROUNDS:-3}
BIN=${BIN:-${CARGO_TARGET_DIR:-target}/release}
command -v turnserver >/dev/null || { echo "turnserver missing: apt-get install coturn" >&2; exit 1; }
for b in peerlined peerline-load; do
    [ -x "$BIN/$b" ] || { echo "$BIN/$b missing: cargo build --release -p peerlined -p peerline-load" >&2; exit 1; }
done

work=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

port() { python3 -c 'import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
P_SN=$(port); P_MIN=$(port); P_COT=$(port); P_ADM=$(port)

"$BIN/peerlined" init --data "$work/sn" --listen "127.0.0.1:$P_SN" --admin "127.0.0.1:$P_ADM" >/dev/null
sed -i 's/^relay_listen = .*/relay_listen = "off"/' "$work/sn/peerlined.toml"
"$BIN/peerlined" run --data "$work/sn" 2>"$work/peerlined.log" &
pids+=($!); PID_SN=$!
"$BIN/peerline-load" serve stun --listen "127.0.0.1:$P_MIN" >/dev/null &
pids+=($!); PID_MIN=$!
turnserver -n --stun-only --listening-ip 127.0.0.1 --listening-port "$P_COT" \
    --no-tls --no-dtls --no-cli --log-file stdout --simple-log >"$work/coturn.log" 2>&1 &
pids+=($!); PID_COT=$!
sleep 2

out="$work/runs.jsonl"
for r in $(seq "$ROUNDS"); do
    for s in "peerlined $P_SN $PID_SN" "minimal $P_MIN $PID_MIN" "coturn $P_COT $PID_COT"; do
        set -- $s
        "$BIN/peerline-load" stun --json --target "127.0.0.1:$2" --pid "$3" --duration "$DUR" \
            | python3 -c 'import json,sys; d=json.load(sys.stdin); d["server"]=sys.argv[1]; d["round"]=int(sys.argv[2]); print(json.dumps(d))' "$1" "$r" \
            | tee -a "$out"
    done
done
python3 - "$out" <<'PY'
import json, statistics, sys
runs = [json.loads(l) for l in open(sys.argv[1])]
med = {}
for name in ["peerlined", "minimal", "coturn"]:
    rs = [r for r in runs if r["server"] == name]
    med[name] = {
        "per_core_second": statistics.median(r["per_core_second"] or 0 for r in rs),
        "per_second": statistics.median(r["per_second"] for r in rs),
        "p99_us": statistics.median(r["latency_us"]["p99"] for r in rs),
    }
print(json.dumps({"median": med,
    "peerlined_vs_coturn": med["peerlined"]["per_core_second"] / max(med["coturn"]["per_core_second"], 1e-9),
    "peerlined_vs_minimal": med["peerlined"]["per_core_second"] / max(med["minimal"]["per_core_second"], 1e-9)}))
PY
