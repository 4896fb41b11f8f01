#!/usr/bin/env bash
# The project's test command: formatting, lints, then every test in the workspace
# (unit, property, simulation and end-to-end tests with real processes on loopback).
# Needs a Rust toolchain; SQLite is bundled, and the few system packages the tests use
# (a standard STUN client, nftables for the NAT lab) are installed by install-deps.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install-deps.sh
# PostgreSQL and a 3-node Redis Cluster on loopback, for the fleet backends and tests.
eval "$(bash scripts/fleet-services.sh start)"

# Reuse one build directory outside the clone so repeated runs do not rebuild everything.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-${HOME:-/tmp}/.cache/peerline-target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

step() { printf '\n==> %s\n' "$*"; }

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy --all-targets -- -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "build the binaries the end-to-end tests run"
cargo build --workspace --locked

step "tests"
if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --workspace --locked --no-fail-fast
else
    cargo test --workspace --locked --no-fail-fast
fi

# Every fuzz target for a bounded time, starting from the seed corpora in fuzz/seeds
# (captured from real traffic). New inputs go to a scratch directory, so the committed
# corpora do not change; a crash stops the script, its input saved in fuzz/artifacts.
step "fuzz targets, ${FUZZ_SECONDS:=12} s each"
(
    cd fuzz
    export RUSTC_BOOTSTRAP=1 CARGO_TARGET_DIR="$CARGO_TARGET_DIR/fuzz"
    cargo fuzz build -O
    scratch="$(mktemp -d)"
    trap 'rm -rf "$scratch"' EXIT
    for t in $(cargo fuzz list); do
        seeds=()
        [ -d "seeds/$t" ] && seeds=("seeds/$t")
        mkdir -p "$scratch/$t"
        if ! cargo fuzz run -O "$t" "$scratch/$t" "${seeds[@]}" -- \
            -max_total_time="$FUZZ_SECONDS" -rss_limit_mb=2048 -print_final_stats=1 \
            >"$scratch/$t.log" 2>&1; then
            tail -n 40 "$scratch/$t.log"
            echo "fuzz target $t failed (input saved under fuzz/artifacts/$t)" >&2
            exit 1
        fi
        grep -E "^stat::number_of_executed_units" "$scratch/$t.log" | sed "s/^/$t: /"
    done
)

step "NAT lab: connectivity matrix (real peerlined and peerline behind nftables NATs)"
"$CARGO_TARGET_DIR/debug/peerline-lab" matrix --check
