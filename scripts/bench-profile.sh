#!/usr/bin/env bash
# Where the supernode's CPU goes, on a small load: peerlined under valgrind's callgrind
# (this box's perf has no hardware counters), logins and then keepalives plus the
# request mix from peerline-load, then the top functions by instructions (inclusive and
# self). Output in OUT (default bench-out/profile).
#
#   USERS=3000 bash scripts/bench-profile.sh
set -euo pipefail
cd "$(dirname "$0")/.."
USERS=${USERS:-3000}
OUT=${OUT:-bench-out/profile}
BIN=${BIN:-${CARGO_TARGET_DIR:-target}/release}
command -v valgrind >/dev/null || { echo "valgrind missing: apt-get install valgrind" >&2; exit 1; }
mkdir -p "$OUT"
data=$(mktemp -d)/sn
trap 'kill $vg 2>/dev/null || true; rm -rf "$(dirname "$data")"' EXIT
port() { python3 -c 'import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
"$BIN/peerlined" init --data "$data" --listen "127.0.0.1:$(port)" --admin "127.0.0.1:$(port)" >/dev/null
sed -i 's/^relay_listen = .*/relay_listen = "off"/' "$data/peerlined.toml"
"$BIN/peerline-load" provision --data "$data" --users "$USERS" >/dev/null
valgrind --tool=callgrind --callgrind-out-file="$OUT/callgrind.out" \
    "$BIN/peerlined" run --data "$data" 2>"$OUT/valgrind.log" &
vg=$!
for _ in $(seq 600); do [ -s "$data/peerlined.pid" ] && break; sleep 0.1; done
"$BIN/peerline-load" steady --data "$data" --users "$USERS" --duration 20 --keepalive 1 \
    --presence-rate 100 --lookup-rate 100 --connect-rate 20 --inflight 32 --sockets 16 \
    --echo-seconds 0 --crypto-iterations 0 --login-timeout 600 --json --plot "$OUT/profile.svg" >"$OUT/load.json"
kill -INT $vg; wait $vg || true
callgrind_annotate --inclusive=yes "$OUT/callgrind.out" 2>/dev/null | head -60 >"$OUT/inclusive.txt"
callgrind_annotate "$OUT/callgrind.out" 2>/dev/null | head -60 >"$OUT/self.txt"
echo "profile: $OUT/inclusive.txt and $OUT/self.txt"
