#!/usr/bin/env bash
# The project's test command: formatting, lints, then every test in the workspace
# (unit, property, simulation and end-to-end tests with real processes on loopback).
# Needs a Rust toolchain; SQLite is bundled, and the few system packages the tests use
# (a standard STUN client, nftables for the NAT lab) are installed by install-deps.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install-deps.sh

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

step "NAT lab: connectivity matrix (real peerlined and peerline behind nftables NATs)"
"$CARGO_TARGET_DIR/debug/peerline-lab" matrix --check
