#!/usr/bin/env bash
# Installs the system packages the tests use, when missing:
#   coturn      turnutils_stunclient, a standard STUN client for interoperability tests
#   nftables, iptables, iproute2   the NAT lab (network namespaces and NAT rules)
#   cmake       builds the libopus bundled with the `opus` crate (peerline-media)
#   espeak-ng, sox   speech for the call quality tests and benchmark
#   cargo-fuzz  the bounded fuzzing step (a cargo subcommand, from crates.io)
#   tmux        drives the terminal app in its integration test (send-keys, capture-pane)
# Runs apt-get only as root; otherwise says what is missing and what to run.
set -euo pipefail

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "installing cargo-fuzz"
    cargo install --locked cargo-fuzz >/dev/null
fi

need=()
command -v turnutils_stunclient >/dev/null 2>&1 || need+=(coturn)
command -v nft >/dev/null 2>&1 || need+=(nftables)
command -v iptables >/dev/null 2>&1 || need+=(iptables)
command -v ip >/dev/null 2>&1 || need+=(iproute2)
command -v cmake >/dev/null 2>&1 || need+=(cmake)
command -v espeak-ng >/dev/null 2>&1 || need+=(espeak-ng)
command -v sox >/dev/null 2>&1 || need+=(sox)
command -v tmux >/dev/null 2>&1 || need+=(tmux)

if [ ${#need[@]} -eq 0 ]; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "missing system packages: ${need[*]}; install them with: sudo apt-get install -y ${need[*]}" >&2
    exit 1
fi
echo "installing: ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# --no-install-recommends: coturn is needed only for its client tools; its server is
# disabled by default in Debian and never started by these scripts.
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
